"""callbacks.timing: an instrument's time, split into tracing, execution and the rest."""

import time

import pytest
import tensorflow as tf

from callbacks import timing


class Instrument:
    """A measuring callback in miniature: one compiled function, called inside a @timed method."""

    def __init__(self):
        self.function = tf.function(lambda x: tf.reduce_sum(tf.square(x)))

    @timing.timed
    def measure(self, x, pause=0.0):
        time.sleep(pause)  # drawing examples, writing records: "other"
        return timing.call(self, self.function, x)


def test_the_call_that_traces_is_tracing_the_others_execution_and_the_rest_other():
    instrument = Instrument()
    assert float(instrument.measure(tf.ones([3]))) == 3.0
    after_first = dict(instrument.phase_seconds)
    assert after_first["tracing"] > 0 and after_first["execution"] == 0
    instrument.measure(tf.ones([3]), pause=0.05)
    instrument.measure(tf.ones([3]))
    assert instrument.function.experimental_get_tracing_count() == 1
    assert instrument.phase_seconds["tracing"] == after_first["tracing"]  # no new trace: filed as execution
    assert instrument.phase_seconds["execution"] > 0 and instrument.phase_seconds["other"] >= 0.05
    assert sum(instrument.phase_seconds.values()) == pytest.approx(instrument.seconds)
    instrument.measure(tf.ones([2, 2]))  # a new shape retraces
    assert instrument.function.experimental_get_tracing_count() == 2
    assert instrument.phase_seconds["tracing"] > after_first["tracing"]
    assert timing.phases([instrument, object()]) == {"Instrument": instrument.phase_seconds}


def test_a_concrete_function_is_tracing_at_its_first_call_and_rewrites_are_restored():
    instrument = Instrument()
    concrete = instrument.function.get_concrete_function(tf.TensorSpec([None], tf.float32))
    before = tf.config.optimizer.get_experimental_options().get("disable_meta_optimizer", False)
    timing.call(instrument, concrete, tf.ones([3]))
    first = instrument.phase_seconds["tracing"]
    timing.call(instrument, concrete, tf.ones([4]))
    assert first > 0 and instrument.phase_seconds["tracing"] == first and instrument.phase_seconds["execution"] > 0
    assert tf.config.optimizer.get_experimental_options().get("disable_meta_optimizer", False) == before
