"""--batch adaptive: decisions against the goodput and norm-test arithmetic worked with NumPy, a real digits run that
grows its batch, exact resume across a change, and one-line errors for bad values."""

import dataclasses
import json
import math
import os
import types

import numpy as np
import pytest

from pipeline import config as config_lib
from pipeline import train as train_entry
from pipeline.training import adaptive_batch, batch_policy
from test_fit_loop import checkpoint_weights  # the last checkpoint's arrays (tests/training/)

BASE = 32


def goodput_by_hand(batch, phi, alpha, beta):
    """Examples per second times (phi + M0) / (phi + B), without the constant phi + M0: Pollux's goodput up to a
    factor that every batch shares."""
    return batch / (alpha + beta * batch) / (phi + batch)


def test_goodput_decisions_follow_a_synthetic_noise_stream():
    alpha, beta = 0.010, 0.0001  # T_step(B) = 10 ms + 0.1 ms per example
    step_time = batch_policy.goodput.StepTime(alpha, beta, 0.0)
    batches = batch_policy.grid(BASE, 1000)
    assert batches == [32, 64, 128, 256, 512]
    # By hand at phi = 200, B = 32: goodput(64) / goodput(32) = (64 / 0.0164 / 264) / (32 / 0.0132 / 232)
    # = 14.782 / 10.449 = 1.4147, and goodput(16) is off the grid: the batch doubles.
    first = batch_policy.decide("goodput", 32, {"noise_scale": 200.0}, batches, base_batch=BASE, step_time=step_time)
    assert first["new_batch"] == 64
    assert first["predicted_gain"] == pytest.approx((64 / 0.0164 / 264) / (32 / 0.0132 / 232), rel=1e-12)
    # A stream of noise scales as training goes (growing, then a measurement that is only a bound, then none).
    stream = [{"noise_scale": 200.0}, {"noise_scale": 260.0}, {"noise_scale": 2000.0},
              {"noise_scale": math.nan, "noise_scale_lo": 900.0}, None, {"noise_scale": 2400.0},
              {"noise_scale": 150.0}]
    batch, expected = BASE, []
    for noise in stream:
        phi = None if noise is None else next((v for v in (noise.get("noise_scale"), noise.get("noise_scale_lo"))
                                               if v is not None and np.isfinite(v)), None)
        if phi is None:
            expected.append(batch)
            continue
        bound = noise.get("noise_scale") is None or not np.isfinite(noise["noise_scale"])
        neighbours = np.array([b for b in batches if (batch if bound else batch / 2) <= b <= 2 * batch])
        values = goodput_by_hand(neighbours, phi, alpha, beta) / goodput_by_hand(batch, phi, alpha, beta)
        best = int(neighbours[np.argmax(values)])
        batch = best if values.max() > 1.05 else batch
        expected.append(batch)
    batch, decided = BASE, []
    for noise in stream:
        batch = batch_policy.decide("goodput", batch, noise, batches, base_batch=BASE, step_time=step_time)["new_batch"]
        decided.append(batch)
    assert decided == expected
    # The goodput peak sqrt(alpha phi / beta) (141 at phi 200, 447 at 2000, 122 at 150) is followed one octave at a
    # time; at phi 2400 and B 256, 512 gains x1.061 (> 1.05), at phi 900 it would lose (x0.952).
    assert decided == [64, 128, 256, 256, 256, 512, 256]


