"""The sweep report's "Adaptive batch" section: each `--batch adaptive` run beside the fixed batches, and its plot.

Examples to target of a run whose batch changes: the sum over its epochs of steps x the epoch's batch (the history's
"batch_size", rundir.read_history) up to the step at which the target was reached. The fixed batches' are steps to
target x batch. The plot shows each adaptive run's batch over steps (a step line from batch_decisions.jsonl's
phases) against the B_simple it measured (grad_stats.jsonl, with the 95% intervals).
"""

from __future__ import annotations

import os

from pipeline import rundir
from pipeline.config import ADAPTIVE

DECISIONS = "batch_decisions.jsonl"  # written by pipeline/training/adaptive_batch.py


def is_adaptive(run_dir: str) -> bool:
    """Whether config.json records --batch adaptive."""
    recorded = rundir.read_config(run_dir)
    return bool(recorded) and recorded["config"].get("batch") == ADAPTIVE


def examples_until(history: list[dict], step: int | None) -> int | None:
    """Training examples in the first `step` steps of a run whose epochs record their "step" (at the epoch's end)
    and "batch_size"; None without a step."""
    if step is None:
        return None
    examples, before = 0, 0
    for record in history:
        in_epoch = min(record["step"], step) - before
        if in_epoch > 0:
            examples += in_epoch * int(record["batch_size"])
        before = record["step"]
        if before >= step:
            break
    return examples


def read_adaptive_run(run_dir: str) -> dict:
    """One adaptive run: its outcome, targets, examples to target, decisions and measured noise scale."""
    summary = rundir.read_summary(run_dir) or {}
    history = rundir.read_history(run_dir)
    decisions = rundir.read_jsonl(os.path.join(run_dir, DECISIONS))
    config = rundir.read_config(run_dir)["config"]
    noise = [{"step": r["step"], "noise_scale": r.get("grad/noise_scale"), "lo": r.get("grad/noise_scale_lo"),
              "hi": r.get("grad/noise_scale_hi")}
             for r in rundir.read_jsonl(os.path.join(run_dir, "grad_stats.jsonl")) if "step" in r]
    batches = [(0, config["base_batch"])] + [(d["step"], d["new_batch"]) for d in decisions if d["changed"]]
    return {"name": os.path.basename(run_dir), "seed": config["seed"], "policy": config.get("batch_policy"),
            "status": summary.get("status", "unfinished"), "steps": summary.get("steps"),
            "test_accuracy": summary.get("test_accuracy"), "steps_to_target": summary.get("steps_to_target"),
            "time_to_target_s": summary.get("time_to_target_s"), "wall_time_s": summary.get("wall_time_s"),
            "examples_to_target": examples_until(history, summary.get("steps_to_target")),
            "batches": batches, "changes": sum(d["changed"] for d in decisions), "noise": noise}


def section(run_dirs: list[str], groups: list[dict]) -> dict | None:
    """The adaptive runs and the fixed batches' best by time and by examples to target (group means), or None."""
    if not run_dirs:
        return None
    fixed = [{"batch": g["batch"], "norm": g["norm"], "time_to_target_s": g["time_to_target_s"]["mean"],
              "examples_to_target": (g["batch"] * g["steps_to_target"]["mean"]
                                     if g["steps_to_target"]["mean"] is not None else None)} for g in groups]
    reached = [f for f in fixed if f["time_to_target_s"] is not None]
    return {"runs": [read_adaptive_run(d) for d in run_dirs],
            "fastest_fixed": min(reached, key=lambda f: f["time_to_target_s"], default=None),
            "fewest_examples_fixed": min(reached, key=lambda f: f["examples_to_target"], default=None)}


def _ratio(value, reference) -> str:
    return f"{value / reference:.2f}x" if value is not None and reference else "–"


def markdown(adaptive: dict, plot_file: str | None) -> str:
    """The section: one row per adaptive run, with its ratios to the best fixed batch by time and by examples."""
    fastest, fewest = adaptive["fastest_fixed"], adaptive["fewest_examples_fixed"]
    lines = ["## Adaptive batch", "",
             "Runs of `--batch adaptive` (docs/adaptive_batch.md). Ratios are to the fixed batch with the least mean "
             f"time to target ({fastest['batch'] if fastest else '–'}) and to the one with the fewest mean examples "
             f"to target ({fewest['batch'] if fewest else '–'}).", "",
             "| run | policy | batches (from step) | steps to target | examples to target | time to target (s) | "
             "time / fastest fixed | examples / fewest fixed | test acc |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in adaptive["runs"]:
        path = ", ".join(f"{b}@{s}" for s, b in r["batches"])
        time_cell = f"{r['time_to_target_s']:.1f}" if r["time_to_target_s"] is not None else "–"
        accuracy = f"{r['test_accuracy']:.4f}" if r["test_accuracy"] is not None else "–"
        lines.append(f"| {r['name']} | {r['policy']} | {path} | {r['steps_to_target'] or '–'} | "
                     f"{r['examples_to_target'] or '–'} | {time_cell} | "
                     f"{_ratio(r['time_to_target_s'], fastest and fastest['time_to_target_s'])} | "
                     f"{_ratio(r['examples_to_target'], fewest and fewest['examples_to_target'])} | {accuracy} |")
    if plot_file:
        lines += ["", f"![adaptive batch]({plot_file})"]
    return "\n".join(lines)


def plot(adaptive: dict, sweep_dir: str) -> str:
    """adaptive_batch.png: each adaptive run's batch over steps against its measured B_simple; returns its name."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.5, 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    for i, r in enumerate(adaptive["runs"]):
        color = f"C{i}"
        starts = [s for s, _ in r["batches"]] + [r["steps"] or r["batches"][-1][0]]
        batches = [b for _, b in r["batches"]]
        axes.step(starts, batches + batches[-1:], where="post", color=color, label=f"{r['name']}: batch")
        measured = [n for n in r["noise"] if n["noise_scale"] is not None]
        if measured:
            steps = [n["step"] for n in measured]
            values = [n["noise_scale"] for n in measured]
            low = [v - (n["lo"] if n["lo"] is not None else v) for v, n in zip(values, measured)]
            high = [(n["hi"] if n["hi"] is not None else v) - v for v, n in zip(values, measured)]
            axes.errorbar(steps, values, yerr=[low, high], fmt="o", color=color, alpha=0.5, markersize=3,
                          label=f"{r['name']}: B_simple (95%)")
    axes.set_yscale("log", base=2)
    axes.set_xlabel("step")
    axes.set_ylabel("examples")
    axes.set_title("Adaptive batch against the measured noise scale")
    axes.legend(fontsize=7)
    name = "adaptive_batch.png"
    figure.savefig(os.path.join(sweep_dir, name), dpi=110)
    return name
