"""Bootstrap intervals of steps to target: against a brute-force resampling loop, and on synthetic sweeps whose
validation noise and run-to-run spread are known (a resolved and an unresolved winner; a fit whose interval widens
with the seeds' spread)."""

import json
import math

import numpy as np
import pytest

from pipeline.study import bootstrap, claims
from pipeline.study import sweep_report as report_lib
from study.test_findings import TARGET, write_run


def test_first_crossings_match_a_brute_force_loop():
    """Per resample: draw N example indices, count the right ones at every check in Python, take the first check
    at or above the target (C when none is); the vectorized chunks must give the same crossings."""
    rng = np.random.default_rng(5)
    checks, examples, target, resamples = 12, 50, 0.8, 450  # 450: more than two chunks of CHUNK
    rising = np.linspace(0.6, 0.9, checks)
    correct = rng.random((checks, examples)) < rising[:, None]
    draws = np.random.default_rng(bootstrap.SEED)
    expected = []
    for _ in range(resamples):
        drawn = draws.integers(0, examples, size=examples)
        first = checks
        for c in range(checks):
            if sum(bool(correct[c][i]) for i in drawn) / examples >= target:
                first = c
                break
        expected.append(first)
    found = bootstrap.first_crossings(correct, target, resamples)
    assert found.tolist() == expected
    assert len(set(expected)) >= 4  # the crossing moves between resamples: a case worth checking

    # The run's interval: the 2.5% and 97.5% points of the crossings (rounded outwards), mapped to the checks' steps.
    record = {"steps": 10 * np.arange(1, checks + 1), "epochs": np.zeros(checks, int),
              "epoch_fractions": np.arange(1, checks + 1) / 100, "seconds_into_epoch": 0.5 * np.arange(1, checks + 1),
              "correct": correct, "target": target}
    result = bootstrap.run_draws(record, history=[])
    crossings = np.sort(bootstrap.first_crossings(correct, target))
    last = len(crossings) - 1
    low, high = crossings[int(np.floor(0.025 * last))], crossings[int(np.ceil(0.975 * last))]
    assert result["intervals"]["steps_to_target"] == [10.0 * (low + 1), 10.0 * (high + 1) if high < checks else None]
    assert result["beyond_record"] == pytest.approx(np.mean(crossings == checks))
    assert result["intervals"]["time_to_target_s"][0] == pytest.approx(0.5 * (low + 1))


def sweep(tmp_path, runs, seeds):
    """Completed runs {(batch, seed): write_run keywords}, and sweep.json."""
    for (batch, seed), kwargs in runs.items():
        write_run(str(tmp_path), batch, seed=seed, grad_std=1.0, **kwargs)
    (tmp_path / "sweep.json").write_text(json.dumps({"num_test": 2000, "config": {}, "seeds": list(seeds)}))
    return report_lib.build_report(str(tmp_path), tensorboard=False)


def test_winner_resolved_only_where_intervals_separate(tmp_path):
    """Batch 64 needs 300 steps x 0.08 s = 24 s and batch 32 needs 480 x 0.0566 s = 27.2 s (time per step 0.01
    sqrt(B)). With the validation accuracy rising steeply through the target (0.5 of it per steps to target on 400
    examples) the intervals are about +-6% and separate the two; with a shallow rise (0.02: a crossing within a
    binomial standard error of the target for a long stretch) they overlap, and the report names no winner."""
    steep = sweep(tmp_path / "steep", {(32, 0): dict(steps_to_target=480), (64, 0): dict(steps_to_target=300)}, [0])
    assert steep["answers"]["target"][1].startswith("Batch 64 took the least time (24.0 s of training [")
    assert "its 95% interval lies below that of the runner-up, batch 32 (27.2 s of training [" in \
        steep["answers"]["target"][1]
    shallow = sweep(tmp_path / "shallow", {(32, 0): dict(steps_to_target=480, rise=0.02),
                                           (64, 0): dict(steps_to_target=300, rise=0.02)}, [0])
    sentence = shallow["answers"]["target"][1]
    assert sentence.startswith("Which batch took the least time is not resolved: batch 64 and 32 are not "
                               "distinguishable (24.0 s of training [")
    assert "took the least time (" not in " ".join(shallow["findings"])
    for report in (steep, shallow):  # one seed: the intervals hold only the validation noise, and the report says so
        assert report["answers"]["target"][3].startswith("Run-to-run spread is unknown: one seed per batch size")
        assert not report["run_to_run_known"]
    # Two binomial standard errors (0.03) span 1.5 steps to target at this rise, beyond the record's S +- S: more than
    # 2.5% of the resamples cross at no recorded check, so the upper ends are unbounded.
    for group in shallow["groups"]:
        assert group["target_interval"]["beyond_record"] > 0.025
        assert group["target_interval"]["steps_to_target"][1] is None