def test_a_lower_bound_grows_the_batch_but_never_shrinks_it():
    alpha, beta = 0.010, 0.0001
    step_time = batch_policy.goodput.StepTime(alpha, beta, 0.0)
    batches = batch_policy.grid(BASE, 1000)
    # At phi = 6 and B = 64, goodput(32) / goodput(64) = (32 / 0.0132 / 38) / (64 / 0.0164 / 70) = 1.144: a point
    # estimate of 6 halves the batch, a lower bound of 6 (the true phi may be far larger) keeps it.
    by_hand = goodput_by_hand(32, 6.0, alpha, beta) / goodput_by_hand(64, 6.0, alpha, beta)
    assert by_hand == pytest.approx((32 / 0.0132 / 38) / (64 / 0.0164 / 70), rel=1e-12) and by_hand > 1.05
    point = batch_policy.decide("goodput", 64, {"noise_scale": 6.0}, batches, base_batch=BASE, step_time=step_time)
    assert point["new_batch"] == 32 and point["predicted_gain"] == pytest.approx(by_hand, rel=1e-12)
    bound = batch_policy.decide("goodput", 64, {"noise_scale": None, "noise_scale_lo": 6.0}, batches,
                                base_batch=BASE, step_time=step_time)
    assert bound["new_batch"] == 64 and 32 not in bound["goodput"] and "bounded below" in bound["reason"]
    # A bound high enough that the larger batch wins at it: the larger batch wins at any phi above, so it grows.
    grow = goodput_by_hand(128, 2000.0, alpha, beta) / goodput_by_hand(64, 2000.0, alpha, beta)
    assert grow > 1.05
    bound = batch_policy.decide("goodput", 64, {"noise_scale": math.nan, "noise_scale_lo": 2000.0}, batches,
                                base_batch=BASE, step_time=step_time)
    assert bound["new_batch"] == 128 and bound["predicted_gain"] == pytest.approx(grow, rel=1e-12)


def test_norm_test_doubles_while_the_batch_is_below_b_simple_over_theta_squared():
    batches = batch_policy.grid(BASE, 256)
    theta = 0.5  # doubles while B < phi / theta^2 = 4 phi, up to the grid's end (256)
    for phi, batch, new in [(10.0, 32, 64), (7.9, 32, 32), (100.0, 256, 256), (64.0, 128, 256), (33.0, 128, 256),
                            (31.9, 128, 128)]:
        decision = batch_policy.decide("norm-test", batch, {"noise_scale": phi}, batches, base_batch=BASE,
                                       theta=theta)
        assert decision["new_batch"] == new, (phi, batch)


def test_lr_gain_is_adascale_r_from_variance_and_squared_norm():
    trace, norm_sq = 6.4, 0.05  # per-example tr(Sigma) and |G|^2
    var, sqr = trace / BASE, norm_sq  # the gradient variance at the base batch, and the squared mean gradient
    for batch in (64, 256):
        s = batch / BASE
        assert batch_policy.lr_gain(batch, trace / norm_sq, BASE, "sgd") == pytest.approx(
            (var + sqr) / (var / s + sqr), rel=1e-12)
        assert batch_policy.lr_gain(batch, trace / norm_sq, BASE, "adam") == pytest.approx(
            math.sqrt((var + sqr) / (var / s + sqr)), rel=1e-12)


def record(step, trace, norm_sq):
    return {"step": step, "batch_size": BASE, "micro_batches": 8, "grad/trace_cov": trace, "grad/norm_sq": norm_sq,
            "grad/trace_cov_se": 0.01 * trace, "grad/norm_sq_se": 0.01 * norm_sq, "grad/trace_norm_sq_corr": 0.0}


