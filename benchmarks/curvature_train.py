"""What `pipeline.train --curvature-every N` costs a whole default run: wall time with it over wall time without.

Usage: python benchmarks/curvature_train.py [--rounds 3] [--curvature-every -1] [-- more pipeline.train flags]

Runs `python -m pipeline.train --batch 32` (the README's default run, export included) as a fresh process with and
without `--curvature-every N`, alternating (with, without, with, ...), --rounds pairs, after one untimed pair that
warms the file cache. The ratio of each pair's wall times is taken pair by pair, so that the machine's drift over
minutes (10-20% on these VMs) falls mostly outside it; the summary is the median pair's. Each round also records the
curvature records' own seconds and Hessian-vector products, and each run's summary.json clocks; the warm-up pair is
in the summary. Goal (issue: curvature instruments):
`--curvature-every N` at the documented default N within 1.10x. Writes benchmarks/results/curvature_train.json
(benchmarks/results.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import results  # noqa: E402

GOAL = 1.10
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(flags: list[str], run_dir: str) -> dict:
    """One pipeline.train process: its wall seconds and, with curvature, the records' seconds and products."""
    command = [sys.executable, "-m", "pipeline.train", "--batch", "32", *flags, "--run-dir", run_dir]
    started = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    result = {"wall_s": time.perf_counter() - started}
    with open(os.path.join(run_dir, "summary.json"), encoding="utf-8") as f:
        summary = json.load(f)
    # The run's own clock (process start-up and imports left out), its training epochs and its instruments' timer.
    result |= {key: summary.get(key) for key in ("wall_time_s", "train_time_s", "instrument_time_s")}
    path = os.path.join(run_dir, "curvature.jsonl")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            records = [json.loads(line) for line in f]
        result["curvature"] = [{"step": r["step"], "seconds": r["curvature/seconds"],
                                "products": r["curvature/hessian_vector_products"]} for r in records]
    return result


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--curvature-every", type=int, default=-1)
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    recorder = results.Recorder("curvature_train")
    with_curvature = ["--curvature-every", str(args.curvature_every), *extra]
    rounds, warmup = [], None
    with tempfile.TemporaryDirectory() as scratch:
        for index in range(args.rounds + 1):  # round 0 warms the file cache and is not counted
            pair = {name: run(flags, os.path.join(scratch, f"{name}-{index}"))
                    for name, flags in (("curvature", with_curvature), ("without", extra))}
            pair["ratio"] = pair["curvature"]["wall_s"] / pair["without"]["wall_s"]
            print(f"round {index}{' (warm-up)' if index == 0 else ''}: {pair['curvature']['wall_s']:.1f} s with, "
                  f"{pair['without']['wall_s']:.1f} s without, {pair['ratio']:.3f}x", flush=True)
            if index:
                rounds.append(pair)
            else:
                warmup = pair
    ratios = [pair["ratio"] for pair in rounds]
    summary = {"wall_ratio_median": statistics.median(ratios), "wall_ratio_min": min(ratios),
               "wall_ratio_max": max(ratios), "goal": f"<= {GOAL}", "met": statistics.median(ratios) <= GOAL,
               "warmup_pair": warmup}
    path = recorder.write(rounds=rounds, summary=summary,
                          settings={"rounds": args.rounds, "curvature_every": args.curvature_every, "extra": extra})
    print(f"wall with / without --curvature-every {args.curvature_every}: median {summary['wall_ratio_median']:.3f}x "
          f"({summary['wall_ratio_min']:.3f}-{summary['wall_ratio_max']:.3f}; goal {summary['goal']}: "
          f"{'met' if summary['met'] else 'missed'})")
    print(f"result: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
