"""GradientStatistics with its sizes chosen by precision, on least squares, where the truth is exact at every step.

The run of benchmarks/noise_accuracy.py: linear regression on N = 4096 examples, trained by SGD at batch 64 with the
mean squared error, measured every 5 steps with the callback's defaults (budget_fraction off: at every 5 steps it
would hold every measurement to its pilot). Per-example gradients are 2 (x . w - y) x, so tr(Sigma), |G|^2 and
B_simple of the training split at the measured weights come from NumPy in closed form, not from the callback's
code.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from benchmarks.noise_accuracy import BATCH, CHECKED_STEPS, FEATURES, N, exact_statistics, inside, least_squares, run
from callbacks import gradient_stats


@pytest.fixture(scope="module")
def least_squares_run():
    return run(every=5, epochs=5, budget_fraction=None)


@pytest.mark.slow
def test_every_measurement_has_its_truth_and_sizes_grow_with_the_noise_scale(least_squares_run):
    history, truth = least_squares_run
    assert [r["step"] for r in history] == list(range(0, 321, 5)) == sorted(truth)
    for r in history:
        # Pilot-sized: a pilot of 8 micro-batches, then what it asked for within the whole split (64 of 64).
        assert r["pilot_micro_batches"] == 8 and 8 <= r["micro_batches"] <= 64
        assert r["micro_batches"] == min(64, max(8, int(np.ceil(min(r["micro_batches_needed"], 64)))))
        assert r["exact_norm_sq"] == r["whole_split"] == (r["micro_batches"] == 64)
        if r["exact_norm_sq"]:  # the whole split: |G|^2 is the truth itself
            assert r["grad/norm_sq"] == pytest.approx(truth[r["step"]]["norm_sq"], rel=1e-4)
    print("micro-batches per measurement:", [r["micro_batches"] for r in history])


@pytest.mark.slow
@pytest.mark.parametrize("step", CHECKED_STEPS)
def test_values_are_within_2x_of_the_truth(least_squares_run, step):
    history, truth = least_squares_run
    record, exact = next(r for r in history if r["step"] == step), truth[step]
    print(step, {k: (record[f"grad/{k}"], record[f"grad/{k}_lo"], exact[k]) for k in exact})
    for key in ("norm_sq", "trace_cov"):
        assert record[f"grad/{key}"] is not None and 0.5 <= record[f"grad/{key}"] / exact[key] <= 2, key
    if record["grad/noise_scale_is_lower_bound"]:
        assert record["grad/noise_scale_lo"] >= exact["noise_scale"] / 2
    else:
        assert 0.5 <= record["grad/noise_scale"] / exact["noise_scale"] <= 2


@pytest.mark.slow
@pytest.mark.parametrize("key", ["trace_cov", "norm_sq", "noise_scale"])
def test_intervals_hold_the_truth_in_90_percent_of_the_measurements(least_squares_run, key):
    history, truth = least_squares_run
    held = [inside(r, key, truth[r["step"]][key]) for r in history]
    assert np.mean(held) >= 0.9, [r["step"] for r, ok in zip(history, held) if not ok]


@pytest.mark.slow
def test_a_pilot_sized_measurement_keeps_its_coverage_at_fixed_weights():
    # Frozen weights (lr 0) and examples drawn with replacement, 129 measurements sized by their pilots: the fresh
    # measurement's 95% interval holds |G|^2 in >= 85% of them (P < 0.1% for a true coverage of 95%), and the
    # size the pilot chose brings the median half-width near the 50% sought.
    x, y = least_squares(seed=3)
    w = np.random.default_rng(4).normal(size=(FEATURES, 1)) * 0.05  # near the optimum: B_simple in the hundreds
    exact = exact_statistics(np.linalg.lstsq(x.astype(np.float64), y, rcond=None)[0] + w, x, y)
    exact["trace_cov"] *= (N - 1) / N  # draws with replacement: the population variance (ddof 0)
    model = keras.Sequential([keras.Input((FEATURES,)), keras.layers.Dense(1, use_bias=False)])
    model.layers[0].kernel.assign((np.linalg.lstsq(x, y, rcond=None)[0] + w).astype(np.float32))
    model.compile(keras.optimizers.SGD(0.0), "mse")
    index = np.random.default_rng(5).integers(0, N, size=200 * 4096)
    stream = tf.data.Dataset.from_tensor_slices((x[index], y[index])).batch(BATCH, drop_remainder=True)
    instrument = gradient_stats.GradientStatistics(stream, every_n_steps=1, budget_fraction=None,
                                                   max_examples=4096, histograms=False)
    model.fit(x, y, batch_size=BATCH, epochs=2, callbacks=[instrument], verbose=0)  # 128 steps
    history = instrument.history
    assert len(history) == 129 and all(r["pilot_micro_batches"] == 8 for r in history)
    held = [inside(r, "norm_sq", exact["norm_sq"]) for r in history]
    # A lower end at the trivial 0 is NaN in the record (null in JSON): the half-width reaches down to 0 there.
    half_widths = [(r["grad/norm_sq_hi"] - np.nan_to_num(r["grad/norm_sq_lo"])) / 2 / exact["norm_sq"]
                   for r in history]
    print("coverage", np.mean(held), "median half-width", np.median(half_widths),
          "micro-batches", sorted(r["micro_batches"] for r in history))
    assert np.mean(held) >= 0.85
    assert np.median(half_widths) <= 0.75