def test_controller_pools_since_the_last_decision_records_and_restores(tmp_path):
    """The callback on a synthetic measurement stream: each decision pools the records after the previous one,
    decides as the hand computation does, writes its line, and set_state cuts the file back."""
    gradients = types.SimpleNamespace(history=[], batch_size=BASE)
    controller = adaptive_batch.AdaptiveBatch("goodput", gradients, batch_policy.grid(BASE, 512), base_batch=BASE,
                                              optimizer="sgd", num_train=1280, epochs=10, run_dir=str(tmp_path))
    alpha, beta = 0.010, 0.0001
    controller.ladder = {b: alpha + beta * b for b in controller.batches}
    model = types.SimpleNamespace(stop_training=False, optimizer=types.SimpleNamespace(learning_rate=0.1))
    controller.set_model(model)
    stream = [[(10, 4.0, 0.02), (20, 5.0, 0.02)], [(40, 12.0, 0.02), (60, 8.0, 0.02)], [(70, 30.0, 0.01)]]
    batch, state = BASE, None
    for epoch, records in enumerate(stream):
        gradients.history += [record(*r) for r in records]
        first = records[0][0]
        window = [r for r in gradients.history if r["step"] >= first]
        phi = np.mean([r["grad/trace_cov"] for r in window]) / np.mean([r["grad/norm_sq"] for r in window])
        neighbours = np.array([b for b in controller.batches if batch / 2 <= b <= 2 * batch])
        values = goodput_by_hand(neighbours, phi, alpha, beta) / goodput_by_hand(batch, phi, alpha, beta)
        expected = int(neighbours[np.argmax(values)]) if values.max() > 1.05 else batch
        model.stop_training = False
        controller._steps.set_step(records[-1][0])
        controller._decide(epoch, records[-1][0])
        line = [json.loads(l) for l in open(tmp_path / adaptive_batch.DECISIONS)][-1]
        assert line["noise_used"] == pytest.approx(phi, rel=1e-9)
        assert (line["noise_first_step"], line["noise_last_step"]) == (first, records[-1][0])
        assert line["new_batch"] == expected and line["old_batch"] == batch
        assert model.stop_training == (expected != batch)
        if expected != batch:
            assert line["new_lr_gain"] == pytest.approx(batch_policy.lr_gain(expected, phi, BASE, "sgd"))
            assert line["new_lr"] == pytest.approx(0.1 / line["old_lr_gain"] * line["new_lr_gain"])
        batch = expected
        if epoch == 0:
            state = json.loads(json.dumps(controller.get_state()))
    assert [p[1] for p in controller.phases] == sorted({p[1] for p in controller.phases})
    controller.set_state(state)
    assert len(open(tmp_path / adaptive_batch.DECISIONS).readlines()) == 1
    assert controller.phases == [tuple(p) for p in state["phases"]]


def test_the_ladder_times_only_the_batches_a_decision_can_reach(tmp_path, monkeypatch, capsys):
    """Before each phase, the grid batches within a factor 2 of its batch that have no time are timed, and no other;
    a batch that runs out of memory cuts the grid below it, which the state carries over a resume."""
    gradients = types.SimpleNamespace(history=[], batch_size=BASE)
    controller = adaptive_batch.AdaptiveBatch("goodput", gradients, batch_policy.grid(BASE, 512), base_batch=BASE,
                                              optimizer="sgd", num_train=1280, epochs=10, run_dir=str(tmp_path))
    timed = []

    def time_grid(model, data, batches, seed, strategy):
        timed.append(list(batches))
        rows = [{"batch": b, "seconds_per_step": 1e-3 * b} for b in batches if b < 256]
        return {}, rows + [{"batch": 256, "error": "out of memory (ResourceExhaustedError: OOM)"}] * (256 in batches)

    monkeypatch.setattr(adaptive_batch, "time_grid", time_grid)
    assert adaptive_batch.time_neighbours(controller, None, None, 0, None) > 0
    assert timed == [[32, 64]] and controller.ladder == {32: 0.032, 64: 0.064}
    assert adaptive_batch.time_neighbours(controller, None, None, 0, None) == 0.0  # nothing new at 32
    controller.phases.append((2, 64))
    controller.own[64] = 0.05  # the run's own time at 64 replaces the ladder's; 128 is new
    adaptive_batch.time_neighbours(controller, None, None, 0, None)
    assert timed[-1] == [128]
    controller.phases.append((4, 128))
    adaptive_batch.time_neighbours(controller, None, None, 0, None)
    assert timed[-1] == [256] and controller.batches == [32, 64, 128]  # 256 ran out of memory: the grid ends at 128
    assert "256: out of memory" in capsys.readouterr().out
    state = json.loads(json.dumps(controller.get_state()))
    resumed = adaptive_batch.AdaptiveBatch("goodput", gradients, batch_policy.grid(BASE, 512), base_batch=BASE,
                                           optimizer="sgd", num_train=1280, epochs=10, run_dir=str(tmp_path))
    resumed.set_state(state)
    assert resumed.batches == [32, 64, 128] and resumed.untimed_neighbours() == []
    assert adaptive_batch.time_neighbours(resumed, None, None, 0, None) == 0.0 and len(timed) == 3


