"""Steps, epochs and time to a target validation accuracy, checked at the same resolution for every batch size.

Keras validates at epoch ends: every 161 steps at batch 8 on the digits and every 10 at batch 128, so steps to
target checked there are quantized by one epoch, a different number of steps at every batch, which biases a fit
of S(B). TargetCheck checks the validation accuracy every k = max(1, steps_per_epoch // checks_per_epoch) steps
(batches trained, callbacks/steps.py): the same fraction of an epoch, i.e. the same number of examples, at every batch
size (an eighth of an epoch by default; one step where an epoch has fewer steps than checks), until the target
is first reached. A check runs the model in inference mode (moving BN statistics, as Keras' own validation)
over the whole validation split.

What it records (target.json in the run directory, read back with `read`) and what summary.json reports:
- steps_to_target: the step (batches trained) of the first check with validation accuracy >= target.
- epochs_to_target: the epochs of training up to that step, fractional: epoch index + steps into that epoch /
  steps per epoch (examples seen / training examples for a fixed batch).
- time_to_target_s: training time up to that step without measuring: the earlier epochs' time without the
  instruments and the checks (their end-of-epoch validation included), plus the time into this epoch without
  them. The checks are timed with callbacks.timing.timed like the instruments, so that training time and
  throughput leave them out.
"""

from __future__ import annotations

import json
import os
import time

import keras
import tensorflow as tf

from callbacks.steps import Steps
from callbacks.timing import timed
from pipeline import rundir

FILE = "target.json"


def interval(steps_per_epoch: int, checks_per_epoch: int) -> int:
    """Steps between checks: an epoch's steps divided by the checks per epoch, at least 1."""
    return max(1, steps_per_epoch // checks_per_epoch)


def read(run_dir: str) -> dict | None:
    """target.json of a run, or None if the run has not reached its target (or has none)."""
    try:
        with open(os.path.join(run_dir, FILE), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


class TargetCheck(keras.callbacks.Callback):
    """Checks validation accuracy every `every_n_steps` steps until it reaches `target`; see the module docstring.

    Args:
        validation: batches (x, y) of the validation split.
        target: the validation accuracy to reach, in (0, 1].
        every_n_steps: steps between checks (`interval`).
        run_dir: where target.json is written when the target is reached.
        measuring: a function returning the seconds the run's instruments (this callback included) have spent
            measuring so far, left out of time_to_target_s.
    """

    def __init__(self, validation, target: float, every_n_steps: int, run_dir: str, measuring):
        super().__init__()
        self.validation, self.target, self.run_dir, self.measuring = validation, target, run_dir, measuring
        self.every_n_steps = every_n_steps
        self._steps = Steps(every_n_steps)
        self._accuracy = keras.metrics.SparseCategoricalAccuracy()
        self._predict = None
        self.reached = None

    def on_train_begin(self, logs=None):
        if self._predict is None:
            self._predict = tf.function(lambda x: self.model(x, training=False))

    def get_state(self) -> dict:
        """The step and the record of the target, if reached (a resumed run goes on from them)."""
        return {"step": self._steps.step, "reached": self.reached}

    def set_state(self, state: dict) -> list[str]:
        """Restores `get_state`'s state before training resumes, and target.json with it: a record written after the
        checkpoint is removed, since the resumed run makes its checks again.

        Returns:
            What could not be restored, one line each (nothing here).
        """
        self._steps.set_step(state["step"])
        self.reached = state["reached"]
        path = os.path.join(self.run_dir, FILE)
        if self.reached:
            rundir.write_json_atomic(path, self.reached)
        elif os.path.exists(path):
            os.remove(path)
        return []

    def on_epoch_begin(self, epoch, logs=None):
        self._steps.epoch_begin(self.params["steps"])
        self._epoch, self._first_step = epoch, self._steps.step
        self._started, self._measured = time.perf_counter(), self.measuring()

    def on_train_batch_end(self, batch, logs=None):
        if self._steps.batch_end(batch) and not self.reached:
            accuracy = self.check()
            if accuracy >= self.target:
                self._record(accuracy)

    @timed
    def check(self) -> float:
        """The validation accuracy at the current weights."""
        self._accuracy.reset_state()
        for x, y in self.validation:
            self._accuracy.update_state(y, self._predict(x))
        return float(self._accuracy.result())

    def _record(self, accuracy: float) -> None:
        seconds = time.perf_counter() - self._started - (self.measuring() - self._measured)
        step = self._steps.step
        self.reached = {"target_accuracy": self.target, "val_accuracy": accuracy, "step": step, "epoch": self._epoch,
                        "epoch_fraction": (step - self._first_step) / self.params["steps"],
                        "seconds_into_epoch": seconds, "every_n_steps": self.every_n_steps}
        rundir.write_json_atomic(os.path.join(self.run_dir, FILE), self.reached)
