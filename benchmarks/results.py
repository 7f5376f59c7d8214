"""Benchmark result files: every benchmark run writes one JSON file under benchmarks/results/, the data the docs quote.

A result file holds what is needed to trust and reproduce a figure: the command, the commit (and whether the
working tree had changes), the library versions, the machine (CPU count and model, load average before and after
the run), every round's raw numbers, and the summary figures (ratios) the benchmark prints.

Usage inside a benchmark:

    recorder = results.Recorder("speed")          # at start: notes the time and the load average
    ...                                            # the rounds
    path = recorder.write(rounds=[...], summary={...}, settings={...})

`benchmarks/results/<name>.json` is the newest run of a benchmark; older runs stay in the git history.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _git(*args: str) -> str:
    root = os.path.dirname(RESULTS_DIR)
    try:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in ("tensorflow", "keras", "numpy"):
        module = sys.modules.get(name)
        if module is None:
            try:
                from importlib import metadata

                versions[name] = metadata.version(name)
            except Exception:  # noqa: BLE001 -- a missing package is recorded as absent
                versions[name] = None
        else:
            versions[name] = getattr(module, "__version__", None)
    return versions


class Recorder:
    """Collects one benchmark run's context; `write` saves it with the rounds and the summary."""

    def __init__(self, name: str, argv: list[str] | None = None):
        if not name or os.sep in name:
            raise ValueError(f"name: a plain file stem is needed, got {name!r}")
        self.name = name
        # Quoted as a shell needs it, so that the command can be pasted (a --note of several words).
        self.command = shlex.join(["python", *(sys.argv if argv is None else argv)])
        self.started = datetime.datetime.now(datetime.timezone.utc)
        self.load_before = _load()
        # The code that ran: the commit and the changes to tracked files when the benchmark started (an edit made
        # while it runs is not in the modules it has imported).
        self.commit = _git("rev-parse", "HEAD") or None
        self.changed = [line.split(maxsplit=1)[1] for line in
                        _git("status", "--porcelain", "--untracked-files=no").splitlines() if line.strip()]

    def write(self, rounds: list, summary: dict, settings: dict | None = None, directory: str | None = None) -> str:
        """Writes benchmarks/results/<name>.json (atomically) and returns its path.

        Args:
          rounds: every round's raw numbers, as measured (one dict or list per round).
          summary: the figures the benchmark reports (ratios, goals and whether they were met).
          settings: the benchmark's own parameters (model, epochs, ...).
          directory: where to write; benchmarks/results/ by default.
        """
        directory = directory or RESULTS_DIR
        os.makedirs(directory, exist_ok=True)
        record = {
            "benchmark": self.name,
            "command": self.command,
            "commit": self.commit,
            "dirty": bool(self.changed),
            "changed_files": self.changed,
            "started": self.started.isoformat(timespec="seconds"),
            "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": {"cpus": os.cpu_count(), "cpu_model": _cpu_model(), "system": platform.platform(),
                        "load_before": self.load_before, "load_after": _load()},
            "versions": _versions(),
            "settings": settings or {},
            "rounds": rounds,
            "summary": summary,
        }
        path = os.path.join(directory, f"{self.name}.json")
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=1, default=float)
            f.write("\n")
        os.replace(tmp, path)
        return path
