"""The sweep report on hand-written run directories with known numbers: fits, statistics, findings, files."""

import glob
import json
import math
import os

import numpy as np
import pytest

from pipeline import run_timing
from pipeline.study import claims
from pipeline.study import sweep_report as report_lib
from target_records import write_record

S_MIN, B_CRIT = 1000.0, 64.0  # steps to target follow S(B) = S_MIN (1 + B_CRIT / B) exactly
BATCHES = (8, 16, 32, 64, 128)
SEEDS = (0, 1, 2)
SIGMA = 3.0  # gradient std = SIGMA / sqrt(B)


def accuracy(norm, batch, seed):
    """Test accuracies with seed noise; BatchNorm is clearly worse at batch 8."""
    base = 0.90 if (norm == "batch" and batch == 8) else 0.95 + 0.001 * math.log2(batch)
    return base + 0.002 * (seed - 1) + 0.001 * seed**2


def time_per_step(batch):
    return 0.01 + 0.0004 * batch  # s; with S(B), batch 32 reaches the target in the least time


def write_run(sweep_dir, norm, batch, seed, status="completed"):
    run_dir = os.path.join(sweep_dir, "runs", f"{norm}-b{batch}-s{seed}")
    os.makedirs(run_dir)
    config = {"norm": norm, "batch": batch, "seed": seed, "lr": 0.1, "accumulate": 1, "momentum": 0.9,
              "warmup_epochs": 0.0, "target_accuracy": 0.9}
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump({"config": config, "effective_lr": 0.1 * batch / 32}, f)
    # Seeds move steps to target by -7, 0, +7 steps: the mean over seeds is exactly S(B).
    steps = S_MIN * (1 + B_CRIT / batch) + 7 * (seed - 1)
    summary = {"status": status, "reason": "loss became nan" if status == "failed" else "",
               "train_accuracy": accuracy(norm, batch, seed) + 0.01 * (seed + 1),
               "test_accuracy": accuracy(norm, batch, seed),
               "val_accuracy": 0.95, "steps": 20000, "epochs": 30, "wall_time_s": 100.0,
               "time_per_step_s": time_per_step(batch), "examples_per_sec": batch / time_per_step(batch),
               "steps_to_target": steps, "epochs_to_target": steps * batch / 1293,
               "time_to_target_s": steps * time_per_step(batch)}
    if status == "failed":
        summary.update(test_accuracy=None, train_accuracy=None, val_accuracy=None, steps_to_target=None)
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f)
    if status == "completed":  # 400 validation examples, accuracy rising 0.5 per steps to target
        write_record(run_dir, steps, 0.9, seconds_per_step=time_per_step(batch))
    with open(os.path.join(run_dir, "grad_stats.jsonl"), "w") as f:
        for k in range(11):  # at 0, S/8, ..., 10 S/8: five of them (k = 4..8) in [S/2, S]
            f.write(json.dumps({"step": steps * k / 8, "grad/batch_std": SIGMA / math.sqrt(batch) * (1 + k / 8),
                                "grad/noise_scale": 10.0 + k + seed, "grad/trace_cov": 1.0 + k / 8,
                                "grad/norm_sq": 0.1 + seed / 10, "grad/trace_cov_se": 0.05 * (1.0 + k / 8),
                                "grad/norm_sq_se": 0.005, "batch_size": batch, "micro_batches": 32}) + "\n")
    if norm == "batch":
        averages = [{"step": step, "batch_mean_error": 0.5 / math.sqrt(batch),
                     "batch_var_error": (1 + step / 100) / math.sqrt(batch), "moving_mean_error": 0.1,
                     "moving_var_error": 0.2} for step in (0, 50, 100)]
        with open(os.path.join(run_dir, "bn_stats.json"), "w") as f:
            json.dump({"every_n_steps": 5, "averages": averages, "layers": {}}, f)


@pytest.fixture
def sweep_dir(tmp_path):
    for norm in ("batch", "group"):
        for batch in BATCHES:
            for seed in SEEDS:
                write_run(str(tmp_path), norm, batch, seed)
    write_run(str(tmp_path), "batch", 256, 0, status="failed")
    with open(tmp_path / "sweep.json", "w") as f:
        json.dump({"batches": list(BATCHES), "norms": ["batch", "group"], "seeds": list(SEEDS),
                   "budget": {"kind": "epochs", "amount": 30}, "tuner": None,
                   "config": {"dataset": "digits", "model": "cnn", "lr": 0.1, "base_batch": 32,
                              "lr_scaling": "linear"}}, f)
    return str(tmp_path)


