"""Tests for callbacks.bn_stats: batch vs moving statistics checked against a NumPy forward pass in training mode."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from numpy.lib.stride_tricks import sliding_window_view

from callbacks.bn_stats import BatchNormStatistics
from models.norm import GhostBatchNormalization


def small_model() -> keras.Model:
    """conv-BN-relu, dense-ghostBN(4)-relu, softmax; random weights and arbitrary moving statistics."""
    inputs = keras.Input((5, 5, 2))
    x = keras.layers.Conv2D(3, 2, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(4, name="dense")(x)
    x = GhostBatchNormalization(virtual_batch_size=4, name="ghost")(x)
    x = keras.layers.ReLU()(x)
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax", name="probabilities")(x))
    rng = np.random.default_rng(3)
    for weight in model.trainable_weights:
        weight.assign(rng.normal(0.2, 0.6, weight.shape).astype("float32"))
    for layer in (model.get_layer("bn"), model.get_layer("ghost")):
        layer.moving_mean.assign(rng.normal(0.0, 1.0, layer.moving_mean.shape).astype("float32"))
        layer.moving_variance.assign(rng.uniform(0.5, 3.0, layer.moving_variance.shape).astype("float32"))
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="sparse_categorical_crossentropy")
    return model


def numpy_errors(model: keras.Model, x: np.ndarray) -> dict[str, tuple[float, float]]:
    """(mean_rel_error, var_rel_error) per layer, by a float64 NumPy forward pass of `small_model` in training mode."""

    def weights(name):
        return [np.asarray(w, np.float64) for w in model.get_layer(name).get_weights()]

    def errors(name, groups):  # groups: list of (examples, C) arrays of the layer's input values
        _, _, moving_mean, moving_variance = weights(name)
        scale = moving_variance + model.get_layer(name).epsilon
        mean_errors = [np.mean(np.abs(g.mean(axis=0) - moving_mean) / np.sqrt(scale)) for g in groups]
        var_errors = [np.mean(np.abs(g.var(axis=0) - moving_variance) / scale) for g in groups]
        return float(np.mean(mean_errors)), float(np.mean(var_errors))

    kernel, bias = weights("conv")
    h = np.einsum("nhwcij,ijco->nhwo", sliding_window_view(x.astype(np.float64), (2, 2), axis=(1, 2)), kernel) + bias
    result = {"bn": errors("bn", [h.reshape(-1, 3)])}
    gamma, beta, _, _ = weights("bn")
    mean, variance = h.mean(axis=(0, 1, 2)), h.var(axis=(0, 1, 2))  # training mode: the batch's statistics
    z = np.maximum((h - mean) / np.sqrt(variance + model.get_layer("bn").epsilon) * gamma + beta, 0.0)
    kernel, bias = weights("dense")
    g = z.reshape(len(x), -1) @ kernel + bias
    # Virtual batches of 4 in a batch of 10: examples 0-3 and 4-9 (the remainder joins the last one).
    result["ghost"] = errors("ghost", [g[:4], g[4:]])
    return result


def moving_statistics(model):
    return [v.numpy() for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)
            for v in (layer.moving_mean, layer.moving_variance)]


@pytest.fixture
def batch():
    return (np.random.default_rng(4).normal(size=(10, 5, 5, 2)) * [1.0, 2.0] + [1.0, -2.0]).astype("float32")


def test_errors_match_numpy_and_leave_moving_statistics_alone(batch):
    model = small_model()
    callback = BatchNormStatistics(tf.data.Dataset.from_tensors((batch, np.zeros(10, "int32"))), every_n_steps=1)
    callback.set_model(model)
    callback.on_train_begin()
    before = moving_statistics(model)

    logs = {"loss": 1.0}
    model.optimizer.iterations.assign_add(1)  # as a training step would
    callback.on_train_batch_end(0, logs)

    for after, value in zip(moving_statistics(model), before):
        np.testing.assert_array_equal(after, value)
    expected = numpy_errors(model, batch)
    for name in ("bn", "ghost"):
        row = callback.history[name][-1]
        np.testing.assert_allclose([row["mean_rel_error"], row["var_rel_error"]], expected[name], rtol=1e-4)
        assert row["moving_mean_drift"] == 0.0  # nothing changed since the start of training
    assert logs["loss"] == 1.0
    np.testing.assert_allclose(logs["bn/mean_rel_error"], np.mean([expected[n][0] for n in expected]), rtol=1e-4)
    np.testing.assert_allclose(logs["bn/var_rel_error"], np.mean([expected[n][1] for n in expected]), rtol=1e-4)

    # Drift: the RMS change per channel since the previous measurement.
    layer = model.get_layer("bn")
    delta_mean, delta_variance = np.array([0.3, -0.4, 1.2]), np.array([0.5, 0.0, -0.1])
    layer.moving_mean.assign(layer.moving_mean.numpy() + delta_mean)
    layer.moving_variance.assign(layer.moving_variance.numpy() + delta_variance)
    model.optimizer.iterations.assign_add(1)
    callback.on_train_batch_end(1, {})
    row = callback.history["bn"][-1]
    np.testing.assert_allclose(row["moving_mean_drift"], np.sqrt(np.mean(delta_mean**2)), rtol=1e-5)
    np.testing.assert_allclose(row["moving_variance_drift"], np.sqrt(np.mean(delta_variance**2)), rtol=1e-5)
    assert callback.history["ghost"][-1]["moving_mean_drift"] == 0.0


def test_fit_writes_tensorboard_and_tables(tmp_path, batch):
    model = small_model()
    x = np.concatenate([batch] * 4)
    y = np.zeros(len(x), "int32")
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(10)
    callback = BatchNormStatistics(dataset, every_n_steps=3, log_dir=str(tmp_path / "tb"), out_dir=str(tmp_path))
    seen = []

    class RecordLogs(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append(sorted(key for key in logs if key.startswith("bn/")))

    model.fit(x, y, batch_size=10, epochs=2, verbose=0, callbacks=[callback, RecordLogs()])

    # 8 steps: measured before the first step, after steps 3 and 6, and once more at the end; traced once.
    assert callback._measure_function.experimental_get_tracing_count() == 1
    assert seen[2] == seen[5] == ["bn/mean_rel_error", "bn/var_rel_error"] and seen[0] == []
    table = json.loads((tmp_path / "bn_stats.json").read_text())
    assert list(table["layers"]) == ["bn", "ghost"]
    assert [row["step"] for row in table["layers"]["bn"]["measurements"]] == [0, 3, 6, 8]
    assert table["layers"]["ghost"]["virtual_batch_size"] == 4
    assert table["layers"]["bn"]["channels"] == 3
    np.testing.assert_allclose(table["layers"]["bn"]["final"]["moving_mean_avg"],
                               model.get_layer("bn").moving_mean.numpy().mean(), rtol=1e-5)
    markdown = (tmp_path / "bn_stats.md").read_text()
    assert "| bn | 3 |" in markdown and "| ghost | 4 |" in markdown

    tags = set()
    for path in (tmp_path / "tb").iterdir():
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            tags.update(value.tag for value in event.summary.value)
    assert {"bn/bn/mean_rel_error", "bn/ghost/var_rel_error", "bn/bn/moving_mean_drift", "bn/bn/moving_mean",
            "bn/ghost/moving_variance", "bn/mean_rel_error", "bn/var_rel_error"} <= tags

    # A second fit (as a batch schedule runs one per phase) continues the history with the same compiled function.
    model.fit(x, y, batch_size=10, epochs=1, verbose=0, callbacks=[callback])
    assert callback._measure_function.experimental_get_tracing_count() == 1
    table = json.loads((tmp_path / "bn_stats.json").read_text())
    assert [row["step"] for row in table["layers"]["bn"]["measurements"]] == [0, 3, 6, 8, 9, 12]


def test_model_without_batch_norm_and_bad_steps(tmp_path):
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(inputs))
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    x, y = np.ones((4, 3), "float32"), np.zeros(4, "int32")
    callback = BatchNormStatistics(tf.data.Dataset.from_tensor_slices((x, y)).batch(2), every_n_steps=1,
                                   out_dir=str(tmp_path))
    model.fit(x, y, batch_size=2, epochs=1, verbose=0, callbacks=[callback])
    assert callback.history == {} and not (tmp_path / "bn_stats.json").exists()
    with pytest.raises(ValueError, match="^every_n_steps: must be a positive integer, got 0$"):
        BatchNormStatistics(tf.data.Dataset.from_tensor_slices(x), every_n_steps=0)


def test_steps_per_execution_measures_once_per_crossed_interval(batch):
    # With steps_per_execution=4, Keras calls on_train_batch_end after steps 4, 8 and 10 (the epoch's 10 steps):
    # every_n_steps=3 is crossed in each, and each measurement is labelled with the step it was taken at.
    model = small_model()
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="sparse_categorical_crossentropy", steps_per_execution=4)
    x, y = np.concatenate([batch] * 10), np.zeros(100, "int32")
    callback = BatchNormStatistics(tf.data.Dataset.from_tensor_slices((x, y)).batch(10), every_n_steps=3)
    model.fit(x, y, batch_size=10, epochs=1, verbose=0, callbacks=[callback])
    assert [row["step"] for row in callback.history["bn"]] == [0, 4, 8, 10]


def test_epochs_without_a_new_measurement_report_none(batch):
    # 4 steps per epoch (steps 1-4, 5-8, 9-12) and measurements at steps 0 and 7: epoch 2 has none. Its epoch logs
    # hold NaN (stable CSV columns) and, after DropUnmeasured, no bn/ key at all (TensorBoard, console).
    from callbacks.epoch_logs import DropUnmeasured

    model = small_model()
    x, y = np.concatenate([batch] * 4), np.zeros(40, "int32")
    callback = BatchNormStatistics(tf.data.Dataset.from_tensor_slices((x, y)).batch(10), every_n_steps=7)
    raw, shown = [], []
    model.fit(x, y, batch_size=10, epochs=3, verbose=0, callbacks=[
        callback, keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: raw.append(dict(logs))),
        DropUnmeasured(), keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: shown.append(dict(logs)))])
    assert [row["step"] for row in callback.history["bn"]] == [0, 7, 12]  # 12: the final one, after the last epoch
    assert [logs["bn/step"] for logs in raw[:2]] == [0, 7] and np.isnan(raw[2]["bn/step"])
    assert np.isnan(raw[2]["bn/var_rel_error"])
    means = [callback.history[name][1]["var_rel_error"] for name in ("bn", "ghost")]
    assert raw[1]["bn/var_rel_error"] == pytest.approx(np.mean(means))
    assert not any(key.startswith("bn/") for key in shown[2]) and "loss" in shown[2]
    assert shown[1]["bn/step"] == 7
