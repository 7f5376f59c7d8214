"""Gradient noise scale, per-example gradient variance and gradient signal-to-noise ratio, measured during fit.

At step 0, on a schedule (callbacks/schedule.py: geometric by default, 10, 20, 40, ... steps; or every N steps)
and at the last step of each fit, n = M * b fresh training examples are split into M micro-batches of b examples,
and the micro-batches' mean gradients g_i (the compiled loss, mean-reduced, plus regularization losses) give
tr(Sigma), |G|^2, B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018, eq. 2.8), the gradient std at the run's
batch B and the SNR, each with a 95% confidence interval; the estimators, intervals and bounds (jackknife over the
micro-batches, Fieller's interval for B_simple, a Bonferroni lower bound when |G|^2 is not resolved) are written
once, in callbacks/noise_estimates.py. G and Sigma are the mean and per-example covariance of the gradient over
the `population` examples the batches are drawn from (the training split), or over the data distribution when
population is None.

Size by precision: the examples a measurement needs grow with B_simple (|G|^2 is resolved when n is several times
B_simple), which grows during training, so a fixed n is either wasted early or too small late. A pilot of M_0
micro-batches estimates |G|^2 and its standard error; noise_estimates.micro_batches_needed turns them into the M
that brings |G|^2's interval to +- relative_half_width of it; then M micro-batches are measured AFRESH and only they
are reported (the pilot is discarded, so the reported interval has its nominal coverage: its size depends on the
pilot alone, which is independent of it). The cost of a measurement, pilot included, is at most max_examples and
budget_fraction of the examples trained since the previous measurement; a cost of at most two pilots is spent on
one measurement of that size, fixed in advance. M is at most the training split, N // b micro-batches: with
`population_data`, a measurement of that size, or whose cost covers it (then without a pilot), takes the whole
split once, in an order drawn from (seed, step) ("whole_split" true), and when b divides N "exact_norm_sq" is true:
|G|^2 is the population's own, its interval a point, and B_simple's interval is tr(Sigma)'s over it (without it
the M b examples come from the stream). Short of the whole split, |G|^2's error carries the finite-population
factor 1 - M b / N (noise_estimates). With
`micro_batches` given, every measurement has that size (no pilot).

Smoothing: the `_smoothed` keys pool the measurements of a trailing window, those at steps >= (1 - window) * s at
step s (default WINDOW: the last 5% of the steps so far, so no value from a different phase of training, such as
step 0, enters once s > 0), by noise_estimates.pool: the mean of their tr(Sigma) and |G|^2, with intervals from
their jackknife variances. They exist only in records whose window pools more than one measurement (never with the
geometric schedule, whose measurements are more than 5% of the steps apart).

Record (one JSON line of out_path per measurement, and `history`): "step", "epoch", "batch_size",
"micro_batch_size", "micro_batches", "examples", "pilot_micro_batches" (0: no pilot), "micro_batches_needed" (the
pilot's answer), "most_micro_batches" (the budget's), "population", "whole_split", "exact_norm_sq"; for each key
in KEYS "grad/<key>" with "grad/<key>_lo", "grad/<key>_hi"; "grad/noise_scale_is_lower_bound" (True: |G|^2 is
not distinguishable from zero, "grad/noise_scale" is null, "grad/noise_scale_lo" the lower bound X of B_simple > X
when one is supported, and "grad/snr_hi" the upper bound B / X); "notes": {key: why its value is null} (also for a lower end of |G|^2, tr(Sigma) or batch_std at the trivial 0, which
is null);
"grad/trace_cov_se", "grad/norm_sq_se", "grad/trace_norm_sq_corr" (for noise_estimates.pool); where the window pools more than one measurement,
"grad/<key>_smoothed" with "_smoothed_lo", "_smoothed_hi", "grad/noise_scale_smoothed_is_lower_bound",
"smoothed_first_step", "smoothed_measurements"; and, at every histogram_every-th measurement, "variables":
{variable path: raw values without intervals}. Values that are not determined (NaN) or unbounded ends are written
as null and left out of the logs and TensorBoard.

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
training step at b = B (see benchmarks/instrument_overhead.py and its result file).
"""

import math

import keras
import numpy as np
import tensorflow as tf

from callbacks import noise_estimates
from callbacks import schedule as schedule_lib
from callbacks.micro_batches import MicroBatchGradients
from callbacks.noise_estimates import KEYS  # noqa: F401  (the keys of a record, here with the record's docstring)
from callbacks.noise_records import EPOCH_KEYS, FLAGS, SUFFIXES, WINDOW, NoiseRecords, prefixed  # noqa: F401
from callbacks.timing import timed

