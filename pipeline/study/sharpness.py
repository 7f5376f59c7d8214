"""Sharp and flat minima in a sweep: each run's curvature at its end beside its generalization gap, and the findings.

Per run (a sweep with --curvature-every -1, or any N > 0): the last record of curvature.jsonl (callbacks.Curvature,
measured when training ended, on the first 512 un-augmented training examples, BN in inference mode), and the record
measured at the step the run first reached the target accuracy ("at_target"; the runs are then compared at one
accuracy, as Keskar et al. compare solutions of similar training loss):
lambda_max ("sharpness", Keskar et al. 2017), tr(H) with its 95% interval, and the stability ratio
lambda_max x lr / (2 (1 + beta)) at the learning rate of that step; beside them the generalization gap (train - test
accuracy, and test - train loss, both positive when the test set does worse) from summary.json, and lr / B with lr
the run's peak learning rate (Jastrzebski et al. 2017: lr / B, not B alone, sets the width of the minimum SGD finds).

Directions with batch size are called per series (one norm and lr scaling) across seeds: the mean over seeds at
each batch size is fitted against log B by weighted least squares (pipeline/study/fits.py, fit_over_seeds): log2
lambda_max (its slope is the exponent of lambda_max ~ B^slope, 2^slope the factor per doubling of B), the gap itself
(its slope the change per doubling). The slope's standard error is the larger of the seeds' spread, pooled over the
batch sizes (two seeds at one batch size give their spread one degree of freedom; pooling over five gives five), and
the residuals' scatter about the line; the direction is resolved when the slope's 95% interval (the t quantile of that
error's degrees of freedom) excludes zero. "Not enough data" with fewer than 3 batch sizes, or without 2 seeds at
some batch size (the run-to-run spread unknown).
What the literature predicts depends on how lr follows B: with a fixed lr (lr / B falls as B grows) Keskar et al. 2017 predict sharper
minima and a larger gap at large B; with linear scaling (lr / B constant) Jastrzebski et al. 2017 and Goyal et al.
2017 predict alike minima and no gap growth; sqrt scaling lies between (lr / B still falls).

Caveat in every comparison of sharpness (Dinh et al. 2017): sharpness is not invariant to reparametrization; weights
before a BatchNormalization layer are scale-invariant, so their scale (which weight decay and the learning rate move)
changes lambda_max without changing the function. Compare runs of one architecture and weight decay, beside the gap.
"""

from __future__ import annotations

import math
import os

import numpy as np

from pipeline import rundir
from pipeline.study import claims, fits

KEYS = ("max_eigenvalue", "trace", "trace_lo", "trace_hi", "stability_ratio")
GROUP_KEYS = ("max_eigenvalue", "trace", "stability_ratio", "max_stability_ratio", "peak_stability_ratio",
              "generalization_gap", "loss_gap", "lr_over_batch", "max_eigenvalue_at_target")
EDGE = 0.9  # a stability ratio at or above this counts as at the edge (lambda_max within 10% of 2 (1 + beta) / lr)
DINH = ("Sharpness is not invariant to reparametrization (Dinh et al. 2017): BatchNorm makes the weights before it "
        "scale-invariant, so a different weight scale changes lambda_max without changing the function; read it "
        "beside the gap, between runs of one architecture and weight decay.")
QUESTIONS = {
    "sharpness": "Do larger batches end in sharper minima here?",
    "generalization_gap": "Does the generalization gap grow with batch size?",
    "lr_over_batch": "Is lr/B a better predictor of sharpness than B?",
    "edge_of_stability": "Did training reach the edge of stability?",
}


def run_fields(run_dir: str, row: dict, config: dict, summary: dict) -> dict:
    """The curvature and gap fields of one report row (module docstring); None where the run has no measurement."""
    records = [r for r in rundir.read_jsonl(os.path.join(run_dir, "curvature.jsonl")) if "step" in r]
    last = max(records, key=lambda r: r["step"]) if records else {}
    fields = {key: last.get(f"curvature/{key}") for key in KEYS}
    fields["curvature_step"], fields["curvature_examples"] = last.get("step"), last.get("examples")
    at_target = next((r for r in records if r.get("at_target")), {})
    fields["max_eigenvalue_at_target"] = at_target.get("curvature/max_eigenvalue")
    fields["curvature_target_step"] = at_target.get("step")
    fields["curvature_seconds"] = sum(r.get("curvature/seconds") or 0.0 for r in records) or None
    fields["lr_scaling"] = config.get("lr_scaling")
    fields["lr_over_batch"] = row["lr"] / row["batch"] if row.get("lr") else None
    ratios = [r.get("curvature/stability_ratio") for r in records if r.get("curvature/stability_ratio") is not None]
    fields["max_stability_ratio"] = max(ratios) if ratios else None
    # The last measurement's lambda_max against the threshold of the run's peak lr (only where the run had one).
    momentum = last.get("curvature/momentum")
    fields["peak_stability_ratio"] = (fields["max_eigenvalue"] * row["lr"] / (2 * (1 + momentum))
                                      if ratios and momentum is not None and row.get("lr") else None)
    train, test = summary.get("train_loss"), summary.get("test_loss")
    fields["loss_gap"] = test - train if train is not None and test is not None else None
    return fields


