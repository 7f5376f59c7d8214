"""The batch-size report of a sweep directory: report.json, report.md, PNG plots and TensorBoard HParams data.

`python -m pipeline.report SWEEP_DIR` rebuilds it from the run directories alone (config.json, summary.json,
the history, grad_stats.jsonl, bn_stats.json of each <SWEEP_DIR>/runs/*), as pipeline.sweep does at its end.
pipeline/study/run_row.py reads each run; this module aggregates and renders; the statistics are in pipeline/study/fits.py and the sentences in
pipeline/study/findings.py.

Per run: steps, epochs and time to target come from summary.json (pipeline/training/target.py: validation accuracy
checked every TargetCheck interval, the same fraction of an epoch at every batch). Time per step is the median
over the epochs after the first (whose time includes tracing and compilation), without the instruments'
measuring and the target checks; time to target is the run's training time until the check that first reached
the target, without measuring and checks (pipeline.rundir defines both, and summary.json holds the same
numbers). B_simple is pooled over the measurements of the second half
of the steps to target, [S/2, S] (fits.pooled_noise_scale; None for a run that did not reach the target), the
training phase that the fitted B_crit describes. The gradient's standard deviation is the root mean square of
"grad/batch_std" over the run's measurements, which the sweep places at the same fractions of every run's
budget; the BN discrepancy is the root mean square over the run's measurements of "bn/batch_var_error" (batch
vs population statistics, callbacks/bn_stats.py). Means and standard deviations are over seeds (sample std,
ddof=1; none for a single seed); accuracies, times and instruments come from completed runs, the target metrics
from completed runs that reached the target.
Intervals of the target metrics and of the S(B) fit: a bootstrap over validation examples and seeds
(pipeline/study/bootstrap.py).
"""

from __future__ import annotations

import glob
import os
import sys

import numpy as np

from pipeline import cli, rundir, startup
from pipeline.config import InputError
from pipeline.study import adaptive_report, bootstrap, claims
from pipeline.study import findings as findings_lib
from pipeline.study import fits as fits_lib
from pipeline.study import hparams, loss_line, prediction_check, run_row, sharpness, sharpness_plots, tuning
from pipeline.study.report_plots import plots

# (key in a run row, column title, number format) of the report's table, in order.
COLUMNS = (
    ("lr", "lr", "{:.3g}"),
    ("test_accuracy", "test acc", "{:.4f}"),
    ("generalization_gap", "train - test", "{:+.4f}"),
    ("steps_to_target", "steps to target", "{:.0f}"),
    ("epochs_to_target", "epochs to target", "{:.1f}"),
    ("time_to_target_s", "time to target (s)", "{:.1f}"),
    ("time_per_step_ms", "time/step (ms)", "{:.2f}"),
    ("examples_per_sec", "examples/s", "{:.0f}"),
    ("grad_std", "grad std", "{:.3g}"),
    ("noise_scale", "B_simple near target", "{:.3g}"),
    ("bn_batch_var_error", "BN batch var error", "{:.3g}"),
)
TARGET_KEYS = bootstrap.TARGET_KEYS
METRICS = ("test_accuracy", "train_accuracy", "val_accuracy", "best_val_accuracy", "generalization_gap",
           "time_per_step_ms", "examples_per_sec", "wall_time_s", "grad_std", "noise_scale", "bn_batch_mean_error",
           "bn_batch_var_error", "bn_moving_mean_error", "bn_moving_var_error", "lr") + TARGET_KEYS
def _stats(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else None,
            "n": len(values)}


def aggregate(rows: list[dict]) -> list[dict]:
    """Per (norm, batch, replicas): mean, std and count over seeds of every metric, and run counts by outcome."""
    groups = {}
    for row in sorted(rows, key=lambda r: (r["norm"], r["batch"], r["replicas"], r["seed"])):
        groups.setdefault((row["norm"], row["batch"], row["replicas"]), []).append(row)
    result = []
    for (norm, batch, replicas), members in groups.items():
        completed = [r for r in members if r["status"] == "completed"]
        reached = [r for r in completed if r["steps_to_target"] is not None]
        group = {"norm": norm, "batch": batch, "replicas": replicas,
                 "per_replica_batch": members[0]["per_replica_batch"], "bn_batch": members[0]["bn_batch"],
                 "runs": len(members), "completed": len(completed),
                 "failed": [r["name"] for r in members if r["status"] == "failed"], "reached": len(reached)}
        for key in METRICS:
            group[key] = _stats([r[key] for r in (reached if key in TARGET_KEYS else completed)])
        # With censored runs, the group's mean over all its completed runs is only bounded from below.
        censored = [r["censored_at"] for r in completed if r.get("censored_at")]
        group["censored_bound"] = None
        if censored and len(censored) + len(reached) == len(completed):
            bounds = {key: [r[key] if r[key] is not None else r["censored_at"][key] for r in completed]
                      for key in ("steps_to_target", "time_to_target_s")}
            group["censored_bound"] = {key: float(np.mean(v)) if None not in v else None for key, v in bounds.items()}
        result.append(group)
    return result


