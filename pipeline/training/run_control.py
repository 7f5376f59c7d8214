"""The training run's own Keras callbacks: stops at a non-finite loss or at max steps, history."""

from __future__ import annotations

import math
import time

import keras

from callbacks import timing
from callbacks.steps import Steps
from pipeline import rundir


def first_step(epoch: int, batch_phases, num_train: int) -> int:
    """Steps (batches trained, callbacks/steps.py) before `epoch`: whole epochs of num_train // batch batches in
    each phase before it.

    The run's callbacks start counting each epoch here (a resumed run restarts at an epoch; a run stops inside an
    epoch only at its end, at max_steps), and the instruments' counts, restored from the checkpoint, agree with it.
    """
    steps = 0
    for i, (first_epoch, batch) in enumerate(batch_phases):
        end = batch_phases[i + 1][0] if i + 1 < len(batch_phases) else epoch
        steps += max(0, min(epoch, end) - first_epoch) * (num_train // batch)
    return steps


def phase_batch(epoch: int, batch_phases) -> int:
    """The batch size of `epoch` in ((first_epoch, batch), ...)."""
    return [batch for first_epoch, batch in batch_phases if first_epoch <= epoch][-1]


class NonFiniteLoss(RuntimeError):
    """Raised from inside fit so that no later callback (the checkpoint) saves non-finite weights."""


class StopOnNonFinite(keras.callbacks.Callback):
    """Raises NonFiniteLoss at the first batch whose loss is NaN or infinite.

    Keras' TerminateOnNaN lets the epoch end, and the checkpoint would then save NaN weights.
    """

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise NonFiniteLoss(f"loss became {float(loss)} at batch {batch}; the last good checkpoint is kept")


class StopAtMaxSteps(keras.callbacks.Callback):
    """Stops training after `max_steps` batches, counted from the start of the run (see first_step).

    Args:
        max_steps: batches after which training stops.
        batch_phases: the run's ((first_epoch, batch), ...) (Config.batch_phases).
        num_train: examples in the training split.
    """

    def __init__(self, max_steps: int, batch_phases, num_train: int):
        super().__init__()
        self.max_steps, self.batch_phases, self.num_train = max_steps, batch_phases, num_train
        self._steps = Steps(None)

    def on_epoch_begin(self, epoch, logs=None):
        self._steps.set_step(first_step(epoch, self.batch_phases, self.num_train))
        self._steps.epoch_begin(self.params["steps"])

    def on_train_batch_end(self, batch, logs=None):
        self._steps.batch_end(batch)
        if self._steps.step >= self.max_steps:
            self.model.stop_training = True


class MetricsLogger(keras.callbacks.Callback):
    """Appends one record per epoch to the run's history (pipeline.rundir), and adds two keys to the epoch logs.

    It adds `learning_rate` (the last step's) and `examples_per_sec` to the epoch logs, so that TensorBoard and
    CSVLogger, which come after it in the callback list, record them too. On resume, the records of epochs that are
    run again are dropped first. Each record has the epoch's wall time `epoch_time_s` (training, validation,
    measuring) and `instrument_time_s`, the part of it that `instruments` (callbacks with a `seconds` total, see
    callbacks.timing) spent measuring; examples_per_sec leaves that part out. `instrument_phases_s` splits the
    measuring time of the process so far per instrument and phase ({"GradientStatistics": {"tracing": s,
    "execution": s, "other": s}, ...}: one-time traces, the compiled measurements, and the rest). NaN values (an
    instrument's keys in an epoch without a new measurement) are left out of the record.

    Args:
        run_dir: the run directory.
        batch_phases: the run's ((first_epoch, batch), ...) (Config.batch_phases).
        num_train: examples in the training split.
        learning_rate: the optimizer's schedule, called with a step.
        instruments: the measuring callbacks whose time is left out of examples_per_sec.
    """

    def __init__(self, run_dir: str, batch_phases, num_train: int, learning_rate, instruments=()):
        super().__init__()
        self.run_dir, self.batch_phases, self.num_train = run_dir, batch_phases, num_train
        self.learning_rate, self.instruments = learning_rate, list(instruments)
        self._resumed = False

    def on_epoch_begin(self, epoch, logs=None):
        if not self._resumed:
            rundir.keep_history_before(self.run_dir, epoch)
            self._resumed = True
        self._start, self._start_measuring = time.perf_counter(), timing.seconds(self.instruments)
        self._steps = Steps(None)
        self._steps.set_step(first_step(epoch, self.batch_phases, self.num_train))
        self._steps.epoch_begin(self.params["steps"])
        self._start_step = self._steps.step

    def on_train_batch_end(self, batch, logs=None):
        self._steps.batch_end(batch)

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        seconds = time.perf_counter() - self._start
        measuring = timing.seconds(self.instruments) - self._start_measuring
        step, batches = self._steps.step, self._steps.step - self._start_step
        logs["learning_rate"] = float(self.learning_rate(max(step - 1, 0)))
        training = max(seconds - measuring, 1e-9)
        logs["examples_per_sec"] = batches * phase_batch(epoch, self.batch_phases) / training
        record = {"epoch": epoch, "step": step, "epoch_time_s": seconds, "instrument_time_s": measuring}
        if self.instruments:  # what instrument_time_s is made of, so far in this process (callbacks.timing.phases)
            record["instrument_phases_s"] = timing.phases(self.instruments)
        # An instrument's NaN (no new measurement this epoch) is left out; an unbounded interval end is null.
        values = {k: float(v) for k, v in logs.items() if _is_number(v)}
        record.update({k: v if math.isfinite(v) else None for k, v in values.items() if not math.isnan(v)})
        rundir.append_history(self.run_dir, record)


def _is_number(value) -> bool:
    try:
        float(value)
        return True
    except (TypeError, ValueError):
        return False
