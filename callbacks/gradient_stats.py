"""Gradient noise scale, per-example gradient variance and gradient signal-to-noise ratio, measured during fit.

A fresh batch of n = M * b examples is split into M micro-batches of b examples; g_i is the mean gradient of
micro-batch i (the compiled loss, mean-reduced, plus regularization losses) and g = (1/M) sum_i g_i. With G the
expected gradient and Sigma the per-example gradient covariance, Cov(g_i) = Sigma / b, so the unbiased estimators
(McCandlish et al. 2018, "An Empirical Model of Large-Batch Training", app. A) are

    tr(Sigma) = b / (M - 1) * sum_i |g_i - g|^2        grad/trace_cov
    |G|^2     = |g|^2 - tr(Sigma) / (M * b)            grad/norm_sq   (E|g|^2 = |G|^2 + tr(Sigma) / (M b))
    B_simple  = tr(Sigma) / |G|^2                      grad/noise_scale  (their eq. 2.8; NaN when |G|^2 <= 0)
    std(g_B)  = sqrt(tr(Sigma) / B)                    grad/batch_std  (E|g_B - G|^2 at the run's batch B)
    SNR       = |G|^2 / (tr(Sigma) / B) = B / B_simple grad/snr  (squared signal over expected squared noise at B)

This is their two-batch-size estimator with B_small = b (averaged over the M micro-batches) and B_big = M b. The
same formulas restricted to one variable give the per-variable values; the totals are sums of the per-variable
|G|^2 and tr(Sigma), not of ratios. A ratio of two noisy estimates is biased, so the smoothed keys (*_ema) are
derived from bias-corrected exponential moving averages of |G|^2 and tr(Sigma) (the ratio of averages, app. A).

The measurement has no side effects on training: the model and its compiled loss run in one
`keras.StatelessScope` (the mechanism of `Model.stateless_call`; one scope so that compute_loss also sees the
layers' add_loss and regularization losses), which discards BatchNormalization moving statistics, dropout seed
state and metric updates; the optimizer is never called; batches come from the callback's own iterator. That
iterator must be over a dataset OBJECT of its own, e.g. `data.stream(batch, seed=seed + 1)`: iterators
of one tf.data object share its shuffle seed generator, so iterating the object passed to `fit` would change the
order of the training's later epochs. With BatchNormalization each micro-batch is normalized with its own
statistics (ghost batch norm at size b), so Sigma is the noise at micro-batch size b (B / 2 by default),
extrapolated by 1 / B; set micro_batch_size=B and micro_batches >= 2 (M batches per measurement) to measure it
with BN at B.
Dropout masks differ between micro-batches and measurements. Decoupled weight decay (the optimizer's
weight_decay) is not part of the loss, so it is not in |G|^2. Steps are batches, counted by the optimizer's
iterations (a resumed run continues its count).

Speed: a measurement computes the gradients of B fresh examples, as much work as a training step's forward and
backward pass, so measuring at every step costs at least 1 + (forward + backward) / step, nearly 2x. Up to
UNROLL micro-batches are independent subgraphs of one `tf.function`, which TensorFlow runs concurrently; more go
through a `tf.map_fn` while loop (sequential, traced once). The statistics are computed on the flattened (M,
parameters) gradient matrix, a few ops rather than a few per variable. Measured on 2 CPU cores for ResNet-20 on
8x8 digits at B = 32: tracing ~1.6 s; a measurement ~15 ms against a ~14 ms training step with the default M = 2
(M = 8 micro-batches of 4, through the while loop: ~40 ms). A `tf.vectorized_map` version took ~10 s to trace.
See benchmarks/instrument_overhead.py for the overhead in training.
"""

import json
import math
import os

import keras
import numpy as np
import tensorflow as tf

from callbacks.checked_io import finite_or_none
from callbacks.events import EventWriter
from callbacks.steps import Steps
from callbacks.timing import timed

KEYS = ("norm_sq", "trace_cov", "noise_scale", "batch_std", "snr")
# Micro-batches up to this many are unrolled into independent subgraphs (concurrent, ~1.4 s more tracing each for
# ResNet-20); more go through a while loop (sequential, one trace).
UNROLL = 4


