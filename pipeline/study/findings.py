"""The sentences of a sweep's report, each computed from its numbers and answering one question.

`answers(report)` maps each question of QUESTIONS to its sentences (one per normalization where it applies).
A sentence that answers a yes/no question starts with "Yes", "No" or "Not enough data"; a fitted slope or the
S(B) fit comes with its standard error and number of points ("not determined" with fewer than
fits.MIN_FIT_POINTS); a direction with batch size is called from the data (fits.direction) and compared with
what the literature predicts, saying so when they disagree. "Least time" and "fewest steps" name a batch only where
its bootstrap interval (pipeline/study/bootstrap.py: validation noise and run-to-run spread) lies below the runner-up's;
otherwise the two are "not distinguishable", and without intervals the winner is "not determined". The S(B) fit,
the slope of steps and the B_crit vs B_simple comparison use the bootstrap intervals where the runs have them.
"""

from __future__ import annotations

import math

from pipeline.study import accuracy_findings, bootstrap, claims
from pipeline.study import fits as fits_lib
from pipeline.study import tuning
from pipeline.study.fits import series

QUESTIONS = {
    "target": "Which batch size reached the target in the least time, and in the fewest steps?",
    "steps": "Do larger batches need fewer steps to the target, and where do returns diminish?",
    "noise_scale": "Does the measured noise scale B_simple match the fitted critical batch B_crit?",
    "grad_std": "Does the gradient's noise fall as 1 / sqrt(B)?",
    "time_per_step": "Does a step take longer as the batch grows?",
    "accuracy": "Which batch size gave the best test accuracy?",
    "noise_growth": "Does the noise scale grow during training?",
    "bn": "Are BatchNorm's batch statistics noisier at small batch?",
    "bn_vs_gn": "Does BatchNorm fall behind GroupNorm at the smallest batch?",
    "replicas": "At the same global batch, are BatchNorm's statistics noisier with more replicas (a smaller batch "
                "per device), and does test accuracy change?",
    "tuning": "How did the tuned learning rate grow with batch size?",
    "failed": "Did any run fail?",
}
NAMES = {"batch": "BatchNorm", "syncbatch": "synchronized BatchNorm", "group": "GroupNorm", "ghost": "ghost BatchNorm", "layer": "LayerNorm",
         "none": "no normalization"}


def plus_minus(value: float, se: float) -> str:
    """'64.0 ± 3.1': the value to 3 significant digits and its standard error to the same decimals."""
    decimals = max(0, 2 - math.floor(math.log10(abs(value)))) if value else 2
    return f"{value:.{decimals}f} ± {se:.{decimals}f}"


def slope_text(fit: dict) -> str:
    """'B^-0.46 ± 0.03 (5 batch sizes; ...)' with what the standard error holds (fits.fit_power_law), or the slope
    with 'not determined' for fewer than 3 points."""
    if fit["determined"]:
        return f"B^{fit['slope']:.2f} ± {fit['slope_se']:.2f} ({fit['points']} batch sizes; {claims.error_source(fit)})"
    return (f"B^{fit['slope']:.2f} from {fit['points']} batch sizes (not determined: a slope's error needs "
            f"{fits_lib.MIN_FIT_POINTS})")


def power_law_answer(fit: dict | None, quantity: str, expected: float, because: str) -> str:
    """Yes / No / Not enough data: does `quantity` follow B^expected (a falling law, expected < 0)?"""
    if not fit or not fit["determined"]:
        points = fit["points"] if fit else 0
        return (f"Not enough data: {quantity} was measured at {points} batch size(s); a fitted slope needs "
                f"{fits_lib.MIN_FIT_POINTS}.")
    text = f"{quantity} went as {slope_text(fit)}; {because} predicts B^{expected:.2f}"
    if fits_lib.agrees(fit, expected):
        return f"Yes: {text}, within {fits_lib.band(fit)}."
    if fit["direction"] == "falls":
        return f"No, not as predicted: {text}; the data fell, but more than {fits_lib.band(fit)} away."
    verb = "rose" if fit["direction"] == "rises" else "showed no clear direction"
    return f"No: {text}, but the data {verb} (opposite to the literature)."


