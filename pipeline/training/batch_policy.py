"""Where `--batch adaptive` moves at a decision point: the goodput and norm-test policies on a power-of-2 grid.

A decision is made at the end of every epoch but the last, from phi = B_simple = tr(Sigma) / |G|^2 (McCandlish et
al. 2018, eq. 2.8) pooled over the gradient measurements since the previous decision, with M0 the base batch and B
the batch in force:

    grid        M0 2^k, k >= 0, up to the least of --max-batch and the training split, and below the first batch
                that ran out of memory when the step-time ladder timed it; one decision moves at most one grid step
                (x2 or /2), which bounds the batch sizes the train step is traced for.
    goodput     (Pollux, Qiao et al. OSDI'21, sec. 3.1) goodput(B') = B' / T_step(B') (phi + M0) / (phi + B')
                (pipeline/training/goodput.py); the argmax over the grid neighbours B' of B, taken only when
                goodput(B') / goodput(B) > MIN_GAIN (a predicted gain above 5%), else B stays.
    norm-test   (Byrd et al. 2012; De et al. 2017, Big Batch SGD) the batch gradient's variance tr(Sigma) / B
                exceeds theta^2 |G|^2, i.e. B < phi / theta^2: B doubles. It never shrinks.
    lr          lr0 r(B'), AdaScale's gain r = (var + sqr) / (var / s + sqr) at s = B' / M0 (Johnson et al. 2020;
                sqrt(r) for Adam-type optimizers, goodput.learning_rate), with phi at the decision; fixed for the
                phase that the decision starts.

phi is the pooled point estimate; when |G|^2 is not resolved it is B_simple's lower bound (the noise is at least
that); with neither, the batch stays. A lower bound can only grow the batch: goodput(B') / goodput(B) for B' > B
rises with phi, so a larger batch that wins at the bound wins at the true phi too, while a smaller one that wins at
the bound may lose there. The intervals are recorded with each decision, not used to decide.
"""

from __future__ import annotations

import math

from pipeline.training import goodput

POLICIES = ("goodput", "norm-test")


def grid(base_batch: int, largest: int) -> list[int]:
    """base_batch * 2^k for k >= 0 up to largest (at least [base_batch])."""
    batches = [base_batch]
    while batches[-1] * 2 <= largest:
        batches.append(batches[-1] * 2)
    return batches


def noise_used(noise: dict | None) -> float | None:
    """The phi a decision uses from noise_estimates.pool()'s dict: its B_simple, else its lower bound, else None."""
    if not noise:
        return None
    for key in ("noise_scale", "noise_scale_lo"):
        value = noise.get(key)
        if _valid(value):
            return float(value)
    return None


def _valid(value) -> bool:
    return value is not None and math.isfinite(value) and value > 0


def decide(policy: str, batch: int, noise: dict | None, batches: list[int], *, base_batch: int, step_time=None,
           theta: float = 1.0) -> dict:
    """The batch from the next epoch on (module docstring).

    Args:
        policy: "goodput" or "norm-test".
        batch: the batch in force.
        noise: noise_estimates.pool()'s dict over the measurements since the last decision, or None.
        batches: the grid (`grid`), which holds `batch`.
        base_batch: M0, the batch at which --lr is the learning rate.
        step_time: goodput.StepTime, needed by "goodput" (and giving "norm-test" a predicted gain), or None.
        theta: the norm test's theta.

    Returns:
        {"new_batch", "noise_used" (phi or None), "predicted_gain" (goodput(new) / goodput(batch) of the best
        neighbour, or None without phi or a step-time model), "goodput": {neighbour: goodput / goodput(batch)},
        "reason"}.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy: got {policy!r}; choose one of {', '.join(POLICIES)}")
    phi = noise_used(noise)
    result = {"new_batch": batch, "noise_used": phi, "predicted_gain": None, "goodput": {}, "reason": ""}
    if phi is None:
        return result | {"reason": "no noise-scale estimate since the last decision"}
    bound = not _valid(noise.get("noise_scale"))  # phi is only B_simple's lower bound: no shrinking
    neighbours = [b for b in batches if (batch if bound else batch / 2) <= b <= 2 * batch]
    if step_time is not None:
        here = float(goodput.goodput(batch, step_time, phi, base_batch))
        result["goodput"] = {b: float(goodput.goodput(b, step_time, phi, base_batch)) / here for b in neighbours}
    if policy == "goodput":
        if step_time is None:
            return result | {"reason": "no step-time model"}
        best = max(neighbours, key=lambda b: result["goodput"][b])
        gain = result["goodput"][best]
        result["predicted_gain"] = gain
        if gain > goodput.MIN_GAIN:
            return result | {"new_batch": best, "reason": f"goodput x{gain:.3f} at {best} (> x{goodput.MIN_GAIN})"}
        only = " (B_simple only bounded below: no smaller batch considered)" if bound else ""
        return result | {"reason": f"best goodput x{gain:.3f}, not above x{goodput.MIN_GAIN}{only}"}
    ratio = phi / (theta**2 * batch)  # tr(Sigma) / B over theta^2 |G|^2
    bigger = 2 * batch if 2 * batch in batches else None
    if result["goodput"] and bigger:
        result["predicted_gain"] = result["goodput"][bigger]
    if ratio > 1 and bigger:
        return result | {"new_batch": bigger, "reason": f"norm test: B_simple / (theta^2 B) = {ratio:.3g} > 1"}
    if ratio > 1:
        return result | {"reason": f"norm test: B_simple / (theta^2 B) = {ratio:.3g} > 1, at the grid's end"}
    return result | {"reason": f"norm test: B_simple / (theta^2 B) = {ratio:.3g} <= 1"}


def lr_gain(batch: int, phi: float, base_batch: int, optimizer: str) -> float:
    """The learning rate's factor over --lr at `batch`: AdaScale's r (sqrt(r) for Adam-type), goodput.learning_rate."""
    return float(goodput.learning_rate(batch, phi, base_batch, 1.0, optimizer))
