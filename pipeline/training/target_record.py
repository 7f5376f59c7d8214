"""Which validation examples each target check classified correctly: the record behind the interval of steps to target.

pipeline/training/target.py checks the validation accuracy every k steps and reports the first check at or above the target.
That first crossing is a noisy event: on N validation examples an accuracy near the target p has a binomial
standard error sqrt(p (1 - p) / N) (1.2 points for p = 0.98 on digits' 144 validation examples). So each check
also records, per validation example, whether the model classified it correctly; pipeline/study/bootstrap.py resamples
the validation examples and finds the first crossing again in every resample, which gives steps, epochs and time
to target an interval from the validation set's sampling noise.

The checks go on after the target is first reached, because in a resample the first crossing can come later: until
the check's accuracy is settled above the target (its lower SETTLED_Z-standard-error bound at or above it), or
until twice the steps of the first crossing, whichever comes first. A resample that crosses at none of the recorded
checks is reported as crossing after the last one (a bound).

File: target_checks.npz in the run directory (one writer and one reader, both here), written atomically at every
epoch end and at the end of training, with arrays
  steps (C,) int64: the optimizer step of each check;
  epochs (C,) int64, epoch_fractions (C,) float64, seconds_into_epoch (C,) float64: where the check fell, as in
    target.json (seconds without measuring and checks, for pipeline.run_timing.time_to_target);
  correct (C, N) bool: whether validation example n was classified correctly at check c;
  target () float64: the target accuracy.
A resumed run trains again from its checkpoint, so it keeps the checks made before it (their number is part of the
checkpoint, pipeline/training/target.py) and drops the later ones.
"""

from __future__ import annotations

import math
import os
import tempfile

import numpy as np

FILE = "target_checks.npz"
SETTLED_Z = 3.0  # standard errors above the target at which a check's accuracy is settled and the checks stop
FOLLOW_FACTOR = 2  # the checks stop at the latest at this multiple of the first crossing's step
FIELDS = ("steps", "epochs", "epoch_fractions", "seconds_into_epoch")


def read(run_dir: str) -> dict | None:
    """target_checks.npz of a run as a dict of arrays, or None if the run has none (or it is unreadable)."""
    try:
        with np.load(os.path.join(run_dir, FILE), allow_pickle=False) as data:
            record = {key: data[key] for key in (*FIELDS, "correct", "target")}
    except (OSError, ValueError, KeyError):
        return None
    record["target"] = float(record["target"])
    return record


def settled(accuracy: float, examples: int, target: float) -> bool:
    """Whether `accuracy` on `examples` lies SETTLED_Z binomial standard errors or more above `target`."""
    return accuracy - SETTLED_Z * math.sqrt(accuracy * (1 - accuracy) / examples) >= target


class CheckRecord:
    """The per-example correctness of a run's target checks, kept in memory and written to FILE.

    Args:
        run_dir: the run directory (a resumed run's earlier checks are read back from it).
        target: the target accuracy.
    """

    def __init__(self, run_dir: str, target: float):
        self.run_dir, self.target = run_dir, target
        earlier = read(run_dir) if run_dir else None
        self.rows = [] if earlier is None else [
            (*(earlier[key][c].item() for key in FIELDS), earlier["correct"][c]) for c in range(len(earlier["steps"]))]
        self.first_crossing, self.done = None, False
        self._find_crossing()

    def _find_crossing(self) -> None:
        self.first_crossing, self.done = None, False
        for step, _, _, _, correct in self.rows:
            accuracy = float(np.mean(correct))
            if self.first_crossing is None and accuracy >= self.target:
                self.first_crossing = step
            if self.first_crossing is not None:
                self.done = settled(accuracy, len(correct), self.target) or step >= FOLLOW_FACTOR * self.first_crossing

    def keep_first(self, checks: int) -> int:
        """Forgets the checks after the first `checks` (a resumed run makes them again) and rewrites FILE to hold
        exactly the rest (removes it if none is left).

        Returns:
            The checks kept: `checks`, or fewer if FILE held fewer.
        """
        self.rows = self.rows[:checks]
        self._find_crossing()
        if self.rows:
            self.write()
        elif self.run_dir and os.path.exists(os.path.join(self.run_dir, FILE)):
            os.remove(os.path.join(self.run_dir, FILE))
        return len(self.rows)

    def add(self, step: int, epoch: int, epoch_fraction: float, seconds_into_epoch: float, correct) -> None:
        """Records one check; `correct` is a bool per validation example."""
        self.rows.append((int(step), int(epoch), float(epoch_fraction), float(seconds_into_epoch),
                          np.asarray(correct, bool)))
        self._find_crossing()

    def write(self) -> None:
        """Writes FILE atomically (a temporary file in the run directory, then renamed over it)."""
        if not self.rows or not self.run_dir:
            return
        arrays = {key: np.array([row[i] for row in self.rows]) for i, key in enumerate(FIELDS)}
        arrays["correct"] = np.stack([row[4] for row in self.rows])
        arrays["target"] = np.array(self.target, np.float64)
        handle, temporary = tempfile.mkstemp(dir=self.run_dir, prefix=".target_checks-", suffix=".npz")
        try:
            with os.fdopen(handle, "wb") as f:
                np.savez_compressed(f, **arrays)
            os.replace(temporary, os.path.join(self.run_dir, FILE))
        except BaseException:
            if os.path.exists(temporary):
                os.remove(temporary)
            raise
