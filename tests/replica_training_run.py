"""A mirrored run on 2 logical CPUs with the replica gradient statistics, and the truth at the measured weights.

Run by tests/test_replica_gradient_stats.py in a subprocess of its own (logical devices must be set up before
TensorFlow initializes): `python tests/replica_training_run.py OUT.json EPOCHS STEP,STEP,...`. Trains the BN-free CNN
on the digits (batch 32, SGD lr 0.05, every 10 steps a record) with callbacks/replica_gradient_stats.py and, before
each listed step s, computes tr(Sigma), |G|^2 and B_simple of the whole training split at the weights the step's
gradient is taken at (after s - 1 updates) from per-example gradients (tests/brute_force.py), not from the replicas'
norms. Then trains the same run again without the statistics and
writes the largest absolute difference of the final weights.
"""

import dataclasses
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import keras  # noqa: E402
import numpy as np  # noqa: E402
from brute_force import PopulationStatistics  # noqa: E402

from pipeline import callback_list, distribute, train  # noqa: E402
from pipeline import config as config_lib  # noqa: E402
from pipeline import data as data_lib  # noqa: E402


class BruteForce(keras.callbacks.Callback):
    """Before each step s in `steps`, tr(Sigma), |G|^2 and B_simple of the training split at the current weights."""

    def __init__(self, x, y, steps):
        super().__init__()
        self.x, self.y, self.steps, self.truth, self.seconds = x, y, set(steps), {}, 0.0
        self._statistics = None

    def on_train_batch_begin(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy()) + 1
        if step in self.steps:
            started = time.perf_counter()
            self.truth[step] = self._population_statistics()
            self.seconds += time.perf_counter() - started

    def _population_statistics(self):
        if self._statistics is None:
            self._statistics = PopulationStatistics(self.model, self.x, self.y, chunk=512)
        return self._statistics()


def run(config, data, strategy, topology, callbacks_for):
    keras.utils.set_random_seed(config.seed)
    with strategy.scope():
        model, _ = train.compiled_model(config, data, replica_norms=callbacks_for is not None)
    callbacks = callbacks_for(model) if callbacks_for else []
    train_data = distribute.distribute_train(
        strategy, topology, lambda: data.train_dataset(config.batch, seed=config.seed), config.batch)
    started = time.perf_counter()
    model.fit(train_data, epochs=config.epochs, shuffle=False, callbacks=callbacks, verbose=0)
    return model, callbacks, time.perf_counter() - started


def main(out_path, epochs, every, steps):
    # val_fraction 0.7 leaves 431 training examples: the brute force at every step of a window stays affordable.
    config = dataclasses.replace(config_lib.Config(), model="cnn", norm="none", batch=32, lr=0.05, epochs=int(epochs),
                                 val_fraction=0.7, grad_stats_every=int(every), bn_stats_every=0, dynamics=False,
                                 strategy="mirrored", logical_cpus=2)
    strategy, topology = distribute.build_strategy(config)
    data = data_lib.load(config)
    x, y = data.arrays("train")
    run_dir = os.path.dirname(os.path.abspath(out_path))

    def with_statistics(model):
        (instrument,) = callback_list.instruments(config, data, model, run_dir, replicas=topology.replicas)
        return [instrument, BruteForce(x, y, [int(s) for s in steps.split(",") if s])]

    measured, (instrument, truth), seconds = run(config, data, strategy, topology, with_statistics)
    plain, _, plain_seconds = run(config, data, strategy, topology, None)
    difference = max(float(np.max(np.abs(a.numpy() - b.numpy()))) for a, b in zip(measured.weights, plain.weights))
    with open(out_path, "w") as f:
        json.dump({"history": instrument.history, "num_train": data.num_train,
                   "truth": {str(k): v for k, v in truth.truth.items()},
                   "weight_difference": difference, "replicas": topology.replicas, "fit_seconds": seconds,
                   "truth_seconds": truth.seconds, "plain_fit_seconds": plain_seconds}, f, default=float)


if __name__ == "__main__":
    main(*sys.argv[1:])
