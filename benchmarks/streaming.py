"""Streamed input (--input stream) against the model's consumption and against in-memory tensors, as ratios.

Usage: python benchmarks/streaming.py [--dataset folder:PATH | TFDS name] [--model resnet20] [--batch 32]
                                      [--epochs 4] [--rounds 2]

Without --dataset it writes the 1797 sklearn digits as 32x32 colour PNG files (8x8 pixels enlarged 4x, grey
repeated in 3 channels), one folder per class, into a temporary folder, and streams that folder: one small file per
example, which is the most decoding and file opening per example that a folder: source asks for.

Two measurements, each a ratio of rates measured in this process, one after another in every round:
1. The input pipeline alone against the model's consumption: examples per second of iterating one epoch of the
   streamed training batches (augmented when the data is 32x32 colour; read and decoded from the files, then again
   from a --cache-dir cache) against examples per second of the model training (model.fit, no validation, no
   callbacks) on the in-memory tensors of the same data. Goal: the pipeline at least 3x faster than the model eats.
2. Training from the stream against training from in-memory tensors: pipeline.train epoch time (training and
   validation, instruments off) with --input memory over that with --input stream, and with --input stream
   --cache-dir. Goal: >= 0.97 (streaming costs at most 3%).
Times are means over the epochs after the first (the first holds tracing, and the filling of the cache happens at
load, before the first epoch), then over the rounds; the training runs go in reverse order every other round.
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

OFF = dict(grad_stats_every=0, bn_stats_every=0, dynamics=False, export=False, precise_bn_samples=0, verbose=0)


def write_digits_folder(root: str) -> str:
    """The sklearn digits as 32x32x3 PNG files in root/<digit>/<index>.png; returns folder:root."""
    import numpy as np
    import tensorflow as tf
    from sklearn.datasets import load_digits

    digits = load_digits()
    for label in range(10):
        os.makedirs(os.path.join(root, str(label)), exist_ok=True)
    for index, (image, label) in enumerate(zip(digits.images, digits.target)):
        pixels = (image * 255 / 16).astype(np.uint8).repeat(4, axis=0).repeat(4, axis=1)
        colour = np.repeat(pixels[..., np.newaxis], 3, axis=-1)
        tf.io.write_file(os.path.join(root, str(label), f"{index:04d}.png"), tf.io.encode_png(colour))
    return f"folder:{root}"


def consumption_rate(config, data) -> float:
    """Examples per second of model.fit on the in-memory training batches, no validation and no callbacks, with
    pipeline.train's steps per call."""
    import keras

    from pipeline import speed
    from pipeline import train as train_lib

    keras.utils.set_random_seed(config.seed)
    # The steps per call that pipeline.train uses: the model's fastest consumption, the hardest one to keep up with.
    model, _ = train_lib.compiled_model(config, data, speed.steps_per_execution(config, data.num_train))
    times = []

    class Clock(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter() - self.start)

    model.fit(data.train_dataset(config.batch, seed=config.seed), epochs=config.epochs, callbacks=[Clock()],
              verbose=0)
    return (data.num_train // config.batch) * config.batch / statistics.mean(times[1:])


def pipeline_rate(config, data) -> float:
    """Examples per second of iterating the training batches of epochs 1.. (epoch 0 warms the pipeline up)."""
    times = []
    for epoch in range(config.epochs):
        start = time.perf_counter()
        for _ in data.train_dataset(config.batch, seed=config.seed, epoch=epoch):
            pass
        times.append(time.perf_counter() - start)
    return (data.num_train // config.batch) * config.batch / statistics.mean(times[1:])


def train_epoch_time(config) -> float:
    """Mean epoch time of pipeline.train over the epochs after the first."""
    from pipeline import rundir
    from pipeline.train import train

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = os.path.join(tmp, "run")
        summary = train(dataclasses.replace(config, run_dir=run_dir))
        if summary.status != "completed":
            raise SystemExit(f"benchmark run failed: {summary.reason}")
        return statistics.mean(record["epoch_time_s"] for record in rundir.read_history(run_dir)[1:])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="", help="folder:PATH or a prepared TFDS name (default: digits as PNGs)")
    parser.add_argument("--data-dir", default="", help="TFDS data directory")
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=4, help="epochs per measurement; the first is not timed")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    if args.epochs < 2 or args.rounds < 1:
        parser.error("--epochs must be >= 2 and --rounds >= 1")
    with tempfile.TemporaryDirectory() as tmp:
        dataset = args.dataset or write_digits_folder(os.path.join(tmp, "digits"))
        base = dataclasses.replace(config_lib.Config(), dataset=dataset, data_dir=args.data_dir, model=args.model,
                                   batch=args.batch, epochs=args.epochs, **OFF)
        config_lib.validate(base)
        variants = {"memory": base, "stream": dataclasses.replace(base, input="stream"),
                    "stream, cached": dataclasses.replace(base, input="stream", cache_dir=os.path.join(tmp, "cache"))}
        return measure(variants, args.rounds)


def measure(variants: dict, rounds: int) -> int:
    from pipeline import inputs

    data = {name: inputs.load(config) for name, config in variants.items()}  # the cache is filled here
    memory = data["memory"]
    print(f"{memory.source}: {memory.num_train} training examples {memory.input_shape}, augmentation "
          f"{memory.augmentation}; {variants['memory'].model}, batch {variants['memory'].batch}", flush=True)
    rates = {name: [] for name in ("model", "stream", "stream, cached")}
    epoch_times = {name: [] for name in variants}
    for round_index in range(rounds):
        rates["model"].append(consumption_rate(variants["memory"], memory))
        for name in ("stream", "stream, cached"):
            rates[name].append(pipeline_rate(variants[name], data[name]))
        # Every other round in reverse order, so that a machine that speeds up or slows down favours no variant.
        for name in list(variants)[::-1 if round_index % 2 else 1]:
            epoch_times[name].append(train_epoch_time(variants[name]))
        print(f"round {round_index + 1}: examples/s " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in rates.items())
              + "; epoch s " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in epoch_times.items()), flush=True)
    rate = {name: statistics.mean(values) for name, values in rates.items()}
    epoch = {name: statistics.mean(values) for name, values in epoch_times.items()}
    print(f"\n{'measurement':72s} {'value':>8s}")
    print(f"{'model consumption, in-memory tensors (examples/s)':72s} {rate['model']:8.0f}")
    for name in ("stream", "stream, cached"):
        print(f"{'input pipeline alone, ' + name + ' (examples/s)':72s} {rate[name]:8.0f}")
    for name in variants:
        print(f"{'pipeline.train epoch time, --input ' + name + ' (s)':72s} {epoch[name]:8.3f}")
    print(f"\n{'ratio':72s} {'value':>8s} {'goal':>6s}")
    for name in ("stream", "stream, cached"):
        print(f"{'input pipeline (' + name + ') / model consumption':72s} {rate[name] / rate['model']:8.2f} {'>= 3':>6s}")
    for name in ("stream", "stream, cached"):
        row = f"training speed, {name} vs memory (memory epoch time / {name} epoch time)"
        print(f"{row:72s} {epoch['memory'] / epoch[name]:8.2f} {'>= 0.97':>6s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
