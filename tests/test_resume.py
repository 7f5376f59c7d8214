"""Resume after a real `kill -9`: with --deterministic and a seed, the resumed run ends where an uninterrupted one does."""

import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ["--model", "cnn", "--batch", "64", "--epochs", "5", "--seed", "7", "--deterministic", "--verbose", "2",
         "--precise-bn-samples", "256", "--grad-stats-every", "7", "--bn-stats-every", "7", "--no-export"]


def command(run_dir, *extra):
    return [sys.executable, "-m", "pipeline.train", *FLAGS, "--run-dir", str(run_dir), *extra]


def env():
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO)


def weights(run_dir):
    arrays = {}
    with h5py.File(os.path.join(run_dir, "checkpoints", "latest.weights.h5"), "r") as f:
        f.visititems(lambda name, item: arrays.__setitem__(name, item[()]) if isinstance(item, h5py.Dataset) else None)
    return arrays


def epoch_saved(run_dir):
    try:
        with open(os.path.join(run_dir, "checkpoints", "training_metadata.json")) as f:
            return json.load(f)["epoch"]
    except (OSError, ValueError):
        return 0


def test_resume_after_kill_matches_uninterrupted_run(tmp_path):
    killed_dir, clean_dir = tmp_path / "killed", tmp_path / "clean"
    # Start both: the clean run in the background while the other one is killed and resumed.
    clean = subprocess.Popen(command(clean_dir), cwd=REPO, env=env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    victim = subprocess.Popen(command(killed_dir), cwd=REPO, env=env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while epoch_saved(killed_dir) < 2 and victim.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = epoch_saved(killed_dir)
    assert 2 <= killed_at < 5, f"the run was not killed mid-training (saved epoch {killed_at})"
    assert not os.path.exists(killed_dir / "summary.json")

    # Without --resume the unfinished run is refused, not silently overwritten.
    refused = subprocess.run(command(killed_dir), cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "--resume" in refused.stderr

    resumed = subprocess.run(command(killed_dir, "--resume"), cwd=REPO, env=env(), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert clean.wait(timeout=600) == 0, clean.stderr.read()[-3000:]

    a, b = weights(killed_dir), weights(clean_dir)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    summary_a = json.load(open(killed_dir / "summary.json"))
    summary_b = json.load(open(clean_dir / "summary.json"))
    assert summary_a["status"] == summary_b["status"] == "completed"
    assert summary_a["test_accuracy"] == summary_b["test_accuracy"]
    assert summary_a["steps"] == summary_b["steps"] == 5 * (1293 // 64)
    epochs = [json.loads(line)["epoch"] for line in open(killed_dir / "metrics.jsonl")]
    assert epochs == [0, 1, 2, 3, 4]  # epochs redone after the kill are not logged twice
    # The instruments count steps from the restored optimizer, not from 0 (BackupAndRestore restores after their
    # on_train_begin): the resumed attempt measures at the uninterrupted run's steps.
    def grad_steps(run_dir):
        return [json.loads(line)["step"] for line in open(run_dir / "grad_stats.jsonl")]

    assert sorted(set(grad_steps(killed_dir))) == grad_steps(clean_dir) == [0, *range(7, 5 * 20 + 1, 7)]
    clean_bn = json.load(open(clean_dir / "bn_stats.json"))["layers"]
    resumed_bn = json.load(open(killed_dir / "bn_stats.json"))["layers"]
    first = next(iter(clean_bn))
    clean_steps = [row["step"] for row in clean_bn[first]["measurements"]]
    assert clean_steps == [0, *range(7, 100, 7), 100]
    assert [row["step"] for row in resumed_bn[first]["measurements"]] == [s for s in clean_steps if s > killed_at * 20]
