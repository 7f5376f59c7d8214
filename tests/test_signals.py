"""Real signals to `python -m pipeline.train` in subprocesses: SIGTERM ends a run as Ctrl-C does, a second signal
while the summary is written leaves it complete, and a SIGINT whose KeyboardInterrupt is lost in a weakref callback
still ends the run (pipeline/interrupts.py)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ["--model", "cnn", "--batch", "64", "--epochs", "2", "--seed", "3", "--verbose", "0", "--steps-per-execution",
         "1", "--grad-stats-every", "0", "--bn-stats-every", "0", "--no-dynamics", "--precise-bn-samples", "0"]

pytestmark = pytest.mark.slow


def _start(tmp_path, name: str, stage: str, summary_pause: bool = False):
    run_dir, marker = tmp_path / name, tmp_path / f"{name}.paused"
    environment = dict(os.environ, PYTHONPATH=REPO, PAUSE_STAGE=stage, PAUSE_MARKER=str(marker))
    if summary_pause:
        environment.update(SUMMARY_MARKER=str(tmp_path / f"{name}.summary"), SUMMARY_PAUSE_S="3")
    process = subprocess.Popen([sys.executable, os.path.join(REPO, "tests", "slow_train.py"), *FLAGS,
                                "--run-dir", str(run_dir)], cwd=REPO, env=environment, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    return run_dir, marker, process


def _wait_for(path, process, timeout=600):
    deadline = time.time() + timeout
    while not path.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert path.exists(), process.communicate()[1][-3000:]


@pytest.fixture(scope="module")
def endings(tmp_path_factory):
    """The three runs at once (each spends most of its time starting TensorFlow): {name: (returncode, stdout,
    stderr, summary)}."""
    tmp_path = tmp_path_factory.mktemp("signals")
    runs = {"sigterm": _start(tmp_path, "sigterm", "training"),
            "second": _start(tmp_path, "second", "training", summary_pause=True),
            "weakref": _start(tmp_path, "weakref", "weakref")}
    for name, (run_dir, marker, process) in runs.items():
        _wait_for(marker, process)
        process.send_signal(signal.SIGINT if name == "weakref" else signal.SIGTERM)
    _wait_for(tmp_path / "second.summary", runs["second"][2])
    runs["second"][2].send_signal(signal.SIGINT)  # while the summary is being written
    results = {}
    for name, (run_dir, marker, process) in runs.items():
        stdout, stderr = process.communicate(timeout=300)
        summary_file = run_dir / "summary.json"
        results[name] = (process.returncode, stdout, stderr,
                         json.loads(summary_file.read_text()) if summary_file.exists() else None)
    return results


def _assert_interrupted_in_training(returncode, stdout, summary, expected_code):
    assert returncode == expected_code
    assert summary["status"] == "interrupted" and summary["stage"] == "training"
    assert summary["reason"].startswith("interrupted during training (0 epochs (0 steps) trained, no checkpoint yet)")
    assert "run the same command with --resume" in summary["reason"]
    line = json.loads(stdout.splitlines()[-1])
    assert (line["status"], line["stage"], line["reason"]) == ("interrupted", "training", summary["reason"])


def test_sigterm_ends_a_run_as_ctrl_c_does(endings):
    returncode, stdout, stderr, summary = endings["sigterm"]
    _assert_interrupted_in_training(returncode, stdout, summary, 143)
    assert stderr == f"run interrupted: {summary['reason']}\n"


def test_a_second_signal_while_the_summary_is_written_leaves_it_complete(endings):
    returncode, stdout, stderr, summary = endings["second"]
    _assert_interrupted_in_training(returncode, stdout, summary, 143)  # the first signal's code
    assert summary["wall_time_s"] > 0 and summary["per_replica_batch"] == 64
    assert stderr == f"run interrupted: {summary['reason']}\n"


def test_a_sigint_lost_in_a_weakref_callback_still_ends_the_run(endings):
    returncode, stdout, stderr, summary = endings["weakref"]
    # Python printed the KeyboardInterrupt and went on: the path this test is about was taken.
    assert "Exception ignored in" in stderr and "KeyboardInterrupt" in stderr
    _assert_interrupted_in_training(returncode, stdout, summary, 130)
    assert stderr.endswith(f"run interrupted: {summary['reason']}\n")
