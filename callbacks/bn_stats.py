"""BatchNorm statistics during training: batch and moving statistics against population statistics, drift."""

from __future__ import annotations

import json
import logging
import math
import os

import keras
import numpy as np
import tensorflow as tf

import callbacks.shared_traces as shared_traces
from callbacks import bn_tables
from callbacks import schedule as schedule_lib
from callbacks import timing
from callbacks.bn_tables import ERRORS, QUANTITIES, resolved
from callbacks.checked_io import check_positive_int, write_atomic
from callbacks.events import EventWriter
from callbacks.precise_bn import batch_norm_inputs, group_moments, population_moments, side_model, take_inputs
from callbacks.steps import Steps
from callbacks.timing import timed

logger = logging.getLogger(__name__)

SUMMARY_KEYS = tuple(f"bn/{key}" for key in ERRORS)
# "bn/<error>_below" = r: the error is below the resolution r of the population sample (bn/<error> is absent).
BELOW_KEYS = tuple(f"bn/{key}_below" for key in ERRORS)

# The epoch-log keys: the averages over layers of the latest measurement in the epoch, and its step.
EPOCH_KEYS = (*SUMMARY_KEYS, *BELOW_KEYS, "bn/step")


class BatchNormStatistics(keras.callbacks.Callback):
    """At step 0, on a schedule (callbacks/schedule.py) and at the end of training, compares each BN layer's batch and
    moving statistics with its population statistics at the current weights.

    BN normalizes with the statistics of the current batch in training and with moving averages at inference;
    both differ from the population statistics of the layer's input at the current weights, for two reasons
    (Wu and Johnson 2021, "Rethinking 'Batch' in BatchNorm", sec. 3-4): batch statistics scatter around them
    because B examples are a sample (this grows as the batch shrinks, as 1 / sqrt(B)), and moving averages lag
    behind the weights (this grows with the learning rate and the BN momentum; precise BN removes it).

    Population statistics: those precise BN (callbacks/precise_bn.py) would set, over a fixed sample of
    `population_samples` examples taken once from `population` (default: `dataset`) at the start. They are
    computed by one training-mode pass over the whole sample as a single batch, which for BatchNormalization
    layers equals precise BN's layer-by-layer inference-mode definition (every upstream layer then normalizes
    with the sample's own statistics of its input, i.e. its population statistics). With
    GhostBatchNormalization upstream layers normalize the sample by virtual batches, as in training. A fresh
    batch from this callback's own pass over `dataset` gives the batch statistics, in training mode as training
    sees it (upstream BN layers normalize with its batch statistics). Both passes are stateless calls: the
    model's moving statistics, weights and seeds are not changed.

    For a layer with C channels, batch statistics mu_B, var_B (biased, as BN uses them), moving statistics mu_M,
    var_M and population statistics mu_P, var_P over N examples, with per-channel standard errors se(mu_P),
    se(var_P) of the population statistics from the scatter of the per-example means and second moments:

        batch_mean_error  = sqrt(mean_c [(mu_B,c - mu_P,c)^2 - se(mu_P,c)^2] / (var_P,c + eps))
        batch_var_error   = sqrt(mean_c [(var_B,c - var_P,c)^2 - se(var_P,c)^2] / (var_P,c + eps)^2)
        moving_mean_error, moving_var_error: the same with mu_M, var_M in place of mu_B, var_B

    (clipped at 0 under the root, see Resolution). These are root-mean-square shifts of the normalization in
    population standard deviations and relative changes of its squared scale. Subtracting se^2 removes the population sample's own
    noise, E (mu_B - mu_P)^2 = E (mu_B - mu)^2 + se(mu_P)^2 for independent samples, so that batch_*_error
    estimates the batch's error alone and falls as B^-0.5 also when B approaches N.

    Resolution: an error is reported only when it exceeds the population sample's resolution
    r = sqrt(mean_c se^2 / units) (same units as the error: the RMS standard error of the population statistic), i.e.
    when the squared deviation is more than twice the sample's own noise; otherwise it is "< r" (None in the
    tables, "<error>_resolution" = r beside it, `bn/<error>_below` = r in the logs), never 0. r falls as
    N^-0.5, and a measurement costs a forward pass over the N examples. On the digits the moving statistics' error
    at the end of training is below the resolution of the whole training split (1280 examples: r = 0.008 for the
    mean, 0.016 for the variance, after 4 epochs of the default run), so no sample resolves it there and the
    default stays at 256 examples, which resolve the batch statistics' error. The averages over layers compare the
    mean error with the mean resolution. For GhostBatchNormalization
    the batch statistics are those of each virtual batch, the squares averaged over virtual batches. Drift since
    the previous measurement (the start of training for the first one) is the RMS change per channel of the moving
    statistics: ||mu_t - mu_prev|| / sqrt(C), same for var.

    Writes scalars `bn/<layer>/<quantity>` for every quantity of QUANTITIES, histograms `bn/<layer>/moving_mean` and
    `bn/<layer>/moving_variance`, and the averages over layers SUMMARY_KEYS (`bn/batch_var_error`, ...; also put
    into the batch logs) to TensorBoard; at the end of each fit() call (of training; of each phase of a batch
    schedule), after a last measurement at its last step unless one was taken there, `bn_stats.json` (every
    measurement per layer, and the averages over layers per measurement) and `bn_stats.md` (a per-layer table).
    Step 0 (before the first update of a run, not again when it resumes) shows the starting point of the drift
    and compiles the measuring function up front. Steps are batches trained (callbacks/steps.py); `get_state` and
    `set_state` carry the measurements over a resume.

    Args:
        dataset: a function of the step giving a tf.data.Dataset of training batches, (x, y), (x, y, sample_weight)
            or x, whose first batch is measured at that step (a resumed run then measures on the batches of an
            uninterrupted one); or one such dataset, read by one iterator that a resume does not restore.
        every_n_steps: training steps between measurements, or None (default): the geometric schedule.
        log_dir: TensorBoard directory, or None for none.
        out_dir: directory for bn_stats.json and bn_stats.md, or None for none.
        population: batches of examples for the population statistics (see precise_bn), e.g. the un-augmented
            training split; default `dataset`.
        population_samples: examples in the fixed population sample (all of `population` if it has fewer). A
            measurement runs the model over them once in training mode.

    Attributes:
        history: {layer name: [measurement dict with "step", QUANTITIES and "<error>_resolution" for ERRORS]}.
        averages: [{"step", each of ERRORS averaged over layers (or None) and its resolution}], one per
            measurement.
        estimates: [{each of ERRORS averaged over layers, below the resolution too}], one per measurement: the
            noise-subtracted estimates themselves (clipped at 0), for fits over many measurements; not reported.
    """

    def __init__(self, dataset, every_n_steps: int | None = None, log_dir: str | None = None,
                 out_dir: str | None = None, population=None, population_samples: int = 256):
        super().__init__()
        self.schedule = schedule_lib.build(every_n_steps)
        self._steps = Steps(None)
        if check_positive_int("population_samples", population_samples) < 2:
            raise ValueError(f"population_samples: must be at least 2, got {population_samples!r}")
        self.dataset = dataset
        self.every_n_steps = None if every_n_steps is None else int(every_n_steps)
        self.log_dir = log_dir
        self.out_dir = out_dir
        self.population = population if population is not None else dataset(0) if callable(dataset) else dataset
        self.population_samples = int(population_samples)
        self.history: dict[str, list[dict]] = {}
        self.averages: list[dict] = []
        self.estimates: list[dict] = []
        self._layers: list = []
        self._compiled_for = None
        self._epoch_summary = None
        self._previous = self._last_measured = self._writer = self._batches = None

    def on_train_begin(self, logs=None):
        pairs = batch_norm_inputs(self.model)
        self._layers = [layer for layer, _ in pairs]
        if not pairs:
            logger.warning("BatchNormStatistics: model '%s' has no BatchNormalization layer; nothing to measure.",
                           self.model.name)
            return
        if self._compiled_for is not self.model:  # one trace per model, not per fit()
            self._compiled_for = self.model
            # Where each layer's channels start in the concatenated moving statistics, and how many there are.
            self._channels = np.array([int(layer.moving_mean.shape[0]) for layer in self._layers])
            self._starts = np.cumsum(self._channels) - self._channels
            if not callable(self.dataset):
                self._batches = iter(self.dataset.repeat())
            sample = take_inputs(self.population, self.population_samples)
            self._sample = tf.nest.map_structure(lambda *parts: tf.concat(parts, axis=0), *sample)
            specs = tf.nest.map_structure(lambda t: tf.TensorSpec([None, *t.shape[1:]], t.dtype), self._sample)
            # One trace per architecture in a process (callbacks/shared_traces.py): a sweep's runs share it.
            self._measure_function = shared_traces.shared(self.model, f"bn_statistics {specs}",
                                                          lambda template: _measure_function(template, specs))
            if self._previous is None:  # else restored by set_state
                self._previous = self._moving()
            self.history = {layer.name: self.history.get(layer.name, []) for layer in self._layers}
            self._writer = EventWriter(self.log_dir) if self.log_dir else None

    def get_state(self) -> dict:
        """What a resumed run needs to go on as if uninterrupted: the step, the measurements, the moving statistics
        of the last one (the next drift is measured from them)."""
        previous = None if self._previous is None else [values.tolist() for values in self._previous]
        return {"step": self._steps.step, "history": self.history, "averages": self.averages,
                "estimates": self.estimates, "previous": previous, "last_measured": self._last_measured}

    def set_state(self, state: dict) -> list[str]:
        """Restores `get_state`'s state before training resumes.

        Returns:
            What could not be restored, one line each.
        """
        self._steps.set_step(state["step"])
        self.history = {name: [dict(row) for row in rows] for name, rows in state["history"].items()}
        self.averages = [dict(row) for row in state["averages"]]
        self.estimates = [dict(row) for row in state["estimates"]]
        self._previous = None if state["previous"] is None else tuple(np.asarray(v, np.float64)
                                                                     for v in state["previous"])
        self._last_measured = state["last_measured"]
        if callable(self.dataset):
            return []
        return ["BatchNormStatistics: its dataset is one object, whose iterator is not restored; the measurements "
                "after the resume use other batches than an uninterrupted run's"]

    def on_epoch_begin(self, epoch, logs=None):
        self._steps.epoch_begin((self.params or {}).get("steps"))
        self._epoch_summary = None  # the latest measurement of this epoch, for the epoch logs

    def on_epoch_end(self, epoch, logs=None):
        """The epoch logs get the latest measurement of this epoch with its step ("bn/step"), or NaN in each key
        when the epoch made none (stable columns for CSVLogger; callbacks.epoch_logs.DropUnmeasured hides them)."""
        if logs is None or not self._layers:
            return
        summary = self._epoch_summary or {}
        for key in EPOCH_KEYS:
            logs[key] = float(summary.get(key, math.nan))

    def on_train_batch_begin(self, batch, logs=None):
        if self._layers and self._steps.step == 0 and self._last_measured is None:
            self.measure()

    def _moving(self) -> tuple[np.ndarray, np.ndarray]:
        """Every layer's moving mean and variance, concatenated, in float64."""
        return tuple(np.concatenate([np.asarray(getattr(layer, name).numpy(), np.float64) for layer in self._layers])
                     for name in ("moving_mean", "moving_variance"))

    def on_train_batch_end(self, batch, logs=None):
        if not self._layers:
            return
        if schedule_lib.crossed(self.schedule, self._steps, batch):
            summary = self.measure()
            if logs is not None:
                logs.update(summary)

    @timed
    def measure(self) -> dict[str, float]:
        """Takes one measurement on the next batch; returns the averages over layers, keyed as in the logs."""
        step = self._steps.step
        element = next(iter(self.dataset(step)) if callable(self.dataset) else self._batches)
        x = element[0] if isinstance(element, (tuple, list)) else element
        outputs = timing.call(self, self._measure_function, x, self._sample, *shared_traces.weights(self.model))
        values, mean, variance = (t.numpy() for t in outputs)
        mean, variance = mean.astype(np.float64), variance.astype(np.float64)
        # Drift: RMS change per channel since the previous measurement, per layer.
        drifts = [np.sqrt(np.add.reduceat(np.square(now - before), self._starts) / self._channels)
                  for now, before in zip((mean, variance), self._previous)]
        self._previous = mean, variance
        rows = {}
        for i, layer in enumerate(self._layers):
            rows[layer.name] = row = {"step": step}
            row.update(resolved(values[i, :4], values[i, 10:14]))
            row.update(moving_mean_drift=float(drifts[0][i]), moving_variance_drift=float(drifts[1][i]))
            row.update(zip(QUANTITIES[6:], values[i, 4:10].astype(float).tolist()))
            self.history[layer.name].append(row)
        # Over layers: the mean estimate against the mean resolution.
        average = resolved(values[:, :4].mean(axis=0), values[:, 10:14].mean(axis=0))
        self.averages.append({"step": step} | average)
        self.estimates.append(dict(zip(ERRORS, values[:, :4].mean(axis=0).astype(float).tolist())))
        summary = {f"bn/{key}": average[key] for key in ERRORS if average[key] is not None}
        summary.update({f"bn/{key}_below": average[f"{key}_resolution"] for key in ERRORS if average[key] is None})
        if self._writer is not None:
            self._summaries(step, rows, summary, np.split(mean, self._starts[1:]),
                            np.split(variance, self._starts[1:]))
        self._last_measured = step
        self._epoch_summary = {**summary, "bn/step": step}
        return summary

    def _summaries(self, step, rows, summary, means, variances):
        """Writes a measurement's ~10 scalars and 2 histograms per layer as one event (callbacks.events)."""
        scalars = list(summary.items())
        histograms = []
        for layer, mean, variance in zip(self._layers, means, variances):
            scalars += [(f"bn/{layer.name}/{key}", rows[layer.name][key]) for key in QUANTITIES
                        if rows[layer.name][key] is not None]
            histograms += [(f"bn/{layer.name}/moving_mean", mean), (f"bn/{layer.name}/moving_variance", variance)]
        self._writer.write(step, scalars, histograms)

    def on_train_end(self, logs=None):
        if not self._layers:
            return
        if self._last_measured != self._steps.step:
            self.measure()  # so that the tables describe the statistics the run ends with
        if self._writer is not None:
            self._writer.flush()  # not closed: a batch schedule runs one fit per phase with this callback
        if self.out_dir:
            os.makedirs(self.out_dir, exist_ok=True)
            write_atomic(os.path.join(self.out_dir, "bn_stats.json"), json.dumps(self.table(), indent=1))
            write_atomic(os.path.join(self.out_dir, "bn_stats.md"), self.markdown())

    def table(self) -> dict:
        """Per layer: channels, every measurement, the final one and the run's average errors (over the measurements
        that resolved them)."""
        layers = {}
        for layer in self._layers:
            rows = self.history[layer.name]
            layers[layer.name] = {
                "channels": int(layer.moving_mean.shape[0]),
                "virtual_batch_size": getattr(layer, "virtual_batch_size", None),
                "final": rows[-1],
                # Over the measurements that resolved the error (None if none did).
                "run_mean": bn_tables.run_mean(rows),
                "measurements": rows,
            }
        return {"every_n_steps": self.every_n_steps, "population_samples": int(tf.nest.flatten(self._sample)[0].shape[0]),
                "averages": self.averages, "layers": layers}

    def markdown(self) -> str:
        """The per-layer table of bn_stats.md (callbacks/bn_tables.py)."""
        return bn_tables.markdown(self.table(), self._steps.step, self.schedule)


