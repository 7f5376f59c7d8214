"""Gradient statistics from the replicas of data-parallel training, against brute force.

The estimators (noise_estimates.two_batch_estimates, step_means) are checked on a synthetic population of
per-example gradients, drawn as a data-parallel step draws them; the callback and the training step
(callbacks/replica_norms.py) during a real mirrored run on 2 logical CPUs, in one subprocess
(tests/replica_training_run.py): the one-device tracking test's run and checks, against per-example gradients of the
whole training split at the weights of the steps that each checked value averages.
"""

import json
import math
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from callbacks import noise_estimates
from callbacks.replica_gradient_stats import ReplicaGradientStatistics

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _population(examples=400, dimensions=50, seed=0):
    """Per-example gradients with a mean G well inside the noise: B_simple ~ 40."""
    rng = np.random.default_rng(seed)
    scales = rng.uniform(0.2, 2.0, dimensions)
    gradients = rng.normal(size=(examples, dimensions)) * scales + 0.15 * rng.normal(size=dimensions)
    mean = gradients.mean(axis=0)
    trace = float(np.sum(np.var(gradients, axis=0, ddof=1)))  # Sigma of the population, as the callbacks define it
    return gradients, trace, float(mean @ mean)


def _steps(gradients, steps, replicas, batch, seed=1):
    """(S, L) of `steps` data-parallel steps: each draws `batch` examples without replacement, split in replicas."""
    rng = np.random.default_rng(seed)
    small, big = [], []
    for _ in range(steps):
        chosen = gradients[rng.choice(len(gradients), batch, replace=False)]
        slices = chosen.reshape(replicas, batch // replicas, -1).mean(axis=1)
        small.append(np.mean(np.sum(slices**2, axis=1)))
        big.append(np.sum(chosen.mean(axis=0) ** 2))
    return np.array(small), np.array(big)


@pytest.mark.parametrize("replicas", [2, 4])
def test_per_step_estimates_are_unbiased_and_pooled_intervals_cover_the_truth(replicas):
    gradients, trace, norm_sq = _population()
    small, big = _steps(gradients, 6000, replicas, 32)
    traces, norms_sq = noise_estimates.two_batch_estimates(small, big, 32 // replicas, 32, len(gradients))
    for values, truth in ((traces, trace), (norms_sq, norm_sq)):
        standard_error = values.std() / np.sqrt(len(values))
        assert abs(values.mean() - truth) < 4 * standard_error, (values.mean(), truth, standard_error)
    covered = {"trace_cov": [], "norm_sq": [], "noise_scale": []}
    for chunk in range(0, 6000, 100):  # pooled windows of 100 steps
        pooled = noise_estimates.step_means(traces[chunk:chunk + 100], norms_sq[chunk:chunk + 100], 32)
        for key, truth in (("trace_cov", trace), ("norm_sq", norm_sq), ("noise_scale", trace / norm_sq)):
            # A missing lower end (NaN: no positive bound supported) bounds nothing.
            covered[key].append(not pooled[f"{key}_lo"] > truth and truth <= pooled[f"{key}_hi"])
    for key, inside in covered.items():
        assert 0.85 <= np.mean(inside), (key, np.mean(inside))


def test_two_batch_estimates_equal_the_u_statistics_of_the_replica_gradients():
    # With the R replica gradients as micro-batches, McCandlish's two-batch estimators are the U-statistics of
    # noise_estimates.gram_estimates (an identity; R = 4 because the jackknife needs 3 or more).
    gradients, _, _ = _population()
    slices = gradients[:32].reshape(4, 8, -1).mean(axis=1)
    small, big = np.mean(np.sum(slices**2, axis=1)), np.sum(slices.mean(axis=0) ** 2)
    trace, norm_sq = noise_estimates.two_batch_estimates(small, big, 8, 32, 400)
    gram = noise_estimates.gram_estimates(slices @ slices.T, 8, 400)
    np.testing.assert_allclose([trace, norm_sq], [gram["trace_cov"], gram["norm_sq"]], rtol=1e-10)


def test_step_means_take_the_scatter_over_more_steps_than_the_mean():
    rng = np.random.default_rng(2)
    trace, norm_sq = rng.exponential(size=40), rng.normal(size=40)
    record = noise_estimates.step_means(trace, norm_sq, 32, steps=10)
    assert record["trace_cov"] == pytest.approx(trace[-10:].mean())
    assert record["norm_sq"] == pytest.approx(norm_sq[-10:].mean())
    assert record["trace_cov_se"] == pytest.approx(trace.std(ddof=1) / np.sqrt(10))
    assert record["degrees_of_freedom"] == 39
    with pytest.raises(ValueError, match="steps"):
        noise_estimates.step_means(trace, norm_sq, 32, steps=41)


def test_rejects_bad_arguments_and_a_model_without_replica_norms():
    with pytest.raises(ValueError, match="replicas"):
        ReplicaGradientStatistics(1, batch_size=32)
    with pytest.raises(ValueError, match="every_n_steps"):
        ReplicaGradientStatistics(2, every_n_steps=1, batch_size=32)
    with pytest.raises(ValueError, match="small_batch"):
        noise_estimates.two_batch_estimates(1.0, 1.0, 32, 32)
    with pytest.raises(ValueError, match="at least 2"):
        noise_estimates.step_means([1.0], [1.0], 32)
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(inputs))
    model.compile("sgd", "sparse_categorical_crossentropy")
    x, y = np.zeros((8, 3), np.float32), np.zeros(8, np.int32)
    with pytest.raises(ValueError, match="with_replica_norms"):
        model.fit(x, y, batch_size=4, callbacks=[ReplicaGradientStatistics(2, batch_size=4)], verbose=0)


# The mirrored run: the one-device tracking test's run (tests/test_gradient_stats_training.py: BN-free CNN, digits,
# 1293 training examples, batch 32, SGD lr 0.05, 400 steps) on 2 replicas, a record every 10 steps, the default
# window (20%). A value averages its steps (callbacks/replica_gradient_stats.py), so its truth is the mean of the
# truth over those steps' weights: the brute force runs at every step of the smoothed windows checked at steps 40,
# 150 and 390 (steps 32-40, 120-150, 312-390) and of the raw records inside steps 31-40, 111-150 and 311-390: at
# every step of 31-40, every second of 111-150 and every fifth of 311-390 (the brute force is most of this test's
# time). On a run with the truth at every step, the mean over every second step of 311-390, where the learning rate
# is below 0.006 and the truth changes slowly, differed from the mean over all by 0.3% (tr(Sigma)) and 0.7% (|G|^2).
EVERY, CHECKED, WINDOW = 10, (40, 150, 390), 0.2
WINDOWS = ((31, 40, 1), (111, 150, 2), (311, 390, 5))  # first step, last step, stride of the truth
TRUTH_STEPS = sorted({step for first, last, stride in WINDOWS for step in range(last, first - 1, -stride)})


@pytest.fixture(scope="module")
def mirrored_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("replicas") / "run.json"
    environment = {**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "replica_training_run.py"), str(out),
                             ",".join(map(str, TRUTH_STEPS))], env=environment, capture_output=True, text=True,
                            check=False, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(out) as f:
        run = json.load(f)
    run["truth"] = {int(step): values for step, values in run["truth"].items()}
    print(f"fit with statistics {run['fit_seconds']:.1f} s (brute force {run['truth_seconds']:.1f} s of it), "
          f"plain first epoch {run['plain_fit_seconds']:.1f} s")
    return run