def test_step_times_known_only_from_the_ladder_get_the_runs_overhead_per_step():
    gradients = types.SimpleNamespace(history=[], batch_size=16)
    controller = adaptive_batch.AdaptiveBatch("goodput", gradients, batch_policy.grid(16, 64), base_batch=16,
                                              optimizer="sgd", num_train=1280, epochs=10, run_dir="unused")
    controller.ladder = {16: 0.008, 32: 0.012, 64: 0.020}  # 4 ms + 0.25 ms per example
    fit = controller.step_time()
    assert (fit.alpha, fit.beta) == (pytest.approx(0.004, rel=1e-4), pytest.approx(0.00025, rel=1e-4))
    # The run's own 12 ms at 16 is 4 ms over the ladder's: 32 and 64 get it too, so T = 8 ms + 0.25 ms per example
    # (unadjusted, the points 12, 12, 20 would make the doubling from 16 free).
    controller.own = {16: 0.012}
    fit = controller.step_time()
    assert (fit.alpha, fit.beta) == (pytest.approx(0.008, rel=1e-4), pytest.approx(0.00025, rel=1e-4))
    # Two batches with both clocks: the median overhead, 3.5 ms, for 64; the own times stand where they are known.
    controller.own = {16: 0.012, 32: 0.015}
    expected = adaptive_batch.goodput.fit_step_time([16, 32, 64], [0.012, 0.015, 0.0235])
    fit = controller.step_time()
    assert (fit.alpha, fit.beta) == (pytest.approx(expected.alpha), pytest.approx(expected.beta))
    # A run faster than its ladder (the ladder's warm-up): the overhead is negative, -2 ms.
    controller.own = {16: 0.006}
    fit = controller.step_time()
    assert (fit.alpha, fit.beta) == (pytest.approx(0.002, rel=1e-4), pytest.approx(0.00025, rel=1e-4))


# A real run on the digits (1293 training examples): 40 steps per epoch at 32, decided by the norm test.
RUN = dict(model="cnn", batch=config_lib.ADAPTIVE, base_batch=BASE, batch_policy="norm-test", epochs=3, lr=0.05,
           seed=7, deterministic=True, precise_bn_samples=256, grad_stats_every=-1, bn_stats_every=20, dynamics=False,
           export=False, verbose=0)
INTERRUPT_AT = 50  # a step between the first decision (step 40) and the second


def run_dir_files(run_dir):
    def lines(name):
        return [json.loads(line) for line in open(os.path.join(run_dir, name))]

    return {"decisions": lines(adaptive_batch.DECISIONS), "grad_stats": lines("grad_stats.jsonl"),
            "bn_stats": json.load(open(os.path.join(run_dir, "bn_stats.json")))}


@pytest.fixture(scope="module")
def adaptive_runs(tmp_path_factory):
    """An uninterrupted adaptive run, and one interrupted at INTERRUPT_AT and resumed."""
    from pipeline.training import fit_loop

    folder = tmp_path_factory.mktemp("adaptive")
    reference = dataclasses.replace(config_lib.Config(), run_dir=str(folder / "reference"), **RUN)
    assert fit_loop.train(reference).status == "completed"
    interrupted = dataclasses.replace(reference, run_dir=str(folder / "interrupted"))
    original = adaptive_batch.AdaptiveBatch.on_train_batch_end

    def interrupt(self, batch, logs=None):
        original(self, batch, logs)
        if self._steps.step == INTERRUPT_AT:
            raise KeyboardInterrupt

    adaptive_batch.AdaptiveBatch.on_train_batch_end = interrupt
    try:
        first = fit_loop.train(interrupted)
    finally:
        adaptive_batch.AdaptiveBatch.on_train_batch_end = original
    resumed = fit_loop.train(dataclasses.replace(interrupted, resume=True))
    return reference, interrupted, first, resumed


