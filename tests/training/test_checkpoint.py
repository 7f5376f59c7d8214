"""Resume after real signals: SIGKILL and SIGINT at many moments of a run, including inside checkpoint saves.

With --deterministic and a seed, every interrupted run, resumed until it completes, ends with the weights of one
uninterrupted reference run, bit for bit. Saves are slowed by tests/slow_train.py (SLOW_CHECKPOINT_S) so that
signals land inside them; the runs are interrupted concurrently to keep the test within a few minutes.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import h5py
import numpy as np
import pytest

from pipeline import train
from pipeline.training import checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EPOCHS, STEPS_PER_EPOCH = 5, 1293 // 64
FLAGS = ["--model", "cnn", "--batch", "64", "--epochs", str(EPOCHS), "--seed", "7", "--deterministic", "--verbose",
         "2", "--precise-bn-samples", "256", "--grad-stats-every", "7", "--bn-stats-every", "7", "--no-export"]
NOTICE = "checkpoint: ignoring"


def command(run_dir, *extra, slow=False):
    program = [os.path.join(REPO, "tests", "slow_train.py")] if slow else ["-m", "pipeline.train"]
    return [sys.executable, *program, *FLAGS, "--run-dir", str(run_dir), *extra]


def env(**extra):
    return dict(os.environ, PYTHONPATH=REPO, **extra)


def start(run_dir, *extra, slow=False):
    # A slow attempt also pauses 3 s when it enters precise BN, after creating <run_dir>.after, so that a signal
    # meant for "after training" lands there however fast the machine (a fixed delay after the last commit did not).
    paused = {"SLOW_CHECKPOINT_S": "0.3", "PAUSE_STAGE": "precise_bn", "PAUSE_MARKER": f"{run_dir}.after",
              "PAUSE_S": "3"}
    return subprocess.Popen(command(run_dir, *extra, slow=slow), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env(**paused) if slow else env())


def weights(run_dir):
    arrays = {}
    with h5py.File(checkpoint.latest_weights(os.path.join(run_dir, "checkpoints")), "r") as f:
        f.visititems(lambda name, item: arrays.__setitem__(name, item[()]) if isinstance(item, h5py.Dataset) else None)
    return arrays


def committed_epoch(run_dir):
    state = checkpoint.read_state(os.path.join(run_dir, "checkpoints"))
    return state["epoch"] if state else 0


def assert_same_weights(run_dir, reference_dir):
    a, b = weights(run_dir), weights(reference_dir)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=f"{run_dir}: {key}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run, started once in the background and shared; call it to wait for its folder."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    process = start(run_dir)

    def finished():
        _, stderr = process.communicate(timeout=900)
        assert process.returncode == 0, stderr[-3000:]
        assert stderr == ""  # quiet start-up: nothing on stderr for a run that goes well
        return run_dir

    yield finished
    if process.poll() is None:
        process.kill()
        process.wait()


@pytest.mark.slow
def test_resume_after_kill_matches_uninterrupted_run(tmp_path, reference, capsys):
    killed_dir = tmp_path / "killed"
    victim = start(killed_dir)
    deadline = time.time() + 600
    while committed_epoch(killed_dir) < 2 and victim.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = committed_epoch(killed_dir)
    assert 2 <= killed_at < EPOCHS, f"the run was not killed mid-training (saved epoch {killed_at})"
    assert not os.path.exists(killed_dir / "summary.json")
    config_json = (killed_dir / "config.json").read_bytes()

    # Without --resume the unfinished run is refused, not silently overwritten; --resume refuses a changed batch
    # and a changed number of epochs under the cosine schedule; neither touches config.json.
    # The refusals come before any training: main() in this process, as the command line calls it.
    errors = []
    for extra in [(), ("--resume", "--batch", "32"), ("--resume", "--epochs", "9")]:
        capsys.readouterr()
        code = train.main([*FLAGS, "--run-dir", str(killed_dir), *extra])
        errors.append((code, capsys.readouterr().err))
    assert all(code == 2 for code, _ in errors), errors
    assert all(stderr.count("\n") == 1 for _, stderr in errors), errors
    assert "--resume" in errors[0][1]
    assert errors[1][1].startswith("error: --batch: ") and "has 64, this command 32" in errors[1][1]
    assert errors[2][1].startswith("error: --epochs: ") and "has 5, this command 9" in errors[2][1]
    assert "cosine" in errors[2][1]
    assert (killed_dir / "config.json").read_bytes() == config_json

    # --verbose may change on --resume.
    resumed = subprocess.run(command(killed_dir, "--resume", "--verbose", "0"), cwd=REPO, env=env(),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stderr == ""
    reference_dir = reference()
    assert_same_weights(killed_dir, reference_dir)
    summary_a = json.load(open(killed_dir / "summary.json"))
    summary_b = json.load(open(reference_dir / "summary.json"))
    assert summary_a["status"] == summary_b["status"] == "completed"
    assert summary_a["test_accuracy"] == summary_b["test_accuracy"]
    assert summary_a["steps"] == summary_b["steps"] == EPOCHS * STEPS_PER_EPOCH
    epochs = [json.loads(line)["epoch"] for line in open(killed_dir / "metrics.jsonl")]
    assert epochs == list(range(EPOCHS))  # epochs redone after the kill are not logged twice
    assert json.load(open(killed_dir / "config.json"))["config"]["verbose"] == 0
    # The instruments restore their state with the weights: the resumed run's records are the uninterrupted run's,
    # once each (tests/test_resume_instruments.py compares their values).
    def grad_steps(run_dir):
        return [json.loads(line)["step"] for line in open(run_dir / "grad_stats.jsonl")]

    last = EPOCHS * STEPS_PER_EPOCH
    assert grad_steps(killed_dir) == grad_steps(reference_dir) == [0, *range(7, last, 7), last]  # and the last
    clean_bn = json.load(open(reference_dir / "bn_stats.json"))["layers"]
    resumed_bn = json.load(open(killed_dir / "bn_stats.json"))["layers"]
    first = next(iter(clean_bn))
    clean_steps = [row["step"] for row in clean_bn[first]["measurements"]]
    assert clean_steps == [0, *range(7, last, 7), last]
    assert [row["step"] for row in resumed_bn[first]["measurements"]] == clean_steps


def _writing(run_dir, epoch):
    """A save of `epoch` has begun: its weights file is still partial."""
    return os.path.exists(os.path.join(run_dir, "checkpoints", f"{checkpoint.PARTIAL}{checkpoint.weights_name(epoch)}"))


def _committing(run_dir, epoch):
    """The weights of `epoch` are in place, but checkpoint.json does not name them yet."""
    return (os.path.exists(os.path.join(run_dir, "checkpoints", checkpoint.weights_name(epoch)))
            and committed_epoch(run_dir) < epoch)


def _training(run_dir, epoch):
    """Epoch `epoch` (0-based) has started: the one before it is committed (or the CSV log exists for epoch 0)."""
    if epoch == 0:
        return os.path.exists(os.path.join(run_dir, "metrics.csv"))
    return committed_epoch(run_dir) >= epoch


def _after_training(run_dir, epoch):
    """Training is over (the last epoch committed) and precise BN has begun (a slow attempt pauses there)."""
    return committed_epoch(run_dir) >= EPOCHS and os.path.exists(f"{run_dir}.after")


MOMENTS = {"writing": _writing, "committing": _committing, "training": _training, "after": _after_training}
# Per run: the interruptions, in order, as (signal, moment, epoch, extra delay in seconds once the moment is seen).
PLANS = [
    [(signal.SIGINT, "writing", 1, 0.2), (signal.SIGKILL, "committing", 2, 0), (signal.SIGINT, "training", 4, 0.5)],
    [(signal.SIGKILL, "writing", 2, 0.3), (signal.SIGINT, "committing", 3, 0), (signal.SIGINT, "after", EPOCHS, 0.3)],
    [(signal.SIGKILL, "training", 1, 0.5), (signal.SIGINT, "writing", 4, 0.1), (signal.SIGKILL, "committing", 5, 0)],
]


def interrupt(run, deadline):
    """Runs one plan: waits for each moment, sends the signal, records the ending and resumes, in turn."""
    process = start(run["dir"], slow=True)
    for sig, moment, epoch, delay in run["plan"]:
        while process.poll() is None and not MOMENTS[moment](str(run["dir"]), epoch) and time.time() < deadline:
            time.sleep(0.01)
        if process.poll() is None:
            time.sleep(delay)
            process.send_signal(sig)
        stdout, stderr = process.communicate(timeout=300)
        summary_path = run["dir"] / "summary.json"
        saved = json.load(open(summary_path)) if summary_path.exists() else None
        run["log"].append((sig, moment, epoch, process.returncode, stdout, stderr, saved))
        process = start(run["dir"], "--resume", slow=len(run["log"]) < len(run["plan"]))
    run["process"] = process


@pytest.mark.slow
def test_signals_at_many_moments_never_lose_a_checkpoint(tmp_path, reference):
    runs = [{"dir": tmp_path / f"run{i}", "plan": plan, "log": []} for i, plan in enumerate(PLANS)]
    deadline = time.time() + 900
    threads = [threading.Thread(target=interrupt, args=(run, deadline)) for run in runs]  # signals on time
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert time.time() < deadline and all("process" in run for run in runs)
    reference_dir = reference()
    for run in runs:
        stdout, stderr = run["process"].communicate(timeout=600)
        assert run["process"].returncode == 0, stderr[-3000:]
        summary = json.load(open(run["dir"] / "summary.json"))
        assert summary["status"] == "completed" and summary["steps"] == EPOCHS * STEPS_PER_EPOCH
        assert json.loads(stdout.splitlines()[-1])["status"] == "completed"
        assert_same_weights(run["dir"], reference_dir)
        assert [json.loads(line)["epoch"] for line in open(run["dir"] / "metrics.jsonl")] == list(range(EPOCHS))
        stderrs = [entry[5] for entry in run["log"][1:]] + [stderr]
        for (sig, moment, epoch, code, out, err, saved), next_err in zip(run["log"], stderrs):
            where = f"{run['dir'].name}: {signal.Signals(sig).name} {moment} {epoch}"
            if code in (-signal.SIGKILL, 130):
                assert code == (-signal.SIGKILL if sig == signal.SIGKILL else 130), where
            else:  # the process ended on its own before the moment came
                pytest.fail(f"{where}: the run ended with {code} before it was interrupted: {err[-2000:]}")
            if sig == signal.SIGINT:
                line = json.loads(out.splitlines()[-1])
                assert line["status"] == "interrupted" and saved["status"] == "interrupted", where
                assert line["reason"] == saved["reason"] and "--resume" in saved["reason"], where
                assert line["stage"] in (("training", "precise_bn", "evaluation") if moment == "after" else
                                         ("training",)), (where, line)
                assert [l for l in err.splitlines() if NOTICE not in l] == [f"run interrupted: {line['reason']}"], where
            # The next attempt names what an interrupted save left behind, in one line, and says nothing else.
            lines = [line for line in next_err.splitlines() if not line.startswith("run interrupted: ")]
            assert all(NOTICE in line for line in lines) and len(lines) <= 1, (where, next_err)
            if moment in ("writing", "committing"):
                assert len(lines) == 1, (where, next_err)
