"""The statistics behind the findings: exact fits, their standard errors against Monte Carlo, pooled B_simple."""

import math

import numpy as np
import pytest

from callbacks import noise_estimates
from pipeline.study import fits


def test_fit_recovers_known_critical_batch():
    batches = np.array([4, 8, 16, 32, 64, 128, 256, 512])
    for s_min, b_crit in ((1000.0, 64.0), (37.5, 3.0), (5e4, 900.0)):
        fit = fits.fit_steps_to_target(batches, [s_min * (1 + b_crit / b) for b in batches])
        assert fit["valid"] and fit["determined"]
        assert fit["s_min"] == pytest.approx(s_min, rel=1e-9)
        assert fit["b_crit"] == pytest.approx(b_crit, rel=1e-9)
        assert fit["e_min"] == pytest.approx(s_min * b_crit, rel=1e-9)
        assert fit["b_crit_se"] == pytest.approx(0, abs=1e-6 * b_crit)
    assert fits.fit_steps_to_target([32], [100.0]) is None
    two = fits.fit_steps_to_target([16, 64], [300.0, 120.0])
    assert two["points"] == 2 and not two["determined"] and two["b_crit_se"] is None


def test_standard_errors_match_the_scatter_of_repeated_fits():
    """Fitting many noisy sweeps: the reported standard errors agree with the spread of the estimates."""
    rng = np.random.default_rng(0)
    batches = np.array([8, 16, 32, 64, 128, 256])
    b_crits, b_crit_ses, slopes, slope_ses = [], [], [], []
    for _ in range(400):
        noise = np.exp(rng.normal(0, 0.05, len(batches)))  # 5% relative scatter
        fit = fits.fit_steps_to_target(batches, 400 * (1 + 60 / batches) * noise)
        b_crits.append(fit["b_crit"])
        b_crit_ses.append(fit["b_crit_se"])
        law = fits.fit_power_law(batches, 3.0 * batches**-0.5 * noise)
        slopes.append(law["slope"])
        slope_ses.append(law["slope_se"])
    assert np.std(b_crits) == pytest.approx(np.sqrt(np.mean(np.square(b_crit_ses))), rel=0.2)
    assert np.std(slopes) == pytest.approx(np.sqrt(np.mean(np.square(slope_ses))), rel=0.15)
    assert np.mean(slopes) == pytest.approx(-0.5, abs=0.01)


def test_power_law_direction_and_points():
    batches = [8, 16, 32, 64, 128, 256]
    fit = fits.fit_power_law(batches, [2.5 / math.sqrt(b) for b in batches])
    assert fit["slope"] == pytest.approx(-0.5, abs=1e-12) and fit["c"] == pytest.approx(2.5, rel=1e-12)
    assert fit["direction"] == "falls" and fits.agrees(fit, -0.5)
    rising = fits.fit_power_law([8, 16, 32], [1.0, 1.3, 1.7])
    assert rising["direction"] == "rises" and not fits.agrees(rising, -0.5)
    flat = fits.fit_power_law([8, 16, 32, 64], [1.0, 1.2, 0.9, 1.1])
    assert flat["direction"] == "unclear"
    two = fits.fit_power_law([8, 16], [1.0, 0.7])
    assert two["direction"] == "not determined" and two["slope_se"] is None and fits.agrees(two, -0.5) is None


def seed_stats(per_seed):
    """The statistics over seeds that sweep_report.aggregate gives one group: mean, sample std (ddof 1), count."""
    values = np.asarray(per_seed, float)
    return {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else None,
            "n": len(values)}


def weighted_line(x, y, counts):
    """(slope, intercept, sum n (x - xbar)^2, weighted residual sum of squares) of the line through (x, y) with
    weights n, summed in loops."""
    total = sum(counts)
    x_bar = sum(n * xi for n, xi in zip(counts, x)) / total
    y_bar = sum(n * yi for n, yi in zip(counts, y)) / total
    sxx = sum(n * (xi - x_bar) ** 2 for n, xi in zip(counts, x))
    slope = sum(n * (xi - x_bar) * (yi - y_bar) for n, xi, yi in zip(counts, x, y)) / sxx
    intercept = y_bar - slope * x_bar
    return slope, intercept, sxx, sum(n * (yi - intercept - slope * xi) ** 2 for n, xi, yi in zip(counts, x, y))