@pytest.mark.slow
def test_a_real_run_grows_its_batch_when_the_noise_scale_passes_the_threshold(adaptive_runs):
    reference, *_ = adaptive_runs
    files = run_dir_files(reference.run_dir)
    decisions = files["decisions"]
    assert [d["epoch"] for d in decisions] == [0, 1]  # at every epoch's end but the last
    assert any(d["changed"] for d in decisions)
    for d in decisions:
        # The pooled B_simple, from the measurements in grad_stats.jsonl since the previous decision.
        window = [r for r in files["grad_stats"] if d["noise_first_step"] <= r["step"] <= d["step"]]
        assert window and window[-1]["step"] == d["step"]  # a measurement at the decision's step
        if not d["noise_scale_is_lower_bound"]:
            phi = np.mean([r["grad/trace_cov"] for r in window]) / np.mean([r["grad/norm_sq"] for r in window])
            assert d["noise_used"] == pytest.approx(phi, rel=1e-9)
        assert d["new_batch"] == (2 * d["old_batch"] if d["noise_used"] > d["old_batch"] else d["old_batch"])
    history = [json.loads(line) for line in open(os.path.join(reference.run_dir, "metrics.jsonl"))]
    batches = [int(r["batch_size"]) for r in history]
    expected = [BASE]
    for d in decisions:
        expected.append(d["new_batch"])
    assert batches == expected
    # Steps: 1293 // B per epoch at the batch in force.
    assert [r["step"] for r in history] == list(np.cumsum([1293 // b for b in batches]))


@pytest.mark.slow
def test_resume_across_a_change_is_exact(adaptive_runs):
    reference, interrupted, first, resumed = adaptive_runs
    assert first.status == "interrupted" and resumed.status == "completed"
    decisions = run_dir_files(reference.run_dir)["decisions"]
    assert decisions[0]["changed"] and decisions[0]["step"] < INTERRUPT_AT < decisions[1]["step"]
    a, b = checkpoint_weights(reference.run_dir), checkpoint_weights(interrupted.run_dir)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    expected, got = run_dir_files(reference.run_dir), run_dir_files(interrupted.run_dir)
    # Step times are the clock's: the goodput each decision would predict differs from run to run.
    clock = ("predicted_gain", "goodput", "step_time")
    strip = [{k: v for k, v in d.items() if k not in clock} for d in expected["decisions"]]
    assert [{k: v for k, v in d.items() if k not in clock} for d in got["decisions"]] == strip
    for name in ("grad_stats", "bn_stats"):
        assert got[name] == expected[name], name
    assert resumed.test_accuracy == pytest.approx(
        json.load(open(os.path.join(reference.run_dir, "summary.json")))["test_accuracy"], abs=0)


@pytest.mark.slow
def test_mirrored_run_changes_its_global_batch_and_measures_at_the_batch_in_force(tmp_path):
    """--batch adaptive with --strategy mirrored on 2 logical CPUs (a process of its own: the CPU is split before
    TensorFlow sets up its devices). The norm test at theta 0.1 doubles 32 to 64 at the first decision; every global
    batch splits evenly over the 2 replicas, each epoch trains 1293 // B steps of the batch in force, and the replica
    gradient statistics after the change are those of the new batch."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "pipeline.train", "--batch", "adaptive", "--base-batch", str(BASE),
               "--max-batch", "64", "--batch-policy", "norm-test", "--norm-test-theta", "0.1", "--strategy",
               "mirrored", "--logical-cpus", "2", "--model", "cnn", "--epochs", "2", "--lr", "0.05", "--seed", "7",
               "--precise-bn-samples", "0", "--bn-stats-every", "0", "--no-dynamics", "--no-export", "--verbose",
               "0", "--run-dir", str(run_dir)]
    env = {**os.environ, "PYTHONPATH": root, "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.load(open(run_dir / "summary.json"))
    assert summary["status"] == "completed" and summary["replicas"] == 2
    decisions = [json.loads(line) for line in open(run_dir / adaptive_batch.DECISIONS)]
    assert [(d["old_batch"], d["new_batch"], d["changed"]) for d in decisions] == [(32, 64, True)]
    history = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert [int(r["batch_size"]) for r in history] == [32, 64]
    assert [r["step"] for r in history] == [1293 // 32, 1293 // 32 + 1293 // 64]
    records = [json.loads(line) for line in open(run_dir / "grad_stats.jsonl")]
    after = [r for r in records if r["step"] > decisions[0]["step"]]
    assert after and all(r["batch_size"] == 64 for r in after)
    assert all(r["batch_size"] == 32 for r in records if r["step"] <= decisions[0]["step"])


@pytest.mark.parametrize("argv, flag", [
    (["--batch", "adaptive", "--max-batch", "16"], "--max-batch"),
    (["--batch", "adaptive", "--batch-schedule", "32@0,64@2"], "--batch-schedule"),
    (["--batch", "adaptive", "--lr-scaling", "linear"], "--lr-scaling"),
    (["--batch", "adaptive", "--batch-policy", "largest"], "--batch-policy"),
    (["--batch", "adaptive", "--norm-test-theta", "0"], "--norm-test-theta"),
    (["--batch", "adaptive", "--accumulate", "2"], "--accumulate"),
    (["--batch", "adaptive", "--grad-stats-every", "0"], "--grad-stats-every"),
])
def test_bad_values_are_one_line_errors(cli_error, argv, flag):
    assert cli_error(train_entry.main, argv).startswith(f"error: {flag}:")


def test_timing_the_grid_leaves_the_model_and_optimizer_as_they_were():
    import tensorflow as tf

    from pipeline.data import loading
    from pipeline.training import fit_loop

    config = dataclasses.replace(config_lib.smoke(), batch=BASE, model="mlp")
    data = loading.load(config)
    model, _ = fit_loop.compiled_model(config, data)
    before = [v.numpy().copy() for v in model.variables]
    times, rows = adaptive_batch.time_grid(model, data, [32, 64], seed=0, strategy=tf.distribute.get_strategy())
    assert sorted(times) == [32, 64] and all(t > 0 for t in times.values()) and len(rows) == 2
    after = [v.numpy() for v in model.variables]
    assert all(np.array_equal(a, b) for a, b in zip(before, after))
    # The ladder built the optimizer and trained 2 x 8 steps; its variables are back at their fresh values.
    assert int(model.optimizer.iterations.numpy()) == 0
    assert all(not np.any(v.numpy()) for v in model.optimizer.variables if "momentum" in v.path)


def test_the_benchmark_ceiling_is_the_best_schedule_over_the_best_fixed_batch_by_enumeration():
    import itertools

    from benchmarks.adaptive_batch import ceiling

    table = {16: 0.0057, 32: 0.0097, 64: 0.0150, 128: 0.0304}  # steady seconds per step, step time ~ batch
    phis = [6.0, 80.0, 700.0]
    cost = lambda b, phi: table[b] * (1 + phi / b)  # noqa: E731 -- McCandlish et al.'s steps per unit of progress
    schedules = {s: sum(cost(b, phi) for b, phi in zip(s, phis)) for s in itertools.product(table, repeat=3)}
    fixed = {b: schedules[(b, b, b)] for b in table}
    result = ceiling(phis, table)
    assert result["ratio"] == pytest.approx(min(schedules.values()) / min(fixed.values()), rel=1e-12)
    assert tuple(result["oracle_batches"]) == min(schedules, key=schedules.get)
    assert result["best_fixed"] == min(fixed, key=fixed.get)
    assert 0.9 < result["ratio"] < 1  # near 1: these step times leave a schedule little to gain
    # A fixed cost per step (10 ms + 0.01 ms per example, a GPU's shape) leaves more: the best batch
    # sqrt(alpha phi / beta) moves from 77 to 837, so an early small and a late large batch beat any single one.
    gpu = ceiling([6.0, 700.0], {b: 0.010 + 1e-5 * b for b in (16, 32, 64, 128, 256, 512, 1024)})
    assert gpu["oracle_batches"] == [64, 1024] and gpu["best_fixed"] == 512 and gpu["ratio"] < 0.9
    assert ceiling([], table) is None and ceiling([50.0], {32: 0.01}) is None


def test_the_benchmark_names_one_result_file_per_dataset_and_base_batch():
    from benchmarks.adaptive_batch import result_name

    assert result_name(None, None) == result_name("digits", 32) == "adaptive_batch"
    assert result_name("npz:/data/shapes.npz", None) == "adaptive_batch-shapes"
    assert result_name(None, 16) == "adaptive_batch-base16"
    assert result_name("npz:shapes.npz", 64) == "adaptive_batch-shapes-base64"
