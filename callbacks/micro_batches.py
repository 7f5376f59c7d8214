"""The gradients of M micro-batches at the current weights, in one compiled function without side effects.

The model and its compiled loss run in one `keras.StatelessScope` (the mechanism of `Model.stateless_call`; one
scope so that compute_loss also sees the layers' add_loss and regularization losses), which discards
BatchNormalization moving statistics, dropout seed state and metric updates; the optimizer is never called.
The micro-batches go through a `tf.map_fn` while loop, traced once for any number M of them and any size b (the
examples' first dimension and b are left unknown in the trace), so that a measurement can choose M after a pilot
without a new trace.
The statistics are computed on the flattened (M, parameters) gradient matrix, a few ops rather than a few per
variable. A `tf.vectorized_map` version took ~10 s to trace for ResNet-20.
"""

import contextlib
import functools

import keras
import numpy as np
import tensorflow as tf

import callbacks.shared_traces as shared_traces
from callbacks.timing import call, phase


class MicroBatchGradients:
    """One compiled function: the micro-batch gradients' Gram matrix, per-variable moments, per-parameter values."""

    def __init__(self, model, micro_batch_size, timer=None):
        """Args:
        model: The Keras model whose gradients are measured.
        micro_batch_size: Examples b per micro-batch.
        timer: The instrument whose time the calls are filed under (callbacks.timing phases), or None.
        """
        self.model, self.b, self.timer = model, micro_batch_size, timer
        self.paths = [v.path for v in model.trainable_variables]
        self.sizes = [int(np.prod(v.shape)) for v in model.trainable_variables]
        self._traced = None

    def __call__(self, data, seed_offset, population=None):
        """Statistics of data = (x, y) or (x, y, sample_weight) with exactly M * b examples, M >= 2.

        Returns:
            The (M, M) Gram matrix of the micro-batch mean gradients (float64), for the totals and their intervals;
            per-variable |G|^2 and tr(Sigma) (float64 arrays, the same estimators without intervals); and a
            function that returns the per-parameter mean gradients and per-example gradient standard deviations
            sqrt(diag(Sigma)), one array per variable (computed in the same call, converted only when asked for).
        """
        m = int(tf.nest.flatten(data)[0].shape[0]) // self.b
        if self._traced is None:  # one trace for every M (the examples' dimension unknown) and every model of the
            # architecture in this process (callbacks/shared_traces.py: a sweep's runs share it)
            specs = tf.nest.map_structure(lambda t: tf.TensorSpec([None, *t.shape[1:]], t.dtype), data)

            def make(template):
                weight_specs = shared_traces.weight_specs(template)
                # No autograph: the loop over micro-batches is an explicit tf.map_fn, the rest straight-line code.
                function = tf.function(functools.partial(_moments, template), autograph=False)
                with phase(self.timer, "tracing") if self.timer else contextlib.nullcontext():
                    return function.get_concrete_function(specs, tf.TensorSpec([], tf.int64),
                                                          tf.TensorSpec([], tf.int32), *weight_specs)

            self._traced = shared_traces.shared(self.model, f"micro_batch_gradients {specs}", make)
        arguments = (data, tf.constant(seed_offset, tf.int64), tf.constant(self.b, tf.int32),
                     *shared_traces.weights(self.model))
        outputs = call(self.timer, self._traced, *arguments) if self.timer else self._traced(*arguments)
        gram, mean_sq, deviation_sq, mean, deviation = outputs
        trace = self.b / (m - 1) * deviation_sq.numpy().astype(np.float64)
        norm_sq = mean_sq.numpy().astype(np.float64) - trace / (m * self.b)
        if population:
            norm_sq += trace / population  # the finite-population term of callbacks.noise_estimates

        def per_parameter():
            split = np.cumsum(self.sizes)[:-1]
            stds = np.sqrt(self.b / (m - 1) * deviation.numpy())
            return np.split(mean.numpy(), split), np.split(stds, split)

        return gram.numpy(), norm_sq, trace, per_parameter


def _moments(model, data, seed_offset, b, trainable, non_trainable):
    """The micro-batch gradients' Gram matrix and moments (MicroBatchGradients) of `model` (a template, shared by
    the models of its architecture) at the given weights, for micro-batches of b examples (a tensor: one trace for
    every b)."""
    sizes = [int(np.prod(v.shape)) for v in model.trainable_variables]
    seed_states = [v.path.endswith("seed_generator_state") for v in model.non_trainable_variables]
    split = lambda t: tf.reshape(t, [-1, b] + list(t.shape[1:]))  # noqa: E731

    def micro_batch_gradient(inputs):
        """The micro-batch's mean gradient, all variables flattened into one float32 vector."""
        (xb, yb, *weights), offset = inputs
        # Distinct dropout masks per micro-batch: shift the counter half of every seed-generator state.
        states = [
            value + tf.stack([tf.zeros_like(offset), offset]) if is_seed else value
            for value, is_seed in zip(non_trainable, seed_states)
        ]
        mapping = shared_traces.template_mapping(model, trainable, states)
        with tf.GradientTape() as tape:
            tape.watch(trainable)
            with keras.StatelessScope(state_mapping=mapping, collect_losses=True):
                y_pred = model(xb, training=True)
                loss = model.compute_loss(xb, yb, y_pred, weights[0] if weights else None, training=True)
        gradients = tape.gradient(loss, trainable, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return tf.concat([tf.reshape(tf.cast(g, tf.float32), [-1]) for g in gradients], 0)

    parts = tf.nest.map_structure(split, data)
    offsets = seed_offset + tf.range(tf.shape(tf.nest.flatten(parts)[0])[0], dtype=tf.int64)
    gradients = tf.map_fn(micro_batch_gradient, (parts, offsets), parallel_iterations=2,
                          fn_output_signature=tf.TensorSpec([sum(sizes)], tf.float32))
    # On the flat (M, parameters) matrix: a few ops instead of a few per variable (the runtime's cost per op
    # is what a small model's measurement spends most on).
    mean = tf.reduce_mean(gradients, axis=0)
    deviation = tf.reduce_sum(tf.square(gradients - mean), axis=0)
    variable_of = tf.constant(np.repeat(np.arange(len(sizes), dtype=np.int32), sizes))
    mean_sq = tf.math.unsorted_segment_sum(tf.square(mean), variable_of, len(sizes))
    deviation_sq = tf.math.unsorted_segment_sum(deviation, variable_of, len(sizes))
    # The Gram matrix in float64: tr(Sigma) is a difference of its entries, which float32 would round away
    # when the noise is far below the signal.
    flat = tf.cast(gradients, tf.float64)
    return tf.matmul(flat, flat, transpose_b=True), mean_sq, deviation_sq, mean, deviation
