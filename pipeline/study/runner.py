"""One run of a sweep or a tuning trial in its own directory: skipped when finished, resumed when not, a crash kept.

The run-directory policy that pipeline.sweep and pipeline.study.tuning share. A run directory is reused only for the
config that made it; a finished run (completed, or diverged: a failure is a result) is skipped; any other run
resumes from its last checkpoint; an exception other than bad input (e.g. out of memory at a large batch) is
recorded as a failed run with its traceback in error.txt, and is tried again the next time.

A run on several devices of this machine (--replicas above 1, or --logical-cpus) trains in a process of its own,
`python -m pipeline.train --config <its config>`: TensorFlow splits the CPU only before it sets up its devices,
once per process, and two MirroredStrategy objects of different sizes in one process abort each other's
all-reduce ("joining a group with size 4, but that group has size 2": both number their collectives from 1).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback

from pipeline import config as config_lib
from pipeline import rundir
from pipeline.config import Config, InputError
from pipeline.training import fit_loop


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
        result = _train_apart(config) if needs_own_process(config) else dataclasses.asdict(fit_loop.train(config))
    except (InputError, KeyboardInterrupt):
        raise
    except Exception as e:  # noqa: BLE001 -- one failed run must not end a sweep of many
        os.makedirs(run_dir, exist_ok=True)
        if rundir.read_config(run_dir) is None:  # so that the report can place the failed run
            rundir.write_config(config, run_dir)
        with open(os.path.join(run_dir, "error.txt"), "w", encoding="utf-8") as f:
            f.write(traceback.format_exc())
        message = str(e).splitlines()[0] if str(e) else ""
        result = dataclasses.asdict(fit_loop.Summary(status="failed", run_dir=run_dir,
                                                      reason=f"{type(e).__name__}: {message}"))
        rundir.write_summary(run_dir, result)
    if result["status"] == "interrupted":
        raise KeyboardInterrupt
    return result


INTERRUPT_GRACE_S = 10  # seconds an interrupted sweep waits for a run in its own process to end by itself


def needs_own_process(config: Config) -> bool:
    """Whether the run sets up devices of its own: several replicas on this machine, or a split CPU."""
    return config.replicas > 1 or config.logical_cpus > 1


def _train_apart(config: Config) -> dict:
    """Trains `config` in a new `python -m pipeline.train` process; returns its summary.json contents.

    Raises:
      InputError: the run refused its input (exit code 2), with the run's own one-line message.
      KeyboardInterrupt: the run was interrupted (exit code 130 or 143).
      RuntimeError: the process ended without a summary of this attempt (a crash), with the end of its stderr.
    """
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this code, not another install
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
    with tempfile.TemporaryDirectory(prefix="batchscope-run-") as folder:
        config_file = os.path.join(folder, "config.json")
        with open(config_file, "w", encoding="utf-8") as f:
            json.dump(config_lib.to_dict(config), f)
        started = int(time.time())  # whole seconds: some filesystems store modification times no finer
        with open(os.path.join(folder, "stderr.txt"), "w+", encoding="utf-8") as stderr:
            process = subprocess.Popen([sys.executable, "-m", "pipeline.train", "--config", config_file],
                                       stderr=stderr, env=env)
            try:
                code = process.wait()
            except KeyboardInterrupt:
                # Ctrl-C reaches the whole process group, and the run ends on its own (summary: interrupted); a
                # signal that reached only this process is passed on, so that the run is not left training.
                try:
                    process.wait(timeout=INTERRUPT_GRACE_S)
                except subprocess.TimeoutExpired:
                    process.send_signal(signal.SIGINT)
                    process.wait()
                raise
            stderr.seek(0)
            lines = [line.rstrip() for line in stderr if line.strip()]
    last = lines[-1] if lines else ""
    if code == 2:
        raise InputError(last.removeprefix("error: "))
    if code in (130, 143):  # ended by SIGINT or SIGTERM, with its summary (pipeline/interrupts.py)
        raise KeyboardInterrupt
    summary_file = os.path.join(config.run_dir, "summary.json")
    fresh = os.path.exists(summary_file) and os.path.getmtime(summary_file) >= started
    if code in (0, 1) and fresh:
        return rundir.read_summary(config.run_dir)
    raise RuntimeError(f"pipeline.train exited with code {code}: {last}\n" + "\n".join(lines[-40:]))
