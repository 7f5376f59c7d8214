"""The batch-size advisor's measurements: the noise scale over a short run at the base batch, step times by batch.

Noise: `measure_noise` trains the model for a few hundred steps with callbacks.GradientStatistics measuring
every few steps of the second half, and pools those measurements with callbacks.noise_estimates.pool into
tr(Sigma), |G|^2 and B_simple with 95% intervals (jackknife per measurement, Fieller's interval for the ratio). It says which phase of training that is: the share of the planned run, the training
loss at the start and end, and the validation accuracy against the target. B_simple grows as training goes on
(McCandlish et al. 2018, fig. 6), so a probe's value is a lower estimate for the later critical batch.

Step time: pipeline/training/step_times.py's `time_ladder` at each batch of `ladder`, up to the first batch that
runs out of memory.
"""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np

from pipeline.config import INFERENCE_MIN_BATCH, Config
from pipeline.training.step_times import any_batch, fit_step_seconds, time_ladder

MEASURE_EVERY = 2  # steps between noise measurements in the probe's second half
# Micro-batches of B examples per measurement (8 B examples, about 8 steps' work): over the second half of the
# probe, 4 B examples measured per step trained, which on the digits gave a B_simple interval within 2x.
MICRO_BATCHES = 8
# Automatic probe length: this share of the planned run's steps, within [MIN_STEPS, MAX_STEPS]. The probe should
# cost a small part of one run; on the digits (480 steps in 12 epochs at batch 32) it is 96 steps.
AUTO_FRACTION, MIN_STEPS, MAX_STEPS = 0.2, 40, 300


def measure_noise(model, train_batches, instrument_batches, steps: int, *, batch_size: int, every=MEASURE_EVERY,
                  population=None, out_path=None, log_dir=None) -> dict:
    """Trains `model` for `steps` steps, measuring the gradient noise every `every` steps of the second half.

    Args:
        model: a compiled Keras model (its optimizer's schedule is the planned run's).
        train_batches: an endless tf.data.Dataset of training batches.
        instrument_batches: another dataset object of the same batches with another seed, for the instrument.
        steps: training steps of the probe.
        batch_size: the batch of train_batches.
        every: steps between measurements.
        population: training examples the instrument's batches are drawn from without replacement, or None.
        out_path: grad_stats.jsonl to write, or None.
        log_dir: TensorBoard directory, or None.

    Returns:
        callbacks.noise_estimates.pool()'s dict plus "steps", "loss_start" and "loss_end" (mean training loss of the first and last tenth
        of the steps) and "records" (every measurement).
    """
    import keras

    from callbacks import GradientStatistics, noise_estimates

    losses = []

    class LossRecorder(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            losses.append(float((logs or {}).get("loss", math.nan)))

    stats = GradientStatistics(instrument_batches, every_n_steps=every, batch_size=batch_size,
                               micro_batches=MICRO_BATCHES, population=population, out_path=out_path,
                               log_dir=log_dir, histograms=False)
    recorder = LossRecorder()
    # The instrument's step count (callbacks/steps.py) goes on from the first half's steps, as a resumed run's does;
    # its one line about a dataset object's iterator does not apply (nothing to restore).
    stats.set_state(stats.get_state() | {"step": steps // 2})
    # The first half trains unmeasured; the second half, the phase the advice is for, is measured and pooled.
    # shuffle=False: the datasets are in their own order already (and Keras warns that it ignores shuffle=True).
    model.fit(train_batches, steps_per_epoch=steps // 2, epochs=1, callbacks=[recorder], verbose=0, shuffle=False)
    model.fit(train_batches.skip(steps // 2), steps_per_epoch=steps - steps // 2, epochs=1,
              callbacks=[stats, recorder], verbose=0, shuffle=False)
    tenth = max(1, len(losses) // 10)
    result = noise_estimates.pool(stats.history, first_step=steps // 2)
    if result is None:
        raise ValueError(f"no noise measurement in the probe's second half (steps {steps // 2}-{steps}); "
                         f"probe for at least {2 * every} steps")
    return result | {"steps": steps, "loss_start": float(np.mean(losses[:tenth])),
                     "loss_end": float(np.mean(losses[-tenth:])), "records": stats.history}


def ladder(base_batch: int, max_batch: int, num_train: int) -> list[int]:
    """base_batch / 4, / 2, base_batch, 2 base_batch, ... up to max_batch and the training split's size."""
    batches = [b for b in (base_batch // 4, base_batch // 2) if b >= 1]
    batch = base_batch
    while batch <= min(max_batch, num_train):
        batches.append(batch)
        batch *= 2
    return sorted(set(batches))


def probe(config: Config, steps: int, max_batch: int, out_dir: str) -> dict:
    """Measures the noise scale at config.base_batch and step times up to max_batch (module docstring).

    Args:
        config: the planned run (dataset, model, optimizer, lr at base_batch, epochs, schedule, seed).
        steps: probe steps at base_batch; 0 for AUTO_FRACTION of the planned run's steps.
        max_batch: the largest batch to time.
        out_dir: where grad_stats.jsonl goes.

    The probe trains with the planned run's schedule (config.epochs, warmup, lr at base_batch), so it sees the
    start of that run.

    Returns:
        {"noise": measure_noise()'s dict without records, "phase": {...}, "ladder": time_ladder()'s rows,
         "num_train", "seconds": wall time of the probe}.
    """
    import os

    import keras

    from pipeline.data import loading
    from pipeline.training import execution
    from pipeline.training import fit_loop

    started = time.perf_counter()
    execution.set_threads(config)  # as pipeline.train sets them, so that the step times it measures are the runs' own
    config = dataclasses.replace(config, batch=config.base_batch)
    keras.utils.set_random_seed(config.seed)
    data = loading.load(config)
    model, _ = fit_loop.compiled_model(config, data)
    # Only once the data is accepted, so that a rejected command creates nothing.
    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(os.path.join(out_dir, "grad_stats.jsonl")):
        os.remove(os.path.join(out_dir, "grad_stats.jsonl"))  # a new probe replaces the last one's measurements
    planned = config.epochs * (data.num_train // config.base_batch)
    steps = steps or min(MAX_STEPS, max(MIN_STEPS, round(AUTO_FRACTION * planned)))
    noise = measure_noise(model, any_batch(data.stream(config.base_batch, seed=config.seed)),
                          data.stream(config.base_batch, seed=config.seed + 1), steps,
                          batch_size=config.base_batch, population=data.num_train,
                          out_path=os.path.join(out_dir, "grad_stats.jsonl"))
    noise_seconds = time.perf_counter() - started  # start-up included: loading data, building the model
    _, val_accuracy = model.evaluate(data.eval_dataset("val", max(config.base_batch, INFERENCE_MIN_BATCH)), verbose=0)
    phase = {"steps": steps, "planned_steps": planned, "fraction_of_run": steps / planned,
             "loss_start": noise["loss_start"], "loss_end": noise["loss_end"], "val_accuracy": float(val_accuracy),
             "target_accuracy": config.target_accuracy or None}
    step_seconds = fit_step_seconds(model, lambda batch: any_batch(data.stream(batch, seed=config.seed)))
    rows = time_ladder(step_seconds, ladder(config.base_batch, max_batch, data.num_train))
    noise = {k: v for k, v in noise.items() if k != "records"}
    total = time.perf_counter() - started
    return {"noise": noise, "phase": phase, "ladder": rows, "num_train": data.num_train,
            "seconds": {"total": total, "start_and_noise": noise_seconds, "ladder": total - noise_seconds}}
