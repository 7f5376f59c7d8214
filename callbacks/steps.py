"""Training steps as the optimizer counts them, for callbacks that act every N steps."""

from callbacks.checked_io import check_positive_int


def iterations(model) -> int:
    """The optimizer's step count (batches trained), or 0 for a model without an optimizer."""
    optimizer = getattr(model, "optimizer", None)
    return int(optimizer.iterations.numpy()) if optimizer is not None else 0


class Steps:
    """The step count during fit, and whether a multiple of `every` steps was passed.

    The count is read from the optimizer at each epoch start, which comes after every on_train_begin, so after
    any checkpoint callback has restored a resumed run's count. Within an epoch it follows Keras' batch index, the last
    batch of the execution that ran (several steps with steps_per_execution > 1); Keras overstates that index for
    a short last execution, so a passed multiple is confirmed with the optimizer. With `every` None the count is
    kept and no step is ever due.
    """

    def __init__(self, every: int | None, name: str = "every_n_steps"):
        self.every = None if every is None else check_positive_int(name, every)
        self.step, self._epoch_start = 0, 0

    def epoch_begin(self, model) -> None:
        if getattr(model, "optimizer", None) is not None:  # a model without one (a stand-in) counts on
            self.step = iterations(model)
        self._epoch_start = self.step

    def batch_end(self, model, batch: int) -> bool:
        """Advances to the end of `batch`; True if a multiple of `every` was passed since the last call."""
        previous, self.step = self.step, self._epoch_start + batch + 1
        if not self.every:
            return False
        if self.step // self.every > previous // self.every:
            self.step = iterations(model)
        return self.step // self.every > previous // self.every
