"""Tests for callbacks.precise_bn: exact population statistics, checked against a NumPy forward pass."""

import logging
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from numpy.lib.stride_tricks import sliding_window_view
from sklearn.datasets import load_digits

from callbacks.precise_bn import PreciseBN, precise_bn


def small_cnn() -> keras.Model:
    """conv-BN-relu x2, then dense-BN-relu; random weights and deliberately wrong moving statistics."""
    inputs = keras.Input((7, 7, 2))
    x = keras.layers.Conv2D(4, 3, name="conv1")(inputs)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(5, 2, name="conv2")(x)
    x = keras.layers.BatchNormalization(name="bn2")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(6, name="dense")(x)
    x = keras.layers.BatchNormalization(name="bn3")(x)
    x = keras.layers.ReLU()(x)
    outputs = keras.layers.Dense(3, activation="softmax", name="probabilities")(x)
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(1)
    for weight in model.trainable_weights:
        weight.assign(rng.normal(0.3, 0.5, weight.shape).astype("float32"))
    set_wrong_statistics(model)
    return model


def set_wrong_statistics(model: keras.Model) -> None:
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_mean.assign(np.full(layer.moving_mean.shape, 3.0, "float32"))
            layer.moving_variance.assign(np.full(layer.moving_variance.shape, 0.01, "float32"))


def numpy_bn_inputs(model: keras.Model, x: np.ndarray) -> dict[str, np.ndarray]:
    """The inputs of bn1, bn2, bn3 of `small_cnn` in inference mode, by a float64 NumPy forward pass."""

    def weights(name):
        return [np.asarray(w, np.float64) for w in model.get_layer(name).get_weights()]

    def conv(h, name):
        kernel, bias = weights(name)
        patches = sliding_window_view(h, kernel.shape[:2], axis=(1, 2))  # (N, H', W', C, kh, kw)
        return np.einsum("nhwcij,ijco->nhwo", patches, kernel) + bias

    def bn_relu(h, name):
        gamma, beta, mean, variance = weights(name)
        return np.maximum((h - mean) / np.sqrt(variance + model.get_layer(name).epsilon) * gamma + beta, 0.0)

    inputs = {"bn1": conv(np.asarray(x, np.float64), "conv1")}
    inputs["bn2"] = conv(bn_relu(inputs["bn1"], "bn1"), "conv2")
    kernel, bias = weights("dense")
    inputs["bn3"] = bn_relu(inputs["bn2"], "bn2").reshape(len(x), -1) @ kernel + bias
    return inputs


def moving_statistics(model: keras.Model) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {
        layer.name: (layer.moving_mean.numpy(), layer.moving_variance.numpy())
        for layer in model.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    }


def assert_population_statistics(model: keras.Model, bn_inputs: dict[str, np.ndarray]) -> None:
    """Each layer's moving mean and variance equal its input's mean and biased variance, relative error <= 1e-3."""
    for name, (moving_mean, moving_variance) in moving_statistics(model).items():
        values = bn_inputs[name].reshape(-1, bn_inputs[name].shape[-1])
        mean, variance = values.mean(axis=0), values.var(axis=0)
        # Relative to |mean|, but never to less than the spread, so channels with mean ~ 0 are fair.
        assert np.max(np.abs(moving_mean - mean) / np.maximum(np.abs(mean), np.sqrt(variance))) <= 1e-3, name
        assert np.max(np.abs(moving_variance - variance) / variance) <= 1e-3, name


@pytest.fixture
def examples():
    rng = np.random.default_rng(0)
    # Channel offsets and scales make the statistics far from 0 and 1.
    return (rng.normal(size=(250, 7, 7, 2)) * [1.0, 3.0] + [2.0, -1.0]).astype("float32")


