"""What the study of sharpness costs in a sweep, and what it finds: the default sweep, which measures curvature.

Usage: python benchmarks/sharpness_sweep.py [--out DIR] [-- SWEEP FLAGS...]

Runs `pipeline.sweep` (the default sweep: ResNet-20 on the digits, batch 8 to 128, its default seeds, linear lr
scaling, a curvature measurement at each run's target and at its end), plus any sweep flags after `--`, into --out (a temporary
folder by default; an --out holding a finished sweep is reported again without training), timing the whole command,
and writes to benchmarks/results/sharpness_sweep.json:
  sweep_s         the sweep's wall time, runs, report and loss line included;
  curvature_s     the runs' curvature measurements (tracing included; pipeline/study/sharpness.py's cost line);
  loss_line_s     the loss line the report computed (0 when it was cached from an earlier report);
  fraction        (curvature_s + loss_line_s) / sweep_s: the share of the sweep the study of sharpness takes (goal:
                  at most 10%);
  per batch       mean lambda_max at the end and at the target, tr(H), accuracy gap over seeds;
  answers         the report's four sharpness findings, verbatim.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import results  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("sweep_flags", nargs="*", help="flags passed on to pipeline.sweep (after --)")
    args = parser.parse_args(argv)
    from pipeline.study import batch_sweep, sweep_report

    recorder = results.Recorder("sharpness_sweep")
    with tempfile.TemporaryDirectory() as folder:
        out = args.out or os.path.join(folder, "sweep")
        started, clock = time.time(), time.perf_counter()
        code = batch_sweep.main([*args.sweep_flags, "--out", out, "--verbose", "0"])
        sweep_s = time.perf_counter() - clock
        if code:
            raise RuntimeError(f"the sweep exited with code {code}")
        report = sweep_report.load_report(out)
        line_file = os.path.join(out, "loss_line.json")
        fresh = os.path.exists(line_file) and os.path.getmtime(line_file) >= started  # not a cached line
    part = report["sharpness"]
    if not part.get("measured"):
        raise RuntimeError("the sweep measured no curvature (--curvature-every 0?)")
    line = part.get("line") or {}
    summary = {
        "sweep_s": sweep_s, "curvature_s": part["cost"]["curvature_s"],
        "loss_line_s": (line.get("seconds") or 0.0) if fresh else 0.0,
        "runs_wall_time_s": part["cost"]["wall_time_s"], "runs": part["cost"]["runs"],
        "per_batch": [{"batch": g["batch"], "max_eigenvalue": g["max_eigenvalue"]["mean"],
                       "max_eigenvalue_at_target": g["max_eigenvalue_at_target"]["mean"],
                       "trace": g["trace"]["mean"], "generalization_gap": g["generalization_gap"]["mean"]}
                      for g in part["groups"]],
        "answers": part["answers"],
        "line": {k: line.get(k) for k in ("alphas", "train_loss", "test_loss", "bn")},
    }
    summary["fraction"] = (summary["curvature_s"] + summary["loss_line_s"]) / sweep_s
    print(f"curvature {summary['curvature_s']:.0f} s + loss line {summary['loss_line_s']:.0f} s of the sweep's "
          f"{sweep_s:.0f} s: {summary['fraction']:.1%} (goal <= 10%)")
    for key, sentences in part["answers"].items():
        for sentence in sentences:
            print(f"{key}: {sentence}")
    rounds = [{"name": r["name"], "curvature_seconds": r["curvature_seconds"], "wall_time_s": r["wall_time_s"],
               "max_eigenvalue": r["max_eigenvalue"], "max_eigenvalue_at_target": r.get("max_eigenvalue_at_target"),
               "generalization_gap": r["generalization_gap"]}
              for r in report["runs"]]
    path = recorder.write(rounds=rounds, summary=summary, settings=vars(args))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
