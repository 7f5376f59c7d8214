"""Epoch time of plain `fit` against each instrument, at its default interval and more often, as ratios.

Usage: python benchmarks/instrument_overhead.py [--model resnet20] [--dataset digits] [--batch 32] [--epochs 10]
                                                [--rounds 2]
       --dataset synthetic:32x32x3 trains on 2048 random images of that shape (CIFAR-sized, for timing only).
       python benchmarks/instrument_overhead.py --default-run [--rounds 2] [--grad-stats-every N]
       runs the README's default run (`python -m pipeline.train --batch 32`) with the default instruments and with
       --grad-stats-every 0 --bn-stats-every 0 --no-dynamics, each a fresh process, alternating in pairs after an
       uncounted warm-up pair, and prints the median pair's wall time ratio (tracing, precise BN, evaluation and
       export included) and the instruments' own timer as a share of the training epochs, split per instrument and
       phase (tracing, execution, other: callbacks/timing.py).

All variants train the same model on the same data in one process (so the instruments' traced functions, shared by
the models of one architecture, callbacks/shared_traces.py, are traced by the first variant that uses each). Plain
fit runs before the first variant and after every variant, so that each variant is compared with the plain runs next
to it: these VMs drift by 10-20% over minutes, more than the effects measured. Columns:
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

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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
    """Wall time of the default run with and without the instruments, each a fresh `python -m pipeline.train`
    process, alternating, after one uncounted warm-up pair; and whether each gradient measurement after step 0
    determined B_simple or bounded it from below.

    Fresh processes, as a user runs it: in one process the runs after the first would find the instruments' traced
    functions already made (callbacks/shared_traces.py shares them between models of one architecture) and show less
    than a run pays. The ratio is taken pair by pair (the machine's drift over minutes falls mostly outside it) and
    summarized by the median pair; the shares are each run's own clocks (summary.json, metrics.jsonl)."""
    import json
    import subprocess

    from benchmarks import results
    from pipeline import rundir

    recorder = results.Recorder("instrument_overhead_default_run")
    off_flags = ["--grad-stats-every", "0", "--bn-stats-every", "0", "--no-dynamics"]
    on_flags = ["--grad-stats-every", str(grad_stats_every)]
    pairs, shares, rows, said, parts, warmup = [], [], [], [], [], None
    with tempfile.TemporaryDirectory() as scratch:
        for round_ in range(rounds + 1):  # round 0 warms the file cache and is not counted
            pair = {}
            for name, flags in (("off", off_flags), ("instruments", on_flags)):
                run_dir = os.path.join(scratch, f"{name}-{round_}")
                command = [sys.executable, "-m", "pipeline.train", "--batch", "32", *flags, "--run-dir", run_dir]
                started = time.perf_counter()
                subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                wall = time.perf_counter() - started
                with open(os.path.join(run_dir, "summary.json"), encoding="utf-8") as f:
                    summary = json.load(f)
                row = {"round": round_, "variant": name, "wall_s": wall, "run_wall_s": summary["wall_time_s"],
                       "train_s": summary["train_time_s"], "measuring_s": summary["instrument_time_s"],
                       "test_accuracy": summary["test_accuracy"]}
                pair[name] = row
                print(f"round {round_}{' (warm-up)' if not round_ else ''} {name:12s} wall {wall:6.1f} s, training "
                      f"epochs {row['train_s']:6.1f} s, measuring {row['measuring_s']:5.2f} s, test accuracy "
                      f"{row['test_accuracy']:.4f}", flush=True)
                if name != "instruments":
                    continue
                # The last epoch's record holds the whole run's split (callbacks.timing.phases).
                row["instrument_phases_s"] = split = rundir.read_history(run_dir)[-1]["instrument_phases_s"]
                with open(os.path.join(run_dir, "grad_stats.jsonl"), encoding="utf-8") as f:
                    records = [json.loads(line) for line in f]
                row["measurements"] = [
                    {"step": r["step"], "examples": r["examples"], "noise_scale": r["grad/noise_scale"],
                     "lo": r["grad/noise_scale_lo"], "hi": r["grad/noise_scale_hi"]} for r in records]
                if not round_:
                    continue
                shares.append(row["measuring_s"] / row["train_s"])
                parts.append({f"{instrument}/{phase}": seconds / row["train_s"]
                              for instrument, by_phase in split.items() for phase, seconds in by_phase.items()})
                said += [verdict(r) for r in records if r["step"] > 0]
            pair["ratio"] = pair["instruments"]["wall_s"] / pair["off"]["wall_s"]
            rows += [pair["off"], pair["instruments"]]
            if round_:
                pairs.append(pair["ratio"])
            else:
                warmup = pair["ratio"]
    ratio, share = statistics.median(pairs), statistics.median(shares)
    split = {key: statistics.median(part[key] for part in parts) for key in parts[0]}
    determined, bounded, upper = said.count("determined"), said.count("bounded"), said.count("upper bound")
    print(f"default run, {rounds} pair(s) of fresh processes: wall time with instruments / without = median "
          f"{ratio:.3f}x (pairs {', '.join(f'{p:.3f}' for p in pairs)}; warm-up pair {warmup:.3f}); instruments' own "
          f"timer = median {share:.1%} of the training epochs (tracing and the step-0 measurements included); of "
          f"{len(said)} gradient measurements after step 0, {determined} determined B_simple, {bounded} bounded it "
          f"from below, {upper} only from above")
    print("the instruments' timer by instrument and phase, as a share of the training epochs (median over runs):")
    for key, value in sorted(split.items(), key=lambda item: -item[1]):
        print(f"  {key:40s} {value:6.1%}")
    recorder.write(rounds=rows, summary={"wall_ratio": ratio, "wall_ratios": pairs, "warmup_wall_ratio": warmup,
                                         "measuring_share": share, "measuring_shares": shares,
                                         "measuring_share_by_phase": split,
                                         "said_something": determined + bounded + upper, "determined": determined,
                                         "bounded": bounded, "upper_bound_only": upper,
                                         "measurements_after_step_0": len(said),
                                         "goals_met": ratio <= 1.10 and share <= 0.10 and "nothing" not in said},
                   settings={"rounds": rounds, "grad_stats_every": grad_stats_every, "processes": "fresh"})
    return 0


def verdict(record: dict) -> str:
    """What a gradient measurement says of B_simple: "determined" (a finite interval), "bounded" (from below),
    "upper bound" (only an upper end: tr(Sigma) not resolved, |G|^2 resolved) or "nothing"."""
    if record["grad/noise_scale"] is not None and record["grad/noise_scale_lo"] is not None:
        return "determined"
    if record["grad/noise_scale_lo"] is not None:
        return "bounded"
    return "upper bound" if record["grad/noise_scale_hi"] is not None else "nothing"


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
