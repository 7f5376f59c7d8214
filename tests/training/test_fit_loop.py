"""End to end: train -> precise BN -> evaluate -> export -> reload, plus failure, accumulation and batch schedules."""

import dataclasses
import json
import os

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

from pipeline import config as config_lib
from pipeline import train as train_lib
from pipeline.data import in_memory as data_lib
from pipeline.training import checkpoint


def smoke(tmp_path, **changes):
    return dataclasses.replace(config_lib.smoke(), run_dir=str(tmp_path / "run"), **changes)


def checkpoint_weights(run_dir):
    """All arrays of the last committed checkpoint, by their path in the HDF5 file."""
    arrays = {}
    with h5py.File(checkpoint.latest_weights(os.path.join(run_dir, "checkpoints")), "r") as f:
        f.visititems(lambda name, item: arrays.__setitem__(name, item[()]) if isinstance(item, h5py.Dataset) else None)
    return arrays


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("smoke")
    config = smoke(tmp_path)
    return config, train_lib.train(config)


def test_smoke_run_completes_and_writes_everything(smoke_run):
    config, summary = smoke_run
    assert summary.status == "completed", summary.reason
    for key in ("train_accuracy", "val_accuracy", "test_accuracy", "test_loss"):
        assert 0 <= getattr(summary, key) <= (1 if "accuracy" in key else 100)
    assert summary.epochs == 2 and summary.steps == 2 * (1293 // 64)
    saved = json.load(open(os.path.join(config.run_dir, "summary.json")))
    assert saved["status"] == "completed" and saved["test_accuracy"] == summary.test_accuracy
    resolved = json.load(open(os.path.join(config.run_dir, "config.json")))
    assert resolved["config"]["batch"] == 64 and resolved["versions"]["tensorflow"] == tf.__version__
    assert "git_commit" in resolved
    # The resolved config loads back as the same Config.
    assert config_lib.load_json(os.path.join(config.run_dir, "config.json")) == config
    lines = [json.loads(l) for l in open(os.path.join(config.run_dir, "metrics.jsonl"))]
    assert [l["epoch"] for l in lines] == [0, 1]
    assert all(l["learning_rate"] > 0 and l["examples_per_sec"] > 0 for l in lines)
    # Measuring time is recorded per epoch and left out of throughput: examples / (epoch time - measuring).
    assert all(0 < l["instrument_time_s"] < l["epoch_time_s"] for l in lines)
    assert summary.instrument_time_s == pytest.approx(sum(l["instrument_time_s"] for l in lines))
    # What it is made of, per instrument and phase so far (callbacks.timing), adds up to the epochs' measuring time.
    phases = lines[-1]["instrument_phases_s"]
    assert {"GradientStatistics", "BatchNormStatistics"} <= set(phases) and phases["GradientStatistics"]["execution"] > 0
    # (Its tracing may be 0: a model of this architecture measured earlier in this process traced the function.)
    assert sum(sum(by_phase.values()) for by_phase in phases.values()) == pytest.approx(
        sum(l["instrument_time_s"] for l in lines))
    for l in lines[1:]:
        steps = 1293 // 64
        assert l["examples_per_sec"] == pytest.approx(steps * 64 / (l["epoch_time_s"] - l["instrument_time_s"]))
    grad_steps = [json.loads(l)["step"] for l in open(os.path.join(config.run_dir, "grad_stats.jsonl"))]
    assert grad_steps == list(range(0, 2 * (1293 // 64) + 1, 5))
    events = os.listdir(os.path.join(config.run_dir, "tensorboard", "train"))
    assert any(name.startswith("events.out.tfevents") for name in events)


def test_exported_model_reproduces_reported_accuracy(smoke_run):
    config, summary = smoke_run
    assert summary.export_path == os.path.join(config.run_dir, "export", "cnn", "1")
    serve = tf.saved_model.load(summary.export_path).signatures["serving_default"]
    x, y = data_lib.load(config).arrays("test")
    predicted = serve(images=tf.constant(x))["classes"].numpy()
    assert np.mean(predicted == y) == pytest.approx(summary.test_accuracy, abs=1e-6)


def test_finished_run_is_not_overwritten(smoke_run):
    config, _ = smoke_run
    with pytest.raises(config_lib.InputError, match="--overwrite"):
        train_lib.train(config)


@pytest.mark.slow
def test_precise_bn_gives_batch_statistics_accuracy(tmp_path):
    """The pipeline issue's trap: a short ResNet run with BN momentum 0.99 evaluates with stale statistics."""
    config = smoke(tmp_path, model="resnet20", epochs=2, batch=32, bn_momentum=0.99, precise_bn_samples=8192,
                   export=False)
    summary = train_lib.train(config)
    assert summary.status == "completed"
    assert summary.bn_statistics.startswith("precise BN")
    # Independent reference: the same trained weights evaluated with each batch's own statistics.
    from models import Norm, build_model

    data = data_lib.load(config)
    model = build_model("resnet20", data.input_shape, data.num_classes, Norm("batch", bn_momentum=0.99),
                        mean=data.mean, variance=data.variance)
    model.load_weights(checkpoint.latest_weights(os.path.join(config.run_dir, "checkpoints")), skip_mismatch=True)
    x, y = data.arrays("test")
    correct = 0
    for start in range(0, len(x), 120):
        probabilities = model(x[start : start + 120], training=True)
        correct += int(np.sum(np.argmax(probabilities, -1) == y[start : start + 120]))
    batch_stats_accuracy = correct / len(x)
    assert abs(summary.test_accuracy - batch_stats_accuracy) <= 0.02, (summary.test_accuracy, batch_stats_accuracy)


def test_nonfinite_loss_fails_run_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    from pipeline.training import optim

    real = optim.learning_rate

    def explodes_after_first_epoch(config, phases):
        schedule = real(config, phases)
        steps_per_epoch = phases[0][1]

        class Exploding(keras.optimizers.schedules.LearningRateSchedule):
            def __call__(self, step):
                return tf.where(step < steps_per_epoch, schedule(step), float("nan"))

        return Exploding()

    monkeypatch.setattr(optim, "learning_rate", explodes_after_first_epoch)
    config = smoke(tmp_path, epochs=3, norm="none")
    summary = train_lib.train(config)
    assert summary.status == "failed" and "loss became nan" in summary.reason
    assert json.load(open(os.path.join(config.run_dir, "summary.json")))["status"] == "failed"
    assert checkpoint.read_state(os.path.join(config.run_dir, "checkpoints"))["epoch"] == 1
    assert all(np.all(np.isfinite(a)) for a in checkpoint_weights(config.run_dir).values() if a.dtype.kind == "f")
    assert summary.export_path is None


def test_accumulated_batches_equal_one_large_batch(tmp_path):
    """K=4 accumulated batches of 8 give the update of one batch of 32 (BN-free model, same examples)."""
    common = dict(model="mlp", norm="none", schedule="constant", weight_decay=0.0, lr=0.05, epochs=1,
                  precise_bn_samples=0, grad_stats_every=0, bn_stats_every=0, dynamics=False, export=False)
    accumulated = smoke(tmp_path / "a", batch=8, accumulate=4, max_steps=4, **common)
    large = smoke(tmp_path / "b", batch=32, accumulate=1, max_steps=1, **common)
    assert train_lib.train(accumulated).status == "completed"
    assert train_lib.train(large).status == "completed"
    a, b = checkpoint_weights(accumulated.run_dir), checkpoint_weights(large.run_dir)
    kernels = [k for k in b if "layers" in k and "optimizer" not in k]
    assert kernels
    for key in kernels:
        np.testing.assert_allclose(a[key], b[key], atol=1e-6, err_msg=key)


@pytest.mark.slow
def test_batch_schedule_changes_batch_at_epochs_and_keeps_lr_in_epochs(tmp_path):
    config = smoke(tmp_path, batch_schedule="16@0,64@1,128@2", epochs=3, schedule="multistep", milestones="2",
                   gamma=0.1, lr=0.1, export=False, dynamics=False)
    summary = train_lib.train(config)
    assert summary.status == "completed"
    lines = [json.loads(l) for l in open(os.path.join(config.run_dir, "metrics.jsonl"))]
    steps = np.diff([0] + [l["step"] for l in lines])
    np.testing.assert_array_equal(steps, [1293 // 16, 1293 // 64, 1293 // 128])  # batches of 16, then 64, then 128
    # The learning rate logged at each epoch end follows the schedule in epochs: 0.1 before epoch 2, 0.01 after.
    np.testing.assert_allclose([l["learning_rate"] for l in lines], [0.1, 0.1, 0.01], rtol=1e-5)
