"""Cost of a curvature measurement (pipeline.train --curvature-every) against a training step, in one run.

Usage: python benchmarks/curvature_cost.py [--model resnet20] [--batch 32] [--epochs 1] [--every 20] [--rounds 1]

Each round trains `pipeline.train` with only callbacks.Curvature on (gradient and BN statistics, dynamics and
precise BN off), measuring at step 0, every --every steps and at the end. Printed and written to
benchmarks/results/curvature_cost.json:
  measurement s   mean wall time of the measurements after the first (the first holds the one-time tracing);
  products        mean Hessian-vector products per measurement (Lanczos + the trace's probes);
  step s          training time per step in the same run (pipeline.run_timing.time_per_step: epochs after the first,
                  measuring left out);
  ratio           measurement s / step s: a measurement costs this many training steps;
  interval_10pct  the smallest --curvature-every at which the measurements add at most 10% to training time
                  (10 x ratio, rounded up to a multiple of 10).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import results  # noqa: E402
from pipeline import config as config_lib  # noqa: E402
from pipeline import run_timing, rundir  # noqa: E402


def one_round(config) -> dict:
    from pipeline import train

    summary = train.train(config)
    if summary.status != "completed":
        raise RuntimeError(f"the run did not complete: {summary.reason}")
    with open(os.path.join(config.run_dir, "curvature.jsonl")) as f:
        records = [json.loads(line) for line in f]
    history = rundir.read_history(config.run_dir)
    later = records[1:] or records
    return {
        "measurements": len(records),
        "measurement_s": statistics.mean(r["curvature/seconds"] for r in later),
        "first_measurement_s": records[0]["curvature/seconds"],
        "products": statistics.mean(r["curvature/hessian_vector_products"] for r in later),
        "step_s": run_timing.time_per_step(history),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args(argv)
    recorder = results.Recorder("curvature_cost")
    rounds = []
    for i in range(args.rounds):
        with tempfile.TemporaryDirectory() as folder:
            config = dataclasses.replace(
                config_lib.Config(), model=args.model, batch=args.batch, epochs=args.epochs,
                curvature_every=args.every, grad_stats_every=0, bn_stats_every=0, dynamics=False,
                precise_bn_samples=0, verbose=0, run_dir=os.path.join(folder, "run"))
            rounds.append(one_round(config))
        r = rounds[-1]
        print(f"round {i}: measurement {r['measurement_s']:.2f} s ({r['products']:.0f} products, first "
              f"{r['first_measurement_s']:.2f} s), step {r['step_s'] * 1000:.1f} ms, "
              f"ratio {r['measurement_s'] / r['step_s']:.1f} steps", flush=True)
    ratio = statistics.mean(r["measurement_s"] / r["step_s"] for r in rounds)
    summary = {
        "measurement_s": statistics.mean(r["measurement_s"] for r in rounds),
        "products": statistics.mean(r["products"] for r in rounds),
        "step_s": statistics.mean(r["step_s"] for r in rounds),
        "ratio_measurement_to_step": ratio,
        "interval_10pct": int(math.ceil(10 * ratio / 10) * 10),
    }
    print(f"a measurement costs {ratio:.1f} training steps; --curvature-every {summary['interval_10pct']} adds "
          f"<= 10% to training time")
    path = recorder.write(rounds=rounds, summary=summary, settings=vars(args))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
