"""Each generated finding on synthetic sweeps whose true answer is known: only one batch reached, two points,
not enough data, a direction opposite to the literature, and a sweep where everything agrees."""

import json
import math
import os

import numpy as np
import pytest
from scipy import stats

from pipeline.study import accuracy_findings, findings, run_row
from pipeline.study import sweep_report as report_lib
from target_records import write_record

TARGET = 0.9


def write_run(sweep_dir, batch, *, steps_to_target, grad_std, bn_error=None, test_accuracy=0.95, steps=2000,
              noise=lambda step: (10.0, 0.1), norm="batch", measurements=17, seed=0, rise=0.5, time_per_step=None):
    """One completed run: config, summary, gradient measurements spread over its steps, BN averages, and a record of
    its target checks whose validation accuracy rises by `rise` per steps to target (None: no record)."""
    run_dir = os.path.join(sweep_dir, "runs", f"{norm}-b{batch}-s{seed}")
    os.makedirs(run_dir)
    config = {"norm": norm, "batch": batch, "seed": seed, "lr": 0.1, "target_accuracy": TARGET}
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump({"config": config, "effective_lr": 0.1}, f)
    time_per_step = time_per_step or 0.01 * batch**0.5
    summary = {"status": "completed", "train_accuracy": test_accuracy + 0.01, "test_accuracy": test_accuracy,
               "val_accuracy": test_accuracy, "steps": steps, "epochs": 10, "time_per_step_s": time_per_step,
               "steps_to_target": steps_to_target, "epochs_to_target": None, "wall_time_s": 10.0,
               "time_to_target_s": steps_to_target * time_per_step if steps_to_target else None}
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f)
    with open(os.path.join(run_dir, "grad_stats.jsonl"), "w") as f:
        for step in np.linspace(0, steps, measurements):
            trace, norm_sq = noise(step)
            f.write(json.dumps({"step": float(step), "grad/batch_std": grad_std, "grad/trace_cov": trace,
                                "grad/norm_sq": norm_sq, "grad/noise_scale": trace / norm_sq,
                                "grad/trace_cov_se": 0.05 * trace, "grad/norm_sq_se": 0.05 * norm_sq,
                                "batch_size": batch, "micro_batches": 32,
                                "grad/noise_scale_is_lower_bound": bool(step == steps)}) + "\n")
    if steps_to_target and rise is not None:
        write_record(run_dir, steps_to_target, TARGET, rise=rise, seconds_per_step=time_per_step)
    if bn_error is not None:
        with open(os.path.join(run_dir, "bn_stats.json"), "w") as f:
            json.dump({"averages": [{"step": 0, "batch_var_error": bn_error, "batch_mean_error": bn_error / 2}]}, f)


def build(tmp_path, runs, num_test=2000):
    for batch, kwargs in runs.items():
        write_run(str(tmp_path), batch, **kwargs)
    (tmp_path / "sweep.json").write_text(json.dumps({"num_test": num_test, "config": {}}))
    return report_lib.build_report(str(tmp_path), tensorboard=False)


def test_only_one_batch_reached(tmp_path):
    report = build(tmp_path, {16: dict(steps_to_target=500, grad_std=2.0), 64: dict(steps_to_target=None, grad_std=1.0)})
    answers = report["answers"]
    # Batch 64 trained 2000 steps (160 s) without reaching the target: censored above batch 16's 500 steps (20 s),
    # so batch 16 is the winner although it is the only batch size that reached the target.
    assert answers["target"][0] == ("1 batch size reached 90% validation accuracy in every run; 1 had runs that did "
                                    "not (below).")
    assert answers["target"][1].startswith("Batch 16 took the least time (20.0 s of training [")
    assert answers["target"][1].endswith("]); its 95% interval lies below the bounds of the batch sizes whose runs did "
                                         "not all reach the target.")
    assert answers["target"][2].startswith("Batch 16 took the fewest steps (500 steps [")
    assert answers["steps"][0].startswith("Not enough data: 1 batch size(s) reached the target")
    assert "is not determined: 1 batch size(s) reached the target in every run (it needs 3)" in answers["steps"][1]
    assert answers["target"][-1] == "Batch 64 did not reach 90% within the budget."
    # Censored, not dropped: the fits say what they leave out, with the bound (the 2000 steps the run trained).
    assert answers["steps"][2] == ("The slope, the onset and the S(B) fit of steps to target leave out the batch "
                                   "sizes whose runs did not all reach the target (censored: their steps are known "
                                   "only from below; batch 64: 1 of 1 runs, steps to target above 2000 on average).")
    report_lib.build_report(str(tmp_path), tensorboard=False)  # rebuilt from report.json's runs: same curves
    rows = [run_row.read_run(str(tmp_path / "runs" / name)) for name in ("batch-b16-s0", "batch-b64-s0")]
    assert [p["lower_bound"] for p in rows[0]["noise_curve"]] == [False] * 16 + [True]  # the last: a bound
    assert os.path.getsize(tmp_path / "noise_scale.png") > 1000
    # The plot marks batch 64 as never reached and does not promise a fit it does not draw.
    assert os.path.getsize(tmp_path / "steps_to_target.png") > 1000


