"""Batch-size sweeps: run, skip finished runs, resume interrupted ones, record failures, tune, reject bad flags."""

import dataclasses
import json
import math
import os
import subprocess
import sys
import time

import pytest

from pipeline import config as config_lib
from pipeline import flags, rundir
from pipeline.study import batch_sweep as sweep, runner
from pipeline.training import callback_setup, fit_loop, run_control

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NUM_TRAIN = 1293  # digits: 1797 examples - 20% test - 10% of the rest for validation


def tiny_config(**changes):
    return dataclasses.replace(config_lib.smoke(), export=False, dynamics=False, precise_bn_samples=64,
                               target_accuracy=0.3, **changes)


def record_calls(monkeypatch, fake=None):
    """Replaces train() by a wrapper (around the real one, or `fake`) that records each call's config."""
    calls, real = [], fit_loop.train

    def wrapper(config):
        calls.append(config)
        return (fake or real)(config)

    monkeypatch.setattr(fit_loop, "train", wrapper)
    return calls


def fake_train(config, val_accuracy=None, status="completed"):
    """Writes the files of a run without training: config.json and summary.json."""
    os.makedirs(config.run_dir, exist_ok=True)
    rundir.write_json_atomic(os.path.join(config.run_dir, "config.json"),
                             {"config": config_lib.to_dict(config), "effective_lr": config.effective_lr})
    accuracy = val_accuracy(config) if val_accuracy else 0.9
    summary = fit_loop.Summary(status=status, run_dir=config.run_dir, steps=10, epochs=config.epochs,
                                val_accuracy=accuracy if status == "completed" else None,
                                test_accuracy=accuracy if status == "completed" else None,
                                train_accuracy=accuracy if status == "completed" else None,
                                reason="loss became nan" if status == "failed" else "")
    rundir.write_json_atomic(os.path.join(config.run_dir, "summary.json"), dataclasses.asdict(summary))
    return summary


