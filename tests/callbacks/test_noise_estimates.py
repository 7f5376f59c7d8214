"""Tests of callbacks.noise_estimates against direct computations: loops over micro-batches, grids over ratios."""

import math

import numpy as np
import pytest

from callbacks import noise_estimates


def _micro_batch_gradients(rng, m, parameters=50, signal=1.0):
    return signal + rng.normal(size=(m, parameters)) * rng.uniform(0.5, 2.0, size=parameters)


def _direct(g, b, population=None):
    """tr(Sigma) and |G|^2 from the micro-batch gradients themselves (variance of their mean, pairs)."""
    m = len(g)
    trace = b * np.sum(np.var(g, axis=0, ddof=1))
    pairs = [g[i] @ g[j] for i in range(m) for j in range(m) if i != j]
    return trace, np.mean(pairs) + (trace / population if population else 0.0)


@pytest.mark.parametrize("population", [None, 5000])
def test_jackknife_matches_a_loop_over_left_out_micro_batches(population):
    rng = np.random.default_rng(0)
    g = _micro_batch_gradients(rng, 9)
    result = noise_estimates.gram_estimates(g @ g.T, micro_batch_size=4, population=population)
    trace, norm_sq = _direct(g, 4, population)
    assert result["trace_cov"] == pytest.approx(trace, rel=1e-10)
    assert result["norm_sq"] == pytest.approx(norm_sq, rel=1e-10)
    left_out = np.array([_direct(np.delete(g, i, axis=0), 4, population) for i in range(len(g))])
    deviations = left_out - left_out.mean(axis=0)
    covariance = (len(g) - 1) / len(g) * deviations.T @ deviations
    if population:  # the finite-population factor of |G|^2's variance and covariance, 1 - M b / N
        covariance[1, :] *= 1 - 9 * 4 / population
        covariance[0, 1] = covariance[1, 0]
    assert result["trace_cov_se"] == pytest.approx(math.sqrt(covariance[0, 0]), rel=1e-8)
    assert result["norm_sq_se"] == pytest.approx(math.sqrt(covariance[1, 1]), rel=1e-8)
    assert result["covariance"] == pytest.approx(covariance[0, 1], rel=1e-8)
    assert result["degrees_of_freedom"] == 8


def test_intervals_cover_known_values_at_their_confidence():
    # Gaussian micro-batch gradients with mean G and covariance Sigma / b: over 2000 draws of M = 16, the 95%
    # intervals hold tr(Sigma), |G|^2 and their ratio in 93-97.5% of them.
    rng = np.random.default_rng(1)
    b, m, parameters = 8, 16, 30
    mean, scale = rng.normal(size=parameters) * 0.3, rng.uniform(0.5, 2.0, size=parameters)
    trace, norm_sq = np.sum(scale**2), mean @ mean
    hits = {"trace_cov": 0, "norm_sq": 0, "noise_scale": 0}
    for _ in range(2000):
        g = mean + rng.normal(size=(m, parameters)) * scale / math.sqrt(b)
        record = noise_estimates.measurement(g @ g.T, b, batch_size=32)
        for key, value in (("trace_cov", trace), ("norm_sq", norm_sq), ("noise_scale", trace / norm_sq)):
            hits[key] += record[f"{key}_lo"] <= value <= record[f"{key}_hi"]
    for key, count in hits.items():
        assert 0.93 <= count / 2000 <= 0.975, key


