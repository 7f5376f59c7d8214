"""The reader of the advisor's advice.json, and the Config that `--advice` gives: the advised batch and lr.

pipeline/advisor/advice_report.py writes the file; a run (pipeline.train --advice) and a sweep (its prediction check) read it here,
below the advisor, so that training never imports the advisor that itself trains.
"""

from __future__ import annotations

import dataclasses
import os

from pipeline.config import Config, InputError, read_json


def read(path: str, flag: str = "--advice") -> dict:
    """advice.json (or a directory holding it), checked; raises InputError naming `flag` when unusable."""
    if os.path.isdir(path):
        path = os.path.join(path, "advice.json")
    advice = read_json(path, flag)
    if not isinstance(advice, dict) or "status" not in advice:
        raise InputError(f"{flag}: {path} is not an advice.json written by pipeline.advise")
    if advice["status"] != "recommended":
        raise InputError(f"{flag}: {path} holds no recommendation ({advice.get('reason', '')}); "
                         "run pipeline.advise with a longer --probe-steps")
    return advice | {"path": path}


def apply(config: Config) -> tuple[Config, str]:
    """The config with config.advice's batch and learning rate, and a line saying where the batch came from."""
    advice = read(config.advice)
    for key, measured in advice["config"].items():
        if key in ("dataset", "model", "norm", "optimizer") and getattr(config, key) != measured:
            raise InputError(f"--advice: {advice['path']} was measured with --{key} {measured}, this run uses "
                             f"{getattr(config, key)}; run pipeline.advise for this setting")
    # base_batch = batch makes effective_lr the advised lr under any --lr-scaling.
    config = dataclasses.replace(config, batch=advice["batch"], base_batch=advice["batch"], lr=advice["lr"])
    return config, (f"advice {advice['path']}: batch {advice['batch']}, lr {advice['lr']:.4g} "
                    f"(B_simple {advice['noise']['noise_scale']:.3g}, {advice['lr_rule']})")

