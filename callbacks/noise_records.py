"""The record of a gradient-noise measurement, its smoothed window, and where it goes: logs, JSON lines, TensorBoard.

One writer for grad_stats.jsonl, shared by the two ways of measuring: fresh micro-batches on one device
(callbacks/gradient_stats.py) and the replicas' gradients of the training steps (callbacks/replica_gradient_stats.py).
The record format is in gradient_stats' docstring.
"""

import json
import math
import os

import keras

from callbacks.checked_io import finite_or_none
from callbacks.events import EventWriter
from callbacks.noise_estimates import KEYS, pool
from callbacks.steps import Steps

# The smoothed keys pool the measurements of the last 5% of the steps so far. Short, because single measurements
# are precise and the statistics themselves change fast: on the digits CNN tr(Sigma) moved 4x within 10 steps, and
# a window of 25% put the smoothed tr(Sigma) at 2.7x the truth.
WINDOW = 0.05
SUFFIXES = ("", "_lo", "_hi", "_smoothed", "_smoothed_lo", "_smoothed_hi")
FLAGS = ("grad/noise_scale_is_lower_bound", "grad/noise_scale_smoothed_is_lower_bound")
EPOCH_KEYS = tuple(f"grad/{key}{suffix}" for suffix in SUFFIXES for key in KEYS) + FLAGS + ("grad/step",)
_POOLED = {f"{key}{suffix}" for key in KEYS for suffix in ("", "_lo", "_hi")} | {"noise_scale_is_lower_bound"}
# Quantities >= 0 whose intervals noise_estimates clips at 0: a lower end of 0 is the trivial bound, not a value.
_CLIPPED = tuple(f"grad/{key}{suffix}_lo" for key in ("norm_sq", "trace_cov", "batch_std")
                 for suffix in ("", "_smoothed"))
TRIVIAL_END = "the interval reaches 0: no lower bound above the trivial one, 0"


def _missing(value) -> bool:
    """True for a number that is not determined (NaN) or unbounded (inf)."""
    return isinstance(value, float) and not math.isfinite(value)


def prefixed(values, suffix=""):
    """noise_estimates' {"trace_cov_lo": v, ...} as {"grad/trace_cov<suffix>_lo": v, ...}."""
    result = {}
    for name, value in values.items():
        key = next((key for key in KEYS if name.startswith(key)), name)
        result[f"grad/{key}{suffix}{name[len(key):]}"] = value
    return result