def _target(report, norm, mine, prefix):
    target, out = report["target_accuracy"], []
    reached = [g for g in mine if g["time_to_target_s"]["mean"] is not None and g["reached"] == g["completed"]]
    censored = [g for g in mine if g.get("censored_bound")]
    if len(reached) >= 2 or (reached and censored):
        out.append(f"{prefix}{len(reached)} batch size{'s' if len(reached) > 1 else ''} reached {target:.0%} "
                   "validation accuracy in every run"
                   + (f"; {len(censored)} had runs that did not (below)." if censored else "."))
        for key, what, fmt, unit in (("time_to_target_s", "the least time", "{:.1f}", " s of training"),
                                     ("steps_to_target", "the fewest steps", "{:.0f}", " steps")):
            out.append(prefix + claims.winner_sentence(reached, key, what, fmt, unit, censored))
        if not report.get("run_to_run_known"):
            out.append(f"{prefix}run-to-run spread is unknown: one seed per batch size, so the intervals hold only "
                       "the validation set's sampling noise (rerun the sweep with --seeds 2 or more to measure it).")
    else:
        which = f" (batch {reached[0]['batch']})" if reached else ""
        out.append(f"{prefix}not enough data: {len(reached)} batch size(s){which} reached {target:.0%} validation "
                   "accuracy in every run; least time and fewest steps need two.")
    for g in (g for g in mine if 0 < g["completed"] and g["reached"] < g["completed"]):
        runs = "" if g["completed"] == 1 else f" in {g['completed'] - g['reached']} of {g['completed']} runs"
        best = g["best_val_accuracy"]["mean"]
        out.append(f"{prefix}batch {g['batch']} did not reach {target:.0%} within the budget{runs}"
                   + (f" (best validation accuracy {best:.4f})." if best is not None else "."))
    return out


def _steps(report, norm, fit, prefix):
    batches, steps = series(report["groups"], norm, "steps_to_target", True)
    trend = fits_lib.fit_over_seeds([(g["batch"], g["steps_to_target"]) for g in report["groups"]
                                     if g["norm"] == norm and g["batch"] in batches])
    resampled = fit.get("steps_to_target_interval")
    if not trend or not trend["determined"]:
        out = [f"{prefix}not enough data: {len(batches)} batch size(s) reached the target in every run; a direction "
               f"needs {fits_lib.MIN_FIT_POINTS}."]
    else:
        direction = resampled["direction"] if resampled else trend["direction"]
        verdict = {"falls": "Yes", "rises": "No, they rose (opposite to the literature)",
                   "unclear": "Not clearly"}[direction]
        spread = (f", {bootstrap.LEVEL:.0%} bootstrap interval of the slope "
                  f"{bootstrap.interval_text(resampled['slope'], '{:.2f}')}" if resampled else "")
        out = [f"{prefix}{verdict}: steps to target went as {slope_text(trend)}{spread} among the batch sizes that "
               "reached it; McCandlish et al. 2018 predict a fall, as B^-1 well below B_crit, flattening to S_min "
               "above it."]
    if len(batches) >= fits_lib.MIN_FIT_POINTS:
        onset = fits_lib.diminishing_returns(batches, steps)
        agreeing = resampled["onsets"].get(str(onset), 0.0) if resampled else None
        share = (f" In {agreeing:.0%} of the bootstrap draws the onset is the same." if resampled else "")
        if agreeing is not None and agreeing < bootstrap.LEVEL:
            where = f"at batch {onset}" if onset is not None else "nowhere up to batch " + str(batches[-1])
            out.append(f"{prefix}where returns diminish is not resolved: the mean steps put the onset {where}, which "
                       f"{agreeing:.0%} of the bootstrap draws share (a resolved onset needs {bootstrap.LEVEL:.0%}).")
        elif onset is not None:
            i = batches.index(onset)
            out.append(f"{prefix}diminishing returns begin at batch {onset}: from there on, each larger batch cut the "
                       f"steps to target by less than half as much as perfect scaling would (batch {batches[i]} -> "
                       f"{batches[i + 1]}: {steps[i]:.0f} -> {steps[i + 1]:.0f} steps, "
                       f"{1 - steps[i + 1] / steps[i]:.0%} fewer; perfect scaling: "
                       f"{1 - batches[i] / batches[i + 1]:.0%})." + share)
        else:
            out.append(f"{prefix}steps to target kept falling at least half as fast as perfect scaling up to batch "
                       f"{batches[-1]}, the largest that reached the target: no diminishing returns yet." + share)
    s_fit = fit["steps_to_target"]
    if not s_fit or not s_fit["determined"]:
        points = s_fit["points"] if s_fit else len(batches)
        why = "" if not s_fit or s_fit["valid"] else " and the least-squares line gives S_min <= 0 or B_crit < 0"
        out.append(f"{prefix}the fit S(B) = S_min (1 + B_crit / B) is not determined: {points} batch size(s) reached "
                   f"the target in every run (it needs {fits_lib.MIN_FIT_POINTS}){why}.")
    else:
        out.append(f"{prefix}the fit S(B) = S_min (1 + B_crit / B) over {s_fit['points']} batch sizes gives S_min = "
                   f"{plus_minus(s_fit['s_min'], s_fit['s_min_se'])} steps and B_crit = "
                   f"{plus_minus(s_fit['b_crit'], s_fit['b_crit_se'])} (least-squares standard errors, from the "
                   "residuals about the fit)"
                   + claims.fit_interval_text(report, fit))
    return out + claims.censored_sentences([g for g in report["groups"] if g["norm"] == norm], prefix)


