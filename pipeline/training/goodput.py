"""Goodput arithmetic of the batch-size advisor: step-time fit, throughput, statistical efficiency, learning rate.

With phi = B_simple = tr(Sigma) / |G|^2 the simple noise scale measured at the base batch M0 (McCandlish et al.
2018, eq. 2.8, which approximates their critical batch B_crit = E_min / S_min):

    S(B) = S_min (1 + phi / B)        steps to a given loss or accuracy   (McCandlish et al. 2018, sec. 2.2)
    E(B) = E_min (1 + B / phi)        examples to it, E = B S;  (S / S_min - 1)(E / E_min - 1) = 1
    efficiency(B) = (phi + M0) / (phi + B)       progress per example at B relative to M0 (Pollux, Qiao et al.
                                                 OSDI'21, sec. 3.1; AdaptDL goodput.py: gain / scale)
    gain r(B) = (var + sqr) / (var / s + sqr)    AdaScale gain at scale s = B / M0, var = tr(Sigma) / M0 the
                = s (phi + M0) / (phi + B)       gradient variance at M0, sqr = |G|^2 (Johnson et al. 2020)
    T_step(B) = alpha + beta B                   seconds per step: fixed overhead plus time per example (AdaptDL's
                                                 compute model on one device, fitted to the log of measured times)
    throughput(B) = B / T_step(B)                examples per second
    goodput(B) = throughput(B) efficiency(B)     examples per second, each worth one example at M0

efficiency = r / s: a step at B makes the progress of r steps at M0. Time to the target is S(B) T_step(B), so the
speed-up of B over M0 is goodput(B) / goodput(M0) = [(1 + phi / M0) T_step(M0)] / [(1 + phi / B) T_step(B)], which
grows with phi for B > M0: the speed-up's interval is its value at the ends of phi's interval. With the linear
step time, goodput peaks at B* = sqrt(alpha phi / beta) (d log goodput / dB = 0), but the advisor takes the
argmax over candidate batches up to a cap (Pollux), and keeps M0 unless the gain exceeds MIN_GAIN.

Learning rate: lr(B) = lr0 r(B) for SGD (AdaScale), lr0 sqrt(r(B)) for Adam-type optimizers (for which the
square-root rule is the linear rule's counterpart; Malladi et al. 2022, "On the SDEs and Scaling Rules for
Adaptive Gradient Algorithms"). r(B) is the linear rule lr0 B / M0 (Goyal et al. 2017) times (phi + M0) / (phi + B), so it follows the
linear rule (within 2x) up to about B = phi and flattens beyond it, where the linear rule breaks (Shallue et
al. 2018; McCandlish et al. 2018).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

MIN_GAIN = 1.05  # switch away from the base batch only for a predicted goodput gain above 5% (Pollux)
ADAM_TYPES = ("adam", "adamw")


def efficiency(batch, noise_scale: float, base_batch: int):
    """Statistical efficiency (phi + M0) / (phi + B) of batch B relative to M0 (module docstring)."""
    return (noise_scale + base_batch) / (noise_scale + np.asarray(batch, dtype=float))


def adascale_gain(batch, noise_scale: float, base_batch: int):
    """AdaScale gain r = (var + sqr) / (var / s + sqr) at s = B / M0, written with phi = var M0 / sqr."""
    scale = np.asarray(batch, dtype=float) / base_batch
    return scale * efficiency(batch, noise_scale, base_batch)


def learning_rate(batch, noise_scale: float, base_batch: int, base_lr: float, optimizer: str):
    """lr0 r(B) for SGD-type optimizers, lr0 sqrt(r(B)) for Adam-type ones."""
    gain = adascale_gain(batch, noise_scale, base_batch)
    return base_lr * (np.sqrt(gain) if optimizer in ADAM_TYPES else gain)


@dataclasses.dataclass(frozen=True)
class StepTime:
    """T_step(B) = alpha + beta B seconds, fitted to measured step times."""

    alpha: float  # seconds per step that do not grow with the batch (dispatch, optimizer update)
    beta: float  # seconds per example
    rms_log_error: float  # root-mean-square of log(measured / fitted) over the batch sizes: 0.1 is ~10%

    def __call__(self, batch):
        return self.alpha + self.beta * np.asarray(batch, dtype=float)


def fit_step_time(batches, seconds) -> StepTime:
    """Fits T_step(B) = alpha + beta B, alpha, beta >= 0, minimizing the squared error of log T (AdaptDL).

    The log makes every batch size count by its relative error, so the small batches' overhead is fitted as well
    as the large batches' per-example cost.

    Args:
        batches: batch sizes, at least two distinct.
        seconds: the measured seconds per step at each.

    Raises:
        ValueError: fewer than two distinct batch sizes, or a time that is not positive.
    """
    from scipy import optimize

    batches, seconds = np.asarray(batches, dtype=float), np.asarray(seconds, dtype=float)
    if len(np.unique(batches)) < 2:
        raise ValueError(f"fit_step_time needs step times at two or more batch sizes, got {batches.tolist()}")
    if not np.all(np.isfinite(seconds) & (seconds > 0)):
        raise ValueError(f"step times must be positive seconds, got {seconds.tolist()}")

    def residuals(params):
        return np.log(params[0] + params[1] * batches) - np.log(seconds)

    slope, intercept = np.polyfit(batches, seconds, 1)
    start = [max(intercept, 1e-3 * seconds.min()), max(slope, 1e-9)]
    result = optimize.least_squares(residuals, start, bounds=([1e-12, 0.0], [np.inf, np.inf]))
    alpha, beta = result.x
    return StepTime(float(alpha), float(beta), float(np.sqrt(np.mean(residuals(result.x) ** 2))))


def goodput(batch, step_time: StepTime, noise_scale: float, base_batch: int):
    """Examples per second at B times the efficiency of B relative to M0."""
    batch = np.asarray(batch, dtype=float)
    return batch / step_time(batch) * efficiency(batch, noise_scale, base_batch)


def candidates(base_batch: int, cap: int, smallest: int) -> list[int]:
    """Batch sizes on a quarter-octave grid (ratio 2^(1/4)) from `smallest` to `cap`, with both ends and M0."""
    grid = {int(round(smallest * 2 ** (k / 4))) for k in range(int(4 * math.log2(cap / smallest)) + 1)}
    return sorted({b for b in grid if smallest <= b <= cap} | {smallest, cap, base_batch})


def recommend(step_time: StepTime, noise_scale: float, base_batch: int, cap: int, smallest: int) -> dict:
    """The argmax of goodput over candidates(base_batch, cap, smallest), kept at M0 unless it gains > MIN_GAIN.

    Returns:
        {"batch": recommended, "best_batch": argmax, "gain": goodput(best) / goodput(M0), "switched": bool}.
    """
    batches = np.array(candidates(base_batch, cap, smallest))
    values = goodput(batches, step_time, noise_scale, base_batch)
    best = int(batches[int(np.argmax(values))])
    gain = float(values.max() / goodput(base_batch, step_time, noise_scale, base_batch))
    switched = gain > MIN_GAIN
    return {"batch": best if switched else base_batch, "best_batch": best, "gain": gain, "switched": switched}


def speedup(batch: int, step_time: StepTime, noise_scale: float, base_batch: int) -> float:
    """Predicted time-to-target of M0 over that of B: goodput(B) / goodput(M0)."""
    return float(goodput(batch, step_time, noise_scale, base_batch) / goodput(base_batch, step_time, noise_scale,
                                                                                base_batch))


def steps_ratio(batch, noise_scale: float):
    """S(B) / S_min = 1 + phi / B."""
    return 1.0 + noise_scale / np.asarray(batch, dtype=float)


def examples_ratio(batch, noise_scale: float):
    """E(B) / E_min = 1 + B / phi."""
    return 1.0 + np.asarray(batch, dtype=float) / noise_scale