def test_two_points(tmp_path):
    report = build(tmp_path, {16: dict(steps_to_target=800, grad_std=2.0, bn_error=0.2),
                              64: dict(steps_to_target=300, grad_std=1.0, bn_error=0.1)})
    answers = report["answers"]
    # Least time and fewest steps among the two that reached: batch 64 (300 steps x 0.08 s against 800 x 0.04 s).
    # Validation accuracy rises by half the target's distance per steps to target on 400 examples: tight intervals.
    assert answers["target"][0] == "2 batch sizes reached 90% validation accuracy in every run."
    assert answers["target"][1].startswith("Batch 64 took the least time (24.0 s of training [")
    assert answers["target"][2].startswith("Batch 64 took the fewest steps (300 steps [")
    assert answers["target"][3].startswith("Run-to-run spread is unknown: one seed per batch size")
    assert answers["grad_std"] == ["Not enough data: the gradient's standard deviation was measured at 2 batch "
                                   "size(s); a fitted slope needs 3."]
    assert answers["bn"][0].startswith("Not enough data: BatchNorm's batch-vs-population variance discrepancy was "
                                       "measured at 2 batch size(s)")
    assert "The fit S(B) = S_min (1 + B_crit / B) is not determined: 2 batch size(s)" in answers["steps"][1]
    assert report["fits"]["batch"]["steps_to_target"]["b_crit_se"] is None
    fits_table = report_lib.fits_markdown(report)
    assert "| batch | not determined | not determined | 2 |" in fits_table
    assert "-0.50 (2 points, not determined)" in fits_table


def test_directions_opposite_to_the_literature(tmp_path):
    # Gradient noise and BN error rise with B, steps to target rise, the noise scale falls during training.
    def falling(step):
        return 100.0 * (1 + 0.02 * math.sin(step)), 1.0 + step / 500

    runs = {b: dict(steps_to_target=100 * b ** 0.5, grad_std=0.1 * b ** 0.3 * (1 + 0.01 * i), bn_error=0.01 * b ** 0.4,
                    noise=falling) for i, b in enumerate((8, 16, 32, 64))}
    answers = build(tmp_path, runs)["answers"]
    assert answers["grad_std"][0].startswith("No: the gradient's standard deviation went as B^0.31 ± 0.00 "
                                             "(4 batch sizes; residual standard error; run-to-run spread unknown with one "
                                             "seed); "
                                             "sigma / sqrt(B) predicts B^-0.50")
    assert answers["grad_std"][0].endswith("but the data rose (opposite to the literature).")
    assert answers["bn"][0].startswith("No: BatchNorm's batch-vs-population variance discrepancy went as B^0.40")
    assert answers["steps"][0].startswith("No, they rose (opposite to the literature): steps to target went as B^0.50")
    assert answers["noise_growth"][0].startswith("No, it fell (opposite to McCandlish et al. 2018, who find that it "
                                                 "grows): B_simple pooled over the last quarter")
    assert "fell at batch 8, 16, 32, 64" in answers["noise_growth"][0]
    assert answers["noise_growth"][0].endswith("(grew or fell: the last quarter's 95% interval lies above or below the "
                                               "first quarter's; unclear: the two overlap).")


def test_noise_growth_names_each_verdict_and_counts_the_runs_without_both_quarters():
    runs = [{"norm": "batch", "batch": b, "noise_growth": v}
            for b, v in ((8, "unclear"), (16, "not enough data"), (64, "grew"), (128, "grew"), (128, "not enough data"))]
    text, = findings._noise_growth({"groups": [{}], "runs": runs}, "batch", "")
    assert text == ("Yes: B_simple pooled over the last quarter of each run's steps against the first quarter grew at "
                    "batch 64, 128; unclear at batch 8 (grew or fell: the last quarter's 95% interval lies above or "
                    "below the first quarter's; unclear: the two overlap); 2 run(s) had no interval in one of the "
                    "quarters.")


