"""The batch-size advisor: noise probe on a problem with a known noise scale, out-of-memory handling, advice files,
train --advice, the sweep report's prediction check, and the command line's bad input."""

import dataclasses
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from pipeline import config as config_lib
from pipeline import advised_config
from pipeline.advisor import advice_report as advice_lib
from pipeline.advisor import probe
from pipeline.training import goodput, step_times
from pipeline.study import prediction_check

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LADDER = (8, 16, 32, 64, 128, 256)


def measured(noise, alpha=0.01, beta=0.0004, fails_above=None):
    """probe.probe()'s dict with a given noise measurement and step times T = alpha + beta B."""
    rows = [{"batch": b, "seconds_per_step": alpha + beta * b} for b in LADDER if not fails_above or b <= fails_above]
    if fails_above:
        rows.append({"batch": 2 * fails_above, "error": "out of memory (ResourceExhaustedError: OOM)"})
    phase = {"steps": 100, "planned_steps": 500, "fraction_of_run": 0.2, "loss_start": 2.3, "loss_end": 0.4,
             "val_accuracy": 0.9, "target_accuracy": 0.98}
    return {"noise": noise | {"steps": 100}, "phase": phase, "ladder": rows, "num_train": 1293,
            "seconds": {"total": 10.0}}


def known_noise(phi=64.0, spread=1.1, norm_sq=1.0, norm_sq_lo=0.9):
    """A pooled noise measurement (callbacks.noise_estimates.pool's keys) with B_simple = phi in [phi/spread,
    phi*spread] and |G|^2 = norm_sq with lower end norm_sq_lo (<= 0: indistinguishable from zero)."""
    determined = norm_sq_lo > 0
    return {"trace_cov": phi * norm_sq, "trace_cov_lo": 0.9 * phi * norm_sq, "trace_cov_hi": 1.1 * phi * norm_sq,
            "norm_sq": norm_sq, "norm_sq_lo": norm_sq_lo, "norm_sq_hi": 2 * norm_sq - norm_sq_lo,
            "noise_scale": phi if determined else phi / spread, "noise_scale_lo": phi / spread,
            "noise_scale_hi": phi * spread if determined else math.inf, "noise_scale_is_lower_bound": not determined,
            "measurements": 24, "first_step": 50, "last_step": 96}


def test_probe_finds_the_known_noise_scale_of_least_squares():
    """Linear least squares, x ~ N(0, I_d), y = x.w* + eps, eps ~ N(0, s^2), at weights w = w* + r:
    g = 2 x (x.r - eps) per example, G = 2 r, Sigma = 4 ((|r|^2 + s^2) I + r r^T), so
    B_simple = (d (|r|^2 + s^2) + |r|^2) / |r|^2 (Gaussian fourth moments). With d = 10, |r|^2 = 1, s^2 = 1: 21."""
    import keras
    import tensorflow as tf

    d, n, batch = 10, 60000, 32
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, d)).astype(np.float32)
    w_star = rng.normal(size=(d, 1)).astype(np.float32)
    r = np.zeros((d, 1), np.float32)
    r[0] = 1.0
    y = x @ w_star + rng.normal(size=(n, 1)).astype(np.float32)
    true_phi = (d * (1 + 1) + 1) / 1

    model = keras.Sequential([keras.Input((d,)), keras.layers.Dense(1, use_bias=False)])
    model.compile(optimizer=keras.optimizers.SGD(1e-7), loss="mse")  # the weights stay at w* + r
    model.layers[0].kernel.assign(w_star + r)

    def batches(seed):
        return tf.data.Dataset.from_tensor_slices((x, y)).shuffle(n, seed=seed).repeat().batch(batch, True)

    noise = probe.measure_noise(model, probe.any_batch(batches(1)), batches(2), 60, batch_size=batch)
    assert noise["measurements"] == 15 and noise["first_step"] == 32  # every other step of the second half
    assert noise["noise_scale_lo"] <= true_phi <= noise["noise_scale_hi"]
    assert noise["noise_scale_hi"] / noise["noise_scale_lo"] < advice_lib.MAX_SPREAD
    assert noise["norm_sq_lo"] <= 4 <= noise["norm_sq_hi"]  # |G|^2 = |2 r|^2

    # The advice for this problem on a machine with T(B) = 10 ms + 0.05 ms B: the true optimum is
    # sqrt(alpha phi / beta) = sqrt(0.01 * 21 / 5e-5) = 64.8; the batches advised at the ends of the interval bound it.
    config = dataclasses.replace(config_lib.Config(), base_batch=batch, lr=0.1, optimizer="sgd")
    advice = advice_lib.build(measured(noise, alpha=0.01, beta=5e-5), config, max_batch=256)
    assert advice["status"] == "recommended"
    low, high = advice["prediction"]["batch_range"]
    assert low / 2 ** 0.125 <= math.sqrt(0.01 * true_phi / 5e-5) <= high * 2 ** 0.125
    assert advice["lr"] == pytest.approx(0.1 * float(goodput.adascale_gain(advice["batch"], noise["noise_scale"], 32)))


