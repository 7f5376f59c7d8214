"""Epoch time of plain `fit` against each instrument, at its default interval and at every step, as ratios.

Usage: python benchmarks/instrument_overhead.py [--model resnet20] [--dataset digits] [--batch 32] [--epochs 4]

All variants train the same model on the same data in one process, interleaved round by round so that machine
noise hits them alike; the time of a variant is the mean over its epochs after the first (the first includes
tracing the train step), so it includes every measurement and the one-time tracing of the instruments. Goals (issue "Instruments"): all defaults together <= 1.05x, GradientStatistics at every step <= 2.0x.
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
VARIANTS = {
    "plain fit": OFF,
    "GradientStatistics, default": dict(OFF, grad_stats_every=-1),
    "BatchNormStatistics, default": dict(OFF, bn_stats_every=-1),
    "LearningDynamics, default": dict(OFF, dynamics=True),
    "all instruments, defaults": dict(grad_stats_every=-1, bn_stats_every=-1, dynamics=True),
    "GradientStatistics, every step": dict(OFF, grad_stats_every=1),
    "GradientStatistics, every step, histograms every step": dict(OFF, grad_stats_every=1),
    "BatchNormStatistics, every step": dict(OFF, bn_stats_every=1),
}


class EpochTimer:
    def __init__(self):
        import keras

        timer = self

        class Callback(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                timer.start = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):
                timer.times.append(time.perf_counter() - timer.start)

        self.times = []
        self.callback = Callback()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=8, help="epochs per round; the first of each is not timed")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args(argv)

    import keras

    from models import build_model
    from pipeline import data as data_lib
    from pipeline import optim, train

    base = dataclasses.replace(config_lib.Config(), model=args.model, dataset=args.dataset, batch=args.batch,
                               epochs=args.epochs)
    data = data_lib.load(base)
    steps_per_epoch = data.num_train // args.batch
    times = {name: [] for name in VARIANTS}
    VARIANTS["plain fit, again"] = OFF  # plain fit first and last: a drift of the machine shows as a gap
    times["plain fit, again"] = []
    with tempfile.TemporaryDirectory() as run_dir:
        for _ in range(args.rounds):
            for name, changes in VARIANTS.items():
                config = dataclasses.replace(base, **changes)
                keras.utils.set_random_seed(0)
                model = build_model(config.model, data.input_shape, data.num_classes, config.norm, mean=data.mean,
                                    variance=data.variance, bn_momentum=config.bn_momentum)
                model.compile(optimizer=optim.build_optimizer(config, [(0, steps_per_epoch)]),
                              loss="sparse_categorical_crossentropy", metrics=["accuracy"])
                timer = EpochTimer()
                callbacks = train.instruments(config, data, model, run_dir) + [timer.callback]
                if "histograms every step" in name:
                    callbacks[0].histogram_every = 1
                model.fit(data.train_dataset(config.batch, seed=0), epochs=config.epochs, callbacks=callbacks,
                          verbose=0)
                times[name] += timer.times[1:]
    plain = statistics.mean(times["plain fit"] + times["plain fit, again"])
    print(f"{args.model} on {args.dataset}, batch {args.batch}, {steps_per_epoch} steps per epoch; "
          f"default interval = {train.AUTO_INTERVAL} steps; mean epoch over {args.rounds} x {args.epochs - 1} epochs; ratios against both plain runs")
    print(f"{'variant':46s} {'epoch s':>8s} {'ratio':>6s}")
    for name, values in times.items():
        mean = statistics.mean(values)
        print(f"{name:46s} {mean:8.3f} {mean / plain:6.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
