"""Optimizers and learning-rate schedules, with warmup and batch-size scaling, from Keras built-ins."""

from __future__ import annotations

import keras

from pipeline.config import Config

# Decoupled weight decay is not applied to biases and normalization parameters (Goyal et al. 2017, sec. 5.1
# apply it to all weights; modern recipes, e.g. timm and big_vision, exclude these: they have no scale).
NO_DECAY_NAMES = ["bias", "gamma", "beta"]


class PhasedEpochs:
    """Converts a step count into epochs when steps per epoch change between phases (a batch schedule).

    A phase is (first_epoch, steps_per_epoch); steps are counted from the start of training.
    """

    def __init__(self, phases: list[tuple[int, int]]):
        self.phases = []
        first_step = 0
        for i, (first_epoch, steps_per_epoch) in enumerate(phases):
            self.phases.append((first_step, first_epoch, steps_per_epoch))
            if i + 1 < len(phases):
                first_step += (phases[i + 1][0] - first_epoch) * steps_per_epoch

    def epoch(self, step):
        """Fractional epoch at a step (tensor or number)."""
        step = keras.ops.cast(step, "float32")
        epoch = keras.ops.zeros_like(step)
        for first_step, first_epoch, steps_per_epoch in self.phases:
            in_phase = keras.ops.greater_equal(step, first_step)
            value = first_epoch + (step - first_step) / steps_per_epoch
            epoch = keras.ops.where(in_phase, value, epoch)
        return epoch

    def total_steps(self, epochs: int) -> int:
        first_step, first_epoch, steps_per_epoch = self.phases[-1]
        return first_step + (epochs - first_epoch) * steps_per_epoch


