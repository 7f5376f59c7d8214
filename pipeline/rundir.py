"""The run directory: checks before a run, and the one reader and writer of each of its files (config.json with
versions and commit, the history metrics.jsonl, summary.json) and the one definition of each metric derived from
them (time per step, examples per second, time to target, training and instrument time); where a run or a sweep
writes by default.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time

from pipeline.config import Config, InputError, from_dict, to_dict

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG, HISTORY, SUMMARY = "config.json", "metrics.jsonl", "summary.json"
# pipeline/training/checkpoint.py's folder and its record of the last committed checkpoint (read here, written there).
CHECKPOINTS, CHECKPOINT_STATE = "checkpoints", "checkpoint.json"


def write_json_atomic(path: str, value) -> None:
    """Writes a run-directory file as JSON, atomically (callbacks.checked_io.write_json_atomic).

    Imported when called: the callbacks package brings TensorFlow, which checking a run directory does not need.
    """
    from callbacks import checked_io

    checked_io.write_json_atomic(path, value)


def read_json(path: str) -> dict | None:
    """A JSON file of a run or sweep directory, or None when it is missing or not complete JSON (yet)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# Config fields that say where and how a run is started, not what it computes: they may differ between the
# attempts of one run (--resume) and between a sweep's reruns. A cache of streamed input holds the order that
# streaming reads without it, so it changes the speed of a run, not its numbers (pipeline/data/streamed.py). The threads
# per op change the speed and the order of sums inside an op, so the rounding, as another machine would.
PER_RUN_FIELDS = ("run_dir", "resume", "overwrite", "verbose", "cache_dir", "intra_op_threads")
# Fields that act only after training (precise BN, evaluation, export), which a resumed run redoes: --resume may
# change them. The target accuracy is not one: it is checked during training (pipeline/training/target.py).
AFTER_TRAINING_FIELDS = ("precise_bn_samples", "export")
# Where training stops: --resume may move them under the rules of `config_change`.
STOP_FIELDS = ("epochs", "max_steps")


