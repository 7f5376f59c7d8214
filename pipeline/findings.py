"""Findings of a sweep report: sentences that state what this sweep's numbers show, with their uncertainty."""

from __future__ import annotations

import math

from pipeline import tuning
from pipeline.fits import diminishing_returns, fit_power_law, series


def difference_noise(a: dict, b: dict, num_test: int | None) -> float | None:
    """Standard error of the difference of two mean accuracies: from the seeds (std / sqrt(n)) with several, else
    the binomial standard error sqrt(p (1 - p) / N) of one run on N test examples."""
    errors = []
    for stat in (a, b):
        if stat["std"] is not None:
            errors.append(stat["std"] / math.sqrt(stat["n"]))
        elif num_test:
            errors.append(math.sqrt(stat["mean"] * (1 - stat["mean"]) / num_test))
        else:
            return None
    return math.hypot(*errors)


def _mean(groups, norm, batch, key):
    group = next((g for g in groups if g["norm"] == norm and g["batch"] == batch), None)
    return group[key] if group else {"mean": None, "std": None, "n": 0}


def findings(report: dict) -> list[str]:
    """Sentences about this sweep, each computed from its numbers."""
    groups, target, out = report["groups"], report["target_accuracy"], []
    names = {"batch": "BatchNorm", "group": "GroupNorm", "ghost": "ghost BatchNorm", "layer": "LayerNorm",
             "none": "no normalization"}
    for norm, fit in report["fits"].items():
        mine = [g for g in groups if g["norm"] == norm]
        prefix = f"{names.get(norm, norm)}: " if len(report["fits"]) > 1 else ""
        if target:
            reached = [g for g in mine if g["time_to_target_s"]["mean"] is not None]
            if reached:
                fastest = min(reached, key=lambda g: g["time_to_target_s"]["mean"])
                fewest = min(reached, key=lambda g: g["steps_to_target"]["mean"])
                out.append(f"{prefix}batch {fastest['batch']} reached {target:.0%} validation accuracy in the least "
                           f"time ({fastest['time_to_target_s']['mean']:.1f} s = steps to target x time per step); "
                           f"batch {fewest['batch']} took the fewest steps ({fewest['steps_to_target']['mean']:.0f}).")
            for g in (g for g in mine if 0 < g["completed"] and g["reached"] < g["completed"]):
                runs = "" if g["completed"] == 1 else f" in {g['completed'] - g['reached']} of {g['completed']} runs"
                best = g["best_val_accuracy"]["mean"]
                out.append(f"{prefix}batch {g['batch']} did not reach {target:.0%} within the budget{runs}"
                           + (f" (best validation accuracy {best:.4f})." if best is not None else "."))
            batches, steps = series(groups, norm, "steps_to_target", True)
            onset = diminishing_returns(batches, steps)
            if onset is not None:
                i = batches.index(onset)
                out.append(f"{prefix}diminishing returns begin at batch {onset}: from there on, each larger batch cut "
                           f"the steps to target by less than half as much as perfect scaling would (batch "
                           f"{batches[i]} -> {batches[i + 1]}: {steps[i]:.0f} -> {steps[i + 1]:.0f} steps, "
                           f"{1 - steps[i + 1] / steps[i]:.0%} fewer; perfect scaling: "
                           f"{1 - batches[i] / batches[i + 1]:.0%}).")
            elif len(batches) > 1:
                beyond = [g["batch"] for g in mine if g["batch"] > batches[-1] and g["completed"]]
                out.append(f"{prefix}steps to target kept falling at least half as fast as perfect scaling up to "
                           f"batch {batches[-1]}, the largest that reached the target" +
                           (f"; batch {', '.join(map(str, beyond))} did not reach it in every run." if beyond else
                            ": no diminishing returns yet."))
            s_fit = fit["steps_to_target"]
            if s_fit and s_fit["valid"]:
                noise = f"; the measured B_simple averaged {fit['b_simple']:.3g}" if fit["b_simple"] else ""
                out.append(f"{prefix}the fit S(B) = S_min (1 + B_crit / B) gives S_min = {s_fit['s_min']:.0f} steps "
                           f"and B_crit = {s_fit['b_crit']:.3g}{noise}.")
        best = max((g for g in mine if g["test_accuracy"]["mean"] is not None),
                   key=lambda g: g["test_accuracy"]["mean"], default=None)
        if best:
            gaps = [g for g in mine if g["generalization_gap"]["mean"] is not None]
            widest = max(gaps, key=lambda g: g["generalization_gap"]["mean"])
            out.append(f"{prefix}the best test accuracy was {best['test_accuracy']['mean']:.4f} at batch "
                       f"{best['batch']}; the widest generalization gap (train - test) was "
                       f"{widest['generalization_gap']['mean']:+.4f} at batch {widest['batch']}.")
        if fit["grad_std"]:
            out.append(f"{prefix}the gradient's standard deviation fell as B^{fit['grad_std']['slope']:.2f} "
                       "(sigma / sqrt(B) predicts B^-0.50).")
        times = series(groups, norm, "time_per_step_ms")
        if len(times[0]) > 1:
            out.append(f"{prefix}a step at batch {times[0][-1]} took {times[1][-1] / times[1][0]:.1f}x as long as at "
                       f"batch {times[0][0]}, for {times[0][-1] / times[0][0]:.0f}x the examples.")
    if "batch" in report["fits"] and "group" in report["fits"]:
        measured = {norm: {g["batch"] for g in groups if g["norm"] == norm and g["test_accuracy"]["mean"] is not None}
                    for norm in ("batch", "group")}
        common = sorted(measured["batch"] & measured["group"])
        if common:
            b = common[0]
            bn, gn = _mean(groups, "batch", b, "test_accuracy"), _mean(groups, "group", b, "test_accuracy")
            noise = difference_noise(bn, gn, report["sweep"].get("num_test"))
            gap = gn["mean"] - bn["mean"]
            if noise is None:
                verdict, why = ("fell behind" if gap > 0 else "did not fall behind"), " (no noise estimate)"
            else:
                verdict = ("fell behind" if gap > 2 * noise else "was ahead of" if gap < -2 * noise else
                           "was within noise of")
                why = f" (standard error of the difference {noise:.4f}; a verdict needs 2 of them)"
            out.append(f"At the smallest batch ({b}), BatchNorm {verdict} GroupNorm: test accuracy "
                       f"{bn['mean']:.4f} vs {gn['mean']:.4f}{why}.")
    bn_norms = [n for n in report["fits"] if len(series(groups, n, "bn_var_rel_error")[0]) > 1]
    for norm in bn_norms:
        batches, errors = series(groups, norm, "bn_var_rel_error")
        out.append(f"{names.get(norm, norm)}'s batch-vs-moving variance discrepancy was {errors[0]:.3g} at batch "
                   f"{batches[0]} and {errors[-1]:.3g} at batch {batches[-1]}.")
    for norm, pairs in tuning.best_lrs(report["tuning"]).items():
        fit = fit_power_law(*zip(*pairs)) if len(pairs) > 1 else None
        if fit:
            out.append(f"Tuned per batch size ({names.get(norm, norm)}), the best learning rate grew as "
                       f"B^{fit['slope']:.2f} (linear scaling: B^1, square-root scaling: B^0.5), from "
                       f"{pairs[0][1]:.3g} at batch {pairs[0][0]} to {pairs[-1][1]:.3g} at batch {pairs[-1][0]}.")
    failed = [name for g in groups for name in g["failed"]]
    if failed:
        out.append(f"{len(failed)} run(s) failed: {', '.join(failed)} (see each run's summary.json).")
    return out