class NoiseRecords(keras.callbacks.Callback):
    """Keeps a measuring callback's records: the smoothed window, batch and epoch logs, JSON lines, TensorBoard.

    Subclasses measure and call `_record`. The raw and smoothed totals with their intervals go into the batch `logs`
    of the measured step (Keras passes one logs dict to all callbacks in list order, so callbacks listed after this
    one see them); into the epoch logs, EPOCH_KEYS, with "grad/step" the step of the measurement reported, and NaN in
    every key for an epoch without a new measurement (stable columns for CSVLogger; drop NaN keys before TensorBoard
    and the console to show only measured values); to TensorBoard under log_dir/gradients; and to out_path as one
    JSON line per measurement.
    """

    def __init__(self, every_n_steps, batch_size, *, population=None, window=WINDOW, log_dir=None, out_path=None):
        super().__init__()
        self._steps = Steps(every_n_steps)
        if not 0.0 < window <= 1.0:
            raise ValueError(f"window: must be a fraction of the steps so far in (0, 1], got {window!r}")
        if population is not None and population < 1:
            raise ValueError(f"population: must be a number of examples >= 1 or None, got {population!r}")
        self.every_n_steps = None if every_n_steps is None else int(every_n_steps)
        self.batch_size, self.window = batch_size, window
        self.population, self.log_dir, self.out_path = population, log_dir, out_path
        self.history = []  # one record per measurement as written to out_path, without the per-variable values
        self._writer, self._out, self._latest = None, None, {}
        self._epoch, self._measured_this_epoch = 0, False

    def on_train_begin(self, logs=None):
        if self.log_dir and self._writer is None:
            self._writer = EventWriter(os.path.join(self.log_dir, "gradients"))
        self._out = open(self.out_path, "a") if self.out_path else None

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch, self._measured_this_epoch = epoch, False
        self._steps.epoch_begin((self.params or {}).get("steps"))

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            for key in EPOCH_KEYS:
                value = self._latest.get(key) if self._measured_this_epoch else None
                # An unbounded end (B_simple's "_hi" when it is only a lower bound) is NaN too: no number.
                logs[key] = float(value) if value is not None and math.isfinite(value) else math.nan

    def get_state(self) -> dict:
        """What a resumed run needs to go on as if uninterrupted: the step, the records (the smoothed window pools
        them) and the length of out_path, which `set_state` cuts the file back to."""
        if self._out:
            self._out.flush()
        size = os.path.getsize(self.out_path) if self.out_path and os.path.exists(self.out_path) else 0
        return {"step": self._steps.step, "epoch": self._epoch, "history": self.history, "out_bytes": size}

    def set_state(self, state: dict) -> list[str]:
        """Restores `get_state`'s state before training resumes; out_path loses the records written after it.

        Returns:
            What could not be restored, one line each (nothing here).
        """
        self._steps.set_step(state["step"])
        self._epoch, self.history = state["epoch"], [dict(record) for record in state["history"]]
        if self.out_path and os.path.exists(self.out_path):
            with open(self.out_path, "r+b") as f:
                f.truncate(state["out_bytes"])
        return []

    def on_train_end(self, logs=None):
        if self._out:
            self._out.close()
        if self._writer:
            self._writer.flush()

    def _record(self, step, raw, fields, variables=None, histograms=([], []), smoothed=None):
        """Writes one measurement everywhere, with the window pooled by noise_estimates.pool.

        Args:
            step: The step of the measurement.
            raw: noise_estimates' values of this measurement (measurement or step_means).
            fields: The record's other fields ("batch_size", "micro_batch_size", ...).
            variables: {variable path: raw values}, or None (not at this measurement).
            histograms: (means, stds), per-parameter arrays per variable for TensorBoard, or empty.
            smoothed: The smoothed values in pool's form (with "first_step" and "measurements"), or None: pool
                the records of the window.
        """
        raw = dict(raw)
        notes = {f"grad/{key}": why for key, why in raw.pop("notes", {}).items()}
        record = {"step": step, "epoch": self._epoch, **fields, **prefixed(raw), "notes": notes}
        if smoothed is None:
            first_step = math.ceil((1 - self.window) * step)
            smoothed = pool(self.history + [record], first_step, step, batch_size=self.batch_size)
        if smoothed["measurements"] > 1:  # a window of one measurement would repeat the raw keys
            record.update(prefixed({k: v for k, v in smoothed.items() if k in _POOLED}, "_smoothed"))
            record.update(smoothed_first_step=smoothed["first_step"], smoothed_measurements=smoothed["measurements"])
        for key in _CLIPPED:  # null in the record with the reason, absent from the logs and TensorBoard
            if key in record and not _missing(record[key]) and record[key] <= 0:
                record[key], notes[key] = math.nan, TRIVIAL_END
        # Only determined values reach the logs: NaN (not determined) and infinite ends stay in the JSON record.
        self._latest = {k: v for k, v in record.items() if k in EPOCH_KEYS and not _missing(v)}
        self._latest["grad/step"] = step
        self._measured_this_epoch = True
        self.history.append(record)
        if self._out:
            line = record if variables is None else {**record, "variables": variables}
            self._out.write(json.dumps(finite_or_none(line)) + "\n")
            self._out.flush()
        if self._writer:
            self._summaries(step, variables or {}, *histograms)

    def _summaries(self, step, variables, means, stds):
        """Writes the TensorBoard summaries of one measurement as one event (callbacks.events); unbounded interval
        ends are left out."""
        scalars = [(name, value) for name, value in self._latest.items() if name != "grad/step"]
        for path, values in variables.items():
            scalars += [(f"grad_variables/{path}/{key}", value) for key, value in values.items()]
        histograms = []
        for path, mean, std in zip(variables, means, stds):
            histograms += [(f"grad_mean/{path}", mean), (f"grad_std/{path}", std)]
        self._writer.write(step, scalars, histograms)