def _stats(values) -> dict:
    values = [v for v in values if v is not None and math.isfinite(v)]
    std = float(np.std(values, ddof=1)) if len(values) > 1 else None
    return {"mean": float(np.mean(values)) if values else None, "std": std, "n": len(values)}


def groups(rows: list[dict]) -> list[dict]:
    """Per (norm, batch) of the completed runs: mean, std and count over seeds of GROUP_KEYS."""
    by_key = {}
    for row in rows:
        if row["status"] == "completed" and row.get("replicas", 1) == min(r.get("replicas", 1) for r in rows):
            by_key.setdefault((row["norm"], row["batch"], row.get("lr_scaling")), []).append(row)
    return [{"norm": norm, "batch": batch, "lr_scaling": scaling, **{k: _stats(r.get(k) for r in members)
                                                                     for k in GROUP_KEYS}}
            for (norm, batch, scaling), members in sorted(by_key.items(), key=lambda item: (item[0][0], item[0][1],
                                                                                      str(item[0][2])))]


def series_fits(rows: list[dict], key: str, log: bool) -> list[tuple[tuple, dict | None, int]]:
    """Per (norm, lr scaling) of the runs: the fit of `key` against B over its batch sizes (module docstring), and
    the most seeds any batch size has.

    Returns:
      [((norm, lr scaling), fits.fit_over_seeds result or None, seeds)], in a fixed order.
    """
    by_series = {}
    for group in groups(rows):
        stat = group[key]
        if stat["mean"] is not None and (stat["mean"] > 0 or not log):
            by_series.setdefault((group["norm"], group["lr_scaling"]), []).append((group["batch"], stat))
    return [(series, fits.fit_over_seeds(points, log), max(stat["n"] for _, stat in points))
            for series, points in sorted(by_series.items(), key=lambda item: tuple(map(str, item[0])))]


def _prediction(scalings: set) -> str | None:
    """'up' when lr / B falls with B (fixed lr or sqrt scaling; Keskar et al.), 'flat' with linear scaling."""
    if len(scalings) != 1:
        return None
    return "flat" if scalings == {"linear"} else "up"


def _direction_answer(fit: dict | None, seeds: int, quantity: str, per_doubling, log: bool,
                      prediction: str | None, papers: dict) -> str:
    """Yes / No / Not enough data from a series' fit; per_doubling(slope on log2 B) says the change per doubling."""
    if fit is None or not fit["determined"]:
        points = fit["points"] if fit else 0
        return (f"Not enough data: a direction of {quantity} needs {fits.MIN_FIT_POINTS} batch sizes with a "
                f"measurement; this sweep has {points}.")
    if fit["replicate_se"] is None:
        return (f"Not enough data: a direction of {quantity} across seeds needs 2 seeds at some batch size (the "
                f"run-to-run spread); this sweep has {seeds}.")
    # Slopes on ln B are exponents for a power law (the same on log2 B), and changes per e-fold of B otherwise.
    scale = 1.0 if log else math.log(2.0)
    slope, se = fit["slope"] * scale, fit["slope_se"] * scale
    verdict = {"rises": "Yes", "falls": "No, the opposite", "unclear": "No"}[fit["direction"]]
    text = (f"{verdict}: {quantity} changes by {per_doubling(slope)} per doubling of B (slope {slope:.3g} ± "
            f"{se:.2g} on log2 B over {fit['points']} batch sizes; {claims.error_source(fit)}; ")
    text += (f"within {fits.band(fit)}, of none)." if fit["direction"] == "unclear" else f"beyond {fits.band(fit)}).")
    if prediction is not None:
        expected = {"up": "a growth with B", "flat": "no change with B"}[prediction]
        observed = {"rises": "up", "falls": "down", "unclear": "flat"}[fit["direction"]]
        text += (f" {papers[prediction]} predict {expected} under this sweep's lr scaling; the data "
                 f"{'agree' if observed == prediction else 'disagree with the paper'}.")
    return text