@pytest.mark.parametrize("fraction", [0.2, 0.6, 0.95])
def test_without_replacement_the_standard_error_is_that_of_repeated_draws(fraction):
    # A population of N = 600 heavy-tailed per-example gradients (a few examples carry most of the variance, as late
    # in training); 1500 samples of M micro-batches of b = 10 drawn without replacement. The reported |G|^2 standard
    # error is the spread of the estimates over the draws (their sampling distribution, computed here by drawing),
    # the 95% intervals hold the population's |G|^2 at their confidence, and tr(Sigma)'s error, left without the
    # factor, is not below its spread (conservative), and B_simple's intervals keep their coverage. Without the
    # factor the error at f = 0.95 was 4.5x the spread.
    rng = np.random.default_rng(7)
    population, b, m = 600, 10, round(fraction * 60)
    examples = rng.standard_t(3, size=(population, 20)) * 0.5 + 0.15
    mean = examples.mean(axis=0)
    norm_sq, trace = mean @ mean, np.sum(np.var(examples, axis=0, ddof=1))
    estimates, errors, trace_estimates, trace_errors, held, held_ratio = [], [], [], [], 0, 0
    for _ in range(1500):
        g = examples[rng.permutation(population)[: m * b]].reshape(m, b, -1).mean(axis=1)
        record = noise_estimates.measurement(g @ g.T, b, batch_size=32, population=population)
        estimates.append(record["norm_sq"])
        errors.append(record["norm_sq_se"])
        trace_estimates.append(record["trace_cov"])
        trace_errors.append(record["trace_cov_se"])
        low = 0.0 if np.isnan(record["norm_sq_lo"]) else record["norm_sq_lo"]
        held += low <= norm_sq <= record["norm_sq_hi"]
        ratio_low, ratio_high = np.nan_to_num([record["noise_scale_lo"], record["noise_scale_hi"]], nan=0.0)
        held_ratio += ratio_low <= trace / norm_sq <= (ratio_high or math.inf)
    assert abs(np.mean(estimates) - norm_sq) < 3 * np.std(estimates) / math.sqrt(1500)  # unbiased
    assert 0.85 <= math.sqrt(np.mean(np.square(errors))) / np.std(estimates) <= 1.25
    assert 0.93 <= held / 1500 <= 0.985
    assert held_ratio / 1500 >= 0.93  # B_simple's Fieller interval with the corrected covariance
    assert abs(np.mean(trace_estimates) - trace) < 3 * np.std(trace_estimates) / math.sqrt(1500)
    assert math.sqrt(np.mean(np.square(trace_errors))) >= 0.9 * np.std(trace_estimates)


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.5])
def test_micro_batches_needed_is_the_least_m_reaching_the_half_width(fraction):
    # The M the formula gives against a scan over M of q s.e.(M) <= r |G|^2, with the pilot's per-micro-batch
    # variance v = M_0 s.e._0^2 / (1 - f_0) and s.e.(M)^2 = v (1 - M b / N) / M.
    m0, b, r = 8, 32, 0.5
    population = m0 * b / fraction if fraction else None
    pilot = {"norm_sq": 1.0, "norm_sq_se": 0.9, "sampling_fraction": fraction}
    needed = noise_estimates.micro_batches_needed(pilot, m0, r)
    q = noise_estimates.quantile(m0 - 1)
    v = m0 * 0.9**2 / (1 - fraction)
    scan = next(m for m in np.arange(1, 10_000, 0.001)
                if q * math.sqrt(v * (1 - (m * b / population if population else 0.0)) / m) <= r)
    assert needed == pytest.approx(scan, abs=0.002)
    assert noise_estimates.micro_batches_needed(dict(pilot, sampling_fraction=1.0), m0, r) == m0


def _fieller_by_grid(t, n, vt, vn, c, q, grid):
    """The rho on a grid with (t - rho n)^2 <= q^2 (vt - 2 rho c + rho^2 vn)."""
    return grid[(t - grid * n) ** 2 <= q**2 * (vt - 2 * grid * c + grid**2 * vn)]


@pytest.mark.parametrize("t, n, vt, vn, c", [(10.0, 0.5, 4.0, 0.01, 0.05), (10.0, 0.5, 4.0, 0.02, -0.1),
                                             (3.0, 0.01, 0.5, 0.000004, 0.0001)])
def test_fieller_interval_matches_a_grid_search(t, n, vt, vn, c):
    q = 1.96
    value, lo, hi, is_bound = noise_estimates.ratio_interval(t, n, vt, vn, c, q)
    inside = _fieller_by_grid(t, n, vt, vn, c, q, np.linspace(0, 2000, 2_000_001))
    assert not is_bound and value == pytest.approx(t / n)
    assert lo == pytest.approx(inside.min(), abs=2e-3) and hi == pytest.approx(inside.max(), abs=2e-3)


def test_ratio_is_a_lower_bound_when_the_denominator_is_not_distinguishable_from_zero():
    q, t, vt = 1.96, 10.0, 1.0
    for n, vn, c in ((0.05, 0.01, 0.02), (-0.02, 0.01, 0.0), (0.0, 1e-4, 0.0)):
        value, lo, hi, is_bound = noise_estimates.ratio_interval(t, n, vt, vn, c, q)
        assert is_bound and hi == math.inf and value == lo
        grid = np.linspace(0, 1e5, 1_000_001)
        inside = _fieller_by_grid(t, n, vt, vn, c, q, grid)
        assert lo == pytest.approx(inside.min(), abs=0.1) and inside.max() == grid.max()  # [X, inf)
    # tr(Sigma) not distinguishable from zero either: nothing above 0 is excluded.
    assert noise_estimates.ratio_interval(1.0, 0.0, 1.0, 1e-4, 0.0, q)[:2] == (0.0, 0.0)


