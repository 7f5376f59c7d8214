"""The goodput arithmetic (advisor and adaptive batch): AdaptDL's efficiency, gain and goodput on numbers worked by hand; the step-time fit."""

import math

import numpy as np
import pytest

from pipeline.training import goodput

# AdaptDL's GradParams at the initial batch M0 = 32: sqr = |G|^2 = 2.0, var = tr(Sigma) / M0 = 3.0,
# so phi = B_simple = var * M0 / sqr = 48.
SQR, VAR, M0 = 2.0, 3.0, 32
PHI = VAR * M0 / SQR


def test_efficiency_and_gain_match_adaptdl_by_hand():
    # AdaptDL: scale = B / M0, gain = (var + sqr) / (var / scale + sqr), efficiency = gain / scale.
    # B = 128: scale 4, gain = 5 / (0.75 + 2) = 1.8181..., efficiency = 0.4545...  (Pollux: (48 + 32) / (48 + 128)).
    assert goodput.adascale_gain(128, PHI, M0) == pytest.approx(5 / 2.75, rel=1e-12)
    assert goodput.efficiency(128, PHI, M0) == pytest.approx(80 / 176, rel=1e-12)
    assert goodput.efficiency(128, PHI, M0) == pytest.approx((5 / 2.75) / 4, rel=1e-12)
    # B = 8: scale 0.25, gain = 5 / (12 + 2) = 0.35714..., efficiency 1.42857... (smaller batches use examples better).
    assert goodput.adascale_gain(8, PHI, M0) == pytest.approx(5 / 14, rel=1e-12)
    assert goodput.efficiency(8, PHI, M0) == pytest.approx(80 / 56, rel=1e-12)
    assert goodput.efficiency(M0, PHI, M0) == 1.0 and goodput.adascale_gain(M0, PHI, M0) == 1.0


def test_goodput_by_hand():
    step_time = goodput.StepTime(alpha=0.010, beta=0.0002, rms_log_error=0.0)
    # B = 128: T = 0.010 + 0.0256 = 0.0356 s, throughput = 3595.505... ex/s, goodput = 3595.505... * 80 / 176.
    assert step_time(128) == pytest.approx(0.0356)
    assert goodput.goodput(128, step_time, PHI, M0) == pytest.approx(128 / 0.0356 * 80 / 176, rel=1e-12)
    # Speed-up over M0 = 32 (T = 0.0164 s): goodput ratio, which equals the ratio of S(B) T(B) with
    # S = S_min (1 + phi / B):  (1 + 48/32) * 0.0164 / ((1 + 48/128) * 0.0356) = 0.0410 / 0.04895.
    assert goodput.speedup(128, step_time, PHI, M0) == pytest.approx(0.0410 / 0.04895, rel=1e-12)
    assert goodput.steps_ratio(128, PHI) == pytest.approx(1.375)
    assert goodput.examples_ratio(128, PHI) == pytest.approx(1 + 128 / 48)


def test_learning_rate_rules():
    # SGD: lr0 * gain; Adam-type: lr0 * sqrt(gain).
    assert goodput.learning_rate(128, PHI, M0, 0.1, "sgd") == pytest.approx(0.1 * 5 / 2.75)
    assert goodput.learning_rate(128, PHI, M0, 0.1, "nesterov") == pytest.approx(0.1 * 5 / 2.75)
    assert goodput.learning_rate(128, PHI, M0, 1e-3, "adam") == pytest.approx(1e-3 * math.sqrt(5 / 2.75))
    assert goodput.learning_rate(128, PHI, M0, 1e-3, "adamw") == pytest.approx(1e-3 * math.sqrt(5 / 2.75))
    # Far below phi the gain is the linear rule's B / M0; far above it saturates at (phi + M0) / M0.
    assert goodput.adascale_gain(64, 1e9, 32) == pytest.approx(2.0, rel=1e-6)
    assert goodput.adascale_gain(1e9, 48, 32) == pytest.approx(80 / 32, rel=1e-6)


def test_step_time_fit_recovers_synthetic_times():
    batches = np.array([8, 16, 32, 64, 128, 256])
    exact = goodput.fit_step_time(batches, 0.009 + 0.00022 * batches)
    assert exact.alpha == pytest.approx(0.009, rel=1e-5) and exact.beta == pytest.approx(0.00022, rel=1e-5)
    assert exact.rms_log_error < 1e-6
    noisy_times = (0.009 + 0.00022 * batches) * np.exp(np.random.default_rng(0).normal(0, 0.03, len(batches)))
    noisy = goodput.fit_step_time(batches, noisy_times)
    assert noisy.alpha == pytest.approx(0.009, rel=0.15) and noisy.beta == pytest.approx(0.00022, rel=0.15)
    assert 0.005 < noisy.rms_log_error < 0.06
    # Pure overhead (no time per example) stays at beta = 0, not negative.
    flat = goodput.fit_step_time(batches, np.full(6, 0.02))
    assert flat.beta >= 0 and flat.alpha == pytest.approx(0.02, rel=1e-3)
    with pytest.raises(ValueError, match="two or more batch sizes"):
        goodput.fit_step_time([32, 32], [0.1, 0.1])
    with pytest.raises(ValueError, match="positive"):
        goodput.fit_step_time([8, 16], [0.1, 0.0])


def test_recommendation_is_the_goodput_argmax_with_a_switching_threshold():
    step_time = goodput.StepTime(alpha=0.01, beta=0.0001, rms_log_error=0.0)
    phi = 400.0
    choice = goodput.recommend(step_time, phi, 32, cap=1024, smallest=8)
    # Brute force over every integer batch: the maximum of B / (T(B) (phi + B)) is at sqrt(alpha phi / beta) = 200.
    every = np.arange(8, 1025)
    brute = int(every[np.argmax(every / step_time(every) / (phi + every))])
    assert brute == 200
    assert choice["switched"] and abs(math.log2(choice["batch"] / brute)) <= 1 / 8  # quarter-octave grid
    # The cap bounds the search.
    assert goodput.recommend(step_time, phi, 32, cap=100, smallest=8)["batch"] == 100
    # A gain below 5% keeps the base batch: here the optimum sqrt(0.01 * 40 / 0.0002) = 44.7 is close to M0 = 32,
    # and goodput(45) / goodput(32) = (45 / 0.019 * 72 / 85) / (32 / 0.0164) = 1.028.
    near = goodput.StepTime(alpha=0.01, beta=0.0002, rms_log_error=0.0)
    kept = goodput.recommend(near, 40.0, 32, cap=256, smallest=8)
    assert kept["best_batch"] == 45 and kept["gain"] == pytest.approx((45 / 0.019 * 72 / 85) / (32 / 0.0164))
    assert not kept["switched"] and kept["batch"] == 32


def test_candidates_cover_the_range_on_a_quarter_octave_grid():
    batches = goodput.candidates(32, 256, 8)
    assert batches[0] == 8 and batches[-1] == 256 and 32 in batches
    ratios = np.array(batches[1:]) / np.array(batches[:-1])
    assert np.all(ratios <= 1.25) and np.all(ratios > 1)  # 2^(1/4) = 1.19, up to rounding to integers
    assert goodput.candidates(32, 57, 8)[-1] == 57
