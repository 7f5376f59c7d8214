"""The time an instrument spends measuring, so that training time and throughput can leave it out."""

import functools
import time


def timed(method):
    """Adds each call's wall time to the instance's `seconds` (0.0 before the first call)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return method(self, *args, **kwargs)
        finally:
            self.seconds = getattr(self, "seconds", 0.0) + time.perf_counter() - started

    return wrapper


def seconds(instruments) -> float:
    """The total time the given callbacks have spent in their @timed methods."""
    return sum(getattr(instrument, "seconds", 0.0) for instrument in instruments)
