"""A run's timing derived from its per-epoch history (pipeline.rundir.read_history): time per step, examples per
second, time to target, training and measuring time. summary.json and the sweep report both use these numbers.

Each rate leaves out the first epoch, whose time includes tracing and compiling the train step (the only epoch of a
one-epoch run is used), and the instruments' measuring (instrument_time_s): the same number of measurements per run
would otherwise slow the few steps of a large batch the most. An epoch's time includes its end-of-epoch validation.
"""

from __future__ import annotations

import statistics


def _steady(history: list[dict]) -> list[tuple[dict, int]]:
    """(record, steps in that epoch) of the epochs after the first, or of the first when it is the only one."""
    epochs, previous = [], 0
    for record in history:
        epochs.append((record, record["step"] - previous))
        previous = record["step"]
    return epochs[1:] or epochs


def _training_seconds(record: dict) -> float:
    return record["epoch_time_s"] - record.get("instrument_time_s", 0.0)


def time_per_step(history: list[dict]) -> float | None:
    """Seconds per step: the median over the steady epochs of (epoch time - measuring) / steps; None without one."""
    per_step = [_training_seconds(record) / steps for record, steps in _steady(history) if steps > 0]
    return float(statistics.median(per_step)) if per_step else None


def examples_per_sec(history: list[dict]) -> float | None:
    """Training examples per second: the median over the steady epochs of their examples_per_sec (examples /
    (epoch time - measuring), as pipeline.training.run_control.MetricsLogger logs it); None without one."""
    rates = [record["examples_per_sec"] for record, steps in _steady(history)
             if steps > 0 and "examples_per_sec" in record]
    return float(statistics.median(rates)) if rates else None


def time_to_target(history: list[dict], reached: dict | None) -> float | None:
    """Training seconds until the target was first reached: the epochs before it without their measuring, plus
    the seconds into its epoch that pipeline/training/target.py recorded (also without measuring and its own checks);
    None when it was not reached. summary.json and the sweep report both use this number."""
    if not reached:
        return None
    earlier = sum(_training_seconds(record) for record in history if record["epoch"] < reached["epoch"])
    return earlier + reached["seconds_into_epoch"]


def train_time(history: list[dict]) -> float:
    """Seconds inside the training epochs of `history` (validation and measuring included)."""
    return sum(record["epoch_time_s"] for record in history)


def instrument_time(history: list[dict]) -> float:
    """The part of train_time spent measuring (gradient and BN statistics, dynamics)."""
    return sum(record.get("instrument_time_s", 0.0) for record in history)