@keras.saving.register_keras_serializable(package="batchscope")
class EpochSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """A Keras schedule evaluated in epochs, with linear warmup.

    lr(step) = min(1, e / warmup_epochs) * decay(e * steps_per_epoch_0), e = epoch at the step,
    where `decay` is a Keras schedule built with the first phase's steps per epoch. With a fixed
    batch this is the Keras schedule itself times the warmup ramp (Goyal et al. 2017, sec. 2.2:
    gradual warmup from ~0 to the peak lr). With a batch schedule, steps per epoch change, and
    evaluating in epochs keeps milestones at the epochs the user named (Smith et al. 2018).
    """

    def __init__(self, decay, phases, warmup_epochs=0.0):
        self.decay = decay
        self.phases = [tuple(p) for p in phases]
        self.warmup_epochs = float(warmup_epochs)
        self._epochs = PhasedEpochs(self.phases)

    def epoch(self, step):
        """Fractional epoch at a step (tensor or number)."""
        return self._epochs.epoch(step)

    def __call__(self, step):
        epoch = self.epoch(step)
        lr = self.decay(epoch * self.phases[0][1])
        if self.warmup_epochs > 0:
            # The +1 step keeps the first update from having a learning rate of exactly zero.
            first_steps = (epoch * self.phases[0][1] + 1.0) / (self.warmup_epochs * self.phases[0][1])
            lr = lr * keras.ops.minimum(1.0, first_steps)
        return lr

    def get_config(self):
        return {
            "decay": keras.saving.serialize_keras_object(self.decay),
            "phases": self.phases,
            "warmup_epochs": self.warmup_epochs,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["decay"] = keras.saving.deserialize_keras_object(config["decay"])
        return cls(**config)


@keras.saving.register_keras_serializable(package="batchscope")
class AdaptiveSchedule(EpochSchedule):
    """The EpochSchedule of `--batch adaptive`, whose phases are decided during the run (training/adaptive_batch.py).

    The phase in force lives in variables that the run sets before each fit() call (`set_phase`), so the compiled
    step reads it: epoch(step) = first_epoch + (step - first_step) / steps_per_epoch, and
    lr(step) = gain * EpochSchedule's lr at that epoch, gain being AdaScale's r of the phase's batch
    (pipeline/training/goodput.py), fixed for the phase.
    """

    def __init__(self, decay, steps_per_epoch, warmup_epochs=0.0):
        super().__init__(decay, [(0, steps_per_epoch)], warmup_epochs)
        self.steps_per_epoch = int(steps_per_epoch)
        self._phase = {name: keras.Variable(value, dtype="float32", trainable=False, name=f"lr_phase_{name}")
                       for name, value in (("first_step", 0.0), ("first_epoch", 0.0),
                                           ("steps_per_epoch", float(steps_per_epoch)), ("gain", 1.0))}

    def set_phase(self, first_step: int, first_epoch: int, steps_per_epoch: int, gain: float) -> None:
        """Makes the phase that starts at `first_step` (batches trained) and `first_epoch` the one in force."""
        for name, value in (("first_step", first_step), ("first_epoch", first_epoch),
                            ("steps_per_epoch", steps_per_epoch), ("gain", gain)):
            self._phase[name].assign(float(value))

    def epoch(self, step):
        step = keras.ops.cast(step, "float32")
        return self._phase["first_epoch"] + (step - self._phase["first_step"]) / self._phase["steps_per_epoch"]

    def __call__(self, step):
        return self._phase["gain"] * super().__call__(step)

    def get_config(self):
        return {"decay": keras.saving.serialize_keras_object(self.decay), "steps_per_epoch": self.steps_per_epoch,
                "warmup_epochs": self.warmup_epochs}


def decay_schedule(config: Config, steps_per_epoch: int):
    """The Keras schedule for config.schedule, in steps of the first phase.

    constant: lr. step: lr * gamma^floor(epoch / step_epochs) (Caffe's lr_policy "step").
    multistep: lr * gamma^(number of milestones passed). exponential: lr * gamma^epoch.
    cosine: lr * (1 + cos(pi * epoch / epochs)) / 2 (Loshchilov & Hutter 2017, without restarts).
    """
    lr, gamma, epochs = config.effective_lr, config.gamma, config.epochs
    schedules = keras.optimizers.schedules
    if config.schedule == "constant":
        return schedules.PiecewiseConstantDecay([float(steps_per_epoch * epochs)], [lr, lr])
    if config.schedule == "step":
        return schedules.ExponentialDecay(lr, config.step_epochs * steps_per_epoch, gamma, staircase=True)
    if config.schedule == "multistep":
        # Keras switches after a boundary (step > b); Caffe's multistep switches at it (step >= m).
        boundaries = [m * steps_per_epoch - 0.5 for m in config.milestone_epochs]
        return schedules.PiecewiseConstantDecay(boundaries, [lr * gamma**i for i in range(len(boundaries) + 1)])
    if config.schedule == "exponential":
        return schedules.ExponentialDecay(lr, steps_per_epoch, gamma)
    return schedules.CosineDecay(lr, decay_steps=epochs * steps_per_epoch)


def adaptive_learning_rate(config: Config, steps_per_epoch: int) -> AdaptiveSchedule:
    """The schedule of --batch adaptive, starting with steps_per_epoch batches of --base-batch per epoch."""
    return AdaptiveSchedule(decay_schedule(config, steps_per_epoch), steps_per_epoch, config.warmup_epochs)


def learning_rate(config: Config, phases: list[tuple[int, int]]) -> EpochSchedule:
    """The run's schedule. phases: ((first_epoch, batches_per_epoch), ...); one phase without a batch schedule."""
    return EpochSchedule(decay_schedule(config, phases[0][1]), phases, config.warmup_epochs)


def build_optimizer(config: Config, schedule: keras.optimizers.schedules.LearningRateSchedule
                    ) -> keras.optimizers.Optimizer:
    """A Keras optimizer with the run's schedule (learning_rate), decoupled weight decay and gradient accumulation."""
    common = dict(
        learning_rate=schedule,
        weight_decay=config.weight_decay,
        # Keras averages the gradients of `accumulate` batches and updates once (Keras 3 built-in).
        gradient_accumulation_steps=config.accumulate if config.accumulate > 1 else None,
    )
    if config.optimizer in ("sgd", "nesterov"):
        optimizer = keras.optimizers.SGD(momentum=config.momentum, nesterov=config.optimizer == "nesterov", **common)
    elif config.optimizer == "adam":
        optimizer = keras.optimizers.Adam(**common)
    else:
        optimizer = keras.optimizers.AdamW(**common)
    if config.weight_decay:
        optimizer.exclude_from_weight_decay(var_names=NO_DECAY_NAMES)
    return optimizer
