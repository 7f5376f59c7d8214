"""Baselines without shortcuts: a plain CNN in the spirit of Caffe's cifar10_quick, and an MLP."""

from __future__ import annotations

import keras

from models.norm import Norm, raw_pixel_input

CNN_FILTERS = (32, 32, 64)
CNN_DENSE_UNITS = 64
MLP_UNITS = (256, 128)


def _dense_norm_relu(x, units, norm: Norm, name):
    # A dense layer followed by a normalization layer needs no bias: the norm's offset replaces it.
    x = keras.layers.Dense(units, use_bias=not norm.replaces_bias, kernel_initializer="he_normal",
                           name=f"{name}_dense")(x)
    x = norm(units, dense=True, name=f"{name}_norm")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x)


def build_cnn(input_shape, num_classes: int, norm: Norm = Norm(), *, mean=None, variance=None) -> keras.Model:
    """A plain CNN: three conv-norm-relu-pool stacks with 32, 32, 64 filters, dense 64, dense softmax.

    Like cifar10_quick (Caffe) with 3x3 convs, padding="same" and a normalization layer after each conv and
    the hidden dense layer. A stack max-pools by 2 (padding="same") only while height and width are both >= 2,
    so 32x32 inputs end at 4x4x64 and 8x8 inputs at 1x1x64.

    Args:
        input_shape: (height, width, channels) of one raw example.
        num_classes: number of output probabilities.
        norm: the normalization layer after each conv and the hidden dense layer (models.norm.Norm).
        mean: per-channel mean of the raw training pixels for the input Normalization layer, or None.
        variance: per-channel variance of the raw training pixels, or None.

    Returns:
        A functional keras.Model named "cnn", input "images", output "probabilities".
    """
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (height, width, channels), got {tuple(input_shape)}")
    inputs, x = raw_pixel_input(input_shape, mean, variance)
    for index, filters in enumerate(CNN_FILTERS, start=1):
        name = f"conv{index}"
        x = keras.layers.Conv2D(
            filters, 3, padding="same", use_bias=not norm.replaces_bias, kernel_initializer="he_normal",
            name=f"{name}_conv"
        )(x)
        x = norm(filters, name=f"{name}_norm")(x)
        x = keras.layers.ReLU(name=f"{name}_relu")(x)
        if min(x.shape[1], x.shape[2]) >= 2:
            x = keras.layers.MaxPooling2D(2, padding="same", name=f"{name}_pool")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = _dense_norm_relu(x, CNN_DENSE_UNITS, norm, "hidden")
    outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="cnn")


def build_mlp(input_shape, num_classes: int, norm: Norm = Norm(), *, mean=None, variance=None) -> keras.Model:
    """A multilayer perceptron: flatten, dense 256 and 128 each with norm and relu, dense softmax.

    Args:
        input_shape: shape of one raw example, e.g. (height, width, channels).
        num_classes: number of output probabilities.
        norm: the normalization layer after each hidden layer (models.norm.Norm; "layer" is keras
            LayerNormalization on dense features).
        mean: per-channel mean of the raw training pixels for the input Normalization layer, or None.
        variance: per-channel variance of the raw training pixels, or None.

    Returns:
        A functional keras.Model named "mlp", input "images", output "probabilities".
    """
    inputs, x = raw_pixel_input(input_shape, mean, variance)
    x = keras.layers.Flatten(name="flatten")(x)
    for index, units in enumerate(MLP_UNITS, start=1):
        x = _dense_norm_relu(x, units, norm, f"hidden{index}")
    outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="mlp")
