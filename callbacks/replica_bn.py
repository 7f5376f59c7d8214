"""One set of BatchNorm moving statistics for all replicas: their mean, at every epoch end."""

from __future__ import annotations

import keras
import tensorflow as tf


def replica_moving_statistics(model: keras.Model) -> list:
    """The moving mean and variance variables of every BatchNormalization layer that normalizes per replica.

    Synchronized layers (BatchNormalization(synchronized=True)) are left out: they all-reduce their batch
    statistics, so every replica already holds the same moving statistics.
    """
    return [variable for layer in model._flatten_layers(include_self=False)
            if isinstance(layer, keras.layers.BatchNormalization) and not layer.synchronized
            for variable in (layer.moving_mean, layer.moving_variance)]


def average_over_replicas(model: keras.Model, strategy: tf.distribute.Strategy) -> None:
    """Sets each per-replica BN moving statistic, on every replica of every worker, to its mean over the replicas.

    Under a tf.distribute strategy a non-synchronized BatchNormalization layer updates its moving statistics
    from its own replica's slice of the batch, so the copies drift apart, while checkpoints and the export save
    one of them (the first replica's). With R replicas holding m_1 .. m_R, this assigns (m_1 + ... + m_R) / R,
    the exponential moving average of the replicas' mean batch statistics, everywhere: checkpoint, evaluation
    and export then see the one set that every replica continues from, and a resumed run continues exactly.
    Every worker must call this at the same point (it is a collective under the multi-worker strategy).
    """
    variables = replica_moving_statistics(model)
    if not variables or strategy.num_replicas_in_sync == 1:
        return
    local = strategy.run(lambda: [tf.identity(v.value) for v in variables])
    # One reduce per variable: the collective strategy cannot reduce a nested structure.
    for variable, values in zip(variables, local):
        variable.assign(strategy.reduce(tf.distribute.ReduceOp.MEAN, values, axis=None))


class AverageReplicaStatistics(keras.callbacks.Callback):
    """Calls average_over_replicas at every epoch end, before the checkpoint (place it before the saving callback)."""

    def __init__(self, strategy: tf.distribute.Strategy):
        super().__init__()
        self.strategy = strategy

    def on_epoch_end(self, epoch, logs=None):
        average_over_replicas(self.model, self.strategy)
