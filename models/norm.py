"""Normalization layers the models can be built with, and the raw-pixel input that every model starts from."""

from __future__ import annotations

import dataclasses

import keras
from keras import ops

NORMS = ("batch", "syncbatch", "ghost", "group", "layer", "none")

# Group normalization uses the largest of these group counts that divides the channels and leaves at least
# two channels per group (Wu & He 2018 use G = 32 on ResNet-50, whose narrowest layers have 64 channels).
GROUP_COUNTS = (32, 16, 8, 4, 2, 1)


def group_count(channels: int) -> int:
    """Groups of group normalization for `channels` channels: 16 -> 8, 32 -> 16, 64 -> 32, 3 -> 1.

    The largest G in (32, 16, 8, 4, 2, 1) with channels % G == 0 and channels / G >= 2; 1 when none fits.
    """
    for groups in GROUP_COUNTS:
        if channels % groups == 0 and channels // groups >= 2:
            return groups
    return 1


@dataclasses.dataclass(frozen=True)
class Norm:
    """The normalization layers of a model: one kind with its settings; calling it makes one layer.

    Kinds:
        batch: keras BatchNormalization (Ioffe & Szegedy 2015), statistics over the batch (and H, W); under a
            tf.distribute strategy, over each replica's slice of the batch (the per-device batch of Goyal et al. 2017).
        syncbatch: BatchNormalization(synchronized=True): statistics over the global batch, all-reduced over the
            replicas in every training step (the same as batch on one device).
        ghost: GhostBatchNormalization, statistics over virtual batches of `ghost_batch` examples.
        group: keras GroupNormalization (Wu & He 2018) with `group_count(channels)` groups.
        layer: for conv features GroupNormalization(groups=1), i.e. statistics over (H, W, C) of each example as in
            Wu & He's Figure 2; for dense features keras LayerNormalization over the units. Both learn one scale
            and offset per channel.
        none: keras Identity.

    Attributes:
        kind: batch | syncbatch | ghost | group | layer | none.
        ghost_batch: examples per virtual batch of ghost batch norm.
        bn_momentum: moving-average momentum of batch and ghost batch norm.
    """

    kind: str = "batch"
    ghost_batch: int = 8
    bn_momentum: float = 0.9

    def __post_init__(self):
        if self.kind not in NORMS:
            raise ValueError(f"kind: got {self.kind!r}; choose one of {', '.join(NORMS)}")

    @property
    def replaces_bias(self) -> bool:
        """Whether the layer has an offset of its own, so that the layer before it needs no bias."""
        return self.kind != "none"

    def __call__(self, channels: int, *, dense: bool = False, name: str | None = None) -> keras.layers.Layer:
        """An unbuilt layer for features with `channels` channels on the last axis.

        Args:
            channels: size of the last axis of the features the layer will normalize.
            dense: True for (batch, units) features after a Dense layer, False for (batch, H, W, C) conv features.
            name: layer name.
        """
        if self.kind in ("batch", "syncbatch"):
            return keras.layers.BatchNormalization(momentum=self.bn_momentum, synchronized=self.kind == "syncbatch",
                                                   name=name)
        if self.kind == "ghost":
            return GhostBatchNormalization(virtual_batch_size=self.ghost_batch, momentum=self.bn_momentum, name=name)
        if self.kind == "group":
            return keras.layers.GroupNormalization(groups=group_count(channels), name=name)
        if self.kind == "layer":
            return keras.layers.LayerNormalization(name=name) if dense else keras.layers.GroupNormalization(1, name=name)
        return keras.layers.Identity(name=name)


