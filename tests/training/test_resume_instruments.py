"""The measurements survive what the weights survive: real signals at many moments, then --resume, against one
uninterrupted run.

Every file an instrument writes (grad_stats.jsonl, bn_stats.json, bn_stats.md, dynamics/forgetting.json,
target.json, target_checks.npz) and the run's metrics.jsonl and summary.json (clock fields aside) must equal the
uninterrupted --deterministic run's, and every record must sit at the step the docs promise: steps are batches trained
(callbacks/steps.py), here under gradient accumulation and a batch schedule at once. Two runs are each interrupted
three times in turn (SIGINT and SIGKILL during training, after an epoch's line, inside a checkpoint save, in precise
BN, evaluation and export), resumed after each interruption; they run concurrently so that signals land on time.
"""

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from pipeline.training import checkpoint, target_record

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = 1293  # digits training examples
PHASES, EPOCHS, ACCUMULATE, EVERY = ((0, 32), (2, 64)), 3, 2, 7
FLAGS = ["--model", "cnn", "--batch-schedule", "32@0,64@2", "--accumulate", str(ACCUMULATE), "--epochs", str(EPOCHS),
         "--seed", "3", "--deterministic", "--verbose", "2", "--precise-bn-samples", "128",
         "--grad-stats-every", str(EVERY), "--bn-stats-every", str(EVERY), "--target-accuracy", "0.96",
         "--curvature-every", "-1"]
# Clock fields: the only ones allowed to differ from the uninterrupted run.
CLOCK = {"epoch_time_s", "instrument_time_s", "instrument_phases_s", "examples_per_sec", "seconds_into_epoch",
         "wall_time_s", "train_time_s", "time_per_step_s", "time_to_target_s", "curvature/seconds"}
FILES = ("grad_stats.jsonl", "bn_stats.json", "bn_stats.md", "dynamics/forgetting.json", "metrics.jsonl",
         "target.json", "summary.json", "curvature.jsonl")


def epoch_steps(epoch):
    return TRAIN // [batch for first, batch in PHASES if first <= epoch][-1]


def first_step(epoch):
    return sum(epoch_steps(e) for e in range(epoch))


LAST = first_step(EPOCHS)


def start(run_dir, *extra, pause=None):
    """An attempt of the run; `pause` (precise_bn | evaluation | export) holds it in that stage after creating
    <run_dir>.<pause>; every attempt's checkpoint saves are slowed, so that a signal can land inside one."""
    marker = f"{run_dir}.{pause}"
    paused = {"PAUSE_STAGE": pause, "PAUSE_MARKER": marker, "PAUSE_S": "30"} if pause else {}
    environment = dict(os.environ, PYTHONPATH=REPO, SLOW_CHECKPOINT_S="0.2", **paused)
    program = [sys.executable, os.path.join(REPO, "tests", "slow_train.py"), *FLAGS, "--run-dir", str(run_dir), *extra]
    return subprocess.Popen(program, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=environment)


def committed_epoch(run_dir):
    state = checkpoint.read_state(os.path.join(run_dir, "checkpoints"))
    return state["epoch"] if state else 0


