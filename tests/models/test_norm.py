"""Tests of models/norm.py: ghost batch norm against brute-force numpy, group and layer norm choices."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from models.norm import GhostBatchNormalization, Norm, group_count

EPSILON = 1e-3  # keras' default epsilon of batch norm


def _set_weights(layer, input_shape, seed=0):
    """Builds the layer and gives it non-trivial gamma, beta, moving mean and moving variance."""
    rng = np.random.default_rng(seed)
    layer.build(input_shape)
    channels = input_shape[-1]
    layer.gamma.assign(rng.uniform(0.5, 2.0, channels))
    layer.beta.assign(rng.normal(0.0, 1.0, channels))
    layer.moving_mean.assign(rng.normal(0.0, 1.0, channels))
    layer.moving_variance.assign(rng.uniform(0.5, 2.0, channels))
    return layer


def _brute_force_ghost(x, groups, gamma, beta, moving_mean, moving_variance, momentum):
    """Normalizes each group of examples with python loops; returns outputs and the updated moving statistics."""
    x = x.astype(np.float64)
    out = np.zeros_like(x)
    channels = x.shape[-1]
    new_mean, new_variance = np.zeros(channels), np.zeros(channels)
    for c in range(channels):
        weighted_mean = weighted_variance = 0.0
        for examples in groups:
            values = [v for i in examples for v in x[i, ..., c].ravel()]
            mean = sum(values) / len(values)
            variance = sum((v - mean) ** 2 for v in values) / len(values)
            for i in examples:
                out[i, ..., c] = (x[i, ..., c] - mean) / np.sqrt(variance + EPSILON) * gamma[c] + beta[c]
            weighted_mean += mean * len(examples) / len(x)
            weighted_variance += variance * len(examples) / len(x)
        new_mean[c] = momentum * moving_mean[c] + (1 - momentum) * weighted_mean
        new_variance[c] = momentum * moving_variance[c] + (1 - momentum) * weighted_variance
    return out, new_mean, new_variance


@pytest.mark.parametrize("virtual_batch_size", [8, 32])
def test_ghost_with_whole_batch_equals_keras_batch_norm(virtual_batch_size):
    x = np.random.default_rng(1).normal(3.0, 2.0, (8, 4, 4, 3)).astype("float32")
    ghost = _set_weights(GhostBatchNormalization(virtual_batch_size, momentum=0.9), x.shape)
    plain = _set_weights(keras.layers.BatchNormalization(momentum=0.9), x.shape)
    np.testing.assert_allclose(ghost(x, training=True), plain(x, training=True), atol=1e-5)
    np.testing.assert_allclose(ghost.moving_mean.numpy(), plain.moving_mean.numpy(), atol=1e-5)
    np.testing.assert_allclose(ghost.moving_variance.numpy(), plain.moving_variance.numpy(), atol=1e-5)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "tf.function"])
@pytest.mark.parametrize(
    "shape, virtual_batch_size, groups",
    [
        ((16, 3, 3, 2), 4, [range(0, 4), range(4, 8), range(8, 12), range(12, 16)]),
        ((10, 3, 3, 2), 4, [range(0, 4), range(4, 10)]),  # The remainder joins the last virtual batch.
        ((10, 5), 4, [range(0, 4), range(4, 10)]),  # Dense features.
        ((3, 5), 4, [range(0, 3)]),  # Fewer examples than a virtual batch: plain batch norm.
    ],
)
def test_ghost_training_matches_brute_force(shape, virtual_batch_size, groups, compiled):
    x = np.random.default_rng(2).normal(1.0, 3.0, shape).astype("float32")
    layer = _set_weights(GhostBatchNormalization(virtual_batch_size, momentum=0.8), shape)
    expected = _brute_force_ghost(
        x,
        groups,
        layer.gamma.numpy(),
        layer.beta.numpy(),
        layer.moving_mean.numpy(),
        layer.moving_variance.numpy(),
        momentum=0.8,
    )
    def call(batch):
        return layer(batch, training=True)

    if compiled:  # The batch dimension is unknown when the function is traced.
        call = tf.function(call, input_signature=[tf.TensorSpec((None,) + shape[1:], tf.float32)])
    out = call(tf.constant(x))
    np.testing.assert_allclose(out.numpy(), expected[0], atol=1e-5)
    np.testing.assert_allclose(layer.moving_mean.numpy(), expected[1], atol=1e-5)
    np.testing.assert_allclose(layer.moving_variance.numpy(), expected[2], atol=1e-5)


def test_ghost_inference_uses_moving_statistics_for_any_batch():
    rng = np.random.default_rng(3)
    layer = _set_weights(GhostBatchNormalization(4), (16, 3, 3, 2))
    layer(rng.normal(size=(16, 3, 3, 2)).astype("float32"), training=True)  # Moves the statistics.
    example = rng.normal(size=(1, 3, 3, 2)).astype("float32")
    gamma, beta = layer.gamma.numpy(), layer.beta.numpy()
    mean, variance = layer.moving_mean.numpy(), layer.moving_variance.numpy()
    expected = (example[0] - mean) / np.sqrt(variance + EPSILON) * gamma + beta
    for companions in (0, 2, 6, 15):  # Batches of 1, 3, 7, 16 examples.
        others = rng.normal(5.0, 4.0, (companions, 3, 3, 2)).astype("float32")
        batch = np.concatenate([others[: companions // 2], example, others[companions // 2 :]])
        out = layer(batch, training=False).numpy()[companions // 2]
        np.testing.assert_allclose(out, expected, atol=1e-5)


def test_frozen_ghost_layer_runs_in_inference_mode():
    x = np.random.default_rng(4).normal(size=(8, 3)).astype("float32")
    layer = _set_weights(GhostBatchNormalization(4), x.shape)
    layer.trainable = False
    before = layer.moving_mean.numpy().copy()
    np.testing.assert_allclose(layer(x, training=True), layer(x, training=False), atol=1e-6)
    np.testing.assert_array_equal(layer.moving_mean.numpy(), before)


def test_ghost_serialization_round_trip(tmp_path):
    layer = GhostBatchNormalization(virtual_batch_size=6, momentum=0.7, epsilon=1e-4, name="ghost")
    assert isinstance(layer, keras.layers.BatchNormalization)
    copy = keras.layers.deserialize(keras.layers.serialize(layer))
    assert type(copy) is GhostBatchNormalization
    assert (copy.virtual_batch_size, copy.momentum, copy.epsilon, copy.name) == (6, 0.7, 1e-4, "ghost")

    inputs = keras.Input((5,))
    model = keras.Model(inputs, GhostBatchNormalization(2)(inputs))
    x = np.random.default_rng(5).normal(size=(6, 5)).astype("float32")
    model(x, training=True)
    model.save(tmp_path / "ghost.keras")
    loaded = keras.models.load_model(tmp_path / "ghost.keras")
    assert type(loaded.layers[-1]) is GhostBatchNormalization and loaded.layers[-1].virtual_batch_size == 2
    np.testing.assert_allclose(loaded(x, training=False), model(x, training=False), atol=1e-6)
    np.testing.assert_allclose(loaded(x, training=True), model(x, training=True), atol=1e-6)


def test_ghost_trains_with_fit_on_uneven_batches():
    """fit over batches of 7, 7 and 6 with virtual batches of 3 (the remainder joins the last: 3 + 4, 3 + 4, 3 + 3):
    the moving statistics after the three steps follow brute force over each step's virtual batches."""
    rng = np.random.default_rng(6)
    x, y = rng.normal(1.0, 2.0, size=(20, 6)).astype("float32"), rng.integers(0, 3, 20).astype("int32")
    inputs = keras.Input((6,))
    ghost = GhostBatchNormalization(3, momentum=0.8)
    hidden = keras.layers.ReLU()(keras.layers.Dense(8)(ghost(inputs)))  # ghost first: its inputs are x itself
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(hidden))
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
    before = [w.copy() for w in model.get_weights()]
    mean, variance = ghost.moving_mean.numpy().copy(), ghost.moving_variance.numpy().copy()
    gamma, beta = ghost.gamma.numpy().copy(), ghost.beta.numpy().copy()
    history = model.fit(x, y, batch_size=7, epochs=1, verbose=0, shuffle=False)
    for start, stop in ((0, 7), (7, 14), (14, 20)):
        groups = [range(0, 3), range(3, stop - start)]
        _, mean, variance = _brute_force_ghost(x[start:stop], groups, gamma, beta, mean, variance, momentum=0.8)
    np.testing.assert_allclose(ghost.moving_mean.numpy(), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ghost.moving_variance.numpy(), variance, rtol=1e-5, atol=1e-6)
    assert np.isfinite(history.history["loss"][0])
    assert all(not np.allclose(a, b) for a, b in zip(before, model.get_weights()))


