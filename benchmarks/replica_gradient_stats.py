"""Training time with the replica gradient statistics against plain training under the same strategy, as a ratio.

Usage: python benchmarks/replica_gradient_stats.py [--model resnet20] [--batch 32] [--logical-cpus 2]
                                                   [--epochs 4] [--rounds 2] [--every 10]

Runs `python -m pipeline.train` on the digits under MirroredStrategy over --logical-cpus logical CPU devices,
alternating: with --grad-stats-every 0 (plain training, the model's own Keras train_step) and with
--grad-stats-every EVERY (callbacks/replica_norms.py's train_step: the squared norms and one more all-reduce at every
step, and a record every EVERY steps by callbacks/replica_gradient_stats.py). BN statistics, learning dynamics,
precise BN and export are off in both. Each run is a process of its own: logical devices are set up before
TensorFlow starts, and TensorFlow reuses collective-op keys across strategies in one process, so a plain and an
instrumented run (all-reduces of different shapes) cannot follow each other in one process. Per run: time per step
(pipeline.rundir's median over the epochs after the first; the records' own timer, the only part of the
statistics outside the training step, is left out of it and printed) and training time (all epochs, tracing
included). Each round prints its ratios; the last line gives the ratios of the means over the rounds. Goal (issue
"Data-parallel training", item 4): time per step with the statistics <= 1.10x plain training under the same strategy.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import results  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--batch", type=int, default=32, help="global batch")
    parser.add_argument("--logical-cpus", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=4, help="epochs per run; the first is not in time per step")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--every", type=int, default=10, help="steps per record of the statistics")
    args = parser.parse_args(argv)

    flags = ["--model", args.model, "--batch", str(args.batch), "--epochs", str(args.epochs), "--strategy",
             "mirrored", "--logical-cpus", str(args.logical_cpus), "--bn-stats-every", "0", "--no-dynamics",
             "--no-export", "--precise-bn-samples", "0", "--verbose", "0"]
    environment = {**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "2"}
    recorder = results.Recorder("replica_gradient_stats")
    per_step, training = {"plain": [], "statistics": []}, {"plain": [], "statistics": []}
    runs = []  # every run's raw figures, in the order run
    with tempfile.TemporaryDirectory() as scratch:
        for round_ in range(args.rounds):
            for name, every in (("plain", 0), ("statistics", args.every)):
                run_dir = os.path.join(scratch, f"{name}-{round_}")
                result = subprocess.run([sys.executable, "-m", "pipeline.train", *flags, "--grad-stats-every",
                                         str(every), "--run-dir", run_dir], cwd=ROOT, env=environment,
                                        capture_output=True, text=True, check=False)
                if result.returncode != 0:
                    print(f"{name} run failed:\n{result.stderr[-2000:]}", file=sys.stderr)
                    return 1
                with open(os.path.join(run_dir, "summary.json")) as f:
                    summary = json.load(f)
                per_step[name].append(summary["time_per_step_s"])
                training[name].append(summary["train_time_s"])
                runs.append({"round": round_ + 1, "variant": name, "grad_stats_every": every,
                             **{k: summary[k] for k in ("replicas", "time_per_step_s", "train_time_s",
                                                        "instrument_time_s", "test_accuracy")}})
                print(f"{name:10s} replicas {summary['replicas']}, time per step "
                      f"{1000 * summary['time_per_step_s']:7.2f} ms, training {summary['train_time_s']:6.1f} s, "
                      f"records' own timer {summary['instrument_time_s']:5.2f} s, test accuracy "
                      f"{summary['test_accuracy']:.4f}", flush=True)
            print(f"round {round_ + 1}: time per step with / without "
                  f"{per_step['statistics'][-1] / per_step['plain'][-1]:.3f}x, training time "
                  f"{training['statistics'][-1] / training['plain'][-1]:.3f}x", flush=True)
    step_ratio = statistics.mean(per_step["statistics"]) / statistics.mean(per_step["plain"])
    train_ratio = statistics.mean(training["statistics"]) / statistics.mean(training["plain"])
    print(f"{args.model}, global batch {args.batch} on {args.logical_cpus} logical CPUs, {args.rounds} round(s): "
          f"time per step with the replica statistics / plain = {step_ratio:.3f}x (goal <= 1.10x); training time "
          f"{train_ratio:.3f}x")
    step_rounds = [s / p for s, p in zip(per_step["statistics"], per_step["plain"])]
    train_rounds = [s / p for s, p in zip(training["statistics"], training["plain"])]
    table = [{"measurement": "time per step, with the replica statistics / plain", "ratio": round(step_ratio, 3),
              "rounds": " ".join(f"{r:.3f}" for r in step_rounds), "goal": "<= 1.10",
              "met": step_ratio <= 1.10},
             {"measurement": "training time (all epochs, tracing included), with / plain", "ratio": round(train_ratio, 3),
              "rounds": " ".join(f"{r:.3f}" for r in train_rounds), "goal": "", "met": None}]
    path = recorder.write(rounds=runs, summary={"tables": {"Ratios of the means over the rounds": table}},
                          settings=vars(args))
    print(f"result: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