def estimate(model, x, y, *, micro_batch_size=1, batch_size=None, sample_weight=None):
    """Estimates the gradient statistics of `model` at its current weights from one batch, without side effects.

    For tests and notebooks; it compiles a new function at each call (GradientStatistics compiles once).

    Args:
        model: A compiled Keras model (its compiled loss is the per-example loss).
        x: Inputs, n examples; the first (n // micro_batch_size) * micro_batch_size are used.
        y: Integer or float targets for those examples.
        micro_batch_size: Examples b per micro-batch (1: per-example gradients).
        batch_size: The run's batch size B for grad/batch_std and grad/snr (default: n).
        sample_weight: Optional per-example weights, passed to the compiled loss.

    Returns:
        {"grad/norm_sq": float, ..., "grad/snr": float, "variables": {variable path: {"norm_sq": float, ...}}}.
    """
    n = int(tf.nest.flatten(x)[0].shape[0])
    micro_batches = n // micro_batch_size
    _check_micro_batches(micro_batch_size, micro_batches, n)
    gradients = _MicroBatchGradients(model, micro_batch_size, micro_batches)
    data = (x, y) if sample_weight is None else (x, y, sample_weight)
    data = tf.nest.map_structure(lambda t: t[: micro_batches * micro_batch_size], data)
    norm_sq, trace, _ = gradients(data, seed_offset=0)
    return _record(gradients.paths, (_derive(norm_sq, trace, batch_size or n), ""))


