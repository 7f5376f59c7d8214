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
called), and its batches come from a dataset of the callback's own: best a function of the step, e.g.
`lambda step: data.draws(batch, seed=seed + 1, step=step)`, so that the examples of the measurement at step s
are a function of (seed, s) and a resumed run measures on the examples an uninterrupted one does; or one dataset
OBJECT of its own, read by one iterator (not restored on resume). Never the object passed to `fit`: iterators of
one tf.data object share its shuffle seed generator, so iterating it would change the order of the training's
later epochs. With BatchNormalization each micro-batch is normalized with its own
statistics, so with the default b = B the noise is measured with BN at the run's batch. Dropout masks differ
between micro-batches and measurements. Decoupled weight decay (the optimizer's weight_decay) is not part of the
loss, so it is not in |G|^2. Steps are batches trained (callbacks/steps.py; a resumed run continues its count).

Speed: a measurement computes the gradients of M * b fresh examples, M times the forward and backward pass of a
training step at b = B (see benchmarks/instrument_overhead.py and the README's Benchmarks).
"""

import math

import keras
import numpy as np
import tensorflow as tf

from callbacks import noise_estimates
from callbacks.micro_batches import MicroBatchGradients
from callbacks.noise_estimates import KEYS  # noqa: F401  (the keys of a record, here with the record's docstring)
from callbacks.noise_records import EPOCH_KEYS, FLAGS, SUFFIXES, WINDOW, NoiseRecords, prefixed  # noqa: F401
from callbacks.timing import timed

# Examples per measurement by default: M = max(MIN_MICRO_BATCHES, ceil(EXAMPLES / b)) micro-batches of b = B. Chosen
# by measurement (tests/test_gradient_stats_training.py, README "Instruments"): with 256 examples a single |G|^2 of
# the digits CNN was indistinguishable from zero in most measurements after the first epoch, with 1024 every
# checked value was within 1.5x of the truth.
EXAMPLES, MIN_MICRO_BATCHES = 1024, 8


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
    return {**prefixed(totals), "variables": _per_variable(gradients.paths, norm_sq, trace, batch_size or n)}


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


class GradientStatistics(NoiseRecords):
    """At step 0 and every `every_n_steps` steps, measures the statistics of the module docstring on fresh batches.

    Step 0 (before the first update of a run; not again when a run resumes) is the noise at initialization, and
    it compiles the measuring function before training starts. Records go where NoiseRecords writes them: batch and
    epoch logs (EPOCH_KEYS), out_path and TensorBoard (log_dir/gradients: totals with intervals, per-variable scalars
    and histograms of the mean gradient and of the per-example gradient std).
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
        dataset: A function of the step giving a tf.data.Dataset of training batches (x, y) or
            (x, y, sample_weight), or one such dataset, an object of its own (not the one passed to fit; see the
            module docstring). It is repeated, and its batches are split or concatenated into
            micro_batches * micro_batch_size fresh examples per measurement.
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
        dataset_batch = tf.nest.flatten((dataset(0) if callable(dataset) else dataset).element_spec)[0].shape[0]
        batch_size = batch_size or dataset_batch
        if not batch_size:
            raise ValueError("batch_size: the dataset's batch size is not static (no drop_remainder); pass it")
        super().__init__(every_n_steps, batch_size, population=population, window=window, log_dir=log_dir,
                         out_path=out_path)
        self.micro_batch_size = micro_batch_size or self.batch_size
        if not micro_batches:
            micro_batches = max(MIN_MICRO_BATCHES, math.ceil(EXAMPLES / self.micro_batch_size))
            if population:  # draws without replacement: at most the population (one pass of the stream)
                micro_batches = max(3, min(micro_batches, population // self.micro_batch_size))
        self.micro_batches = micro_batches
        _check_micro_batches(self.micro_batch_size, self.micro_batches, self.micro_batch_size * self.micro_batches)
        self.dataset, self.histograms = dataset, histograms
        self.histogram_every = histogram_every or max(10, math.ceil(100 / self.every_n_steps))
        self._iterator = self._gradients = None

    def on_train_begin(self, logs=None):
        if self._iterator is None and not callable(self.dataset):
            self._iterator = iter(self.dataset.repeat())
        if self._gradients is None or self._gradients.model is not self.model:
            self._gradients = MicroBatchGradients(self.model, self.micro_batch_size, self.micro_batches)
        super().on_train_begin(logs)

    def on_train_batch_begin(self, batch, logs=None):
        if self._steps.step == 0 and not self.history:
            self._measure(0)

    def on_train_batch_end(self, batch, logs=None):
        if self._steps.batch_end(batch):
            self._measure(self._steps.step)
            if logs is not None:
                logs.update(self._latest)

    @timed
    def _measure(self, step):
        """One measurement at the current weights, recorded (NoiseRecords._record)."""
        seed_offset = (len(self.history) + 1) * 1_000_003  # far from the counters the training's dropout reaches
        per_variable = len(self.history) % self.histogram_every == 0
        examples = self._fresh_examples(step)
        gram, norm_sq, trace, per_parameter = self._gradients(examples, seed_offset, self.population)
        raw = noise_estimates.measurement(gram, self.micro_batch_size, self.batch_size, self.population)
        fields = {"batch_size": self.batch_size, "micro_batch_size": self.micro_batch_size,
                  "micro_batches": self.micro_batches, "population": self.population}
        variables = _per_variable(self._gradients.paths, norm_sq, trace, self.batch_size) if per_variable else None
        histograms = per_parameter() if self._writer and self.histograms and per_variable else ([], [])
        self._record(step, raw, fields, variables, histograms)

    def set_state(self, state: dict) -> list[str]:
        """NoiseRecords.set_state; a dataset given as one object cannot go back to where its iterator was."""
        lost = super().set_state(state)
        if not callable(self.dataset):
            lost.append("GradientStatistics: its dataset is one object, whose iterator is not restored; the "
                        "measurements after the resume draw other examples than an uninterrupted run's")
        return lost

    def _fresh_examples(self, step):
        """(x, y) or (x, y, sample_weight) of exactly micro_batches * micro_batch_size fresh examples for `step`."""
        needed, parts, count = self.micro_batches * self.micro_batch_size, [], 0
        iterator = iter(self.dataset(step).repeat()) if callable(self.dataset) else self._iterator
        while count < needed:
            x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(next(iterator))
            parts.append((x, y) if sample_weight is None else (x, y, sample_weight))
            count += int(tf.nest.flatten(x)[0].shape[0])
        if len(parts) == 1 and count == needed:
            return parts[0]
        return tf.nest.map_structure(lambda *ts: tf.concat(ts, axis=0)[:needed], *parts)