def _answers_for(rows: list[dict], key: str, quantity: str, per_doubling, log: bool, papers: dict) -> list[str]:
    """One direction answer per (norm, lr scaling) series, named when the sweep has several."""
    found = series_fits(rows, key, log)
    if not found:
        return [_direction_answer(None, 0, quantity, per_doubling, log, None, papers)]
    out = []
    for (norm, scaling), fit, seeds in found:
        text = _direction_answer(fit, seeds, quantity, per_doubling, log, _prediction({scaling}), papers)
        out.append(text if len(found) == 1 else f"{norm} norm, lr scaling {scaling}: {text}")
    return out


def answers(rows: list[dict]) -> dict:
    """The sentences answering QUESTIONS from the completed runs' numbers (module docstring)."""
    done = [r for r in rows if r["status"] == "completed"]
    measured = [r for r in done if r.get("max_eigenvalue") is not None]
    scalings = {r.get("lr_scaling") for r in done}
    prediction = _prediction(scalings)
    result = {}
    papers = {"up": "Keskar et al. 2017 (lr/B falls as B grows)",
              "flat": "Jastrzebski et al. 2017 (lr/B sets the width; it is fixed)"}
    per_factor = lambda slope: f"a factor {2 ** slope:.3g}"  # noqa: E731
    result["sharpness"] = _answers_for(measured, "max_eigenvalue", "lambda_max at the end of training", per_factor,
                                       True, papers)
    if any(r.get("max_eigenvalue_at_target") is not None for r in measured):
        result["sharpness"] += ["At the step each run first reached the target accuracy: " + text for text in
                                _answers_for(measured, "max_eigenvalue_at_target", "lambda_max at the target",
                                             per_factor, True, papers)]
    result["sharpness"][-1] += " " + DINH
    result["generalization_gap"] = _answers_for(done, "generalization_gap", "the train - test accuracy gap",
                                                lambda slope: f"{slope:+.3g}", False,
                                                {"up": "Keskar et al. 2017 (lr/B falls as B grows)",
                                                 "flat": "Goyal et al. 2017 (linear scaling)"})
    if scalings >= {"linear", "none"}:
        result["lr_over_batch"] = [_predictor_answer(measured)]
    else:
        result["lr_over_batch"] = [
            f"Cannot be answered by this sweep: every run uses lr scaling {', '.join(sorted(map(str, scalings)))}, "
            "so lr/B is a function of B and the two predict the same; it needs runs with linear scaling and runs "
            "with a fixed lr (--lr-scaling none) in one sweep directory."]
    result["edge_of_stability"] = [_edge_answer(measured)]
    return result


def _predictor_answer(rows: list[dict]) -> str:
    """R^2 of ln lambda_max on log2 B and on log2 (lr / B), over every measured run."""
    scores = {}
    for x_key in ("batch", "lr_over_batch"):
        points = [(r[x_key], r["max_eigenvalue"]) for r in rows if r["max_eigenvalue"] and r["max_eigenvalue"] > 0]
        if len(points) < 3:
            return f"Not enough data: {len(points)} runs with a positive lambda_max; a comparison of fits needs 3."
        x, y = np.log2([p[0] for p in points]), np.log([p[1] for p in points])
        residual = y - np.polyval(np.polyfit(x, y, 1), x)
        scores[x_key] = 1.0 - float(residual @ residual) / max(float(((y - y.mean()) ** 2).sum()), 1e-300)
    better = scores["lr_over_batch"] > scores["batch"]
    return (f"{'Yes' if better else 'No'}: ln lambda_max fits log2(lr/B) with R^2 {scores['lr_over_batch']:.2f} and "
            f"log2 B with R^2 {scores['batch']:.2f} over {len(rows)} runs (no uncertainty on the R^2s). Jastrzebski "
            f"et al. 2017 predict lr/B to be the better predictor; the data "
            f"{'agree' if better else 'disagree with the paper'}. " + DINH)


def _edge_answer(rows: list[dict]) -> str:
    ratios = [(r["max_stability_ratio"], r["peak_stability_ratio"], r["batch"]) for r in rows
              if r.get("max_stability_ratio") is not None]
    if not ratios:
        return ("Not enough data: no run measured a stability ratio (needs SGD or a given momentum, and "
                "--curvature-every).")
    top, peak, batch = max(ratios)
    highest_peak = max((p for _, p, _ in ratios if p is not None), default=None)
    against_peak = (f"; the final lambda_max against the peak lr's threshold 2(1+beta)/lr reaches "
                    f"{highest_peak:.3g}" + (" (above 1: sharper than training at the peak lr could stay in, "
                                             "reached after the lr decayed)" if highest_peak > 1 else "")
                    if highest_peak is not None else "")
    verdict = "Yes" if top >= EDGE else "No"
    return (f"{verdict}: the highest measured lambda_max x lr / (2(1+beta)) is {top:.3g} (batch {batch}; 1 is the "
            f"edge, {EDGE} counts as reached){against_peak}. Cohen et al. 2021 find full-batch training at the edge; "
            "with SGD, smaller batches stay further below it (Jastrzebski et al. 2020)"
            + ("" if top >= EDGE else "; measurements at the end of training use the decayed lr, so a run that was "
               "at the edge earlier can read far below it: --curvature-every N measures during training") + ".")


