"""Hand-written target_checks.npz records with a known first crossing and a known validation noise, for report tests."""

import math

from pipeline.training import target_record


def write_record(run_dir, steps_to_target, target, *, rise=0.5, every=None, examples=400, seconds_per_step=0.01):
    """Checks every `every` steps from S - 19 every to S + 20 every (S = steps_to_target, positive steps only);
    accuracy rises by `rise` per S steps.

    At check step s, the first ceil(examples x (target + rise (s - S) / S)) validation examples are right (clipped to
    [0, examples]), so the first check at or above the target is s = S, the one before is below it (when rise x
    every / S x examples >= 1), and a small `rise` puts many checks within a binomial standard error of the target:
    a noisy first crossing. Every check falls in epoch 0, so its time to target is seconds_per_step x s.
    """
    every = every or max(1, round(steps_to_target / 20))
    record = target_record.CheckRecord("", target)
    for step in (steps_to_target + k * every for k in range(-19, 21)):
        if step <= 0:
            continue
        accuracy = target + rise * (step - steps_to_target) / steps_to_target
        right = min(examples, max(0, math.ceil(examples * accuracy - 1e-9)))
        record.add(step, 0, step / (4 * steps_to_target), seconds_per_step * step, [i < right for i in range(examples)])
    record.run_dir = run_dir
    record.write()
    return record
