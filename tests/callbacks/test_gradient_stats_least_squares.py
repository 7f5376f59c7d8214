"""GradientStatistics with its sizes chosen by precision, on least squares, where the truth is exact at every step.

The run of benchmarks/noise_accuracy.py: linear regression on N = 4096 examples, trained by SGD at batch 64 with the
mean squared error, measured every 5 steps with the callback's defaults (budget_fraction off: at every 5 steps it
would hold every measurement to its pilot; a cost one micro-batch short of the split, so that the measurements are
sized by their pilots and drawn without replacement, with the finite-population factor up to f = 55 / 64, rather than
the whole split). Per-example gradients are 2 (x . w - y) x, so tr(Sigma), |G|^2 and
B_simple of the training split at the measured weights come from NumPy in closed form, not from the callback's
code.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from benchmarks.noise_accuracy import BATCH, CHECKED_STEPS, FEATURES, N, exact_statistics, inside, least_squares, run
from callbacks import gradient_stats


MOST = 63  # micro-batches of 64 a measurement may cost, pilot included: one short of the split (64 of 64)


@pytest.fixture(scope="module")
def least_squares_run():
    """The defaults: max_examples (8192) exceeds the split, so every measurement takes all of it."""
    return run(every=5, epochs=5, budget_fraction=None)


@pytest.fixture(scope="module")
def pilot_sized_run():
    """A cost one micro-batch short of the split: every measurement sized by its pilot, without replacement."""
    return run(every=5, epochs=5, budget_fraction=None, max_examples=MOST * BATCH)


@pytest.mark.slow
def test_a_cost_that_covers_the_split_takes_all_of_it_and_its_norm_is_the_truth(least_squares_run):
    # No pilot, and |G|^2 is the population's own (exact: b divides N).
    history, truth = least_squares_run
    assert [r["step"] for r in history] == list(range(0, 321, 5)) == sorted(truth)
    for r in history:
        assert r["pilot_micro_batches"] == 0 and r["micro_batches"] == N // BATCH
        assert r["whole_split"] and r["exact_norm_sq"] and r["examples"] == N
        assert r["grad/norm_sq"] == pytest.approx(truth[r["step"]]["norm_sq"], rel=1e-4)
        assert r["grad/norm_sq_lo"] == r["grad/norm_sq"] == r["grad/norm_sq_hi"]


@pytest.mark.slow
def test_pilot_sized_measurements_have_their_truth_and_sizes_grow_with_the_noise_scale(pilot_sized_run):
    history, truth = pilot_sized_run
    assert [r["step"] for r in history] == list(range(0, 321, 5)) == sorted(truth)
    for r in history:
        # A pilot of 8 micro-batches, then what it asked for within the rest of the cost (55), drawn without
        # replacement from the 4096 examples (the finite-population factor, up to f = 55 / 64).
        assert r["pilot_micro_batches"] == 8 and 8 <= r["micro_batches"] <= MOST - 8
        assert r["micro_batches"] == min(MOST - 8, max(8, int(np.ceil(min(r["micro_batches_needed"], MOST)))))
        assert not r["whole_split"] and not r["exact_norm_sq"]
    sizes = [r["micro_batches"] for r in history]
    print("micro-batches per measurement:", sizes)
    assert np.mean(sizes[-20:]) > 2 * np.mean(sizes[:5])  # B_simple grows as the loss falls, and the sizes with it


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
def test_pilot_sized_values_reach_the_precision_sought(pilot_sized_run):
    # The pilot sizes |G|^2's 95% interval to +-50% of it, so the estimate is within [0.5, 2] of the truth in about
    # 95% of the measurements (about 3 of the 65 outside; 3 were, at steps 190, 225 and 300).
    history, truth = pilot_sized_run
    ratios = np.array([r["grad/norm_sq"] / truth[r["step"]]["norm_sq"] for r in history])
    print("|G|^2 / truth outside [0.5, 2]:", [(r["step"], x) for r, x in zip(history, ratios) if not 0.5 <= x <= 2])
    assert np.mean((ratios >= 0.5) & (ratios <= 2)) >= 0.9


@pytest.mark.slow
@pytest.mark.parametrize("sized", ["whole split", "by pilots"])
@pytest.mark.parametrize("key", ["trace_cov", "norm_sq", "noise_scale"])
def test_intervals_hold_the_truth_in_90_percent_of_the_measurements(least_squares_run, pilot_sized_run, key, sized):
    history, truth = least_squares_run if sized == "whole split" else pilot_sized_run
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
