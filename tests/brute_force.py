"""Gradient statistics of a whole training split at a model's current weights, from per-example gradients.

The independent truth of the gradient-statistics tests: each example's gradient from its own tape on a
one-example batch (vectorized with tf.vectorized_map), not the instruments' micro-batch or replica code.
"""

import keras
import numpy as np
import tensorflow as tf


class PopulationStatistics:
    """Called with no arguments: {"trace_cov", "norm_sq", "noise_scale"} of (x, y) at the model's current weights.

    tr(Sigma) is the sum over parameters of the unbiased per-example variance, |G|^2 the squared norm of the mean
    gradient, B_simple their ratio (the definitions of callbacks/noise_estimates.py).
    """

    def __init__(self, model, x, y, chunk=431):
        self.model, self.x, self.y, self.chunk = model, x, y, chunk
        variables = model.trainable_variables

        @tf.function(reduce_retracing=True)
        def sums(xb, yb):
            def one_example(example):
                xi, yi = example
                with tf.GradientTape() as tape:
                    loss = keras.losses.sparse_categorical_crossentropy(yi[None], model(xi[None]))[0]
                return tf.concat([tf.reshape(g, [-1]) for g in tape.gradient(loss, variables)], 0)

            g = tf.cast(tf.vectorized_map(one_example, (xb, yb)), tf.float64)
            return tf.reduce_sum(g, 0), tf.reduce_sum(tf.square(g), 0)

        self._sums = sums

    def __call__(self):
        n, total, squares = len(self.x), 0.0, 0.0
        for i in range(0, n, self.chunk):
            s, sq = self._sums(self.x[i : i + self.chunk], self.y[i : i + self.chunk])
            total, squares = total + s.numpy(), squares + sq.numpy()
        mean = total / n
        trace = float(np.sum(squares - n * mean**2) / (n - 1))  # sum over parameters of the unbiased variance
        norm_sq = float(mean @ mean)
        return {"trace_cov": trace, "norm_sq": norm_sq, "noise_scale": trace / norm_sq}
