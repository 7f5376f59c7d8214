"""A functional model whose training step also reports the squared norms of the per-replica and all-reduced gradients.

Under a tf.distribute strategy with R >= 2 replicas, every training step computes R replica gradients g_r, each the
mean gradient of a replica's slice of b = B / R examples, and the optimizer applies their mean over the B examples
of the global batch. `ReplicaNormsModel.train_step` is Keras' own training step (same loss, same gradients, handed
to the same `optimizer.apply_gradients`, so the update and the weights are those of a run without it) that also
returns, per step, in its logs:

    REPLICA_NORM_SQ  (1 / R) sum_r |g_r|^2     the mean squared norm of a gradient over b examples
    GLOBAL_NORM_SQ   |(1 / R) sum_r g_r|^2      the squared norm of the gradient over all B examples
    GLOBAL_BATCH     B                          the examples of the step, over all replicas

from which callbacks/replica_gradient_stats.py estimates the gradient noise (McCandlish et al. 2018, app. A).
Keras' compute_loss scales each replica's loss by 1 / R (its gradients sum to the global mean in the all-reduce),
so the replica gradients are unscaled by R here; an optimizer's loss scale (mixed_float16) is divided out too.

Cost: the squared norms (one pass over the gradients) and one more all-reduce, of one tensor: the gradients
flattened into one vector with the local squared norm and the examples appended. The optimizer all-reduces the
gradients again inside apply_gradients, and Keras has no public way to read its result
(benchmarks/replica_gradient_stats.py measures what this costs).
"""

import keras
import tensorflow as tf

REPLICA_NORM_SQ, GLOBAL_NORM_SQ, GLOBAL_BATCH = "grad/replica_norm_sq", "grad/global_norm_sq", "grad/global_batch"
STEP_KEYS = (REPLICA_NORM_SQ, GLOBAL_NORM_SQ, GLOBAL_BATCH)


class ReplicaNormsModel(keras.Model):
    """A functional model (built from inputs and outputs) whose train_step also returns STEP_KEYS in its logs.

    Build it from an existing functional model with `with_replica_norms(model)`: the layers, and so the variables,
    checkpoints and exports, are the model's own.
    """

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True)
            scaled = self.optimizer.scale_loss(loss)
        context = tf.distribute.get_replica_context()
        replicas = context.num_replicas_in_sync
        # The loss tracker averages the unscaled loss, weighted by the examples of this replica's slice, as Keras'
        # own train_step does.
        examples = tf.shape(tf.nest.flatten(x)[0])[0]
        for metric in self.metrics:
            if metric.name == "loss":
                metric.update_state(loss * replicas, sample_weight=examples)
        variables = self.trainable_weights
        gradients = tape.gradient(scaled, variables)
        norms = self._norms(gradients, self.optimizer.scale_loss(tf.constant(1.0)), examples, replicas, context)
        self.optimizer.apply_gradients(zip(gradients, variables))
        return {**self.compute_metrics(x, y, y_pred, sample_weight=sample_weight), **norms}

    @staticmethod
    def _norms(gradients, loss_scale, examples, replicas, context):
        """STEP_KEYS of one step, identical on every replica (all are all-reduced).

        The gradients are flattened into one vector first, so that a step adds a handful of ops (one squared norm
        before and one after a single all-reduce) rather than a few per variable: on a small model a step's time is
        mostly per-op overhead.
        """
        present = [tf.convert_to_tensor(g) for g in gradients if g is not None]
        flat = tf.concat([tf.reshape(tf.cast(g, tf.float32), [-1]) for g in present], 0)
        # This replica's gradient over its b examples: the gradient of loss * loss_scale / R, times R / loss_scale.
        unscale = tf.cast(replicas, tf.float32) / tf.cast(loss_scale, tf.float32)
        local = tf.reduce_sum(tf.square(flat)) * unscale**2
        # One collective: the sum over replicas of the scaled gradients (the global mean gradient, times the loss
        # scale), of local / R (the mean of the replicas' squared norms) and of the examples.
        summed = context.all_reduce(tf.distribute.ReduceOp.SUM,
                                    tf.concat([flat, [local / replicas, tf.cast(examples, tf.float32)]], 0))
        total = tf.reduce_sum(tf.square(summed[:-2]))
        return {REPLICA_NORM_SQ: summed[-2], GLOBAL_NORM_SQ: total / tf.cast(loss_scale, tf.float32) ** 2,
                GLOBAL_BATCH: summed[-1]}


def with_replica_norms(model):
    """A ReplicaNormsModel over the functional `model`'s layers (compile it, under the strategy's scope)."""
    if not hasattr(model, "inputs") or not model.inputs:
        raise ValueError(f"model: needs a functional Keras model (with inputs and outputs), got {type(model).__name__}")
    return ReplicaNormsModel(inputs=model.inputs, outputs=model.outputs, name=model.name)
