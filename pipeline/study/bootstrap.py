"""Bootstrap intervals of a sweep: steps, epochs and time to target within a run, and across runs for fits and winners.

Within a run (validation noise): the run's target checks recorded which validation examples each classified
correctly (pipeline/training/target_record.py). A resample draws N of the N validation examples with replacement; its
accuracy at check c is the mean correctness of the drawn examples, and its first crossing is the first check with
accuracy >= target. RESAMPLES resamples with the fixed SEED give RESAMPLES first crossings; the interval is their
LEVEL percentile interval (lower end rounded down, upper end up, to recorded checks), mapped to steps, epochs and
time at those checks. Every run of a sweep on the same validation split gets the same resampled examples (the same
seed and size), so resample r is one alternative validation set for all runs: paired, as the runs share the split.
A resample that crosses at no recorded check counts as crossing at the last one (a lower bound), and the interval's
upper end is then unbounded if more than (1 - LEVEL) / 2 of them did.

Across runs (run-to-run spread): the seeds' relative variance v of each quantity is pooled over the batch sizes of
one series (one norm and replica count) by fits.replicate_spread, v = sum (n_b - 1) (s_b / m_b)^2 / sum (n_b - 1)
(the variance of log x by the delta method), with dof = sum (n_b - 1). Per (norm, batch) with n_b seeds, draw r is

    draw_r = mean over the seeds of their resample r x exp(t_r sqrt(v / n_b)),  t_r ~ Student-t(dof),

a parametric bootstrap of the mean over seeds on the log scale (t_r is drawn once per group and draw, shared by steps,
epochs and time). The two factors do not count one noise twice: resample r is an alternative validation set shared by
all runs, which the seeds' spread (measured on the one split) cannot show, and the t factor is the spread of training
itself. Pooling and Student-t keep few seeds honest: Efron's bootstrap over 2 seeds draws the same seed twice half the
time (variance factor (n - 1) / n) and gives a batch whose 2 seeds happen to agree no spread at all, so its intervals
cover the truth far less often than LEVEL (tests/study/test_bootstrap.py measures both). With one seed per batch size
(dof 0) draw r is that run's resample r, which holds the validation noise only, and run-to-run spread is unknown.
Fits (the S(B) fit and the power law of steps) are refitted to every draw r over the batches; their intervals are
the LEVEL percentile intervals of the refitted values. So both the validation noise and the seeds' spread widen them.

A winner (least time, fewest steps) is named only when its interval lies below the runner-up's without overlap.

Where a rerun lands: a confidence interval holds the true B_crit, not another sweep's estimate. Two independent
estimates with equal errors differ by sqrt(2) times one's error, so a rerun's B_crit falls outside this sweep's 95%
interval about 17% of the time even when both are right. The rerun interval is B_crit x the LEVEL percentile interval
of b_i / b_j over all ordered pairs i != j of the draws (`rerun_factors`): the spread of the ratio of two independent
estimates, on the log scale where B_crit's draws are about symmetric (tests/study/test_bootstrap.py checks, on
simulated reruns, that it holds another sweep's estimate about LEVEL of the time).
"""

from __future__ import annotations

import math

import numpy as np

from pipeline import run_timing
from pipeline.study import fits as fits_lib

RESAMPLES = 1000  # bootstrap resamples of the validation examples, and Student-t draws of the seeds' spread
SEED = 0  # seed of the resampling, fixed so that a report rebuilt from the same runs is the same
LEVEL = 0.95  # coverage of the percentile intervals
CHUNK = 200  # resamples computed at once (a CHUNK x N matrix of counts)
TARGET_KEYS = ("steps_to_target", "epochs_to_target", "time_to_target_s")


