"""What the study of sharpness costs in a sweep, and what it finds: a small sweep with --curvature-every -1.

Usage: python benchmarks/sharpness_sweep.py [--batch 16,128] [--seeds 2] [--epochs 6] [--out DIR]

Runs `pipeline.sweep --batch B --seeds N --epochs E --curvature-every -1` (the default config otherwise: ResNet-20 on
the digits, linear lr scaling) into --out (a temporary folder by default) and writes to
benchmarks/results/sharpness_sweep.json:
  fraction        the curvature measurements' seconds (tracing included) over the runs' wall time, summed over runs
                  (pipeline/study/sharpness.py: the report's cost line; the loss line, built by the report, not in it);
  per batch       mean lambda_max, tr(H), accuracy gap over seeds;
  answers         the report's four sharpness findings, verbatim.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import results  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", default="16,128")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    from pipeline.study import batch_sweep, sweep_report

    recorder = results.Recorder("sharpness_sweep")
    with tempfile.TemporaryDirectory() as folder:
        out = args.out or os.path.join(folder, "sweep")
        code = batch_sweep.main(["--batch", args.batch, "--seeds", str(args.seeds), "--epochs", str(args.epochs),
                                 "--curvature-every", "-1", "--out", out, "--verbose", "0"])
        if code:
            raise RuntimeError(f"the sweep exited with code {code}")
        report = sweep_report.load_report(out)
    part = report["sharpness"]
    summary = {
        "fraction": part["cost"]["fraction"], "curvature_s": part["cost"]["curvature_s"],
        "wall_time_s": part["cost"]["wall_time_s"], "runs": part["cost"]["runs"],
        "per_batch": [{"batch": g["batch"], "max_eigenvalue": g["max_eigenvalue"]["mean"],
                       "trace": g["trace"]["mean"], "generalization_gap": g["generalization_gap"]["mean"]}
                      for g in part["groups"]],
        "answers": part["answers"],
        "line": {k: (part["line"] or {}).get(k) for k in ("alphas", "train_loss", "test_loss", "bn")},
    }
    print(f"curvature: {summary['curvature_s']:.0f} s of {summary['wall_time_s']:.0f} s ({summary['fraction']:.0%})")
    for key, sentences in part["answers"].items():
        print(f"{key}: {sentences[0]}")
    rounds = [{"name": r["name"], "curvature_seconds": r["curvature_seconds"], "wall_time_s": r["wall_time_s"],
               "max_eigenvalue": r["max_eigenvalue"], "generalization_gap": r["generalization_gap"]}
              for r in report["runs"]]
    path = recorder.write(rounds=rounds, summary=summary, settings=vars(args))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
