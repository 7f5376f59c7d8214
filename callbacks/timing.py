"""The time an instrument spends measuring, so that training time and throughput can leave it out, and its parts.

An instrument's @timed methods add up to its `seconds`. Inside them, `call(instrument, function, *args)` runs one
of its compiled functions and files the call's time under a phase:

- "tracing": a call that traced the function (its tracing count rose) or ran a concrete function for the first time
  in this process (the runtime then instantiates and optimizes the graph; a concrete function shared by the models
  of one architecture, callbacks/shared_traces.py, is instantiated once): one-time costs, however many
  measurements follow;
- "execution": every other call of a compiled function, i.e. the measuring itself.

The rest of a @timed method's time is "other" (drawing the examples, the records, TensorBoard). `phases(instruments)`
gives {instrument: {phase: seconds}}, so a run's record can say what the measuring time is made of.

Compiled functions called through `call` run without Grappler's graph rewrites: on small models (ResNet-20 on 8x8
digits) optimizing a measuring graph took 4-5 s at its first call, about as long as its tracing, and saved nothing
measurable per call, where op dispatch rather than arithmetic dominates. The training step keeps them.
"""

import contextlib
import functools
import time
import weakref

import tensorflow as tf

PHASES = ("tracing", "execution", "other")
_INSTANTIATED = weakref.WeakSet()  # the concrete functions called so far in this process


def timed(method):
    """Adds each call's wall time to the instance's `seconds` (0.0 before the first call), and the part not filed
    by `call` under a phase to its "other" phase."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        started, filed = time.perf_counter(), _filed(self)
        try:
            return method(self, *args, **kwargs)
        finally:
            elapsed = time.perf_counter() - started
            self.seconds = getattr(self, "seconds", 0.0) + elapsed
            _add(self, "other", elapsed - (_filed(self) - filed))

    return wrapper


def call(instrument, function, *args):
    """function(*args), its wall time filed under instrument's "tracing" or "execution" phase (module docstring).

    Args:
        instrument: The callback whose time it is.
        function: A tf.function (its tracing count tells a trace) or a concrete function (its first call
            instantiates it).
    """
    counts = getattr(function, "experimental_get_tracing_count", None)
    before = counts() if counts else None
    first = counts is None and function not in _INSTANTIATED
    started = time.perf_counter()
    with _without_rewrites():
        result = function(*args)
    elapsed = time.perf_counter() - started
    if counts is None:
        _INSTANTIATED.add(function)
    _add(instrument, "tracing" if first or (counts and counts() > before) else "execution", elapsed)
    return result


@contextlib.contextmanager
def phase(instrument, name: str):
    """Files the wall time of the block under instrument's phase `name` ("tracing" for an explicit trace)."""
    started = time.perf_counter()
    try:
        yield
    finally:
        _add(instrument, name, time.perf_counter() - started)


def seconds(instruments) -> float:
    """The total time the given callbacks have spent in their @timed methods."""
    return sum(getattr(instrument, "seconds", 0.0) for instrument in instruments)


def phases(instruments) -> dict:
    """{class name: {phase: seconds}} of the given callbacks' @timed time (PHASES; instruments of one class added)."""
    result = {}
    for instrument in instruments:
        own = getattr(instrument, "phase_seconds", None)
        if own:
            total = result.setdefault(type(instrument).__name__, dict.fromkeys(PHASES, 0.0))
            for phase, value in own.items():
                total[phase] += value
    return result


@contextlib.contextmanager
def _without_rewrites():
    """Grappler's meta-optimizer off for the calls inside (the same setting at every call, so that the function is
    instantiated once), restored after."""
    previous = tf.config.optimizer.get_experimental_options()
    tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})
    try:
        yield
    finally:
        tf.config.optimizer.set_experimental_options(
            {"disable_meta_optimizer": previous.get("disable_meta_optimizer", False)})


def _add(instrument, phase, seconds):
    own = instrument.__dict__.setdefault("phase_seconds", dict.fromkeys(PHASES, 0.0))
    own[phase] += seconds


def _filed(instrument) -> float:
    own = instrument.__dict__.get("phase_seconds", {})
    return own.get("tracing", 0.0) + own.get("execution", 0.0)
