"""When an instrument measures: a pure function of the step number, dense early and sparse late by default.

Training changes fastest at its start, so a measurement every N steps spends most of its cost where little changes.
`Geometric(first, ratio)` measures at step 0 and at steps round(first * ratio^k), k = 0, 1, ... (10, 20, 40, 80, ...
for the defaults): a run of S steps gets about 2 + log(S / first) / log(ratio) measurements, 9 for the default
run's 1200 steps, and the instruments add the last step of the run. `Every(n)` measures at step 0 and every n steps.
Both answer `due(previous, step)`: is a scheduled step in (previous, step]? (several steps pass per batch end
with steps_per_execution > 1; one measurement then stands for all of them).
"""

from __future__ import annotations

import math

from callbacks.checked_io import check_positive_int

# Step of the first measurement after step 0, and the factor between consecutive ones.
FIRST, RATIO = 10, 2.0


class Every:
    """Step 0 and every `n` steps."""

    def __init__(self, n: int, name: str = "every_n_steps"):
        self.n = check_positive_int(name, n)

    def due(self, previous: int, step: int) -> bool:
        return step // self.n > previous // self.n

    def __repr__(self):
        return f"every {self.n} steps"


class Geometric:
    """Step 0 and steps round(first * ratio^k), k >= 0."""

    def __init__(self, first: int = FIRST, ratio: float = RATIO):
        self.first = check_positive_int("first", first)
        if not ratio > 1:
            raise ValueError(f"ratio: consecutive measurements must be > 1 apart as a factor, got {ratio!r}")
        self.ratio = float(ratio)

    def next_after(self, step: int) -> int:
        """The first scheduled step > step."""
        if step < self.first:
            return self.first
        k = math.floor(math.log(step / self.first) / math.log(self.ratio))
        while round(self.first * self.ratio**k) <= step:
            k += 1
        return round(self.first * self.ratio**k)

    def due(self, previous: int, step: int) -> bool:
        return self.next_after(previous) <= step

    def __repr__(self):
        return f"steps 0, {self.first}, then x{self.ratio:g}"


def build(every: int | None) -> Every | Geometric:
    """The schedule for an every_n_steps argument: None for the geometric default, n > 0 for every n steps."""
    return Geometric() if every is None else Every(every)


def crossed(schedule, steps, batch: int) -> bool:
    """Advances `steps` (a callbacks.steps.Steps that keeps the count) to the end of `batch`; True if a step of
    `schedule` was passed since the last call."""
    previous = steps.step
    steps.batch_end(batch)
    return schedule.due(previous, steps.step)