def epochs_logged(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    return [json.loads(line)["epoch"] for line in open(path)] if os.path.exists(path) else []


MOMENTS = {
    # Epoch `epoch` (0-based) is under way: the one before is committed.
    "training": lambda run_dir, epoch: committed_epoch(run_dir) >= epoch,
    # Epoch `epoch`'s line is out (its history record), its checkpoint not committed yet.
    "epoch line": lambda run_dir, epoch: epoch in epochs_logged(run_dir),
    # The save after `epoch` epochs has put its files in place and not committed them.
    "committing": lambda run_dir, epoch: (
        os.path.exists(os.path.join(run_dir, "checkpoints", checkpoint.instruments_name(epoch)))
        and committed_epoch(run_dir) < epoch),
    # The attempt waits in the stage it was started to pause in.
    "paused": lambda run_dir, stage: os.path.exists(f"{run_dir}.{stage}"),
}
# Per run, the attempts before the last: (pause stage of the attempt, signal, moment, its argument, delay in s).
PLANS = {
    "a": [(None, signal.SIGINT, "training", 1, 0.3), (None, signal.SIGKILL, "committing", 2, 0),
          ("precise_bn", signal.SIGINT, "paused", "precise_bn", 0)],
    "b": [(None, signal.SIGKILL, "epoch line", 1, 0), ("evaluation", signal.SIGINT, "paused", "evaluation", 0),
          ("export", signal.SIGKILL, "paused", "export", 0)],
}


def run_plan(run_dir, plan, log, summaries, deadline):
    process = None
    for attempt, (pause, sig, moment, argument, delay) in enumerate(plan):
        process = start(run_dir, *(("--resume",) if attempt else ()), pause=pause)
        while process.poll() is None and not MOMENTS[moment](str(run_dir), argument) and time.time() < deadline:
            time.sleep(0.01)
        ended_early = process.poll() is not None
        time.sleep(delay)
        process.send_signal(sig)
        _, stderr = process.communicate(timeout=300)
        log.append((moment, argument, sig, process.returncode, ended_early, stderr))
        if sig == signal.SIGINT:
            summaries.append((read(run_dir, "summary.json"), read(run_dir, "metrics.jsonl")))
    last = start(run_dir, "--resume")
    log.append(("last", None, None, *_finished(last)))


def _finished(process):
    _, stderr = process.communicate(timeout=600)
    return process.returncode, False, stderr


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run, started once in the background; call it to wait for its folder."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    environment = dict(os.environ, PYTHONPATH=REPO)
    process = subprocess.Popen([sys.executable, "-m", "pipeline.train", *FLAGS, "--run-dir", str(run_dir)], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment)

    def finished():
        _, stderr = process.communicate(timeout=900)
        assert process.returncode == 0, stderr[-3000:]
        return run_dir

    yield finished
    if process.poll() is None:
        process.kill()
        process.wait()


def read(run_dir, name):
    path = os.path.join(run_dir, name)
    with open(path, encoding="utf-8") as f:
        if name.endswith(".jsonl"):
            return [json.loads(line) for line in f]
        return json.load(f) if name.endswith(".json") else f.read()


def assert_same(resumed, reference, where):
    """Equal up to 1e-6 relative in numbers, with clock fields left out."""
    if isinstance(reference, dict):
        keys = set(reference) - CLOCK
        assert set(resumed) - CLOCK == keys, (where, sorted(set(resumed) ^ set(reference)))
        for key in keys:
            assert_same(resumed[key], reference[key], f"{where}.{key}")
    elif isinstance(reference, list):
        assert len(resumed) == len(reference), (where, len(resumed), len(reference))
        for i, (a, b) in enumerate(zip(resumed, reference)):
            assert_same(a, b, f"{where}[{i}]")
    elif isinstance(reference, float) and not isinstance(resumed, bool):
        assert isinstance(resumed, (int, float)), (where, resumed, reference)
        assert resumed == pytest.approx(reference, rel=1e-6, abs=1e-12) or (math.isnan(resumed) and math.isnan(reference)), (
            where, resumed, reference)
    else:
        assert resumed == reference, (where, resumed, reference)


def test_records_at_the_documented_steps(reference):
    """Under accumulation and a batch schedule every record's step is a count of batches, at the promised steps."""
    run_dir = reference()
    history = read(run_dir, "metrics.jsonl")
    assert [record["step"] for record in history] == [first_step(e + 1) for e in range(EPOCHS)]
    summary = read(run_dir, "summary.json")
    assert (summary["steps"], summary["updates"], summary["attempts"]) == (LAST, LAST // ACCUMULATE, 1)
    # Gradient and BN statistics: every EVERY steps, and at the end of each fit() call (each batch phase) where that
    # is not one.
    phase_ends = [first_step(first) for first, _ in PHASES[1:]] + [LAST]
    expected = sorted(set(range(0, LAST + 1, EVERY)) | set(phase_ends))
    grad_steps = [record["step"] for record in read(run_dir, "grad_stats.jsonl")]
    assert grad_steps == expected
    assert [record["epoch"] for record in read(run_dir, "grad_stats.jsonl")] == [
        max(e for e in range(EPOCHS) if first_step(e) < step) if step else 0 for step in grad_steps]
    bn = read(run_dir, "bn_stats.json")
    assert [row["step"] for row in bn["averages"]] == expected
    assert all([row["step"] for row in layer["measurements"]] == expected for layer in bn["layers"].values())
    assert f"final step {LAST}," in read(run_dir, "bn_stats.md")
    assert read(run_dir, "dynamics/forgetting.json")["looks"]["step"] == [first_step(e + 1) for e in range(EPOCHS)]
    # The target: checked every (steps per epoch of the first phase) // 8 steps; its step, epoch and fraction agree
    # with each other and with the history's steps.
    reached = read(run_dir, "target.json")
    every = epoch_steps(0) // 8
    assert reached["every_n_steps"] == every and reached["step"] % every == 0
    epoch = reached["epoch"]
    start_step = history[epoch - 1]["step"] if epoch else 0
    assert start_step < reached["step"] <= history[epoch]["step"]
    assert reached["epoch_fraction"] == (reached["step"] - start_step) / epoch_steps(epoch)
    assert summary["steps_to_target"] == reached["step"]
    assert summary["epochs_to_target"] == epoch + reached["epoch_fraction"]
    assert 0 < reached["step"] < LAST  # reached inside the run, so that a resume crosses it
    # Curvature (--curvature-every -1): at the step the target is first reached, and at the end of each fit() call
    # (each batch phase), like the statistics above.
    curvature = read(run_dir, "curvature.jsonl")
    assert reached["step"] not in phase_ends
    assert [(r["step"], r["at_target"]) for r in curvature] == sorted([(reached["step"], True)]
                                                                      + [(step, False) for step in phase_ends])


def test_signals_at_many_moments_leave_the_records_of_an_uninterrupted_run(tmp_path, reference):
    logs, summaries = {name: [] for name in PLANS}, {name: [] for name in PLANS}
    deadline = time.time() + 900
    threads = [threading.Thread(target=run_plan, args=(tmp_path / name, plan, logs[name], summaries[name], deadline))
               for name, plan in PLANS.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    reference_dir = reference()
    for name, log in logs.items():
        assert len(log) == len(PLANS[name]) + 1, (name, log)
        for moment, argument, sig, code, ended_early, stderr in log[:-1]:
            where = f"run {name}: {moment} {argument}"
            assert not ended_early, (where, "the attempt ended before its signal", stderr[-2000:])
            assert code == (130 if sig == signal.SIGINT else -signal.SIGKILL), (where, code, stderr[-2000:])
        _, _, _, code, _, stderr = log[-1]
        assert code == 0, (name, stderr[-3000:])
        assert "--resume:" not in stderr  # every instrument restored its state
        run_dir = tmp_path / name
        for file in FILES:
            resumed, clean = read(run_dir, file), read(reference_dir, file)
            if file == "summary.json":
                assert resumed["attempts"] == len(PLANS[name]) + 1
                assert resumed["instruments_not_restored"] == []
                for key in ("run_dir", "export_path", "attempts"):
                    resumed.pop(key), clean.pop(key)
            assert_same(resumed, clean, f"run {name}: {file}")
        # The target checks' per-example record: the uninterrupted run's checks, each once (clock field aside).
        checks, clean_checks = target_record.read(str(run_dir)), target_record.read(str(reference_dir))
        for key in ("steps", "epochs", "epoch_fractions", "correct", "target"):
            np.testing.assert_array_equal(checks[key], clean_checks[key], err_msg=f"run {name}: {key}")

    # The times in summary.json are the last attempt's: the epochs it finished (not those of earlier attempts).
    # Run a's first attempt trained epoch 0 and was stopped in epoch 1; run b's second resumed from epoch 1's
    # checkpoint and finished epochs 1 and 2; every last attempt only finished the run.
    (first_a, history_a), = summaries["a"][:1]
    assert first_a["attempts"] == 1 and [record["epoch"] for record in history_a] == [0]
    assert first_a["train_time_s"] == pytest.approx(history_a[0]["epoch_time_s"])
    assert first_a["instrument_time_s"] == pytest.approx(history_a[0]["instrument_time_s"])
    (second_b, history_b), = summaries["b"][:1]
    assert second_b["attempts"] == 2 and [record["epoch"] for record in history_b] == [0, 1, 2]
    assert second_b["train_time_s"] == pytest.approx(sum(record["epoch_time_s"] for record in history_b[1:]))
    for name in PLANS:
        final = read(tmp_path / name, "summary.json")
        assert final["train_time_s"] == final["instrument_time_s"] == 0.0
        assert 0 < final["wall_time_s"]
    clean = read(reference_dir, "summary.json")
    assert clean["train_time_s"] == pytest.approx(sum(r["epoch_time_s"] for r in read(reference_dir, "metrics.jsonl")))