def read_jsonl(path: str) -> list[dict]:
    """The records of a JSON-lines file of a run directory (metrics.jsonl, grad_stats.jsonl), in order; [] without
    the file."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_checkpoint_state(directory: str) -> dict | None:
    """The last committed checkpoint's record ({"epoch", "step", "weights", "previous"}) in a checkpoints folder,
    or None."""
    state = read_json(os.path.join(directory, CHECKPOINT_STATE))
    return state if isinstance(state, dict) and "weights" in state else None


def read_summary(run_dir: str) -> dict | None:
    """summary.json (pipeline.training.fit_loop.Summary as a dict), or None before the run has ended."""
    return read_json(os.path.join(run_dir, SUMMARY))


def write_summary(run_dir: str, summary: dict) -> None:
    write_json_atomic(os.path.join(run_dir, SUMMARY), summary)


def read_config(run_dir: str) -> dict | None:
    """config.json: {"config": Config fields, "effective_lr", ...} (write_config), or None before it is written."""
    recorded = read_json(os.path.join(run_dir, CONFIG))
    return recorded if isinstance(recorded, dict) and isinstance(recorded.get("config"), dict) else None


def recorded_config(run_dir: str) -> dict | None:
    """The config fields in run_dir/config.json, or None when the run stopped before writing it."""
    recorded = read_config(run_dir)
    return recorded["config"] if recorded else None


def _stop_refusal(field: str, recorded: dict, config: Config, trained: dict) -> str:
    """Why --resume may not move the stop `field` of the recorded run, or "" when it may."""
    if field == "epochs" and config.schedule == "cosine":
        return "the cosine schedule spans all epochs, so every step's learning rate would change"
    if recorded.get("max_steps") and trained["step"] >= recorded["max_steps"]:
        return f"training already stopped at --max-steps {recorded['max_steps']}, which may be inside an epoch"
    if field == "epochs" and config.epochs < trained["epoch"]:
        return f"{trained['epoch']} epochs are already trained"
    if field == "max_steps" and config.max_steps and config.max_steps < trained["step"]:
        return f"{trained['step']} steps are already trained"
    return ""


def config_change(run_dir: str, config: Config, *, resuming: bool) -> tuple[str, object, object, str] | None:
    """The first field in which `config` may not differ from the run recorded in run_dir, or None.

    Every field but PER_RUN_FIELDS must match a finished run (resuming=False: a sweep skips it as done). A run
    that continues (resuming=True) may also change AFTER_TRAINING_FIELDS, and move its stop (epochs, max_steps)
    when the result is the run that the new values would have given uninterrupted: the learning-rate schedule
    must not depend on the changed value (cosine depends on epochs; constant, step, multistep and exponential
    schedules are defined per epoch already taken), the new stop must not lie before what is already trained,
    and the run must not have stopped at max_steps (the rest of that epoch would be skipped).

    Returns:
      (field, recorded value, new value, why the change is refused), or None.
    """
    recorded = recorded_config(run_dir)
    if recorded is None:
        return None  # Stopped before writing its config: nothing to compare, it starts afresh.
    wanted = to_dict(config)
    allowed = PER_RUN_FIELDS + (AFTER_TRAINING_FIELDS + STOP_FIELDS if resuming else ())
    for field, value in wanted.items():
        if field in recorded and recorded[field] != value and field not in allowed:
            return field, recorded[field], value, "it changes what was already trained"
    if resuming:
        trained = read_checkpoint_state(os.path.join(run_dir, CHECKPOINTS)) or {"epoch": 0, "step": 0}
        for field in STOP_FIELDS:
            if field in recorded and recorded[field] != wanted[field]:
                why = _stop_refusal(field, recorded, config, trained)
                if why:
                    return field, recorded[field], wanted[field], why
    return None


def latest_resumable(config: Config, folder: str) -> str:
    """The run directory that `--resume` without `--run-dir` continues: the most recent unfinished run (interrupted,
    failed, or stopped before writing its summary) under `folder` that `config_change` lets this config continue.

    Raises:
      InputError: no such run, in one line listing the runs found and why each is not continued.
    """
    found = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        run_dir = os.path.join(folder, name)
        if recorded_config(run_dir) is None:
            continue
        summary = read_summary(run_dir)
        status = summary.get("status", "unknown") if summary else "unfinished"
        latest = os.path.getmtime(os.path.join(run_dir, SUMMARY if summary else CONFIG))
        change = None if status == "completed" else config_change(run_dir, config, resuming=True)
        found.append((latest, run_dir, status, change))
    for _, run_dir, status, change in sorted(found, reverse=True):
        if status != "completed" and change is None:
            print(f"--resume: continuing {run_dir} ({status}), the most recent unfinished run of this config",
                  file=sys.stderr)
            return run_dir
    listed = "; ".join(f"{run_dir} {status}" + (f" (--{change[0].replace('_', '-')} {change[1]!r}, this command "
                                                  f"{change[2]!r})" if change else "")
                       for _, run_dir, status, change in sorted(found, reverse=True)[:5])
    raise InputError(f"--resume: no interrupted or failed run of this config under {folder}/ "
                     f"({'found: ' + listed if found else 'it holds no runs'}); pass --run-dir to choose one, or "
                     "leave out --resume to start a new run")


def _check_writable(run_dir: str) -> None:
    """Raises InputError unless run_dir exists as a writable folder or could be created; creates nothing."""
    path = os.path.abspath(run_dir)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise InputError(f"--run-dir: cannot create {run_dir} ({path} is not a folder); choose a writable folder")
    if not os.access(path, os.W_OK | os.X_OK):
        raise InputError(f"--run-dir: cannot write to {path}; choose a writable folder")


def check(config: Config, run_dir: str) -> bool:
    """Checks that this run may use run_dir, without creating or changing anything.

    A finished run is kept unless --overwrite; an unfinished one continues only with --resume and only with a
    config that `config_change` accepts, so that nothing already computed is silently replaced or mixed.

    Returns:
      True if the run continues the unfinished run in run_dir, False if it starts a new one.
    Raises:
      InputError: run_dir may not be used, naming the flag to pass or the field that changed.
    """
    summary = read_summary(run_dir)
    has_content = os.path.isdir(run_dir) and bool(os.listdir(run_dir))
    if not config.overwrite and summary and summary.get("status") == "completed":
        raise InputError(f"--run-dir: {run_dir} holds a completed run; pass --overwrite to replace it")
    if not config.overwrite and has_content and not config.resume:
        raise InputError(
            f"--run-dir: {run_dir} holds an unfinished run; pass --resume to continue it or --overwrite to replace it"
        )
    if config.resume and has_content:
        change = config_change(run_dir, config, resuming=True)
        if change:
            field, old, new, why = change
            raise InputError(f"--{field.replace('_', '-')}: the run in {run_dir} has {old!r}, this command {new!r}; "
                             f"--resume refuses the change because {why} (start a new run with another --run-dir "
                             "or --overwrite)")
        return True
    if config.resume:
        print(f"--resume: {run_dir} holds no run to resume; starting a new run", file=sys.stderr)
    _check_writable(run_dir)
    return False


def create(config: Config, run_dir: str, parallel: dict | None = None) -> int:
    """Makes run_dir for an accepted run (emptying it first with --overwrite) and writes config.json.

    Returns:
      The attempt this is: 1 for a new run, one more than the previous attempt's for a run that continues.
    """
    if config.overwrite and os.path.isdir(run_dir):
        shutil.rmtree(run_dir)
    try:
        os.makedirs(run_dir, exist_ok=True)
    except OSError as e:
        raise InputError(f"--run-dir: cannot write to {run_dir} ({e.strerror}); choose a writable folder") from None
    previous = read_config(run_dir)
    attempt = previous.get("attempt", 1) + 1 if previous else 1
    write_config(config, run_dir, parallel, attempt)
    return attempt


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


def write_config(config: Config, run_dir: str, parallel: dict | None = None, attempt: int = 1) -> None:
    """config.json: the resolved config (loadable with --config), versions, commit and command line of the attempt
    that wrote it.

    parallel: how the steps run ({"strategy", "replicas", "workers", "per_replica_batch", "steps_per_execution",
      "intra_op_threads"}).
    attempt: which attempt at the run this is (1, then one more at each --resume).
    """
    write_json_atomic(
        os.path.join(run_dir, CONFIG),
        {
            "config": to_dict(config),
            "effective_lr": config.effective_lr,
            "parallel": parallel or {},
            "versions": versions(),
            "git_commit": git_commit(),
            "command": sys.argv,
            "attempt": attempt,
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
    """The run's per-epoch records (pipeline.training.run_control.MetricsLogger), in order; [] before an epoch ends."""
    return read_jsonl(os.path.join(run_dir, HISTORY))


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


def default_out(config: Config, folder: str) -> str:
    """<folder>/<dataset>-<model>, the default output of a sweep or an advice (dataset name made file-safe)."""
    name = config.dataset.rstrip("/").split("/")[-1]
    safe_dataset = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
    return os.path.join(folder, f"{safe_dataset}-{config.model}")


def default_run_dir(config: Config, now: str) -> str:
    """runs/<time>-<model>-b<batch>, the place a run writes to when --run-dir is not given."""
    return os.path.join("runs", f"{now}-{config.model}-b{config.batch or 'adaptive'}")