def test_time_per_step_leaves_out_tracing_and_measuring():
    history = [{"epoch": e, "step": 10 * (e + 1), "epoch_time_s": t} for e, t in enumerate([10.0, 1.0, 3.0, 1.2])]
    assert run_timing.time_per_step(history) == pytest.approx(np.median([0.1, 0.3, 0.12]))
    history[2]["instrument_time_s"] = 1.9  # the slow epoch measured for 1.9 s
    assert run_timing.time_per_step(history) == pytest.approx(np.median([0.1, 0.11, 0.12]))
    assert run_timing.time_per_step(history[:1]) == pytest.approx(1.0)  # one epoch: nothing else to use


def test_report_numbers(sweep_dir):
    report = report_lib.build_report(sweep_dir)
    groups = {(g["norm"], g["batch"]): g for g in report["groups"]}
    for norm in ("batch", "group"):
        for batch in BATCHES:
            group = groups[norm, batch]
            tests = [accuracy(norm, batch, s) for s in SEEDS]
            trains = [accuracy(norm, batch, s) + 0.01 * (s + 1) for s in SEEDS]
            assert group["test_accuracy"]["mean"] == pytest.approx(np.mean(tests), abs=1e-12)
            assert group["test_accuracy"]["std"] == pytest.approx(np.std(tests, ddof=1), abs=1e-12)
            gaps = np.subtract(trains, tests)
            assert group["generalization_gap"]["mean"] == pytest.approx(gaps.mean(), abs=1e-12)
            assert group["time_per_step_ms"]["mean"] == pytest.approx(1000 * time_per_step(batch))
            stds = [SIGMA / math.sqrt(batch) * (1 + k / 8) for k in range(11)]
            assert group["grad_std"]["mean"] == pytest.approx(math.sqrt(sum(x * x for x in stds) / 11))
            # B_simple near the target: mean trace over k = 4..8 (1.75) over mean |G|^2 (0.1 + seed / 10), then the
            # mean over seeds.
            assert group["noise_scale"]["mean"] == pytest.approx(np.mean([1.75 / (0.1 + s / 10) for s in SEEDS]))
            assert group["reached"] == 3
        fit = report["fits"][norm]
        assert fit["steps_to_target"]["s_min"] == pytest.approx(S_MIN, rel=1e-9)
        assert fit["steps_to_target"]["b_crit"] == pytest.approx(B_CRIT, rel=1e-9)
        assert fit["grad_std"]["slope"] == pytest.approx(-0.5, abs=1e-9)
    bn_errors = [(1 + step / 100) / math.sqrt(8) for step in (0, 50, 100)]
    assert groups["batch", 8]["bn_batch_var_error"]["mean"] == pytest.approx(np.sqrt(np.mean(np.square(bn_errors))))
    assert groups["group", 8]["bn_batch_var_error"]["mean"] is None
    assert report["fits"]["batch"]["bn_batch_var_error"]["slope"] == pytest.approx(-0.5, abs=1e-9)
    assert groups["batch", 256]["completed"] == 0 and groups["batch", 256]["failed"] == ["batch-b256-s0"]

    text = "\n".join(report["findings"])
    # Batch 32's 68.4 s and batch 64's 71.2 s lie within the validation noise (about +-6% of the steps at 2 binomial
    # standard errors of 400 examples); batch 128's 1500 steps lie clearly below batch 64's 2000.
    assert "5 batch sizes reached 90% validation accuracy in every run." in text
    assert ("BatchNorm: which batch took the least time is not resolved: batch 32 and 64 are not distinguishable "
            "(68.4 s of training [") in text
    assert "BatchNorm: batch 128 took the fewest steps (1500 steps [" in text
    assert "The intervals include the run-to-run spread over seeds: every draw also deviates by a Student-t draw" \
        in claims.spread_note(report)
    interval = report["fits"]["batch"]["steps_to_target_interval"]
    assert interval["b_crit"][0] < B_CRIT < interval["b_crit"][1]
    assert interval["s_min"][0] < S_MIN < interval["s_min"][1]
    assert "diminishing returns begin at batch 64" in text
    assert "Yes: BatchNorm fell behind GroupNorm" in text
    assert "S_min = 1000 ± 0 steps and B_crit = 64.0 ± 0.0" in text
    assert ("Yes: steps to target went as B^-0.65 ± 0.05 (5 batch sizes; residual standard error, larger than the "
            "seeds' spread)") in text
    # Seed standard errors: sample std / sqrt(3) of each norm's accuracies at batch 8, combined.
    bn, gn = ([accuracy(norm, 8, s) for s in SEEDS] for norm in ("batch", "group"))
    noise = math.hypot(np.std(bn, ddof=1) / math.sqrt(3), np.std(gn, ddof=1) / math.sqrt(3))
    assert f"standard error of the difference {noise:.4f}" in text
    assert "Yes: the gradient's standard deviation went as B^-0.50 ± 0.00 (5 batch sizes; " in text
    assert "BatchNorm: Yes: BatchNorm's batch-vs-population variance discrepancy went as B^-0.50 ± 0.00" in text
    assert "batch-b256-s0" in text

    for name in ("accuracy", "steps_to_target", "grad_std", "noise_scale", "bn_discrepancy", "throughput"):
        assert os.path.getsize(os.path.join(sweep_dir, f"{name}.png")) > 1000
    with open(os.path.join(sweep_dir, "report.json")) as f:
        assert json.load(f)["fits"]["batch"]["steps_to_target"]["b_crit"] == pytest.approx(B_CRIT)
    with open(os.path.join(sweep_dir, "report.md")) as f:
        markdown = f.read()
    assert "| batch | 8 |" in markdown and "batch-b256-s0: failed loss became nan" in markdown


