"""Tests for callbacks.bn_stats: batch vs moving statistics checked against a NumPy forward pass in training mode."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from numpy.lib.stride_tricks import sliding_window_view

from callbacks.bn_stats import ERRORS, SUMMARY_KEYS, BatchNormStatistics
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


def layer_inputs(model: keras.Model, x: np.ndarray) -> dict[str, np.ndarray]:
    """The inputs of `small_model`'s "bn" (N, 4, 4, 3) and "ghost" (N, 4) layers by a float64 NumPy forward pass in
    training mode: "bn" normalizes with the statistics of all of x."""

    def weights(name):
        return [np.asarray(w, np.float64) for w in model.get_layer(name).get_weights()]

    kernel, bias = weights("conv")
    h = np.einsum("nhwcij,ijco->nhwo", sliding_window_view(x.astype(np.float64), (2, 2), axis=(1, 2)), kernel) + bias
    gamma, beta, _, _ = weights("bn")
    mean, variance = h.mean(axis=(0, 1, 2)), h.var(axis=(0, 1, 2))
    z = np.maximum((h - mean) / np.sqrt(variance + model.get_layer("bn").epsilon) * gamma + beta, 0.0)
    kernel, bias = weights("dense")
    return {"bn": h, "ghost": z.reshape(len(x), -1) @ kernel + bias}


def numpy_errors(model: keras.Model, x: np.ndarray, sample: np.ndarray) -> dict[str, list[float]]:
    """[batch mean, batch var, moving mean, moving var] errors per layer of `small_model` (callbacks.bn_stats's
    formulas), from float64 NumPy forward passes of the batch x and of the population sample."""
    batch, population = layer_inputs(model, x), layer_inputs(model, sample)
    result = {}
    for name, groups in (("bn", [slice(None)]), ("ghost", [slice(0, 4), slice(4, None)])):  # 10 = 4 + 6
        layer = model.get_layer(name)
        values = population[name].reshape(len(sample), -1, population[name].shape[-1])  # (N, positions, C)
        mean, variance = values.mean(axis=(0, 1)), values.var(axis=(0, 1))
        mean_se2 = values.mean(axis=1).var(axis=0, ddof=1) / len(sample)
        variance_se2 = np.square(values - mean).mean(axis=1).var(axis=0, ddof=1) / len(sample)
        scale = variance + layer.epsilon
        inputs = batch[name].reshape(len(x), -1, batch[name].shape[-1])
        batch_means = [inputs[g].mean(axis=(0, 1)) for g in groups]
        batch_variances = [inputs[g].var(axis=(0, 1)) for g in groups]
        moving_mean, moving_variance = (np.asarray(v, np.float64) for v in (layer.moving_mean, layer.moving_variance))

        def error(deviation_sq, noise_sq, units):
            return float(np.sqrt(max(np.mean((deviation_sq - noise_sq) / units), 0.0)))

        result[name] = [
            error(np.mean([np.square(m - mean) for m in batch_means], axis=0), mean_se2, scale),
            error(np.mean([np.square(v - variance) for v in batch_variances], axis=0), variance_se2, scale**2),
            error(np.square(moving_mean - mean), mean_se2, scale),
            error(np.square(moving_variance - variance), variance_se2, scale**2),
        ]
        # The resolution: the population sample's RMS standard error in the error's units.
        mean_resolution = float(np.sqrt(np.mean(mean_se2 / scale)))
        variance_resolution = float(np.sqrt(np.mean(variance_se2 / scale**2)))
        result[f"{name}_resolution"] = [mean_resolution, variance_resolution] * 2
    return result


def moving_statistics(model):
    return [v.numpy() for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)
            for v in (layer.moving_mean, layer.moving_variance)]


@pytest.fixture
def batch():
    return (np.random.default_rng(4).normal(size=(10, 5, 5, 2)) * [1.0, 2.0] + [1.0, -2.0]).astype("float32")


@pytest.fixture
def sample():
    """A population sample of 40 examples from a distribution shifted from `batch`'s, so no error is near 0."""
    return (np.random.default_rng(5).normal(size=(40, 5, 5, 2)) * [1.5, 2.0] + [1.5, -1.0]).astype("float32")


