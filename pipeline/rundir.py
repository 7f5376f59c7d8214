"""The run directory: checks before a run, and the one reader and writer of each of its files (config.json with
versions and commit, the history metrics.jsonl, summary.json) and the one definition of each metric derived from
them (time per step, examples per second, time to target, training and instrument time).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

from pipeline.config import Config, InputError, from_dict, to_dict

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG, HISTORY, SUMMARY = "config.json", "metrics.jsonl", "summary.json"


def write_json_atomic(path: str, value) -> None:
    """Writes a run-directory file as JSON, atomically (callbacks.checked_io.write_json_atomic).

    Imported when called: the callbacks package brings TensorFlow, which checking a run directory does not need.
    """
    from callbacks import checked_io

    checked_io.write_json_atomic(path, value)


def _read_json(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_summary(run_dir: str) -> dict | None:
    """summary.json (pipeline.train.Summary as a dict), or None before the run has ended."""
    return _read_json(os.path.join(run_dir, SUMMARY))


def write_summary(run_dir: str, summary: dict) -> None:
    write_json_atomic(os.path.join(run_dir, SUMMARY), summary)


def read_config(run_dir: str) -> dict | None:
    """config.json: {"config": Config fields, "effective_lr", ...} (write_config), or None before it is written."""
    recorded = _read_json(os.path.join(run_dir, CONFIG))
    return recorded if isinstance(recorded, dict) and isinstance(recorded.get("config"), dict) else None


def prepare(config: Config, run_dir: str) -> None:
    """Checks that run_dir may be used for this run and creates it.

    A finished run is kept unless --overwrite; an unfinished one continues only with --resume, so that
    nothing already computed is silently replaced.
    """
    summary = read_summary(run_dir)
    has_content = os.path.isdir(run_dir) and bool(os.listdir(run_dir))
    if config.overwrite and has_content:
        shutil.rmtree(run_dir)
    elif summary and summary.get("status") == "completed" and not config.overwrite:
        raise InputError(f"--run-dir: {run_dir} holds a completed run; pass --overwrite to replace it")
    elif has_content and not config.resume:
        raise InputError(
            f"--run-dir: {run_dir} holds an unfinished run; pass --resume to continue it or --overwrite to replace it"
        )
    try:
        os.makedirs(run_dir, exist_ok=True)
        probe = os.path.join(run_dir, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise InputError(f"--run-dir: cannot write to {run_dir} ({e.strerror}); choose a writable folder") from None


def git_commit() -> str | None:
    """The commit of the code that runs, with '-dirty' when it has uncommitted changes, or None."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                                timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict:
    import keras
    import numpy
    import tensorflow as tf
    import tensorflow_datasets as tfds

    return {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "tensorflow_datasets": tfds.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "devices": [d.name for d in tf.config.list_physical_devices()],
    }


def write_config(config: Config, run_dir: str) -> None:
    """config.json: the resolved config (loadable with --config), versions, commit and command line."""
    write_json_atomic(
        os.path.join(run_dir, CONFIG),
        {
            "config": to_dict(config),
            "effective_lr": config.effective_lr,
            "versions": versions(),
            "git_commit": git_commit(),
            "command": sys.argv,
            "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    )


def run_config(run_dir: str) -> Config:
    """The run's resolved Config, from config.json.

    Raises:
      InputError: config.json is missing, unreadable or holds fields that Config does not have.
    """
    recorded = read_config(run_dir)
    path = os.path.join(run_dir, CONFIG)
    if recorded is None:
        raise InputError(f"{path} is missing or is not a run's config.json")
    return from_dict(recorded["config"], source=path)


def read_history(run_dir: str) -> list[dict]:
    """The run's per-epoch records (pipeline.run_callbacks.MetricsLogger), in order; [] before an epoch ends."""
    path = os.path.join(run_dir, HISTORY)
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def keep_history_before(run_dir: str, epoch: int) -> None:
    """Drops the records of `epoch` and later, which a resumed run trains again."""
    path = os.path.join(run_dir, HISTORY)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            kept = [line for line in f if line.strip() and json.loads(line)["epoch"] < epoch]
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(kept)


def append_history(run_dir: str, record: dict) -> None:
    """Appends one epoch's record."""
    with open(os.path.join(run_dir, HISTORY), "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


# Metrics derived from the history. Each leaves out the first epoch, whose time includes tracing and compiling the
# train step (the only epoch of a one-epoch run is used), and the instruments' measuring (instrument_time_s): the
# same number of measurements per run would otherwise slow the few steps of a large batch the most. An epoch's
# time includes its end-of-epoch validation.


def _steady(history: list[dict]) -> list[tuple[dict, int]]:
    """(record, steps in that epoch) of the epochs after the first, or of the first when it is the only one."""
    epochs, previous = [], 0
    for record in history:
        epochs.append((record, record["step"] - previous))
        previous = record["step"]
    return epochs[1:] or epochs


def _training_seconds(record: dict) -> float:
    return record["epoch_time_s"] - record.get("instrument_time_s", 0.0)


def time_per_step(history: list[dict]) -> float | None:
    """Seconds per step: the median over the steady epochs of (epoch time - measuring) / steps; None without one."""
    per_step = [_training_seconds(record) / steps for record, steps in _steady(history) if steps > 0]
    return float(statistics.median(per_step)) if per_step else None


def examples_per_sec(history: list[dict]) -> float | None:
    """Training examples per second: the median over the steady epochs of their examples_per_sec (examples /
    (epoch time - measuring), as pipeline.run_callbacks.MetricsLogger logs it); None without one."""
    rates = [record["examples_per_sec"] for record, steps in _steady(history)
             if steps > 0 and "examples_per_sec" in record]
    return float(statistics.median(rates)) if rates else None


def time_to_target(steps_to_target: float | None, seconds_per_step: float | None) -> float | None:
    """Steps to target x time per step: training time to the target without start-up, tracing and measuring, so
    that one-time costs do not decide which batch size is fastest."""
    return steps_to_target * seconds_per_step if steps_to_target and seconds_per_step else None


def train_time(history: list[dict]) -> float:
    """Seconds inside training epochs (validation and measuring included), summed over resumed attempts."""
    return sum(record["epoch_time_s"] for record in history)


def instrument_time(history: list[dict]) -> float:
    """The part of train_time spent measuring (gradient and BN statistics, dynamics)."""
    return sum(record.get("instrument_time_s", 0.0) for record in history)