def test_winner_not_resolved_when_seeds_disagree(tmp_path):
    """Clean validation (steep rise) but three seeds per batch whose steps spread +-30%: the run-to-run spread alone
    keeps batch 64 (mean 300 steps) from being told apart from batch 32 (mean 330)."""
    runs = {(batch, seed): dict(steps_to_target=round(mean * (1 + 0.3 * (seed - 1))))
            for batch, mean in ((32, 330), (64, 300)) for seed in range(3)}
    report = sweep(tmp_path, runs, range(3))
    assert report["run_to_run_known"]
    assert report["answers"]["target"][2].startswith("Which batch took the fewest steps is not resolved: batch 64 "
                                                     "and 32 are not distinguishable (300 steps [")
    assert len(report["answers"]["target"]) == 3  # no "run-to-run spread is unknown"


def fit_interval(tmp_path, spread):
    """B_crit's bootstrap interval on S(B) = 300 (1 + 40 / B) at batch 8 ... 128 with three seeds per batch whose
    steps are S(B) x exp(spread x (seed - 1)) (so that the seeds' geometric mean is S(B) itself)."""
    runs = {(b, seed): dict(steps_to_target=round(300 * (1 + 40 / b) * math.exp(spread * (seed - 1))))
            for b in (8, 16, 32, 64, 128) for seed in range(3)}
    report = sweep(tmp_path, runs, range(3))
    return report["fits"]["batch"]["steps_to_target_interval"], report


def test_fit_interval_widens_with_replicate_spread(tmp_path):
    narrow, narrow_report = fit_interval(tmp_path / "narrow", 0.01)
    wide, report = fit_interval(tmp_path / "wide", 0.2)
    for interval in (narrow, wide):
        assert interval["b_crit"][0] < 40 < interval["b_crit"][1]
    assert wide["b_crit"][1] - wide["b_crit"][0] > 3 * (narrow["b_crit"][1] - narrow["b_crit"][0])
    assert wide["s_min"][1] - wide["s_min"][0] > narrow["s_min"][1] - narrow["s_min"][0]
    assert narrow["direction"] == "falls"
    # The onset of diminishing returns (batch 32 on the exact curve) is as stable as the steps behind it.
    assert narrow["onsets"]["32"] >= 0.95 and wide["onsets"]["32"] < narrow["onsets"]["32"]
    assert sum(wide["onsets"].values()) == pytest.approx(1.0)
    # Named only where LEVEL of the draws agree; otherwise the report says it is not resolved.
    assert narrow_report["answers"]["steps"][1].startswith("Diminishing returns begin at batch 32")
    assert narrow_report["answers"]["steps"][1].endswith(f"In {narrow['onsets']['32']:.0%} of the bootstrap draws "
                                                         "the onset is the same.")
    assert report["answers"]["steps"][1] == (f"Where returns diminish is not resolved: the mean steps put the onset at "
                                             f"batch 32, which {wide['onsets']['32']:.0%} of the bootstrap draws share "
                                             "(a resolved onset needs 95%).")
    fit_sentence = report["answers"]["steps"][-1]
    assert "95% bootstrap intervals S_min [" in fit_sentence
    assert "(the validation noise and the run-to-run spread over seeds)" in fit_sentence


