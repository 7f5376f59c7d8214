"""The run's step count: batches trained, continued across epochs, fit() calls and a restored state."""

from callbacks.steps import Steps, updates


def test_counts_batches_across_epochs_capped_at_the_epochs_steps():
    steps = Steps(3)
    due = []
    for _ in range(2):  # two epochs of 10 steps, 4 per execution: Keras reports batches 3, 7 and 11 (overstated)
        steps.epoch_begin(10)
        due += [(steps.batch_end(batch), steps.step) for batch in (3, 7, 11)]
    assert due == [(True, 4), (True, 8), (True, 10), (True, 14), (True, 18), (False, 20)]


def test_a_restored_count_goes_on_and_updates_are_derived():
    steps = Steps(5)
    steps.set_step(38)
    steps.epoch_begin(None)
    assert [steps.batch_end(batch) for batch in range(3)] == [False, True, False]
    assert steps.step == 41
    assert updates(41, 2) == 20 and updates(41, 1) == 41


def test_without_an_interval_nothing_is_due():
    steps = Steps(None)
    steps.epoch_begin(4)
    assert not any(steps.batch_end(batch) for batch in range(4)) and steps.step == 4
