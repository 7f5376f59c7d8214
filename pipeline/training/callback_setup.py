"""The training run's callback list: stops, replica BN statistics, instruments (and the steps between their
measurements that a flag value means), logs, checkpoint."""

from __future__ import annotations

import os

from pipeline import config as config_lib
from pipeline.config import Config
from pipeline.training import distribute

# Training examples whose predictions LearningDynamics follows at each epoch end (Toneva et al. 2019 use the
# whole set). A look costs ~0.1 of a training step per example (ResNet-20 on digits: ~12 ms for 258 examples
# against a 0.6 s epoch), so a tenth of the training set costs ~1% of an epoch; at most 1000 examples.
DYNAMICS_FRACTION, DYNAMICS_MAX = 0.1, 1000
# Training examples (the first, un-augmented) of the loss whose curvature callbacks.Curvature measures; a
# measurement costs ~12-25 Hessian-vector products of these (callbacks/curvature.py's defaults), each about two
# training steps of 512 examples.
CURVATURE_EXAMPLES = 512
# Automatic (-1) measurements of the gradient and BN statistics: in a run of its own, step 0 and the geometric
# schedule of callbacks/schedule.py (steps 10, 20, 40, ...), dense where training changes fast, plus the last step.
# A sweep gives every run MEASUREMENTS_PER_RUN measurements at the same fractions of its budget: the same number at
# every batch size, where a fixed interval would leave the few steps of a large batch unmeasured (plus one at step
# 0). Replica gradient statistics pool the steps between records, and take AUTO_INTERVAL steps in a run of its own,
# at most a quarter of an epoch (at the base batch with --batch adaptive), so that a short run has records and every
# adaptive decision some.
AUTO_INTERVAL = 100
MEASUREMENTS_PER_RUN = 16