def study(rows: list[dict]) -> dict:
    """The report's "sharpness" part: per-batch groups and answers, or {"measured": False}."""
    if not any(r.get("max_eigenvalue") is not None for r in rows):
        return {"measured": False}
    measured = [r for r in rows if r.get("curvature_seconds") and r.get("wall_time_s")]
    cost = {"curvature_s": sum(r["curvature_seconds"] for r in measured),
            "wall_time_s": sum(r["wall_time_s"] for r in measured), "runs": len(measured)}
    cost["fraction"] = cost["curvature_s"] / cost["wall_time_s"] if cost["wall_time_s"] else None
    return {"measured": True, "groups": groups(rows), "answers": answers(rows), "cost": cost}


def pick_line_runs(rows: list[dict]) -> tuple[dict, dict] | None:
    """The smallest- and largest-batch completed runs of the first norm, at the lowest seed both batches have."""
    done = [r for r in rows if r["status"] == "completed" and r.get("replicas", 1) == 1]
    if not done:
        return None
    norm = sorted({r["norm"] for r in done})[0]
    done = [r for r in done if r["norm"] == norm]
    small, large = min(r["batch"] for r in done), max(r["batch"] for r in done)
    for seed in sorted({r["seed"] for r in done}):
        pair = [next((r for r in done if r["batch"] == b and r["seed"] == seed), None) for b in (small, large)]
        if small != large and all(pair):
            return pair[0], pair[1]
    return None


def markdown(part: dict, line: dict | None, rows: list[dict]) -> list[str]:
    """The report's section on sharpness: the per-batch table, the answers and the line's setting."""
    if not part.get("measured"):
        return ["## Sharpness", "", "Not measured: run the sweep with --curvature-every -1 (a measurement at each run's "
                "target and at its end; docs/study.md gives its cost).", ""]
    lines = ["## Sharpness and generalization gap (mean ± std over seeds)", "",
             "| norm | B | lr/B | lambda_max | tr(H) | lambda_max at target | highest stability ratio "
             "| train - test acc | test - train loss |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for g in part["groups"]:
        cells = [_cell(g[k]) for k in ("lr_over_batch", "max_eigenvalue", "trace", "max_eigenvalue_at_target",
                                        "max_stability_ratio", "generalization_gap", "loss_gap")]
        lines.append(f"| {g['norm']} | {g['batch']} | " + " | ".join(cells) + " |")
    examples = sorted({r["curvature_examples"] for r in rows if r.get("curvature_examples")})
    lines += ["", f"At the end of each run (and, in \"at target\", at the step it first reached the target accuracy; "
              f"– where it did not), on the first {'/'.join(map(str, examples))} un-augmented training examples "
              "(the same for every run) with BN in inference mode (callbacks.Curvature); the highest stability ratio is "
              "over a run's measurements, each at the lr of its step (at the end of a schedule that decays to 0 it "
              "is 0); test - train loss is positive when the test set does worse. " + DINH, ""]
    cost = part.get("cost") or {}
    if cost.get("fraction") is not None:
        line_s = (line or {}).get("seconds")
        lines += [f"Cost: the curvature measurements took {cost['curvature_s']:.0f} s of the {cost['wall_time_s']:.0f} s "
                  f"that {cost['runs']} runs took ({cost['fraction']:.0%}; the tracing of each run's product function "
                  "included)" + (f", and the loss line below {line_s:.0f} s more, when it was computed" if line_s else "")
                  + ".", ""]
    for key, question in QUESTIONS.items():
        lines += [f"**{question}**", "", *[f"- {s}" for s in part["answers"][key]], ""]
    if line:
        lines += [f"Loss along the line from batch {line['small']['batch']} ({line['small']['name']}, alpha 0) to "
                  f"batch {line['large']['batch']} ({line['large']['name']}, alpha 1): {line['bn']}.", ""]
    return lines


def _cell(stat: dict) -> str:
    if stat["mean"] is None:
        return "–"
    return f"{stat['mean']:.3g}" + (f" ± {stat['std']:.2g}" if stat["std"] is not None else "")
