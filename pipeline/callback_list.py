"""The training run's callback list: data epoch and stops, replica BN statistics, instruments, logs, checkpoint."""

from __future__ import annotations

import os

from pipeline import distribute


def build(config, data, run_dir: str, schedule, strategy, topology, measuring: list) -> list:
    """The callback list, in order: the run's stops, the instruments `measuring`, then loggers and the checkpoint.

    Instruments come before the loggers, so that loggers see their values.
    A multi-worker run's other workers (not the chief) get only the callbacks that keep them in step; they write
    nowhere in the run directory and commit their checkpoints in a folder of their own (distribute.worker_folder).
    """
    import keras

    from callbacks.epoch_logs import DropUnmeasured
    from callbacks.replica_bn import AverageReplicaStatistics
    from pipeline import checkpoint
    from pipeline import run_callbacks as run

    phases = config.batch_phases
    result = [run.SetEpoch(data), run.StopOnNonFinite()]
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
        checkpoint.callback(os.path.join(run_dir, "checkpoints"),
                            lambda epoch: run.first_step(epoch, phases, data.num_train)),
    ]
    return result


def target_check(config, data, run_dir: str, measuring: list):
    """pipeline.target's check of --target-accuracy; its time is left out of training time, as the instruments' is.

    Args:
      measuring: the instruments, whose measuring time the check's timer includes.
    """
    from callbacks import timing
    from pipeline import target as target_lib

    every = target_lib.interval(data.num_train // config.batch, config.target_checks_per_epoch)
    return target_lib.TargetCheck(data.eval_dataset("val", max(config.batch, 256)), config.target_accuracy, every,
                                  run_dir, lambda: timing.seconds(measuring))
