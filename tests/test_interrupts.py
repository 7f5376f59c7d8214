"""pipeline/interrupts.py: a real SIGINT or SIGTERM sent to this process raises KeyboardInterrupt and is recorded; the
record gives the shell's exit code; inside `deferred` a signal is only recorded, and `check` raises for it after."""

import os
import signal

import pytest

from pipeline import interrupts


@pytest.fixture
def installed():
    """interrupts.install() for one test, then the previous handlers and an empty record again."""
    previous = {signum: signal.getsignal(signum) for signum in interrupts.SIGNALS}
    interrupts.install()
    yield
    for signum, handler in previous.items():
        signal.signal(signum, handler)
    interrupts._received.clear()


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_raises_keyboard_interrupt_and_gives_the_shell_code(installed, signum, code):
    assert interrupts.received() is None and interrupts.exit_code() == 130  # a KeyboardInterrupt raised otherwise
    interrupts.check()  # nothing received: no exception
    with pytest.raises(KeyboardInterrupt, match=signal.Signals(signum).name):
        os.kill(os.getpid(), signum)  # the handler runs in this thread before the next bytecode
    assert interrupts.received() == signum and interrupts.exit_code() == code
    with pytest.raises(KeyboardInterrupt):  # a signal whose exception was lost still ends the run at a safe point
        interrupts.check()


def test_inside_deferred_a_signal_is_only_recorded_and_the_first_one_counts(installed):
    with interrupts.deferred():
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        interrupts.check()  # deferred: recorded, not raised
        with interrupts.deferred():  # nested: still deferred after the inner block
            pass
        interrupts.check()
    assert interrupts._received == [signal.SIGTERM, signal.SIGINT]
    assert interrupts.exit_code() == 143
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        interrupts.check()
    interrupts.install()  # a new command starts with an empty record
    assert interrupts.received() is None
