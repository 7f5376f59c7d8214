"""Curvature of the loss during fit: the Hessian's top eigenvalue and trace, and the stability ratio of the step.

At step 0, every N steps and at the end of training, the callback measures the Hessian H of the model's compiled loss
on a fixed set of K examples (the first K of the data it is given, the same examples every time; pass them
un-augmented), with the model in INFERENCE mode: BatchNormalization normalizes with its moving statistics and
dropout is off, so the measured loss is one deterministic function of the weights (callbacks/hessian.py gives the
Hessian-vector products and the estimators, with their formulas and papers):

- lambda_max, the largest eigenvalue of H ("sharpness", Keskar et al. 2017; Cohen et al. 2021), by Lanczos on
  Hessian-vector products to a relative tolerance (default 1e-2: the Ritz residual, which bounds the distance to an
  eigenvalue, is at most 1e-2 lambda_max), with the number of products used (Yao et al. 2020, "PyHessian");
- tr(H), the sum of all curvatures (Yao et al. 2020 report it beside lambda_max), by Hutchinson's estimator
  (Hutchinson 1990) with Rademacher probes, deflated by the Lanczos vectors of lambda_max (their part of the trace
  is exact; the probes estimate the rest), with a 95% interval: probes in blocks of TRACE_BLOCK until the interval
  is within TRACE_TOLERANCE of the estimate, at most trace_probes (the trace's probes are most of a measurement's
  products; benchmarks/curvature_cost.py);
- the stability ratio  lambda_max * lr / (2 (1 + beta))  for SGD with learning rate lr and heavy-ball momentum beta:
  gradient descent on a quadratic with curvature lambda_max diverges when lambda_max > 2 (1 + beta) / lr, and full-
  batch training rises to that threshold and hovers there, "at the edge of stability" (Cohen et al. 2021, ICLR,
  sec. 3 and appendix for momentum), so a ratio near 1 means training sits at the edge. lr is the optimizer's
  current learning rate, beta its momentum (`momentum` overrides it). For optimizers other than SGD the ratio is
  NaN unless `momentum` is given: Adam's threshold applies to the preconditioned Hessian (Cohen et al. 2022), which
  this callback does not measure. Nesterov momentum has a different threshold in Cohen et al.; this ratio uses the
  heavy-ball one. Decoupled weight decay is not part of the loss and not in H.

Caveats. Sharpness is not invariant to reparametrization (Dinh et al. 2017, "Sharp Minima Can Generalize for
Deep Nets"): the weights before a BatchNormalization layer are scale-invariant, so scaling them by c leaves the
function unchanged and divides their curvature by c^2; weight decay and the learning rate move that scale, so
compare sharpness only between runs of the same architecture and weight decay, and read it beside the generalization
gap, not as a proxy of it. The K examples are a sample: lambda_max and tr(H) are those of the loss on them, not of
the whole training loss.

Side effects: none on training. The examples are taken once, at construction (from a dataset: one iteration of
the first batches of the object given; iterators of one tf.data object share its shuffle seed generator, so pass an
object of its own, not the one given to fit). The products run in a keras.StatelessScope, which discards BN moving
statistics, seed states and metric updates; the optimizer is never called. The probes and start vectors come from
NumPy generators seeded with (seed, measurement number), so a measurement does not depend on anything else.

Another callback may ask for a measurement at the current step with `measure_at_target()` (the pipeline's target
check does, at the step the run first reaches its target accuracy): the record gets "at_target": true, and a
measurement already made at that step is marked instead of repeated.

Outputs: batch logs of the measured step and epoch logs (NaN in an epoch without a measurement) get LOG_KEYS;
`out_path` gets one JSON line per measurement (RECORD_KEYS, non-finite values as null); `log_dir` gets TensorBoard
scalars of LOG_KEYS under log_dir/curvature at the training step. Steps are batches trained (callbacks/steps.py);
get_state()/set_state() carry the step and the records across a resume (pipeline/training/checkpoint.py commits them with
the weights).
"""

