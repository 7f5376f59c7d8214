"""The statistics behind a sweep's findings: fits with standard errors, directions, pooled noise scales.

Steps to target follow S(B) = S_min (1 + B_crit / B) (McCandlish et al. 2018: their trade-off
(S / S_min - 1)(E / E_min - 1) = 1 with E = B S examples and B_crit = E_min / S_min). S is linear in 1/B,
S = a + b / B with S_min = a and B_crit = b / a, so the fit is a least-squares line, weighted by 1/S so that
every batch size counts by its relative error. Power laws value = c B^slope are least-squares lines in log-log.
Standard errors are the usual least-squares ones, sigma^2 (X^T X)^-1 with sigma^2 = RSS / (n - 2) from the
residuals, so a fit needs n >= 3 points to have one (two points fit any line exactly); B_crit = b / a gets its
error by the delta method. A direction ("falls", "rises") is called only when the slope's 95% interval, slope +- q
standard errors with q the Student t quantile of the standard error's degrees of freedom (n - 2 for the residuals',
the pooled seeds' for theirs: `slope_q`, `slope_dof`), excludes 0; otherwise it is "unclear". A standard error from
two residual degrees of freedom is itself uncertain (q = 4.30, not 2): a fixed 2 would call directions that a rerun
overturns.

Run-to-run spread in a power law (gradient std, time per step, BN discrepancy against B): each point is the mean
over n_b seeds, so log(mean) has variance v / n_b with v the seeds' relative variance, pooled over the batch sizes
with two or more seeds, v = sum (n_b - 1) (s_b / m_b)^2 / sum (n_b - 1) (s_b the seeds' sample std, m_b their mean;
the delta method var(log x) ~ var(x) / x^2). The line is fitted with weights w_b = n_b / v (weighted least squares),
slope = sum w (x - xbar)(y - ybar) / sum w (x - xbar)^2, whose standard error from the seeds alone is
sqrt(v / sum n (x - xbar)^2). The slope's standard error is the larger of that and the residuals' (the Birge ratio:
the seeds' spread cannot make a fit more certain than its scatter about the line shows, nor a line through few
points more certain than its seeds allow). With one seed per batch size only the residuals' error exists and the
run-to-run spread is unknown ("replicate_se" None). A quantity that may be 0 or negative (the generalization gap)
is fitted the same way as value = a + slope ln B, with v the seeds' variance itself (pooled_variance).

B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018, eq. 2.8) pooled over a window of a run's measurements is
callbacks.noise_estimates.pool (the one estimator: the ratio of the window's mean tr(Sigma) to its mean |G|^2,
with the 95% interval from the measurements' own jackknife errors and Fieller's interval for the ratio). Here it is
only put into the report's JSON form: an unbounded interval (|G|^2 not distinguishable from 0) has no point value
and no upper end (None), and its lower end is the bound.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

Z = 2.0  # standard errors for a difference or an interval of a normal estimate (about 95%)
LEVEL = 0.95  # two-sided confidence of a slope's or a difference's interval (its t quantile: t_quantile)
MIN_FIT_POINTS = 3  # points a fit needs to have a standard error


def fit_steps_to_target(batches, steps) -> dict | None:
    """Fits S(B) = S_min (1 + B_crit / B) as S = a + b / B, least squares weighted by 1 / S.

    Returns:
      {"s_min", "b_crit", "e_min", "s_min_se", "b_crit_se", "points", "valid", "determined"}, or None for fewer
      than two batch sizes. valid: S_min > 0 and B_crit >= 0. determined: valid and >= MIN_FIT_POINTS points
      (the standard errors are None otherwise).
    """
    batches, steps = np.asarray(batches, float), np.asarray(steps, float)
    n = len(set(batches.tolist()))
    if n < 2:
        return None
    design = np.stack([np.ones_like(batches), 1 / batches], axis=1) / steps[:, None]
    (a, b), *_ = np.linalg.lstsq(design, np.ones_like(steps), rcond=None)
    valid = bool(a > 0 and b >= 0)
    result = {"s_min": float(a), "b_crit": float(b / a) if a > 0 else None, "e_min": float(b) if valid else None,
              "s_min_se": None, "b_crit_se": None, "points": len(batches), "valid": valid,
              "determined": valid and len(batches) >= MIN_FIT_POINTS}
    if len(batches) >= MIN_FIT_POINTS:
        residuals = design @ np.array([a, b]) - 1
        covariance = residuals @ residuals / (len(batches) - 2) * np.linalg.inv(design.T @ design)
        result["s_min_se"] = float(math.sqrt(covariance[0, 0]))
        if a > 0:  # delta method for b / a: gradient (-b / a^2, 1 / a)
            gradient = np.array([-b / a**2, 1 / a])
            result["b_crit_se"] = float(math.sqrt(max(gradient @ covariance @ gradient, 0.0)))
    return result


def fit_power_law(batches, values, seeds=None, replicate=None) -> dict | None:
    """log(value) = log(c) + slope * log(B) by least squares, weighted by the seeds behind each point.

    Args:
      batches, values: the points (values: means over seeds).
      seeds: seeds behind each value (weights n_b; default 1 each).
      replicate: replicate_spread() of the points' seeds, or None (one seed: run-to-run spread unknown).

    Returns:
      fit_line's result on (log B, log value) with "c" = exp(intercept), or None for fewer than 2 batch sizes or a
      non-positive value.
    """
    batches, values = np.asarray(batches, float), np.asarray(values, float)
    if len(set(batches.tolist())) < 2 or np.any(values <= 0):
        return None
    result = fit_line(np.log(batches), np.log(values), seeds, replicate)
    result["c"] = float(np.exp(result.pop("intercept")))
    return result


def fit_line(x, y, seeds=None, replicate=None) -> dict:
    """y = intercept + slope * x by least squares weighted by the seeds n_b behind each point (module docstring:
    the slope's standard error is the larger of the seeds' and the residuals').

    Args:
      x, y: the points (y: means over seeds), at least 2 distinct x.
      seeds: seeds behind each y (default 1 each).
      replicate: {"variance": v, "dof"}: the seeds' variance of one run's y, pooled over the points (so a mean of
        n_b seeds has variance v / n_b), or None (one seed: run-to-run spread unknown).

    Returns:
      {"slope", "intercept", "slope_se", "residual_se", "replicate_se", "replicate_dof", "slope_dof", "slope_q",
      "points", "determined", "direction"}. slope_se is None and direction "not determined" with fewer than
      MIN_FIT_POINTS points; otherwise direction is "falls", "rises" or "unclear" (slope within slope_q standard
      errors of 0; slope_q the t quantile of slope_dof, the degrees of freedom of the larger error).
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    weights = np.ones_like(x) if seeds is None else np.asarray(seeds, float)
    x_mean, y_mean = np.average(x, weights=weights), np.average(y, weights=weights)
    spread_x = np.sum(weights * (x - x_mean) ** 2)
    slope = float(np.sum(weights * (x - x_mean) * (y - y_mean)) / spread_x)
    intercept = float(y_mean - slope * x_mean)
    result = {"slope": slope, "intercept": intercept, "points": len(x), "slope_se": None, "residual_se": None,
              "replicate_se": None, "replicate_dof": replicate["dof"] if replicate else 0, "slope_dof": None,
              "slope_q": None,
              "determined": len(x) >= MIN_FIT_POINTS, "direction": "not determined"}
    if replicate:
        result["replicate_se"] = float(math.sqrt(replicate["variance"] / spread_x))
    if result["determined"]:
        residuals = y - (intercept + slope * x)
        result["residual_se"] = float(math.sqrt(np.sum(weights * residuals**2) / (len(x) - 2) / spread_x))
        result["slope_se"] = max(result["residual_se"], result["replicate_se"] or 0.0)
        residual = result["replicate_se"] is None or result["residual_se"] >= result["replicate_se"]
        result["slope_dof"] = len(x) - 2 if residual else result["replicate_dof"]
        result["slope_q"] = t_quantile(result["slope_dof"])
        result["direction"] = direction(slope, result["slope_se"], result["slope_q"])
    return result


def replicate_spread(stats: list[dict]) -> dict | None:
    """The seeds' relative variance v of one quantity pooled over the groups with two or more seeds (module
    docstring), or None when no group has two.

    Args:
      stats: per group {"mean", "std", "n"} (sweep_report.aggregate's statistics over seeds).

    Returns:
      {"variance": v, "dof": sum (n_b - 1)}.
    """
    pooled = pooled_variance([{"std": s["std"] / s["mean"], "n": s["n"]}
                              for s in stats if s["std"] is not None and s["mean"]])
    return pooled and {"variance": pooled["variance"], "dof": pooled["dof"]}


def fit_over_seeds(points: list[tuple[float, dict]], log: bool = True) -> dict | None:
    """The line over (batch, statistics over seeds) points, weighted by their seeds and with their spread: a power
    law (fit_power_law, relative spread) when log, else value = intercept + slope * ln B (fit_line, the seeds'
    variance pooled as it is). None without points, or with fewer than 2 batch sizes."""
    if not points:
        return None
    batches, stats = zip(*points)
    means = [s["mean"] for s in stats]
    seeds = [s["n"] for s in stats]
    if log:
        return fit_power_law(batches, means, seeds, replicate_spread(stats))
    if len(set(batches)) < 2:
        return None
    return fit_line(np.log(np.asarray(batches, float)), means, seeds, pooled_variance(stats))


def t_quantile(dof: float) -> float:
    """The two-sided LEVEL Student t quantile on `dof` degrees of freedom (the normal one for infinite dof): that of
    callbacks.noise_estimates.quantile, written here because importing the callbacks package loads TensorFlow."""
    return float(stats.t.ppf(0.5 + LEVEL / 2, dof))


def band(fit: dict) -> str:
    """'3.2 standard errors, the 95% t quantile on 3 degrees of freedom': a determined slope's interval half-width."""
    return f"{fit['slope_q']:.1f} standard errors, the 95% t quantile on {fit['slope_dof']} degrees of freedom"


def direction(slope: float, se: float, q: float) -> str:
    """"falls" or "rises" when the slope is more than q standard errors from 0, else "unclear"."""
    if slope + q * se < 0:
        return "falls"
    if slope - q * se > 0:
        return "rises"
    return "unclear"


def agrees(fit: dict, expected: float) -> bool | None:
    """Whether a determined slope is within its slope_q standard errors of `expected` (None if not determined)."""
    if not fit or not fit["determined"]:
        return None
    return abs(fit["slope"] - expected) <= fit["slope_q"] * fit["slope_se"]


def diminishing_returns(batches, steps, threshold: float = 0.5) -> int | None:
    """The smallest batch from which every step to a larger measured batch scales less than `threshold` as well as perfect.

    The scaling efficiency of going from B1 to B2 is log(S1 / S2) / log(B2 / B1): 1 for perfect scaling (steps
    halve when the batch doubles), 0 when steps stay the same. Requiring every later step, not just one, to be
    below the threshold keeps one noisy measurement from deciding.
    """
    efficiencies = [math.log(s1 / s2) / math.log(b2 / b1) if s2 > 0 else 0.0
                    for b1, b2, s1, s2 in zip(batches, batches[1:], steps, steps[1:])]
    onset = None
    for i in reversed(range(len(efficiencies))):
        if efficiencies[i] >= threshold:
            break
        onset = batches[i]
    return onset


def pooled_noise_scale(records: list[dict], first_step: float, last_step: float) -> dict | None:
    """B_simple pooled over the measurements with first_step <= step <= last_step, by noise_estimates.pool.

    Args:
      records: grad_stats.jsonl records (those without the per-measurement standard errors, written before
        measurements had intervals, are left out).
      first_step, last_step: the window, inclusive.

    Returns:
      {"first_step", "last_step" (the window), "measurements", "trace_cov", "norm_sq", "noise_scale",
      "noise_scale_lo", "noise_scale_hi"}: when |G|^2 is not distinguishable from 0, noise_scale and
      noise_scale_hi are None and noise_scale_lo is the lower bound. None for a window without measurements.
    """
    from callbacks import noise_estimates  # here: the callbacks package imports Keras, and with it TensorFlow

    usable = [r for r in records if r.get("grad/trace_cov_se") is not None and r.get("grad/norm_sq_se") is not None]
    pooled = noise_estimates.pool(usable, first_step, last_step)
    if pooled is None:
        return None
    bound = pooled["noise_scale_is_lower_bound"]
    return {"first_step": first_step, "last_step": last_step, "measurements": pooled["measurements"],
            "trace_cov": pooled["trace_cov"], "norm_sq": pooled["norm_sq"],
            "noise_scale": None if bound else pooled["noise_scale"],
            "noise_scale_lo": pooled["noise_scale_lo"] if math.isfinite(pooled["noise_scale_lo"]) else None,
            "noise_scale_hi": None if bound or not math.isfinite(pooled["noise_scale_hi"])
            else pooled["noise_scale_hi"]}


def interval_union(windows: list[dict | None]) -> dict | None:
    """The union [low, high] of the bounded B_simple intervals among pooled windows, and how many were unbounded
    (|G|^2 not distinguishable from 0); None when no window has an interval."""
    with_interval = [w for w in windows if w and w["noise_scale_lo"] is not None]
    bounded = [w for w in with_interval if w["noise_scale_hi"] is not None]
    if not with_interval:
        return None
    return {"low": min(w["noise_scale_lo"] for w in bounded) if bounded else None,
            "high": max(w["noise_scale_hi"] for w in bounded) if bounded else None, "runs": len(bounded),
            "unbounded": len(with_interval) - len(bounded),
            "lower_bounds": sorted(w["noise_scale_lo"] for w in with_interval if w["noise_scale_hi"] is None)}


def noise_growth(records: list[dict], last_step: int, fraction: float = 0.25) -> dict:
    """Whether B_simple grew from the first to the last `fraction` of a run's steps, pooled over each window.

    Returns:
      {"early", "late" (pooled_noise_scale results or None), "verdict"}: "grew" when the late interval lies above
      the early one, "fell" when below, "unclear" when they overlap, "not enough data" without an interval in
      both windows.
    """
    early = pooled_noise_scale(records, 0, fraction * last_step)
    late = pooled_noise_scale(records, (1 - fraction) * last_step, last_step)
    verdict = "not enough data"
    if early and late and early["noise_scale_lo"] is not None and late["noise_scale_lo"] is not None:
        early_hi, late_hi = (w["noise_scale_hi"] if w["noise_scale_hi"] is not None else math.inf
                             for w in (early, late))
        if late["noise_scale_lo"] > early_hi:
            verdict = "grew"
        elif late_hi < early["noise_scale_lo"]:
            verdict = "fell"
        else:
            verdict = "unclear"
    return {"early": early, "late": late, "verdict": verdict}


def series(groups, norm, key, require_all_reached=False):
    """(batches, means) of one quantity for one normalization, optionally only where every run reached the target."""
    points = [(g["batch"], g[key]["mean"]) for g in groups if g["norm"] == norm and g[key]["mean"] is not None
              and (not require_all_reached or g["reached"] == g["completed"])]
    return [b for b, _ in points], [v for _, v in points]


def seed_series(groups, norm, key) -> list[tuple[int, dict]]:
    """(batch, statistics over seeds) of one quantity for one normalization, where it was measured."""
    return [(g["batch"], g[key]) for g in groups if g["norm"] == norm and g[key]["mean"] is not None]


def per_norm(groups: list[dict]) -> dict:
    """Per norm: the S(B) fit, the power laws of steps, gradient std, time per step and BN discrepancy against B,
    and the range of B_simple near the target over batch sizes."""
    result = {}
    for norm in dict.fromkeys(g["norm"] for g in groups):
        noise = series(groups, norm, "noise_scale")[1]
        result[norm] = {
            "steps_to_target": fit_steps_to_target(*series(groups, norm, "steps_to_target", True)),
            "grad_std": fit_over_seeds(seed_series(groups, norm, "grad_std")),
            "time_per_step": fit_over_seeds(seed_series(groups, norm, "time_per_step_ms")),
            "bn_batch_var_error": fit_over_seeds(seed_series(groups, norm, "bn_batch_var_error")),
            "b_simple": {"median": float(np.median(noise)), "low": min(noise), "high": max(noise),
                         "batches": len(noise)} if noise else None,
        }
    return result


def per_device_batch(groups: list[dict]) -> dict:
    """Per norm of a sweep over replica counts: BatchNorm's batch-vs-population variance discrepancy against the
    BN batch, the examples one BN layer normalizes over (B / R per replica; B with syncbatch), as a power law
    (sampling noise predicts bn_batch^-0.5, as against B in a one-device sweep)."""
    result = {}
    for norm in dict.fromkeys(g["norm"] for g in groups):
        points = sorted(((g["bn_batch"], g["bn_batch_var_error"]) for g in groups
                         if g["norm"] == norm and g["bn_batch_var_error"]["mean"] is not None), key=lambda p: p[0])
        result[norm] = {"bn_batches": sorted({b for b, _ in points}), "bn_batch_var_error": fit_over_seeds(points)}
    return result


def difference_noise(a: dict, b: dict, num_test: int | None, pool=()) -> float | None:
    """Standard error of the difference of two mean accuracies.

    With seeds, their variance pooled over the groups of `pool` (stats of the same series, a and b among them):
    s^2 = sum (n_i - 1) s_i^2 / sum (n_i - 1) and SE = s sqrt(1 / n_a + 1 / n_b); a group's own std from two seeds
    has one degree of freedom, and two seeds that happen to agree would give it none at all. Without a pool, each
    mean's own std / sqrt(n). With one seed, the binomial standard error sqrt(p (1 - p) / N) of one run on N test
    examples."""
    pooled = pooled_variance(pool)
    if pooled and a["std"] is not None and b["std"] is not None:
        return math.sqrt(pooled["variance"] * (1 / a["n"] + 1 / b["n"]))
    errors = []
    for stat in (a, b):
        if stat["std"] is not None:
            errors.append(stat["std"] / math.sqrt(stat["n"]))
        elif num_test:
            errors.append(math.sqrt(stat["mean"] * (1 - stat["mean"]) / num_test))
        else:
            return None
    return math.hypot(*errors)


def difference_quantile(a: dict, b: dict, pool=()) -> tuple[float, int | None]:
    """(q, dof) for difference_noise's error of a and b: the 95% t quantile of the pool's degrees of freedom (of the
    fewer seeds' n - 1 without a pool), or the normal 1.96 (dof None) for the test set's binomial error."""
    pooled = pooled_variance(pool)
    dof = None if a["std"] is None or b["std"] is None else pooled["dof"] if pooled else min(a["n"], b["n"]) - 1
    return t_quantile(math.inf if dof is None else dof), dof


def pooled_variance(stats) -> dict | None:
    """{"variance": sum (n_i - 1) s_i^2 / sum (n_i - 1), "dof": sum (n_i - 1), "groups"} over the stats (dicts with
    "std" and "n") that have a std; None without any."""
    known = [s for s in stats if s["std"] is not None and s["n"] > 1]
    dof = sum(s["n"] - 1 for s in known)
    if not dof:
        return None
    return {"variance": sum((s["n"] - 1) * s["std"] ** 2 for s in known) / dof, "dof": dof, "groups": len(known)}