def virtual_batches(batch_size, virtual_batch_size: int | None):
    """(virtual batch of each example, number of virtual batches G) of a batch of `batch_size` examples.

    As GhostBatchNormalization cuts a batch: G = max(B // V, 1) runs of V consecutive examples, the B mod V
    remaining examples joining the last one; without a virtual_batch_size, one group (plain batch norm).
    """
    if not virtual_batch_size:
        return ops.zeros_like(ops.arange(batch_size)), 1
    groups = ops.maximum(batch_size // virtual_batch_size, 1)
    return ops.minimum(ops.arange(batch_size) // virtual_batch_size, groups - 1), groups


def raw_pixel_input(input_shape, mean=None, variance=None):
    """The model's input of raw pixels and, when the training split's statistics are given, their normalization.

    Args:
        input_shape: (height, width, channels) of one example.
        mean: per-channel mean of the raw training pixels, shape (channels,), or None.
        variance: per-channel variance of the raw training pixels, shape (channels,), or None.

    Returns:
        (inputs, x): the keras.Input named "images" and the tensor the model continues from,
        x = (inputs - mean) / sqrt(variance) per channel (keras Normalization, axis=-1) or the inputs.
    """
    if (mean is None) != (variance is None):
        raise ValueError("give both mean and variance of the training pixels, or neither")
    inputs = keras.Input(shape=tuple(input_shape), name="images")
    if mean is None:
        return inputs, inputs
    return inputs, keras.layers.Normalization(axis=-1, mean=mean, variance=variance, name="normalize")(inputs)


@keras.saving.register_keras_serializable(package="batchscope")
class GhostBatchNormalization(keras.layers.BatchNormalization):
    """Batch normalization over virtual ("ghost") batches (Hoffer et al. 2017, "Train longer, generalize better").

    In training, the batch of B examples is cut, in order, into G = max(floor(B / V), 1) virtual batches of
    V = `virtual_batch_size` consecutive examples; the B mod V remaining examples join the last virtual batch
    (B = 20, V = 8 gives virtual batches of 8 and 12), so no virtual batch is smaller than V and B <= V is
    plain batch norm. Each virtual batch g is normalized with its own statistics over its examples (and H, W):

        y = gamma * (x - mu_g) / sqrt(var_g + epsilon) + beta        (var_g biased, as in keras BN)

    and the moving statistics follow the example-weighted average of the virtual batches' statistics:

        mu = sum_g n_g mu_g / B   (= the batch mean),   var = sum_g n_g var_g / B   (pooled within-batch variance)
        moving_mean <- momentum * moving_mean + (1 - momentum) * mu
        moving_variance <- momentum * moving_variance + (1 - momentum) * var

    With equal virtual batches this is the plain average of their statistics, as in tf.keras' former
    `virtual_batch_size`. In inference the layer is keras BatchNormalization (moving statistics), so unlike
    that option (keras#15790) it accepts any batch size. It reuses BatchNormalization's weights (gamma, beta,
    moving_mean, moving_variance), so tools that look for BatchNormalization layers find this one too.
    Masks, renorm and synchronized statistics are not supported.
    """

    def __init__(self, virtual_batch_size: int = 8, **kwargs):
        super().__init__(**kwargs)
        if int(virtual_batch_size) != virtual_batch_size or virtual_batch_size < 1:
            raise ValueError(f"virtual_batch_size must be a positive integer, got {virtual_batch_size!r}")
        if self.renorm or self.synchronized:
            raise ValueError("GhostBatchNormalization does not support renorm or synchronized")
        self.virtual_batch_size = int(virtual_batch_size)

    def call(self, inputs, training=None, mask=None):
        if mask is not None:
            raise ValueError("GhostBatchNormalization does not support masks")
        if not (training and self.trainable):
            return super().call(inputs, training=False)
        x = ops.cast(inputs, keras.backend.result_type(inputs.dtype, "float32"))
        rank = len(x.shape)
        axis = self.axis % rank
        per_example_axes = [i for i in range(1, rank) if i != axis]

        group_of, _ = virtual_batches(ops.shape(x)[0], self.virtual_batch_size)
        group_size = ops.segment_sum(ops.ones_like(group_of, dtype=x.dtype), group_of, sorted=True)[:, None]

        def per_group_mean(per_example):  # (B, C) -> (G, C) -> back to (B, C), each example its group's value
            return ops.take(ops.segment_sum(per_example, group_of, sorted=True) / group_size, group_of, axis=0)

        def broadcast(per_example):  # (B, C) -> shape that broadcasts against x
            for i in per_example_axes:
                per_example = ops.expand_dims(per_example, i)
            return per_example

        mean = per_group_mean(ops.mean(x, axis=per_example_axes))
        variance = per_group_mean(ops.mean(ops.square(x - broadcast(mean)), axis=per_example_axes))

        momentum = self.momentum
        self.moving_mean.assign(self.moving_mean * momentum + ops.mean(mean, axis=0) * (1.0 - momentum))
        self.moving_variance.assign(self.moving_variance * momentum + ops.mean(variance, axis=0) * (1.0 - momentum))

        scale = ops.rsqrt(variance + self.epsilon)
        if self.scale:
            scale = scale * ops.cast(self.gamma, x.dtype)
        offset = -mean * scale
        if self.center:
            offset = offset + ops.cast(self.beta, x.dtype)
        return ops.cast(x * broadcast(scale) + broadcast(offset), self.compute_dtype)

    def get_config(self):
        return {**super().get_config(), "virtual_batch_size": self.virtual_batch_size}
