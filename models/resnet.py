"""ResNets for small images (He et al. 2016, section 4.2): ResNet-20/32/44/56/110 with identity shortcuts."""

from __future__ import annotations

import keras
from keras import ops

from models.norm import Norm, raw_pixel_input

STAGE_FILTERS = (16, 32, 64)


@keras.saving.register_keras_serializable(package="batchscope")
class ZeroPadShortcut(keras.layers.Layer):
    """Parameter-free shortcut "option A" of He et al. 2016: subsample by `strides`, zero-pad the new channels.

    y[b, i, j, c] = x[b, strides * i, strides * j, c] for c < C_in and 0 for C_in <= c < `channels`.
    Subsampling keeps ceil(H / strides) rows, as a stride-`strides` conv with padding="same" does.
    """

    def __init__(self, channels: int, strides: int = 2, **kwargs):
        super().__init__(**kwargs)
        self.channels = int(channels)
        self.strides = int(strides)

    def call(self, inputs):
        x = inputs[:, :: self.strides, :: self.strides, :]
        return ops.pad(x, [[0, 0], [0, 0], [0, 0], [0, self.channels - inputs.shape[-1]]])

    def compute_output_shape(self, input_shape):
        batch, height, width, _ = input_shape
        height, width = (None if size is None else -(-size // self.strides) for size in (height, width))
        return (batch, height, width, self.channels)

    def get_config(self):
        return {**super().get_config(), "channels": self.channels, "strides": self.strides}


def build_resnet(depth: int, input_shape, num_classes: int, norm: Norm = Norm(), *, mean=None,
                 variance=None) -> keras.Model:
    """The CIFAR ResNet of depth 6n + 2 (He et al. 2016, section 4.2), on raw pixels, with softmax outputs.

    A 3x3 conv with 16 filters, then three stages of n basic blocks (two 3x3 convs) with 16, 32 and 64 filters,
    the first block of stages 2 and 3 halving height and width with stride 2, then global average pooling and
    a dense softmax layer. Shortcuts are identities, subsampled and zero-padded where a block downsamples
    (option A), so the model has the paper's parameter counts: 0.27M, 0.46M, 0.66M, 0.85M, 1.7M for
    depth 20, 32, 44, 56, 110 on 32x32x3 images and 10 classes (with batch norm).

    Args:
        depth: 6n + 2 layers with weights, n >= 1 (20, 32, 44, 56, 110).
        input_shape: (height, width, channels) of one raw example; 8x8 works (stages at 8, 4, 2).
        num_classes: number of output probabilities.
        norm: the normalization layer after every conv (models.norm.Norm).
        mean: per-channel mean of the raw training pixels for the input Normalization layer, or None.
        variance: per-channel variance of the raw training pixels, or None.

    Returns:
        A functional keras.Model named f"resnet{depth}", input "images", output "probabilities".
    """
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"ResNet depth must be 6n + 2 with n >= 1 (20, 32, 44, 56, 110), got {depth}")
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (height, width, channels), got {tuple(input_shape)}")
    blocks_per_stage = (depth - 2) // 6

    def conv_norm(x, filters, strides, name):
        # Conv layers followed by a normalization layer need no bias: the norm's offset replaces it.
        x = keras.layers.Conv2D(
            filters,
            3,
            strides=strides,
            padding="same",
            use_bias=not norm.replaces_bias,
            kernel_initializer="he_normal",
            name=f"{name}_conv",
        )(x)
        return norm(filters, name=f"{name}_norm")(x)

    inputs, x = raw_pixel_input(input_shape, mean, variance)
    x = keras.layers.ReLU(name="stem_relu")(conv_norm(x, STAGE_FILTERS[0], 1, "stem"))
    for stage, filters in enumerate(STAGE_FILTERS, start=1):
        for block in range(1, blocks_per_stage + 1):
            name = f"stage{stage}_block{block}"
            strides = 2 if stage > 1 and block == 1 else 1
            y = keras.layers.ReLU(name=f"{name}_relu1")(conv_norm(x, filters, strides, f"{name}_1"))
            y = conv_norm(y, filters, 1, f"{name}_2")
            shortcut = x
            if strides != 1 or x.shape[-1] != filters:
                shortcut = ZeroPadShortcut(filters, strides, name=f"{name}_shortcut")(x)
            x = keras.layers.ReLU(name=f"{name}_relu2")(keras.layers.Add(name=f"{name}_add")([y, shortcut]))
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name="probabilities")(x)
    return keras.Model(inputs, outputs, name=f"resnet{depth}")