from __future__ import annotations

import json
import math
import os
import time

import keras
import numpy as np
import tensorflow as tf

from callbacks import hessian
from callbacks.checked_io import check_positive_int, finite_or_none, write_atomic
from callbacks.events import EventWriter
from callbacks.steps import Steps
from callbacks.timing import timed

LOG_KEYS = ("curvature/max_eigenvalue", "curvature/trace", "curvature/trace_lo", "curvature/trace_hi",
            "curvature/stability_ratio")
RECORD_KEYS = ("step", "epoch", "examples", "at_target", *LOG_KEYS, "curvature/max_eigenvalue_residual",
               "curvature/max_eigenvalue_converged", "curvature/trace_se", "curvature/trace_probes",
               "curvature/learning_rate", "curvature/momentum", "curvature/hessian_vector_products",
               "curvature/seconds")
# Defaults of a measurement's precision, and what they cost (benchmarks/curvature_cost.py, docs/instruments.md):
# the Ritz residual bounds the distance of lambda_max to an eigenvalue of H, so 1e-2 places it within 1% of one
# (the top Ritz value's own error is about residual^2 / gap, far smaller); the trace stops at the first block of
# TRACE_BLOCK probes whose 95% interval is within TRACE_TOLERANCE of the estimate, at most trace_probes. Blocks of
# 8 keep the sequential rule's coverage at or above 90% only with deflation (tests/callbacks/test_curvature.py).
TOLERANCE, TRACE_TOLERANCE, TRACE_BLOCK = 1e-2, 0.25, 8