def test_hparams_sessions(sweep_dir):
    import tensorflow as tf

    report_lib.build_report(sweep_dir)
    files = glob.glob(os.path.join(sweep_dir, "tensorboard", "**", "events.out.tfevents.*"), recursive=True)
    sessions, metrics = set(), set()
    for path in files:
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "hparams" and value.tag == "_hparams_/session_start_info":
                    sessions.add(os.path.basename(os.path.dirname(path)))
                elif value.tag == "test_accuracy":
                    metrics.add(os.path.basename(os.path.dirname(path)))
    assert len(sessions) == len(BATCHES) * len(SEEDS) * 2 + 1
    assert "group-b16-s2" in metrics and "batch-b256-s0" not in metrics


def test_single_seed_has_no_std(tmp_path):
    for batch in (16, 64, 256):
        write_run(str(tmp_path), "group", batch, 0)
    # Batch 256 completed without reaching the target; its best validation accuracy comes from metrics.jsonl.
    run_dir = tmp_path / "runs" / "group-b256-s0"
    summary = json.loads((run_dir / "summary.json").read_text())
    (run_dir / "summary.json").write_text(json.dumps(summary | {"steps_to_target": None, "time_to_target_s": None}))
    (run_dir / "metrics.jsonl").write_text("".join(
        json.dumps({"epoch": e, "step": 5 * (e + 1), "epoch_time_s": 10.0 if e == 0 else 2.0, "val_accuracy": v}) + "\n"
        for e, v in enumerate([0.5, 0.85])))  # epoch 0 includes tracing
    report = report_lib.build_report(str(tmp_path), tensorboard=False)
    assert all(g["test_accuracy"]["std"] is None for g in report["groups"])
    assert "± " not in report_lib.headline(report)
    assert "Batch 256 did not reach 90% within the budget (best validation accuracy 0.8500)." in report["findings"]
    assert report["groups"][-1]["time_per_step_ms"]["mean"] == pytest.approx(1000 * 2.0 / 5)  # epochs 2+ only
    assert "| group | 256 |" in report_lib.headline(report) and "– (0/1)" in report_lib.headline(report)


def test_empty_sweep_dir(tmp_path):
    with pytest.raises(report_lib.InputError, match="holds no runs"):
        report_lib.build_report(str(tmp_path))


def test_one_seed_compares_norms_within_binomial_noise(tmp_path):
    for norm, test_accuracy in (("batch", 358 / 360), ("group", 359 / 360)):
        for batch in (8, 64):
            write_run(str(tmp_path), norm, batch, 0)
            path = tmp_path / "runs" / f"{norm}-b{batch}-s0" / "summary.json"
            path.write_text(json.dumps(json.loads(path.read_text()) | {"test_accuracy": test_accuracy}))
    (tmp_path / "sweep.json").write_text(json.dumps({"num_test": 360, "config": {}}))
    report = report_lib.build_report(str(tmp_path), tensorboard=False)
    # One example apart on 360: the binomial standard errors sqrt(p (1 - p) / 360) combined are larger.
    noise = math.hypot(math.sqrt(358 / 360 * 2 / 360 / 360), math.sqrt(359 / 360 * 1 / 360 / 360))
    assert (f"No: BatchNorm was within noise of GroupNorm at the smallest batch (8): test accuracy 0.9944 vs 0.9972 "
            f"(standard error of the difference {noise:.4f}; a verdict needs 1.96 of them; binomial over the test "
            "examples, one seed: run-to-run spread unknown).") in report["findings"]