def _noise_scale(fit, prefix):
    s_fit, interval = fit["steps_to_target"], fit.get("b_simple_interval")
    if not interval:
        return [f"{prefix}not enough data: no run has an interval for B_simple near the target (it needs a run that "
                "reached the target with two gradient measurements in the second half of its steps to target)."]
    unbounded = (f"{interval['unbounded']} run(s) only bound it from below (|G|^2 not distinguishable from 0; "
                 f"lower bounds {', '.join(f'{b:.3g}' for b in interval['lower_bounds'])})"
                 if interval["unbounded"] else "")
    if not interval["runs"]:
        return [f"{prefix}not enough data: B_simple near the target (pooled over the second half of each run's steps "
                f"to target) has no bounded interval: {unbounded}."]
    near = (f"B_simple near the target (pooled over the second half of each run's steps to target) lies in "
            f"[{interval['low']:.3g}, {interval['high']:.3g}] (union of {interval['runs']} run(s)' intervals"
            + (f"; {unbounded})" if unbounded else ")"))
    if not s_fit or not s_fit["determined"]:
        return [f"{prefix}not enough data: {near}, but the fitted B_crit is not determined."]
    b_crit, se = s_fit["b_crit"], s_fit["b_crit_se"]
    resampled = fit.get("steps_to_target_interval")
    if resampled:  # the bootstrap interval, which holds the validation noise and the seeds' spread
        low, high = resampled["b_crit"]
        which = f"{bootstrap.LEVEL:.0%} bootstrap interval {bootstrap.interval_text(resampled['b_crit'], '{:.3g}')}"
    else:
        low, high = b_crit - fits_lib.Z * se, b_crit + fits_lib.Z * se
        which = f"{fits_lib.Z:.0f}-standard-error interval"
    # A lower end of None: every draw gave an unbounded B_crit, which no bounded B_simple interval reaches.
    inside = low is not None and low <= interval["high"] and (high is None or high >= interval["low"])
    paper = "(McCandlish et al. 2018 find B_crit close to B_simple at the target)."
    rerun = (resampled or {}).get("b_crit_rerun")
    if not inside and rerun:
        # "No" says that another sweep would not find them overlapping either: where its B_crit would fall (the rerun
        # interval, pipeline/study/bootstrap.py; None ends unbounded) must miss B_simple too.
        r_low, r_high = rerun
        where = f"where a rerun's B_crit would fall, {bootstrap.interval_text([r_low or 0.0, r_high], '{:.3g}')}"
        if (r_low is None or r_low <= interval["high"]) and (r_high is None or r_high >= interval["low"]):
            return [f"{prefix}Not clearly: {near}; the fitted B_crit = {plus_minus(b_crit, se)}, whose {which} does "
                    f"not overlap it, but {where}, does, so a rerun may find them overlapping {paper}"]
        which += f" does not overlap it, nor does {where}"
    elif inside:
        which += " overlaps it"
    else:
        which += " does not overlap it"
    return [f"{prefix}{'Yes' if inside else 'No'}: {near}; the fitted B_crit = {plus_minus(b_crit, se)}, whose "
            f"{which} {paper}"]


