"""A mirrored run on 2 logical CPUs with the replica gradient statistics, and the truth at the measured weights.

Run by tests/test_replica_gradient_stats.py in a subprocess of its own (logical devices must be set up before
TensorFlow initializes): `python tests/replica_training_run.py OUT.json STEP,STEP,...`. Trains the BN-free CNN on the
digits as tests/test_gradient_stats_training.py does on one device (1293 training examples, batch 32, SGD lr 0.05,
10 epochs, 400 steps), here on 2 replicas with callbacks/replica_gradient_stats.py recording every 10 steps, and
before each listed step s computes tr(Sigma), |G|^2 and B_simple of the whole training split at the weights the
step's gradient is taken at (after s - 1 updates) from per-example gradients (tests/brute_force.py), not from the
replicas' norms. Then trains the first epoch again with the model's own Keras train_step (same strategy object,
same schedule) and writes the largest absolute difference of the weights after that epoch.
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

from pipeline import config as config_lib  # noqa: E402
from pipeline.data import in_memory as data_lib  # noqa: E402
from pipeline.training import callback_setup, distribute, fit_loop  # noqa: E402

EVERY = 10  # steps per record


class BruteForce(keras.callbacks.Callback):
    """Before each step s in `steps`, tr(Sigma), |G|^2 and B_simple of the training split at the current weights;
    the weights at the end of the first epoch."""

    def __init__(self, x, y, steps):
        super().__init__()
        self.x, self.y, self.steps, self.truth, self.seconds = x, y, set(steps), {}, 0.0
        self.first_epoch_weights, self._statistics = None, None

    def on_train_batch_begin(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy()) + 1
        if step in self.steps:
            started = time.perf_counter()
            if self._statistics is None:
                self._statistics = PopulationStatistics(self.model, self.x, self.y, chunk=len(self.x))
            self.truth[step] = self._statistics()
            self.seconds += time.perf_counter() - started

    def on_epoch_end(self, epoch, logs=None):
        if epoch == 0:
            self.first_epoch_weights = [w.numpy() for w in self.model.weights]


def run(config, data, strategy, topology, callbacks_for, epochs):
    keras.utils.set_random_seed(config.seed)
    with strategy.scope():
        model, _ = fit_loop.compiled_model(config, data, replica_norms=callbacks_for is not None)
    callbacks = callbacks_for(model) if callbacks_for else []
    train_data = distribute.distribute_train(
        strategy, topology, lambda: data.train_dataset(config.batch, seed=config.seed), config.batch)
    started = time.perf_counter()
    model.fit(train_data, epochs=epochs, shuffle=False, callbacks=callbacks, verbose=0)
    return model, callbacks, time.perf_counter() - started


def main(out_path, steps):
    config = dataclasses.replace(config_lib.Config(), model="cnn", norm="none", batch=32, lr=0.05, epochs=10,
                                 grad_stats_every=EVERY, bn_stats_every=0, dynamics=False, strategy="mirrored",
                                 logical_cpus=2)
    strategy, topology = distribute.build_strategy(config)
    data = data_lib.load(config)
    x, y = data.arrays("train")
    run_dir = os.path.dirname(os.path.abspath(out_path))

    def with_statistics(model):
        (instrument,) = callback_setup.instruments(config, data, model, run_dir, replicas=topology.replicas)
        return [instrument, BruteForce(x, y, [int(s) for s in steps.split(",") if s])]

    _, (instrument, truth), seconds = run(config, data, strategy, topology, with_statistics, config.epochs)
    plain, _, plain_seconds = run(config, data, strategy, topology, None, 1)
    difference = max(float(np.max(np.abs(a - b.numpy()))) for a, b in zip(truth.first_epoch_weights, plain.weights))
    with open(out_path, "w") as f:
        json.dump({"history": instrument.history, "num_train": data.num_train, "window": instrument.window,
                   "truth": {str(k): v for k, v in truth.truth.items()},
                   "weight_difference": difference, "replicas": topology.replicas, "fit_seconds": seconds,
                   "truth_seconds": truth.seconds, "plain_fit_seconds": plain_seconds}, f, default=float)


if __name__ == "__main__":
    main(*sys.argv[1:])
