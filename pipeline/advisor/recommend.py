"""Recommends a batch size and learning rate from a short probe: `python -m pipeline.advise --max-batch 256`.

The probe (pipeline/advisor/probe.py) trains a few hundred steps at --base-batch with --lr, measuring the gradient noise
scale, and times training steps at a ladder of batch sizes up to --max-batch; pipeline/training/goodput.py turns that into
goodput by batch size; <out>/advice.json, advice.md and goodput.png hold the result, and one line is printed.
`python -m pipeline.train --advice <out>/advice.json` then trains at the advised batch and learning rate.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from pipeline import cli, flags, startup
from pipeline.config import InputError

# Config fields the advisor decides or does not use: the probe runs at --base-batch, in --out; its own --max-batch
# replaces the adaptive batch's.
NOT_FLAGS = ("batch", "batch_schedule", "advice", "run_dir", "resume", "overwrite", "export", "max_batch",
             "batch_policy", "norm_test_theta")


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"got {text!r}; must be an integer >= 0 (0: automatic)")
    return value


def _add_flags(parser: argparse.ArgumentParser) -> tuple[str, ...]:
    advisor = parser.add_argument_group("advisor")
    advisor.add_argument("--probe-steps", type=_count, default=0, metavar="N",
                         help="training steps at --base-batch that measure the noise scale (0: a fifth of the "
                              "planned run's steps, 40 to 300)")
    advisor.add_argument("--max-batch", type=_count, default=0, metavar="N",
                         help="largest batch to time and recommend (0: 8 x --base-batch)")
    advisor.add_argument("--out", default="", metavar="DIR", help="where advice.json goes (\"\": "
                         "advice/<dataset>-<model>)")
    return NOT_FLAGS


def advise(config, probe_steps: int, max_batch: int, out: str) -> dict:
    """Probes, builds the advice and writes it to `out`; returns the advice (pipeline/advisor/advice_report.py)."""
    from pipeline import rundir
    from pipeline.advisor import advice_report as advice_lib
    from pipeline.advisor import probe

    if 0 < probe_steps < 8:
        raise InputError(f"--probe-steps: got {probe_steps}; needs at least 8 steps (a few hundred for a stable "
                         "noise scale), or 0 for automatic")
    if max_batch < config.base_batch:
        raise InputError(f"--max-batch: got {max_batch}; must be at least --base-batch ({config.base_batch})")
    measured = probe.probe(config, probe_steps, max_batch, out)
    advice = advice_lib.build(measured, config, max_batch)
    advice |= {"versions": rundir.versions(), "git_commit": rundir.git_commit(), "command": sys.argv,
               "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    advice_lib.write(advice, out)
    return advice


def main(argv=None) -> int:
    """Parses flags, probes, prints the recommendation; bad input exits with code 2 and one line."""
    def command() -> int:
        from pipeline import rundir

        config, args = flags.parse(argv, description=__doc__.splitlines()[0], extra=_add_flags)
        max_batch = args.max_batch or 8 * config.base_batch
        out = args.out or rundir.default_out(config, "advice")
        startup.import_tensorflow()  # without its C++ start-up lines (pipeline/startup.py)
        advice = advise(config, args.probe_steps, max_batch, out)
        print(f"advice: {advice['message']} (details: {os.path.join(out, 'advice.md')})")
        return 0

    return cli.run(command)