def _noise_growth(report, norm, prefix):
    fewest = report["groups"][0].get("replicas", 1)  # the batch-size study's runs
    runs = [r for r in report["runs"] if r["norm"] == norm and r.get("noise_growth") and r.get("replicas", 1) == fewest]
    counts = {v: sorted(r["batch"] for r in runs if r["noise_growth"] == v) for v in ("grew", "fell", "unclear")}
    detail = "; ".join(f"{v} at batch {', '.join(map(str, b))}" for v, b in counts.items() if b)
    if not counts["grew"] + counts["fell"]:
        return [f"{prefix}not enough data: in no run did B_simple's intervals over the first and last quarter of the "
                f"steps separate ({detail or 'no run had a measurement in both'})."]
    head = ("Mixed" if counts["grew"] and counts["fell"] else "Yes" if counts["grew"]
            else "No, it fell (opposite to McCandlish et al. 2018, who find that it grows)")
    missing = sum(r["noise_growth"] not in counts for r in runs)  # "not enough data": no interval in a quarter
    return [f"{prefix}{head}: B_simple pooled over the last quarter of each run's steps against the first quarter "
            f"{detail} (grew or fell: the last quarter's 95% interval lies above or below the first quarter's; "
            "unclear: the two overlap)" + (f"; {missing} run(s) had no interval in one of the quarters." if missing
                                          else ".")]


def _per_device_bn(report, norm, mine, prefix):
    """BN's variance discrepancy against the per-device (BN) batch over the replica counts (He et al. 2016 and
    Goyal et al. 2017 normalize over the examples of one device)."""
    fits = report["replica_fits"][norm]
    measured = sorted((g for g in mine if g["bn_batch_var_error"]["mean"] is not None),
                      key=lambda g: (g["batch"], g["replicas"]))
    if not measured:
        return []
    values = ", ".join(f"{claims.stat_text(g['bn_batch_var_error'])} at BN batch {g['bn_batch']} (batch {g['batch']} "
                       f"on {g['replicas']} replica{'s' if g['replicas'] > 1 else ''})" for g in measured)
    if len({g["replicas"] for g in measured}) < 2:
        return [f"{prefix}not enough data: BatchNorm's batch-vs-population variance discrepancy was {values}, at one "
                "replica count; a comparison needs two."]
    if len(fits["bn_batches"]) < 2:
        return [f"{prefix}the BN batch was {fits['bn_batches'][0]} examples at every replica count, so the replicas "
                f"did not change what BatchNorm normalizes over; its batch-vs-population variance discrepancy was "
                f"{values}."]
    fit = fits["bn_batch_var_error"]
    if not fit or not fit["determined"]:
        return [f"{prefix}not enough data: BatchNorm's batch-vs-population variance discrepancy was {values}; a fitted "
                f"slope against the BN batch needs {fits_lib.MIN_FIT_POINTS} points, this sweep has "
                f"{fit['points'] if fit else len(measured)}."]
    text = (f"BatchNorm's batch-vs-population variance discrepancy went as (BN batch)^{fit['slope']:.2f} ± "
            f"{fit['slope_se']:.2f} ({fit['points']} points, {claims.error_source(fit)}: {values})")
    if fits_lib.agrees(fit, -0.5):
        verdict = (f"Yes: {text}; it grew as the batch per device shrank, within {fits_lib.band(fit)} of the "
                   "sampling-noise prediction (BN batch)^-0.50.")
    elif fit["direction"] == "falls":
        verdict = (f"Yes, but not as predicted: {text}; it grew as the batch per device shrank, more than "
                   f"{fits_lib.band(fit)} away from (BN batch)^-0.50.")
    else:
        verdict = f"No: {text}; it {'fell' if fit['direction'] == 'rises' else 'showed no clear direction'} as " \
                  "the batch per device shrank, where sampling noise predicts (BN batch)^-0.50."
    return [prefix + verdict]


