"""Training speed of pipeline.train against a bare Keras script, and of the speed settings, as ratios.

Usage: python benchmarks/speed.py [--model resnet20] [--dataset digits] [--batch 32] [--epochs 6] [--rounds 2]

Each variant trains the same model on the same data in a process of its own (threads per op are set once per
process), one after another in each round. A variant's time is its mean epoch time over the epochs after the first
(training and validation; the first epoch holds the tracing and compiling); the table gives each mean over the rounds
and its ratio to a reference, as speed-ups (reference time / variant time, so > 1 is faster). The bare script is
`model.fit` of the same model on the same tf.data pipeline with validation and nothing else: no callbacks, no
checkpoints, no logs. pipeline.train runs without export and precise BN, which come after training and are not timed.

Goals (issue "Data-parallel training", item 7), as speed-ups:
  pipeline.train, instruments off, vs the bare script with the same settings   >= 0.95
  pipeline.train with its defaults vs the bare script with Keras' defaults      >= 1.3
The other rows measure each setting alone against the pipeline's defaults with instruments off (the choice of
defaults: --steps-per-execution auto, --intra-op-threads auto, float32, no XLA on this CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import results  # noqa: E402
from pipeline import config as config_lib  # noqa: E402

OFF = dict(grad_stats_every=0, bn_stats_every=0, dynamics=False)
# name: (runner, Config changes); "bare" runs the bare script with the Config's speed settings.
KERAS_DEFAULTS = dict(steps_per_execution="1", intra_op_threads=0)
VARIANTS = {
    "bare Keras, Keras defaults (1 step per call)": ("bare", KERAS_DEFAULTS),
    "bare Keras, pipeline's speed defaults": ("bare", {}),
    "pipeline, instruments off, speed defaults": ("train", OFF),
    "pipeline, all defaults (instruments on)": ("train", {}),
    "pipeline, instruments off, 1 step per call": ("train", dict(OFF, steps_per_execution="1")),
    "pipeline, instruments off, 4 steps per call": ("train", dict(OFF, steps_per_execution="4")),
    "pipeline, instruments off, 16 steps per call": ("train", dict(OFF, steps_per_execution="16")),
    "pipeline, instruments off, TF's default threads per op": ("train", dict(OFF, intra_op_threads=0)),
    "pipeline, instruments off, --jit": ("train", dict(OFF, jit=True)),
    "pipeline, instruments off, mixed_bfloat16": ("train", dict(OFF, precision="mixed_bfloat16")),
}
# (variant, reference, goal) rows of the summary.
RATIOS = [
    ("pipeline, instruments off, speed defaults", "bare Keras, pipeline's speed defaults", 0.95),
    ("pipeline, all defaults (instruments on)", "bare Keras, Keras defaults (1 step per call)", 1.3),
    ("pipeline, instruments off, speed defaults", "pipeline, instruments off, 1 step per call", None),
    ("pipeline, instruments off, 4 steps per call", "pipeline, instruments off, 1 step per call", None),
    ("pipeline, instruments off, 16 steps per call", "pipeline, instruments off, 1 step per call", None),
    ("pipeline, instruments off, speed defaults", "pipeline, instruments off, TF's default threads per op", None),
    ("pipeline, instruments off, --jit", "pipeline, instruments off, speed defaults", None),
    ("pipeline, instruments off, mixed_bfloat16", "pipeline, instruments off, speed defaults", None),
]


def bare_epoch_times(config, data) -> list[float]:
    """Epoch times of a bare Keras script: the same model, data, optimizer and speed settings, no callbacks."""
    import keras

    from models import Norm, build_model
    from pipeline.training import execution, optim

    keras.utils.set_random_seed(config.seed)
    execution.set_precision(config)
    model = build_model(config.model, data.input_shape, data.num_classes, Norm(config.norm), mean=data.mean,
                        variance=data.variance)
    schedule = optim.learning_rate(config, [(0, data.num_train // config.batch)])
    model.compile(optimizer=optim.build_optimizer(config, schedule), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"], steps_per_execution=execution.steps_per_execution(config, data.num_train),
                  jit_compile=config.jit)
    times = []

    class Clock(keras.callbacks.Callback):  # the only callback: the same clock as pipeline.train's history
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter() - self.start)

    model.fit(data.train_dataset(config.batch, seed=config.seed), validation_data=data.eval_dataset("val", config.batch),
              epochs=config.epochs, callbacks=[Clock()], verbose=0)
    return times


def train_epoch_times(config) -> list[float]:
    from pipeline import rundir
    from pipeline.train import train

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = os.path.join(tmp, "run")
        summary = train(dataclasses.replace(config, run_dir=run_dir))
        if summary.status != "completed":
            raise SystemExit(f"benchmark run failed: {summary.reason}")
        return [record["epoch_time_s"] for record in rundir.read_history(run_dir)]


def variant_epoch_times(name: str, base) -> list[float]:
    """Runs one variant in this process (threads per op can be set only before TensorFlow starts)."""
    from pipeline.data import in_memory as data_lib
    from pipeline.training import execution

    runner, changes = VARIANTS[name]
    config = dataclasses.replace(base, **changes)
    execution.set_threads(config)  # pipeline.train sets them too, as first thing; the bare script as the pipeline does
    if runner == "bare":
        return bare_epoch_times(config, data_lib.load(config))
    return train_epoch_times(config)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=6, help="epochs per run; the first is not timed")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--note", default="", help="kept in the result file's settings: the conditions of this run "
                        "(e.g. a machine shared with other jobs)")
    parser.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)  # one variant, in a child
    args = parser.parse_args(argv)
    if args.epochs < 2 or args.rounds < 1:
        parser.error("--epochs must be >= 2 and --rounds >= 1")
    base = dataclasses.replace(config_lib.Config(), model=args.model, dataset=args.dataset, batch=args.batch,
                               epochs=args.epochs, export=False, precise_bn_samples=0, verbose=0)
    config_lib.validate(base)
    if args.variant:
        print(json.dumps(variant_epoch_times(args.variant, base)))
        return 0

    recorder = results.Recorder("speed")
    means, epoch_times = {name: [] for name in VARIANTS}, []
    common = ["--model", args.model, "--dataset", args.dataset, "--batch", str(args.batch), "--epochs",
              str(args.epochs)]
    print(f"{args.model} on {args.dataset}, batch {args.batch}; each variant in a process of its own", flush=True)
    for round_index in range(args.rounds):
        for name in VARIANTS:
            done = subprocess.run([sys.executable, os.path.abspath(__file__), *common, "--variant", name],
                                  capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"variant {name!r} failed:\n{done.stderr[-2000:]}")
            times = json.loads(done.stdout.strip().splitlines()[-1])
            epoch_times.append({"round": round_index + 1, "variant": name, "epoch_s": times})
            means[name].append(statistics.mean(times[1:]))
            print(f"round {round_index + 1}: {name}: {means[name][-1]:.3f} s per epoch", flush=True)
    mean = {name: statistics.mean(values) for name, values in means.items()}
    print(f"\n{'variant':60s} {'epoch s':>8s}  per round")
    for name in VARIANTS:
        print(f"{name:60s} {mean[name]:8.3f}  {' '.join(f'{t:.3f}' for t in means[name])}")
    print(f"\n{'speed-up (reference time / variant time)':100s} {'ratio':>6s} {'goal':>6s}  per round")
    epochs = [{"variant": name, "s per epoch": round(mean[name], 4),
               "rounds": " ".join(f"{t:.3f}" for t in means[name])} for name in VARIANTS]
    speedups = []
    for variant, reference, goal in RATIOS:
        row = f"{variant} vs {reference}"
        per_round = [r / v for r, v in zip(means[reference], means[variant])]
        ratio = mean[reference] / mean[variant]
        print(f"{row:100s} {ratio:6.2f} {'>= ' + str(goal) if goal else '':>6s}  {' '.join(f'{r:.2f}' for r in per_round)}")
        speedups.append({"variant": variant, "reference": reference, "speed-up": round(ratio, 3),
                         "rounds": " ".join(f"{r:.2f}" for r in per_round),
                         "goal": f">= {goal}" if goal else "", "met": (ratio >= goal) if goal else None})
    tables = {"Seconds per epoch (mean of the epochs after the first)": epochs,
              "Speed-up (reference time / variant time)": speedups}
    settings = {k: v for k, v in vars(args).items() if k != "variant"}
    path = recorder.write(rounds=epoch_times, summary={"tables": tables}, settings=settings)
    print(f"result: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