def test_out_of_memory_is_reported_and_caps_the_advice():
    import tensorflow as tf

    tried = []

    def fake_steps(batch):
        tried.append(batch)
        if batch > 64:
            raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor with shape[128,16,32,32]")
        return [0.01 + 0.0004 * batch] * 4

    rows = step_times.time_ladder(fake_steps, LADDER)
    assert tried == [8, 16, 32, 64, 128]  # stops at the first failure
    assert [r["batch"] for r in rows] == [8, 16, 32, 64, 128]
    assert "error" not in rows[3] and rows[4]["error"].startswith("out of memory (ResourceExhaustedError: OOM")

    def host_memory(batch):
        if batch >= 32:
            raise MemoryError()
        return [0.02, 0.01, 0.03]

    rows = step_times.time_ladder(host_memory, LADDER)
    assert rows[0]["seconds_per_step"] == pytest.approx(np.quantile([0.02, 0.01, 0.03], step_times.QUANTILE))
    assert rows[-1] == {"batch": 32, "error": "out of memory (MemoryError: MemoryError)"}

    # With noise that favours large batches, the advice stays 10% under the largest batch that ran.
    config = dataclasses.replace(config_lib.Config(), base_batch=32)
    advice = advice_lib.build(measured(known_noise(phi=5000.0), fails_above=64), config, max_batch=256)
    assert advice["cap"] == 57 and advice["batch"] == 57
    assert max(r["batch"] for r in advice["table"]) == 57