class Curvature(keras.callbacks.Callback):
    """Measures lambda_max, tr(H) and the stability ratio of the module docstring during fit.

    Put it before CSVLogger and TensorBoard so that they see the keys it adds to the epoch logs.
    """

    def __init__(self, x, y=None, every_n_steps=None, *, examples=512, batch_size=256, tolerance=TOLERANCE,
                 max_products=100, trace_probes=32, trace_tolerance=TRACE_TOLERANCE, trace_block=TRACE_BLOCK,
                 deflate=True, at_train_begin=True, at_train_end=True, momentum=None, seed=0, log_dir=None,
                 out_path=None):
        """Creates the callback.

        Args:
            x: inputs (NumPy array, first axis examples), or a tf.data.Dataset of (x, y) batches (then y is None).
            y: targets as the compiled loss takes them, for array x.
            every_n_steps: training steps between measurements; None measures only at step 0 and at the end.
            examples: K, the first K examples of x are the fixed evaluation set (fewer if x has fewer).
            batch_size: most examples per chunk of a Hessian-vector product.
            tolerance: relative tolerance of lambda_max (Ritz residual / lambda_max), in (0, 1).
            max_products: most Hessian-vector products for lambda_max; it is reported unconverged after them.
            trace_probes: most Rademacher probes of the trace estimate, >= 2 (each one product).
            trace_tolerance: stop adding probes (in blocks of TRACE_BLOCK) once the trace's 95% interval is within
                this fraction of the estimate on either side; None always draws trace_probes.
            trace_block: probes per block of that rule, >= 2.
            deflate: deflate the trace's probes by lambda_max's Lanczos vectors (module docstring); False gives
                plain Hutchinson.
            at_train_begin: measure at step 0.
            at_train_end: also measure at the end of training (if the last step was not measured).
            momentum: the beta of the stability ratio; None reads it from an SGD optimizer.
            seed: seed of the start vectors and probes.
            log_dir: TensorBoard directory (events go to log_dir/curvature), or None.
            out_path: JSON-lines file, one record per measurement, or None.
        """
        super().__init__()
        check_positive_int("Curvature examples", examples)
        check_positive_int("Curvature batch_size", batch_size)
        check_positive_int("Curvature max_products", max_products)
        check_positive_int("Curvature trace_probes", trace_probes)
        check_positive_int("Curvature trace_block", trace_block)
        if trace_block < 2:
            raise ValueError(f"Curvature trace_block: needs at least 2 probes per block, got {trace_block}")
        if trace_probes < 2:
            raise ValueError(f"Curvature trace_probes: needs at least 2 probes for an interval, got {trace_probes}")
        if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0.0 < tolerance < 1.0:
            raise ValueError(f"Curvature tolerance: must be a relative tolerance in (0, 1), got {tolerance!r}")
        if momentum is not None and not (isinstance(momentum, (int, float)) and 0.0 <= momentum < 1.0):
            raise ValueError(f"Curvature momentum: must be in [0, 1) or None, got {momentum!r}")
        if trace_tolerance is not None and not (isinstance(trace_tolerance, (int, float))
                                                and not isinstance(trace_tolerance, bool) and trace_tolerance > 0):
            raise ValueError(f"Curvature trace_tolerance: must be a relative half-width > 0 or None, got "
                             f"{trace_tolerance!r}")
        self._steps = Steps(every_n_steps, name="Curvature every_n_steps")
        self.x, self.y = _first_examples(x, y, examples)
        self.every_n_steps, self.batch_size, self.tolerance = every_n_steps, batch_size, float(tolerance)
        self.max_products, self.trace_probes, self.at_train_end = max_products, trace_probes, at_train_end
        self.trace_tolerance, self.at_train_begin = trace_tolerance, at_train_begin
        self.trace_block, self.deflate = trace_block, bool(deflate)
        self.momentum, self.seed, self.log_dir, self.out_path = momentum, seed, log_dir, out_path
        self.history = []  # one record per measurement, as written to out_path
        self._products = self._writer = None
        self._epoch, self._measured_this_epoch = 0, False

    # Resume.

    def get_state(self) -> dict:
        """The step and the records so far, JSON-serializable; set_state() of a new instance continues from them."""
        return {"step": self._steps.step, "epoch": self._epoch, "history": finite_or_none(self.history)}

    def set_state(self, state: dict) -> list[str]:
        """Continues from get_state()'s step and records, and rewrites out_path to hold exactly them (a resumed run
        trains again from its checkpoint, so later records of the interrupted run would be measured again).

        Returns:
            What could not be restored, one line each (nothing here).
        """
        self._steps.set_step(state["step"])
        self._epoch = state["epoch"]
        self.history = [{k: math.nan if v is None else v for k, v in record.items()} for record in state["history"]]
        self._rewrite()
        return []

    # Keras hooks.

    def on_train_begin(self, logs=None):
        if self._products is None or self._products.model is not self.model:
            self._products = hessian.HessianVectorProducts(self.model, self.x, self.y, self.batch_size, timer=self)
        if self.log_dir and self._writer is None:
            self._writer = EventWriter(os.path.join(self.log_dir, "curvature"))

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch, self._measured_this_epoch = epoch, False
        self._steps.epoch_begin((self.params or {}).get("steps"))

    def on_train_batch_begin(self, batch, logs=None):
        if self.at_train_begin and self._steps.step == 0 and not self.history:
            self.measure()

    def on_train_batch_end(self, batch, logs=None):
        if self._steps.batch_end(batch):
            self.measure()
            if logs is not None:
                logs.update(self._latest())

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            latest = self._latest() if self._measured_this_epoch else {}
            logs.update({key: latest.get(key, math.nan) for key in LOG_KEYS})

    def on_train_end(self, logs=None):
        if self.at_train_end and (not self.history or self.history[-1]["step"] < self._steps.step):
            self.measure()
        if self._writer:
            self._writer.flush()

    # Measurement.

    @timed
    def measure(self, at_target: bool = False) -> dict:
        """Measures at the current weights and step, records it everywhere, and returns the record."""
        started = time.perf_counter()
        products = self._products
        generator = np.random.default_rng([self.seed, len(self.history)])
        first = products.products
        top = hessian.top_eigenvalue(products, products.dimension, generator, self.tolerance, self.max_products)
        trace = hessian.hutchinson_trace(products, products.dimension, generator, self.trace_probes,
                                         relative_half_width=self.trace_tolerance, min_probes=self.trace_block,
                                         deflation=(top["basis"], top["restricted_trace"]) if self.deflate else None)
        learning_rate, momentum = self._step_settings()
        ratio = top["value"] * learning_rate / (2.0 * (1.0 + momentum)) if momentum is not None else math.nan
        record = {
            "step": self._steps.step, "epoch": self._epoch, "examples": len(self.y), "at_target": at_target,
            "curvature/max_eigenvalue": top["value"], "curvature/trace": trace["value"],
            "curvature/trace_lo": trace["lo"], "curvature/trace_hi": trace["hi"],
            "curvature/stability_ratio": ratio, "curvature/max_eigenvalue_residual": top["residual"],
            "curvature/max_eigenvalue_converged": top["converged"], "curvature/trace_se": trace["se"],
            "curvature/trace_probes": trace["probes"], "curvature/learning_rate": learning_rate,
            "curvature/momentum": math.nan if momentum is None else momentum,
            "curvature/hessian_vector_products": products.products - first,
            "curvature/seconds": time.perf_counter() - started,
        }
        self.history.append(record)
        self._measured_this_epoch = True
        if self.out_path:
            with open(self.out_path, "a") as f:
                f.write(json.dumps(finite_or_none(record)) + "\n")
        if self._writer:
            scalars = [(key, value) for key, value in self._latest().items() if math.isfinite(value)]
            self._writer.write(record["step"], scalars)
        return record

    def measure_at_target(self) -> dict:
        """Measures at the current step (or marks this step's measurement) as the one where the target was reached."""
        if self.history and self.history[-1]["step"] == self._steps.step:
            record = self.history[-1]
            record["at_target"] = True
            self._rewrite()  # the last line is this record: the file gets it marked
            return record
        return self.measure(at_target=True)

    def _rewrite(self) -> None:
        """out_path holding exactly the records in memory, replaced atomically."""
        if self.out_path:
            write_atomic(self.out_path, "".join(json.dumps(finite_or_none(r)) + "\n" for r in self.history))

    def _latest(self) -> dict:
        return {key: float(self.history[-1][key]) for key in LOG_KEYS}

    def _step_settings(self):
        """The optimizer's current learning rate, and the momentum of the ratio (None: not SGD and not given)."""
        optimizer = getattr(self.model, "optimizer", None)
        while hasattr(optimizer, "inner_optimizer"):  # LossScaleOptimizer
            optimizer = optimizer.inner_optimizer
        if optimizer is None:
            return math.nan, self.momentum
        learning_rate = float(np.asarray(optimizer.learning_rate))
        if self.momentum is not None:
            return learning_rate, float(self.momentum)
        if isinstance(optimizer, keras.optimizers.SGD):
            return learning_rate, float(optimizer.momentum)
        return learning_rate, None


def _first_examples(x, y, examples: int):
    """The first `examples` (x, y) of arrays or of a dataset of (x, y) batches, as NumPy arrays."""
    if isinstance(x, tf.data.Dataset):
        if y is not None:
            raise ValueError("Curvature y: must be None when x is a tf.data.Dataset of (x, y) batches")
        xs, ys, count = [], [], 0
        for element in x:
            if not isinstance(element, tuple) or len(element) < 2:
                raise ValueError("Curvature x: the dataset must yield (x, y) batches")
            xs.append(np.asarray(element[0]))
            ys.append(np.asarray(element[1]))
            count += len(xs[-1])
            if count >= examples:
                break
        if not xs:
            raise ValueError("Curvature x: the dataset is empty")
        x, y = np.concatenate(xs), np.concatenate(ys)
    if y is None:
        raise ValueError("Curvature y: targets are needed with array x")
    x, y = np.asarray(x), np.asarray(y)
    if len(x) == 0 or len(x) != len(y):
        raise ValueError(f"Curvature x, y: need the same number (> 0) of examples, got {len(x)} and {len(y)}")
    return x[:examples], y[:examples]