def test_moving_statistics_equal_population_statistics_of_inputs(examples):
    model = small_cnn()
    model.compile(optimizer=keras.optimizers.Adam(), loss="sparse_categorical_crossentropy")
    model.optimizer.build(model.trainable_variables)
    trainable_before = [w.numpy() for w in model.trainable_weights]
    optimizer_before = [v.numpy() for v in model.optimizer.variables]
    # 250 examples in batches of 32; the 200 used end in the middle of the seventh batch.
    dataset = tf.data.Dataset.from_tensor_slices((examples, np.zeros(250, "int32"))).batch(32)

    report = precise_bn(model, dataset, num_samples=200)

    assert list(report) == ["bn1", "bn2", "bn3"]
    assert [entry["samples"] for entry in report.values()] == [200, 200, 200]
    assert [entry["channels"] for entry in report.values()] == [4, 5, 6]
    assert all(entry["mean_shift"] > 0.1 for entry in report.values())
    # Upstream layers with their new statistics: the definition precise_bn documents.
    assert_population_statistics(model, numpy_bn_inputs(model, examples[:200]))
    for before, after in zip(trainable_before, model.trainable_weights):
        np.testing.assert_array_equal(before, after.numpy())
    for before, after in zip(optimizer_before, model.optimizer.variables):
        np.testing.assert_array_equal(before, after.numpy())
    assert int(model.optimizer.iterations) == 0


def test_new_weights_and_a_new_model_of_the_architecture_trace_nothing_again(examples):
    # The study's loss line calls precise_bn at every point of a line of weights on one model, and a sweep's runs call
    # it on a new model of one architecture each: the compiled level functions are made once per architecture, and
    # must read the weights of the call (of that model), not those of the first one.
    module = sys.modules[precise_bn.__module__]
    model = small_cnn()
    dataset = tf.data.Dataset.from_tensor_slices((examples, np.zeros(250, "int32"))).batch(64)
    precise_bn(model, dataset, num_samples=250)
    first = next(iter(dataset))[0]
    functions = [function for _, function in module._level_functions(model, module.batch_norm_inputs(model), first)]
    counts = [function.experimental_get_tracing_count() for function in functions]
    assert len(functions) == 3 and min(counts) >= 1
    rng = np.random.default_rng(7)
    for weight in model.trainable_weights:
        weight.assign(rng.normal(-0.2, 0.6, weight.shape).astype("float32"))
    set_wrong_statistics(model)
    precise_bn(model, dataset, num_samples=250)
    assert_population_statistics(model, numpy_bn_inputs(model, examples))

    other = small_cnn()  # new layers, new initial weights
    set_wrong_statistics(other)
    precise_bn(other, dataset, num_samples=250)
    assert_population_statistics(other, numpy_bn_inputs(other, examples))
    assert [function for _, function in module._level_functions(other, module.batch_norm_inputs(other),
                                                                 first)] == functions
    assert [function.experimental_get_tracing_count() for function in functions] == counts
    for name, (mean, _) in moving_statistics(other).items():
        assert not np.allclose(mean, moving_statistics(model)[name][0], rtol=0.1)  # the two models differ


