"""Tests of models/: ResNet sizes against He et al. 2016, outputs of every model and norm, raw-pixel input, export."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import models
from pipeline import config

# He et al. 2016, Table 6: parameters of the CIFAR-10 ResNets.
PAPER_PARAMETERS = {20: "0.27M", 32: "0.46M", 44: "0.66M", 56: "0.85M", 110: "1.7M"}
NORMS = ("batch", "ghost", "group", "layer", "none")


def _brute_force_resnet_parameters(depth, channels=3, num_classes=10):
    """Counts weights layer by layer: 3x3 conv kernels without bias, gamma and beta per channel, dense layer."""
    layers = [(channels, 16)]  # (input channels, output channels) of each 3x3 conv.
    width = 16
    for filters in (16, 32, 64):
        for _ in range((depth - 2) // 6):
            layers += [(width, filters), (filters, filters)]
            width = filters
    return sum(3 * 3 * cin * cout + 2 * cout for cin, cout in layers) + 64 * num_classes + num_classes


def _probabilities_ok(probabilities, batch, num_classes):
    probabilities = np.asarray(probabilities)
    assert probabilities.shape == (batch, num_classes)
    assert np.all(probabilities >= 0)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("depth", sorted(PAPER_PARAMETERS))
def test_resnet_matches_paper_parameters_and_depth(depth):
    model = models.build_model(f"resnet{depth}", (32, 32, 3), 10)
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    assert f"{trainable / 1e6:.2g}M" == PAPER_PARAMETERS[depth]
    assert trainable == _brute_force_resnet_parameters(depth)
    weighted_layers = [layer for layer in model.layers if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense))]
    assert len(weighted_layers) == depth
    assert model.name == f"resnet{depth}"


def test_resnet_stages_on_digits_size():
    model = models.build_model("resnet32", (8, 8, 1), 10, models.Norm("ghost", ghost_batch=2))
    for stage, shape in ((1, (8, 8, 16)), (2, (4, 4, 32)), (3, (2, 2, 64))):
        assert model.get_layer(f"stage{stage}_block5_add").output.shape == (None,) + shape
    x = np.random.default_rng(0).uniform(0, 16, (4, 8, 8, 1)).astype("float32")
    _probabilities_ok(model(x, training=True), 4, 10)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("name", ["resnet20", "cnn", "mlp"])
@pytest.mark.parametrize("input_shape", [(8, 8, 1), (32, 32, 3)])
def test_every_model_and_norm_outputs_probabilities(name, norm, input_shape):
    channels = input_shape[-1]
    model = models.build_model(
        name, input_shape, 7, models.Norm(norm, ghost_batch=2), mean=np.full(channels, 100.0),
        variance=np.full(channels, 900.0)
    )
    assert (model.name, model.input.name, model.layers[-1].name) == (name, "images", "probabilities")
    x = np.random.default_rng(0).uniform(0, 255, (5,) + input_shape).astype("float32")
    _probabilities_ok(model(x, training=True), 5, 7)
    _probabilities_ok(model(x, training=False), 5, 7)


def test_model_and_norm_names_match_config():
    assert tuple(models.MODELS) == config.MODEL_NAMES
    assert models.NORMS == config.NORMS


def test_unknown_model_or_norm_is_a_value_error_about_the_argument():
    # The library names its own arguments; --model and --norm are checked by the config (tests/test_cli.py).
    with pytest.raises(ValueError, match="^name: got 'resnet18'; choose one of resnet20, .*, cnn, mlp$"):
        models.build_model("resnet18", (8, 8, 1), 10)
    with pytest.raises(ValueError,
                       match="^kind: got 'instance'; choose one of batch, syncbatch, ghost, group, layer, none$"):
        models.build_model("cnn", (8, 8, 1), 10, "instance")
    with pytest.raises(ValueError, match="mean and variance"):
        models.build_model("cnn", (8, 8, 1), 10, mean=np.zeros(1))


def test_syncbatch_is_batch_norm_over_all_replicas():
    assert models.Norm("syncbatch")(8).synchronized and not models.Norm("batch")(8).synchronized


def test_first_layer_normalizes_raw_pixels():
    mean, variance = np.array([10.0, 100.0, 200.0]), np.array([4.0, 900.0, 2500.0])
    model = models.build_model("cnn", (32, 32, 3), 10, mean=mean, variance=variance)
    first = model.layers[1]
    assert isinstance(first, keras.layers.Normalization)
    x = np.random.default_rng(1).uniform(0, 255, (3, 32, 32, 3)).astype("float32")
    expected = np.empty_like(x)
    for c in range(3):
        expected[..., c] = (x[..., c] - mean[c]) / np.sqrt(variance[c])
    np.testing.assert_allclose(keras.Model(model.input, first.output)(x), expected, rtol=1e-5, atol=1e-5)

    # The same weights without input normalization, fed pre-normalized pixels, give the same probabilities.
    bare = models.build_model("cnn", (32, 32, 3), 10)
    bare.set_weights(model.get_weights())
    np.testing.assert_allclose(bare(expected, training=False), model(x, training=False), atol=1e-5)


@pytest.mark.slow
def test_resnet_round_trips_through_weights_keras_file_and_saved_model(tmp_path):
    def build():
        return models.build_model("resnet20", (8, 8, 1), 10, mean=np.array([5.0]), variance=np.array([30.0]))

    model = build()
    x = np.random.default_rng(2).uniform(0, 16, (6, 8, 8, 1)).astype("float32")
    model(x, training=True)  # Moves the batch-norm statistics away from their initial values.
    expected = model(x, training=False).numpy()

    model.save_weights(tmp_path / "resnet.weights.h5")
    restored = build()
    assert not np.allclose(restored(x, training=False), expected, atol=1e-5)
    restored.load_weights(tmp_path / "resnet.weights.h5")
    np.testing.assert_allclose(restored(x, training=False), expected, atol=1e-5)

    model.save(tmp_path / "resnet.keras")
    np.testing.assert_allclose(keras.models.load_model(tmp_path / "resnet.keras")(x), expected, atol=1e-5)

    model.export(str(tmp_path / "export"), verbose=False)
    served = tf.saved_model.load(str(tmp_path / "export"))
    np.testing.assert_allclose(served.serve(tf.constant(x)), expected, atol=1e-5)
    np.testing.assert_allclose(served.serve(tf.constant(x[:1])), expected[:1], atol=1e-5)  # Any batch size.
