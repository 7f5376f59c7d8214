"""GradientStatistics as users see it: during a real fit, against per-example gradients over the whole training split.

A BN-free CNN on the digits (batch 32, SGD lr 0.05, the pipeline's defaults otherwise), measured every 10 steps with
the callback's defaults as pipeline.train wires it, but no cost budget (--grad-stats-budget 0: every measurement takes
the examples its pilot asks for, up to the whole split). At every measurement, the truth at the same weights comes
from per-example gradients of all 1293 training examples (tests/brute_force.py, not the callback's micro-batch code).
"""

import dataclasses

import keras
import numpy as np
import pytest
from brute_force import PopulationStatistics

from models import Norm, build_model
from pipeline import config as config_lib
from pipeline.data import in_memory as data_lib
from pipeline.training import callback_setup, optim

# An acceptance run during real training (about two minutes on 2 cores): outside the `-m "not slow"` edit loop.
pytestmark = pytest.mark.slow

CHECKED_STEPS = (40, 150, 390)


class BruteForce(keras.callbacks.Callback):
    """After each new measurement of `instrument`, tr(Sigma), |G|^2 and B_simple of the training split."""

    def __init__(self, instrument, x, y):
        super().__init__()
        self.instrument, self.x, self.y, self.truth = instrument, x, y, {}

    def on_train_batch_begin(self, batch, logs=None):
        self._check()

    def on_train_batch_end(self, batch, logs=None):
        self._check()

    def _check(self):
        if self.instrument.history and self.instrument.history[-1]["step"] not in self.truth:
            self.truth[self.instrument.history[-1]["step"]] = self._population_statistics()

    def _population_statistics(self):
        if not hasattr(self, "_statistics"):
            self._statistics = PopulationStatistics(self.model, self.x, self.y)
        return self._statistics()


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    config = dataclasses.replace(config_lib.Config(), model="cnn", norm="none", batch=32, lr=0.05, epochs=10,
                                 grad_stats_every=10, grad_stats_budget=0.0, bn_stats_every=0, dynamics=False)
    keras.utils.set_random_seed(0)
    data = data_lib.load(config)
    x, y = data.arrays("train")
    model = build_model(config.model, data.input_shape, data.num_classes, Norm(config.norm), mean=data.mean,
                        variance=data.variance)
    schedule = optim.learning_rate(config, [(0, data.num_train // config.batch)])
    model.compile(optimizer=optim.build_optimizer(config, schedule), loss="sparse_categorical_crossentropy")
    (instrument,) = callback_setup.instruments(config, data, model, str(tmp_path_factory.mktemp("run")))
    truth = BruteForce(instrument, x, y)
    model.fit(data.train_dataset(config.batch, seed=config.seed), epochs=config.epochs,
              callbacks=[instrument, truth], verbose=0)
    return instrument.history, truth.truth


def test_measures_every_10_steps_with_the_defaults(digits_run):
    history, truth = digits_run
    assert [r["step"] for r in history] == list(range(0, 401, 10)) == sorted(truth)
    # No budget: the cost covers the whole split, so every measurement takes it (40 micro-batches of 32, 1280 of the
    # 1293 examples: |G|^2 not exact, its error 1 - 1280 / 1293 of the jackknife's), without a pilot.
    assert {(r["pilot_micro_batches"], r["micro_batch_size"], r["population"]) for r in history} == {(0, 32, 1293)}
    assert all(r["micro_batches"] == 40 and r["whole_split"] and not r["exact_norm_sq"] for r in history)
    print("examples per measurement:", [r["examples"] for r in history])


@pytest.mark.parametrize("step", CHECKED_STEPS)
def test_values_match_brute_force_at_those_weights(digits_run, step):
    history, truth = digits_run
    record = next(r for r in history if r["step"] == step)
    print(f"step {step}, {record['examples']} examples (whole split {record['whole_split']}): "
          + ", ".join(f"{key} {record[f'grad/{key}']} vs {truth[step][key]:.4g} [{record[f'grad/{key}_lo']}, "
                      f"{record[f'grad/{key}_hi']}]" for key in ("trace_cov", "norm_sq", "noise_scale")))
    for key, tolerance in (("trace_cov", 1.5), ("norm_sq", 2.0)):
        # One measurement is sized for |G|^2's precision, not tr(Sigma)'s: late in training a few examples carry
        # tr(Sigma), and at step 390 its own 95% interval from the whole split was +-140% of it. So the value must
        # be within the tolerance of the truth OR within 3 of its own standard errors (a wrong value fails both).
        value, standard_error = record[f"grad/{key}"], record[f"grad/{key}_se"]
        ratio = value / truth[step][key]
        assert 1 / tolerance <= ratio <= tolerance or abs(value - truth[step][key]) <= 3 * standard_error, (
            key, ratio, value, truth[step][key], standard_error)
    if record["grad/noise_scale_is_lower_bound"]:
        # Late in training B_simple (~2000 at step 390) exceeds what the 1280 examples of one measurement resolve
        # (1293 is no whole number of micro-batches, so |G|^2 is not exact), and a few examples carry tr(Sigma):
        # the bound, where one is supported, holds; the record says why B_simple is missing.
        lo = record["grad/noise_scale_lo"]
        assert lo is None or not lo > truth[step]["noise_scale"], lo
        assert record["notes"]["grad/noise_scale"]
    else:
        assert 0.5 <= record["grad/noise_scale"] / truth[step]["noise_scale"] <= 2


@pytest.mark.parametrize("key", ["trace_cov", "norm_sq", "noise_scale"])
def test_intervals_hold_the_truth_in_most_measurements(digits_run, key):
    from benchmarks.noise_accuracy import inside

    history, truth = digits_run
    held = [inside(r, key, truth[r["step"]][key]) for r in history]
    assert np.mean(held) >= 0.8, [r["step"] for r, ok in zip(history, held) if not ok]