def test_slope_interval_widens_with_replicate_spread_and_decides_only_when_resolved(tmp_path):
    """Time per step 0.01 B^0.1 s x exp(spread x (seed - 1)) at batch 8, 32, 128, two seeds: the seeds' means lie
    exactly on the law (no residuals), so only the seeds' spread can widen the slope's error. With 1% spread the
    rise is resolved ("Yes"); with 40% it is not ("Not clearly"), and the standard error is the seeds' (written out:
    the pooled relative variance over sum n (log B - mean)^2)."""
    def report(spread):
        runs = {(b, seed): dict(steps_to_target=300, rise=None,  # no target record: the fits alone
                                time_per_step=0.01 * b**0.1 * math.exp(spread * (seed - 1)))
                for b in (8, 32, 128) for seed in range(2)}
        return sweep(tmp_path / str(spread), runs, range(2))

    narrow, wide = report(0.01), report(0.4)
    fits = [r["fits"]["batch"]["time_per_step"] for r in (narrow, wide)]
    for fit, spread in zip(fits, (0.01, 0.4)):
        factors = np.exp(spread * np.arange(-1, 1))
        relative_var = np.var(factors, ddof=1) / np.mean(factors) ** 2
        x = np.log([8, 32, 128])
        assert fit["slope"] == pytest.approx(0.1, abs=1e-9) and fit["residual_se"] < 1e-9
        assert fit["slope_se"] == pytest.approx(math.sqrt(relative_var / (2 * np.sum((x - x.mean()) ** 2))), rel=1e-9)
    assert fits[1]["slope_se"] > 10 * fits[0]["slope_se"]
    assert narrow["answers"]["time_per_step"][0].startswith("Yes: time per step went as B^0.10 ± 0.00 (3 batch sizes; "
                                                            "standard error from the seeds' spread, 3 degrees of "
                                                            "freedom)")
    # The interval's half-width is the t quantile of the seeds' 3 degrees of freedom, 3.18 standard errors, not 2.
    assert wide["answers"]["time_per_step"][0].startswith("Not clearly (flat within 3.2 standard errors, the 95% t "
                                                          "quantile on 3 degrees of freedom): time per step went as "
                                                          "B^0.10 ± 0.")


@pytest.fixture(scope="module")
def censored_reports(tmp_path_factory):
    """Batch 32 and 64 reach the target (480 and 300 steps: batch 64 ahead, separated) and batch 128 never does,
    trained for 2000 steps ("long") or 100 ("short"); "swapped": batch 32 ahead (300 against 480 steps)."""
    root = tmp_path_factory.mktemp("censored")

    def report(name, trained, steps_32=480, steps_64=300):
        return sweep(root / name, {(32, 0): dict(steps_to_target=steps_32), (64, 0): dict(steps_to_target=steps_64),
                                   (128, 0): dict(steps_to_target=None, steps=trained)}, [0])

    return {"long": report("long", 2000), "short": report("short", 100), "swapped": report("swapped", 2000, 300, 480)}


