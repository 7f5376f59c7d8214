"""How the training step runs: steps per compiled call, threads per op, the Keras dtype policy and XLA, from a Config."""

from __future__ import annotations

import math

from pipeline.config import Config, InputError

# Largest number of steps that --steps-per-execution auto runs per call. benchmarks/speed.py measures the
# gain of N steps per call against 1 (benchmarks/results/speed.json).
AUTO_STEPS_MAX = 16
# --intra-op-threads auto is 1 on machines without a GPU and with at most this many cores. On the 2-core VM where
# the defaults were chosen, ResNet-20's ops (batch 32, 8x8 digits and 32x32 images) are too small to gain from
# being split over both cores, and one thread per op, two ops at a time (inter-op), was faster (benchmarks/speed.py).
# Larger machines were not measured, so they keep TensorFlow's default (one thread per core).
AUTO_SINGLE_THREAD_CORES = 2


def steps_per_execution(config: Config, num_train: int, replicas: int = 1) -> int:
    """--steps-per-execution resolved to a number of training steps per compiled call.

    Keras calls the callbacks once per call, after its last step, and ends a call at every epoch end. So that
    everything that acts at a step still acts at exactly that step, auto picks the largest N <= AUTO_STEPS_MAX that
    divides every such step count: the instruments' intervals, --max-steps and the steps of an epoch in each batch
    phase (num_train // batch). A NaN check sees the loss after each call: the run then stops at most N - 1 steps
    after the loss first became non-finite, still before the epoch's checkpoint, so the last good one is kept.

    With several replicas, Keras 3.15.1's loop of several steps per call fails under tf.distribute ("You must feed
    a value for placeholder tensor 'while/cond/Placeholder'", measured with MirroredStrategy), so auto is 1 there.

    Args:
      config: the run's Config.
      num_train: examples in the training split.
      replicas: replicas of the run's strategy.
    Returns:
      N >= 1.
    Raises:
      InputError: N > 1 with several replicas.
    """
    if config.steps_per_execution != "auto":
        if replicas > 1 and int(config.steps_per_execution) > 1:
            raise InputError("--steps-per-execution: more than 1 step per call fails with several replicas in "
                             "Keras 3.15 (tf.distribute); use 1 or auto")
        return int(config.steps_per_execution)
    if replicas > 1:
        return 1
    counts = [num_train // batch for _, batch in config.batch_phases]
    from callbacks import schedule  # here: the callbacks package imports Keras
    from pipeline.training import callback_setup

    for flag in (config.grad_stats_every, config.bn_stats_every):
        every = callback_setup.instrument_interval(flag)
        counts.append(schedule.FIRST if every is None else every)  # the geometric schedule's steps are multiples
    counts += [config.max_steps]
    common = 0
    for count in counts:
        common = math.gcd(common, count)  # gcd(0, n) = n: an instrument that is off or no step limit adds nothing
    return max(n for n in range(1, AUTO_STEPS_MAX + 1) if common % n == 0) if common else AUTO_STEPS_MAX


def resolved_threads(config: Config) -> int:
    """config.intra_op_threads with auto (-1) resolved for this machine: 1 or 0 (TensorFlow's default)."""
    import os

    import tensorflow as tf

    if config.intra_op_threads != -1:
        return config.intra_op_threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return 1 if cores <= AUTO_SINGLE_THREAD_CORES and not tf.config.list_physical_devices("GPU") else 0


def set_threads(config: Config) -> int:
    """Sets the threads one TensorFlow op may use from config.intra_op_threads; call before TensorFlow starts.

    Returns:
      The threads per op in effect (0: TensorFlow's default). If TensorFlow already started in this process (a
      notebook, a test, a sweep's second run) it keeps its setting; an explicit value that differs is an error.
    Raises:
      InputError: config.intra_op_threads > 0 differs from the setting of a process where TensorFlow started.
    """
    import tensorflow as tf

    threads = resolved_threads(config)
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
    except RuntimeError:  # TensorFlow has started: the setting can no longer change
        current = tf.config.threading.get_intra_op_parallelism_threads()
        if config.intra_op_threads > 0 and current != threads:
            running = f"{current} threads per op" if current else "TensorFlow's default threads per op"
            raise InputError(f"--intra-op-threads: TensorFlow already runs in this process with {running}; start "
                             f"a new process for {threads}") from None
        return current
    return threads


def set_precision(config: Config) -> None:
    """Sets Keras' global dtype policy to config.precision; call before building the model.

    mixed_float16 and mixed_bfloat16 compute in 16 bits and keep float32 variables (Micikevicius et al. 2018);
    Keras wraps the optimizer in a LossScaleOptimizer for mixed_float16. Set on every run, so a float32 run in the
    same process is not left with an earlier run's policy.
    """
    import keras

    keras.config.set_dtype_policy(config.precision)