def test_power_law_over_seeds_against_weighted_least_squares_written_out():
    """Unequal seeds per batch: the slope is the weighted least-squares slope (weights n_b) and its standard error
    the larger of the seeds' (pooled relative variance, summed in a loop) and the residuals', written out here."""
    rng = np.random.default_rng(3)
    batches, counts = [8, 16, 32, 64, 128], [2, 3, 2, 4, 1]
    per_seed = [list(2.0 * b**-0.4 * np.exp(rng.normal(0, 0.2, n))) for b, n in zip(batches, counts)]
    fit = fits.fit_over_seeds([(b, seed_stats(v)) for b, v in zip(batches, per_seed)])

    means = [sum(v) / len(v) for v in per_seed]
    numerator = denominator = 0.0
    for v, m in zip(per_seed, means):
        if len(v) > 1:
            sample_var = sum((x - m) ** 2 for x in v) / (len(v) - 1)
            numerator += (len(v) - 1) * sample_var / m**2
            denominator += len(v) - 1
    relative_var = numerator / denominator
    slope, _, sxx, rss = weighted_line([math.log(b) for b in batches], [math.log(m) for m in means], counts)
    replicate_se, residual_se = math.sqrt(relative_var / sxx), math.sqrt(rss / (len(batches) - 2) / sxx)

    assert fit["slope"] == pytest.approx(slope, rel=1e-12)
    assert fit["replicate_se"] == pytest.approx(replicate_se, rel=1e-12)
    assert fit["residual_se"] == pytest.approx(residual_se, rel=1e-12)
    assert fit["slope_se"] == pytest.approx(max(replicate_se, residual_se), rel=1e-12)
    assert fit["replicate_dof"] == sum(n - 1 for n in counts)
    # One seed per batch size: the residuals' error alone, and no run-to-run spread.
    single = fits.fit_over_seeds([(b, seed_stats(v[:1])) for b, v in zip(batches, per_seed)])
    assert single["replicate_se"] is None and single["slope_se"] == single["residual_se"]


def test_linear_fit_over_seeds_against_weighted_least_squares_written_out():
    """A quantity that may be negative (a generalization gap) against ln B: weighted least squares with weights n_b,
    the seeds' variance pooled as it is (not relative), written out here."""
    rng = np.random.default_rng(5)
    batches, counts = [8, 16, 32, 64], [2, 3, 2, 1]
    per_seed = [list(-0.01 + 0.004 * math.log(b) + rng.normal(0, 0.003, n)) for b, n in zip(batches, counts)]
    fit = fits.fit_over_seeds([(b, seed_stats(v)) for b, v in zip(batches, per_seed)], log=False)

    means = [sum(v) / len(v) for v in per_seed]
    pooled = sum(sum((x - m) ** 2 for x in v) for v, m in zip(per_seed, means)) / sum(n - 1 for n in counts)
    slope, intercept, sxx, rss = weighted_line([math.log(b) for b in batches], means, counts)
    assert fit["slope"] == pytest.approx(slope, rel=1e-12)
    assert fit["intercept"] == pytest.approx(intercept, rel=1e-12)
    assert fit["replicate_se"] == pytest.approx(math.sqrt(pooled / sxx), rel=1e-12)
    assert fit["residual_se"] == pytest.approx(math.sqrt(rss / (len(batches) - 2) / sxx), rel=1e-12)
    assert fit["replicate_dof"] == 4
    assert fits.fit_over_seeds([(8, seed_stats([0.1, 0.2]))], log=False) is None  # one batch size: no line


def test_power_law_interval_covers_the_true_slope_across_reruns():
    """Many synthetic sweeps of 2 seeds at 5 batch sizes, each seed off the law B^-0.5 by 15% (lognormal): the slope's
    Z-standard-error interval holds the true slope in about 95% of them (not fewer than 90%), and the seeds' standard
    error matches the slopes' scatter over the sweeps."""
    rng = np.random.default_rng(11)
    batches = [8, 16, 32, 64, 128]
    slopes, replicate_ses, covered = [], [], 0
    for _ in range(400):
        points = [(b, seed_stats(3.0 * b**-0.5 * np.exp(rng.normal(0, 0.15, 2)))) for b in batches]
        fit = fits.fit_over_seeds(points)
        slopes.append(fit["slope"])
        replicate_ses.append(fit["replicate_se"])
        covered += abs(fit["slope"] + 0.5) <= fits.Z * fit["slope_se"]
    assert covered / 400 >= 0.9
    assert np.std(slopes) == pytest.approx(np.sqrt(np.mean(np.square(replicate_ses))), rel=0.2)


def test_diminishing_returns_needs_every_later_step_to_scale_badly():
    # Efficiencies: 8->16 perfect, 16->32 none (one noisy point), 32->64 perfect, then 0.2 and 0.
    batches, steps = [8, 16, 32, 64, 128, 256], [160, 80, 80, 40, 40 / 2**0.2, 40 / 2**0.2]
    assert fits.diminishing_returns(batches, steps) == 64
    assert fits.diminishing_returns(batches[:4], steps[:4]) is None
    assert fits.diminishing_returns([8, 16], [100, 100]) == 8


