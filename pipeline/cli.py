"""The entry points' one ending: bad input is one line and exit code 2, an interruption one line and 130."""

from __future__ import annotations

import json
import sys
from typing import Callable

from pipeline.config import InputError

BAD_INPUT, INTERRUPTED = 2, 130  # exit codes; a run's own endings add 0 (completed) and 1 (failed)


def run(command: Callable[[], int], interrupted: str = "interrupted; nothing was written",
        interrupted_json: dict | None = None) -> int:
    """Runs an entry point's `command` and returns its exit code.

    Args:
        command: parses the flags, does the work, prints the result; returns the exit code (0 when all went well).
        interrupted: the line on stderr after Ctrl-C: what was kept and what a rerun does.
        interrupted_json: also printed after Ctrl-C, as one JSON line on stdout, for an entry point whose stdout is
            one JSON line per run.

    Returns:
        command's code; 2 after an InputError (printed as one line "error: ..." on stderr, never a traceback);
        130 after Ctrl-C.
    """
    try:
        return command()
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return BAD_INPUT
    except KeyboardInterrupt:
        if interrupted_json is not None:
            print(json.dumps(interrupted_json))
        print(interrupted, file=sys.stderr)
        return INTERRUPTED
