"""Statistics of a sweep across batch sizes: the steps-to-target fit, power laws and diminishing returns.

Steps to target follow S(B) = S_min (1 + B_crit / B) (McCandlish et al. 2018: their trade-off
(S / S_min - 1)(E / E_min - 1) = 1 with E = B S examples and B_crit = E_min / S_min). S is linear in 1/B,
S = a + b / B with S_min = a and B_crit = b / a, so the fit is a least-squares line, weighted by 1/S so that
every batch size counts by its relative error. B_crit is shown beside the measured simple noise scale
B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018, eq. 2.8), per run the ratio of its mean tr(Sigma) to its mean
|G|^2 over callbacks.GradientStatistics' measurements (a ratio of averages, their app. A; per norm, the mean over
runs). The minibatch gradient's standard deviation falls as sigma / sqrt(B); its log-log slope against B is
fitted beside -0.5.
"""

from __future__ import annotations

import math

import numpy as np

DIMINISHING = 0.5  # scaling efficiency below which a larger batch is past the onset of diminishing returns


def series(groups, norm, key, require_all_reached=False):
    """(batches, means) of one quantity for one normalization, optionally only where every run reached the target."""
    points = [(g["batch"], g[key]["mean"]) for g in groups if g["norm"] == norm and g[key]["mean"] is not None
              and (not require_all_reached or g["reached"] == g["completed"])]
    return [b for b, _ in points], [v for _, v in points]


def fit_steps_to_target(batches, steps) -> dict | None:
    """Fits S(B) = S_min (1 + B_crit / B) as S = a + b / B, least squares weighted by 1 / S.

    Returns {"s_min", "b_crit", "e_min", "points", "valid"}, valid when S_min > 0 and B_crit >= 0, or None for
    fewer than two batch sizes.
    """
    batches, steps = np.asarray(batches, float), np.asarray(steps, float)
    if len(set(batches.tolist())) < 2:
        return None
    design = np.stack([np.ones_like(batches), 1 / batches], axis=1) / steps[:, None]
    (a, b), *_ = np.linalg.lstsq(design, np.ones_like(steps), rcond=None)
    valid = bool(a > 0 and b >= 0)
    b_crit = float(b / a) if a > 0 else None
    return {"s_min": float(a), "b_crit": b_crit, "e_min": float(b) if valid else None, "points": len(batches),
            "valid": valid}


def fit_power_law(batches, values) -> dict | None:
    """log(value) = log(c) + slope * log(B) by least squares; {"slope", "c"}, or None for fewer than 2 points."""
    batches, values = np.asarray(batches, float), np.asarray(values, float)
    if len(set(batches.tolist())) < 2 or np.any(values <= 0):
        return None
    slope, intercept = np.polyfit(np.log(batches), np.log(values), 1)
    return {"slope": float(slope), "c": float(np.exp(intercept))}


def fits(groups: list[dict]) -> dict:
    """Per norm: the S(B) fit, the gradient-std power law and the mean measured B_simple."""
    result = {}
    for norm in dict.fromkeys(g["norm"] for g in groups):
        noise = series(groups, norm, "noise_scale")[1]
        result[norm] = {
            "steps_to_target": fit_steps_to_target(*series(groups, norm, "steps_to_target", True)),
            "grad_std": fit_power_law(*series(groups, norm, "grad_std")),
            "b_simple": float(np.mean(noise)) if noise else None,
        }
    return result


def diminishing_returns(batches, steps) -> int | None:
    """The smallest batch from which every step to a larger measured batch scales less than half as well as perfect.

    The scaling efficiency of going from B1 to B2 is log(S1 / S2) / log(B2 / B1): 1 for perfect scaling (steps
    halve when the batch doubles), 0 when steps stay the same. Requiring every later step, not just one, to be
    below DIMINISHING keeps one noisy measurement from deciding.
    """
    efficiencies = [math.log(s1 / s2) / math.log(b2 / b1) if s2 > 0 else 0.0
                    for b1, b2, s1, s2 in zip(batches, batches[1:], steps, steps[1:])]
    onset = None
    for i in reversed(range(len(efficiencies))):
        if efficiencies[i] >= DIMINISHING:
            break
        onset = batches[i]
    return onset
