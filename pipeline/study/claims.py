"""Sentences that state a measured difference or fit only as far as its uncertainty supports it: a winner only where its
bootstrap interval (pipeline/study/bootstrap.py) lies below the runner-up's and above no censored batch's bound (runs
that never reached the target), and what each interval or standard error holds (the validation set's sampling noise,
the run-to-run spread over seeds, or the residuals, with "run-to-run spread unknown" for one seed)."""

from __future__ import annotations

from pipeline.study import bootstrap


def measured_text(group: dict, key: str, fmt: str, unit: str = "") -> str:
    """'68.4 s [60.1, 75.0]': a group's mean of `key` with its bootstrap interval, when it has one."""
    interval = (group.get("target_interval") or {}).get(key)
    return fmt.format(group[key]["mean"]) + unit + (f" {bootstrap.interval_text(interval, fmt)}" if interval else "")


def censored_text(group: dict, key: str, fmt: str, unit: str) -> str:
    """'batch 128 (2 of 2 runs did not reach the target: its mean is known only to exceed 40.0 s of training)'."""
    bound = group["censored_bound"][key]
    known = f"known only to exceed {fmt.format(bound)}{unit}" if bound is not None else "not bounded (no history)"
    return (f"batch {group['batch']} ({group['completed'] - group['reached']} of {group['completed']} runs did not "
            f"reach the target: its mean is {known})")


def winner_sentence(groups: list[dict], key: str, what: str, fmt: str, unit: str, censored: list[dict] = ()) -> str:
    """Which batch took `what` (the least mean `key`), said only when its interval lies below the runner-up's and no
    batch with runs that did not reach the target (censored) could still be below it.

    Args:
      groups: the batch sizes whose every run reached the target (one is enough when others are censored).
      censored: the batch sizes with runs that did not reach it.
    """
    result = bootstrap.winner(groups, key, censored)
    best, runner_up = result["best"], result["runner_up"]
    best_text = measured_text(best, key, fmt, unit)
    leader = (f"batch {best['batch']} leads the batch sizes that reached the target in every run" if runner_up else
              f"batch {best['batch']} is the only batch size that reached the target in every run")
    open_ = "; ".join(censored_text(g, key, fmt, unit) for g in result["not_ruled_out"])
    bounded = (", and below the bounds of the batch sizes whose runs did not all reach the target"
               if any(g.get("censored_bound") for g in censored) else "")
    if result["resolved"]:
        than = (f"that of the runner-up, batch {runner_up['batch']} ({measured_text(runner_up, key, fmt, unit)})"
                if runner_up else "the bounds of the batch sizes whose runs did not all reach the target")
        return (f"batch {best['batch']} took {what} ({best_text}); its {bootstrap.LEVEL:.0%} interval lies below "
                f"{than}{bounded if runner_up else ''}.")
    if result["separated"] and open_:
        return (f"which batch took {what} is not resolved: {leader} ({best_text}), but runs that did not reach it "
                f"leave open {open_}.")
    if result["resolved"] is False:
        return (f"which batch took {what} is not resolved: batch {best['batch']} and {runner_up['batch']} are not "
                f"distinguishable ({best_text} and {measured_text(runner_up, key, fmt, unit)}: their "
                f"{bootstrap.LEVEL:.0%} intervals overlap)"
                + (f"; runs that did not reach the target also leave open {open_}." if open_ else "."))
    others = (f"the runner-up, batch {runner_up['batch']}, {measured_text(runner_up, key, fmt, unit)}" if runner_up
              else "the batch sizes whose runs did not all reach the target only bounds")
    return (f"which batch took {what} is not determined: batch {best['batch']} measured {best_text} and {others}, "
            "with no interval (the runs hold no record of which validation examples each target check got right).")