def _cell(stat: dict, fmt: str, reached: str = "") -> str:
    if stat["mean"] is None:
        return "–" + reached
    text = fmt.format(stat["mean"]) + (f" ± {fmt.format(stat['std']).lstrip('+')}" if stat["std"] is not None else "")
    return text + reached


def headline(report: dict) -> str:
    """The report's table in markdown: one row per (norm, batch), mean ± std over seeds; with several replica
    counts, one row per (norm, batch, replicas) with the per-replica batch and the BN batch."""
    by_replicas = bool(report.get("replica_groups"))
    devices = ("replicas", "per-replica batch", "BN batch") if by_replicas else ()
    lines = ["| norm | batch | " + "".join(f"{title} | " for title in devices)
             + " | ".join(title for _, title, _ in COLUMNS) + " | runs |",
             "|---|---:|" + "---:|" * (len(devices) + len(COLUMNS)) + "---|"]
    for g in report.get("replica_groups") or report["groups"]:
        cells = []
        for key, _, fmt in COLUMNS:
            reached = f" ({g['reached']}/{g['runs']})" if key in TARGET_KEYS and g["reached"] < g["runs"] else ""
            stat = g[key] if key != "lr" else g[key] | {"std": None}  # the lr is set, not measured
            interval = (g.get("target_interval") or {}).get(key)
            cells.append(_cell(stat, fmt, reached) + (f" {bootstrap.interval_text(interval, fmt)}" if interval else ""))
        status = f"{g['completed']}/{g['runs']} completed" + (f", {len(g['failed'])} failed" if g["failed"] else "")
        device_cells = "".join(f"{g[key]} | " for key in ("replicas", "per_replica_batch", "bn_batch") if by_replicas)
        lines.append(f"| {g['norm']} | {g['batch']} | {device_cells}" + " | ".join(cells) + f" | {status} |")
    return "\n".join(lines)


def _estimate(value, se, fmt="{:.3g}") -> str:
    return fmt.format(value) + (f" ± {fmt.format(se)}" if se is not None else "")


