"""The entry points' one ending: bad input is one line and exit code 2; an interruption (Ctrl-C or SIGTERM) one line
and the code the signal would have ended the process with, 130 after SIGINT, 143 after SIGTERM."""

from __future__ import annotations

import json
import sys
from typing import Callable

from pipeline import interrupts
from pipeline.config import InputError

BAD_INPUT = 2  # exit code; a run's own endings add 0 (completed), 1 (failed) and the interruption's code


def run(command: Callable[[], int], interrupted: str = "interrupted; nothing was written",
        interrupted_json: dict | None = None) -> int:
    """Runs an entry point's `command` and returns its exit code.

    SIGTERM (a timeout, docker, Slurm, Kubernetes) ends the command as Ctrl-C does (pipeline/interrupts.py): the
    handlers are installed before `command` starts.

    Args:
        command: parses the flags, does the work, prints the result; returns the exit code (0 when all went well).
        interrupted: the line on stderr after an interruption: what was kept and what a rerun does.
        interrupted_json: also printed after an interruption, as one JSON line on stdout, for an entry point whose
            stdout is one JSON line per run.

    Returns:
        command's code; 2 after an InputError (printed as one line "error: ..." on stderr, never a traceback);
        after an interruption, 130 (SIGINT) or 143 (SIGTERM), see `interrupted_code`.
    """
    interrupts.install()
    try:
        return command()
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return BAD_INPUT
    except KeyboardInterrupt:
        if interrupted_json is not None:
            print(json.dumps(interrupted_json))
        print(interrupted, file=sys.stderr)
        return interrupted_code()


def interrupted_code() -> int:
    """The exit code of an interrupted command: 128 + the first signal's number (SIGINT 130, SIGTERM 143), 130
    for a KeyboardInterrupt raised otherwise."""
    return interrupts.exit_code()