def test_budget_conversion_matches_counting_steps():
    config = tiny_config()
    for kind, amount, batch in (("steps", 50, 128), ("steps", 55, 128), ("steps", 7, 8), ("examples", 10000, 128),
                                ("examples", 5000, 64), ("epochs", 3, 16)):
        run = sweep.Budget(kind, amount).apply(config, batch, NUM_TRAIN)
        wanted = amount if kind == "steps" else amount // batch if kind == "examples" else None
        # Brute force: train whole epochs of NUM_TRAIN // batch steps, stopping at the wanted step.
        steps, epochs = 0, 0
        while (wanted is None and epochs < amount) or (wanted is not None and steps < wanted):
            epochs += 1
            steps = min(steps + NUM_TRAIN // batch, wanted if wanted is not None else math.inf)
        assert run.epochs == epochs, (kind, amount, batch)
        assert (run.max_steps or run.epochs * (NUM_TRAIN // batch)) == steps, (kind, amount, batch)


@pytest.mark.slow
def test_sweep_skips_finished_and_resumes_interrupted(tmp_path, monkeypatch):
    out = str(tmp_path / "sweep")
    calls = record_calls(monkeypatch)
    # Ctrl-C at the end of epoch 1 of batch 256, after epoch 0's checkpoint is saved.
    real_logger = run_control.MetricsLogger

    class InterruptingLogger(real_logger):
        def on_epoch_end(self, epoch, logs=None):
            super().on_epoch_end(epoch, logs)
            if epoch == 1 and "b256" in self.run_dir:
                raise KeyboardInterrupt

    monkeypatch.setattr(run_control, "MetricsLogger", InterruptingLogger)
    spec = sweep.Spec(batches=(128, 256), norms=("batch",), seeds=(0,), budget=sweep.Budget("epochs", 2))
    config = tiny_config(grad_stats_every=0, bn_stats_every=0)  # instruments are tested with the notebook's sweep
    with pytest.raises(KeyboardInterrupt):
        sweep.sweep(config, spec, out)
    interrupted = os.path.join(out, "runs", "batch-b256-s0")
    assert rundir.read_summary(interrupted)["status"] == "interrupted"
    assert rundir.read_summary(os.path.join(out, "runs", "batch-b128-s0"))["status"] == "completed"
    with open(os.path.join(interrupted, "metrics.jsonl")) as f:
        first_epoch = f.readline()

    monkeypatch.setattr(run_control, "MetricsLogger", real_logger)
    calls.clear()
    sweep.sweep(config, spec, out, report=False)
    assert [(c.batch, c.resume) for c in calls] == [(256, True)]
    summary = rundir.read_summary(interrupted)
    assert summary["status"] == "completed" and summary["steps"] == 2 * (NUM_TRAIN // 256)
    with open(os.path.join(interrupted, "metrics.jsonl")) as f:
        lines = f.readlines()
    assert lines[0] == first_epoch  # epoch 0 was restored from its checkpoint, not trained again
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1]

    calls.clear()
    runs = os.listdir(os.path.join(out, "runs"))
    mtimes = {d: os.path.getmtime(os.path.join(out, "runs", d, "summary.json")) for d in runs}
    report = sweep.sweep(config, spec, out)
    assert calls == []
    assert mtimes == {d: os.path.getmtime(os.path.join(out, "runs", d, "summary.json")) for d in mtimes}
    assert [g["batch"] for g in report["groups"]] == [128, 256]
    assert os.path.exists(os.path.join(out, "report.md")) and os.path.exists(os.path.join(out, "sweep.json"))
    # One definition of each derived metric: the report shows the numbers of each run's summary.json.
    for row in report["runs"]:
        summary = rundir.read_summary(os.path.join(out, "runs", row["name"]))
        assert row["time_per_step_ms"] == pytest.approx(1000 * summary["time_per_step_s"])
        assert row["examples_per_sec"] == pytest.approx(summary["examples_per_sec"])
        assert row["time_to_target_s"] == pytest.approx(summary["time_to_target_s"]) and row["time_to_target_s"]


def test_failed_runs_are_recorded(tmp_path, monkeypatch):
    def flaky(config):
        if config.batch == 64:
            raise RuntimeError("OOM when allocating tensor with shape [64,4096]")
        return fake_train(config, status="failed" if config.batch == 32 else "completed")

    calls = record_calls(monkeypatch, flaky)
    out = str(tmp_path / "sweep")
    spec = sweep.Spec(batches=(16, 32, 64), seeds=(0,), budget=sweep.Budget("epochs", 1))
    report = sweep.sweep(tiny_config(), spec, out)
    assert len(calls) == 3
    statuses = {r["batch"]: (r["status"], r["reason"]) for r in report["runs"]}
    assert statuses[16][0] == "completed"
    assert statuses[32] == ("failed", "loss became nan")
    assert statuses[64] == ("failed", "RuntimeError: OOM when allocating tensor with shape [64,4096]")
    assert "OOM" in open(os.path.join(out, "runs", "batch-b64-s0", "error.txt")).read()
    assert any("batch-b32-s0" in finding and "batch-b64-s0" in finding for finding in report["findings"])
    calls.clear()  # The diverged run is a result; the run that raised is tried again.
    sweep.sweep(tiny_config(), spec, out, report=False)
    assert [(c.batch, c.resume) for c in calls] == [(64, True)]


def test_changed_settings_are_refused(tmp_path, monkeypatch):
    record_calls(monkeypatch, fake_train)
    out = str(tmp_path / "sweep")
    spec = sweep.Spec(batches=(32,), seeds=(0,), budget=sweep.Budget("epochs", 1))
    sweep.sweep(tiny_config(), spec, out, report=False)
    refused = r"--out: .*batch-b32-s0 was run with lr=0.1, this sweep asks for 0.2"
    with pytest.raises(config_lib.InputError, match=refused):
        sweep.sweep(tiny_config(lr=0.2), spec, out, report=False)
    # --overwrite runs it again with the new settings.
    sweep.sweep(tiny_config(lr=0.2, overwrite=True), spec, out, report=False)
    with open(os.path.join(out, "runs", "batch-b32-s0", "config.json")) as f:
        assert json.load(f)["config"]["lr"] == 0.2


def test_linear_scaling_and_warmup_per_run(tmp_path, monkeypatch):
    calls = record_calls(monkeypatch, fake_train)
    config = tiny_config(lr=0.05, lr_scaling="linear", base_batch=32, grad_stats_every=-1, bn_stats_every=-1)
    spec = sweep.Spec(batches=(16, 128), norms=("batch", "group"), seeds=(0, 1), budget=sweep.Budget("epochs", 9),
                      warmup_fraction=sweep.WARMUP_FRACTION)
    sweep.sweep(config, spec, str(tmp_path), report=False)
    assert [(c.norm, c.batch, c.seed) for c in calls] == [
        (n, b, s) for n in ("batch", "group") for b in (16, 128) for s in (0, 1)]
    for c in calls:
        assert c.effective_lr == pytest.approx(0.05 * c.batch / 32)
        assert c.warmup_epochs == pytest.approx(9 * 5 / 90) and c.epochs == 9
        # Automatic instrument intervals: the same number of measurements in every run.
        assert c.grad_stats_every == c.bn_stats_every == 9 * (NUM_TRAIN // c.batch) // callback_setup.MEASUREMENTS_PER_RUN
        assert c.run_dir == os.path.join(str(tmp_path), "runs", f"{c.norm}-b{c.batch}-s{c.seed}")


def best_at_lr(peak):
    """A fake objective: validation accuracy highest at lr = peak, falling with |log(lr / peak)|."""
    return lambda config: 0.99 - 0.1 * abs(math.log(config.lr / peak))


def test_tuner_picks_each_batch_its_best_lr(tmp_path, monkeypatch):
    calls = record_calls(monkeypatch, lambda c: fake_train(c, best_at_lr(0.01 * c.batch / 16)))
    out = str(tmp_path)
    spec = sweep.Spec(batches=(16, 64), seeds=(0,), budget=sweep.Budget("epochs", 1), tuner="random", max_trials=4)
    report = sweep.sweep(tiny_config(lr=0.02), spec, out)
    trials = [c for c in calls if c.run_dir.startswith(os.path.join(out, "tuner"))]
    finals = [c for c in calls if c.run_dir.startswith(os.path.join(out, "runs"))]
    assert len(trials) == 8 and len(finals) == 2
    for final in finals:
        mine = [t for t in trials if f"b{final.batch}" in t.run_dir]
        best = max(mine, key=best_at_lr(0.01 * final.batch / 16))
        assert all(0.002 <= t.lr <= 0.2 for t in mine)  # a factor 10 around the (unscaled) lr 0.02
        assert final.lr == pytest.approx(best.lr) and final.lr_scaling == "none"
    assert os.path.exists(os.path.join(out, "tuner", "batch-b16", "trial_0", "trial.json"))
    assert sorted(report["tuning"]) == ["batch-b16", "batch-b64"] and "tuning" in report["plots"]
    slope = math.log(finals[1].lr / finals[0].lr) / math.log(64 / 16)  # two points: the exact log-log slope
    assert any(f"best learning rate went as B^{slope:.2f} from 2 batch sizes (not determined" in finding
               for finding in report["findings"])
    calls.clear()  # A finished search is skipped (its best.json), not repeated; a new --verbose changes nothing.
    best = json.loads(open(os.path.join(out, "tuner", "batch-b64", "best.json")).read())["values"]
    assert best["lr"] == pytest.approx(finals[1].lr)
    sweep.sweep(tiny_config(lr=0.02, verbose=1), spec, out, report=False)
    assert calls == []
    calls.clear()  # More trials: the search reloads and runs only the new ones.
    sweep.sweep(tiny_config(lr=0.02), dataclasses.replace(spec, max_trials=5), out, report=False)
    assert sum(c.run_dir.startswith(os.path.join(out, "tuner")) for c in calls) == 2


def test_hyperband_trains_rounds_of_the_epoch_budget(tmp_path, monkeypatch):
    calls = record_calls(monkeypatch, lambda c: fake_train(c, best_at_lr(0.05)))
    spec = sweep.Spec(batches=(32,), seeds=(0,), budget=sweep.Budget("epochs", 9), tuner="hyperband",
                      tune=("lr", "momentum", "warmup"))
    sweep.sweep(tiny_config(), spec, str(tmp_path), report=False)
    trials = [c for c in calls if c.run_dir.startswith(os.path.join(str(tmp_path), "tuner"))]
    assert {c.epochs for c in trials} <= {1, 3, 9} and max(c.epochs for c in trials) == 9 and len(trials) > 3
    assert len({c.momentum for c in trials}) > 1 and all(0.5 <= c.momentum <= 0.99 for c in trials)
    assert all(0 <= c.warmup_epochs <= 0.3 * c.epochs for c in trials)
    assert calls[-1].epochs == 9 and calls[-1].run_dir == os.path.join(str(tmp_path), "runs", "batch-b32-s0")


@pytest.mark.parametrize("args, words", [
    (["--batch", "8,x"], ["--batch", "8,16,32"]),
    (["--batch", "0,8"], ["--batch", "positive"]),
    (["--norm", "batch,instance"], ["--norm", "group"]),
    (["--seeds", "0"], ["--seeds", "positive"]),
    (["--budget-epochs", "3", "--budget-steps", "10"], ["--budget-steps", "--budget-epochs"]),
    (["--target-accuracy", "1.5"], ["--target-accuracy", "[0, 1]"]),
    (["--base-lr", "-1"], ["--base-lr", "> 0"]),
    (["--tuner", "grid"], ["--tuner", "random"]),
    (["--tune", "momentum"], ["--tune", "lr"]),
    (["--optimizer", "lbfgs"], ["--optimizer", "adam"]),
    (["--replicas", "0,2"], ["--replicas", "1,2,4"]),
    (["--replicas", "2,2"], ["--replicas", "distinct"]),
])
def test_bad_flags_exit_2_with_one_line(args, words, capsys):
    try:
        code = sweep.main(args)  # bad values: InputError, printed by main
    except SystemExit as e:  # malformed flags: argparse, through flags.Parser
        code = e.code
    assert code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error:"), lines
    assert all(word in lines[0] for word in words), lines[0]


@pytest.mark.slow
def test_bad_input_exits_2_with_one_line(tmp_path, capsys):
    assert sweep.main(["--batch", "8,4096", "--out", str(tmp_path)]) == 2  # needs the data to know
    assert capsys.readouterr().err == "error: --batch: 4096 is larger than the training split (1293 examples)\n"
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "BATCHSCOPE_TF_LOGS")}
    env["PYTHONPATH"] = REPO
    command = [sys.executable, "-m", "pipeline.sweep", "--norm", "batch,instance", "--out", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.startswith("error: --norm: got 'batch,instance'") and result.stderr.count("\n") == 1
    # Rejected after TensorFlow started and the data was read: still one line, and no sweep folder.
    out = tmp_path / "sweep"
    command = [sys.executable, "-m", "pipeline.sweep", "--dataset", "npz:/nonexistent.npz", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr == "error: --dataset: cannot read npz:/nonexistent.npz: No such file or directory\n"
    assert not out.exists()


def test_replica_axis_configs():
    """Each (norm, batch, seed) on every replica count at the same global batch: one device, else mirrored over
    logical CPUs (no GPU) or the first R GPUs; bad combinations name the flag."""
    spec = sweep.Spec(batches=(32, 64), norms=("batch",), seeds=(0,), replicas=(1, 2, 4))
    runs = sweep.run_configs(tiny_config(), spec, NUM_TRAIN)
    assert [(c.batch, c.strategy, c.replicas, c.logical_cpus) for c in runs] == [
        (32, "one", 1, 0), (32, "mirrored", 2, 2), (32, "mirrored", 4, 4),
        (64, "one", 1, 0), (64, "mirrored", 2, 2), (64, "mirrored", 4, 4)]
    on_gpus = sweep.run_configs(tiny_config(), spec, NUM_TRAIN, gpus=4)
    assert [(c.strategy, c.replicas, c.logical_cpus) for c in on_gpus[:3]] == [
        ("one", 1, 0), ("mirrored", 2, 0), ("mirrored", 4, 0)]
    assert sweep.run_name("batch", 64, 0, 2) == "batch-b64-r2-s0" and sweep.run_name("batch", 64, 0) == "batch-b64-s0"
    with pytest.raises(config_lib.InputError, match=r"^--batch: 30 does not split evenly over 4 replicas"):
        sweep.run_configs(tiny_config(), dataclasses.replace(spec, batches=(30,)), NUM_TRAIN)
    with pytest.raises(config_lib.InputError, match=r"^--replicas: 4 replicas need 4 GPUs; this machine has 2$"):
        sweep.run_configs(tiny_config(), spec, NUM_TRAIN, gpus=2)
    with pytest.raises(config_lib.InputError, match=r"^--replicas: .* cannot use --strategy multiworker$"):
        sweep.run_configs(tiny_config(strategy="multiworker"), spec, NUM_TRAIN)


@pytest.mark.slow
def test_replica_sweep_trains_each_count_and_resumes(tmp_path, monkeypatch, capsys):
    """A real sweep over 1 and 2 replicas (the second in its own process, on 2 logical CPUs): the run on 2
    replicas normalizes over 16 of the 32 examples, the report has the devices' columns, and running the same
    command again trains nothing."""
    out = str(tmp_path / "sweep")
    args = ["--model", "mlp", "--batch", "32", "--seeds", "1", "--replicas", "1,2", "--budget-steps", "6",
            "--bn-stats-every", "3", "--grad-stats-every", "0", "--no-dynamics", "--no-export",
            "--precise-bn-samples", "0", "--target-accuracy", "0", "--verbose", "0", "--out", out]
    assert sweep.main(args) == 0
    runs = os.path.join(out, "runs")
    assert sorted(os.listdir(runs)) == ["batch-b32-r1-s0", "batch-b32-r2-s0"]
    one, two = (rundir.read_summary(os.path.join(runs, name)) for name in sorted(os.listdir(runs)))
    assert (one["status"], one["replicas"], one["bn_batch"]) == ("completed", 1, 32)
    assert (two["status"], two["strategy"], two["replicas"], two["per_replica_batch"], two["bn_batch"], two["steps"]) \
        == ("completed", "mirrored", 2, 16, 16, 6)
    assert rundir.read_config(os.path.join(runs, "batch-b32-r2-s0"))["config"]["logical_cpus"] == 2
    report = json.loads(open(os.path.join(out, "report.json")).read())
    assert [(g["replicas"], g["bn_batch"]) for g in report["replica_groups"]] == [(1, 32), (2, 16)]
    assert report["answers"]["replicas"][0].startswith("Not enough data: BatchNorm's batch-vs-population variance")
    assert "| batch | 32 | 2 | 16 | 16 |" in open(os.path.join(out, "report.md")).read()
    calls = record_calls(monkeypatch)
    capsys.readouterr()
    assert sweep.main(args) == 0
    assert calls == [] and capsys.readouterr().out.count("skipped (finished before)") == 2


@pytest.mark.slow
def test_distributed_tuning_survives_a_killed_worker(tmp_path, free_ports, monkeypatch):
    """keras-tuner's chief and one worker on 127.0.0.1 tune the lr of one batch size in 2 trials. The worker is
    killed while it holds trial 1: the oracle keeps that trial for its TUNER_ID and the chief waits; started again
    with the same id, the worker gets trial 1 back and finishes it, trial 0 is not run again, and the chief then
    trains the seed run and writes the report. Running the chief's command once more trains nothing."""
    out = tmp_path / "sweep"
    args = ["--model", "mlp", "--batch", "64", "--seeds", "1", "--budget-steps", "3", "--tuner", "random",
            "--max-trials", "2", "--grad-stats-every", "0", "--bn-stats-every", "0", "--no-dynamics", "--no-export",
            "--precise-bn-samples", "0", "--target-accuracy", "0", "--verbose", "0", "--out", str(out)]
    oracle = {"KERASTUNER_ORACLE_IP": "127.0.0.1", "KERASTUNER_ORACLE_PORT": str(free_ports(1)[0])}
    started = []

    def start(tuner_id):
        log = open(tmp_path / f"{tuner_id}-{len(started)}.log", "w")
        env = {**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "2", **oracle, "KERASTUNER_TUNER_ID": tuner_id}
        started.append(subprocess.Popen([sys.executable, "-m", "pipeline.sweep", *args], cwd=REPO, env=env,
                                        stdout=log, stderr=subprocess.STDOUT))
        return started[-1]

    def log_tail():
        return "\n".join(open(path).read()[-1500:] for path in sorted(tmp_path.glob("*.log")))

    search = out / "tuner" / "batch-b64"
    try:
        chief, worker = start("chief"), start("tuner0")
        deadline = time.time() + 300
        while not (search / "trial_1" / "run" / "config.json").exists():
            assert worker.poll() is None and time.time() < deadline, log_tail()
            time.sleep(0.05)
        worker.kill()  # SIGKILL while trial 1 trains
        worker.wait(timeout=60)
        state = json.loads((search / "oracle.json").read_text())
        assert state["ongoing_trials"] == {"tuner0": "1"}, state
        trial_0 = search / "trial_0" / "run" / "summary.json"
        assert json.loads(trial_0.read_text())["status"] == "completed"
        finished_at = os.path.getmtime(trial_0)
        time.sleep(1)
        assert chief.poll() is None, log_tail()  # waiting for the held trial

        again = start("tuner0")
        assert again.wait(timeout=300) == 0, log_tail()
        assert chief.wait(timeout=300) == 0, log_tail()
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert os.path.getmtime(trial_0) == finished_at  # not run again
    trials = {t["trial_id"]: t["status"] for t in
              (json.loads((search / f"trial_{i}" / "trial.json").read_text()) for i in (0, 1))}
    assert trials == {"0": "COMPLETED", "1": "COMPLETED"}
    assert rundir.read_summary(str(search / "trial_1" / "run"))["status"] == "completed"
    best = json.loads((search / "best.json").read_text())["values"]["lr"]
    seed_run = rundir.read_config(str(out / "runs" / "batch-b64-s0"))
    assert seed_run["config"]["lr"] == pytest.approx(best) and (out / "report.md").exists()

    for key, value in {**oracle, "KERASTUNER_TUNER_ID": "chief"}.items():
        monkeypatch.setenv(key, value)
    calls = record_calls(monkeypatch)
    assert sweep.main(args) == 0 and calls == []


@pytest.mark.slow
def test_a_run_in_its_own_process_reports_bad_input_in_one_line(tmp_path):
    config = tiny_config(strategy="mirrored", replicas=2, logical_cpus=2, dataset="npz:/nonexistent.npz")
    assert runner.needs_own_process(config) and not runner.needs_own_process(tiny_config())
    with pytest.raises(config_lib.InputError) as error:
        runner.run_one(config, str(tmp_path / "run"))
    assert str(error.value) == "--dataset: cannot read npz:/nonexistent.npz: No such file or directory"


def test_default_study_runs_three_seeds():
    """The default sweep has three seeds per batch size, so that its report shows run-to-run spread."""
    config, args = flags.parse([], description="", extra=sweep.add_sweep_flags, preset=config_lib.batch_study())
    spec = sweep.spec_from_flags(config, args, [])
    assert spec.seeds == (0, 1, 2) and spec.batches == (8, 16, 32, 64, 128)
    _, args = flags.parse(["--seeds", "1"], description="", extra=sweep.add_sweep_flags,
                          preset=config_lib.batch_study())
    assert sweep.spec_from_flags(config, args, ["--seeds", "1"]).seeds == (0,)
