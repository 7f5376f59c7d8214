"""One run of a sweep or a tuning trial in its own directory: skipped when finished, resumed when not, a crash kept.

The run-directory policy that pipeline.sweep and pipeline.tuning share. A run directory is reused only for the
config that made it; a finished run (completed, or diverged: a failure is a result) is skipped; any other run
resumes from its last checkpoint; an exception other than bad input (e.g. out of memory at a large batch) is
recorded as a failed run with its traceback in error.txt, and is tried again the next time.
"""

from __future__ import annotations

import dataclasses
import os
import traceback

from pipeline import config as config_lib
from pipeline import rundir
from pipeline import train as train_lib
from pipeline.config import Config, InputError

def changed_field(run_dir: str, config: Config) -> tuple[str, object] | None:
    """(field, recorded value) of the first field in which the run in run_dir differs from `config`, or None.

    A sweep compares strictly (rundir.config_change with resuming=False, the comparison that --resume also uses):
    its report compares runs that must be exactly the configs it lists.
    """
    changed = rundir.config_change(run_dir, config, resuming=False)
    return changed[:2] if changed else None


def same_config(run_dir: str, config: Config) -> bool:
    """Whether run_dir holds no run, or a run of this config (which may then be skipped or resumed)."""
    return changed_field(run_dir, config) is None


def run_one(config: Config, run_dir: str) -> dict:
    """Trains one run unless it is finished; resumes it if unfinished. Returns its summary.json contents.

    Raises:
      InputError: run_dir holds a run of another config (and config.overwrite is off), or the input is bad.
      KeyboardInterrupt: the run was interrupted; run it again to resume it.
    """
    summary = rundir.read_summary(run_dir)
    if not config.overwrite:
        changed = changed_field(run_dir, config)
        if changed:
            raise InputError(f"--out: {run_dir} was run with {changed[0]}={changed[1]!r}, this sweep asks for "
                             f"{getattr(config, changed[0])!r}; use a new --out, or pass --overwrite to run it again")
        # A diverged run is a result; a run that raised an error (error.txt) is tried again.
        error_file = os.path.join(run_dir, "error.txt")
        crashed = os.path.exists(error_file)
        if summary and (summary.get("status") == "completed" or (summary.get("status") == "failed" and not crashed)):
            return summary | {"skipped": True}
        if crashed:
            os.remove(error_file)
    started = os.path.isdir(run_dir) and bool(os.listdir(run_dir))
    config = dataclasses.replace(config, run_dir=run_dir, resume=started and not config.overwrite)
    try:
        result = dataclasses.asdict(train_lib.train(config))
    except (InputError, KeyboardInterrupt):
        raise
    except Exception as e:  # noqa: BLE001 -- one failed run must not end a sweep of many
        os.makedirs(run_dir, exist_ok=True)
        if not os.path.exists(os.path.join(run_dir, "config.json")):  # so that the report can place the failed run
            rundir.write_json_atomic(os.path.join(run_dir, "config.json"),
                                     {"config": config_lib.to_dict(config), "effective_lr": config.effective_lr})
        with open(os.path.join(run_dir, "error.txt"), "w", encoding="utf-8") as f:
            f.write(traceback.format_exc())
        message = str(e).splitlines()[0] if str(e) else ""
        result = dataclasses.asdict(train_lib.Summary(status="failed", run_dir=run_dir,
                                                      reason=f"{type(e).__name__}: {message}"))
        rundir.write_json_atomic(os.path.join(run_dir, "summary.json"), result)
    if result["status"] == "interrupted":
        raise KeyboardInterrupt
    return result
