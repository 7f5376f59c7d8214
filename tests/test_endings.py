"""Every ending of a run writes summary.json and prints the JSON line: interrupted after training (real SIGINT in a
subprocess during precise BN, evaluation and export), failed, and what a rerun with --resume does then."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import keras
import pytest

from pipeline import config as config_lib
from pipeline import train as train_lib
from pipeline.serving import export as export_lib
from pipeline.training import optim

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ["--model", "cnn", "--batch", "64", "--epochs", "1", "--seed", "3", "--verbose", "0",
         "--precise-bn-samples", "256", "--grad-stats-every", "0", "--bn-stats-every", "0", "--no-dynamics"]
STAGES = ("precise_bn", "evaluation", "export")


@pytest.mark.slow
def test_interrupted_after_training_says_what_is_done_and_resume_finishes(tmp_path):
    runs = {}
    for stage in STAGES:
        run_dir, marker = tmp_path / stage, tmp_path / f"{stage}.paused"
        environment = dict(os.environ, PYTHONPATH=REPO, PAUSE_STAGE=stage, PAUSE_MARKER=str(marker))
        process = subprocess.Popen([sys.executable, os.path.join(REPO, "tests", "slow_train.py"), *FLAGS,
                                    "--run-dir", str(run_dir)], cwd=REPO, env=environment, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        runs[stage] = (run_dir, marker, process)
    deadline = time.time() + 600
    for stage, (run_dir, marker, process) in runs.items():
        while not marker.exists() and process.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
    for stage, (run_dir, marker, process) in runs.items():
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 130, (stage, stderr[-3000:])
        line = json.loads(stdout.splitlines()[-1])
        summary = json.load(open(run_dir / "summary.json"))
        assert line["status"] == summary["status"] == "interrupted"
        assert line["stage"] == summary["stage"] == stage
        assert line["reason"] == summary["reason"]
        assert stderr == f"run interrupted: {summary['reason']}\n"
        assert f"1 epochs ({1293 // 64} steps) trained, checkpoint of epoch 1" in summary["reason"]
        assert "--resume" in summary["reason"] and "without training" in summary["reason"]
        assert summary["steps"] == 1293 // 64
        # What is done is kept: the accuracies once evaluation has finished (an interrupted export).
        assert (summary["test_accuracy"] is None) == (stage != "export")
        if stage == "export":
            assert "hidden folder" in summary["reason"]
            # The half-written SavedModel is hidden; TF Serving sees no version.
            assert not [name for name in os.listdir(run_dir / "export" / "cnn") if name.isdigit()]

    # A rerun trains nothing again and does what was left: precise BN, evaluation, export.
    metrics = {stage: (run_dir / "metrics.jsonl").read_text() for stage, (run_dir, _, _) in runs.items()}
    reruns = {stage: subprocess.Popen([sys.executable, "-m", "pipeline.train", *FLAGS, "--run-dir", str(run_dir),
                                       "--resume"], cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for stage, (run_dir, _, _) in runs.items()}
    for stage, process in reruns.items():
        stdout, stderr = process.communicate(timeout=600)
        run_dir = runs[stage][0]
        assert process.returncode == 0 and stderr == "", (stage, stderr[-3000:])
        summary = json.load(open(run_dir / "summary.json"))
        assert summary["status"] == "completed" and summary["stage"] == "" and summary["test_accuracy"] > 0.5
        assert (run_dir / "metrics.jsonl").read_text() == metrics[stage]
        assert summary["export_path"] == str(run_dir / "export" / "cnn" / "1")
        assert json.loads(stdout.splitlines()[-1])["status"] == "completed"


def smoke(tmp_path, **changes):
    return dataclasses.replace(config_lib.smoke(), run_dir=str(tmp_path / "run"), epochs=1, grad_stats_every=0,
                               bn_stats_every=0, dynamics=False, **changes)


def test_failed_run_prints_its_json_line(tmp_path, monkeypatch, capsys):
    real = optim.learning_rate

    def nan_schedule(config, phases):
        class Nan(keras.optimizers.schedules.LearningRateSchedule):
            def __call__(self, step):
                return real(config, phases)(step) * float("nan")

        return Nan()

    monkeypatch.setattr(optim, "learning_rate", nan_schedule)
    config = smoke(tmp_path, norm="none")
    flags = ["--model", "cnn", "--norm", "none", "--epochs", "1", "--run-dir", config.run_dir, "--verbose", "0",
             "--grad-stats-every", "0", "--bn-stats-every", "0", "--no-dynamics"]
    assert train_lib.main(flags) == 1
    out, err = capsys.readouterr()
    line = json.loads(out.splitlines()[-1])
    summary = json.load(open(os.path.join(config.run_dir, "summary.json")))
    assert line["status"] == summary["status"] == "failed" and line["stage"] == summary["stage"] == "training"
    assert "loss became nan" in summary["reason"] and err == f"run failed: {summary['reason']}\n"


@pytest.mark.slow
def test_an_error_after_training_is_recorded_then_raised(tmp_path, monkeypatch):
    def broken_export(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_lib, "export_model", broken_export)
    config = smoke(tmp_path)
    with pytest.raises(OSError, match="No space left"):
        train_lib.train(config)
    summary = json.load(open(os.path.join(config.run_dir, "summary.json")))
    assert summary["status"] == "failed" and summary["stage"] == "export"
    assert summary["reason"] == "OSError: [Errno 28] No space left on device"
    assert summary["steps"] == 1293 // 64
