"""One row of a sweep's report from a run directory: its config, summary, history, instruments' records and checks.

The definitions of each field are in pipeline/study/sweep_report.py's docstring (per run: steps, epochs and time to
target, time per step, B_simple near the target, the gradient's standard deviation, the BN discrepancy); the
sharpness fields come from pipeline/study/sharpness.py, the target's validation-noise draws from
pipeline/study/bootstrap.py.
"""

from __future__ import annotations

import os

import numpy as np

from pipeline import run_timing, rundir
from pipeline.study import bootstrap, sharpness
from pipeline.study import fits as fits_lib
from pipeline.training import target_record

BN_KEYS = ("batch_mean_error", "batch_var_error", "moving_mean_error", "moving_var_error")


def read_run(run_dir: str) -> dict | None:
    """One row of the report from a run directory, or None if the run has not written its config."""
    recorded = rundir.read_config(run_dir)
    if not recorded:
        return None
    config, summary = recorded["config"], rundir.read_summary(run_dir) or {}
    batch = config["batch"] * config.get("accumulate", 1)
    # The devices the run trained on (config.json's "parallel"; a run that never started: what its config asks).
    replicas = recorded.get("parallel", {}).get("replicas") or max(1, config.get("replicas", 1))
    per_replica = config["batch"] // replicas
    row = {"name": os.path.basename(run_dir), "norm": config["norm"], "batch": batch, "seed": config["seed"],
           "replicas": replicas, "per_replica_batch": per_replica,
           "bn_batch": summary.get("bn_batch") or (config["batch"] if config["norm"] == "syncbatch" else per_replica),
           "status": summary.get("status", "unfinished"), "reason": summary.get("reason", ""),
           "lr": recorded.get("effective_lr", config["lr"]), "momentum": config.get("momentum"),
           "warmup_epochs": config.get("warmup_epochs"), "target": config.get("target_accuracy") or None}
    for key in ("test_accuracy", "train_accuracy", "val_accuracy", "steps", "epochs", "wall_time_s",
                *bootstrap.TARGET_KEYS):
        row[key] = summary.get(key)
    train, test = row["train_accuracy"], row["test_accuracy"]
    row["generalization_gap"] = train - test if train is not None and test is not None else None
    # A resumed run measures the steps after its checkpoint again; the last measurement of a step counts.
    by_step = {r["step"]: r for r in rundir.read_jsonl(os.path.join(run_dir, "grad_stats.jsonl")) if "step" in r}
    grad = [by_step[step] for step in sorted(by_step)]
    bn_averages = (rundir.read_json(os.path.join(run_dir, "bn_stats.json")) or {}).get("averages", [])

    history = rundir.read_history(run_dir)
    row["best_val_accuracy"] = max((r["val_accuracy"] for r in history if "val_accuracy" in r), default=None)
    # The same definitions as summary.json's (pipeline.rundir); a run without a history has only its summary.
    seconds = run_timing.time_per_step(history) or summary.get("time_per_step_s")
    row["time_per_step_ms"] = 1000 * seconds if seconds else None
    row["examples_per_sec"] = run_timing.examples_per_sec(history) or summary.get("examples_per_sec")
    # Validation noise of the target metrics: resampled first crossings (pipeline/study/bootstrap.py), not in report.json.
    row["target_draws"] = (bootstrap.run_draws(target_record.read(run_dir), history)
                           if row["status"] == "completed" and row["steps_to_target"] is not None else None)
    row["target_interval"] = ({k: v for k, v in row["target_draws"].items() if k != "draws"}
                              if row["target_draws"] else None)
    # A completed run that never reached the target is censored: its steps and time to target exceed what it trained.
    # (Without a history: the steps at the summary's time per step.)
    trained = (run_timing.train_time(history) - run_timing.instrument_time(history) if history
               else seconds * row["steps"] if seconds and row["steps"] else None)
    row["censored_at"] = ({"steps_to_target": row["steps"], "time_to_target_s": trained}
                          if row["status"] == "completed" and row["target"] and row["steps_to_target"] is None
                          and row["steps"] else None)

    # Over the run's measurements, which the sweep spreads over the same fractions of every run's budget.
    stds = [r["grad/batch_std"] for r in grad if r.get("grad/batch_std") is not None]
    row["grad_std"] = float(np.sqrt(np.mean(np.square(stds)))) if stds else None
    steps_to_target = row["steps_to_target"]
    near = fits_lib.pooled_noise_scale(grad, steps_to_target / 2, steps_to_target) if steps_to_target else None
    row["noise_near_target"] = near
    row["noise_scale"] = near["noise_scale"] if near else None
    row["noise_growth"] = fits_lib.noise_growth(grad, row["steps"])["verdict"] if grad and row["steps"] else None
    row["noise_curve"] = [{"examples": r["step"] * batch, "noise_scale": r.get("grad/noise_scale"),
                           "lo": r.get("grad/noise_scale_lo"), "hi": r.get("grad/noise_scale_hi"),
                           "lower_bound": bool(r.get("grad/noise_scale_is_lower_bound"))} for r in grad]
    for key in BN_KEYS:
        values = [m[key] for m in bn_averages if m.get(key) is not None]
        row[f"bn_{key}"] = float(np.sqrt(np.mean(np.square(values)))) if values else None
    row.update(sharpness.run_fields(run_dir, row, config, summary))
    return row
