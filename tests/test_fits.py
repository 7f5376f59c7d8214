"""The sweep statistics of pipeline/fits.py against known answers: the S(B) fit, diminishing returns, power laws."""

import math

import numpy as np
import pytest

from pipeline import fits


def test_fit_recovers_known_critical_batch():
    batches = np.array([4, 8, 16, 32, 64, 128, 256, 512])
    for s_min, b_crit in ((1000.0, 64.0), (37.5, 3.0), (5e4, 900.0)):
        fit = fits.fit_steps_to_target(batches, [s_min * (1 + b_crit / b) for b in batches])
        assert fit["valid"]
        assert fit["s_min"] == pytest.approx(s_min, rel=1e-9)
        assert fit["b_crit"] == pytest.approx(b_crit, rel=1e-9)
        assert fit["e_min"] == pytest.approx(s_min * b_crit, rel=1e-9)
    assert fits.fit_steps_to_target([32], [100.0]) is None


def test_diminishing_returns_needs_every_later_step_to_scale_badly():
    # Efficiencies: 8->16 perfect, 16->32 none (one noisy point), 32->64 perfect, then 0.2 and 0.
    batches, steps = [8, 16, 32, 64, 128, 256], [160, 80, 80, 40, 40 / 2**0.2, 40 / 2**0.2]
    assert fits.diminishing_returns(batches, steps) == 64
    assert fits.diminishing_returns(batches[:4], steps[:4]) is None
    assert fits.diminishing_returns([8, 16], [100, 100]) == 8


def test_power_law_slope():
    batches = [8, 16, 32, 64, 128, 256]
    fit = fits.fit_power_law(batches, [2.5 / math.sqrt(b) for b in batches])
    assert fit["slope"] == pytest.approx(-0.5, abs=1e-12)
    assert fit["c"] == pytest.approx(2.5, rel=1e-12)
