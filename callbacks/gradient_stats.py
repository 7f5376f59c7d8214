"""Gradient noise scale, per-example gradient variance and gradient signal-to-noise ratio, measured during fit.

At step 0 and every N steps, n = M * b fresh training examples are split into M micro-batches of b examples, and
the micro-batches' mean gradients g_i (the compiled loss, mean-reduced, plus regularization losses) give tr(Sigma),
|G|^2, B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018, eq. 2.8), the gradient std at the run's batch B and
the SNR, each with a 95% confidence interval; the estimators and intervals (jackknife over the micro-batches,
Fieller's interval for B_simple) are written once, in callbacks/noise_estimates.py. G and Sigma are the mean and
per-example covariance of the gradient over the `population` examples the batches are drawn from (the training
split), or over the data distribution when population is None.

Precision: by default a measurement uses EXAMPLES = 1024 examples (M = max(8, 1024 / b) micro-batches of b = B),
checked on a BN-free CNN on the digits at B = 32 against per-example gradients over the whole training split at
the measured weights during training (tests/test_gradient_stats_training.py).

Smoothing: the `_smoothed` keys pool the measurements of a trailing window, those at steps >= (1 - window) * s at
step s (default WINDOW: the last 5% of the steps so far, so no value from a different phase of training, such as
step 0, enters once s > 0), by noise_estimates.pool: the mean of their tr(Sigma) and |G|^2, with intervals from
their jackknife variances. At the pipeline's default interval (100 steps) the window holds one measurement until
step 2000: the smoothed values are then the raw ones.

Record (one JSON line of out_path per measurement, and `history`): "step", "epoch", "batch_size",
"micro_batch_size", "micro_batches", "population"; for each key in KEYS "grad/<key>" with "grad/<key>_lo",
"grad/<key>_hi", and "grad/<key>_smoothed" with "_smoothed_lo", "_smoothed_hi"; "grad/noise_scale_is_lower_bound"
and "grad/noise_scale_smoothed_is_lower_bound" (True: |G|^2 is not distinguishable from zero, "grad/noise_scale"
is the lower bound X of B_simple > X, its "_hi" is null, and "grad/snr" is the upper bound B / X);
"grad/trace_cov_se", "grad/norm_sq_se", "grad/trace_norm_sq_corr" (for noise_estimates.pool);
"smoothed_first_step", "smoothed_measurements" (the window pooled); and, at every histogram_every-th measurement,
"variables": {variable path: raw values without intervals}. Non-finite values are written as null.

The measurement has no side effects on training (callbacks/micro_batches.py: a stateless call, the optimizer never
called), and its batches come from the callback's own iterator. That
iterator must be over a dataset OBJECT of its own, e.g. `data.stream(batch, seed=seed + 1)`: iterators
of one tf.data object share its shuffle seed generator, so iterating the object passed to `fit` would change the
order of the training's later epochs. With BatchNormalization each micro-batch is normalized with its own
statistics, so with the default b = B the noise is measured with BN at the run's batch. Dropout masks differ
between micro-batches and measurements. Decoupled weight decay (the optimizer's weight_decay) is not part of the
loss, so it is not in |G|^2. Steps are batches, counted by the optimizer's iterations (a resumed run continues its
count).

Speed: a measurement computes the gradients of M * b fresh examples, M times the forward and backward pass of a
training step at b = B (see benchmarks/instrument_overhead.py and the README's Benchmarks).
"""

import json
import math
import os

import keras
import numpy as np
import tensorflow as tf

from callbacks import noise_estimates
from callbacks.checked_io import finite_or_none
from callbacks.events import EventWriter
from callbacks.micro_batches import MicroBatchGradients
from callbacks.noise_estimates import KEYS
from callbacks.steps import Steps
from callbacks.timing import timed

