"""Gradient noise scale from the replicas of data-parallel training, at every step, without extra forward passes.

With R >= 2 replicas every training step computes R gradients over b = B / R examples and their all-reduced mean
over B; callbacks/replica_norms.py's training step reports their squared norms, and noise_estimates'
two_batch_estimates turns each step's pair into tr(Sigma) and |G|^2 at that step's weights (McCandlish et al. 2018,
app. A.1, as AdaptDL does; unbiased for the examples the step's batch is drawn from, see below). On one device,
callbacks/gradient_stats.py measures on fresh batches instead.

Records: every `every_n_steps` = K steps (the pipeline's automatic interval: 100, at most a quarter of an epoch), the
mean of the per-step estimates t_k, n_k of tr(Sigma) and |G|^2 since the previous record is one measurement, in the
record format of gradient_stats' docstring (grad_stats.jsonl, batch and epoch logs, TensorBoard), with "source":
"replicas", "replicas": R, "micro_batch_size": b, "micro_batches": R K (the replica slices used), "steps_pooled": K,
"degrees_of_freedom": V - 1, and no per-variable values (only totals are all-reduced). With w = `window` (default
REPLICA_WINDOW = 0.2), at step s:

    record      mean of t_k, n_k over the K steps s - K < k <= s      (noise_estimates.step_means)
    its s.e.^2  sample (co)variance of t_k, n_k over the V steps k >= min(s - K + 1, ceil((1 - w) s)), / K
    _smoothed   mean of t_k, n_k over the W steps k >= ceil((1 - w) s) (the last w of the steps so far, at least
                2 steps), s.e.^2 their sample (co)variance / W; "smoothed_first_step" is the first of those
                steps and "smoothed_measurements" = W

The scatter is taken over the window rather than the record's K steps alone because late in training the per-step
estimates are heavy-tailed: tr(Sigma) comes mostly from a few hard examples, which most steps' batches miss, so K = 10
values often scatter far less than the steps do. On the run below, 10-step records with their own scatter held the
truth of their steps in 5 of 8 records over the last 80 steps (tr(Sigma)), with the window's scatter in 8 of 8.

The window is a fraction of the run, as on one device, but 4 times longer (one device: 5%): one step's estimate is
very noisy (with R = 2 its |G|^2 is g_1 . g_2, whose standard deviation is about sqrt(tr(Sigma^2)) / b, far above
|G|^2 once B_simple >> b), so a value needs tens of steps. What a value estimates, measured on the BN-free CNN,
digits, 1293 training examples, batch 32 on 2 replicas, SGD lr 0.05 momentum 0.9 cosine over 400 steps, against
per-example gradients of the whole training split at every step's weights (by hand, with the truth at all 400
steps; tests/test_replica_gradient_stats.py checks the windows at steps 40, 150 and 390):

- It estimates the MEAN of tr(Sigma) and |G|^2 over its steps' weights, not their value at the last step. At this
  learning rate the truth swings within a few steps (steps 143 -> 146: tr(Sigma) 287 -> 74, |G|^2 5.7 -> 0.64; at
  step 150 they were 2.6x and 5.0x below their mean over steps 120-150), so no average over steps can follow it
  step by step: the smoothed values were within 0.71-1.45x of the truth averaged over their windows at steps 40,
  150 and 390, but 0.61-4.2x of the truth at step 150 alone. The intervals cover the estimation noise of that
  mean, not the swing.
- The batches are the training's own, not fresh ones: a step's batch comes from the examples not yet trained on in
  the epoch, drawn by the same order that set the weights, so the estimators are unbiased for what a step can draw
  rather than for the whole split; the one-device measurement on fresh batches has no such effect.

Cost: no extra forward or backward pass; the training step computes the squared norms and does one more all-reduce
of the gradients (benchmarks/replica_gradient_stats.py). Steps are batches trained (callbacks/steps.py); the
gradient of step s is taken at the weights after s - 1 updates.
"""

import bisect
import math

import numpy as np

from callbacks import noise_estimates
from callbacks.noise_records import NoiseRecords
from callbacks.replica_norms import REPLICA_NORM_SQ, STEP_KEYS
from callbacks.timing import timed

# Fraction of the steps so far that the smoothed values pool, and over which a record's scatter is taken (docstring).
REPLICA_WINDOW = 0.2