def _truth_over(run, first, last):
    """What a value over steps first..last estimates: the mean of tr(Sigma) and |G|^2 over their weights (over the
    steps of the window where the brute force ran)."""
    steps = [step for step in range(first, last + 1) if step in run["truth"]]
    assert steps and steps[-1] == last, (first, last)
    trace = np.mean([run["truth"][step]["trace_cov"] for step in steps])
    norm_sq = np.mean([run["truth"][step]["norm_sq"] for step in steps])
    return {"trace_cov": trace, "norm_sq": norm_sq, "noise_scale": trace / norm_sq}


def _record(run, step):
    return next(r for r in run["history"] if r["step"] == step)


@pytest.mark.slow
def test_weights_are_those_of_training_without_the_statistics(mirrored_run):
    # The first epoch (40 steps) again with the model's own Keras train_step, same strategy and schedule.
    assert mirrored_run["weight_difference"] <= 1e-6


@pytest.mark.slow
def test_a_record_every_10_steps_from_both_replicas(mirrored_run):
    history = mirrored_run["history"]
    assert mirrored_run["replicas"] == 2 and mirrored_run["num_train"] == 1293 and mirrored_run["window"] == WINDOW
    assert [r["step"] for r in history] == list(range(EVERY, 401, EVERY))
    assert {(r["source"], r["micro_batch_size"], r["micro_batches"], r["steps_pooled"], r["population"])
            for r in history} == {("replicas", 16, 2 * EVERY, EVERY, 1293)}