def test_batch_size_does_not_change_the_statistics(examples):
    model = small_cnn()
    precise_bn(model, tf.data.Dataset.from_tensor_slices(examples[:200]).batch(32), num_samples=8192)
    by_32 = moving_statistics(model)
    set_wrong_statistics(model)
    report = precise_bn(model, tf.data.Dataset.from_tensor_slices(examples[:200]).batch(7), num_samples=8192)
    assert report["bn1"]["samples"] == 200  # the whole set, which is smaller than num_samples
    for name, (mean, variance) in moving_statistics(model).items():
        np.testing.assert_allclose(mean, by_32[name][0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(variance, by_32[name][1], rtol=1e-5)


def test_nested_sequential_model():
    inputs = keras.Input((3,))
    block = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), keras.layers.BatchNormalization()])
    x = keras.layers.ReLU()(block(inputs))
    x = keras.layers.Dense(2)(x)
    outputs = keras.layers.BatchNormalization()(x)
    model = keras.Model(inputs, outputs)
    examples = np.random.default_rng(2).normal(1.0, 2.0, (90, 3)).astype("float32")

    precise_bn(model, tf.data.Dataset.from_tensor_slices(examples).batch(16), num_samples=90)

    dense, inner_bn = block.layers
    outer_dense, outer_bn = model.layers[-2:]
    h = examples.astype(np.float64) @ dense.kernel.numpy() + dense.bias.numpy()
    z = (h - inner_bn.moving_mean.numpy()) / np.sqrt(inner_bn.moving_variance.numpy() + inner_bn.epsilon)
    z = np.maximum(z * inner_bn.gamma.numpy() + inner_bn.beta.numpy(), 0.0)
    g = z @ outer_dense.kernel.numpy() + outer_dense.bias.numpy()
    for layer, values in ((inner_bn, h), (outer_bn, g)):
        np.testing.assert_allclose(layer.moving_mean.numpy(), values.mean(axis=0), rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(layer.moving_variance.numpy(), values.var(axis=0), rtol=1e-3)


def test_model_without_batch_norm_is_left_alone(caplog):
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    before = [w.numpy() for w in model.weights]
    with caplog.at_level(logging.WARNING):
        assert precise_bn(model, tf.data.Dataset.from_tensor_slices(np.ones((4, 3), "float32")).batch(2)) == {}
    assert "no BatchNormalization layer" in caplog.text
    for weight, value in zip(model.weights, before):
        np.testing.assert_array_equal(weight.numpy(), value)


def test_rejects_bad_input():
    model = small_cnn()
    dataset = tf.data.Dataset.from_tensor_slices(np.ones((4, 7, 7, 2), "float32")).batch(2)
    with pytest.raises(ValueError, match="num_samples"):
        precise_bn(model, dataset, num_samples=0)
    with pytest.raises(ValueError, match="no examples"):
        precise_bn(model, dataset.take(0))

    class Block(keras.layers.Layer):
        def __init__(self):
            super().__init__()
            self.norm = keras.layers.BatchNormalization()

        def call(self, x, training=None):
            return self.norm(x, training=training)

    inputs = keras.Input((3,))
    with pytest.raises(ValueError, match="subclassed layer"):
        precise_bn(keras.Model(inputs, Block()(inputs)), dataset)


def digits_cnn() -> keras.Model:
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(16, 3, padding="same")(inputs)
    x = keras.layers.BatchNormalization()(x)  # Keras' default momentum 0.99: stale after a short run
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(32, 3, strides=2, padding="same")(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(10, activation="softmax", name="probabilities")(x))


def test_precise_statistics_match_batch_statistics_accuracy():
    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    x, y = digits.images[order, :, :, None].astype("float32"), digits.target[order].astype("int32")
    x_train, y_train, x_test, y_test = x[:1300], y[:1300], x[1300:], y[1300:]
    model = digits_cnn()
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), loss="sparse_categorical_crossentropy")
    model.fit(x_train, y_train, batch_size=32, epochs=3, verbose=0)

    def accuracy(probabilities):
        return float(np.mean(np.argmax(probabilities, axis=1) == y_test))

    stale = accuracy(model.predict(x_test, verbose=0))
    # Batch statistics: the test set as one batch, without letting the call update the moving averages.
    outputs, _ = model.stateless_call(model.trainable_variables, model.non_trainable_variables, x_test, training=True)
    with_batch_statistics = accuracy(np.asarray(outputs))
    precise_bn(model, tf.data.Dataset.from_tensor_slices((x_train, y_train)).batch(32))
    precise = accuracy(model.predict(x_test, verbose=0))

    assert with_batch_statistics > 0.85
    assert stale < with_batch_statistics - 0.1  # the problem is real on this run
    assert abs(precise - with_batch_statistics) <= 0.02


def test_callback_runs_precise_bn_at_the_end_of_training(examples):
    model = small_cnn()
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    labels = np.zeros(len(examples), "int32")
    callback = PreciseBN(tf.data.Dataset.from_tensor_slices(examples[:64]).batch(16), num_samples=64)
    model.fit(examples, labels, batch_size=50, epochs=1, verbose=0, callbacks=[callback])
    assert list(callback.report) == ["bn1", "bn2", "bn3"]
    assert_population_statistics(model, numpy_bn_inputs(model, examples[:64]))
