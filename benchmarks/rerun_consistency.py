"""Does the sweep's report survive a rerun? The default sweep several times, its verdicts and B_crit compared.

Usage: python benchmarks/rerun_consistency.py [--out /tmp/rerun_bench] [--reruns 3] [--same-seeds] [--resume]
                                              [--batch 8,16,32,64,128] [--seeds 2] [--epochs 12] [--model resnet20]
                                              [--val-fraction 0.1] [--target-accuracy 0.98]

Runs the default sweep (pipeline.sweep's defaults and config.batch_study(), without --deterministic) --reruns times
into <out>/rerun-<i>, each with its own seeds (rerun i uses seeds i*S .. i*S+S-1 for S seeds, so that the reruns
differ as reruns on new seeds do; --same-seeds gives every rerun seeds 0..S-1, which then differ only by
nondeterministic ops), and checks the acceptance rules of the report's uncertainty:
  1. every finding gives the same verdict in all reruns: the same head ("Yes", "No", "Batch 64 took the least
     time", ...), or one of them is undetermined ("not resolved", "Not enough data", "Not clearly", "not determined");
  2. each rerun's fitted B_crit lies inside every other rerun's bootstrap interval.
A noisy study (a small validation split, a target near the plateau: --val-fraction 0.03 --target-accuracy 0.99) shows
whether the report says which differences it cannot resolve instead of naming a winner.
Writes benchmarks/results/rerun_consistency.json (benchmarks/results.py) with every rerun's verdicts, B_crit and its
interval, wall and CPU seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import results  # noqa: E402
from pipeline import config as config_lib  # noqa: E402

UNDETERMINED = re.compile(r"not resolved|not enough data|not clearly|not determined|unclear|mixed", re.IGNORECASE)


def verdict(sentence: str) -> str:
    """The head of a finding: its text up to the first ':' or '(' (e.g. 'Yes', 'Batch 64 took the least time'); for
    the best test accuracy, the batch when the difference to the worst is more than its noise, else undetermined."""
    best = re.search(r"best test accuracy was [0-9.]+ at batch (\d+)", sentence)
    if best:
        return "not determined (within noise)" if "not more than" in sentence else f"best accuracy at {best[1]}"
    return re.split(r"[:(]", sentence, maxsplit=1)[0].strip()


def consistent(heads: list[str]) -> bool:
    """Whether the reruns' heads of one finding agree, ignoring the reruns that left it undetermined."""
    decided = {head for head in heads if not UNDETERMINED.search(head)}
    return len(decided) <= 1


def compare(reports: list[dict]) -> dict:
    """Verdicts per finding across the reruns, and each rerun's B_crit against every other rerun's interval."""
    findings = {}
    for question in reports[0]["answers"]:
        per_rerun = [[verdict(s) for s in r["answers"][question]] for r in reports]
        for i in range(max(map(len, per_rerun))):
            heads = [v[i] if i < len(v) else "(absent)" for v in per_rerun]
            findings[f"{question}[{i}]"] = {"heads": heads, "consistent": consistent(heads)}
    crits = []
    for r in reports:
        for norm, fit in r["fits"].items():
            interval = fit.get("steps_to_target_interval")
            crits.append({"norm": norm, "b_crit": fit["steps_to_target"]["b_crit"] if fit["steps_to_target"] else None,
                          "interval": interval["b_crit"] if interval else None})
    inside = []
    for i, mine in enumerate(crits):
        for j, other in enumerate(crits):
            if i != j and mine["norm"] == other["norm"] and mine["b_crit"] is not None and other["interval"]:
                low, high = other["interval"]
                inside.append({"rerun": i, "in_interval_of": j, "inside": (low is None or low <= mine["b_crit"])
                               and (high is None or mine["b_crit"] <= high)})
    return {"findings": findings, "b_crit": crits, "b_crit_inside": inside,
            "all_verdicts_consistent": all(f["consistent"] for f in findings.values()),
            "all_b_crit_inside": bool(inside) and all(x["inside"] for x in inside)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/rerun_bench")
    parser.add_argument("--reruns", type=int, default=3)
    parser.add_argument("--same-seeds", action="store_true", help="every rerun on seeds 0..S-1")
    parser.add_argument("--resume", action="store_true",
                        help="continue the reruns in --out (finished runs are skipped, as the sweep does)")
    parser.add_argument("--batch", default=None, help="batch sizes, comma-separated (default: the sweep's)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per batch (default: the sweep's)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--model", default=None)
    parser.add_argument("--val-fraction", type=float, default=None)
    parser.add_argument("--target-accuracy", type=float, default=None)
    args = parser.parse_args(argv)
    recorder = results.Recorder("rerun_consistency")

    from pipeline import startup
    from pipeline.study import batch_sweep as sweep
    from pipeline.training import execution

    startup.import_tensorflow()
    config = dataclasses.replace(config_lib.batch_study(), verbose=0)
    overrides = {"epochs": args.epochs, "model": args.model, "val_fraction": args.val_fraction,
                 "target_accuracy": args.target_accuracy}
    config = config_lib.validate(dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None}))
    execution.set_threads(config)
    batches = tuple(int(b) for b in args.batch.split(",")) if args.batch else sweep.DEFAULT_BATCHES
    seeds = args.seeds or sweep.DEFAULT_SEEDS
    if os.path.isdir(args.out) and os.listdir(args.out) and not args.resume:
        parser.error(f"--out: {args.out} is not empty; give a new directory (the benchmark starts from scratch)")
    reports, rounds = [], []
    for rerun in range(args.reruns):
        first = 0 if args.same_seeds else rerun * seeds
        spec = sweep.Spec(batches=batches, seeds=tuple(range(first, first + seeds)),
                          warmup_fraction=sweep.WARMUP_FRACTION)
        wall, cpu = time.perf_counter(), time.process_time()
        report = sweep.sweep(config, spec, os.path.join(args.out, f"rerun-{rerun}"),
                             log=lambda line: print(line, flush=True))
        # Each run's own wall time (summary.json) survives a resumed benchmark, where this process's clock does not.
        runs = {r["name"]: {"wall_s": r["wall_time_s"], "status": r["status"]} for r in report["runs"]}
        rounds.append({"rerun": rerun, "seeds": list(spec.seeds), "wall_s": time.perf_counter() - wall,
                       "cpu_s": time.process_time() - cpu, "runs": runs, "findings": report["findings"],
                       "b_crit": {n: f["steps_to_target"] for n, f in report["fits"].items()},
                       "b_crit_interval": {n: f.get("steps_to_target_interval") for n, f in report["fits"].items()}})
        reports.append(report)
        print(f"rerun {rerun}: {rounds[-1]['wall_s']:.0f} s wall, {rounds[-1]['cpu_s']:.0f} s CPU", flush=True)
    summary = compare(reports) if len(reports) > 1 else {}
    summary["wall_s"] = [r["wall_s"] for r in rounds]
    summary["cpu_s"] = [r["cpu_s"] for r in rounds]
    for key, value in summary.get("findings", {}).items():
        if not value["consistent"]:
            print(f"inconsistent: {key}: {value['heads']}")
    print(f"verdicts consistent: {summary.get('all_verdicts_consistent')}; each B_crit inside the others' intervals: "
          f"{summary.get('all_b_crit_inside')}")
    settings = {"batches": list(batches), "seeds_per_rerun": seeds, "same_seeds": args.same_seeds,
                "reruns": args.reruns, "config": config_lib.to_dict(config)}
    print(f"result: {recorder.write(rounds=rounds, summary=summary, settings=settings)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