def test_runs_that_never_reach_the_target_are_censored_not_dropped(censored_reports):
    """Trained for 2000 steps (226 s at 0.113 s per step), batch 128's bound lies above batch 64's interval and the
    winner stands; trained for only 100 steps (11.3 s), it could still be the fastest, and the report says the winner
    is not resolved."""
    long, short = censored_reports["long"], censored_reports["short"]
    censored = next(g for g in long["groups"] if g["batch"] == 128)["censored_bound"]
    assert censored == pytest.approx({"steps_to_target": 2000, "time_to_target_s": 2000 * 0.01 * 128**0.5})
    assert long["answers"]["target"][1].startswith("Batch 64 took the least time (24.0 s of training [")
    assert long["answers"]["target"][1].endswith("and below the bounds of the batch sizes whose runs did not all "
                                                 "reach the target.")
    assert "Batch 128 did not reach 90% within the budget" in long["answers"]["target"][-1]
    assert long["answers"]["steps"][-1].endswith("(censored: their steps are known only from below; batch 128: 1 of 1 "
                                                 "runs, steps to target above 2000 on average).")
    assert short["answers"]["target"][2] == (
        "Which batch took the fewest steps is not resolved: batch 64 leads the batch sizes that reached the target in "
        f"every run ({claims.measured_text(short['groups'][1], 'steps_to_target', '{:.0f}', ' steps')}), but runs "
        "that did not reach it leave open batch 128 (1 of 1 runs did not reach the target: its mean is known only to "
        "exceed 100 steps).")
    assert short["answers"]["target"][1].startswith("Which batch took the least time is not resolved: batch 64 leads")
    assert not any("took the least time (" in s or "took the fewest steps (" in s for s in short["findings"])


def test_rerun_verdicts_pair_findings_by_topic_and_ignore_undetermined(censored_reports):
    """benchmarks/rerun_consistency.py on the reports of synthetic reruns: the winner resolved in one rerun and not in
    another is consistent; batch 64 in one and batch 32 in another is not; every sentence of these reports is
    classified as information, undetermined or one of the verdicts written out here."""
    from benchmarks import rerun_consistency as bench

    long, short, swapped = (censored_reports[name] for name in ("long", "short", "swapped"))
    agreeing = bench.compare([long, short])
    assert agreeing["findings"]["target: the least time"]["heads"] == ["batch 64", "not resolved"]
    assert agreeing["findings"]["target: the fewest steps"]["consistent"]
    assert agreeing["findings"]["target: batch 128 did not reach the target"]["information"]
    assert agreeing["all_verdicts_consistent"]
    assert agreeing["all_b_crit_inside"] is None  # two batch sizes reached the target: no B_crit to compare
    disagreeing = bench.compare([long, swapped])
    assert disagreeing["findings"]["target: the least time"] == {"heads": ["batch 64", "batch 32"],
                                                                 "consistent": False, "decided": 2,
                                                                 "information": False}
    assert not disagreeing["all_verdicts_consistent"]
    known = {"batch 64", "batch 32", "Yes", "No", "No, not as predicted", "No, they rose", "No, it fell",
             "best accuracy at batch 32", "best accuracy at batch 64", "onset at batch 32", "no onset"}
    for report in (long, short, swapped):
        for question, sentences in report["answers"].items():
            for sentence in sentences:
                head = bench.verdict(sentence, question)
                assert head == bench.INFO or bench.UNDETERMINED.search(head) or head in known, (sentence, head)
    # The rules on their own: undetermined wording never counts as a verdict, nor does a finding left out.
    assert bench.consistent(["Yes", "Not enough data", "(absent)", "Yes"])
    assert not bench.consistent(["Yes", "No"])
    assert bench.consistent(["No, not as predicted", "Not clearly", bench.INFO])
    assert bench.verdict("No: BatchNorm was within noise of GroupNorm at the smallest batch (8): ...", "bn_vs_gn") == \
        "within noise"
    assert bench.classify("replicas", "BatchNorm: at global batch 64, test accuracy was 0.95 on 1 replica(s) and 0.90 "
                          "on 4; the difference -0.0500 is more than 2 standard errors of the difference") == \
        ("replicas: BatchNorm: accuracy at global batch 64", "accuracy lower on more replicas")
    # B_crit against the other reruns' intervals and rerun intervals (the third has a rerun interval open above).
    def fitted(b_crit, interval, rerun):
        return {"answers": {}, "fits": {"batch": {"steps_to_target": {"b_crit": b_crit}, "steps_to_target_interval":
                                                  {"b_crit": interval, "b_crit_rerun": rerun}}}}

    crits = bench.compare([fitted(158.0, [47.0, 253.0], [30.0, 400.0]), fitted(48.0, [16.0, 111.0], [9.0, 150.0]),
                           fitted(49.0, [22.0, 117.0], [12.0, None])])
    found = {(x["rerun"], x["in_interval_of"]): (x["inside"], x["inside_rerun_interval"]) for x in crits["b_crit_inside"]}
    assert found == {(0, 1): (False, False), (0, 2): (False, True), (1, 0): (True, True), (1, 2): (True, True),
                     (2, 0): (True, True), (2, 1): (True, True)}
    assert crits["all_b_crit_inside"] is False and crits["all_b_crit_inside_rerun_intervals"] is False