# Examples per measurement by default: M = max(MIN_MICRO_BATCHES, ceil(EXAMPLES / b)) micro-batches of b = B. Chosen
# by measurement (tests/test_gradient_stats_training.py, README "Instruments"): with 256 examples a single |G|^2 of
# the digits CNN was indistinguishable from zero in most measurements after the first epoch, with 1024 every
# checked value was within 1.5x of the truth.
EXAMPLES, MIN_MICRO_BATCHES = 1024, 8
# The smoothed keys pool the measurements of the last 5% of the steps so far. Short, because single measurements
# are precise and the statistics themselves change fast: on the digits CNN tr(Sigma) moved 4x within 10 steps, and
# a window of 25% put the smoothed tr(Sigma) at 2.7x the truth.
WINDOW = 0.05
SUFFIXES = ("", "_lo", "_hi", "_smoothed", "_smoothed_lo", "_smoothed_hi")
FLAGS = ("grad/noise_scale_is_lower_bound", "grad/noise_scale_smoothed_is_lower_bound")
EPOCH_KEYS = tuple(f"grad/{key}{suffix}" for suffix in SUFFIXES for key in KEYS) + FLAGS + ("grad/step",)


def estimate(model, x, y, *, micro_batch_size=1, batch_size=None, sample_weight=None, population=None):
    """Estimates the gradient statistics of `model` at its current weights from one batch, without side effects.

    For tests and notebooks; it compiles a new function at each call (GradientStatistics compiles once).

    Args:
        model: A compiled Keras model (its compiled loss is the per-example loss).
        x: Inputs, n examples; the first (n // micro_batch_size) * micro_batch_size are used.
        y: Integer or float targets for those examples.
        micro_batch_size: Examples b per micro-batch (1: per-example gradients); at least 3 micro-batches.
        batch_size: The run's batch size B for grad/batch_std and grad/snr (default: n).
        sample_weight: Optional per-example weights, passed to the compiled loss.
        population: Examples the n were drawn from without replacement (None: infinite; see noise_estimates).

    Returns:
        {"grad/norm_sq": float, "grad/norm_sq_lo": float, ..., "grad/noise_scale_is_lower_bound": bool,
        "variables": {variable path: {"norm_sq": float, ...}}}.
    """
    n = int(tf.nest.flatten(x)[0].shape[0])
    micro_batches = n // micro_batch_size
    _check_micro_batches(micro_batch_size, micro_batches, n)
    gradients = MicroBatchGradients(model, micro_batch_size, micro_batches)
    data = (x, y) if sample_weight is None else (x, y, sample_weight)
    data = tf.nest.map_structure(lambda t: t[: micro_batches * micro_batch_size], data)
    gram, norm_sq, trace, _ = gradients(data, seed_offset=0, population=population)
    totals = noise_estimates.measurement(gram, micro_batch_size, batch_size or n, population)
    return {**_prefixed(totals), "variables": _per_variable(gradients.paths, norm_sq, trace, batch_size or n)}


def _prefixed(values, suffix=""):
    """noise_estimates' {"trace_cov_lo": v, ...} as {"grad/trace_cov<suffix>_lo": v, ...}."""
    result = {}
    for name, value in values.items():
        key = next((key for key in KEYS if name.startswith(key)), name)
        result[f"grad/{key}{suffix}{name[len(key):]}"] = value
    return result


