"""Signals that end a run: SIGINT (Ctrl-C) and SIGTERM (timeout, docker, Slurm, Kubernetes) end it the same way.

Both raise KeyboardInterrupt in the main thread, which pipeline.train turns into an interrupted run with its
summary. Python runs a signal handler between two bytecodes of the main thread, wherever they are; an exception
raised while a weakref callback or a __del__ runs (TensorFlow frees its resources in such callbacks) is printed
as "Exception ignored in ..." and lost, and the run would go on. So the handler also records the signal, and the
run checks the record at safe points (`check`: after every batch, and between the stages after training): a
signal lost that way ends the run a batch later. While the run writes its summary (`deferred`), a further signal
is only recorded, so that the summary is always complete.
"""

from __future__ import annotations

import contextlib
import signal

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_received: list[int] = []  # signals received since `install`, in order
_deferring = False


def _handle(signum, frame) -> None:
    _received.append(signum)
    if not _deferring:
        raise KeyboardInterrupt(signal.Signals(signum).name)


def install() -> None:
    """Makes SIGINT and SIGTERM raise KeyboardInterrupt (and be recorded); call it first thing in main()."""
    _received.clear()
    for signum in SIGNALS:
        signal.signal(signum, _handle)


def received() -> int | None:
    """The first signal received since `install`, or None."""
    return _received[0] if _received else None


def exit_code(default: int = 130) -> int:
    """The shell's code for a process ended by the first signal received: 128 + its number (SIGINT 130, SIGTERM
    143); `default` when none was received (a KeyboardInterrupt raised otherwise)."""
    first = received()
    return 128 + first if first else default


def check() -> None:
    """Raises KeyboardInterrupt if a signal was received: the safe point for one whose exception was lost."""
    if _received and not _deferring:
        raise KeyboardInterrupt(signal.Signals(_received[0]).name)


@contextlib.contextmanager
def deferred():
    """Signals received inside only get recorded (`check` raises after it for them)."""
    global _deferring
    previous, _deferring = _deferring, True
    try:
        yield
    finally:
        _deferring = previous


def callback():
    """A Keras callback that calls `check` after every training, validation and prediction batch and epoch."""
    import keras

    def on_batch_end(batch, logs=None):
        check()

    return keras.callbacks.LambdaCallback(on_train_batch_end=on_batch_end, on_test_batch_end=on_batch_end,
                                          on_predict_batch_end=on_batch_end, on_epoch_end=on_batch_end)