def test_not_enough_data(tmp_path):
    # Two measurements per run: no window holds two, and no gradient measurement lands in [S/2, S].
    runs = {b: dict(steps_to_target=None, grad_std=1 / b ** 0.5, measurements=2) for b in (8, 32)}
    report = build(tmp_path, runs)
    answers = report["answers"]
    assert answers["noise_growth"][0].startswith("Not enough data: in no run did B_simple's intervals")
    assert answers["noise_scale"][0].startswith("Not enough data: no run has an interval for B_simple near the target")
    assert answers["target"][0].startswith("Not enough data: 0 batch size(s) reached")
    assert answers["bn"] == [] and answers["bn_vs_gn"] == [] and answers["tuning"] == []
    assert report_lib.answer(report, "bn").data.startswith("- Not enough data")


def test_everything_agrees(tmp_path):
    """S(B) = 300 (1 + 40 / B), gradient std and BN error as B^-0.5, each off by +-3% alternately (symmetric, so
    the fits are unbiased and have a standard error), B_simple near the target about 40, the noise scale growing
    10-fold over each run: every answer is a yes."""
    rng = np.random.default_rng(1)

    def growing(step):  # B_simple = 4 + 72 step / steps: about 40 over the second half of the way to the target
        return 4.0 + 72.0 * step / 2000 * (1 + 0.02 * rng.normal()), 1.0

    runs = {}
    for i, b in enumerate((8, 16, 32, 64, 128)):
        scatter = math.exp(0.03 * (-1) ** i)
        runs[b] = dict(steps_to_target=300 * (1 + 40 / b) * scatter, grad_std=3 / b ** 0.5 * scatter,
                       bn_error=0.5 / b ** 0.5 * scatter, noise=growing)
    report = build(tmp_path, runs)
    answers = report["answers"]
    fit = report["fits"]["batch"]["steps_to_target"]
    assert fit["determined"] and abs(fit["b_crit"] - 40) < 2 * fit["b_crit_se"] + 4
    assert answers["steps"][0].startswith("Yes: steps to target went as B^")
    assert answers["steps"][-1].startswith("The fit S(B) = S_min (1 + B_crit / B) over 5 batch sizes gives S_min = ")
    assert answers["grad_std"][0].startswith("Yes: the gradient's standard deviation went as B^-0.")
    assert answers["bn"][0].startswith("Yes: BatchNorm's batch-vs-population variance discrepancy went as B^-0.")
    assert answers["noise_growth"][0].startswith("Yes: B_simple pooled over the last quarter")
    assert answers["time_per_step"][0].startswith("Yes: time per step went as B^0.50 ± 0.00 (5 batch sizes; residual "
                                                   "standard error; run-to-run spread unknown with one seed)")
    assert answers["noise_scale"][0].startswith("Yes: B_simple near the target")
    assert answers["target"][0].startswith("5 batch sizes reached")
    # Every batch's test accuracy is 0.95 on one seed: no best batch can be named.
    assert answers["accuracy"][0].startswith("Not determined: the highest mean test accuracy, 0.9500 at batch ")
    assert not any(s.startswith(("No:", "No,", "Not enough data")) for s in report["findings"])


