"""The run's step count, the one unit of every interval and record: batches trained.

A step is one batch trained: one call of the training step on one global batch, counted from the start of the run,
whatever the gradient accumulation. With gradients accumulated over k batches (--accumulate k) the optimizer updates
the weights once every k steps, so updates = steps // k (`updates`); the two are never mixed. Every interval
(the instruments' every_n_steps, the target checks), every record's "step" (grad_stats.jsonl, bn_stats.json,
dynamics/forgetting.json, target.json, the run's history and summary.json's "steps") and the instruments' TensorBoard steps
are in steps.

Keras' `optimizer.iterations` is not this count: it counts updates (batches // k) and, under a loss-scaled
mixed_float16 optimizer, leaves out the batches whose gradients were not finite. So the count is kept from the
batches themselves: Keras' batch index within each epoch, added to the count at the epoch's start.
"""

from callbacks.checked_io import check_positive_int


def updates(steps: int, accumulate: int) -> int:
    """Optimizer updates after `steps` batches with gradients accumulated over `accumulate` batches per update."""
    return steps // accumulate


class Steps:
    """The step count (module docstring) during fit, and whether a multiple of `every` steps was passed.

    The count starts at 0, or at the step that a resumed run restores (`set_state`), and carries over from one fit()
    call to the next (a batch schedule trains one fit per phase). Within an epoch it follows Keras' batch index, the
    last batch of the execution that ran (several steps with steps_per_execution > 1), capped at the epoch's steps:
    Keras overstates that index for a short last execution. With `every` None the count is kept and no step is ever
    due.
    """

    def __init__(self, every: int | None, name: str = "every_n_steps"):
        self.every = None if every is None else check_positive_int(name, every)
        self.step, self._epoch_start, self._steps_in_epoch = 0, 0, None

    def epoch_begin(self, steps_in_epoch: int | None = None) -> None:
        """Starts an epoch of `steps_in_epoch` steps (Keras' params["steps"]; None: unknown, not capped)."""
        self._epoch_start, self._steps_in_epoch = self.step, steps_in_epoch

    def batch_end(self, batch: int) -> bool:
        """Advances to the end of `batch`; True if a multiple of `every` was passed since the last call."""
        previous = self.step
        done = batch + 1 if not self._steps_in_epoch else min(batch + 1, self._steps_in_epoch)
        self.step = self._epoch_start + done
        return bool(self.every) and self.step // self.every > previous // self.every

    def set_step(self, step: int) -> None:
        """Continues counting from `step` (a restored run's count)."""
        self.step = self._epoch_start = int(step)
