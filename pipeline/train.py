"""Trains, evaluates and exports one model: `python -m pipeline.train --batch 32`.

The run itself is pipeline.fit_loop.train(); this module only parses the flags, calls it and prints the summary.
"""

from __future__ import annotations

import json
import sys

from pipeline import flags, startup
from pipeline.config import InputError
from pipeline.fit_loop import train


def main(argv=None) -> int:
    """Parses flags, trains, prints the summary as one JSON line; bad input exits with code 2 and one line."""
    try:
        config, _ = flags.parse(argv, description=__doc__.splitlines()[0])
        startup.import_tensorflow()
        summary = train(config)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Before the run directory was created: there is nothing to resume.
        print(json.dumps({"status": "interrupted", "stage": "setup", "run_dir": None}))
        print("interrupted before the run started; nothing was written", file=sys.stderr)
        return 130
    keys = ("status", "stage", "reason", "test_accuracy", "val_accuracy", "train_accuracy", "steps", "wall_time_s",
            "export_path", "run_dir")
    print(json.dumps({k: getattr(summary, k) for k in keys}, default=str))
    if summary.status != "completed":
        print(f"run {summary.status}: {summary.reason}", file=sys.stderr)
    return {"completed": 0, "failed": 1, "interrupted": 130}[summary.status]


if __name__ == "__main__":
    sys.exit(main())