def write_replica_run(sweep_dir, norm, batch, replicas, *, bn_error, test_accuracy, status="completed"):
    """One run of a sweep over replicas at global batch `batch`: config.json with its devices, summary, BN averages."""
    run_dir = os.path.join(sweep_dir, "runs", f"{norm}-b{batch}-r{replicas}-s0")
    os.makedirs(run_dir)
    config = {"norm": norm, "batch": batch, "seed": 0, "lr": 0.1, "target_accuracy": 0.0, "replicas": replicas}
    bn_batch = batch if norm == "syncbatch" else batch // replicas
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump({"config": config, "effective_lr": 0.1,
                   "parallel": {"strategy": "mirrored", "replicas": replicas, "per_replica_batch": batch // replicas}}, f)
    done = status == "completed"
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump({"status": status, "test_accuracy": test_accuracy if done else None, "steps": 100, "epochs": 2,
                   "train_accuracy": test_accuracy if done else None, "bn_batch": bn_batch, "wall_time_s": 5.0}, f)
    with open(os.path.join(run_dir, "bn_stats.json"), "w") as f:
        json.dump({"averages": [{"step": 0, "batch_var_error": bn_error, "batch_mean_error": bn_error / 2}]}, f)


def test_replicas_bn_error_against_the_batch_per_device(tmp_path):
    """Per-replica BN at global batch 64 on 1, 2, 4 replicas: the error goes as (B / R)^-0.5 (+-3% alternately)
    and test accuracy falls by 0.05, 6 binomial standard errors on 2000 test examples; synchronized BN keeps the
    BN batch at 64 and its accuracy within noise."""
    for i, replicas in enumerate((1, 2, 4)):
        write_replica_run(str(tmp_path), "batch", 64, replicas, bn_error=0.5 / (64 / replicas) ** 0.5
                          * math.exp(0.03 * (-1) ** i), test_accuracy={1: 0.95, 2: 0.93, 4: 0.90}[replicas])
        write_replica_run(str(tmp_path), "syncbatch", 64, replicas, bn_error=0.06, test_accuracy=0.95 - 0.001 * i)
    (tmp_path / "sweep.json").write_text(json.dumps({"num_test": 2000, "config": {}, "replicas": [1, 2, 4]}))
    report = report_lib.build_report(str(tmp_path), tensorboard=False)
    assert [(g["norm"], g["replicas"]) for g in report["groups"]] == [("batch", 1), ("syncbatch", 1)]
    assert [(g["replicas"], g["per_replica_batch"], g["bn_batch"]) for g in report["replica_groups"]] == [
        (1, 64, 64), (2, 32, 32), (4, 16, 16), (1, 64, 64), (2, 32, 64), (4, 16, 64)]
    table = report_lib.headline(report)
    assert "| norm | batch | replicas | per-replica batch | BN batch | lr |" in table
    assert "| batch | 64 | 4 | 16 | 16 | 0.1 | 0.9000 |" in table and "| syncbatch | 64 | 4 | 16 | 64 |" in table
    fit = report["replica_fits"]["batch"]["bn_batch_var_error"]
    x, y = np.log([64, 32, 16]), np.log([g["bn_batch_var_error"]["mean"] for g in report["replica_groups"][:3]])
    assert fit["slope"] == pytest.approx(np.polyfit(x, y, 1)[0]) and abs(fit["slope"] + 0.5) < 2 * fit["slope_se"]
    bn, accuracy, sync_bn, sync_accuracy = report["answers"]["replicas"]
    assert bn.startswith("BatchNorm: Yes: BatchNorm's batch-vs-population variance discrepancy went as (BN batch)^-0.")
    assert "(3 points, residual standard error; run-to-run spread unknown with one seed: " \
        "0.0644 at BN batch 64 (batch 64 on 1 replica), 0.0858 at BN batch 32" in bn
    assert accuracy.startswith("BatchNorm: at global batch 64, test accuracy was 0.9500 on 1 replica(s) (64 examples "
                               "per device) and 0.9000 on 4 (16 per device); the difference -0.0500 is more than 1.96")
    assert sync_bn.startswith("Synchronized BatchNorm: the BN batch was 64 examples at every replica count")
    assert "the difference -0.0020 is not more than 1.96 standard errors" in sync_accuracy  # binomial: normal
    assert os.path.getsize(tmp_path / "replicas.png") > 1000


def test_replicas_not_enough_data(tmp_path):
    write_replica_run(str(tmp_path), "batch", 32, 1, bn_error=0.1, test_accuracy=0.9)
    write_replica_run(str(tmp_path), "batch", 32, 2, bn_error=0.14, test_accuracy=None, status="failed")
    (tmp_path / "sweep.json").write_text(json.dumps({"num_test": 2000, "config": {}}))
    answers = report_lib.build_report(str(tmp_path), tensorboard=False)["answers"]
    assert answers["replicas"][0] == ("Not enough data: BatchNorm's batch-vs-population variance discrepancy was "
                                      "0.1 at BN batch 32 (batch 32 on 1 replica), at one replica count; a "
                                      "comparison needs two.")
    assert answers["replicas"][1] == ("Not enough data: at global batch 32, 1 replica count(s) completed; a "
                                      "comparison needs two.")
    assert answers["failed"] == ["Yes: 1 run(s) failed: batch-b32-r2-s0 (see each run's summary.json)."]


def _group(batch, accuracies):
    values = np.asarray(accuracies, float)
    return {"batch": batch, "test_accuracy": {"mean": float(values.mean()), "n": len(values),
                                              "std": float(values.std(ddof=1)) if len(values) > 1 else None},
            "generalization_gap": {"mean": 0.01}}


def test_the_best_accuracy_is_named_only_beyond_the_pooled_noise_of_the_runner_up():
    report = {"sweep": {"num_test": 360}}
    # Two seeds that agree exactly give batch 8 a std of 0; its own std and the runner-up's would make the 0.002
    # lead 2.6 standard errors. The seeds' variance pooled over the five batch sizes (5 degrees of freedom) does not.
    seeds = {8: [0.990, 0.990], 16: [0.9880, 0.9884], 32: [0.980, 0.988], 64: [0.975, 0.985], 128: [0.970, 0.982]}
    groups = [_group(b, v) for b, v in seeds.items()]
    pooled = sum(np.var(v, ddof=1) for v in seeds.values()) / 5  # n - 1 = 1 per batch size
    se = math.sqrt(pooled * (1 / 2 + 1 / 2))
    own = math.hypot(0.0, np.std(seeds[16], ddof=1) / math.sqrt(2))
    assert 0.0018 > 2 * own and 0.0018 < 2 * se
    assert accuracy_findings.fits_lib.difference_noise(groups[0]["test_accuracy"], groups[1]["test_accuracy"], 360,
                                              [g["test_accuracy"] for g in groups]) == pytest.approx(se)
    text, = accuracy_findings.accuracy(report, groups, "")
    assert text.startswith("not determined: the highest mean test accuracy, 0.9900 at batch 8, is not "
                           "distinguishable from batch 16's 0.9882")
    assert f"against a standard error of {se:.4f}; the seeds' variance pooled over 5 batch sizes, 5 degrees" in text
    # Best minus worst is 2.5 of those errors: beyond 2, but inside the 95% interval of an error from 5 degrees of
    # freedom, t_5 = 2.57.
    assert 2 < 0.0140 / se < stats.t.ppf(0.975, 5)
    assert "best minus worst (batch 128, 0.9760) 0.0140, not more than 2.57 standard errors" in text
    # Seeds that agree within 0.002 everywhere (pooled standard error of a difference 0.0014): a lead of 0.013 is
    # beyond it, and batch 8 is named.
    seeds = {8: [1.0, 0.998], 16: [0.985, 0.987], 32: [0.98, 0.982], 64: [0.975, 0.977], 128: [0.97, 0.972]}
    text, = accuracy_findings.accuracy(report, [_group(b, v) for b, v in seeds.items()], "")
    assert text.startswith("batch 8 gave the best test accuracy, 0.9990, above the runner-up, batch 16 (0.9860), by "
                           "0.0130: more than 2.57 standard errors of the difference (0.0014; the seeds' variance "
                           "pooled")
    # One seed each: the test set's binomial error, and run-to-run spread unknown.
    text, = accuracy_findings.accuracy(report, [_group(8, [0.99]), _group(16, [0.95])], "")
    binomial = math.hypot(math.sqrt(0.99 * 0.01 / 360), math.sqrt(0.95 * 0.05 / 360))
    assert text.startswith(f"batch 8 gave the best test accuracy, 0.9900, above the runner-up, batch 16 (0.9500), by "
                           f"0.0400: more than 1.96 standard errors of the difference ({binomial:.4f}; binomial")


def _noise_fit(b_crit_interval, rerun):
    return {"steps_to_target": {"determined": True, "b_crit": 54.1, "b_crit_se": 11.7},
            "b_simple_interval": {"low": 147.0, "high": 1250.0, "runs": 6, "unbounded": 0, "lower_bounds": []},
            "steps_to_target_interval": {"b_crit": b_crit_interval, "b_crit_rerun": rerun}}


def test_b_crit_against_b_simple_says_no_only_where_a_rerun_would_not_overlap_either():
    # The fifth rerun of the default sweep: its interval misses B_simple's [147, 1250] and its rerun interval reaches it.
    text, = findings._noise_scale(_noise_fit([27.4, 140.2], [17.5, 166.8]), "")
    assert text.startswith("Not clearly: B_simple near the target")
    assert "does not overlap it, but where a rerun's B_crit would fall, [17.5, 167], does" in text
    text, = findings._noise_scale(_noise_fit([27.4, 120.0], [17.5, 140.0]), "")
    assert text.startswith("No: ") and "does not overlap it, nor does where a rerun's B_crit would fall, [17.5, 140]" in text
    text, = findings._noise_scale(_noise_fit([27.4, 150.0], [None, None]), "")
    assert text.startswith("Yes: ") and "[27.4, 150] overlaps it (McCandlish" in text
    # An unbounded rerun interval (B_crit's draws reach 0 and infinity) always reaches B_simple.
    assert findings._noise_scale(_noise_fit([27.4, 120.0], [None, None]), "")[0].startswith("Not clearly")