# The size of a measurement (module docstring): a pilot of PILOT_MICRO_BATCHES decides how many micro-batches bring
# |G|^2's interval to +- RELATIVE_HALF_WIDTH of it; a measurement takes at most MAX_EXAMPLES examples (and the
# training split) and at most BUDGET_FRACTION of the examples trained since the previous one, pilot included, so
# that measuring costs about a tenth of training.
PILOT_MICRO_BATCHES, RELATIVE_HALF_WIDTH, MAX_EXAMPLES, BUDGET_FRACTION = 8, 0.5, 8192, 0.1


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
    gradients = MicroBatchGradients(model, micro_batch_size)
    data = (x, y) if sample_weight is None else (x, y, sample_weight)
    data = tf.nest.map_structure(lambda t: t[: micro_batches * micro_batch_size], data)
    gram, norm_sq, trace, _ = gradients(data, seed_offset=0, population=population)
    totals = noise_estimates.measurement(gram, micro_batch_size, batch_size or n, population)
    totals.pop("notes")
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
    """On a schedule (callbacks/schedule.py), measures the statistics of the module docstring on fresh batches.

    Step 0 (before the first update of a run; not again when a run resumes) is the noise at initialization, and
    it compiles the measuring function before training starts; the last step of each fit is measured too. Records
    go where NoiseRecords writes them: batch and epoch logs (EPOCH_KEYS, determined values only), out_path and
    TensorBoard (log_dir/gradients: totals with intervals, per-variable scalars and histograms of the mean gradient
    and of the per-example gradient std).
    """

    def __init__(
        self,
        dataset,
        every_n_steps=None,
        *,
        batch_size=None,
        micro_batch_size=None,
        micro_batches=None,
        relative_half_width=RELATIVE_HALF_WIDTH,
        pilot_micro_batches=PILOT_MICRO_BATCHES,
        max_examples=MAX_EXAMPLES,
        budget_fraction=BUDGET_FRACTION,
        population=None,
        population_data=None,
        seed=0,
        window=WINDOW,
        log_dir=None,
        out_path=None,
        histograms=True,
        histogram_every=None,
    ):
        """Args:
        dataset: A function of the step giving a tf.data.Dataset of training batches (x, y) or
            (x, y, sample_weight), whose batches are the examples of the measurement at that step (pilot first),
            or one such dataset, an object of its own (not the one passed to fit; see the module docstring). It is
            repeated, and its batches are split or concatenated into the examples of each measurement.
        every_n_steps: None (default): step 0 and the geometric schedule of callbacks/schedule.py; n: step 0
            and every n steps. The last step of each fit is measured in both cases.
        batch_size: The run's batch size B for grad/batch_std and grad/snr (default: the dataset's batch size).
        micro_batch_size: Examples b per micro-batch (default: B, so that with BatchNormalization the noise is
            measured with the run's batch statistics).
        micro_batches: A fixed number M >= 3 of micro-batches per measurement (no pilot), or None (default): the
            size is chosen by precision (module docstring).
        relative_half_width: The precision sought for |G|^2: its interval's half-width over |G|^2.
        pilot_micro_batches: M_0 >= 3, the pilot's micro-batches, and the least a measurement takes.
        max_examples: Examples a measurement (pilot included) takes at most.
        budget_fraction: A measurement (pilot included) takes at most this fraction of the examples trained since
            the previous one (at least the pilot), or None for no such limit. A step trains one batch of the
            dataset's size (with gradient accumulation, a fraction of batch_size).
        population: Examples in the training split that the dataset draws from without replacement (a
            measurement's examples distinct, as one pass of the split per step gives them), for the
            finite-population terms of |G|^2 and its error (noise_estimates) and the largest sample; None for an
            endless stream, draws with replacement, augmented draws or a dataset object read across its epochs.
        population_data: The `population` examples themselves, a finite tf.data.Dataset of (x, y) or (x, y,
            sample_weight) batches, or None. With it, a measurement that needs the whole split takes all of it
            once, in micro-batches of an order drawn from (seed, step); when the split is a whole number of
            micro-batches, |G|^2 is then exact (noise_estimates.measurement). Read once, when first needed.
        seed: Seed of those orders.
        window: The smoothed keys pool the measurements at steps >= (1 - window) * step, in (0, 1].
        log_dir: TensorBoard directory (events go to log_dir/gradients), or None.
        out_path: JSON-lines file, one record per measurement, or None.
        histograms: Write per-variable histograms to TensorBoard.
        histogram_every: Per-variable values (JSON, TensorBoard scalars and histograms) at every this many
            measurements, the first included. Default: every 10th with every n steps (and at least 100 steps
            apart: for ResNet-20 they cost ~50 ms), every one with the geometric schedule.
        """
        dataset_batch = tf.nest.flatten((dataset(0) if callable(dataset) else dataset).element_spec)[0].shape[0]
        batch_size = batch_size or dataset_batch
        if not batch_size:
            raise ValueError("batch_size: the dataset's batch size is not static (no drop_remainder); pass it")
        super().__init__(None, batch_size, population=population, window=window, log_dir=log_dir,
                         out_path=out_path)
        self.schedule = schedule_lib.build(every_n_steps)
        self.every_n_steps = None if every_n_steps is None else int(every_n_steps)
        self.micro_batch_size = micro_batch_size or self.batch_size
        if micro_batches is not None:
            _check_micro_batches(self.micro_batch_size, micro_batches, self.micro_batch_size * micro_batches)
        _check_micro_batches(self.micro_batch_size, pilot_micro_batches,
                             self.micro_batch_size * pilot_micro_batches)
        if not relative_half_width > 0:
            raise ValueError(f"relative_half_width: must be > 0, got {relative_half_width!r}")
        if budget_fraction is not None and not budget_fraction > 0:
            raise ValueError(f"budget_fraction: must be > 0 or None, got {budget_fraction!r}")
        self.micro_batches, self.pilot_micro_batches = micro_batches, int(pilot_micro_batches)
        self.relative_half_width, self.budget_fraction = float(relative_half_width), budget_fraction
        # The most micro-batches one measurement may cost (pilot included), and the most one sample can hold
        # (draws without replacement).
        self.max_micro_batches = max(self.pilot_micro_batches, int(max_examples) // self.micro_batch_size)
        self.sample_micro_batches = max(3, population // self.micro_batch_size) if population else math.inf
        self.dataset, self.histograms = dataset, histograms
        self.step_examples = dataset_batch or batch_size  # examples trained per step (one batch of the dataset's)
        self.population_data, self.seed, self._population_examples = population_data, int(seed), None
        if histogram_every is None:
            histogram_every = 1 if every_n_steps is None else max(10, math.ceil(100 / every_n_steps))
        self.histogram_every = histogram_every
        self._iterator = self._gradients = None

    def on_train_begin(self, logs=None):
        if self._iterator is None and not callable(self.dataset):
            self._iterator = iter(self.dataset.repeat())
        if self._gradients is None or self._gradients.model is not self.model:
            self._gradients = MicroBatchGradients(self.model, self.micro_batch_size, timer=self)
        super().on_train_begin(logs)

    def on_train_batch_begin(self, batch, logs=None):
        if self._steps.step == 0 and not self.history:
            self._measure(0)

    def on_train_batch_end(self, batch, logs=None):
        if schedule_lib.crossed(self.schedule, self._steps, batch):
            self._measure(self._steps.step)
            if logs is not None:
                logs.update(self._latest)

    def on_train_end(self, logs=None):
        step = self._steps.step
        if self.history and self.history[-1]["step"] < step:  # the curve ends where training ends
            self._measure(step)
        super().on_train_end(logs)

    def measure_now(self):
        """Measures at the current step unless the latest record is of it: for a caller deciding on the latest noise
        (an adaptive batch at an epoch's end); the record goes where the scheduled ones go."""
        if not self.history or self.history[-1]["step"] < self._steps.step:
            self._measure(self._steps.step)

    def sizes(self, step, previous_step):
        """(pilot, most) in micro-batches for a measurement at `step` after one at `previous_step` (or None).

        The cost of a measurement, pilot included, is at most budget_fraction of the examples trained since the
        previous measurement, at least the pilot, at most max_micro_batches. A cost of at most two pilots is spent
        on one measurement of that size (pilot 0), a larger one on a pilot and a measurement afresh of the size the
        pilot asks for (noise_estimates.micro_batches_needed), at most `most`: the rest of the cost, and the
        training split. A cost that covers the whole split (with population_data) takes it, without a pilot.
        """
        if self.micro_batches:
            return 0, self.micro_batches
        cost = self.max_micro_batches
        if self.budget_fraction is not None and previous_step is not None:
            trained = (step - previous_step) * self.step_examples / self.micro_batch_size
            cost = min(cost, math.floor(self.budget_fraction * trained))
        cost = max(cost, self.pilot_micro_batches)
        if cost <= 2 * self.pilot_micro_batches or (self.population_data is not None
                                                    and cost >= self.sample_micro_batches):
            return 0, min(cost, self.sample_micro_batches)
        return self.pilot_micro_batches, min(cost - self.pilot_micro_batches, self.sample_micro_batches)

    @timed
    def _measure(self, step):
        """One measurement at the current weights, its size chosen by a pilot, recorded (NoiseRecords._record)."""
        seed_offset = (len(self.history) + 1) * 1_000_003  # far from the counters the training's dropout reaches
        pilot, most = self.sizes(step, self.history[-1]["step"] if self.history else None)
        micro_batches, needed, source = most, None, self._source(step)
        if pilot:
            gram, *_ = self._gradients(self._fresh_examples(source, pilot), seed_offset + 500_000, self.population)
            estimates = noise_estimates.gram_estimates(gram, self.micro_batch_size, self.population)
            needed = noise_estimates.micro_batches_needed(estimates, pilot, self.relative_half_width)
            wanted = math.ceil(needed) if math.isfinite(needed) else most
            micro_batches = min(max(wanted, pilot), most)
        per_variable = len(self.history) % self.histogram_every == 0
        whole_split = (self.population_data is not None and self.population
                       and micro_batches == self.population // self.micro_batch_size)
        examples = self._whole_split(step) if whole_split else self._fresh_examples(source, micro_batches)
        gram, norm_sq, trace, per_parameter = self._gradients(examples, seed_offset, self.population)
        exact = bool(whole_split) and micro_batches * self.micro_batch_size == self.population
        raw = noise_estimates.measurement(gram, self.micro_batch_size, self.batch_size, self.population,
                                          whole_population=exact)
        fields = {"batch_size": self.batch_size, "micro_batch_size": self.micro_batch_size,
                  "micro_batches": micro_batches, "examples": micro_batches * self.micro_batch_size,
                  "pilot_micro_batches": pilot, "micro_batches_needed": needed, "most_micro_batches": most,
                  "population": self.population,
                  "whole_split": bool(whole_split), "exact_norm_sq": exact}
        variables = _per_variable(self._gradients.paths, norm_sq, trace, self.batch_size) if per_variable else None
        histograms = per_parameter() if self._writer and self.histograms and per_variable else ([], [])
        self._record(step, raw, fields, variables, histograms)

    def set_state(self, state: dict) -> list[str]:
        """NoiseRecords.set_state (the records hold the previous measurement's step, from which the budget of the
        next one is counted); a dataset given as one object cannot go back to where its iterator was."""
        lost = super().set_state(state)
        if not callable(self.dataset):
            lost.append("GradientStatistics: its dataset is one object, whose iterator is not restored; the "
                        "measurements after the resume draw other examples than an uninterrupted run's")
        return lost

    def _source(self, step):
        """The iterator of the measurement at `step`: over the step's own dataset (its examples a function of the
        step: the pilot takes the first, the measurement the next), or the one iterator over a dataset object."""
        return iter(self.dataset(step).repeat()) if callable(self.dataset) else self._iterator

    def _fresh_examples(self, source, micro_batches):
        """(x, y) or (x, y, sample_weight) of exactly micro_batches * micro_batch_size fresh examples from the
        iterator `source`."""
        needed, parts, count = micro_batches * self.micro_batch_size, [], 0
        while count < needed:
            x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(next(source))
            parts.append((x, y) if sample_weight is None else (x, y, sample_weight))
            count += int(tf.nest.flatten(x)[0].shape[0])
        if len(parts) == 1 and count == needed:
            return parts[0]
        return tf.nest.map_structure(lambda *ts: tf.concat(ts, axis=0)[:needed], *parts)

    def _whole_split(self, step):
        """The population's examples in an order drawn from (seed, step), cut to whole micro-batches."""
        if self._population_examples is None:
            parts = [keras.utils.unpack_x_y_sample_weight(element) for element in self.population_data]
            parts = [(x, y) if w is None else (x, y, w) for x, y, w in parts]
            self._population_examples = tf.nest.map_structure(lambda *ts: tf.concat(ts, axis=0), *parts)
        n = int(tf.nest.flatten(self._population_examples)[0].shape[0])
        if n != self.population:
            raise ValueError(f"population_data: holds {n} examples, population says {self.population}")
        order = np.random.default_rng([self.seed, step]).permutation(n)[: n - n % self.micro_batch_size]
        return tf.nest.map_structure(lambda t: tf.gather(t, order), self._population_examples)
