"""`--resume` without `--run-dir` continues the most recent interrupted or failed run of the same config under
runs/, and otherwise refuses in one line that lists what it found: never a silent new run.

Only the run that is interrupted is a subprocess (a real SIGTERM); the refusals and the continued run call
pipeline.train's main() in this process, as the command line does.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pipeline import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ["--model", "cnn", "--batch", "64", "--epochs", "1", "--seed", "3", "--verbose", "0", "--steps-per-execution",
         "1", "--grad-stats-every", "0", "--bn-stats-every", "0", "--no-dynamics", "--precise-bn-samples", "0",
         "--no-export"]


def _train(capsys, *extra):
    """`python -m pipeline.train FLAGS extra` in this process (in the current directory): (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = train.main([*FLAGS, *extra])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess([], code, out, err)


@pytest.mark.slow
def test_resume_without_run_dir_continues_the_latest_unfinished_run_of_this_config(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    # Nothing to continue: one line, exit 2, nothing created.
    nothing = _train(capsys, "--resume")
    assert nothing.returncode == 2
    assert nothing.stderr == ("error: --resume: no interrupted or failed run of this config under runs/ (it holds no "
                              "runs); pass --run-dir to choose one, or leave out --resume to start a new run\n")
    assert not (tmp_path / "runs").exists()

    # A run in the default place, ended by SIGTERM during training.
    marker = tmp_path / "paused"
    process = subprocess.Popen([sys.executable, os.path.join(REPO, "tests", "slow_train.py"), *FLAGS], cwd=tmp_path,
                               env=dict(os.environ, PYTHONPATH=REPO, PAUSE_STAGE="training", PAUSE_MARKER=str(marker)),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while not marker.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=300) == 143, process.stderr.read()[-3000:]
    [run] = os.listdir(tmp_path / "runs")
    run_dir = os.path.join("runs", run)

    # Another config is not continued: the refusal names the run and the field that differs.
    other = _train(capsys, "--resume", "--lr", "0.05")
    assert other.returncode == 2 and len(other.stderr.splitlines()) == 1
    assert f"(found: {run_dir} interrupted (--lr 0.1, this command 0.05))" in other.stderr

    continued = _train(capsys, "--resume")
    assert continued.returncode == 0, continued.stderr[-3000:]
    assert continued.stderr == (f"--resume: continuing {run_dir} (interrupted), the most recent unfinished run of "
                                "this config\n")
    assert os.listdir(tmp_path / "runs") == [run]
    summary = json.loads((tmp_path / run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 1293 // 64
    assert json.loads(continued.stdout.splitlines()[-1])["run_dir"] == run_dir

    # Completed now: nothing left to continue.
    done = _train(capsys, "--resume")
    assert done.returncode == 2 and f"(found: {run_dir} completed)" in done.stderr
    assert os.listdir(tmp_path / "runs") == [run]