@pytest.mark.parametrize("channels, groups", [(16, 8), (32, 16), (64, 32), (128, 32), (48, 16), (6, 2), (3, 1), (1, 1)])
def test_group_count(channels, groups):
    assert group_count(channels) == groups


def test_normalization_kinds_and_shapes():
    rng = np.random.default_rng(7)
    conv = rng.normal(2.0, 3.0, (2, 4, 4, 16)).astype("float32")
    dense = rng.normal(2.0, 3.0, (2, 16)).astype("float32")
    for kind in ("batch", "ghost", "group", "layer", "none"):
        for features, is_dense in ((conv, False), (dense, True)):
            layer = Norm(kind, ghost_batch=2, bn_momentum=0.5)(16, dense=is_dense)
            assert layer(features, training=True).shape == features.shape
    assert Norm("group", ghost_batch=8, bn_momentum=0.9)(16).groups == 8
    assert Norm("ghost", ghost_batch=3, bn_momentum=0.5)(16).virtual_batch_size == 3
    assert Norm("batch", ghost_batch=3, bn_momentum=0.5)(16).momentum == 0.5
    assert isinstance(Norm("layer")(16, dense=True), keras.layers.LayerNormalization)
    assert isinstance(Norm("none")(16), keras.layers.Identity)
    # The library names its own argument; the --norm flag is checked by the config (tests/test_cli.py).
    with pytest.raises(ValueError,
                       match="^kind: got 'instance'; choose one of batch, syncbatch, ghost, group, layer, none$"):
        Norm("instance")


