"""Learning-rate schedules against their closed-form formulas, and the optimizer wiring."""

import dataclasses
import math

import numpy as np
import pytest

from pipeline.config import Config
from pipeline.training import optim

STEPS_PER_EPOCH = 10


def lr_at(config, steps, phases=((0, STEPS_PER_EPOCH),)):
    schedule = optim.learning_rate(config, list(phases))
    return np.array([float(schedule(s)) for s in steps])


@pytest.mark.parametrize(
    "schedule, expected",
    [
        ("constant", lambda e: 0.1),
        ("step", lambda e: 0.1 * 0.5 ** math.floor(e / 3)),
        ("multistep", lambda e: 0.1 * 0.5 ** sum(e >= m for m in (4, 7))),
        ("exponential", lambda e: 0.1 * 0.5**e),
        ("cosine", lambda e: 0.1 * 0.5 * (1 + math.cos(math.pi * e / 10))),
    ],
)
def test_schedule_values_match_formulas(schedule, expected):
    config = Config(lr=0.1, epochs=10, schedule=schedule, step_epochs=3, gamma=0.5, milestones="4,7")
    steps = [0, 5, 10, 29, 30, 31, 45, 69, 70, 99]
    want = [expected(s / STEPS_PER_EPOCH) for s in steps]
    np.testing.assert_allclose(lr_at(config, steps), want, rtol=1e-5, atol=1e-7)


def test_warmup_ramps_linearly_then_follows_schedule():
    config = Config(lr=0.2, epochs=10, schedule="constant", warmup_epochs=2)
    steps = [0, 4, 9, 19, 20, 50]
    want = [0.2 * min(1.0, (s + 1) / 20) for s in steps]
    np.testing.assert_allclose(lr_at(config, steps), want, rtol=1e-5)


@pytest.mark.parametrize("rule, factor", [("none", 1.0), ("linear", 4.0), ("sqrt", 2.0)])
def test_batch_scaling_rules(rule, factor):
    config = Config(lr=0.1, batch=128, base_batch=32, lr_scaling=rule)
    assert config.effective_lr == pytest.approx(0.1 * factor)
    accumulated = dataclasses.replace(config, batch=64, accumulate=2)
    assert accumulated.effective_lr == pytest.approx(0.1 * factor)


def test_batch_schedule_keeps_milestones_in_epochs():
    # Batch 32 for epochs 0-1 (10 steps each), then batch 128 (2.5x fewer... here 4 steps per epoch).
    config = Config(lr=0.1, epochs=6, schedule="multistep", milestones="3,5", gamma=0.1)
    phases = ((0, 10), (2, 4))
    # Epoch 3 starts at step 20 + 4 = 24, epoch 5 at step 32.
    got = lr_at(config, [0, 19, 20, 23, 24, 31, 32, 35], phases)
    np.testing.assert_allclose(got, [0.1, 0.1, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rtol=1e-5)


@pytest.mark.parametrize("name, cls", [("sgd", "SGD"), ("nesterov", "SGD"), ("adam", "Adam"), ("adamw", "AdamW")])
def test_build_optimizer(name, cls):
    config = Config(optimizer=name, weight_decay=1e-4, accumulate=2)
    opt = optim.build_optimizer(config, optim.learning_rate(config, [(0, 10)]))
    assert type(opt).__name__ == cls
    assert opt.gradient_accumulation_steps == 2
    assert opt.weight_decay == pytest.approx(1e-4)
    if name == "nesterov":
        assert opt.nesterov