@pytest.mark.slow
@pytest.mark.parametrize("step", CHECKED)
def test_smoothed_values_match_brute_force_over_their_window(mirrored_run, step):
    record = _record(mirrored_run, step)
    first = record["smoothed_first_step"]
    assert first == math.ceil((1 - WINDOW) * step) and record["smoothed_measurements"] == step - first + 1
    truth = _truth_over(mirrored_run, first, step)
    for key, tolerance in (("trace_cov", 1.5), ("norm_sq", 2.0), ("noise_scale", 2.0)):
        ratio = record[f"grad/{key}_smoothed"] / truth[key]
        assert 1 / tolerance <= ratio <= tolerance, (key, ratio, record[f"grad/{key}_smoothed"], truth[key])
    assert not record["grad/noise_scale_smoothed_is_lower_bound"]
    at_step = mirrored_run["truth"][step]
    print(f"step {step}, window {first}-{step}: smoothed / truth over the window: "
          + ", ".join(f"{key} {record[f'grad/{key}_smoothed'] / truth[key]:.2f}" for key in truth)
          + "; smoothed / truth at the step: "
          + ", ".join(f"{key} {record[f'grad/{key}_smoothed'] / at_step[key]:.2f}" for key in truth))


@pytest.mark.slow
@pytest.mark.parametrize("suffix", ["", "_smoothed"])
@pytest.mark.parametrize("key", ["trace_cov", "norm_sq", "noise_scale"])
def test_intervals_hold_the_truth_of_their_steps(mirrored_run, key, suffix):
    from benchmarks.noise_accuracy import inside as holds

    # Raw: the 13 records whose 10 steps lie in the windows; smoothed: the values at steps 40, 150 and 390.
    inside, checked = [], []
    for r in mirrored_run["history"]:
        first = r["smoothed_first_step"] if suffix else r["step"] - EVERY + 1
        in_window = any(low <= first and r["step"] <= high for low, high, _ in WINDOWS)
        if not in_window or (suffix and r["step"] not in CHECKED):
            continue
        truth = _truth_over(mirrored_run, first, r["step"])[key]
        # The run's history holds the callback's records, where an end that is not determined is NaN (null only
        # in grad_stats.jsonl): a missing end bounds nothing, as on one device (benchmarks.noise_accuracy.inside).
        inside.append(holds(r, key + suffix, truth))
        checked.append((r["step"], r[f"grad/{key}{suffix}"], r[f"grad/{key}{suffix}_lo"], r[f"grad/{key}{suffix}_hi"],
                        truth))
    # On failure: (step, value, lo, hi, truth of its steps) of every interval checked.
    assert len(inside) == (3 if suffix else 13) and np.mean(inside) >= 0.8, checked
    # An interval with no finite end holds anything; those with one must hold the truth as often (late in training
    # B_simple is unresolved in most raw records, so the rate over all of them alone could not fail).
    bounded = [ok for ok, (*_, lo, hi, _truth) in zip(inside, checked) if np.isfinite(lo or np.nan)
               or np.isfinite(hi or np.nan)]
    assert len(bounded) >= 3 and np.mean(bounded) >= 0.75, checked