def instrument_interval(every: int, total_steps: int | None = None) -> int | None:
    """Steps between measurements for a grad_stats_every or bn_stats_every value: 0 off, None the geometric schedule.

    -1 (automatic) is None (geometric) in a run of its own, and for a sweep's run of `total_steps` steps
    MEASUREMENTS_PER_RUN measurements spread evenly over them: max(1, total_steps // MEASUREMENTS_PER_RUN).
    """
    if every != -1:
        return every
    return None if total_steps is None else max(1, total_steps // MEASUREMENTS_PER_RUN)


def instruments(config: Config, data, model, run_dir: str, bn_batch: int | None = None, replicas: int = 1) -> list:
    """The measuring callbacks that config turns on: gradient and BN statistics, learning dynamics, curvature.

    With several replicas the gradient statistics come from the training steps' replica gradients (the model must
    be compiled_model(..., replica_norms=True)); else they, and the others, draw the batches of the measurement at
    step s from data.draws(seed=seed + 1, step=s), never from the training iterator, so that a resumed run measures
    on the examples an uninterrupted one does.
    BatchNormStatistics measures batches of bn_batch examples (default: the global batch), the examples that one
    BN layer normalizes over in training: a replica's slice with --norm batch, the global batch with syncbatch.
    The replica statistics' automatic interval is AUTO_INTERVAL steps, at most a quarter of an epoch at the first
    batch of the run (the base batch with --batch adaptive).
    """
    import callbacks

    tensorboard_dir = os.path.join(run_dir, "tensorboard")

    def draws(batch):
        return lambda step: data.draws(batch, seed=config.seed + 1, step=step)

    grad_every = instrument_interval(config.grad_stats_every)
    bn_every = instrument_interval(config.bn_stats_every)
    result = []
    out_path = os.path.join(run_dir, "grad_stats.jsonl")
    if grad_every != 0 and replicas > 1:  # None: the geometric schedule
        from callbacks.replica_gradient_stats import ReplicaGradientStatistics

        every = grad_every or AUTO_INTERVAL
        if grad_every is None:  # records in every quarter epoch: a short run's curve, an adaptive decision's data
            every = min(every, data.num_train // config.batch_phases[0][1] // 4)
        with config_lib.as_flag_error("grad_stats_every"):
            # A record pools at least 2 steps (its interval comes from their scatter).
            result.append(ReplicaGradientStatistics(replicas, max(2, every),
                                                    batch_size=config.batch * config.accumulate,
                                                    population=data.num_train, log_dir=tensorboard_dir,
                                                    out_path=out_path))
    elif grad_every != 0:
        # An augmented draw is a new example, not one of the split's N: no finite population (its factor would
        # understate the noise), and at most one pass of the split per measurement, so that none repeats.
        augmented = data.augmentation == "crop-flip"
        most = min(config.grad_stats_max_examples, data.num_train) if augmented else config.grad_stats_max_examples
        with config_lib.as_flag_error("grad_stats_every"):
            result.append(callbacks.GradientStatistics(
                draws(config.batch), every_n_steps=grad_every, batch_size=config.batch * config.accumulate,
                relative_half_width=config.grad_stats_precision, max_examples=most,
                budget_fraction=config.grad_stats_budget or None, population=None if augmented else data.num_train,
                population_data=_whole_split(config, data), seed=config.seed + 1, log_dir=tensorboard_dir,
                out_path=out_path))
    if bn_every != 0 and callbacks.batch_norm_inputs(model):
        # Population statistics over the un-augmented training examples that precise BN uses.
        population = data.train_dataset(config.batch, seed=config.seed, augment=False, epoch=0)
        with config_lib.as_flag_error("bn_stats_every"):
            result.append(callbacks.BatchNormStatistics(draws(bn_batch or config.batch), every_n_steps=bn_every,
                                                        log_dir=tensorboard_dir, out_dir=run_dir, population=population,
                                                        population_samples=config.bn_stats_samples))
    if config.dynamics:
        x, y = data.arrays("train", limit=min(DYNAMICS_MAX, max(1, int(data.num_train * DYNAMICS_FRACTION))))
        with config_lib.as_flag_error("dynamics"):
            result.append(callbacks.LearningDynamics(
                x, y, class_names=data.class_names, log_dir=tensorboard_dir,
                out_dir=os.path.join(run_dir, "dynamics")))
    if config.curvature_every:
        x, y = data.arrays("train", limit=CURVATURE_EXAMPLES)
        with config_lib.as_flag_error("curvature_every"):
            end_only = config.curvature_every < 0
            result.append(callbacks.Curvature(
                x, y, every_n_steps=None if end_only else config.curvature_every, at_train_begin=not end_only,
                seed=config.seed, log_dir=tensorboard_dir,
                out_path=os.path.join(run_dir, "curvature.jsonl")))
    return result


def _whole_split(config: Config, data):
    """The un-augmented training split for a gradient measurement that needs all of it, or None: augmented data
    (its population is not the split's examples) or a split larger than a measurement may take."""
    if data.augmentation == "crop-flip" or data.num_train > config.grad_stats_max_examples:
        return None
    import tensorflow as tf

    return tf.data.Dataset.from_tensor_slices(data.arrays("train")).batch(1024)


def adaptive_batch(config: Config, data, run_dir: str, topology, measuring: list):
    """The controller of --batch adaptive (training/adaptive_batch.py), deciding from the gradient statistics in
    `measuring`, on the grid from --base-batch up to --max-batch (or the training split)."""
    from callbacks import GradientStatistics
    from callbacks.replica_gradient_stats import ReplicaGradientStatistics
    from pipeline.training import adaptive_batch, batch_policy

    gradients = next(m for m in measuring if isinstance(m, (GradientStatistics, ReplicaGradientStatistics)))
    largest = min(config.max_batch or data.num_train, data.num_train)
    return adaptive_batch.AdaptiveBatch(
        config.batch_policy, gradients, batch_policy.grid(config.base_batch, largest), base_batch=config.base_batch,
        optimizer=config.optimizer, num_train=data.num_train, epochs=config.epochs,
        run_dir=run_dir, instruments=measuring, theta=config.norm_test_theta)


def build(config, data, run_dir: str, schedule, strategy, topology, measuring: list, phases=None) -> list:
    """The callback list, in order: the run's stops, the instruments `measuring`, then loggers and the checkpoint.

    phases: the run's ((first_epoch, batch), ...), config.batch_phases by default; with --batch adaptive the
    controller's list, which grows as it decides.

    Instruments come before the loggers, so that loggers see their values.
    A multi-worker run's other workers (not the chief) get only the callbacks that keep them in step; they write
    nowhere in the run directory and commit their checkpoints in a folder of their own (distribute.worker_folder).
    """
    import keras

    from callbacks.epoch_logs import DropUnmeasured
    from callbacks.replica_bn import AverageReplicaStatistics
    from pipeline.training import checkpoint
    from pipeline.training import run_control as run

    phases = config.batch_phases if phases is None else phases
    result = [run.StopOnNonFinite()]
    if config.max_steps:
        result.append(run.StopAtMaxSteps(config.max_steps, phases, data.num_train))
    if topology.replicas > 1:  # Before the checkpoint: one set of BN moving statistics on every replica.
        result.append(AverageReplicaStatistics(strategy))
    if not topology.is_chief:
        return result + [checkpoint.callback(distribute.worker_folder(),
                                             lambda epoch: run.first_step(epoch, phases, data.num_train))]
    result += measuring
    result += [
        run.MetricsLogger(run_dir, phases, data.num_train, schedule, measuring),
        # CSVLogger sees an instrument's NaN in epochs without a new measurement (stable columns); TensorBoard and
        # the console line, after DropUnmeasured, see only measured values.
        keras.callbacks.CSVLogger(os.path.join(run_dir, "metrics.csv"), append=True),
        DropUnmeasured(),
        keras.callbacks.TensorBoard(os.path.join(run_dir, "tensorboard"), write_graph=False),
        # Committed at every epoch end and kept at the end, so a NaN stop keeps the last good epoch.
        # The instruments' state is committed with the weights (pipeline/training/checkpoint.py).
        checkpoint.callback(os.path.join(run_dir, "checkpoints"),
                            lambda epoch: run.first_step(epoch, phases, data.num_train), measuring),
    ]
    return result


def target_check(config, data, run_dir: str, measuring: list):
    """pipeline.training.target's check of --target-accuracy; its time is left out of training time, as the instruments' is.

    Args:
      measuring: the instruments, whose measuring time the check's timer includes.
    """
    from callbacks import timing
    from pipeline.training import target as target_lib

    from callbacks import Curvature

    # In steps of the first batch phase's epoch (config.batch), for the whole run.
    every = target_lib.interval(data.num_train // config.batch, config.target_checks_per_epoch)
    # The curvature at the step the target is first reached: the study compares runs at equal accuracy too.
    at_target = [m.measure_at_target for m in measuring if isinstance(m, Curvature)]
    return target_lib.TargetCheck(data.eval_dataset("val", config.inference_batch), config.target_accuracy, every,
                                  run_dir, lambda: timing.seconds(measuring), when_reached=at_target)
