"""Gradient-noise estimates with confidence intervals, from micro-batch gradients or from pooled measurements.

Pure NumPy (no Keras), so that reports and advisors can pool a run's grad_stats.jsonl records without a model.

One measurement: M micro-batches of b examples drawn without replacement; g_i is the mean gradient of micro-batch
i and K_ij = g_i . g_j their Gram matrix. With G the mean gradient and Sigma the per-example gradient covariance
of the N examples the batches are drawn from (McCandlish et al. 2018, "An Empirical Model of Large-Batch
Training", app. A, written as U-statistics over pairs of micro-batches):

    tr(Sigma) = b / (2 M (M - 1)) * sum_{i != j} |g_i - g_j|^2            grad/trace_cov
    |G|^2     = 1 / (M (M - 1)) * sum_{i != j} g_i . g_j  +  tr(Sigma) / N   grad/norm_sq
    B_simple  = tr(Sigma) / |G|^2                                         grad/noise_scale  (their eq. 2.8)
    std(g_B)  = sqrt(tr(Sigma) / B)                                       grad/batch_std  (at the run's batch B)
    SNR       = |G|^2 / (tr(Sigma) / B) = B / B_simple                    grad/snr

Both sums are unbiased: E[g_i . g_j] = |G|^2 - tr(Sigma) / N for two disjoint micro-batches drawn without
replacement from N examples, hence the finite-population term tr(Sigma) / N (zero when N is infinite, i.e. when
the examples are drawn with replacement or from a stream). Intervals (confidence `CONFIDENCE`):

- tr(Sigma) and |G|^2: the estimate +- t_{M-1} * s.e., the standard errors and their covariance by the
  delete-one jackknife over the M micro-batches (Efron and Stein 1981; for U-statistics it is conservative).
  Drawn without replacement, a sample of n = M b of the N examples leaves |G|^2 less to vary: the estimate is
  |gbar|^2 - (1 - f) tr(Sigma) / n with f = n / N, whose variance shrinks by the finite-population factor (1 - f) to
  first order (the variance of the mean gradient gbar does), down to 0 when the sample is the whole population. The
  jackknife assumes draws from an endless stream, so |G|^2's variance and its covariance with tr(Sigma) are
  multiplied by (1 - f), the standard correction of a jackknife under sampling without replacement (Wolter 2007,
  "Introduction to Variance Estimation", ch. 4: the delete-one factor (1 - f)(n - 1)/n for a mean). tr(Sigma)'s is
  not: it stays random at f = 1 (the split into micro-batches is), so its jackknife variance is kept, which is
  conservative.
  tests/callbacks/test_noise_estimates.py checks both against the sampling distribution of repeated draws.
  tr(Sigma) >= 0, so its lower end is clipped at 0.
  |G|^2 >= 0, so its lower end is clipped at 0 too; an estimate |G|^2 <= 0 is not a value (NaN, see below).
- B_simple: Fieller's interval for a ratio of two correlated estimates (Fieller 1954): all rho with
  (T - rho N)^2 <= q^2 (var T - 2 rho cov + rho^2 var N), when |G|^2 is distinguishable from zero at this
  confidence (N > q s.e.(N)); a lower end of 0 (tr(Sigma) not distinguishable from zero) is left out (NaN).
- Otherwise B_simple is not determined (noise_scale NaN, noise_scale_is_lower_bound true) and its lower end is the
  Bonferroni bound X = tr(Sigma)_lo / |G|^2_hi: each end is a one-sided bound at confidence 1 - alpha / 2, whose
  t quantile is the two-sided quantile q at 1 - alpha used for the reported ends, so with probability >= 1 - alpha
  both hold and B_simple >= X ("B_simple > X"). When tr(Sigma)_lo = 0 no positive bound is supported: the lower end
  is NaN as well. `notes` says why a value is missing.
- batch_std and SNR: monotone functions of tr(Sigma) and of B_simple, so their intervals are the images of those
  intervals (when B_simple is only bounded below by X, SNR is only bounded above by B / X).

NaN means "not determined": the callbacks leave it out of the logs and TensorBoard and write null in JSON, with the
reason from `notes`. No noise scale, SNR or |G|^2 value is ever reported as 0 or negative.

Two batch sizes (`two_batch_estimates`, for data-parallel training): a step with R replicas computes R gradients
over b = B / R examples and their mean over the B examples of the global batch. Both are drawn without replacement
from the N training examples, so E|g_b|^2 = |G|^2 + tr(Sigma) (1/b - 1/N), and from the replicas' mean squared
norm S = (1/R) sum_r |g_r|^2 and the global one L = |g_B|^2 (McCandlish et al. 2018, app. A.1, with
B_small = b and B_big = B; AdaptDL does the same, Qiao et al. 2021, "Pollux"):

    tr(Sigma) = (S - L) / (1/b - 1/B)                                     unbiased at the step's weights
    |G|^2     = (B L - b S) / (B - b)  +  tr(Sigma) / N                   unbiased likewise

For equal slices these equal the U-statistics above with the R replica gradients as the micro-batches. One step's
values are very noisy (with R = 2 its |G|^2 is g_1 . g_2), so `step_means` pools K steps: their mean, with
variances and covariance from the sample (co)variance / K of V >= K steps' values (the steps' batches are disjoint
within an epoch) and t_{V-1} quantiles. The mean estimates the MEAN of tr(Sigma) and |G|^2 over the K steps'
weights, which differs from their values at the last step by the drift over the window
(callbacks/replica_gradient_stats.py).

Pooled measurements (`pool`): the mean of the K measurements' tr(Sigma) and |G|^2 (each unbiased at its own
step), their variances sum(s.e._k^2) / K^2 and covariance likewise (the measurements use independent examples),
normal quantiles when K (M - 1) is large, and the same Fieller interval for B_simple.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

CONFIDENCE = 0.95  # two-sided confidence of every reported interval
KEYS = ("norm_sq", "trace_cov", "noise_scale", "batch_std", "snr")


def quantile(degrees_of_freedom: float, confidence: float = CONFIDENCE) -> float:
    """Two-sided Student-t quantile t_{df, (1 + confidence) / 2}."""
    return float(stats.t.ppf(0.5 + confidence / 2, degrees_of_freedom))


def gram_estimates(gram, micro_batch_size: int, population: int | None = None) -> dict:
    """tr(Sigma) and |G|^2 from one measurement, with jackknife standard errors and covariance.

    Args:
        gram: (M, M) Gram matrix of the M >= 3 micro-batch mean gradients, K_ij = g_i . g_j (float64).
        micro_batch_size: Examples b per micro-batch.
        population: Examples N the micro-batches were drawn from without replacement, or None (infinite).

    Returns:
        {"trace_cov", "norm_sq", "trace_cov_se", "norm_sq_se", "covariance", "degrees_of_freedom",
        "sampling_fraction": f = M b / N (0 for an endless stream)}.
    """
    gram = np.asarray(gram, np.float64)
    m = gram.shape[0]
    if m < 3:
        raise ValueError(f"micro_batches: the jackknife needs at least 3 micro-batches, got {m}")
    diagonal, rows = np.diag(gram), gram.sum(axis=1)
    squares, total = diagonal.sum(), rows.sum()

    def estimates(squares, total, m):
        """(tr(Sigma), |G|^2) from sum_i |g_i|^2, |sum_i g_i|^2 and M (arrays for the leave-one-out sets)."""
        trace = micro_batch_size / (m - 1) * (squares - total / m)
        norm_sq = (total - squares) / (m * (m - 1))
        return trace, norm_sq + (trace / population if population else 0.0)

    trace, norm_sq = estimates(squares, total, m)
    # Leave micro-batch i out: its squared norm leaves the diagonal sum, its row and column leave the total.
    trace_out, norm_sq_out = estimates(squares - diagonal, total - 2 * rows + diagonal, m - 1)
    deviations = np.stack([trace_out - trace_out.mean(), norm_sq_out - norm_sq_out.mean()])
    covariance = (m - 1) / m * deviations @ deviations.T
    fraction = min(m * micro_batch_size / population, 1.0) if population else 0.0
    covariance[1, :] *= 1 - fraction  # the finite-population factor of |G|^2's variance (module docstring)
    covariance[0, 1] = covariance[1, 0]
    return {
        "trace_cov": float(trace),
        "norm_sq": float(norm_sq),
        "trace_cov_se": float(math.sqrt(covariance[0, 0])),
        "norm_sq_se": float(math.sqrt(covariance[1, 1])),
        "covariance": float(covariance[0, 1]),
        "degrees_of_freedom": m - 1,
        "sampling_fraction": fraction,
    }


def ratio_interval(trace, norm_sq, trace_var, norm_sq_var, covariance, q):
    """Fieller's interval for tr(Sigma) / |G|^2: (value, lo, hi, is_lower_bound).

    When |G|^2 is significantly positive, value = trace / norm_sq inside the finite interval [lo, hi]. Otherwise
    value = lo = X, the lower end of the positive part of Fieller's set (0 when tr(Sigma) is not significantly
    positive either), hi = inf and is_lower_bound = True.
    """
    a = norm_sq**2 - q**2 * norm_sq_var
    h = trace * norm_sq - q**2 * covariance
    c = trace**2 - q**2 * trace_var
    discriminant = h * h - a * c
    if a > 0 and norm_sq > 0:
        root = math.sqrt(max(discriminant, 0.0))  # >= 0 whenever a > 0: trace / norm_sq is inside the set
        lo = c / (h + root) if c > 0 and h + root > 0 else 0.0
        return trace / norm_sq, max(lo, 0.0), (h + root) / a, False
    if c > 0 and discriminant >= 0 and h + math.sqrt(discriminant) > 0:
        bound = c / (h + math.sqrt(discriminant))  # the positive root: the set is [bound, inf) on B >= 0
    else:
        bound = 0.0
    return bound, bound, math.inf, True


def derive(trace, norm_sq, trace_var, norm_sq_var, covariance, q, batch_size) -> dict:
    """All KEYS with intervals: {"trace_cov": v, "trace_cov_lo": lo, "trace_cov_hi": hi, ...,
    "noise_scale_is_lower_bound": bool, "notes": {key: why its value is NaN}} (the rules of the module docstring)."""
    trace_se, norm_sq_se = math.sqrt(max(trace_var, 0.0)), math.sqrt(max(norm_sq_var, 0.0))
    trace_lo, trace_hi = max(trace - q * trace_se, 0.0), trace + q * trace_se
    norm_sq_lo, norm_sq_hi = max(norm_sq - q * norm_sq_se, 0.0), norm_sq + q * norm_sq_se
    notes = {}
    if norm_sq <= 0:
        notes["norm_sq"] = f"estimate {norm_sq:.3g} <= 0: |G|^2 is below its resolution, at most norm_sq_hi"
    noise, noise_lo, noise_hi, is_bound = ratio_interval(trace, norm_sq, trace_var, norm_sq_var, covariance, q)
    if is_bound:
        noise, noise_hi = math.nan, math.inf
        noise_lo = trace_lo / norm_sq_hi if trace_lo > 0 and norm_sq_hi > 0 else math.nan
        notes["noise_scale"] = (
            "|G|^2 not distinguishable from 0: B_simple > noise_scale_lo (tr(Sigma)'s lower end over |G|^2's upper "
            "end, Bonferroni)" if noise_lo > 0 else
            "not determined: neither tr(Sigma) nor |G|^2 is distinguishable from 0")
    values = {
        "trace_cov": (trace, trace_lo, trace_hi),
        "norm_sq": (norm_sq if norm_sq > 0 else math.nan, norm_sq_lo, norm_sq_hi),
        "noise_scale": (noise if noise > 0 else math.nan, noise_lo if noise_lo > 0 else math.nan, noise_hi),
        "batch_std": tuple(math.sqrt(max(t, 0.0) / batch_size) for t in (trace, trace_lo, trace_hi)),
        # SNR = B / B_simple: its ends are the images of B_simple's; an unbounded or missing end of B_simple gives
        # a missing end here (never a 0).
        "snr": tuple(batch_size / n if 0 < n < math.inf else math.nan for n in (noise, noise_hi, noise_lo)),
    }
    record = {}
    for key, (value, lo, hi) in values.items():
        record.update({key: value, f"{key}_lo": lo, f"{key}_hi": hi})
    record["noise_scale_is_lower_bound"] = is_bound
    record["notes"] = notes
    return record


def measurement(gram, micro_batch_size: int, batch_size: int, population: int | None = None,
                confidence: float = CONFIDENCE, whole_population: bool = False) -> dict:
    """One measurement's KEYS with intervals (see derive), plus the standard errors and their covariance.

    whole_population: the M micro-batches partition all N = M b examples of the population. Then |G|^2 is exact:
    with sum_i g_i = M G, (|sum_i g_i|^2 - sum_i |g_i|^2) / (M (M - 1)) + tr(Sigma) / N = |sum_i g_i|^2 / M^2 for
    tr(Sigma) from the same micro-batches, so its standard error and covariance are 0; tr(Sigma) keeps its interval
    (the partition into micro-batches is random) and B_simple's is tr(Sigma)'s divided by |G|^2.
    """
    e = gram_estimates(gram, micro_batch_size, population)
    if whole_population:
        e.update(norm_sq=float(np.sum(gram) / len(gram) ** 2), norm_sq_se=0.0, covariance=0.0)
    q = quantile(e["degrees_of_freedom"], confidence)
    record = derive(e["trace_cov"], e["norm_sq"], e["trace_cov_se"] ** 2, e["norm_sq_se"] ** 2, e["covariance"], q,
                    batch_size)
    record.update(trace_cov_se=e["trace_cov_se"], norm_sq_se=e["norm_sq_se"],
                  trace_norm_sq_corr=_correlation(e["covariance"], e["trace_cov_se"], e["norm_sq_se"]))
    return record


def micro_batches_needed(pilot: dict, pilot_micro_batches: int, relative_half_width: float,
                         confidence: float = CONFIDENCE) -> float:
    """Micro-batches M at which |G|^2's interval would reach +- relative_half_width * |G|^2, from a pilot.

    The variance of the |G|^2 U-statistic is a 1 / M term (the signal's scatter) plus a 1 / M^2 term (the noise's
    own products), so its s.e. falls at least as 1 / sqrt(M); with the finite-population factor (module docstring)
    its variance is v (1 - M b / N) / M, v = M_0 s.e._0^2 / (1 - f_0) from the pilot's M_0, estimate, s.e. and
    sampling fraction f_0 = M_0 b / N. Solving q^2 v (1 - M b / N) / M = (r |G|^2_0)^2 for M gives
    M = q^2 v / ((r |G|^2_0)^2 + q^2 v f_0 / M_0) (q: the pilot's t quantile, larger than the final one), which is
    M_0 (q s.e._0 / (r |G|^2_0))^2 for an endless stream (f_0 = 0). The pilot's
    values decide only the size; the measurement that is reported is taken afresh, so its interval keeps its
    coverage (a stopping rule that reused the pilot would not).

    Args:
        pilot: gram_estimates (or measurement) of the pilot.
        pilot_micro_batches: M_0.
        relative_half_width: r, the half-width of the interval wanted, as a fraction of |G|^2.

    Returns:
        M (a float, inf when the pilot's |G|^2 is not positive).
    """
    if pilot["norm_sq"] <= 0:
        return math.inf
    q = quantile(pilot_micro_batches - 1, confidence)
    fraction = pilot.get("sampling_fraction", 0.0)
    if fraction >= 1:  # the pilot was the whole population: |G|^2 is exact, no more micro-batches help
        return float(pilot_micro_batches)
    variance = q**2 * pilot_micro_batches * pilot["norm_sq_se"] ** 2 / (1 - fraction)
    return variance / ((relative_half_width * pilot["norm_sq"]) ** 2 + variance * fraction / pilot_micro_batches)


def _correlation(covariance, se_a, se_b):
    return covariance / (se_a * se_b) if se_a > 0 and se_b > 0 else 0.0


def pool(records, first_step: int = 0, last_step: float = math.inf, *, batch_size: int | None = None,
         confidence: float = CONFIDENCE) -> dict | None:
    """tr(Sigma), |G|^2, B_simple, batch_std and SNR with intervals, pooled over the measurements in a step window.

    Args:
        records: grad_stats.jsonl records (dicts with "step", "micro_batches" or "degrees_of_freedom", "batch_size",
            "grad/trace_cov",
            "grad/norm_sq", "grad/trace_cov_se", "grad/norm_sq_se", "grad/trace_norm_sq_corr").
        first_step, last_step: The window, inclusive, in steps.
        batch_size: B for batch_std and SNR (default: the records' batch_size).
        confidence: Two-sided confidence of the intervals.

    Returns:
        {"trace_cov", "trace_cov_lo", "trace_cov_hi", ..., "noise_scale_is_lower_bound", "measurements",
        "first_step", "last_step"} (the steps of the first and last measurement pooled), or None when the window
        holds no measurement.
    """
    chosen = [r for r in records if first_step <= r["step"] <= last_step and r.get("grad/trace_cov") is not None]
    if not chosen:
        return None
    k = len(chosen)
    trace = np.array([r["grad/trace_cov"] for r in chosen], np.float64)
    norm_sq = np.array([r["grad/norm_sq"] for r in chosen], np.float64)
    trace_se = np.array([r["grad/trace_cov_se"] for r in chosen], np.float64)
    norm_sq_se = np.array([r["grad/norm_sq_se"] for r in chosen], np.float64)
    correlation = np.array([r.get("grad/trace_norm_sq_corr") or 0.0 for r in chosen], np.float64)
    q = quantile(sum(r.get("degrees_of_freedom") or r["micro_batches"] - 1 for r in chosen), confidence)
    result = derive(trace.mean(), norm_sq.mean(), np.sum(trace_se**2) / k**2, np.sum(norm_sq_se**2) / k**2,
                    np.sum(correlation * trace_se * norm_sq_se) / k**2, q, batch_size or chosen[-1]["batch_size"])
    result.update(measurements=k, first_step=chosen[0]["step"], last_step=chosen[-1]["step"])
    return result


def two_batch_estimates(small_norm_sq, big_norm_sq, small_batch: int, big_batch: int,
                        population: int | None = None):
    """Per-step (tr(Sigma), |G|^2) from squared gradient norms at two batch sizes (the module docstring).

    Args:
        small_norm_sq: S, the mean squared norm of gradients over small_batch examples (array, one per step).
        big_norm_sq: L, the squared norm of the gradient over big_batch examples at the same steps.
        small_batch, big_batch: b < B.
        population: Examples N both batches were drawn from without replacement, or None (infinite).
    """
    if not 0 < small_batch < big_batch:
        raise ValueError(f"small_batch: needs 0 < small_batch < big_batch, got {small_batch} and {big_batch}")
    small, big = np.asarray(small_norm_sq, np.float64), np.asarray(big_norm_sq, np.float64)
    trace = (small - big) / (1 / small_batch - 1 / big_batch)
    norm_sq = (big_batch * big - small_batch * small) / (big_batch - small_batch)
    return trace, norm_sq + (trace / population if population else 0.0)


def step_means(trace, norm_sq, batch_size: int, confidence: float = CONFIDENCE, steps: int | None = None) -> dict:
    """KEYS with intervals (see derive) of the mean of the last K per-step estimates, with their standard errors.

    Args:
        trace, norm_sq: The per-step estimates of V >= 2 steps, the last K of them the steps averaged.
        steps: K (default: all V). The variances and covariance of the mean are the V steps' sample (co)variance
            / K, with t_{V-1} quantiles: with V > K the scatter of the per-step estimates is taken from more steps
            than the mean (the module docstring of callbacks/replica_gradient_stats.py says why).

    Returns:
        derive's record plus "trace_cov_se", "norm_sq_se", "trace_norm_sq_corr", "degrees_of_freedom" (V - 1).
    """
    trace, norm_sq = np.asarray(trace, np.float64), np.asarray(norm_sq, np.float64)
    v = len(trace)
    k = v if steps is None else int(steps)
    if v < 2 or len(norm_sq) != v or not 1 <= k <= v:
        raise ValueError(f"trace: needs at least 2 steps' estimates (as many of norm_sq, and steps in 1..{v}), got {v} "
                         f"and steps={steps!r}")
    covariance = np.cov(np.stack([trace, norm_sq])) / k  # of the means
    trace_se, norm_sq_se = math.sqrt(covariance[0, 0]), math.sqrt(covariance[1, 1])
    record = derive(trace[-k:].mean(), norm_sq[-k:].mean(), covariance[0, 0], covariance[1, 1], covariance[0, 1],
                    quantile(v - 1, confidence), batch_size)
    record.update(trace_cov_se=trace_se, norm_sq_se=norm_sq_se, degrees_of_freedom=v - 1,
                  trace_norm_sq_corr=_correlation(covariance[0, 1], trace_se, norm_sq_se))
    return record
