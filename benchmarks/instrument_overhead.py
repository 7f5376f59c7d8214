"""Epoch time of plain `fit` against each instrument, at its default interval and more often, as ratios.

Usage: python benchmarks/instrument_overhead.py [--model resnet20] [--dataset digits] [--batch 32] [--epochs 10]
                                                [--rounds 2]
       --dataset synthetic:32x32x3 trains on 2048 random images of that shape (CIFAR-sized, for timing only).
       python benchmarks/instrument_overhead.py --default-run [--rounds 2] [--grad-stats-every N]
       runs the README's default run (`python -m pipeline.train --batch 32`, through train()) with the default
       instruments and with --grad-stats-every 0 --bn-stats-every 0 --no-dynamics, alternating, and prints the wall
       time ratio (tracing, precise BN, evaluation and export included) and the instruments' own timer as a share
       of the training epochs, split per instrument and phase (tracing, execution, other: callbacks/timing.py).

All variants train the same model on the same data in one process. Plain fit runs before the first variant and
after every variant, so that each variant is compared with the plain runs next to it: these VMs drift by 10-20%
over minutes, more than the effects measured. Columns:
  epoch s     mean epoch time over the epochs after the first, measurements included (the first epoch holds the
              one-time tracing of the train step, and of the instruments, which measure once at step 0);
  ratio       that mean over the mean of the plain runs just before and just after it, averaged over rounds
              (for plain fit: the slowest plain run over the fastest, i.e. the drift);
  measuring   the instruments' own timer (callbacks.timing): seconds spent measuring per timed epoch, over plain
              fit's epoch time, i.e. the overhead without the machine's noise between variants;
  one-time s  first epoch minus the neighbouring plain runs' first epoch: tracing the instruments and measuring
              at step 0.
Goals: the instruments' own timer <= 10% of the training time and <= 1.10x wall time on the default run (tracing
included), where precision comes first: a gradient measurement takes the examples a pilot says |G|^2 needs, within
a tenth of the examples trained since the previous one (callbacks/gradient_stats.py). --default-run also counts how
many measurements after step 0 determined B_simple or bounded it from below, and writes
benchmarks/results/instrument_overhead_default_run.json (benchmarks/results.py); the per-variant table writes
benchmarks/results/instrument_overhead.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline import config as config_lib  # noqa: E402

OFF = dict(grad_stats_every=0, bn_stats_every=0, dynamics=False)
# name: (Config overrides, micro-batches per gradient measurement or None for the default of 1024 examples)
VARIANTS = {
    "GradientStatistics, default (geometric, pilot-sized)": (dict(OFF, grad_stats_every=-1), None),
    "GradientStatistics, every 100 steps, 1024 examples": (dict(OFF, grad_stats_every=100), 32),
    "GradientStatistics, every 10 steps (pilot-sized)": (dict(OFF, grad_stats_every=10), None),
    "BatchNormStatistics, default": (dict(OFF, bn_stats_every=-1), None),
    "BatchNormStatistics, every step": (dict(OFF, bn_stats_every=1), None),
    "LearningDynamics, default": (dict(OFF, dynamics=True), None),
    "all instruments, defaults": (dict(grad_stats_every=-1, bn_stats_every=-1, dynamics=True), None),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--dataset", default="digits", help="a --dataset of pipeline.train, or synthetic:HxWxC")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=10, help="epochs per round; the first of each is not timed")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--default-run", action="store_true", help="time the README's default run end to end")
    parser.add_argument("--grad-stats-every", type=int, default=-1,
                        help="with --default-run: the gradient-statistics interval of the instrumented run")
    args = parser.parse_args(argv)
    if args.epochs < 2 or args.rounds < 1:
        parser.error("--epochs must be >= 2 and --rounds >= 1")
    if args.default_run:
        return default_run(args.rounds, args.grad_stats_every)

    import keras

    from benchmarks import results
    from callbacks import timing
    from models import Norm, build_model
    from pipeline.data import in_memory as data_lib
    from pipeline.training import callback_setup, optim

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self, instruments):
            super().__init__()
            self.instruments, self.times, self.measuring = instruments, [], []

        def on_epoch_begin(self, epoch, logs=None):
            self.start, self.start_measuring = time.perf_counter(), timing.seconds(self.instruments)

        def on_epoch_end(self, epoch, logs=None):
            self.times.append(time.perf_counter() - self.start)
            self.measuring.append(timing.seconds(self.instruments) - self.start_measuring)

    recorder = results.Recorder("instrument_overhead")
    scratch = tempfile.TemporaryDirectory()
    try:
        dataset = synthetic(args.dataset, scratch.name) if args.dataset.startswith("synthetic:") else args.dataset
    except ValueError as e:
        parser.error(f"--dataset: {e}")
    base = dataclasses.replace(config_lib.Config(), model=args.model, dataset=dataset, batch=args.batch,
                               epochs=args.epochs)
    data = data_lib.load(base)
    steps_per_epoch = data.num_train // args.batch
    runs = []  # (name, timed epochs, first epoch, measuring per timed epoch) in the order run
    with tempfile.TemporaryDirectory() as run_dir:
        for _ in range(args.rounds):
            order = ["plain fit"]
            for name in VARIANTS:
                order += [name, "plain fit"]
            for name in order:
                overrides, micro_batches = VARIANTS.get(name, (OFF, None))
                config = dataclasses.replace(base, **overrides)
                keras.utils.set_random_seed(0)
                norm = Norm(config.norm, ghost_batch=config.ghost_batch, bn_momentum=config.bn_momentum)
                model = build_model(config.model, data.input_shape, data.num_classes, norm, mean=data.mean,
                                    variance=data.variance)
                schedule = optim.learning_rate(config, [(0, steps_per_epoch)])
                model.compile(optimizer=optim.build_optimizer(config, schedule),
                              loss="sparse_categorical_crossentropy", metrics=["accuracy"])
                instruments = callback_setup.instruments(config, data, model, run_dir)
                if micro_batches:
                    instruments[0].micro_batches = micro_batches
                timer = EpochTimer(instruments)
                model.fit(data.train_dataset(config.batch, seed=0), epochs=config.epochs,
                          callbacks=instruments + [timer], verbose=0)
                runs.append((name, timer.times[1:], timer.times[0], timer.measuring[1:]))
    print(f"{args.model} on {args.dataset}, batch {args.batch}, {steps_per_epoch} steps per epoch; default schedule: "
          f"geometric; {args.rounds} round(s) x {args.epochs - 1} timed epochs per variant")
    print(f"{'variant':56s} {'epoch s':>8s} {'ratio':>6s} {'measuring':>9s} {'one-time s':>10s}")
    plain = [statistics.mean(times) for name, times, _, _ in runs if name == "plain fit"]
    summary = {"plain_fit_drift": max(plain) / min(plain)}
    print(f"{'plain fit (all runs)':56s} {statistics.mean(plain):8.3f} {max(plain) / min(plain):5.2f}x")
    for variant in VARIANTS:
        epochs, ratios, shares, once = [], [], [], []
        for i, (name, times, first, measuring) in enumerate(runs):
            if name != variant:
                continue
            before, after = runs[i - 1], runs[i + 1]  # the plain runs next to it
            neighbours = statistics.mean(before[1] + after[1])
            epochs += times
            ratios.append(statistics.mean(times) / neighbours)
            shares.append(statistics.mean(measuring) / neighbours)
            once.append(first - (before[2] + after[2]) / 2)
        print(f"{variant:56s} {statistics.mean(epochs):8.3f} {statistics.mean(ratios):5.2f}x "
              f"{statistics.mean(shares):8.1%} {statistics.mean(once):10.1f}")
        summary[variant] = {"epoch_s": statistics.mean(epochs), "ratio": statistics.mean(ratios),
                            "measuring_share": statistics.mean(shares), "one_time_s": statistics.mean(once)}
    recorder.write(rounds=[{"variant": name, "epoch_s": times, "first_epoch_s": first, "measuring_s": measuring}
                           for name, times, first, measuring in runs], summary=summary, settings=vars(args))
    return 0


def default_run(rounds: int, grad_stats_every: int = -1) -> int:
    """Wall time of the default run with and without the instruments, alternating, in one process; and whether each
    gradient measurement after step 0 determined B_simple or bounded it from below."""
    import json

    from benchmarks import results
    from pipeline import train

    from pipeline import rundir

    recorder = results.Recorder("instrument_overhead_default_run")
    walls, shares, rows, said, parts = {"instruments": [], "off": []}, [], [], [], []
    with tempfile.TemporaryDirectory() as scratch:
        for round_ in range(rounds):
            for name, overrides in (("off", OFF), ("instruments", dict(grad_stats_every=grad_stats_every))):
                run_dir = os.path.join(scratch, f"{name}-{round_}")
                config = dataclasses.replace(config_lib.Config(), batch=32, verbose=0, **overrides, run_dir=run_dir)
                started = time.perf_counter()
                summary = train.train(config)
                walls[name].append(time.perf_counter() - started)
                row = {"variant": name, "wall_s": walls[name][-1], "train_s": summary.train_time_s,
                       "measuring_s": summary.instrument_time_s, "test_accuracy": summary.test_accuracy}
                if name == "instruments":
                    shares.append(summary.instrument_time_s / summary.train_time_s)
                    # The last epoch's record holds the whole run's split (callbacks.timing.phases).
                    split = rundir.read_history(run_dir)[-1]["instrument_phases_s"]
                    parts.append({f"{instrument}/{phase}": seconds / summary.train_time_s
                                  for instrument, by_phase in split.items() for phase, seconds in by_phase.items()})
                    row["instrument_phases_s"] = split
                    with open(os.path.join(run_dir, "grad_stats.jsonl")) as f:
                        records = [json.loads(line) for line in f]
                    row["measurements"] = [
                        {"step": r["step"], "examples": r["examples"], "noise_scale": r["grad/noise_scale"],
                         "lo": r["grad/noise_scale_lo"], "hi": r["grad/noise_scale_hi"]} for r in records]
                    said += ["determined" if r["grad/noise_scale"] is not None else
                             "bounded" if r["grad/noise_scale_lo"] is not None else "nothing"
                             for r in records if r["step"] > 0]
                rows.append(row)
                print(f"{name:12s} wall {walls[name][-1]:6.1f} s, training epochs {summary.train_time_s:6.1f} s, "
                      f"measuring {summary.instrument_time_s:5.2f} s, test accuracy {summary.test_accuracy:.4f}",
                      flush=True)
    ratio = statistics.mean(walls["instruments"]) / statistics.mean(walls["off"])
    share = statistics.mean(shares)
    split = {key: statistics.mean(part[key] for part in parts) for key in parts[0]}
    determined, bounded = said.count("determined"), said.count("bounded")
    print(f"default run, {rounds} round(s): wall time with instruments / without = {ratio:.3f}x; instruments' own "
          f"timer = {share:.1%} of the training epochs (tracing and the step-0 measurements included); "
          f"of {len(said)} gradient measurements after step 0, {determined} determined B_simple and {bounded} "
          f"bounded it")
    print("the instruments' timer by instrument and phase, as a share of the training epochs:")
    for key, value in sorted(split.items(), key=lambda item: -item[1]):
        print(f"  {key:40s} {value:6.1%}")
    recorder.write(rounds=rows, summary={"wall_ratio": ratio, "measuring_share": share,
                                         "measuring_share_by_phase": split,
                                         "said_something": determined + bounded, "determined": determined,
                                         "bounded": bounded, "measurements_after_step_0": len(said),
                                         "goals_met": ratio <= 1.10 and share <= 0.10 and "nothing" not in said},
                   settings={"rounds": rounds, "grad_stats_every": grad_stats_every})
    return 0


def synthetic(spec: str, directory: str) -> str:
    """npz:PATH of 2048 train and 256 test random uint8 images of shape spec = "synthetic:HxWxC", 10 classes."""
    import numpy as np

    try:
        shape = tuple(int(n) for n in spec.split(":", 1)[1].split("x"))
    except ValueError:
        raise ValueError(f"{spec!r} is not synthetic:HxWxC, e.g. synthetic:32x32x3") from None
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"{spec!r} is not synthetic:HxWxC, e.g. synthetic:32x32x3")
    rng = np.random.default_rng(0)
    arrays = {f"x_{split}": rng.integers(0, 256, (n, *shape), dtype=np.uint8) for split, n in (("train", 2048),
                                                                                            ("test", 256))}
    arrays.update(y_train=rng.integers(0, 10, 2048), y_test=rng.integers(0, 10, 256))
    path = os.path.join(directory, "synthetic.npz")
    np.savez(path, **arrays)
    return f"npz:{path}"


if __name__ == "__main__":
    sys.exit(main())
