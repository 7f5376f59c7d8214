"""Streamed input (--input stream) against the model's consumption and against in-memory tensors, as ratios.

Usage: python benchmarks/streaming.py [--dataset folder:PATH | TFDS name] [--model resnet20] [--batch 32]
                                      [--epochs 4] [--rounds 2]

Without --dataset it writes the 1797 sklearn digits as 32x32 colour PNG files (8x8 pixels enlarged 4x, grey
repeated in 3 channels), one folder per class, into a temporary folder, and streams that folder: one small file per
example, which is the most decoding and file opening per example that a folder: source asks for.

Two measurements, each a ratio of times measured in this process, one after another in every round:
1. The input pipeline alone against the model's consumption: examples per second of iterating one epoch of the
   streamed training batches (augmented when the data is 32x32 colour; read and decoded from the files, and from a
   --cache-dir cache) against examples per second of the model training (model.fit, no validation) on the
   in-memory tensors of the same data. Goal: the pipeline at least 3x faster than the model eats.
2. Training from the stream against training from in-memory tensors: the epoch time of model.fit with
   validation, the same model, optimizer and steps per call as pipeline.train, on --input memory over that on
   --input stream (and with --cache-dir). Goal: >= 0.97 (streaming costs at most 3%). Also given in process CPU
   time, which other processes on a shared machine move far less than wall time (but which cannot show the model
   waiting for input).
Both train as pipeline.train does: one iterator over all epochs (DataInfo.train_epochs, fit with steps_per_epoch),
the same model, optimizer, steps and steps per call. Times are means over the epochs after the first, then over
the rounds; the first epoch (tracing, the iterator's start) is reported apart, and the load (a --cache-dir cache is
written there, in the statistics pass) is timed once. The training runs go in reverse order every other round;
the ratio of every round is printed.
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

from benchmarks import results  # noqa: E402
from pipeline import config as config_lib  # noqa: E402

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


def fit_epochs(config, data, validation: bool) -> tuple[float, float, float]:
    """(first epoch wall s, mean wall s and mean process CPU s per epoch after the first) of model.fit on data's
    training batches, with pipeline.train's model, optimizer, steps per call and training input (one iterator over
    the epochs, DataInfo.train_epochs, with steps_per_epoch), and no callbacks but the clock.

    The first epoch holds tracing and the iterator's start, so it is reported apart. CPU time counts every thread
    of this process: it is blind to the model waiting for input, but far less moved by other processes on a shared
    machine than wall time.
    """
    import keras

    from pipeline.training import execution
    from pipeline.training import fit_loop

    keras.utils.set_random_seed(config.seed)
    steps_per_execution = execution.steps_per_execution(config, data.num_train)
    model, _ = fit_loop.compiled_model(config, data, steps_per_execution)
    fit_input = data.fit_input(config.batch, seed=config.seed, first_epoch=0, epochs=config.epochs,
                               steps_per_execution=steps_per_execution)
    wall, cpu = [], []

    class Clock(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.wall, self.cpu = time.perf_counter(), time.process_time()

        def on_epoch_end(self, epoch, logs=None):
            wall.append(time.perf_counter() - self.wall)
            cpu.append(time.process_time() - self.cpu)

    model.fit(fit_input.make(), epochs=config.epochs, steps_per_epoch=fit_input.steps_per_epoch,
              callbacks=[*fit_input.callbacks, Clock()],
              shuffle=False,
              validation_data=data.eval_dataset("val", config.batch) if validation else None, verbose=0)
    return wall[0], statistics.mean(wall[1:]), statistics.mean(cpu[1:])


def pipeline_seconds(config, data) -> float:
    """Mean seconds of iterating the training batches of one epoch, epochs 1.. (epoch 0 warms the pipeline up)."""
    times = []
    for epoch in range(config.epochs):
        start = time.perf_counter()
        for _ in data.train_dataset(config.batch, seed=config.seed, epoch=epoch):
            pass
        times.append(time.perf_counter() - start)
    return statistics.mean(times[1:])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="", help="folder:PATH or a prepared TFDS name (default: digits as PNGs)")
    parser.add_argument("--data-dir", default="", help="TFDS data directory")
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=4, help="epochs per measurement; the first is not timed")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--note", default="", help="kept in the result file's settings: the conditions of this run "
                        "(e.g. a machine shared with other jobs)")
    args = parser.parse_args(argv)
    if args.epochs < 2 or args.rounds < 1:
        parser.error("--epochs must be >= 2 and --rounds >= 1")
    from pipeline.training import execution

    recorder = results.Recorder("streaming")
    # Threads per op as pipeline.train sets them by default, before anything starts TensorFlow's runtime.
    print(f"threads per op: {execution.set_threads(config_lib.Config()) or 'TensorFlow default'}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        dataset = args.dataset or write_digits_folder(os.path.join(tmp, "digits"))
        base = dataclasses.replace(config_lib.Config(), dataset=dataset, data_dir=args.data_dir, model=args.model,
                                   batch=args.batch, epochs=args.epochs)
        config_lib.validate(base)
        variants = {"memory": base, "stream": dataclasses.replace(base, input="stream"),
                    "stream --cache-dir": dataclasses.replace(base, input="stream", cache_dir=os.path.join(tmp, "cache"))}
        return measure(variants, args.rounds, recorder, settings=vars(args))


def measure(variants: dict, rounds: int, recorder: results.Recorder, settings: dict) -> int:
    from pipeline.data import loading

    data, load_seconds = {}, {}
    for name, config in variants.items():  # the cache is filled here, by the statistics pass
        start = time.perf_counter()
        data[name] = loading.load(config)
        load_seconds[name] = time.perf_counter() - start
    memory, config = data["memory"], variants["memory"]
    examples = (memory.num_train // config.batch) * config.batch
    print(f"{memory.source}: {memory.num_train} training examples {memory.input_shape}, augmentation "
          f"{memory.augmentation}; {config.model}, batch {config.batch}, {memory.num_train // config.batch} steps "
          f"per epoch, {config.epochs} epochs per training measurement; load s: "
          + ", ".join(f"{k} {v:.2f}" for k, v in load_seconds.items()), flush=True)
    streams = [name for name in variants if name != "memory"]
    consumed, piped = [], {name: [] for name in streams}
    trained = {name: [] for name in variants}  # (first epoch wall, steady wall, steady cpu) per round
    for round_index in range(rounds):
        consumed.append(fit_epochs(config, memory, validation=False)[1])
        for name in streams:
            piped[name].append(pipeline_seconds(variants[name], data[name]))
        # Every other round in reverse order, so that a machine that speeds up or slows down favours no variant.
        for name in list(variants)[::-1 if round_index % 2 else 1]:
            trained[name].append(fit_epochs(variants[name], data[name], validation=True))
        print(f"round {round_index + 1}: s per epoch: model on memory {consumed[-1]:.3f}, "
              + ", ".join(f"pipeline alone {k} {v[-1]:.3f}" for k, v in piped.items()) + "; training first epoch "
              "wall, then steady wall/CPU: "
              + ", ".join(f"{k} {v[-1][0]:.2f}, {v[-1][1]:.3f}/{v[-1][2]:.3f}" for k, v in trained.items())
              + "; memory/stream steady wall: "
              + ", ".join(f"{k} {trained['memory'][-1][1] / trained[k][-1][1]:.3f}" for k in streams), flush=True)
    rate = {"model": examples / statistics.mean(consumed)}
    rate.update({name: examples / statistics.mean(values) for name, values in piped.items()})
    first = {name: statistics.mean(f for f, _, _ in values) for name, values in trained.items()}
    wall = {name: statistics.mean(w for _, w, _ in values) for name, values in trained.items()}
    cpu = {name: statistics.mean(c for _, _, c in values) for name, values in trained.items()}
    print(f"\n{'measurement':76s} {'value':>8s}")
    print(f"{'model consumption: model.fit on in-memory tensors (examples/s)':76s} {rate['model']:8.0f}")
    for name in streams:
        print(f"{'input pipeline alone, --input ' + name + ' (examples/s)':76s} {rate[name]:8.0f}")
    for name in variants:
        print(f"{'first training epoch (tracing, iterator start), --input ' + name + ': wall s':76s} {first[name]:8.3f}")
    for name in variants:
        print(f"{'steady training epoch (fit with validation), --input ' + name + ': wall s / CPU s':76s} "
              f"{wall[name]:8.3f} / {cpu[name]:.3f}")
    print(f"\n{'ratio (steady epochs; means over rounds)':76s} {'value':>8s} {'goal':>8s}")
    for name in streams:
        print(f"{'input pipeline (' + name + ') / model consumption':76s} {rate[name] / rate['model']:8.2f} "
              f"{'>= 3':>8s}")
    for name in streams:
        rounds_text = " ".join(f"{m[1] / s[1]:.3f}" for m, s in zip(trained["memory"], trained[name]))
        print(f"{'training speed, ' + name + ' vs memory (memory wall time / its wall time)':76s} "
              f"{wall['memory'] / wall[name]:8.3f} {'>= 0.97':>8s}   rounds: {rounds_text}")
        print(f"{'  the same in process CPU time (memory CPU time / its CPU time)':76s} {cpu['memory'] / cpu[name]:8.3f}")
    table = [{"measurement": f"input pipeline alone, --input {name} / model consumption",
              "value": round(rate[name] / rate["model"], 2), "rounds": "", "goal": ">= 3",
              "met": rate[name] / rate["model"] >= 3} for name in streams]
    for name in streams:
        ratio = wall["memory"] / wall[name]
        table.append({"measurement": f"training, --input {name} vs memory: memory wall time / its wall time",
                      "value": round(ratio, 3), "goal": ">= 0.97", "met": ratio >= 0.97,
                      "rounds": " ".join(f"{m[1] / s[1]:.3f}" for m, s in zip(trained["memory"], trained[name]))})
        table.append({"measurement": f"the same in process CPU time (--input {name})",
                      "value": round(cpu["memory"] / cpu[name], 3), "rounds": "", "goal": "", "met": None})
    raw = [{"round": i + 1, "model_consumption_s": consumed[i],
            "pipeline_alone_s": {name: piped[name][i] for name in streams},
            "training": {name: dict(zip(("first_epoch_wall_s", "steady_wall_s", "steady_cpu_s"), trained[name][i]))
                         for name in variants}} for i in range(rounds)]
    settings = settings | {"source": str(memory.source), "num_train": memory.num_train, "load_s": load_seconds}
    path = recorder.write(rounds=raw, summary={"tables": {"Ratios (steady epochs; means over the rounds)": table},
                                               "rates_examples_per_s": rate}, settings=settings)
    print(f"result: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
