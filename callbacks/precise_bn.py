"""Precise BatchNorm: replace moving averages with exact population statistics of the training data."""

from __future__ import annotations

import logging

import keras
import numpy as np
import tensorflow as tf

import callbacks.shared_traces as shared_traces
from callbacks.checked_io import check_positive_int
from models.norm import virtual_batches

logger = logging.getLogger(__name__)


def batch_norm_inputs(model: keras.Model) -> list[tuple[keras.layers.BatchNormalization, keras.KerasTensor]]:
    """Every BatchNormalization layer of `model` (subclasses included) with its input as a tensor of `model`'s graph.

    Layers inside nested functional or Sequential models are found too: the nested model's part up to the layer
    is applied to the nested model's input in the outer graph, so a side model `keras.Model(model.inputs, tensor)`
    computes the layer's input from the outer model's input.

    Args:
        model: a built functional or Sequential Keras model.

    Returns:
        (layer, input tensor) pairs in topological order; empty if the model has no BatchNormalization layer.

    Raises:
        ValueError: a BatchNormalization layer is shared (called more than once) or lives inside a subclassed
            layer, so that its input is not a tensor of any functional graph.
    """
    pairs = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            _check_called_once(layer)
            pairs.append((layer, layer.input))
        elif isinstance(layer, keras.Model) and getattr(layer, "inputs", None):
            inner = batch_norm_inputs(layer)
            if inner:
                _check_called_once(layer)
                outer_inputs = layer._inbound_nodes[0].input_tensors
                outer_inputs = outer_inputs[0] if len(outer_inputs) == 1 else outer_inputs
                # One side model per inner layer, so that each one holds exactly that layer's upstream part.
                pairs += [(bn, keras.Model(layer.inputs, tensor)(outer_inputs)) for bn, tensor in inner]
        elif any(isinstance(sub, keras.layers.BatchNormalization) for sub in layer._flatten_layers(include_self=False)):
            raise ValueError(
                f"layer '{layer.name}' holds a BatchNormalization inside a subclassed layer; its input is not part of "
                "a functional graph. Build the block with the functional API."
            )
    return pairs


def _check_called_once(layer: keras.layers.Layer) -> None:
    if len(layer._inbound_nodes) != 1:
        raise ValueError(
            f"layer '{layer.name}' is called {len(layer._inbound_nodes)} times in the model; the statistics of a "
            "shared normalization layer are not defined by a single input."
        )


def _upstream_batch_norms(tensor: keras.KerasTensor) -> set[int]:
    """Ids of the BatchNormalization layers that `tensor` depends on (every one inside an upstream nested model)."""
    found, seen, stack = set(), set(), [tensor]
    while stack:
        operation, node_index, _ = stack.pop()._keras_history
        if (id(operation), node_index) in seen:
            continue
        seen.add((id(operation), node_index))
        if isinstance(operation, keras.layers.Layer):
            found.update(
                id(layer) for layer in operation._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)
            )
        stack.extend(operation._inbound_nodes[node_index].input_tensors)
    return found


def _levels(pairs: list) -> list[list]:
    """Groups `pairs` so that every layer's upstream BatchNormalization layers are in earlier groups."""
    upstream = {id(layer): _upstream_batch_norms(tensor) for layer, tensor in pairs}
    level: dict[int, int] = {}

    def level_of(layer_id: int) -> int:
        if layer_id not in level:
            level[layer_id] = 1 + max((level_of(u) for u in upstream[layer_id] if u in upstream), default=-1)
        return level[layer_id]

    groups: list[list] = []
    for layer, tensor in pairs:
        index = level_of(id(layer))
        groups += [[] for _ in range(index + 1 - len(groups))]
        groups[index].append((layer, tensor))
    return groups


def side_model(model: keras.Model, tensors: list[keras.KerasTensor]) -> keras.Model:
    """A model sharing `model`'s layers that maps `model`'s input to `tensors` (intermediate tensors of its graph)."""
    return keras.Model(model.inputs, tensors)