def _measure_function(template: keras.Model, specs):
    """The compiled (batch x, population sample, trainable, non-trainable weights of the template) -> per layer
    [batch mean/var error, moving mean/var error, moving mean avg/min/max, moving variance avg/min/max, the four
    resolutions], and every layer's moving mean and variance, concatenated (one call: few ops, one transfer)."""
    pairs = batch_norm_inputs(template)
    layers = [layer for layer, _ in pairs]
    side = side_model(template, [tensor for _, tensor in pairs])
    weight_specs = shared_traces.weight_specs(template)

    @tf.function(input_signature=[specs, *weight_specs], autograph=False)
    def inputs(x, trainable, non_trainable):
        """The BN layers' inputs in training mode, traced once for any number of examples and called twice below
        (the batch and the population sample), so that the model is traced once, not twice. The updated moving
        statistics that a training call assigns stay in the StatelessScope and are dropped."""
        with keras.StatelessScope(state_mapping=shared_traces.template_mapping(template, trainable, non_trainable)):
            return side(x, training=True)

    # No autograph: the loop over layers is Python, unrolled once at tracing (autograph spent seconds on it). Any
    # number of examples in the batch and the sample: one trace for every training batch size.
    @tf.function(input_signature=[specs, specs, *weight_specs], autograph=False)
    def measure(x, sample, trainable, non_trainable):
        outputs, population = inputs(x, trainable, non_trainable), inputs(sample, trainable, non_trainable)
        rows, means, variances = [], [], []
        # The template's moving statistics read as the given weights' in this scope.
        with keras.StatelessScope(state_mapping=shared_traces.template_mapping(template, trainable, non_trainable)):
            for output, whole, layer in zip(tf.nest.flatten(outputs), tf.nest.flatten(population), layers):
                batch_mean, batch_variance = group_moments(output, layer.axis,
                                                           getattr(layer, "virtual_batch_size", None))
                mean, variance, mean_se2, variance_se2 = population_moments(whole, layer.axis)
                moving_mean = tf.cast(layer.moving_mean.value, tf.float32)
                moving_variance = tf.cast(layer.moving_variance.value, tf.float32)
                scale = variance + layer.epsilon

                def error(deviation_sq, noise_sq, units):
                    return tf.sqrt(tf.maximum(tf.reduce_mean((deviation_sq - noise_sq) / units), 0.0))

                def resolution(noise_sq, units):
                    return tf.sqrt(tf.reduce_mean(noise_sq / units))

                rows.append(tf.stack([
                    error(tf.reduce_mean(tf.square(batch_mean - mean), 0), mean_se2, scale),
                    error(tf.reduce_mean(tf.square(batch_variance - variance), 0), variance_se2, tf.square(scale)),
                    error(tf.square(moving_mean - mean), mean_se2, scale),
                    error(tf.square(moving_variance - variance), variance_se2, tf.square(scale)),
                    tf.reduce_mean(moving_mean), tf.reduce_min(moving_mean), tf.reduce_max(moving_mean),
                    tf.reduce_mean(moving_variance), tf.reduce_min(moving_variance), tf.reduce_max(moving_variance),
                    resolution(mean_se2, scale), resolution(variance_se2, tf.square(scale)),
                    resolution(mean_se2, scale), resolution(variance_se2, tf.square(scale)),
                ]))
                means.append(moving_mean)
                variances.append(moving_variance)
        return tf.stack(rows), tf.concat(means, 0), tf.concat(variances, 0)

    return measure
