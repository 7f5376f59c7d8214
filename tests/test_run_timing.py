"""pipeline/run_timing.py: the one definition of each metric derived from a run's history, checked against the same
arithmetic written out by hand (epoch by epoch, then the median)."""

import numpy as np
import pytest

from pipeline import run_timing


def history(times, steps_per_epoch=10, measuring=None, batch=32):
    measuring = measuring or {}
    records = []
    for epoch, seconds in enumerate(times):
        record = {"epoch": epoch, "step": steps_per_epoch * (epoch + 1), "epoch_time_s": seconds}
        if epoch in measuring:
            record["instrument_time_s"] = measuring[epoch]
        training = seconds - record.get("instrument_time_s", 0.0)
        record["examples_per_sec"] = steps_per_epoch * batch / training
        records.append(record)
    return records


def test_time_per_step_leaves_out_tracing_and_measuring():
    records = history([10.0, 1.0, 3.0, 1.2])
    assert run_timing.time_per_step(records) == pytest.approx(np.median([0.1, 0.3, 0.12]))
    records = history([10.0, 1.0, 3.0, 1.2], measuring={2: 1.9})  # the slow epoch measured for 1.9 s
    assert run_timing.time_per_step(records) == pytest.approx(np.median([0.1, 0.11, 0.12]))
    assert run_timing.time_per_step(records[:1]) == pytest.approx(1.0)  # one epoch: nothing else to use
    assert run_timing.time_per_step([]) is None


def test_throughput_time_to_target_and_totals_follow_the_same_epochs():
    records = history([10.0, 1.0, 3.0, 1.2], measuring={0: 2.0, 2: 1.9})
    # Brute force: each steady epoch's examples over its time without measuring, then the median.
    assert run_timing.examples_per_sec(records) == pytest.approx(np.median([320 / 1.0, 320 / 1.1, 320 / 1.2]))
    assert run_timing.examples_per_sec(records) == pytest.approx(32 / run_timing.time_per_step(records))  # odd count
    # Epochs 0 and 1 without their measuring (10 - 2, 1), then 0.5 s into epoch 2.
    assert run_timing.time_to_target(records, {"epoch": 2, "seconds_into_epoch": 0.5}) == pytest.approx(8.0 + 1.0 + 0.5)
    assert run_timing.time_to_target(records, None) is None
    assert run_timing.train_time(records) == pytest.approx(15.2)
    assert run_timing.instrument_time(records) == pytest.approx(3.9)