def _derive(norm_sq, trace_cov, batch_size):
    """All keys from |G|^2 and tr(Sigma) (arrays, one entry per variable and the total last)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        noise_scale = np.where(norm_sq > 0, trace_cov / norm_sq, np.nan)
        return {
            "norm_sq": norm_sq,
            "trace_cov": trace_cov,
            "noise_scale": noise_scale,
            "batch_std": np.sqrt(trace_cov / batch_size),
            "snr": norm_sq * batch_size / trace_cov,
        }


def _record(paths, *values_and_suffixes):
    """The totals as {"grad/<key><suffix>": float} plus per-variable values under "variables"."""
    record, variables = {}, {path: {} for path in paths}
    for values, suffix in values_and_suffixes:
        for key, value in values.items():
            record[f"grad/{key}{suffix}"] = float(value[-1])
            for i, path in enumerate(paths):
                variables[path][key + suffix] = float(value[i])
    return {**record, "variables": variables}


def _check_micro_batches(micro_batch_size, micro_batches, examples):
    if micro_batch_size < 1 or micro_batches < 2:
        raise ValueError(
            f"micro_batch_size: needs at least 2 micro-batches of >= 1 example, got {micro_batches} of "
            f"{micro_batch_size} from {examples} examples; lower micro_batch_size or raise micro_batches"
        )


class _MicroBatchGradients:
    """One compiled function: per-variable |g|^2 and tr(Sigma) from M micro-batches, optionally per parameter."""

    def __init__(self, model, micro_batch_size, micro_batches):
        self.model, self.b, self.m = model, micro_batch_size, micro_batches
        self.paths = [v.path for v in model.trainable_variables]
        self.sizes = [int(np.prod(v.shape)) for v in model.trainable_variables]
        self._seed_states = [v.path.endswith("seed_generator_state") for v in model.non_trainable_variables]
        self._function = tf.function(self._moments, reduce_retracing=True)

    def __call__(self, data, seed_offset):
        """Statistics of data = (x, y) or (x, y, sample_weight) with exactly M * b examples.

        Returns:
            (|G|^2, tr(Sigma)) as float64 arrays [per variable..., total], and a function that returns the
            per-parameter mean gradients and per-example gradient standard deviations sqrt(diag(Sigma)), one array
            per variable (computed in the same call, converted only when asked for).
        """
        mean_sq, deviation_sq, mean, deviation = self._function(data, tf.constant(seed_offset, tf.int64))
        trace = self.b / (self.m - 1) * deviation_sq.numpy().astype(np.float64)
        norm_sq = mean_sq.numpy().astype(np.float64) - trace / (self.m * self.b)

        def per_parameter():
            split = np.cumsum(self.sizes)[:-1]
            stds = np.sqrt(self.b / (self.m - 1) * deviation.numpy())
            return np.split(mean.numpy(), split), np.split(stds, split)

        return np.append(norm_sq, norm_sq.sum()), np.append(trace, trace.sum()), per_parameter

    def _moments(self, data, seed_offset):
        model = self.model
        trainable = [v.value for v in model.trainable_variables]
        non_trainable = [v.value for v in model.non_trainable_variables]
        split = lambda t: tf.reshape(t, [self.m, self.b] + list(t.shape[1:]))  # noqa: E731

        def micro_batch_gradient(inputs):
            """The micro-batch's mean gradient, all variables flattened into one float32 vector."""
            (xb, yb, *weights), offset = inputs
            # Distinct dropout masks per micro-batch: shift the counter half of every seed-generator state.
            states = [
                value + tf.stack([tf.zeros_like(offset), offset]) if is_seed else value
                for value, is_seed in zip(non_trainable, self._seed_states)
            ]
            mapping = [*zip(model.trainable_variables, trainable), *zip(model.non_trainable_variables, states)]
            with tf.GradientTape() as tape:
                tape.watch(trainable)
                with keras.StatelessScope(state_mapping=mapping, collect_losses=True):
                    y_pred = model(xb, training=True)
                    loss = model.compute_loss(xb, yb, y_pred, weights[0] if weights else None, training=True)
            gradients = tape.gradient(loss, trainable, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            return tf.concat([tf.reshape(tf.cast(g, tf.float32), [-1]) for g in gradients], 0)

        parts, offsets = tf.nest.map_structure(split, data), seed_offset + tf.range(self.m, dtype=tf.int64)
        if self.m <= UNROLL:
            # Independent subgraphs, one per micro-batch: the runtime runs them concurrently (inter-op threads).
            inputs = [(tf.nest.map_structure(lambda t: t[i], parts), offsets[i]) for i in range(self.m)]  # noqa: B023
            gradients = tf.stack([micro_batch_gradient(micro_batch) for micro_batch in inputs])
        else:
            # A while loop, traced once for one micro-batch.
            gradients = tf.map_fn(micro_batch_gradient, (parts, offsets), parallel_iterations=2,
                                  fn_output_signature=tf.TensorSpec([sum(self.sizes)], tf.float32))
        # On the flat (M, parameters) matrix: a few ops instead of a few per variable (the runtime's cost per op
        # is what a small model's measurement spends most on).
        mean = tf.reduce_mean(gradients, axis=0)
        deviation = tf.reduce_sum(tf.square(gradients - mean), axis=0)
        variable_of = tf.constant(np.repeat(np.arange(len(self.sizes), dtype=np.int32), self.sizes))
        mean_sq = tf.math.unsorted_segment_sum(tf.square(mean), variable_of, len(self.sizes))
        deviation_sq = tf.math.unsorted_segment_sum(deviation, variable_of, len(self.sizes))
        return mean_sq, deviation_sq, mean, deviation


class GradientStatistics(keras.callbacks.Callback):
    """At step 0 and every `every_n_steps` steps, measures the statistics of the module docstring on fresh batches.

    Step 0 (before the first update of a run; not again when a run resumes) is the noise at initialization, and
    it compiles the measuring function before training starts. The raw and smoothed totals go into the batch
    `logs` of the measured step (Keras passes one logs dict to all callbacks in list order, so callbacks listed
    after this one see them), into the epoch logs (latest values, NaN before the first measurement, so CSVLogger
    and EarlyStopping listed after this one can use them), to TensorBoard under log_dir/gradients (totals,
    per-variable scalars, per-variable histograms of the mean gradient and of the per-example gradient std), and
    to out_path as one JSON line per measurement (with the per-variable values at every histogram_every-th one).
    """

    def __init__(
        self,
        dataset,
        every_n_steps=100,
        *,
        batch_size=None,
        micro_batch_size=None,
        micro_batches=None,
        ema=0.9,
        log_dir=None,
        out_path=None,
        histograms=True,
        histogram_every=None,
    ):
        """Args:
        dataset: A tf.data.Dataset of training batches (x, y) or (x, y, sample_weight), an object of its own
            (not the one passed to fit; see the module docstring). It is repeated, and its batches are split or
            concatenated into micro_batches * micro_batch_size fresh examples per measurement.
        every_n_steps: Steps (batches) between measurements.
        batch_size: The run's batch size B for grad/batch_std and grad/snr (default: the dataset's batch size).
        micro_batch_size: Examples b per micro-batch (default: max(1, B // 2)).
        micro_batches: Micro-batches M per measurement, >= 2 (default 2: one fresh batch of B examples). The
            default is the cheapest measurement (about one training step; see Speed) and, with BatchNorm, the one
            whose micro-batches are closest to the run's batch. Each measurement is then noisy (tr(Sigma) has
            M - 1 = 1 degree of freedom per independent gradient direction); the moving averages and the
            averages over a run's measurements are what to read. More micro-batches cost more per measurement.
        ema: Smoothing factor of the moving averages, in [0, 1).
        log_dir: TensorBoard directory (events go to log_dir/gradients), or None.
        out_path: JSON-lines file, one record per measurement, or None.
        histograms: Write per-variable histograms to TensorBoard.
        histogram_every: Per-variable values (JSON, TensorBoard scalars and histograms) at every this many
            measurements, the first included. Default: every 10th, and at least 100 steps apart (for ResNet-20
            they cost ~50 ms, about 4 measurements).
        """
        super().__init__()
        self._steps = Steps(every_n_steps)
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"ema: must be in [0, 1), got {ema!r}")
        dataset_batch = tf.nest.flatten(dataset.element_spec)[0].shape[0]
        self.batch_size = batch_size or dataset_batch
        if not self.batch_size:
            raise ValueError("batch_size: the dataset's batch size is not static (no drop_remainder); pass it")
        self.micro_batch_size = micro_batch_size or max(1, self.batch_size // 2)
        self.micro_batches = micro_batches or 2
        _check_micro_batches(self.micro_batch_size, self.micro_batches, self.micro_batch_size * self.micro_batches)
        self.dataset, self.every_n_steps, self.ema = dataset, int(every_n_steps), ema
        self.log_dir, self.out_path, self.histograms = log_dir, out_path, histograms
        self.histogram_every = histogram_every or max(10, math.ceil(100 / self.every_n_steps))
        self.history = []  # one record per measurement as written to out_path, without the per-variable values
        self._iterator = self._gradients = self._writer = None
        self._average_norm_sq = self._average_trace = 0.0  # moving averages, per variable and total
        self._latest = {}
        self._epoch = 0

    def on_train_begin(self, logs=None):
        if self._iterator is None:
            self._iterator = iter(self.dataset.repeat())
        if self._gradients is None or self._gradients.model is not self.model:
            self._gradients = _MicroBatchGradients(self.model, self.micro_batch_size, self.micro_batches)
        if self.log_dir and self._writer is None:
            self._writer = EventWriter(os.path.join(self.log_dir, "gradients"))
        self._out = open(self.out_path, "a") if self.out_path else None

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._steps.epoch_begin(self.model)

    def on_train_batch_begin(self, batch, logs=None):
        if self._steps.step == 0 and not self.history:
            self._measure(0)

    def on_train_batch_end(self, batch, logs=None):
        if self._steps.batch_end(self.model, batch):
            self._measure(self._steps.step)
            if logs is not None:
                logs.update(self._latest)

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            for key in KEYS:
                for name in (f"grad/{key}", f"grad/{key}_ema"):
                    logs[name] = self._latest.get(name, math.nan)

    def on_train_end(self, logs=None):
        if self._out:
            self._out.close()
        if self._writer:
            self._writer.flush()

    @timed
    def _measure(self, step):
        """One measurement at the current weights: updates the averages and writes the record everywhere."""
        seed_offset = (len(self.history) + 1) * 1_000_003  # far from the counters the training's dropout reaches
        per_variable = len(self.history) % self.histogram_every == 0
        norm_sq, trace, per_parameter = self._gradients(self._fresh_examples(), seed_offset)
        self._average_norm_sq = self.ema * self._average_norm_sq + (1 - self.ema) * norm_sq
        self._average_trace = self.ema * self._average_trace + (1 - self.ema) * trace
        correction = 1 - self.ema ** (len(self.history) + 1)  # of a moving average started at zero (as in Adam)
        raw = _derive(norm_sq, trace, self.batch_size)
        smoothed = _derive(self._average_norm_sq / correction, self._average_trace / correction, self.batch_size)
        record = {"step": step, "epoch": self._epoch, "batch_size": self.batch_size}
        record.update(micro_batch_size=self.micro_batch_size, micro_batches=self.micro_batches)
        record.update(_record(self._gradients.paths if per_variable else [], (raw, ""), (smoothed, "_ema")))
        if not per_variable:
            del record["variables"]
        self._latest = {k: v for k, v in record.items() if k.startswith("grad/")}
        self.history.append({k: v for k, v in record.items() if k != "variables"})
        if self._out:
            self._out.write(json.dumps(finite_or_none(record)) + "\n")
            self._out.flush()
        if self._writer:
            scalars = np.concatenate([values[key] for values in (raw, smoothed) for key in KEYS])
            histograms = per_parameter() if self.histograms and per_variable else ([], [])
            self._summaries(step, scalars, *histograms, per_variable=per_variable)

    def _fresh_examples(self):
        """(x, y) or (x, y, sample_weight) of exactly micro_batches * micro_batch_size fresh examples."""
        needed, parts, count = self.micro_batches * self.micro_batch_size, [], 0
        while count < needed:
            x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(next(self._iterator))
            parts.append((x, y) if sample_weight is None else (x, y, sample_weight))
            count += int(tf.nest.flatten(x)[0].shape[0])
        if len(parts) == 1 and count == needed:
            return parts[0]
        return tf.nest.map_structure(lambda *ts: tf.concat(ts, axis=0)[:needed], *parts)

    def _summaries(self, step, scalars, means, stds, per_variable):
        """Writes the TensorBoard summaries of one measurement as one event (callbacks.events)."""
        names = [f"grad/{key}{suffix}" for suffix in ("", "_ema") for key in KEYS]
        columns = len(self._gradients.paths) + 1
        values = []
        for k, name in enumerate(names):
            values.append((name, scalars[k * columns + columns - 1]))
            if per_variable:
                values += [(f"grad_variables/{path}/{name[5:]}", scalars[k * columns + i])
                           for i, path in enumerate(self._gradients.paths)]
        histograms = []
        for path, mean, std in zip(self._gradients.paths, means, stds):
            histograms += [(f"grad_mean/{path}", mean), (f"grad_std/{path}", std)]
        self._writer.write(step, values, histograms)
