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
Every check also records which validation examples it classified correctly (pipeline/training/target_record.py,
target_checks.npz), for the interval of these numbers from the validation set's sampling noise; the checks go on
for a while after the target is first reached, for the same reason. `get_state` and `set_state` carry both records
over a resume: a resumed run holds the checks of the uninterrupted run, each once.
"""

from __future__ import annotations

import os
import time

import keras
import numpy as np
import tensorflow as tf

from callbacks.steps import Steps
from callbacks.timing import timed
from pipeline import rundir
from pipeline.training import target_record

FILE = "target.json"


def interval(steps_per_epoch: int, checks_per_epoch: int) -> int:
    """Steps between checks: an epoch's steps divided by the checks per epoch, at least 1."""
    return max(1, steps_per_epoch // checks_per_epoch)


def read(run_dir: str) -> dict | None:
    """target.json of a run, or None if the run has not reached its target (or has none)."""
    return rundir.read_json(os.path.join(run_dir, FILE))


class TargetCheck(keras.callbacks.Callback):
    """Checks validation accuracy every `every_n_steps` steps until it reaches `target`; see the module docstring.

    Args:
        validation: batches (x, y) of the validation split.
        target: the validation accuracy to reach, in (0, 1].
        every_n_steps: steps between checks (`interval`).
        run_dir: where target.json is written when the target is reached.
        measuring: a function returning the seconds the run's instruments (this callback included) have spent
            measuring so far, left out of time_to_target_s.
        when_reached: functions called with no argument right after the target is first reached and recorded (the
            curvature instrument's measurement at the target), timed as instruments by themselves.
    """

    def __init__(self, validation, target: float, every_n_steps: int, run_dir: str, measuring, when_reached=()):
        super().__init__()
        self.validation, self.target, self.run_dir, self.measuring = validation, target, run_dir, measuring
        self.when_reached = list(when_reached)
        self.every_n_steps = every_n_steps
        self._steps = Steps(every_n_steps)
        self._accuracy = keras.metrics.SparseCategoricalAccuracy()
        self._predict = None
        self.reached = None
        self.record = target_record.CheckRecord(run_dir, target)  # with the checks an earlier attempt wrote

    def on_train_begin(self, logs=None):
        if self._predict is None:
            self._predict = tf.function(lambda x: self.model(x, training=False))

    def get_state(self) -> dict:
        """The step, the record of the target if reached, and how many checks the per-example record holds (their
        rows are in target_checks.npz, written at the epoch end, before the checkpoint commits this state)."""
        return {"step": self._steps.step, "reached": self.reached, "checks": len(self.record.rows)}

    def set_state(self, state: dict) -> list[str]:
        """Restores `get_state`'s state before training resumes, and target.json and target_checks.npz with it:
        what an attempt wrote after the checkpoint is removed, since the resumed run makes its checks again.

        Returns:
            What could not be restored, one line each: checks that target_checks.npz no longer holds.
        """
        self._steps.set_step(state["step"])
        self.reached = state["reached"]
        path = os.path.join(self.run_dir, FILE)
        if self.reached:
            rundir.write_json_atomic(path, self.reached)
        elif os.path.exists(path):
            os.remove(path)
        checks = state.get("checks", 0)
        kept = self.record.keep_first(checks)
        if kept < checks:
            return [f"TargetCheck: {target_record.FILE} holds {kept} of the {checks} checks before the checkpoint; "
                    "the interval of steps to target comes from the checks it holds"]
        return []

    def on_epoch_begin(self, epoch, logs=None):
        self._steps.epoch_begin(self.params["steps"])
        self._epoch, self._first_step = epoch, self._steps.step
        self._started, self._measured = time.perf_counter(), self.measuring()

    def on_train_batch_end(self, batch, logs=None):
        if self._steps.batch_end(batch) and not (self.reached and self.record.done):
            seconds = self._seconds_into_epoch()
            accuracy = self.check()
            self.record.add(self._steps.step, self._epoch, self._epoch_fraction(), seconds, self._correct)
            if accuracy >= self.target and not self.reached:
                self._record(accuracy, seconds)
                for function in self.when_reached:
                    function()

    def on_epoch_end(self, epoch, logs=None):
        self.record.write()

    def on_train_end(self, logs=None):
        self.record.write()

    @timed
    def check(self) -> float:
        """The validation accuracy at the current weights; which examples were right is kept in self._correct."""
        self._accuracy.reset_state()
        correct = []
        for x, y in self.validation:
            predicted = self._predict(x)
            self._accuracy.update_state(y, predicted)
            correct.append(np.argmax(predicted, axis=-1) == np.reshape(y, -1))
        self._correct = np.concatenate(correct)
        return float(self._accuracy.result())

    def _seconds_into_epoch(self) -> float:
        """Training seconds since this epoch began, without measuring (the checks included)."""
        return time.perf_counter() - self._started - (self.measuring() - self._measured)

    def _epoch_fraction(self) -> float:
        return (self._steps.step - self._first_step) / self.params["steps"]

    def _record(self, accuracy: float, seconds: float) -> None:
        step = self._steps.step
        self.reached = {"target_accuracy": self.target, "val_accuracy": accuracy, "step": step, "epoch": self._epoch,
                        "epoch_fraction": self._epoch_fraction(),
                        "seconds_into_epoch": seconds, "every_n_steps": self.every_n_steps}
        rundir.write_json_atomic(os.path.join(self.run_dir, FILE), self.reached)