def resample_counts(examples: int, resamples: int = RESAMPLES, seed: int = SEED):
    """Yields (r, examples) matrices of how often each example was drawn, CHUNK resamples at a time.

    The draws are rng.integers(0, examples, size=examples) per resample, in order, from default_rng(seed).
    """
    rng = np.random.default_rng(seed)
    for start in range(0, resamples, CHUNK):
        rows = min(CHUNK, resamples - start)
        drawn = rng.integers(0, examples, size=(rows, examples))
        counts = np.zeros((rows, examples), np.float64)
        np.add.at(counts, (np.arange(rows)[:, None], drawn), 1.0)
        yield counts


def first_crossings(correct, target: float, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """Per resample, the index of the first check whose resampled accuracy is >= target (C: none crosses).

    Args:
      correct: (C, N) bool, whether validation example n was right at check c.
      target: the target accuracy.
    """
    correct = np.asarray(correct, np.float64)
    checks, examples = correct.shape
    found = []
    for counts in resample_counts(examples, resamples, seed):
        crossed = counts @ correct.T >= target * examples - 1e-9  # (r, C): correct draws >= target x N
        found.append(np.where(crossed.any(axis=1), crossed.argmax(axis=1), checks))
    return np.concatenate(found)


def percentile_interval(values, level: float = LEVEL) -> tuple[float, float]:
    """The level percentile interval of `values`: lower end rounded down, upper end up, to values that occur."""
    tail = (1 - level) / 2
    values = np.asarray(values, np.float64)
    return float(np.quantile(values, tail, method="lower")), float(np.quantile(values, 1 - tail, method="higher"))


def run_draws(record: dict | None, history: list[dict]) -> dict | None:
    """Per target quantity, one value per resample from a run's target_checks.npz, and its interval.

    Returns:
      None without a record or a crossing; else {"draws": {key: (RESAMPLES,) array}, "intervals": {key: [low, high
      or None]}, "beyond_record": fraction of resamples that crossed at no recorded check, "checks", "val_examples"}.
    """
    if record is None or not len(record["steps"]):
        return None
    correct = record["correct"]
    if not np.any(correct.mean(axis=1) >= record["target"]):
        return None
    index = first_crossings(correct, record["target"])
    checks = len(record["steps"])
    values = {
        "steps_to_target": record["steps"].astype(np.float64),
        "epochs_to_target": record["epochs"] + record["epoch_fractions"],
        "time_to_target_s": np.array([run_timing.time_to_target(history, {"epoch": int(e), "seconds_into_epoch": float(s)})
                                      for e, s in zip(record["epochs"], record["seconds_into_epoch"])]),
    }
    beyond = float(np.mean(index == checks))
    low, high = percentile_interval(index)
    draws, intervals = {}, {}
    for key, per_check in values.items():
        draws[key] = per_check[np.minimum(index, checks - 1)]  # beyond the record: the last check, a lower bound
        intervals[key] = [float(per_check[int(low)]) if low < checks else float(per_check[-1]),
                          float(per_check[int(high)]) if high < checks else None]
    return {"draws": draws, "intervals": intervals, "beyond_record": beyond, "checks": checks,
            "val_examples": int(correct.shape[1])}


def pooled_spread(values: list[list[float]]) -> dict | None:
    """fits.replicate_spread of one quantity over a series' groups, from each group's values over its seeds.

    Returns:
      {"variance": v, "dof"} (module docstring), or None when no group has two seeds.
    """
    values = [[x for x in v if x is not None] for v in values]  # a run without a time to target has no time
    return fits_lib.replicate_spread([{"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1
                                       else None, "n": len(v)} for v in values if v])


def group_draws(members: list[np.ndarray], spread: dict | None = None, t: np.ndarray | None = None) -> np.ndarray:
    """Draw r of a group's mean (module docstring): the mean over its seeds of their resample r, times
    exp(t_r sqrt(v / n_b)); without a pooled spread (one seed per batch size) the mean alone.

    Args:
      members: per seed, its draws (RESAMPLES,).
      spread: pooled_spread of the group's series, or None.
      t: (RESAMPLES,) Student-t draws on spread["dof"] degrees of freedom, when spread is given.
    """
    mean = np.stack(members).mean(axis=0)
    if spread is None:
        return mean
    return mean * np.exp(t * math.sqrt(spread["variance"] / len(members)))


def add_group_intervals(groups: list[dict], rows: list[dict]) -> dict:
    """Adds "target_interval" to every group whose runs that reached the target all have draws.

    group["target_interval"] = {key: [low, high or None] for TARGET_KEYS} | {"seeds": runs resampled,
    "beyond_record": largest fraction among them, "seed_spread": {"relative_std": sqrt(v), "dof"} of the steps, or
    None with one seed per batch size}, or None. The spread is pooled over the groups of one (norm, replicas).
    Returns {(norm, batch, replicas): {key: draws}} for the fits.
    """
    rng = np.random.default_rng(SEED + 1)
    series = {}
    for group in groups:
        members = [r for r in rows if (r["norm"], r["batch"], r["replicas"]) == (group["norm"], group["batch"],
                   group["replicas"]) and r["status"] == "completed" and r["steps_to_target"] is not None]
        group["target_interval"] = None
        if members and all(r.get("target_draws") is not None for r in members):
            series.setdefault((group["norm"], group["replicas"]), []).append((group, members))
    draws = {}
    for found in series.values():
        spreads = {key: pooled_spread([[r[key] for r in members] for _, members in found]) for key in TARGET_KEYS}
        for group, members in found:
            dof = (spreads["steps_to_target"] or {}).get("dof")
            t = rng.standard_t(dof, size=RESAMPLES) if dof else None
            mine = {key: group_draws([r["target_draws"]["draws"][key] for r in members],
                                     spreads[key] if t is not None else None, t) for key in TARGET_KEYS}
            draws[(group["norm"], group["batch"], group["replicas"])] = mine
            beyond = max(r["target_draws"]["beyond_record"] for r in members)
            steps = spreads["steps_to_target"]
            group["target_interval"] = {"seeds": len(members), "beyond_record": beyond, "seed_spread": {
                "relative_std": math.sqrt(steps["variance"]), "dof": steps["dof"]} if steps else None}
            for key in TARGET_KEYS:
                low, high = percentile_interval(mine[key])
                group["target_interval"][key] = [low, None if beyond > (1 - LEVEL) / 2 else high]
    return draws


def rerun_factors(values, level: float = LEVEL) -> list[float]:
    """[low, high]: the level percentile interval of values_i / values_j over all ordered pairs i != j (module
    docstring). A value <= 0 counts as 0 and an infinite one as unbounded; two alike give the ratio 1. The ends may be
    0 (unbounded below) and inf (unbounded above)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.log(np.maximum(np.asarray(values, np.float64), 0.0))
        ratios = np.subtract.outer(logs, logs)[~np.eye(len(logs), dtype=bool)]
    ratios[np.isnan(ratios)] = 0.0  # inf - inf, -inf - (-inf)
    low, high = percentile_interval(ratios, level)
    return [float(np.exp(low)), float(np.exp(high))]


def fit_intervals(batches: list[int], draws: list[np.ndarray]) -> dict:
    """The S(B) fit and the power law of steps refitted to every draw over the batches; their percentile intervals.

    Returns:
      {"b_crit": [low, high or None], "s_min": [low, high], "slope": [low, high], "direction", "invalid": fraction
      of draws whose line gave S_min <= 0 (B_crit unbounded: taken as +inf), "draws", "onsets": the share of draws
      per onset of diminishing returns (fits.diminishing_returns; key "None": no onset), "b_crit_rerun_factors":
      rerun_factors of the B_crit draws}.
    """
    stacked = np.stack(draws)  # (batches, RESAMPLES)
    b_crits, s_mins, slopes, onsets = [], [], [], []
    for column in stacked.T:
        onsets.append(fits_lib.diminishing_returns(batches, column.tolist()))
        fit = fits_lib.fit_steps_to_target(batches, column)
        s_mins.append(fit["s_min"])
        b_crits.append(fit["b_crit"] if fit["s_min"] > 0 else math.inf)
        slopes.append(np.polyfit(np.log(batches), np.log(column), 1)[0])
    b_low, b_high = percentile_interval(b_crits)
    slope = percentile_interval(slopes)
    return {"b_crit": [b_low if math.isfinite(b_low) else None, b_high if math.isfinite(b_high) else None],
            "s_min": list(percentile_interval(s_mins)), "slope": list(slope),
            "direction": "falls" if slope[1] < 0 else "rises" if slope[0] > 0 else "unclear",
            "invalid": float(np.mean(~np.isfinite(b_crits))), "draws": stacked.shape[1],
            "b_crit_rerun_factors": rerun_factors(b_crits),
            "onsets": {str(onset): onsets.count(onset) / len(onsets) for onset in sorted(set(onsets), key=str)}}


def fit_for_norm(groups: list[dict], norm: str, draws: dict, b_crit: float | None = None) -> dict | None:
    """fit_intervals over the batches of `norm` that reached the target in every run, when each has draws (from
    add_group_intervals) and there are fits.MIN_FIT_POINTS of them; else None. With the sweep's fitted `b_crit`
    (> 0), also "b_crit_rerun": [low or None, high or None], where a rerun's B_crit would fall (module docstring)."""
    batches, _ = fits_lib.series(groups, norm, "steps_to_target", True)
    keys = [(norm, batch, groups[0]["replicas"]) for batch in batches]
    if len(batches) < fits_lib.MIN_FIT_POINTS or any(key not in draws for key in keys):
        return None
    result = fit_intervals(batches, [draws[key]["steps_to_target"] for key in keys])
    if b_crit is not None and b_crit > 0:
        low, high = (b_crit * f for f in result["b_crit_rerun_factors"])
        result["b_crit_rerun"] = [low if low > 0 else None, high if math.isfinite(high) else None]
    return result


def winner(groups: list[dict], key: str, censored: list[dict] = ()) -> dict | None:
    """The group with the least mean `key` and whether its interval lies below the runner-up's.

    A censored group (a run that never reached the target: sweep_report.aggregate's "censored_bound", the lower bound
    of its mean) is not ruled out while that bound lies below the best's upper end; then the winner is not resolved.

    Args:
      groups: the groups whose every run reached the target.
      censored: groups with runs that did not reach it.

    Returns:
      None without a group, or with fewer than two groups and censored groups together; else {"best",
      "runner_up" (groups; runner_up None when the best is the only one that reached), "separated": the best's
      interval lies below the runner-up's, "not_ruled_out" (censored groups), "resolved": separated and nothing
      censored left open; None when either has no interval}.
    """
    ranked = sorted(groups, key=lambda g: g[key]["mean"])
    bounds = [(g, g["censored_bound"][key]) for g in censored if g.get("censored_bound")]
    if len(ranked) + len(bounds) < 2 or not ranked:
        return None
    best, runner_up = ranked[0], ranked[1] if len(ranked) > 1 else None
    intervals = [g.get("target_interval") for g in (best, runner_up) if g]
    best_high = intervals[0][key][1] if intervals[0] else best[key]["mean"]
    not_ruled_out = [g for g, bound in bounds if best_high is None or bound is None or bound < best_high]
    separated = all(intervals) and best_high is not None and (runner_up is None or best_high < intervals[1][key][0])
    return {"best": best, "runner_up": runner_up, "separated": separated, "not_ruled_out": not_ruled_out,
            "resolved": separated and not not_ruled_out if all(intervals) else None}


def interval_text(interval, fmt: str = "{:.0f}") -> str:
    """'[120, 160]', or '[120, beyond the record]' for an upper end that no recorded check bounds."""
    high = fmt.format(interval[1]) if interval[1] is not None else "unbounded"
    return f"[{fmt.format(interval[0])}, {high}]"


def run_to_run_known(groups: list[dict]) -> bool:
    """Whether some group has several seeds that reached the target, so that the intervals hold run-to-run spread."""
    return any((g.get("target_interval") or {}).get("seed_spread") for g in groups)
