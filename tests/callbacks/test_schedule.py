"""callbacks.schedule: which steps are measured, against the schedules' definitions written out step by step."""

import pytest

from callbacks import schedule


def _scheduled(s, last):
    """The steps in 1..last that s schedules, one step at a time."""
    return [step for step in range(1, last + 1) if s.due(step - 1, step)]


def test_geometric_is_dense_early_and_sparse_late():
    assert _scheduled(schedule.Geometric(), 1300) == [10, 20, 40, 80, 160, 320, 640, 1280]
    assert _scheduled(schedule.Geometric(5, 1.5), 60) == [5, 8, 11, 17, 25, 38, 57]  # round(5 * 1.5^k)
    # Several steps per batch end: one measurement for all the scheduled steps passed.
    assert schedule.Geometric().due(0, 50) and not schedule.Geometric().due(40, 79)


def test_every_n_keeps_its_meaning():
    assert _scheduled(schedule.Every(7), 30) == [7, 14, 21, 28]
    assert schedule.Every(3).due(2, 6) and not schedule.Every(3).due(3, 5)
    assert isinstance(schedule.build(None), schedule.Geometric) and schedule.build(4).n == 4


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="every_n_steps"):
        schedule.Every(0)
    with pytest.raises(ValueError, match="ratio"):
        schedule.Geometric(10, 1.0)
