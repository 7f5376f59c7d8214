"""Training steps as the optimizer counts them, for callbacks that act every N steps."""


def iterations(model) -> int:
    """The optimizer's step count (batches trained), or 0 for a model without an optimizer."""
    optimizer = getattr(model, "optimizer", None)
    return int(optimizer.iterations) if optimizer is not None else 0


class Steps:
    """The step count during fit, and whether a multiple of `every` steps was passed.

    The count is read from the optimizer at each epoch start, which comes after every on_train_begin, so after
    BackupAndRestore has restored a resumed run's count. Within an epoch it follows Keras' batch index, the last
    batch of the execution that ran (several steps with steps_per_execution > 1); Keras overstates that index for
    a short last execution, so a passed multiple is confirmed with the optimizer.
    """

    def __init__(self, every: int):
        self.every, self.step, self._epoch_start = every, 0, 0

    def epoch_begin(self, model) -> None:
        self.step = self._epoch_start = iterations(model)

    def batch_end(self, model, batch: int) -> bool:
        """Advances to the end of `batch`; True if a multiple of `every` was passed since the last call."""
        previous, self.step = self.step, self._epoch_start + batch + 1
        if self.step // self.every > previous // self.every:
            self.step = iterations(model)
        return self.step // self.every > previous // self.every