def fit_interval_text(report, fit) -> str:
    """'; bootstrap 95% intervals ...' of the S(B) fit, or why it has none; ends the fit's sentence."""
    resampled = fit.get("steps_to_target_interval")
    if not resampled:
        return "; no bootstrap interval (a batch size's runs hold no record of their target checks' examples)."
    spread = ("the validation noise and the run-to-run spread over seeds" if report.get("run_to_run_known") else
              "the validation noise only: run-to-run spread is unknown with one seed")
    invalid = (f"; {resampled['invalid']:.0%} of the draws gave S_min <= 0, an unbounded B_crit"
               if resampled["invalid"] else "")
    rerun = resampled.get("b_crit_rerun")
    if rerun:
        low = "0" if rerun[0] is None else f"{rerun[0]:.3g}"
        high = "unbounded" if rerun[1] is None else f"{rerun[1]:.3g}"
        rerun_text = (f"; a rerun of this sweep would give B_crit in [{low}, {high}] ({bootstrap.LEVEL:.0%}: the "
                      "spread of the ratio of two independent estimates)")
    else:
        rerun_text = ""
    return (f"; {bootstrap.LEVEL:.0%} bootstrap intervals S_min {bootstrap.interval_text(resampled['s_min'])} steps "
            f"and B_crit {bootstrap.interval_text(resampled['b_crit'], '{:.3g}')} ({spread}{invalid}){rerun_text}.")


def spread_note(report: dict) -> str:
    """What the bracketed intervals of the table hold, and whether run-to-run spread is known."""
    level = f"{bootstrap.LEVEL:.0%}"
    text = (f"[low, high]: {level} bootstrap interval of the mean over seeds ({bootstrap.RESAMPLES} resamples of the "
            f"validation examples, seed {bootstrap.SEED}; pipeline/study/bootstrap.py); \"unbounded\": more than "
            f"{(1 - bootstrap.LEVEL) / 2:.1%} of the resamples crossed the target at no recorded check.")
    if report.get("run_to_run_known"):
        spreads = {g["norm"]: g["target_interval"]["seed_spread"] for g in report["groups"]
                   if (g.get("target_interval") or {}).get("seed_spread")}
        vary = "; ".join(f"{s['relative_std']:.0%} from seed to seed ({s['dof']} degrees of freedom)"
                         + (f" with {norm} normalization" if len(spreads) > 1 else "") for norm, s in spreads.items())
        return text + (" The intervals include the run-to-run spread over seeds: every draw also deviates by a "
                       f"Student-t draw of the seeds' spread pooled over the batch sizes (steps to target vary {vary}).")
    return text + (" Run-to-run spread is unknown: one seed per batch size reached the target, so the intervals "
                   "hold only the validation set's sampling noise; rerun with --seeds 2 or more to measure it.")


def censored_sentences(groups: list[dict], prefix: str) -> list[str]:
    """What the steps-to-target fits leave out: the batch sizes with runs that did not reach the target (censored,
    their steps known only from below), named with how many runs and the bound."""
    left_out = [g for g in groups if g["completed"] and g["reached"] < g["completed"]]
    if not left_out:
        return []
    bounds = [(g.get("censored_bound") or {}).get("steps_to_target") for g in left_out]
    which = "; ".join(f"batch {g['batch']}: {g['completed'] - g['reached']} of {g['completed']} runs"
                      + (f", steps to target above {bound:.0f} on average" if bound is not None else "")
                      for g, bound in zip(left_out, bounds))
    return [f"{prefix}the slope, the onset and the S(B) fit of steps to target leave out the batch sizes whose runs "
            f"did not all reach the target (censored: their steps are known only from below; {which})."]


def error_source(fit: dict) -> str:
    """Which spread a power law's standard error holds (fits.fit_power_law: the larger of the seeds' and the
    residuals'), or that the run-to-run spread is unknown."""
    if fit.get("replicate_se") is None:
        return "residual standard error; run-to-run spread unknown with one seed"
    if fit["replicate_se"] >= fit["residual_se"]:
        return f"standard error from the seeds' spread, {fit['replicate_dof']} degrees of freedom"
    return "residual standard error, larger than the seeds' spread"


def binomial_note(*stats) -> str:
    """Where fits.difference_noise fell back on the test set's binomial error: one seed, run-to-run spread unknown."""
    if all(s["std"] is not None for s in stats):
        return ""
    return "; binomial over the test examples, one seed: run-to-run spread unknown"


def stat_text(stat: dict, fmt: str = "{:.3g}") -> str:
    """'0.95 ± 0.01': a mean over seeds with its standard deviation (the mean alone with one seed)."""
    return fmt.format(stat["mean"]) + (f" ± {fmt.format(stat['std'])}" if stat["std"] is not None else "")
