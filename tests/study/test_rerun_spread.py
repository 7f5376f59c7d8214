"""benchmarks/rerun_consistency.py's seeds-against-reruns check, against scipy's one-way ANOVA and by hand."""

import math

import numpy as np
import pytest
from scipy import stats

from benchmarks import rerun_consistency as bench


def reports(steps):
    """Reports whose runs hold steps[k][batch] = [steps of each seed] for rerun k (only what the check reads)."""
    return [{"runs": [{"norm": "batch", "batch": batch, "status": "completed", "steps_to_target": s}
                      for batch, seeds in rerun.items() for s in seeds]} for rerun in steps]


def simulate(rng, reruns, rerun_sd, batches=(8, 16, 32, 64, 128), seeds=2, seed_sd=0.15):
    """Steps to target 2000 / B, times a log-normal factor per rerun and group (rerun_sd) and per run (seed_sd)."""
    return [{b: [2000 / b * math.exp(shared + rng.normal(0, seed_sd)) for _ in range(seeds)]
             for b in batches for shared in [rng.normal(0, rerun_sd)]} for _ in range(reruns)]


def test_each_group_is_scipys_one_way_anova_and_the_sweep_adds_their_sums():
    steps = simulate(np.random.default_rng(0), reruns=4, rerun_sd=0.1)
    steps[2][64].append(41.0)  # a third seed in one rerun: unequal group sizes
    result = bench.seeds_against_reruns(reports(steps))
    between = within = between_dof = within_dof = 0.0
    for batch in (8, 16, 32, 64, 128):
        samples = [np.log(rerun[batch]) for rerun in steps]
        assert result["groups"][f"batch b{batch}"]["f"] == pytest.approx(stats.f_oneway(*samples).statistic)
        grand = np.mean(np.concatenate(samples))
        for v in samples:  # the sums of squares written out
            between += len(v) * (np.mean(v) - grand) ** 2
            within += sum((x - np.mean(v)) ** 2 for x in v)
        between_dof += len(samples) - 1
        within_dof += sum(len(v) for v in samples) - len(samples)
    assert result["dof"] == [between_dof, within_dof] == [15, 21]
    assert result["f"] == pytest.approx((between / between_dof) / (within / within_dof))
    assert result["p_value"] == pytest.approx(stats.f.sf(result["f"], 15, 21))


def test_a_rerun_effect_shows_and_its_absence_does_not():
    rng = np.random.default_rng(1)
    alike = [bench.seeds_against_reruns(reports(simulate(rng, 5, rerun_sd=0.0)))["p_value"] for _ in range(200)]
    # Under no rerun effect the p-value is uniform: about 5% below 0.05 (binomial sd 1.5% over 200).
    assert 0.01 <= np.mean(np.array(alike) < 0.05) <= 0.10
    apart = [bench.seeds_against_reruns(reports(simulate(rng, 5, rerun_sd=0.3)))["p_value"] for _ in range(50)]
    assert np.mean(np.array(apart) < 0.05) > 0.9  # a shared factor twice the seeds' spread is found


def test_nothing_to_compare_without_two_reruns_or_two_seeds():
    assert bench.seeds_against_reruns(reports(simulate(np.random.default_rng(2), 1, 0.1))) is None
    assert bench.seeds_against_reruns(reports(simulate(np.random.default_rng(2), 3, 0.1, seeds=1))) is None
