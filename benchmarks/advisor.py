"""The batch-size advisor against the default sweep, in one process: time-to-target and cost ratios.

Usage: python benchmarks/advisor.py [--out /tmp/advisor_bench] [--dataset digits] [--model resnet20]
                                   [--epochs 12] [--target-accuracy 0.98] [--batch 8,16,32,64,128,256]
       CIFAR-sized: python benchmarks/shapes.py /tmp/shapes.npz, then --dataset npz:/tmp/shapes.npz with a target
       that dataset reaches.

Runs, with the default sweep's settings (lr 0.05 at batch 32 scaled linearly, warmup 5/90 of the epochs; by default
12 epochs and a target of 98% validation accuracy):
  1. pipeline.advise (the probe and the advice), timed from the call to the written advice;
  2. the default sweep (batches 8..256) with that advice, so its report holds "Predicted vs measured";
  3. pipeline.train --advice at the advised batch and learning rate, with the same budget and target.
Prints the goals of the advisor issue as ratios:
  time to target of the advised run / the best of the sweep   (goal <= 1.25), twice: on each run's training clock
      (summary.json's time_to_target_s: first-epoch tracing and epoch-end validations included, which on the
      digits are most of the ~8 s) and at steady speed (steps to target x the run's median time per step);
  probe time / sweep time                                      (goal <= 0.1; both wall time in this process)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import results  # noqa: E402
from pipeline import config as config_lib  # noqa: E402
from pipeline import rundir  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/advisor_bench")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per run (default: the sweep's preset)")
    parser.add_argument("--target-accuracy", type=float, default=None, help="default: the sweep's preset")
    parser.add_argument("--batch", default=None, help="the sweep's batch sizes, comma-separated")
    parser.add_argument("--note", default="", help="kept in the result file's settings: the conditions of this run "
                        "(e.g. a machine shared with other jobs)")
    args = parser.parse_args(argv)

    from pipeline import train
    from pipeline.advisor import recommend as advise
    from pipeline.study import batch_sweep as sweep, sweep_report

    config = dataclasses.replace(config_lib.batch_study(), dataset=args.dataset, model=args.model, verbose=0)
    if args.epochs:
        config = dataclasses.replace(config, epochs=args.epochs)
    if args.target_accuracy:
        config = dataclasses.replace(config, target_accuracy=args.target_accuracy)
    batches = tuple(int(b) for b in args.batch.split(",")) if args.batch else sweep.Spec.batches
    warmup = sweep.WARMUP_FRACTION * config.epochs
    if os.path.isdir(args.out) and os.listdir(args.out):
        # The sweep would resume: it would skip the runs found there, made perhaps by another version of the code.
        parser.error(f"--out: {args.out} is not empty; give a new directory (the benchmark starts from scratch)")
    os.makedirs(args.out, exist_ok=True)
    recorder = results.Recorder("advisor-" + rundir.default_out(config, ""))  # e.g. advisor-digits-resnet20
    rows = []  # (measurement, value, goal, met) for the result file

    started = time.perf_counter()
    advice = advise.advise(dataclasses.replace(config, warmup_epochs=warmup), 0, max(batches),
                           os.path.join(args.out, "advice"))
    probe_s = time.perf_counter() - started
    print(f"advice ({probe_s:.1f} s): {advice['message']}", flush=True)

    started = time.perf_counter()
    recommended = advice["status"] == "recommended"
    spec = sweep.Spec(batches=batches, warmup_fraction=sweep.WARMUP_FRACTION,
                      advice=os.path.join(args.out, "advice", "advice.json") if recommended else None)
    result = sweep.sweep(config, spec, os.path.join(args.out, "sweep"), log=lambda line: print(line, flush=True))
    sweep_s = time.perf_counter() - started
    times = {g["batch"]: g["time_to_target_s"]["mean"] for g in result["groups"] if g["time_to_target_s"]["mean"]}
    steady = {g["batch"]: g["steps_to_target"]["mean"] * g["time_per_step_ms"]["mean"] / 1000
              for g in result["groups"] if g["batch"] in times and g["time_per_step_ms"]["mean"]}
    best_batch, best_steady = min(times, key=times.get), min(steady, key=steady.get)
    print(f"sweep ({sweep_s:.1f} s): time to target by batch (training clock; at steady speed) "
          + ", ".join(f"{b}: {t:.1f} s; {steady[b]:.2f} s" for b, t in sorted(times.items())), flush=True)

    print(f"probe / sweep time: {probe_s / sweep_s:.3f} (goal <= 0.1)")
    rows.append(("probe time / sweep time", round(probe_s / sweep_s, 4), "<= 0.1", probe_s / sweep_s <= 0.1))
    raw = {"probe_s": probe_s, "sweep_s": sweep_s, "advice": advice["message"],
           "sweep_time_to_target_s": times, "sweep_steady_time_to_target_s": steady}

    def record() -> None:
        table = [dict(zip(("measurement", "value", "goal", "met"), row)) for row in rows]
        settings = vars(args) | {"batches": list(batches), "epochs": config.epochs,
                                 "target_accuracy": config.target_accuracy}
        print(f"result: {recorder.write(rounds=[raw], summary={'tables': {'Goals': table}}, settings=settings)}")

    if advice["status"] != "recommended":
        print("no recommendation, so no advised run: " + advice["message"])
        record()
        return 0
    run_dir = os.path.join(args.out, "advised")
    summary = train.train(dataclasses.replace(config, warmup_epochs=warmup, run_dir=run_dir, overwrite=True,
                                              advice=os.path.join(args.out, "advice", "advice.json")))
    row = sweep_report.read_run(run_dir)
    raw |= {"advised_batch_source": summary.batch_source, "advised_steps_to_target": row["steps_to_target"],
            "advised_time_to_target_s": row["time_to_target_s"], "advised_time_per_step_ms": row["time_per_step_ms"]}
    print(f"advised run: {summary.batch_source}; steps to target {row['steps_to_target']}, time to target "
          + (f"{row['time_to_target_s']:.1f} s" if row["time_to_target_s"] else "not reached"))
    if row["time_to_target_s"]:
        clock = row["time_to_target_s"] / times[best_batch]
        print(f"advised / best sweep time to target, training clock: {clock:.2f} "
              f"(best: batch {best_batch}, {times[best_batch]:.1f} s; goal <= 1.25)")
        advised_steady = row["steps_to_target"] * row["time_per_step_ms"] / 1000
        print(f"advised / best sweep time to target, steady speed: {advised_steady / steady[best_steady]:.2f} "
              f"({advised_steady:.2f} s; best: batch {best_steady}, {steady[best_steady]:.2f} s; goal <= 1.25)")
        rows.append((f"advised / best time to target, training clock (best: batch {best_batch})", round(clock, 3),
                     "<= 1.25", clock <= 1.25))
        rows.append((f"advised / best time to target, steady speed (best: batch {best_steady})",
                     round(advised_steady / steady[best_steady], 3), "<= 1.25",
                     advised_steady / steady[best_steady] <= 1.25))
    prediction = result.get("prediction")
    if prediction:
        print(f"predicted fastest batch {prediction['predicted_fastest']}, measured fastest "
              f"{prediction['fastest_batch']}; steps off by {prediction['steps_off_typical']:.2f}x (median)")
        rows.append(("predicted fastest batch / measured fastest batch",
                     f"{prediction['predicted_fastest']} / {prediction['fastest_batch']}", "", None))
    record()
    print(f"report: {os.path.join(args.out, 'sweep', 'report.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
