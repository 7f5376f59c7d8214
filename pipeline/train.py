"""Trains, evaluates and exports one model: `python -m pipeline.train --batch 32`.

The run itself is pipeline.training.fit_loop.train(); this module only parses the flags, calls it and prints the summary.
"""

from __future__ import annotations

import json
import sys

from pipeline import cli, flags, startup
from pipeline.training.fit_loop import train


def main(argv=None) -> int:
    """Parses flags, trains, prints the summary as one JSON line; bad input exits with code 2 and one line."""
    def command() -> int:
        config, _ = flags.parse(argv, description=__doc__.splitlines()[0])
        startup.import_tensorflow()
        summary = train(config)
        keys = ("status", "stage", "reason", "test_accuracy", "val_accuracy", "train_accuracy", "steps",
                "wall_time_s", "export_path", "run_dir")
        print(json.dumps({k: getattr(summary, k) for k in keys}, default=str))
        if summary.status != "completed":
            print(f"run {summary.status}: {summary.reason}", file=sys.stderr)
        # An interrupted run exits as the signal would have ended it: 130 after SIGINT, 143 after SIGTERM.
        return {"completed": 0, "failed": 1, "interrupted": cli.interrupted_code()}[summary.status]

    # An interruption that reaches here came before the run directory was created: there is nothing to resume.
    return cli.run(command, "interrupted before the run started; nothing was written",
                   interrupted_json={"status": "interrupted", "stage": "setup", "run_dir": None})


if __name__ == "__main__":
    sys.exit(main())
