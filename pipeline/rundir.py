"""The run directory: checks before a run, config.json with versions and commit, the history, summary.json."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time

from pipeline.config import Config, InputError, to_dict

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_json_atomic(path: str, value) -> None:
    """Writes a run-directory file as JSON, atomically (callbacks.checked_io.write_json_atomic).

    Imported when called: the callbacks package brings TensorFlow, which checking a run directory does not need.
    """
    from callbacks import checked_io

    checked_io.write_json_atomic(path, value)


def read_summary(run_dir: str) -> dict | None:
    try:
        with open(os.path.join(run_dir, "summary.json"), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


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
        os.path.join(run_dir, "config.json"),
        {
            "config": to_dict(config),
            "effective_lr": config.effective_lr,
            "versions": versions(),
            "git_commit": git_commit(),
            "command": sys.argv,
            "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    )


HISTORY = "metrics.jsonl"  # one JSON record per epoch, written by pipeline.run_callbacks.MetricsLogger


def read_history(run_dir: str) -> list[dict]:
    """The run's per-epoch records, in order; [] before the first epoch ends."""
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