def test_errors_match_numpy_and_leave_moving_statistics_alone(batch, sample):
    model = small_model()
    population = tf.data.Dataset.from_tensor_slices(sample).batch(16)  # 16 + 16 + 8, joined into one sample
    callback = BatchNormStatistics(tf.data.Dataset.from_tensors((batch, np.zeros(10, "int32"))), every_n_steps=1,
                                   population=population)
    callback.set_model(model)
    callback.on_train_begin()
    before = moving_statistics(model)

    logs = {"loss": 1.0}
    model.optimizer.iterations.assign_add(1)  # as a training step would
    callback.on_train_batch_end(0, logs)

    for after, value in zip(moving_statistics(model), before):
        np.testing.assert_array_equal(after, value)
    expected = numpy_errors(model, batch, sample)
    for name in ("bn", "ghost"):
        row = callback.history[name][-1]
        np.testing.assert_allclose([row[key] for key in ERRORS], expected[name], rtol=1e-3)
        assert min(expected[name]) > 0.05  # none of them clipped at 0: the comparison is not vacuous
        resolutions = expected[f"{name}_resolution"]
        np.testing.assert_allclose([row[f"{key}_resolution"] for key in ERRORS], resolutions, rtol=1e-3)
        assert all(e > r for e, r in zip(expected[name], resolutions))  # all resolved: values, not bounds
        assert row["moving_mean_drift"] == 0.0  # nothing changed since the start of training
    assert logs["loss"] == 1.0
    for k, key in enumerate(ERRORS):
        np.testing.assert_allclose(logs[f"bn/{key}"], np.mean([expected[n][k] for n in ("bn", "ghost")]), rtol=1e-3)

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


def test_a_second_model_of_the_architecture_traces_nothing_and_measures_its_own_weights(batch, sample):
    """A sweep's next run builds a new model of the same architecture: the measuring function traced for the first
    (callbacks/shared_traces.py) must read the second model's weights and moving statistics, not the first's."""
    population = tf.data.Dataset.from_tensor_slices(sample).batch(16)
    rows = []
    for shift in (0.0, 0.8):
        model = small_model()
        for layer in model.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.moving_mean.assign(layer.moving_mean.numpy() + shift)
        callback = BatchNormStatistics(tf.data.Dataset.from_tensors((batch, np.zeros(10, "int32"))), every_n_steps=1,
                                       population=population)
        callback.set_model(model)
        callback.on_train_begin()
        model.optimizer.iterations.assign_add(1)
        callback.on_train_batch_end(0, {})
        expected = numpy_errors(model, batch, sample)
        for name in ("bn", "ghost"):
            np.testing.assert_allclose([callback.history[name][-1][key] for key in ERRORS], expected[name], rtol=1e-3)
        rows.append([callback.history["bn"][-1][key] for key in ERRORS])
    assert callback.phase_seconds.get("tracing", 0.0) == 0.0 and callback.phase_seconds["execution"] > 0
    assert not np.allclose(rows[0], rows[1], rtol=0.05)  # the two models' errors differ: not the first's weights


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
    assert seen[0] == []
    for keys in (seen[2], seen[5]):  # each error as a value, or as "below" its resolution
        assert all((f"bn/{key}" in keys) != (f"bn/{key}_below" in keys) for key in ERRORS) and "bn/step" not in keys
    table = json.loads((tmp_path / "bn_stats.json").read_text())
    # The batch holds the population's examples (x is 4 copies of it): its statistics ARE the population's, the
    # error is 0, and it is reported as below the resolution of the sample, never as 0.
    for row in table["layers"]["bn"]["measurements"]:
        assert row["batch_mean_error"] is None and row["batch_mean_error_resolution"] > 0
    assert "< " in (tmp_path / "bn_stats.md").read_text()
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
    assert {"bn/bn/moving_mean_drift", "bn/bn/moving_mean", "bn/ghost/moving_variance"} <= tags
    for name in ("bn", "ghost"):  # an error's scalar exists only where some measurement resolved it
        for key in ERRORS:
            resolved = any(row[key] is not None for row in table["layers"][name]["measurements"])
            assert (f"bn/{name}/{key}" in tags) == resolved, (name, key)
    assert "bn/bn/batch_mean_error" not in tags

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
    assert np.isnan(raw[2]["bn/batch_var_error"])
    average = callback.averages[1]
    for key in ERRORS:  # the epoch's measurement: a value, or NaN with the resolution it is below
        if average[key] is not None:
            assert raw[1][f"bn/{key}"] == pytest.approx(average[key]) and np.isnan(raw[1][f"bn/{key}_below"])
        else:
            assert np.isnan(raw[1][f"bn/{key}"])
            assert raw[1][f"bn/{key}_below"] == pytest.approx(average[f"{key}_resolution"])
    assert not any(key.startswith("bn/") for key in shown[2]) and "loss" in shown[2]
    assert shown[1]["bn/step"] == 7


