"""Step times by batch size: a few timed training steps at each batch of a ladder, up to the memory limit.

`time_ladder` times a handful of training steps at each batch, after warm-up steps that trace the train function
for the new shape, stopping at the first batch that runs out of memory (tf.errors.ResourceExhaustedError, or
MemoryError on the host), which is reported, never raised. The advisor's probe (pipeline/advisor/probe.py) and the
adaptive batch (pipeline/training/adaptive_batch.py) measure with it.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

WARMUP_STEPS = 2  # untimed steps per batch size: the first traces the train step for the new shape
TIMED_STEPS = 16  # timed steps per batch size
# The step time is this quantile of the timed steps: other processes on a shared machine only ever slow steps
# down, in bursts (seen on the 2-core VM: single steps 2-10x the median), so a low quantile is the stable one.
QUANTILE = 0.25


def time_ladder(step_seconds, batches) -> list[dict]:
    """Step times at each batch in ascending order, stopping at the first that runs out of memory.

    Args:
        step_seconds: a function of the batch size returning the seconds of each timed step; it may raise
            tf.errors.ResourceExhaustedError or MemoryError.
        batches: batch sizes, ascending.

    Returns:
        One dict per batch tried: {"batch", "seconds_per_step" (the QUANTILE of the timed steps), "median",
        "spread" ((max - min) / median)} or {"batch", "error"} for the batch that ran out of memory (the last).
    """
    import tensorflow as tf

    rows = []
    for batch in batches:
        try:
            seconds = list(step_seconds(batch))
        except (tf.errors.ResourceExhaustedError, MemoryError) as e:
            message = (getattr(e, "message", "") or str(e) or type(e).__name__).splitlines()[0][:200]
            rows.append({"batch": int(batch), "error": f"out of memory ({type(e).__name__}: {message})"})
            break
        median = statistics.median(seconds)
        rows.append({"batch": int(batch), "seconds_per_step": float(np.quantile(seconds, QUANTILE)),
                     "median": median, "spread": (max(seconds) - min(seconds)) / median})
    return rows


def any_batch(dataset):
    """The dataset with its batch dimension declared unknown, so that Keras traces one train step for all sizes.

    Without this the probe would trace the step once for the base batch and again for the ladder's (a ResNet-20
    step takes seconds to trace on 2 CPU cores).
    """
    import tensorflow as tf

    def relax(*tensors):
        return tuple(tf.compat.v1.placeholder_with_default(t, [None, *t.shape[1:]]) for t in tensors)

    return dataset.map(relax)


def fit_step_seconds(model, batches_of, timed_steps: int = TIMED_STEPS):
    """A step_seconds function for time_ladder: fit's own steps on batches_of(batch), timed between batch ends
    (timed_steps of them after WARMUP_STEPS)."""
    import keras

    class StepTimer(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.ends = []

        def on_train_batch_end(self, batch, logs=None):
            float((logs or {}).get("loss", 0.0))  # waits for the step's result
            self.ends.append(time.perf_counter())

    def step_seconds(batch):
        timer = StepTimer()
        model.fit(batches_of(batch), steps_per_epoch=WARMUP_STEPS + timed_steps, epochs=1, callbacks=[timer],
                  verbose=0, shuffle=False)
        return np.diff(timer.ends[WARMUP_STEPS - 1:]).tolist()

    return step_seconds