def record(step, trace, norm_sq, trace_se=0.5, norm_sq_se=0.01):
    """A grad_stats.jsonl record as GradientStatistics writes it (the keys noise_estimates.pool reads)."""
    return {"step": step, "batch_size": 32, "micro_batches": 32, "grad/trace_cov": trace, "grad/norm_sq": norm_sq,
            "grad/trace_cov_se": trace_se, "grad/norm_sq_se": norm_sq_se, "grad/trace_norm_sq_corr": 0.0}


def test_pooled_noise_scale_is_noise_estimates_pool_in_the_report_form():
    records = [record(0, 100.0, 1.0), record(10, 8.0, 0.1), record(20, 12.0, 0.3), record(30, 10.0, 0.2),
               {"step": 25, "grad/trace_cov": 1.0, "grad/norm_sq": 1.0}]  # written before intervals: left out
    pooled = fits.pooled_noise_scale(records, 10, 30)
    reference = noise_estimates.pool(records[1:4], 10, 30)
    assert pooled["measurements"] == 3 and (pooled["first_step"], pooled["last_step"]) == (10, 30)
    assert pooled["noise_scale"] == pytest.approx(10.0 / 0.2)
    assert (pooled["noise_scale_lo"], pooled["noise_scale_hi"]) == pytest.approx(
        (reference["noise_scale_lo"], reference["noise_scale_hi"]))
    assert pooled["noise_scale_lo"] < 50 < pooled["noise_scale_hi"]
    assert fits.pooled_noise_scale(records, 50, 60) is None
    # |G|^2 not distinguishable from 0: a lower bound only, no point value and no upper end (JSON has no inf).
    noisy = [record(s, 10.0, g, norm_sq_se=0.2) for s, g in ((0, 0.3), (1, -0.2), (2, 0.05))]
    pooled = fits.pooled_noise_scale(noisy, 0, 2)
    assert pooled["noise_scale"] is None and pooled["noise_scale_hi"] is None
    assert pooled["noise_scale_lo"] == pytest.approx(noise_estimates.pool(noisy)["noise_scale_lo"])
    assert 0 < pooled["noise_scale_lo"] < 10.0 / 0.05


def test_noise_growth_verdicts():
    def run(early, late, trace_se=0.5):
        return [record(s, t, 1.0, trace_se=trace_se) for s, t in [(0, early[0]), (10, early[1]), (90, late[0]),
                                                                  (100, late[1])]]

    assert fits.noise_growth(run((10, 11), (50, 52)), 100)["verdict"] == "grew"
    assert fits.noise_growth(run((50, 52), (10, 11)), 100)["verdict"] == "fell"
    assert fits.noise_growth(run((10, 30), (15, 35), trace_se=6.0), 100)["verdict"] == "unclear"
    assert fits.noise_growth(run((10, 11), (50, 52))[2:], 100)["verdict"] == "not enough data"

def test_a_slope_is_judged_by_the_t_quantile_of_its_errors_degrees_of_freedom():
    """Rerun 7 of the rerun benchmark: BatchNorm's variance discrepancy at BN batch 8-64 (batch 128 was below the
    population sample's resolution), two seeds each. The residual error (2 degrees of freedom) is larger than the
    seeds'; the slope -0.533 lies 2.4 of it from the prediction -0.5: outside 2 standard errors, inside t_2 = 4.30,
    the 95% interval of an error estimated from 2 degrees of freedom. The 7 other reruns said "Yes"."""
    seeds = {8: (0.11596, 0.11191), 16: (0.08116, 0.08242), 32: (0.05526, 0.05405), 64: (0.03867, 0.03732)}
    batches = list(seeds)
    stats_ = [{"mean": np.mean(v), "std": np.std(v, ddof=1), "n": 2} for v in seeds.values()]
    fit = fits.fit_over_seeds(list(zip(batches, stats_)))
    x, y = np.log(batches), np.log([s["mean"] for s in stats_])
    slope, intercept = np.polyfit(x, y, 1)
    residual_se = math.sqrt(np.sum((y - intercept - slope * x) ** 2) / 2 / np.sum((x - x.mean()) ** 2))
    assert fit["slope"] == pytest.approx(slope) and fit["slope_se"] == pytest.approx(residual_se)
    assert fit["slope_dof"] == 2 and fit["slope_q"] == pytest.approx(4.3027, abs=1e-4)
    assert 2 < abs(slope + 0.5) / residual_se < 4.3
    assert fits.agrees(fit, -0.5) is True and fit["direction"] == "falls"
