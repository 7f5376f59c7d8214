"""`--batch adaptive`: the run's batch follows the measured noise scale, one decision at each epoch's end.

The run starts at --base-batch. At the end of every epoch but the last, `AdaptiveBatch` asks the gradient
statistics for a measurement at that step (unless one was just taken), pools the measurements since the previous
decision (callbacks.noise_estimates.pool; with replicas, the replica statistics' records), and lets
pipeline/training/batch_policy.py decide the batch of the next epochs with its AdaScale learning-rate gain. The
step-time model T_step(B) = alpha + beta B (goodput.fit_step_time) is fitted to the step times of a ladder (goodput
policy only) with each batch's time replaced by the run's own once it trained at it (the fastest of its epochs,
measuring left out), and the run's overhead per step over the ladder added to the others (`AdaptiveBatch.step_time`).
The ladder is timed as the run goes (`time_neighbours`): before each phase, the grid batches a decision at that
phase's batch B may move to (B / 2, B, 2 B) that have no time yet, so a run times the batches it can reach, not the
whole grid. A batch that runs out of memory ends the grid below it.

A decision that changes the batch ends the fit() call after its epoch; pipeline/training/fit_loop.py starts the next
at the new batch, the lr schedule's phase set to it (optim.AdaptiveSchedule). Data order stays a function of (seed,
epoch) at the batch of that epoch, and the phases are state committed with each checkpoint, so a resumed run
trains on what an uninterrupted one does.

Every decision, kept or changed, is one JSON line of <run_dir>/batch_decisions.jsonl (`DECISIONS`): "step" and
"epoch" (the decision at the end of that epoch applies from epoch + 1), "policy", "old_batch", "new_batch",
"changed", "old_lr" and "new_lr" (the learning rate at the step, before and after), "old_lr_gain",
"new_lr_gain", "noise_scale", "noise_scale_lo", "noise_scale_hi", "noise_scale_is_lower_bound",
"noise_measurements", "noise_first_step", "noise_last_step" (the pooled estimate), "noise_used" (the phi decided
on), "predicted_gain", "goodput" ({batch: goodput / goodput(old_batch)}), "step_time" ({"alpha", "beta",
"rms_log_error"} or null), "theta" (norm-test), "reason". The batch in force is also "batch_size" in the epoch
logs (the run history, the console) and "train/batch_size" in TensorBoard (tensorboard/batch).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time

import keras

from callbacks import noise_estimates, timing
from callbacks.events import EventWriter
from callbacks.steps import Steps
from pipeline.training import batch_policy, distribute, goodput
from pipeline.training.run_control import first_step, phase_batch

DECISIONS = "batch_decisions.jsonl"
# Timed steps per batch of the ladder at the start: fewer than the advisor's 16, since the run's own steps replace
# each batch's time once it trains at it.
LADDER_TIMED_STEPS = 6


class AdaptiveBatch(keras.callbacks.Callback):
    """Decides the batch at every epoch's end (module docstring); its `phases` are the run's batch phases.

    Args:
        policy: "goodput" or "norm-test".
        gradients: the run's GradientStatistics or ReplicaGradientStatistics (their `history` is read).
        batches: the grid of batch_policy.grid.
        base_batch, optimizer: M0, the batch at which --lr is the learning rate, and the optimizer (its gain rule).
        num_train: examples in the training split; epochs: the run's epochs.
        run_dir: where batch_decisions.jsonl and tensorboard/batch go.
        instruments: the measuring callbacks, whose time is left out of the run's own step times.
        theta: the norm test's theta.
    """

    def __init__(self, policy, gradients, batches, *, base_batch, optimizer, num_train, epochs, run_dir,
                 instruments=(), theta=1.0):
        super().__init__()
        self.policy, self.gradients, self.batches, self.theta = policy, gradients, list(batches), float(theta)
        self.base_batch, self.optimizer = base_batch, optimizer
        self.num_train, self.epochs, self.instruments = num_train, epochs, instruments
        self.out_path = os.path.join(run_dir, DECISIONS)
        self.log_dir = os.path.join(run_dir, "tensorboard", "batch")
        self.phases = [(0, base_batch)]  # (first_epoch, batch): the run's batch phases, shared with its callbacks
        self.gains = [1.0]  # the lr gain of each phase
        self.ladder, self.own = {}, {}  # {batch: seconds per step}: the ladder's, and the run's own
        self.decided_step = 0  # step of the last decision (the first pools the measurements after step 0)
        self.changed = False  # the last epoch's decision changed the batch (fit_loop starts the next fit)
        self._steps, self._writer = Steps(None), None

    @property
    def batch(self) -> int:
        return self.phases[-1][1]

    def follow(self, batch: int) -> None:
        """Has the gradient statistics' batch_std, SNR and budget follow the batch in force (their micro-batches
        stay at the base batch)."""
        self.gradients.batch_size = batch
        if hasattr(self.gradients, "step_examples"):
            self.gradients.step_examples = batch

    def untimed_neighbours(self) -> list[int]:
        """The grid batches a decision at the batch in force may move to (B / 2 to 2 B, B included) without a time."""
        timed = {**self.ladder, **self.own}
        return [b for b in self.batches if self.batch / 2 <= b <= 2 * self.batch and b not in timed]

    def add_times(self, rows: list[dict]) -> None:
        """Takes step_times.time_ladder's rows: their times join the ladder, and a batch that ran out of memory ends
        the grid below it."""
        for row in rows:
            if "error" in row:
                self.batches = [b for b in self.batches if b < row["batch"]]
            else:
                self.ladder[row["batch"]] = row["seconds_per_step"]

    def step_time(self):
        """T_step(B) fitted to the run's own step times where it trained, and elsewhere to the ladder's plus the
        run's overhead per step; None below two batches.

        The run's own steps carry what the ladder's do not (the callbacks between steps, a new batch's first epoch),
        so mixing the two clocks unadjusted makes the batches timed only by the ladder look cheap against the one the
        run trains at, and a doubling look almost free. The overhead is taken as additive per step: the median of
        own - ladder over the batches that have both, added to every batch known only from the ladder.
        """
        both = [b for b in self.own if b in self.ladder]
        overhead = statistics.median(self.own[b] - self.ladder[b] for b in both) if both else 0.0
        points = {**{b: t + overhead if t + overhead > 0 else t for b, t in self.ladder.items()}, **self.own}
        if len(points) < 2:
            return None
        return goodput.fit_step_time(list(points), list(points.values()))

    def on_train_begin(self, logs=None):
        self.changed = False
        if self._writer is None:
            self._writer = EventWriter(self.log_dir)

    def on_epoch_begin(self, epoch, logs=None):
        self._steps.set_step(first_step(epoch, self.phases, self.num_train))
        self._steps.epoch_begin(self.params["steps"])
        self._first = None  # (time, measuring seconds, step) at the epoch's first batch end

    def on_train_batch_end(self, batch, logs=None):
        self._steps.batch_end(batch)
        self._last = (time.perf_counter(), timing.seconds(self.instruments), self._steps.step)
        if self._first is None:
            self._first = self._last

    def on_epoch_end(self, epoch, logs=None):
        batch = phase_batch(epoch, self.phases)
        if logs is not None:
            logs["batch_size"] = batch
        if self._first is not None and self._last[2] > self._first[2]:
            seconds = (self._last[0] - self._first[0]) - (self._last[1] - self._first[1])
            per_step = seconds / (self._last[2] - self._first[2])
            self.own[batch] = min(self.own.get(batch, math.inf), per_step)
        self._writer.write(self._steps.step, [("train/batch_size", batch), ("train/lr_gain", self.gains[-1])])
        if epoch + 1 >= self.epochs or self.model.stop_training:
            return
        self._decide(epoch, self._steps.step)

    def _decide(self, epoch: int, step: int) -> None:
        if hasattr(self.gradients, "measure_now"):
            self.gradients.measure_now()
        history = self.gradients.history
        noise = noise_estimates.pool(history, first_step=self.decided_step + 1, batch_size=self.batch)
        if noise is None and history:
            noise = noise_estimates.pool(history[-1:], first_step=history[-1]["step"], batch_size=self.batch)
        step_time = self.step_time()
        decision = batch_policy.decide(self.policy, self.batch, noise, self.batches, base_batch=self.base_batch,
                                       step_time=step_time, theta=self.theta)
        old_batch, old_gain, new_batch = self.batch, self.gains[-1], decision["new_batch"]
        new_gain = old_gain
        if new_batch != old_batch:
            new_gain = batch_policy.lr_gain(new_batch, decision["noise_used"], self.base_batch, self.optimizer)
        old_lr = float(self.model.optimizer.learning_rate) if hasattr(self.model, "optimizer") else math.nan
        noise = noise or {}
        record = {"step": step, "epoch": epoch, "policy": self.policy, "old_batch": old_batch,
                  "new_batch": new_batch, "changed": new_batch != old_batch, "old_lr": old_lr,
                  "new_lr": old_lr / old_gain * new_gain, "old_lr_gain": old_gain, "new_lr_gain": new_gain}
        for key in ("noise_scale", "noise_scale_lo", "noise_scale_hi"):
            value = noise.get(key)
            record[key] = float(value) if value is not None and math.isfinite(value) else None
        record |= {"noise_scale_is_lower_bound": bool(noise.get("noise_scale_is_lower_bound", False)),
                   "noise_measurements": noise.get("measurements", 0), "noise_first_step": noise.get("first_step"),
                   "noise_last_step": noise.get("last_step"), "noise_used": decision["noise_used"],
                   "predicted_gain": decision["predicted_gain"],
                   "goodput": {str(b): v for b, v in decision["goodput"].items()},
                   "step_time": None if step_time is None else {"alpha": step_time.alpha, "beta": step_time.beta,
                                                                "rms_log_error": step_time.rms_log_error},
                   "theta": self.theta if self.policy == "norm-test" else None, "reason": decision["reason"]}
        with open(self.out_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        self.decided_step = step
        if new_batch != old_batch:
            self.phases.append((epoch + 1, new_batch))
            self.gains.append(new_gain)
            self.changed = True
            self.model.stop_training = True  # fit_loop starts the next fit() at the new batch
            estimate = "undetermined" if decision["noise_used"] is None else f"{decision['noise_used']:.3g}"
            print(f"adaptive batch: {old_batch} -> {new_batch} from epoch {epoch + 2} (step {step}), "
                  f"lr x{new_gain:.3g} of --lr; B_simple {estimate}; {decision['reason']}", flush=True)

    def on_train_end(self, logs=None):
        if self._writer:
            self._writer.flush()

    def get_state(self) -> dict:
        """The phases, their gains, the step times and the length of batch_decisions.jsonl, which set_state cuts
        the file back to."""
        size = os.path.getsize(self.out_path) if os.path.exists(self.out_path) else 0
        return {"phases": [list(p) for p in self.phases], "gains": list(self.gains),
                "ladder": {str(b): s for b, s in self.ladder.items()}, "own": {str(b): s for b, s in self.own.items()},
                "batches": list(self.batches), "decided_step": self.decided_step, "out_bytes": size}

    def set_state(self, state: dict) -> list[str]:
        """Restores get_state's state; batch_decisions.jsonl loses the decisions made after it."""
        # In place: the run's other callbacks hold this list.
        self.phases[:] = [tuple(p) for p in state["phases"]] if "phases" in state else [(0, self.base_batch)]
        self.gains = list(state.get("gains", [1.0]))
        self.ladder = {int(b): s for b, s in state.get("ladder", {}).items()}
        self.own = {int(b): s for b, s in state.get("own", {}).items()}
        if "batches" in state:  # the grid, cut below a batch that ran out of memory
            self.batches = [int(b) for b in state["batches"]]
        self.decided_step = state.get("decided_step", 0)
        if os.path.exists(self.out_path):
            with open(self.out_path, "r+b") as f:
                f.truncate(state.get("out_bytes", 0))
        return []


def time_grid(model, data, batches: list[int], seed: int, strategy) -> tuple[dict, list[dict]]:
    """Times training steps at each batch of the grid (step_times.time_ladder) and puts the model back as it was.

    Returns:
        ({batch: seconds per step} of the batches that ran, the ladder's rows), the rows' last holding "error"
        when a batch ran out of memory.
    """
    from pipeline.training import step_times

    if not model.optimizer.built:
        with strategy.scope():
            model.optimizer.build(model.trainable_variables)
    variables = model.variables + model.optimizer.variables
    saved = [v.numpy() for v in variables]
    try:
        step_seconds = step_times.fit_step_seconds(
            model, lambda batch: step_times.any_batch(data.stream(batch, seed=seed)), LADDER_TIMED_STEPS)
        rows = step_times.time_ladder(step_seconds, batches)
    finally:
        for variable, value in zip(variables, saved):
            variable.assign(value)
    return {r["batch"]: r["seconds_per_step"] for r in rows if "error" not in r}, rows


def time_neighbours(controller, model, data, seed: int, strategy) -> float:
    """Times the batches controller.untimed_neighbours() names (time_grid) and gives them to the controller; returns
    the seconds it took (0 when every neighbour had a time)."""
    batches = controller.untimed_neighbours()
    if not batches:
        return 0.0
    started = time.perf_counter()
    _, rows = time_grid(model, data, batches, seed, strategy)
    controller.add_times(rows)
    seconds = time.perf_counter() - started
    times = ", ".join(f"{r['batch']}: {1000 * r['seconds_per_step']:.1f} ms" for r in rows if "error" not in r)
    print(f"adaptive batch: step times {times} ({seconds:.1f} s)"
          + (f"; {rows[-1]['batch']}: {rows[-1]['error']}" if "error" in rows[-1] else ""), flush=True)
    return seconds


def train_phases(config, data, model, controller, schedule, strategy, topology, callbacks, val, verbose,
                  trained: int) -> float:
    """--batch adaptive: one fit() call per batch phase, each ended by the controller's decision to change the batch.

    With the goodput policy, each phase first times the grid batches a decision at its batch may move to
    (time_neighbours, the model put back as it was), unless the controller (restored on resume) holds their times.

    Args:
      config, data, model, schedule, strategy, topology: the run's (pipeline/training/fit_loop.py); schedule an
        optim.AdaptiveSchedule.
      controller: the run's AdaptiveBatch, restored from the checkpoint when resuming.
      callbacks, val, verbose: what each fit() call gets.
      trained: epochs finished before this attempt.

    Returns:
      The seconds spent timing batches in this attempt.
    """
    ladder_seconds = 0.0
    while trained < config.epochs:
        i = max(k for k, (first, _) in enumerate(controller.phases) if first <= trained)
        first, batch = controller.phases[i]
        if config.batch_policy == "goodput":
            ladder_seconds += time_neighbours(controller, model, data, config.seed, strategy)
        schedule.set_phase(first_step(first, controller.phases, data.num_train), first, data.num_train // batch,
                           controller.gains[i])
        controller.follow(batch)
        fit_input = data.fit_input(batch, seed=config.seed, first_epoch=trained, epochs=config.epochs,
                                   steps_per_execution=1)
        train_data = distribute.distribute_train(strategy, topology, fit_input.make, batch,
                                                 sharded=config.input == "stream")
        model.fit(train_data, validation_data=val, shuffle=False, initial_epoch=trained, epochs=config.epochs,
                  steps_per_epoch=fit_input.steps_per_epoch, callbacks=[*fit_input.callbacks, *callbacks],
                  verbose=verbose)
        if not controller.changed:
            break
        trained = controller.phases[-1][0]
    return ladder_seconds
