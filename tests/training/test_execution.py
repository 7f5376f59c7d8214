"""Speed settings: --steps-per-execution auto keeps exact steps; mixed precision and XLA train on this CPU."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from callbacks import schedule
from pipeline import config as config_lib
from pipeline.training import callback_setup, execution


@pytest.mark.parametrize("changes, expected", [
    # 1293 digits examples: 40 steps per epoch at batch 32, 20 at batch 64.
    (dict(batch=32, grad_stats_every=-1, bn_stats_every=-1), 10),  # gcd(40, 10): the geometric schedule's 10
    (dict(batch=32, grad_stats_every=0, bn_stats_every=0), 10),  # 40 -> 10
    (dict(batch=32, grad_stats_every=5, bn_stats_every=0), 5),
    (dict(batch=64, grad_stats_every=0, bn_stats_every=0, max_steps=30), 10),  # gcd(20, 30) = 10
    (dict(batch=32, batch_schedule="32@0,48@1", grad_stats_every=0, bn_stats_every=0), 2),  # gcd(40, 26) = 2
    (dict(batch=32, grad_stats_every=7, bn_stats_every=0), 1),
    (dict(steps_per_execution="3"), 3),
])
def test_auto_steps_per_execution_divides_every_exact_step(changes, expected):
    if changes.get("steps_per_execution", "auto") == "auto":  # several replicas: one step per call (see speed.py)
        assert execution.steps_per_execution(dataclasses.replace(config_lib.Config(), **changes), 1293, replicas=2) == 1
    config = dataclasses.replace(config_lib.Config(), **changes)
    steps = execution.steps_per_execution(config, 1293)
    assert steps == expected
    if config.steps_per_execution == "auto":
        exact = [1293 // b for _, b in config.batch_phases] + [config.max_steps]
        every = [callback_setup.instrument_interval(f) for f in (config.grad_stats_every, config.bn_stats_every)]
        exact += [schedule.FIRST if e is None else e for e in every]  # None: the geometric schedule
        assert all(count % steps == 0 for count in exact)


def test_several_steps_per_call_with_replicas_is_refused():
    with pytest.raises(config_lib.InputError, match="^--steps-per-execution: .* use 1 or auto$"):
        execution.steps_per_execution(dataclasses.replace(config_lib.Config(), steps_per_execution="4"), 1293, 2)


@pytest.mark.slow
def test_threads_per_op_are_set_in_a_new_process_and_recorded(tmp_path):
    """An explicit --intra-op-threads is set in the run's process and recorded in summary.json and config.json (auto
    in a new process: tests/test_distribute.py's workers record speed.resolved_threads)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    run_dir = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "pipeline.train", "--model", "cnn", "--max-steps", "2",
                           "--grad-stats-every", "0", "--bn-stats-every", "0", "--no-dynamics", "--no-export",
                           "--precise-bn-samples", "0", "--intra-op-threads", "2", "--run-dir", str(run_dir)],
                          capture_output=True, text=True, cwd=root, env={**os.environ, "PYTHONPATH": root},
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    with open(run_dir / "summary.json") as f:
        assert json.load(f)["intra_op_threads"] == 2
    with open(run_dir / "config.json") as f:
        assert json.load(f)["parallel"]["intra_op_threads"] == 2


def test_auto_threads_per_op_are_one_only_on_small_machines_without_gpus():
    import tensorflow as tf

    cores = len(os.sched_getaffinity(0))
    expected = 1 if cores <= execution.AUTO_SINGLE_THREAD_CORES and not tf.config.list_physical_devices("GPU") else 0
    assert execution.resolved_threads(config_lib.Config()) == expected
    assert execution.resolved_threads(dataclasses.replace(config_lib.Config(), intra_op_threads=3)) == 3


def test_threads_per_op_cannot_change_once_tensorflow_runs():
    import tensorflow as tf

    tf.constant(1.0) + 1.0  # TensorFlow runs in this process (conftest set its threads before it started)
    running = tf.config.threading.get_intra_op_parallelism_threads()
    assert execution.set_threads(config_lib.Config()) == running  # auto keeps what runs
    with pytest.raises(config_lib.InputError, match="^--intra-op-threads: .* start a new process"):
        execution.set_threads(dataclasses.replace(config_lib.Config(), intra_op_threads=running + 1))


@pytest.mark.parametrize("precision, jit", [("mixed_float16", True), ("mixed_bfloat16", False)])
@pytest.mark.slow
def test_mixed_precision_and_xla_train_measure_and_export(tmp_path, precision, jit):
    import tensorflow as tf

    from pipeline.train import train

    config = dataclasses.replace(config_lib.smoke(), precision=precision, jit=jit, steps_per_execution="auto",
                                 max_steps=15, run_dir=str(tmp_path / "run"))
    summary = train(config)
    assert summary.status == "completed" and summary.steps == 15 and summary.steps_per_execution == 5
    with open(tmp_path / "run" / "grad_stats.jsonl") as f:
        measured = [json.loads(line)["step"] for line in f]
    assert measured == [0, 5, 10, 15]
    served = tf.saved_model.load(summary.export_path).signatures["serving_default"]
    probabilities = served(images=tf.zeros((2, 8, 8, 1)))["probabilities"]
    assert probabilities.dtype == tf.float32
    np.testing.assert_allclose(probabilities.numpy().sum(axis=1), 1.0, rtol=1e-5)
    assert summary.test_accuracy > 0.3
    assert os.path.isdir(summary.export_path)
    import keras

    keras.config.set_dtype_policy("float32")  # the policy is global: leave the process as other tests expect it