class ReplicaGradientStatistics(NoiseRecords):
    """Every `every_n_steps` steps, records the gradient noise of the steps since the last record (module docstring).

    The model must be trained with callbacks.replica_norms' training step (`with_replica_norms(model)`) under a
    strategy with `replicas` >= 2 replicas, one step per execution. The per-step values are taken out of the batch
    and epoch logs (later callbacks do not see them); records go where NoiseRecords writes them.
    """

    def __init__(self, replicas, every_n_steps=100, *, batch_size, population=None, window=REPLICA_WINDOW,
                 log_dir=None, out_path=None):
        """Args:
        replicas: R, the replicas of the strategy (over all workers), >= 2.
        every_n_steps: Steps pooled per record, >= 2.
        batch_size: The run's batch size B (after gradient accumulation) for grad/batch_std and grad/snr.
        population: Examples in the training split the batches are drawn from without replacement (the
            finite-population term of noise_estimates), or None.
        window: The smoothed keys pool the records at steps >= (1 - window) * step, and a record's scatter is
            taken over those steps too, in (0, 1].
        log_dir: TensorBoard directory (events go to log_dir/gradients), or None.
        out_path: JSON-lines file, one record per measurement, or None.
        """
        if not isinstance(replicas, int) or replicas < 2:
            raise ValueError(f"replicas: needs at least 2 replicas (one device: GradientStatistics), got {replicas!r}")
        if int(every_n_steps) < 2:
            raise ValueError(f"every_n_steps: a record pools at least 2 steps, got {every_n_steps!r}")
        super().__init__(every_n_steps, batch_size, population=population, window=window, log_dir=log_dir,
                         out_path=out_path)
        self.replicas = replicas
        self._steps_seen, self._traces, self._norms_sq, self._batches = [], [], [], []
        self._record_start = 0  # index in the lists above of the first step since the last record

    def on_train_begin(self, logs=None):
        if int(getattr(self.model, "steps_per_execution", 1) or 1) != 1:
            raise ValueError("model: compile it with steps_per_execution=1; the replica statistics are per step")
        super().on_train_begin(logs)

    def on_train_batch_end(self, batch, logs=None):
        due = self._steps.batch_end(batch)
        if logs is None or REPLICA_NORM_SQ not in logs:
            raise ValueError(f"model: its training step returns no {REPLICA_NORM_SQ!r}; build it with "
                             "callbacks.replica_norms.with_replica_norms(model)")
        small, big, global_batch = (logs.pop(key) for key in STEP_KEYS)
        big_batch = round(global_batch)
        trace, norm_sq = noise_estimates.two_batch_estimates(small, big, big_batch // self.replicas, big_batch,
                                                            self.population)
        if math.isfinite(trace) and math.isfinite(norm_sq):  # a skipped mixed_float16 step has no gradient
            self._steps_seen.append(self._steps.step)
            self._traces.append(float(trace))
            self._norms_sq.append(float(norm_sq))
            self._batches.append(big_batch)
        if due and len(self._traces) - self._record_start >= 2:
            self._measure(self._steps.step)
            logs.update(self._latest)

    def get_state(self) -> dict:
        """NoiseRecords.get_state and the per-step estimates that later records and windows pool."""
        return super().get_state() | {"steps_seen": self._steps_seen, "traces": self._traces,
                                      "norms_sq": self._norms_sq, "batches": self._batches,
                                      "record_start": self._record_start}

    def set_state(self, state: dict) -> list[str]:
        lost = super().set_state(state)
        self._steps_seen, self._traces = list(state["steps_seen"]), list(state["traces"])
        self._norms_sq, self._batches = list(state["norms_sq"]), list(state["batches"])
        self._record_start = state["record_start"]
        return lost

    def on_epoch_end(self, epoch, logs=None):
        for key in STEP_KEYS:  # Keras' epoch logs are the last step's logs when a step returns extra keys
            (logs or {}).pop(key, None)
        super().on_epoch_end(epoch, logs)

    @timed
    def _measure(self, step):
        """The record of the steps since the last one and the smoothed values of the window (module docstring)."""
        steps = len(self._traces) - self._record_start
        # The window's steps, at least 2 of them; a record's scatter is taken over its own steps and these.
        window = min(bisect.bisect_left(self._steps_seen, math.ceil((1 - self.window) * step)), len(self._traces) - 2)
        first = min(self._record_start, window)
        raw = noise_estimates.step_means(self._traces[first:], self._norms_sq[first:], self.batch_size, steps=steps)
        smoothed = noise_estimates.step_means(self._traces[window:], self._norms_sq[window:], self.batch_size)
        smoothed.update(measurements=len(self._traces) - window, first_step=self._steps_seen[window], last_step=step)
        big_batch = int(np.median(self._batches[self._record_start:]))
        fields = {"batch_size": self.batch_size, "micro_batch_size": big_batch // self.replicas,
                  "micro_batches": self.replicas * steps, "population": self.population, "source": "replicas",
                  "replicas": self.replicas, "steps_pooled": steps, "degrees_of_freedom": raw.pop("degrees_of_freedom")}
        # Keep only the steps that a later window can reach: windows only move forward.
        del self._steps_seen[:first], self._traces[:first], self._norms_sq[:first], self._batches[:first]
        self._record_start = len(self._traces)
        self._record(step, raw, fields, smoothed=smoothed)