def test_an_undetermined_ratio_is_missing_and_bounded_by_bonferroni():
    q, t, vt = 1.96, 10.0, 1.0
    record = noise_estimates.derive(t, -0.001, vt, 1e-4, 0.0, q, batch_size=32)
    assert record["noise_scale_is_lower_bound"] and math.isnan(record["noise_scale"])
    assert math.isnan(record["norm_sq"]) and set(record["notes"]) == {"norm_sq", "noise_scale"}
    # The lower end: tr(Sigma)'s lower end over |G|^2's upper end, each at the two-sided quantile q.
    bound = (t - q * 1.0) / (-0.001 + q * 0.01)
    assert record["noise_scale_lo"] == pytest.approx(bound) and record["noise_scale_hi"] == math.inf
    assert record["snr_hi"] == pytest.approx(32 / bound) and math.isnan(record["snr"]) and math.isnan(record["snr_lo"])
    # Nothing supported above 0: no lower end at all, rather than a 0.
    record = noise_estimates.derive(1.0, 0.0, 1.0, 1e-4, 0.0, q, batch_size=32)
    assert math.isnan(record["noise_scale_lo"]) and "not determined" in record["notes"]["noise_scale"]


def test_bonferroni_bound_holds_at_its_confidence_where_g_is_not_resolved():
    # |G|^2 far below tr(Sigma) / n: most measurements cannot resolve |G|^2. Over 2000 draws the lower bound
    # B_simple > X holds in >= 95% of the measurements that report one, and is positive (informative) in most.
    rng = np.random.default_rng(7)
    b, m, parameters = 8, 16, 30
    mean, scale = np.full(parameters, 0.02), rng.uniform(0.5, 2.0, size=parameters)
    truth = np.sum(scale**2) / (mean @ mean)
    bounded, holds, informative = 0, 0, 0
    for _ in range(2000):
        g = mean + rng.normal(size=(m, parameters)) * scale / math.sqrt(b)
        record = noise_estimates.measurement(g @ g.T, b, batch_size=32)
        if record["noise_scale_is_lower_bound"]:
            bounded += 1
            informative += record["noise_scale_lo"] > 0
            holds += not record["noise_scale_lo"] > truth
    assert bounded > 1500 and holds / bounded >= 0.95 and informative / bounded > 0.9, (bounded, holds, informative)


def test_pool_combines_the_measurements_of_a_window():
    rng = np.random.default_rng(2)
    records = []
    for step in range(0, 100, 10):
        g = _micro_batch_gradients(rng, 8, signal=0.5)
        values = noise_estimates.measurement(g @ g.T, 4, batch_size=16)
        records.append({"step": step, "micro_batches": 8, "batch_size": 16,
                        **{f"grad/{k}": v for k, v in values.items()}})
    pooled = noise_estimates.pool(records, 35, 70)
    chosen = records[4:8]  # steps 40, 50, 60, 70
    assert (pooled["measurements"], pooled["first_step"], pooled["last_step"]) == (4, 40, 70)
    trace = np.mean([r["grad/trace_cov"] for r in chosen])
    norm_sq = np.mean([r["grad/norm_sq"] for r in chosen])
    assert pooled["trace_cov"] == pytest.approx(trace) and pooled["norm_sq"] == pytest.approx(norm_sq)
    assert pooled["noise_scale"] == pytest.approx(trace / norm_sq)
    se = math.sqrt(sum(r["grad/trace_cov_se"] ** 2 for r in chosen)) / 4
    q = noise_estimates.quantile(4 * 7)
    assert pooled["trace_cov_hi"] - pooled["trace_cov"] == pytest.approx(q * se)
    assert pooled["batch_std"] == pytest.approx(math.sqrt(trace / 16))
    assert noise_estimates.pool(records, 1000) is None
    # One measurement pooled is that measurement.
    single = noise_estimates.pool(records, 90, 90)
    for key in noise_estimates.KEYS:
        assert single[key] == pytest.approx(records[-1][f"grad/{key}"], nan_ok=True)
        assert single[f"{key}_lo"] == pytest.approx(records[-1][f"grad/{key}_lo"], nan_ok=True)