def test_undetermined_noise_recommends_a_longer_probe(tmp_path):
    config = config_lib.Config()
    advice = advice_lib.build(measured(known_noise(norm_sq=0.05, norm_sq_lo=-0.1)), config, max_batch=256)
    assert advice["status"] == "undetermined" and "batch" not in advice
    assert "indistinguishable from zero" in advice["message"] and "--probe-steps 200" in advice["message"]
    advice = advice_lib.build(measured(known_noise(spread=2.5)), config, max_batch=256)  # 25.6 to 160: 6.25x
    assert advice["status"] == "undetermined" and "spans more than" in advice["message"]
    advice_lib.write(advice, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["advice.json", "advice.md"]
    with pytest.raises(config_lib.InputError, match="--advice: .* holds no recommendation"):
        advised_config.read(str(tmp_path / "advice.json"))


@pytest.fixture(scope="module")
def advice_dir(tmp_path_factory):
    """A recommendation for the smoke preset (cnn on digits) from known numbers, written to disk."""
    out = str(tmp_path_factory.mktemp("advice"))
    config = dataclasses.replace(config_lib.smoke(), base_batch=32, lr=0.05)
    advice = advice_lib.build(measured(known_noise(phi=400.0), alpha=0.01, beta=0.0001), config, max_batch=256)
    advice_lib.write(advice, out)
    return out


def test_advice_files(advice_dir):
    advice = advised_config.read(advice_dir)
    assert sorted(os.listdir(advice_dir)) == ["advice.json", "advice.md", "goodput.png"]
    # T = 10 ms + 0.1 ms B and phi = 400: the optimum sqrt(0.01 * 400 / 0.0001) = 200 lies between the grid's 181
    # and 215; goodput (B / T(B) / (phi + B)) is 0.0879 at 181 and 0.0880 at 215.
    assert advice["batch"] == 215 and advice["prediction"]["switched"]
    assert advice["lr"] == pytest.approx(0.05 * (215 / 32) * (400 + 32) / (400 + 215))
    # Speed-up over batch 32: (1 + 400/32) T(32) / ((1 + 400/215) T(215)) = 13.5 * 0.0132 / (2.8605 * 0.0315).
    assert advice["prediction"]["speedup"] == pytest.approx(13.5 * 0.0132 / ((1 + 400 / 215) * 0.0315))
    text = open(os.path.join(advice_dir, "advice.md")).read()
    assert "use batch 215" in text and "B_simple grows later in training" in text and "| 215 **<-** |" in text


def test_train_uses_the_advice_and_records_it(advice_dir, tmp_path):
    from pipeline import train

    advice = advised_config.read(advice_dir)
    config = dataclasses.replace(config_lib.smoke(), epochs=1, export=False, dynamics=False, precise_bn_samples=0,
                                 grad_stats_every=0, bn_stats_every=0, advice=advice["path"],
                                 run_dir=str(tmp_path / "run"))
    summary = train.train(config)
    assert summary.status == "completed" and summary.batch_source.startswith(f"advice {advice['path']}: batch 215")
    recorded = json.load(open(tmp_path / "run" / "config.json"))
    assert recorded["config"]["batch"] == 215 and recorded["config"]["advice"] == advice["path"]
    assert recorded["effective_lr"] == pytest.approx(advice["lr"])
    assert summary.steps == 1293 // 215
    with pytest.raises(config_lib.InputError, match="--advice: .* measured with --model cnn"):
        train.train(dataclasses.replace(config, model="mlp", run_dir=str(tmp_path / "other")))


def test_sweep_report_puts_the_prediction_beside_the_measurements(tmp_path):
    from study.test_sweep_report import B_CRIT, BATCHES, S_MIN, SEEDS, write_run

    from pipeline.study import sweep_report

    for batch in BATCHES:
        for seed in SEEDS:
            write_run(str(tmp_path), "batch", batch, seed)
    # The report's synthetic sweep follows S(B) = S_MIN (1 + B_CRIT / B) and T(B) = 10 ms + 0.4 ms B: an advice
    # with that noise scale and step time predicts it exactly.
    config = dataclasses.replace(config_lib.smoke(), norm="batch", base_batch=32)
    advice = advice_lib.build(measured(known_noise(phi=B_CRIT)), config, max_batch=256)
    advice_lib.write(advice, str(tmp_path))
    report = sweep_report.build_report(str(tmp_path), tensorboard=False)
    result = report["prediction"]
    assert result["s_min"] == pytest.approx(S_MIN, rel=1e-9)
    for row in result["rows"]:
        assert row["predicted_step_ms"] == pytest.approx(10 + 0.4 * row["batch"])
        assert row["steps_off"] == pytest.approx(1.0) and row["time_off"] == pytest.approx(1.0)
        # An exact prediction lies inside the measured bootstrap intervals.
        assert row["steps_inside"] and row["time_inside"]
        assert row["measured_steps_interval"][0] < row["measured_steps"] < row["measured_steps_interval"][1]
    assert result["fastest_batch"] == result["predicted_fastest"] == 32
    # Batch 32's 68.4 s and batch 64's 71.2 s are within the validation noise of each other (test_report).
    assert result["fastest_resolved"] is False and result["runner_up_batch"] == 64
    text = open(tmp_path / "report.md").read()
    assert ("measured fastest: not resolved: batch 32 and 64 are not distinguishable (their intervals overlap)"
            in text)
    assert "| 1.00x (inside) |" in text
    # The optimum sqrt(0.01 * 64 / 0.0004) = 40 gains 1.1% over batch 32, under the 5% needed to switch.
    assert "## Predicted vs measured (batch-size advisor)" in text and "recommended batch 32" in text
    assert prediction_check.check(advice, [{"norm": "group"}]) is None
    # ms/step against the seeds' interval, mean ± 2 std / sqrt(n): a 1 ms spread over 3 seeds holds the prediction,
    # a step time measured 20% slower does not; one seed has no interval (run-to-run spread unknown).
    groups = [g | {"time_per_step_ms": {"mean": (10 + 0.4 * g["batch"]) * (1.2 if g["batch"] == 64 else 1.0),
                                        "std": 1.0 if g["batch"] != 128 else None, "n": 3 if g["batch"] != 128 else 1}}
              for g in report["groups"]]
    rows = {r["batch"]: r for r in prediction_check.check(advice, groups)["rows"]}
    assert rows[32]["measured_step_ms_interval"] == pytest.approx([22.8 - 2 / math.sqrt(3), 22.8 + 2 / math.sqrt(3)])
    assert rows[32]["step_ms_inside"] is True and rows[64]["step_ms_inside"] is False
    assert rows[128]["measured_step_ms_interval"] is None and rows[128]["step_ms_inside"] is None
    # A batch with a run that never reached the target, censored at 1 s: it could be the fastest, and is named.
    censored = [g | {"reached": g["completed"] - 1, "censored_bound": {"steps_to_target": 10.0,
                                                                       "time_to_target_s": 1.0}}
                if g["batch"] == 128 else g for g in report["groups"]]
    result = prediction_check.check(advice, censored)
    assert result["fastest_batch"] == 32 and result["fastest_not_ruled_out"] == [128]
    assert ("measured fastest: not resolved: batch 32 and 64 are not distinguishable (their intervals overlap); the "
            "runs of batch 128 that did not reach the target bound their time only from below, under batch 32's upper "
            "end.") in prediction_check.markdown(result)


def run_module(module, *args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=120)


@pytest.mark.parametrize("module, args, words", [
    ("pipeline.advise", ["--max-batch", "16"], ["--max-batch", "--base-batch"]),
    ("pipeline.advise", ["--probe-steps", "many"], ["--probe-steps", "integer"]),
    ("pipeline.advise", ["--probe-steps", "3"], ["--probe-steps", "at least 8"]),
    ("pipeline.advise", ["--model", "resnet7"], ["--model", "resnet20"]),
    ("pipeline.train", ["--advice", "/nonexistent/advice.json"], ["--advice", "/nonexistent/advice.json"]),
    ("pipeline.train", ["--advice", "x.json", "--batch-schedule", "32@0"], ["--advice", "--batch-schedule"]),
])
@pytest.mark.slow
def test_bad_input_is_one_line_and_exit_2(module, args, words):
    result = run_module(module, *args)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and all(word in errors[0] for word in words), result.stderr[-2000:]