def efron_over_seeds(members, rng):
    """The former across-run draw, kept here as the baseline: the mean over seeds drawn with replacement."""
    stacked = np.stack(members)
    picks = rng.integers(0, len(members), size=(stacked.shape[1], len(members)))
    return stacked[picks, np.arange(stacked.shape[1])[:, None]].mean(axis=1)


def test_intervals_cover_the_true_curve_with_two_seeds(monkeypatch):
    """Coverage against the truth: 150 synthetic sweeps of S(B) = 50 (1 + 50 / B) at batch 8 ... 128, 2 seeds each,
    every run's steps S(B) x exp(0.2 N(0, 1)) (20% lognormal run-to-run spread, no validation noise, so the seeds'
    spread is all there is to cover). The 95% intervals of B_crit and of batch 32's steps must hold the true B_crit
    (50) and S(32) in about 95% of the sweeps (>= 90% asserted); the former bootstrap over the 2 seeds, on the same
    sweeps, covers far less (about 75% and 55%): it gives a batch whose 2 seeds happen to agree no spread at all."""
    s_min, b_crit, sigma, batches, seeds, sweeps = 50.0, 50.0, 0.2, (8, 16, 32, 64, 128), 2, 150
    monkeypatch.setattr(bootstrap, "RESAMPLES", 200)  # 200 draws per fit keep 150 sweeps within seconds
    rng = np.random.default_rng(3)
    keys = bootstrap.TARGET_KEYS

    def covers(interval, truth):
        return interval[0] is not None and interval[0] <= truth and (interval[1] is None or truth <= interval[1])

    hits = {"pooled Student-t": np.zeros(2), "bootstrap over seeds": np.zeros(2)}
    for _ in range(sweeps):
        steps = {b: s_min * (1 + b_crit / b) * np.exp(sigma * rng.standard_normal(seeds)) for b in batches}
        rows = [{"norm": "batch", "batch": b, "replicas": 1, "status": "completed",
                 **{key: float(s) for key in keys},
                 "target_draws": {"draws": {key: np.full(200, s) for key in keys}, "beyond_record": 0.0}}
                for b in batches for s in steps[b]]
        groups = [{"norm": "batch", "batch": b, "replicas": 1} for b in batches]
        draws = bootstrap.add_group_intervals(groups, rows)
        assert groups[2]["target_interval"]["seed_spread"]["dof"] == len(batches) * (seeds - 1)
        former = [efron_over_seeds([np.full(200, s) for s in steps[b]], rng) for b in batches]
        for name, per_batch in (("pooled Student-t", [draws[("batch", b, 1)]["steps_to_target"] for b in batches]),
                                ("bootstrap over seeds", former)):
            fit = bootstrap.fit_intervals(list(batches), per_batch)
            hits[name] += [covers(fit["b_crit"], b_crit),
                           covers(bootstrap.percentile_interval(per_batch[2]), s_min * (1 + b_crit / 32))]
    coverage = {name: (h / sweeps).round(3).tolist() for name, h in hits.items()}
    print("coverage of [B_crit, S(32)] by the 95% intervals:", coverage)
    assert min(coverage["pooled Student-t"]) >= 0.90
    assert max(coverage["bootstrap over seeds"]) < 0.85