def _per_variable(paths, norm_sq, trace, batch_size):
    """{path: {"norm_sq", "trace_cov", "noise_scale", "batch_std", "snr"}}: raw values, no intervals (NaN for
    B_simple and SNR where the variable's |G|^2 estimate is not positive)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        columns = {
            "norm_sq": norm_sq,
            "trace_cov": trace,
            "noise_scale": np.where(norm_sq > 0, trace / norm_sq, np.nan),
            "batch_std": np.sqrt(np.maximum(trace, 0.0) / batch_size),
            "snr": np.where(norm_sq > 0, norm_sq * batch_size / trace, np.nan),
        }
    return {path: {key: float(values[i]) for key, values in columns.items()} for i, path in enumerate(paths)}


def _check_micro_batches(micro_batch_size, micro_batches, examples):
    if micro_batch_size < 1 or micro_batches < 3:
        raise ValueError(
            f"micro_batch_size: needs at least 3 micro-batches of >= 1 example (the intervals are a jackknife over "
            f"them), got {micro_batches} of {micro_batch_size} from {examples} examples; lower micro_batch_size or "
            f"raise micro_batches"
        )


class GradientStatistics(keras.callbacks.Callback):
    """At step 0 and every `every_n_steps` steps, measures the statistics of the module docstring on fresh batches.

    Step 0 (before the first update of a run; not again when a run resumes) is the noise at initialization, and
    it compiles the measuring function before training starts. The raw and smoothed totals with their intervals go
    into the batch `logs` of the measured step (Keras passes one logs dict to all callbacks in list order, so
    callbacks listed after this one see them); into the epoch logs, EPOCH_KEYS, with "grad/step" the step of the
    measurement reported, and NaN in every key for an epoch without a new measurement (stable columns for
    CSVLogger; drop NaN keys before TensorBoard and the console to show only measured values); to TensorBoard under
    log_dir/gradients (totals with intervals, per-variable scalars and histograms of the mean gradient and of the
    per-example gradient std); and to out_path as one JSON line per measurement (the record of the module
    docstring).
    """

    def __init__(
        self,
        dataset,
        every_n_steps=100,
        *,
        batch_size=None,
        micro_batch_size=None,
        micro_batches=None,
        population=None,
        window=WINDOW,
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
        micro_batch_size: Examples b per micro-batch (default: B, so that with BatchNormalization the noise is
            measured with the run's batch statistics).
        micro_batches: Micro-batches M per measurement, >= 3 (default: max(MIN_MICRO_BATCHES, EXAMPLES / b)). A
            measurement costs about M training steps; with fewer examples the intervals are wider, and |G|^2 is not
            distinguishable from zero once B_simple exceeds the examples per measurement by far.
        population: Examples in the training split that the dataset draws from without replacement, for the
            finite-population term of |G|^2 (noise_estimates); None for an endless stream or draws with
            replacement.
        window: The smoothed keys pool the measurements at steps >= (1 - window) * step, in (0, 1].
        log_dir: TensorBoard directory (events go to log_dir/gradients), or None.
        out_path: JSON-lines file, one record per measurement, or None.
        histograms: Write per-variable histograms to TensorBoard.
        histogram_every: Per-variable values (JSON, TensorBoard scalars and histograms) at every this many
            measurements, the first included. Default: every 10th, and at least 100 steps apart (for ResNet-20
            they cost ~50 ms).
        """
        super().__init__()
        self._steps = Steps(every_n_steps)
        if not 0.0 < window <= 1.0:
            raise ValueError(f"window: must be a fraction of the steps so far in (0, 1], got {window!r}")
        if population is not None and population < 1:
            raise ValueError(f"population: must be a number of examples >= 1 or None, got {population!r}")
        dataset_batch = tf.nest.flatten(dataset.element_spec)[0].shape[0]
        self.batch_size = batch_size or dataset_batch
        if not self.batch_size:
            raise ValueError("batch_size: the dataset's batch size is not static (no drop_remainder); pass it")
        self.micro_batch_size = micro_batch_size or self.batch_size
        if not micro_batches:
            micro_batches = max(MIN_MICRO_BATCHES, math.ceil(EXAMPLES / self.micro_batch_size))
            if population:  # draws without replacement: at most the population (one pass of the stream)
                micro_batches = max(3, min(micro_batches, population // self.micro_batch_size))
        self.micro_batches = micro_batches
        _check_micro_batches(self.micro_batch_size, self.micro_batches, self.micro_batch_size * self.micro_batches)
        self.dataset, self.every_n_steps, self.window = dataset, int(every_n_steps), window
        self.population = population
        self.log_dir, self.out_path, self.histograms = log_dir, out_path, histograms
        self.histogram_every = histogram_every or max(10, math.ceil(100 / self.every_n_steps))
        self.history = []  # one record per measurement as written to out_path, without the per-variable values
        self._iterator = self._gradients = self._writer = None
        self._latest = {}
        self._epoch, self._measured_this_epoch = 0, False

    def on_train_begin(self, logs=None):
        if self._iterator is None:
            self._iterator = iter(self.dataset.repeat())
        if self._gradients is None or self._gradients.model is not self.model:
            self._gradients = MicroBatchGradients(self.model, self.micro_batch_size, self.micro_batches)
        if self.log_dir and self._writer is None:
            self._writer = EventWriter(os.path.join(self.log_dir, "gradients"))
        self._out = open(self.out_path, "a") if self.out_path else None

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch, self._measured_this_epoch = epoch, False
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
            for key in EPOCH_KEYS:
                value = self._latest.get(key) if self._measured_this_epoch else None
                # An unbounded end (B_simple's "_hi" when it is only a lower bound) is NaN too: no number.
                logs[key] = float(value) if value is not None and math.isfinite(value) else math.nan

    def on_train_end(self, logs=None):
        if self._out:
            self._out.close()
        if self._writer:
            self._writer.flush()

    @timed
    def _measure(self, step):
        """One measurement at the current weights: pools the window and writes the record everywhere."""
        seed_offset = (len(self.history) + 1) * 1_000_003  # far from the counters the training's dropout reaches
        per_variable = len(self.history) % self.histogram_every == 0
        gram, norm_sq, trace, per_parameter = self._gradients(self._fresh_examples(), seed_offset, self.population)
        raw = noise_estimates.measurement(gram, self.micro_batch_size, self.batch_size, self.population)
        record = {"step": step, "epoch": self._epoch, "batch_size": self.batch_size,
                  "micro_batch_size": self.micro_batch_size, "micro_batches": self.micro_batches,
                  "population": self.population, **_prefixed(raw)}
        first_step = math.ceil((1 - self.window) * step)
        smoothed = noise_estimates.pool(self.history + [record], first_step, step, batch_size=self.batch_size)
        record.update(_prefixed({k: v for k, v in smoothed.items() if k in _POOLED}, "_smoothed"))
        record.update(smoothed_first_step=smoothed["first_step"], smoothed_measurements=smoothed["measurements"])
        self._latest = {k: v for k, v in record.items() if k in EPOCH_KEYS}
        self._latest["grad/step"] = step
        self._measured_this_epoch = True
        self.history.append(record)
        if self._out:
            variables = _per_variable(self._gradients.paths, norm_sq, trace, self.batch_size) if per_variable else None
            line = record if variables is None else {**record, "variables": variables}
            self._out.write(json.dumps(finite_or_none(line)) + "\n")
            self._out.flush()
        if self._writer:
            histograms = per_parameter() if self.histograms and per_variable else ([], [])
            variables = _per_variable(self._gradients.paths, norm_sq, trace, self.batch_size) if per_variable else {}
            self._summaries(step, variables, *histograms)

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

    def _summaries(self, step, variables, means, stds):
        """Writes the TensorBoard summaries of one measurement as one event (callbacks.events); unbounded interval
        ends are left out."""
        scalars = [(name, value) for name, value in self._latest.items() if name != "grad/step" and math.isfinite(value)]
        for path, values in variables.items():
            scalars += [(f"grad_variables/{path}/{key}", value) for key, value in values.items()]
        histograms = []
        for path, mean, std in zip(self._gradients.paths, means, stds):
            histograms += [(f"grad_mean/{path}", mean), (f"grad_std/{path}", std)]
        self._writer.write(step, scalars, histograms)


_POOLED = {f"{key}{suffix}" for key in KEYS for suffix in ("", "_lo", "_hi")} | {"noise_scale_is_lower_bound"}