def fits_markdown(report: dict) -> str:
    """Per norm: the S(B) fit, B_simple near the target and the fitted slopes, with standard errors and points."""
    lines = ["| norm | S_min (steps) | B_crit | points | B_simple near target (range over batches) | grad std slope "
             "(theory -0.5) | BN batch var error slope (theory -0.5) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for norm, fit in report["fits"].items():
        s = fit["steps_to_target"]
        if s and s["determined"]:
            cells = [_estimate(s["s_min"], s["s_min_se"], "{:.0f}"), _estimate(s["b_crit"], s["b_crit_se"])]
            resampled = fit.get("steps_to_target_interval")
            if resampled:
                cells = [cells[0] + " " + bootstrap.interval_text(resampled["s_min"]),
                         cells[1] + " " + bootstrap.interval_text(resampled["b_crit"], "{:.3g}")]
        else:
            cells = ["not determined"] * 2
        cells.append(str(s["points"]) if s else "0")
        b = fit["b_simple"]
        cells.append(f"{b['median']:.3g} ({b['low']:.3g}-{b['high']:.3g}, {b['batches']} batches)" if b else "–")
        for key in ("grad_std", "bn_batch_var_error"):
            slope = fit[key]
            cells.append("–" if not slope else _estimate(slope["slope"], slope["slope_se"], "{:.2f}")
                         + f" ({slope['points']} points{'' if slope['determined'] else ', not determined'})")
        lines.append(f"| {norm} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\nStandard errors of the least-squares fits (pipeline/study/fits.py); a fit with fewer " \
        "than 3 points has none and is marked not determined. A slope's is the larger of the residuals' and the " \
        "seeds' spread (the residuals' alone with one seed: run-to-run spread unknown). [low, high]: the S(B) fit refitted to every bootstrap " \
        f"draw of the steps to target ({bootstrap.LEVEL:.0%} percentile interval; it holds the validation noise and, " \
        "with several seeds, the run-to-run spread; pipeline/study/bootstrap.py)."


def answer(report: dict, question: str):
    """The generated answer to one of findings.QUESTIONS as notebook Markdown (a note when it does not apply)."""
    from IPython.display import Markdown

    sentences = report["answers"].get(question) or ["Not enough data: this sweep has no numbers for this question."]
    return Markdown("\n".join(f"- {s}" for s in sentences))


def markdown(report: dict, plot_files: dict[str, str]) -> str:
    sweep = report["sweep"]
    config, budget = sweep.get("config", {}), sweep.get("budget", {})
    seeds = ", ".join(map(str, sweep.get("seeds", [])))
    tuned = f", tuned per batch by {sweep['tuner']} search" if sweep.get("tuner") else ""
    setting = (f"Dataset {config.get('dataset', '?')}, model {config.get('model', '?')}, budget "
               f"{budget.get('amount', '?')} {budget.get('kind', '')} per run, target {report['target_accuracy']:.0%} "
               f"validation accuracy, seeds {seeds}, lr {config.get('lr', '?')} at batch "
               f"{config.get('base_batch', '?')} scaled {config.get('lr_scaling', '?')}{tuned}.")
    lines = [
        "# Batch-size study", "", setting, "",
        "## Findings", "", *[f"- {s}" for s in report["findings"]], "",
        "## Per batch size (mean ± std over seeds)", "", headline(report), "",
        claims.spread_note(report), "",
        "Steps to target: first check with validation accuracy >= target (checked every "
        "pipeline.training.target interval, the same fraction of an epoch at every batch); epochs to target: steps to "
        "target x batch / training examples; time to target: the run's training clock until that check, without "
        "the measuring and the checks (first-epoch tracing and epoch-end validation included); (k/n): runs that "
        "reached it. time/step: median over the epochs after the first without the instruments' measuring and "
        "the target checks, epoch-end validation included. grad std: RMS over the run's measurements. B_simple "
        "near target: mean tr(Sigma) / mean |G|^2 over the measurements from half the steps to target to the "
        "steps to target, with its 95% interval (callbacks.noise_estimates.pool). BN batch var error: batch vs population variance discrepancy (RMS over the run's "
        "measurements of the mean over layers)."
        + (" With batch or ghost norm, the gradient measurement normalizes each of its micro-batches (B examples "
           "by default, as training does) with that micro-batch's own statistics, so grad std and B_simple include "
           "BatchNorm's noise at the run's batch (callbacks/gradient_stats.py)."
           if {"batch", "ghost"} & set(report["fits"]) else ""), "",
        "## Fits", "", fits_markdown(report),
    ]
    if report["tuning"]:
        lines += ["", "## Tuning (best trial per batch size)", "", "| search | trials | best val acc | best lr |",
                  "|---|---:|---:|---:|"]
        for project, trials in report["tuning"].items():
            scored = [t for t in trials if t["score"] is not None]
            best = max(scored, key=lambda t: t["score"], default=None)
            cells = f"{best['score']:.4f} | {best['values']['lr']:.3g} |" if best else "– | – |"
            lines.append(f"| {project} | {len(trials)} | {cells}")
    if report.get("prediction"):
        lines += ["", prediction_check.markdown(report["prediction"])]
    if report.get("adaptive"):
        lines += ["", adaptive_report.markdown(report["adaptive"], report["adaptive"]["plot"])]
    failed = [r for r in report["runs"] if r["status"] != "completed"]
    if failed:
        lines += ["", "## Runs not completed", ""] + [f"- {r['name']}: {r['status']} {r['reason']}" for r in failed]
    part = report.get("sharpness", {})
    lines += ["", *sharpness.markdown(part, part.get("line"), report["runs"])]
    lines += ["", "## Plots", ""] + [f"![{name}]({file})" for name, file in plot_files.items()]
    lines += ["", f"TensorBoard: `tensorboard --logdir {report['sweep_dir']}` (HParams dashboard: tensorboard/; "
              "training curves: runs/*/tensorboard)."]
    return "\n".join(lines) + "\n"


def build_report(sweep_dir: str, *, tensorboard: bool = True) -> dict:
    """Reads every run of a sweep, writes report.json, report.md, the PNGs and HParams data; returns the report.

    Raises:
      InputError: sweep_dir holds no runs.
    """
    run_dirs = sorted(glob.glob(os.path.join(sweep_dir, "runs", "*")))
    adaptive_dirs = [d for d in run_dirs if adaptive_report.is_adaptive(d)]  # beside the fixed batches, not in fits
    rows = [row for row in map(run_row.read_run, [d for d in run_dirs if d not in adaptive_dirs]) if row]
    if not rows:
        raise InputError(f"sweep directory {sweep_dir} holds no runs (expected {os.path.join(sweep_dir, 'runs', '*')})")
    sweep = rundir.read_json(os.path.join(sweep_dir, "sweep.json")) or {"config": {}}
    all_groups = aggregate(rows)
    # The batch-size study is the one at the sweep's fewest replicas; every replica count is in replica_groups.
    fewest = min(g["replicas"] for g in all_groups)
    groups = [g for g in all_groups if g["replicas"] == fewest]
    report = {"sweep_dir": sweep_dir, "sweep": sweep, "target_accuracy": max(r["target"] or 0 for r in rows),
              "groups": groups, "replica_groups": all_groups if len({g["replicas"] for g in all_groups}) > 1 else [],
              "fits": fits_lib.per_norm(groups), "tuning": tuning.read_trials(sweep_dir),
              "runs": [{k: v for k, v in r.items() if k not in ("noise_curve", "target_draws")} for r in rows]}
    draws = bootstrap.add_group_intervals(all_groups, rows)
    report["run_to_run_known"] = bootstrap.run_to_run_known(groups)
    for norm, fit in report["fits"].items():
        fit["b_simple_interval"] = fits_lib.interval_union([r["noise_near_target"] for r in rows
                                                             if r["norm"] == norm and r["replicas"] == fewest])
        point = fit.get("steps_to_target") or {}
        fit["steps_to_target_interval"] = bootstrap.fit_for_norm(
            groups, norm, draws, point.get("b_crit") if point.get("determined") else None)
    report["replica_fits"] = fits_lib.per_device_batch(report["replica_groups"])
    report["answers"] = findings_lib.answers(report)
    report["findings"] = findings_lib.findings(report)
    report["prediction"] = prediction_check.for_sweep(sweep_dir, groups)
    report["adaptive"] = adaptive_report.section(adaptive_dirs, groups)
    if report["adaptive"]:
        report["adaptive"]["plot"] = adaptive_report.plot(report["adaptive"], sweep_dir)
    report["plots"] = plots(report, rows, sweep_dir)
    report["sharpness"] = sharpness.study(rows)
    if report["sharpness"]["measured"]:
        pair = sharpness.pick_line_runs(rows)
        report["sharpness"]["line"] = loss_line.sweep_line(sweep_dir, *pair) if pair else None
        report["answers"].update(report["sharpness"]["answers"])
        report["findings"] += [f"{sharpness.QUESTIONS[key]} {sentence}"
                               for key, sentences in report["sharpness"]["answers"].items() for sentence in sentences]
        report["plots"].update(sharpness_plots.plots(rows, report["sharpness"]["line"], sweep_dir))
    if tensorboard:
        report["tensorboard"] = hparams.write_hparams(rows, sweep_dir, [key for key in METRICS if key != "lr"])
    with open(os.path.join(sweep_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write(markdown(report, report["plots"]))
    rundir.write_json_atomic(os.path.join(sweep_dir, "report.json"), report)
    return report


def load_report(sweep_dir: str) -> dict:
    """report.json of a sweep, rebuilt first if it is missing or older than a run's summary.json."""
    path = os.path.join(sweep_dir, "report.json")
    summaries = glob.glob(os.path.join(sweep_dir, "runs", "*", "summary.json"))
    newest = max(map(os.path.getmtime, summaries), default=0.0)
    if not os.path.exists(path) or os.path.getmtime(path) < newest:
        return build_report(sweep_dir)
    return rundir.read_json(path)


def show(sweep_dir: str, name: str):
    """A plot of the report for a notebook: an IPython Image, or a Markdown note when the sweep has no such data."""
    from IPython.display import Image, Markdown

    path = os.path.join(sweep_dir, f"{name}.png")
    if not os.path.exists(path):
        return Markdown(f"*(no {name} plot: this sweep has no data for it)*")
    return Image(filename=path)


def main(argv=None) -> int:
    """`python -m pipeline.report SWEEP_DIR`: rebuilds the report and prints its table."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python -m pipeline.report SWEEP_DIR", file=sys.stderr)
        return cli.BAD_INPUT

    def command() -> int:
        startup.import_tensorflow()  # the report writes TensorBoard HParams data: TF without its start-up lines
        report = build_report(argv[0])
        print(headline(report))
        print("\n".join(f"- {s}" for s in report["findings"]))
        return 0

    return cli.run(command, "interrupted; run the same command to rebuild the report")