@pytest.fixture(scope="module")
def digits_run():
    """A BN CNN trained on the digits for 2 epochs at batch 32 with BatchNormStatistics every 10 steps; at each of
    its measurements a later callback records the brute-force errors at those weights (independent code paths:
    precise_bn's layer-by-layer inference-mode pass on a copy for the population statistics, a plain training-mode
    call of a copy for the batch statistics, NumPy for the errors)."""
    from sklearn.datasets import load_digits

    from callbacks.precise_bn import batch_norm_inputs, precise_bn
    from models import build_model

    keras.utils.set_random_seed(1)
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(x))  # the file is grouped by writer: mix before splitting
    x, y = x[order].reshape(-1, 8, 8, 1).astype("float32") / 16, y[order].astype("int32")
    model = build_model("cnn", (8, 8, 1), 10, "batch")
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss="sparse_categorical_crossentropy")
    measured = tf.data.Dataset.from_tensor_slices((x[::-1], y[::-1])).batch(32)  # a known sequence of batches
    population = tf.data.Dataset.from_tensor_slices(x[:300]).batch(64)
    callback = BatchNormStatistics(measured, every_n_steps=10, population=population, population_samples=300)
    batches = iter(measured.repeat())

    class BruteForce(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.rows = []

        def on_train_batch_begin(self, batch, logs=None):
            self.on_train_batch_end(batch)  # the measurement at step 0 is taken before the first batch

        def on_train_batch_end(self, batch, logs=None):
            if len(self.rows) == len(callback.averages):
                return
            batch_x = next(batches)[0].numpy()
            copy = keras.models.clone_model(model)
            copy.set_weights(model.get_weights())
            pairs = batch_norm_inputs(copy)
            side = keras.Model(copy.inputs, [tensor for _, tensor in pairs])
            batch_inputs = [np.asarray(t, np.float64) for t in side(batch_x, training=True)]
            precise_bn(copy, population, 300)  # the copy's moving statistics become the population statistics
            sample_inputs = [np.asarray(t, np.float64) for t in side(x[:300], training=False)]
            errors = []
            for (layer, _), original, b, p in zip(pairs, batch_norm_inputs(model), batch_inputs, sample_inputs):
                mean, variance = (np.asarray(v, np.float64) for v in (layer.moving_mean, layer.moving_variance))
                per_example, b = (t.reshape(len(t), -1, t.shape[-1]) for t in (p, b))  # (N, positions, C)
                np.testing.assert_allclose(per_example.mean(axis=(0, 1)), mean, rtol=1e-3, atol=1e-4)
                mean_se2 = per_example.mean(axis=1).var(axis=0, ddof=1) / len(p)
                variance_se2 = np.square(per_example - mean).mean(axis=1).var(axis=0, ddof=1) / len(p)
                scale = variance + layer.epsilon
                moving = [np.asarray(v, np.float64) for v in (original[0].moving_mean, original[0].moving_variance)]
                deviations = [(b.mean(axis=(0, 1)) - mean) ** 2, (b.var(axis=(0, 1)) - variance) ** 2,
                              (moving[0] - mean) ** 2, (moving[1] - variance) ** 2]
                noises, units = [mean_se2, variance_se2] * 2, [scale, scale**2] * 2
                errors.append([np.sqrt(max(np.mean((d - n) / u), 0.0)) for d, n, u in zip(deviations, noises, units)]
                              + [np.sqrt(np.mean(n / u)) for n, u in zip(noises, units)])  # and the resolutions
            self.rows.append(np.mean(errors, axis=0))

    brute_force = BruteForce()
    model.fit(x, y, batch_size=32, epochs=2, verbose=0, shuffle=True, callbacks=[callback, brute_force])
    return model, callback, brute_force.rows, x


@pytest.mark.slow
def test_errors_match_brute_force_during_training(digits_run):
    _, callback, rows, _ = digits_run
    # 57 steps per epoch (1797 examples); measured at steps 0, 10, ..., 110 and once more at the end (114).
    assert [a["step"] for a in callback.averages] == [*range(0, 111, 10), 114]
    assert len(rows) == 12
    rows = np.array(rows)  # per measurement: 4 errors and 4 resolutions, averaged over layers
    resolutions = np.array([[a[f"{key}_resolution"] for key in ERRORS] for a in callback.averages[:12]])
    np.testing.assert_allclose(resolutions, rows[:, 4:], rtol=2e-3, atol=1e-6)
    # The rule: an error is a value where the brute-force error exceeds the resolution, else None ("< resolution").
    for average, row in zip(callback.averages, rows):
        for k, key in enumerate(ERRORS):
            if row[k] > row[4 + k] * 1.01:
                assert average[key] == pytest.approx(row[k], rel=2e-3, abs=1e-5), (average["step"], key)
            elif row[k] < row[4 + k] * 0.99:
                assert average[key] is None, (average["step"], key)
    resolved = np.array([[a[key] is not None for key in ERRORS] for a in callback.averages[:12]])
    assert resolved[:, 1].all() and resolved[:, 3].all()  # the variance errors exceed 300 examples' resolution
    print("resolved per error (batch mean, batch var, moving mean, moving var):", resolved.sum(axis=0))


def test_batch_error_falls_as_inverse_square_root_of_batch(digits_run):
    # At frozen trained weights, the RMS over 16 fresh batches of the batch-vs-population variance error at
    # B = 4, 16, 64 follows B^-0.5: the population sample's own noise is subtracted.
    from pipeline.study.fits import fit_power_law

    model, _, _, x = digits_run
    values = []
    for batch_size in (4, 16, 64):
        probe = BatchNormStatistics(tf.data.Dataset.from_tensor_slices(x[300:]).shuffle(2000, seed=0).batch(batch_size),
                                    population=tf.data.Dataset.from_tensor_slices(x[:300]).batch(100),
                                    population_samples=300)
        probe.set_model(model)
        probe.on_train_begin()
        errors = []
        for _ in range(16):  # single batches fall below the resolution at times: the estimates, not the reports
            probe.measure()
            errors.append(probe.estimates[-1]["batch_var_error"])
        values.append(float(np.sqrt(np.mean(np.square(errors)))))
    fit = fit_power_law([4, 16, 64], values)
    print("batch_var_error at B = 4, 16, 64:", values, "slope", fit["slope"])
    assert fit["slope"] == pytest.approx(-0.5, abs=0.12), values