def answers(report: dict) -> dict[str, list[str]]:
    """Per question of QUESTIONS, the sentences that answer it from this sweep (empty where it does not apply)."""
    groups, target = report["groups"], report["target_accuracy"]
    out = {key: [] for key in QUESTIONS}
    for norm, fit in report["fits"].items():
        mine = [g for g in groups if g["norm"] == norm]
        prefix = f"{NAMES.get(norm, norm)}: " if len(report["fits"]) > 1 else ""
        if target:
            out["target"] += _target(report, norm, mine, prefix)
            out["steps"] += _steps(report, norm, fit, prefix)
            out["noise_scale"] += _noise_scale(fit, prefix)
        out["grad_std"].append(prefix + power_law_answer(fit["grad_std"], "the gradient's standard deviation", -0.5,
                                                         "sigma / sqrt(B)"))
        times = fit["time_per_step"]
        if times and times["determined"]:
            verdict = {"rises": "Yes", "falls": "No (it fell)",
                       "unclear": f"Not clearly (flat within {fits_lib.band(times)})"}[times["direction"]]
            out["time_per_step"].append(f"{prefix}{verdict}: time per step went as {slope_text(times)}; B^1 would be "
                                        "proportional to the examples, B^0 a device with room to spare.")
        else:
            out["time_per_step"].append(f"{prefix}not enough data: time per step was measured at "
                                        f"{times['points'] if times else 0} batch size(s).")
        out["accuracy"] += accuracy_findings.accuracy(report, mine, prefix)
        out["noise_growth"] += _noise_growth(report, norm, prefix)
        if any(g["bn_batch_var_error"]["mean"] is not None for g in mine):
            out["bn"].append(prefix + power_law_answer(
                fit["bn_batch_var_error"], "BatchNorm's batch-vs-population variance discrepancy", -0.5,
                "the sampling noise of statistics over B examples"))
    out["bn_vs_gn"] = accuracy_findings.bn_vs_gn(report) if {"batch", "group"} <= set(report["fits"]) else []
    replica_groups = report.get("replica_groups") or []
    for norm in dict.fromkeys(g["norm"] for g in replica_groups):
        mine = [g for g in replica_groups if g["norm"] == norm]
        prefix = f"{NAMES.get(norm, norm)}: " if len(report["replica_fits"]) > 1 else ""
        out["replicas"] += (_per_device_bn(report, norm, mine, prefix)
                            + accuracy_findings.per_device(report, mine, prefix))
    for norm, pairs in tuning.best_lrs(report["tuning"]).items():
        fit = fits_lib.fit_power_law(*zip(*pairs)) if len(pairs) > 1 else None
        if fit:
            out["tuning"].append(f"Tuned per batch size ({NAMES.get(norm, norm)}), the best learning rate went as "
                                 f"{slope_text(fit)} (linear scaling: B^1, square-root scaling: B^0.5), from "
                                 f"{pairs[0][1]:.3g} at batch {pairs[0][0]} to {pairs[-1][1]:.3g} at batch "
                                 f"{pairs[-1][0]}.")
    failed = [name for g in replica_groups or groups for name in g["failed"]]
    if failed:
        out["failed"].append(f"Yes: {len(failed)} run(s) failed: {', '.join(failed)} (see each run's summary.json).")
    return {key: [s[:1].upper() + s[1:] for s in sentences] for key, sentences in out.items()}


def findings(report: dict) -> list[str]:
    """Every answer's sentences in the order of QUESTIONS."""
    return [sentence for key in QUESTIONS for sentence in report["answers"][key]]