def batch_moments(x: tf.Tensor, axis: int) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Per-channel count, mean and sum of squared deviations M2 of `x` over every axis but `axis`, in float32."""
    x = tf.cast(x, tf.float32)
    rank = len(x.shape)
    reduce_axes = [i for i in range(rank) if i != axis % rank]
    mean = tf.reduce_mean(x, axis=reduce_axes, keepdims=True)
    m2 = tf.reduce_sum(tf.square(x - mean), axis=reduce_axes)
    count = tf.size(x) // tf.shape(x)[axis % rank]
    return count, tf.reshape(mean, [-1]), m2


def _by_example(x: tf.Tensor, axis: int) -> tf.Tensor:
    """`x` as float32 of shape (examples, positions, channels), channels from `axis`."""
    x = tf.cast(x, tf.float32)
    rank = len(x.shape)
    axis = axis % rank
    x = tf.transpose(x, [0] + [i for i in range(1, rank) if i != axis] + [axis]) if axis != rank - 1 else x
    return tf.reshape(x, [tf.shape(x)[0], -1, x.shape[-1]])


def group_moments(x: tf.Tensor, axis: int, virtual_batch_size: int | None) -> tuple[tf.Tensor, tf.Tensor]:
    """Per-group, per-channel mean and biased variance of `x` over examples and positions, shape (G, C) each.

    The groups are those that models.norm.GhostBatchNormalization normalizes over (virtual_batches; one group when
    virtual_batch_size is None).
    """
    x = _by_example(x, axis)  # (B, positions, C)
    group_of, groups = virtual_batches(tf.shape(x)[0], virtual_batch_size)
    sizes = tf.math.unsorted_segment_sum(tf.ones_like(group_of, tf.float32), group_of, groups)[:, None]
    mean = tf.math.unsorted_segment_sum(tf.reduce_mean(x, axis=1), group_of, groups) / sizes
    # Two passes (mean first, then squared deviations), so that large means do not cost float32 precision.
    deviation = x - tf.gather(mean, group_of)[:, None, :]
    variance = tf.math.unsorted_segment_sum(tf.reduce_mean(tf.square(deviation), axis=1), group_of, groups) / sizes
    return mean, variance


def population_moments(x: tf.Tensor, axis: int) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """Per-channel mean and biased variance of `x` over examples and positions, and their squared standard errors.

    With m_i and s_i example i's mean of x and of (x - mean)^2 over its positions (N examples), mean = mean_i m_i,
    variance = mean_i s_i, se(mean)^2 = var_i(m_i) / N and se(variance)^2 = var_i(s_i) / N (sample variances):
    the examples are independent, the positions within one are not. Shapes (C,) each.
    """
    x = _by_example(x, axis)  # (N, positions, C)
    count = tf.cast(tf.shape(x)[0], tf.float32)
    per_example_mean = tf.reduce_mean(x, axis=1)
    mean = tf.reduce_mean(per_example_mean, axis=0)
    per_example_square = tf.reduce_mean(tf.square(x - mean), axis=1)
    variance = tf.reduce_mean(per_example_square, axis=0)

    def squared_error(values, centre):
        return tf.reduce_sum(tf.square(values - centre), axis=0) / (count - 1) / count

    return mean, variance, squared_error(per_example_mean, mean), squared_error(per_example_square, variance)


def take_inputs(dataset, num_samples: int) -> list:
    """The model inputs of the first `num_samples` examples of `dataset` (the last batch cut to size)."""
    batches, total = [], 0
    for element in dataset:
        x = element[0] if isinstance(element, (tuple, list)) else element
        size = int(tf.nest.flatten(x)[0].shape[0])
        if total + size > num_samples:
            x = tf.nest.map_structure(lambda t: t[: num_samples - total], x)
            size = num_samples - total
        batches.append(x)
        total += size
        if total >= num_samples:
            break
    if total == 0:
        raise ValueError("precise_bn dataset: yielded no examples")
    return batches


def precise_bn(model: keras.Model, dataset, num_samples: int = 8192) -> dict[str, dict]:
    """Sets every BatchNormalization layer's moving statistics to the exact statistics of its input.

    The moving averages of BN are estimated from past batches under past weights and lag behind (badly so with
    momentum 0.99 and few steps). Like fvcore's `update_bn_stats` (Wu and Johnson, "Rethinking 'Batch' in
    BatchNorm", 2021, sec. 3), this recomputes them with the weights fixed over K = min(num_samples, dataset size)
    training examples: for a layer with input x of shape (N, ..., C) over the K examples,

        moving_mean_c     = mean of x[..., c] over examples and positions
        moving_variance_c = biased (population) variance of x[..., c]     (what BN uses in training, too)

    Upstream mode: sequential, in inference mode. Layers are processed in topological levels; a layer's input is
    computed with training=False, with every upstream BN layer already holding its new statistics (fvcore instead
    runs in training mode, where upstream layers normalize with the batch's own statistics). This is the input
    that layer sees at evaluation and in the export, so afterwards every BN layer, evaluated on these examples,
    normalizes its input exactly; and the result does not depend on how the examples are batched, so runs with
    different batch sizes are compared with the same definition. The cost is one pass per level over the
    examples, each running the network only up to that level: for ResNet-20 (19 levels) about 8 to 16 times one
    inference pass over the examples, against about 1 for fvcore's mode.
    The examples' inputs are held in memory (K x example size, 100 MB for 8192 CIFAR images).

    Per batch, the count, mean and M2 (sum of squared deviations) are computed in float32 and merged in float64
    with the parallel update of Chan et al. (1979), so the variance is the exact total variance over all examples
    (law of total variance), not the average of per-batch variances. Only moving_mean and moving_variance change:
    no other weight, no optimizer state.

    Args:
        model: a built functional or Sequential Keras model; models without BN layers are left alone.
        dataset: batches of training examples, each (x, y), (x, y, sample_weight) or x (a tf.data.Dataset or any
            iterable); any batch size, the remainder batch included.
        num_samples: examples to use (all of the dataset if it has fewer).

    Returns:
        {layer name: {"samples": examples used, "channels": C, "mean_shift": mean_c |new - old mean| /
        sqrt(new variance + epsilon), "variance_change": mean_c |old - new variance| / (new variance + epsilon)}}
        in topological order; empty if the model has no BatchNormalization layer.
    """
    check_positive_int("precise_bn num_samples", num_samples)
    pairs = batch_norm_inputs(model)
    if not pairs:
        logger.warning("precise_bn: model '%s' has no BatchNormalization layer; nothing to recompute.", model.name)
        return {}
    batches = take_inputs(dataset, int(num_samples))
    samples = sum(int(tf.nest.flatten(x)[0].shape[0]) for x in batches)
    report = {}
    for indices, moments in _level_functions(model, pairs, batches[0]):
        layers = [pairs[i][0] for i in indices]
        weights = shared_traces.weights(model)  # read per level: the upstream levels' new statistics
        totals = [None] * len(layers)
        for x in batches:
            for i, (count, mean, m2) in enumerate(moments(x, *weights)):
                batch = int(count), mean.numpy().astype(np.float64), m2.numpy().astype(np.float64)
                totals[i] = _merge(totals[i], batch)
        for layer, (count, mean, m2) in zip(layers, totals):
            variance = m2 / count
            old_mean = np.asarray(layer.moving_mean.numpy(), np.float64)
            old_variance = np.asarray(layer.moving_variance.numpy(), np.float64)
            layer.moving_mean.assign(mean.astype(layer.moving_mean.dtype))
            layer.moving_variance.assign(variance.astype(layer.moving_variance.dtype))
            report[layer.name] = {
                "samples": samples,
                "channels": int(mean.size),
                "mean_shift": float(np.mean(np.abs(mean - old_mean) / np.sqrt(variance + layer.epsilon))),
                "variance_change": float(np.mean(np.abs(old_variance - variance) / (variance + layer.epsilon))),
            }
    logger.info("precise_bn: recomputed %d BatchNormalization layers over %d examples.", len(report), samples)
    return {layer.name: report[layer.name] for layer, _ in pairs}


def _level_functions(model: keras.Model, pairs: list, example_batch) -> list[tuple[list[int], object]]:
    """Per topological level, the positions of its BN layers in `pairs` and the compiled function (x, trainable,
    non-trainable weights) -> their inputs' moments; made once per architecture and input signature in a process
    (callbacks/shared_traces.py), so the next model of the architecture (a sweep's next run, the study's loss line)
    and new weights of this one trace nothing."""
    # Any batch size, so that a remainder batch does not trace the model a second time.
    signature = tf.nest.map_structure(
        lambda t: tf.TensorSpec([None, *t.shape[1:]], tf.as_dtype(t.dtype)), example_batch
    )

    def make(template):
        template_pairs = batch_norm_inputs(template)
        position = {id(layer): i for i, (layer, _) in enumerate(template_pairs)}
        return [([position[id(layer)] for layer, _ in level],
                 _moments_function(template, side_model(template, [tensor for _, tensor in level]),
                                   [layer for layer, _ in level], signature))
                for level in _levels(template_pairs)]

    return shared_traces.shared(model, f"precise_bn {signature}", make)


def _moments_function(template: keras.Model, side: keras.Model, layers: list, signature):
    """A compiled (x, trainable, non-trainable weights of the template) -> [(count, mean, M2) per layer] of the inputs
    `side` (made of the template's layers) computes in inference mode at those weights."""
    weight_specs = shared_traces.weight_specs(template)

    @tf.function(input_signature=[signature, *weight_specs])
    def moments(x, trainable, non_trainable):
        with keras.StatelessScope(state_mapping=shared_traces.template_mapping(template, trainable, non_trainable)):
            outputs = tf.nest.flatten(side(x, training=False))
        return [batch_moments(output, layer.axis) for output, layer in zip(outputs, layers)]

    return moments


def _merge(total, batch):
    """Chan et al. (1979): count, mean and M2 of the union of two sets of values from those of each set."""
    if total is None:
        return batch
    (count_a, mean_a, m2_a), (count_b, mean_b, m2_b) = total, batch
    count = count_a + count_b
    delta = mean_b - mean_a
    return count, mean_a + delta * (count_b / count), m2_a + m2_b + delta**2 * (count_a * count_b / count)


class PreciseBN(keras.callbacks.Callback):
    """Runs `precise_bn` at the end of training, so evaluation and export use population statistics.

    It runs in `on_train_end`, after the last epoch's validation: Keras 3 `fit` calls `on_epoch_end` after
    validating, so a per-epoch pass would only affect the next epoch's validation. Validation numbers logged during
    `fit` therefore still use the moving averages; evaluate after `fit` for the precise ones.

    Args:
        dataset: training batches (see `precise_bn`), e.g. the un-augmented training split.
        num_samples: examples for the pass (all of the dataset if it has fewer).

    Attributes:
        report: what `precise_bn` returned, after training ends (None before).
    """

    def __init__(self, dataset, num_samples: int = 8192):
        super().__init__()
        self.dataset = dataset
        self.num_samples = check_positive_int("PreciseBN num_samples", num_samples)
        self.report = None

    def on_train_end(self, logs=None):
        self.report = precise_bn(self.model, self.dataset, self.num_samples)
