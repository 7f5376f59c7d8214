"""Gradient noise scale from the replicas of data-parallel training, at every step, without extra forward passes.

With R >= 2 replicas every training step computes R gradients over b = B / R examples and their all-reduced mean
over B; callbacks/replica_norms.py's training step reports their squared norms, and noise_estimates'
two_batch_estimates turns each step's pair into tr(Sigma) and |G|^2 at that step's weights (McCandlish et al. 2018,
app. A.1, as AdaptDL does; unbiased for the examples the step's batch is drawn from, see below). On one device,
callbacks/gradient_stats.py measures on fresh batches instead.

Records: every `every_n_steps` steps (the pipeline's automatic interval: 100), the mean of the per-step estimates
since the previous record is one measurement (noise_estimates.step_means: intervals from the steps' sample
variance, t with K - 1 degrees of freedom) in the record format of gradient_stats' docstring (grad_stats.jsonl,
batch and epoch logs, TensorBoard), with "source": "replicas", "replicas": R, "micro_batch_size": b,
"micro_batches": R K (the replica slices used), "steps_pooled": K, "degrees_of_freedom": K - 1, and no per-variable
values (only totals are all-reduced). The `_smoothed` keys pool the records of the last `window` fraction of the
steps so far, as on one device; noise_estimates.pool pools any run of records afterwards.

The window is the record's K steps: one step's estimate is very noisy (with R = 2 its |G|^2 is g_1 . g_2, whose
standard deviation is about sqrt(tr(Sigma^2)) / b, far above |G|^2 once B_simple >> b), so a record needs tens of
steps. What a record estimates, and how that differs from the value at its last step (measured on the BN-free CNN,
digits, 431 training examples, batch 32 on 2 replicas, SGD lr 0.05 momentum 0.9, tests/test_replica_gradient_stats.py
against per-example gradients of the whole training split at every step's weights):

- It estimates the MEAN of tr(Sigma) and |G|^2 over the K steps' weights. At this learning rate their value jumps
  by up to an order of magnitude (|G|^2) from one step to the next, and over the windows of 40 steps checked the
  mean of the truth was 2.1-3.7x its value at the window's last step for |G|^2 and 0.8-1.8x for tr(Sigma). The
  intervals cover the estimation noise only, not this drift.
- The batches are the training's own, not fresh ones: a step's batch comes from the examples not yet trained on
  in the epoch, drawn by the same order that set the weights, so the estimators are unbiased for what a step can
  draw rather than for the whole split. In the test |G|^2 came out at 0.57-0.89x of the truth over the window
  (tr(Sigma) 0.91-1.17x); the one-device measurement on fresh batches has no such effect.

Cost: no extra forward or backward pass; the training step computes the squared norms and does one more all-reduce
of the gradients (benchmarks/replica_gradient_stats.py). Steps are counted by the optimizer's iterations; the
gradient of step s is taken at the weights after s - 1 updates.
"""

import math

import numpy as np

from callbacks import noise_estimates
from callbacks.noise_records import WINDOW, NoiseRecords
from callbacks.replica_norms import REPLICA_NORM_SQ, STEP_KEYS
from callbacks.timing import timed


class ReplicaGradientStatistics(NoiseRecords):
    """Every `every_n_steps` steps, records the gradient noise of the steps since the last record (module docstring).

    The model must be trained with callbacks.replica_norms' training step (`with_replica_norms(model)`) under a
    strategy with `replicas` >= 2 replicas, one step per execution. The per-step values are taken out of the batch
    and epoch logs (later callbacks do not see them); records go where NoiseRecords writes them.
    """

    def __init__(self, replicas, every_n_steps=100, *, batch_size, population=None, window=WINDOW,
                 log_dir=None, out_path=None):
        """Args:
        replicas: R, the replicas of the strategy (over all workers), >= 2.
        every_n_steps: Steps pooled per record, >= 2.
        batch_size: The run's batch size B (after gradient accumulation) for grad/batch_std and grad/snr.
        population: Examples in the training split the batches are drawn from without replacement (the
            finite-population term of noise_estimates), or None.
        window: The smoothed keys pool the records at steps >= (1 - window) * step, in (0, 1].
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
        self._traces, self._norms_sq, self._batches = [], [], []

    def on_train_begin(self, logs=None):
        if int(getattr(self.model, "steps_per_execution", 1) or 1) != 1:
            raise ValueError("model: compile it with steps_per_execution=1; the replica statistics are per step")
        super().on_train_begin(logs)

    def on_train_batch_end(self, batch, logs=None):
        due = self._steps.batch_end(self.model, batch)
        if logs is None or REPLICA_NORM_SQ not in logs:
            raise ValueError(f"model: its training step returns no {REPLICA_NORM_SQ!r}; build it with "
                             "callbacks.replica_norms.with_replica_norms(model)")
        small, big, global_batch = (logs.pop(key) for key in STEP_KEYS)
        big_batch = round(global_batch)
        trace, norm_sq = noise_estimates.two_batch_estimates(small, big, big_batch // self.replicas, big_batch,
                                                            self.population)
        if math.isfinite(trace) and math.isfinite(norm_sq):  # a skipped mixed_float16 step has no gradient
            self._traces.append(float(trace))
            self._norms_sq.append(float(norm_sq))
            self._batches.append(big_batch)
        if due and len(self._traces) >= 2:
            self._measure(self._steps.step)
            logs.update(self._latest)

    def on_epoch_end(self, epoch, logs=None):
        for key in STEP_KEYS:  # Keras' epoch logs are the last step's logs when a step returns extra keys
            (logs or {}).pop(key, None)
        super().on_epoch_end(epoch, logs)

    @timed
    def _measure(self, step):
        """The record of the steps since the last one (NoiseRecords._record)."""
        raw = noise_estimates.step_means(self._traces, self._norms_sq, self.batch_size)
        steps = len(self._traces)
        big_batch = int(np.median(self._batches))
        fields = {"batch_size": self.batch_size, "micro_batch_size": big_batch // self.replicas,
                  "micro_batches": self.replicas * steps, "population": self.population, "source": "replicas",
                  "replicas": self.replicas, "steps_pooled": steps, "degrees_of_freedom": raw.pop("degrees_of_freedom")}
        self._traces, self._norms_sq, self._batches = [], [], []
        self._record(step, raw, fields)

