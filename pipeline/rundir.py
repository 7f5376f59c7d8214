"""The run directory: checks before a run, config.json with versions and commit, metrics.jsonl, summary.json."""

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
    """Writes JSON to a temporary file and renames it into place, so readers never see half a file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
    os.replace(tmp, path)


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


def metrics_logger(run_dir: str, examples_per_step: int):
    """A Keras callback appending one JSON line per epoch to metrics.jsonl.

    It adds `learning_rate` and `examples_per_sec` to the epoch logs, so that TensorBoard and CSVLogger
    (which come after it in the callback list) record them too. On resume, lines of epochs that are
    run again are dropped first. Each line has the epoch's wall time `epoch_time_s` (training, validation,
    measuring) and `instrument_time_s`, the part of it that the callbacks in `.instruments` (each with a
    `seconds` total) spent measuring; examples_per_sec leaves that part out.
    """
    import keras

    path = os.path.join(run_dir, "metrics.jsonl")

    class MetricsLogger(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.first_epoch = True
            self.examples_per_step = examples_per_step
            self.instruments = []

        def measuring(self):
            from callbacks import timing

            return timing.seconds(self.instruments)

        def on_epoch_begin(self, epoch, logs=None):
            if self.first_epoch and os.path.exists(path):
                with open(path, encoding="utf-8") as f:
                    kept = [line for line in f if line.strip() and json.loads(line)["epoch"] < epoch]
                with open(path, "w", encoding="utf-8") as f:
                    f.writelines(kept)
            self.first_epoch = False
            self.start, self.start_measuring = time.perf_counter(), self.measuring()
            self.start_step = int(self.model.optimizer._iterations.numpy())

        def on_epoch_end(self, epoch, logs=None):
            logs = logs if logs is not None else {}
            seconds = time.perf_counter() - self.start
            measuring = self.measuring() - self.start_measuring
            optimizer = self.model.optimizer
            step = int(optimizer._iterations.numpy())
            logs["learning_rate"] = last_learning_rate(optimizer)
            training = max(seconds - measuring, 1e-9)
            logs["examples_per_sec"] = (step - self.start_step) * self.examples_per_step / training
            record = {"epoch": epoch, "step": step, "epoch_time_s": seconds, "instrument_time_s": measuring}
            record.update({k: float(v) for k, v in logs.items() if _is_number(v)})
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    return MetricsLogger()


def last_learning_rate(optimizer) -> float:
    """The learning rate of the last step taken (Keras' `optimizer.learning_rate` is the next step's)."""
    import keras

    schedule = optimizer._learning_rate
    if isinstance(schedule, keras.optimizers.schedules.LearningRateSchedule):
        return float(schedule(max(int(optimizer._iterations.numpy()) - 1, 0)))
    return float(optimizer.learning_rate)


def _is_number(value) -> bool:
    try:
        float(value)
        return True
    except (TypeError, ValueError):
        return False