def test_layer_norm_of_conv_features_normalizes_each_example_over_height_width_channels():
    x = np.random.default_rng(8).normal(2.0, 3.0, (3, 4, 4, 8)).astype("float32")
    out = Norm("layer")(8)(x).numpy()  # gamma = 1, beta = 0 at initialization.
    for i in range(len(x)):
        values = x[i].astype(np.float64)
        expected = (values - values.mean()) / np.sqrt(values.var() + EPSILON)
        np.testing.assert_allclose(out[i], expected, atol=1e-4)


@pytest.mark.parametrize("kind", ["group", "batch", "syncbatch"])
def test_group_and_batch_norm_of_conv_features_match_brute_force(kind):
    """group: each example over height, width and its group's channels (group_count(16) = 8 groups of 2);
    batch and syncbatch (one device): each channel over the batch, height and width."""
    x = np.random.default_rng(9).normal(2.0, 3.0, (3, 4, 4, 16)).astype("float32")
    layer = Norm(kind)(16)
    out = layer(x, training=True).numpy()  # gamma = 1, beta = 0 at initialization.
    epsilon = layer.epsilon
    expected = np.zeros(x.shape)
    if kind == "group":
        for i in range(len(x)):
            for g in range(8):
                values = x[i, ..., 2 * g:2 * g + 2].astype(np.float64)
                expected[i, ..., 2 * g:2 * g + 2] = (values - values.mean()) / np.sqrt(values.var() + epsilon)
    else:
        for c in range(16):
            values = x[..., c].astype(np.float64)
            expected[..., c] = (values - values.mean()) / np.sqrt(values.var() + epsilon)
    np.testing.assert_allclose(out, expected, atol=1e-4)