def test_rerun_factors_match_a_loop_over_pairs():
    rng = np.random.default_rng(5)
    values = np.concatenate([rng.lognormal(4, 0.6, 37), [math.inf, math.inf, 0.0]])
    ratios = []
    for i, a in enumerate(values):
        for j, b in enumerate(values):
            if i != j:
                ratios.append(1.0 if a == b and (a == 0 or math.isinf(a)) else a / b if b else math.inf)
    ratios = np.sort(ratios)
    tail = (1 - bootstrap.LEVEL) / 2
    expected = [ratios[int(np.floor(tail * (len(ratios) - 1)))], ratios[int(np.ceil((1 - tail) * (len(ratios) - 1)))]]
    assert bootstrap.rerun_factors(values) == pytest.approx(expected, rel=1e-9)
    assert bootstrap.rerun_factors([3.0, 3.0, 3.0]) == [1.0, 1.0]


def test_a_rerun_lands_in_the_rerun_interval_about_as_often_as_its_level(monkeypatch):
    """Simulated reruns of one sweep (S(B) = 50 (1 + 50 / B), batch 8 ... 128, 2 seeds, 20% lognormal run-to-run
    spread): each sweep's fitted B_crit against every other sweep's intervals. The rerun interval holds the other
    estimate in about 95% of the pairs (0.961 measured, >= 0.90 asserted); the interval of the true B_crit holds it
    less often (0.892 here; about 0.83 for two estimates with equal normal errors), which is why a report that says
    where a rerun lands needs the former."""
    s_min, b_crit, sigma, batches, seeds, sweeps = 50.0, 50.0, 0.2, (8, 16, 32, 64, 128), 2, 60
    monkeypatch.setattr(bootstrap, "RESAMPLES", 200)
    rng = np.random.default_rng(11)
    keys = bootstrap.TARGET_KEYS
    estimates, rerun, confidence = [], [], []
    for _ in range(sweeps):
        steps = {b: s_min * (1 + b_crit / b) * np.exp(sigma * rng.standard_normal(seeds)) for b in batches}
        rows = [{"norm": "batch", "batch": b, "replicas": 1, "status": "completed", **{key: float(s) for key in keys},
                 "target_draws": {"draws": {key: np.full(200, s) for key in keys}, "beyond_record": 0.0}}
                for b in batches for s in steps[b]]
        groups = [{"norm": "batch", "batch": b, "replicas": 1, "reached": seeds, "completed": seeds,
                   "steps_to_target": {"mean": float(np.mean(steps[b]))}} for b in batches]
        draws = bootstrap.add_group_intervals(groups, rows)
        point = report_lib.fits_lib.fit_steps_to_target(list(batches), [float(np.mean(steps[b])) for b in batches])
        fit = bootstrap.fit_for_norm(groups, "batch", draws, point["b_crit"])
        estimates.append(point["b_crit"])
        rerun.append(fit["b_crit_rerun"])
        confidence.append(fit["b_crit"])

    def holds(interval, value):
        return (interval[0] is None or interval[0] <= value) and (interval[1] is None or value <= interval[1])

    pairs = [(i, j) for i in range(sweeps) for j in range(sweeps) if i != j]
    in_rerun = np.mean([holds(rerun[i], estimates[j]) for i, j in pairs])
    in_confidence = np.mean([holds(confidence[i], estimates[j]) for i, j in pairs])
    print(f"another sweep's B_crit inside: rerun interval {in_rerun:.3f}, interval of the true B_crit "
          f"{in_confidence:.3f}")
    assert in_rerun >= 0.90
    assert in_confidence < in_rerun - 0.05
