"""Training time with the replica gradient statistics against plain training under the same strategy, as a ratio.

Usage: python benchmarks/replica_gradient_stats.py [--model resnet20] [--batch 32] [--logical-cpus 2]
                                                   [--epochs 4] [--rounds 2] [--every 10]

Runs `pipeline.train` on the digits under MirroredStrategy over --logical-cpus logical CPU devices, alternating
in one process: with --grad-stats-every 0 (plain training, the model's own Keras train_step) and with
--grad-stats-every EVERY (callbacks/replica_norms.py's train_step, the squared norms and one more all-reduce at
every step, and a record every EVERY steps by callbacks/replica_gradient_stats.py). BN statistics, learning dynamics,
precise BN and export are off in both. Columns per run: time per step (pipeline.rundir's median over the epochs
after the first; the records' own timer is left out of it, and is printed: it is the only part of the statistics
outside the training step) and training time (all epochs, tracing included). The ratios are the means over the
rounds. Goal (issue "Data-parallel training", item 4): time per step with the statistics <= 1.10x plain training.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline import config as config_lib  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--batch", type=int, default=32, help="global batch")
    parser.add_argument("--logical-cpus", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=4, help="epochs per run; the first is not in time per step")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--every", type=int, default=10, help="steps per record of the statistics")
    args = parser.parse_args(argv)

    from pipeline import train

    base = dataclasses.replace(config_lib.Config(), model=args.model, batch=args.batch, epochs=args.epochs,
                               strategy="mirrored", logical_cpus=args.logical_cpus, bn_stats_every=0,
                               dynamics=False, export=False, precise_bn_samples=0, verbose=0)
    per_step, training = {"plain": [], "statistics": []}, {"plain": [], "statistics": []}
    with tempfile.TemporaryDirectory() as scratch:
        for round_ in range(args.rounds):
            for name, every in (("plain", 0), ("statistics", args.every)):
                config = dataclasses.replace(base, grad_stats_every=every,
                                             run_dir=os.path.join(scratch, f"{name}-{round_}"))
                summary = train.train(config)
                per_step[name].append(summary.time_per_step_s)
                training[name].append(summary.train_time_s)
                print(f"{name:10s} replicas {summary.replicas}, time per step {1000 * summary.time_per_step_s:7.2f} ms, "
                      f"training {summary.train_time_s:6.1f} s, records' own timer {summary.instrument_time_s:5.2f} s, "
                      f"test accuracy {summary.test_accuracy:.4f}", flush=True)
    step_ratio = statistics.mean(per_step["statistics"]) / statistics.mean(per_step["plain"])
    train_ratio = statistics.mean(training["statistics"]) / statistics.mean(training["plain"])
    print(f"{args.model}, global batch {args.batch} on {args.logical_cpus} logical CPUs, {args.rounds} round(s): "
          f"time per step with the replica statistics / plain = {step_ratio:.3f}x (goal <= 1.10x); training time "
          f"{train_ratio:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
