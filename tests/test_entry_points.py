"""Every command's bad input, run as a user runs it: exit code 2 and exactly one line on stderr.

The error is reached after TensorFlow is imported, so the test also shows that its start-up lines are filtered
(pipeline/startup.py) for evaluate, predict and advise as for train and sweep (tests/test_cli.py, test_sweep.py).
"""

import os
import signal
import subprocess
import sys
import time

import pytest

from pipeline import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(module, *args, cwd):
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "BATCHSCOPE_TF_LOGS")}
    env["PYTHONPATH"] = REPO
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=300)


@pytest.mark.parametrize("module, make_args, words", [
    ("pipeline.evaluate", lambda d: [str(d / "empty")], ["SavedModel"]),
    ("pipeline.predict", lambda d: [str(d / "image.png"), "--model", str(d / "empty")], ["SavedModel"]),
    ("pipeline.advise", lambda d: ["--dataset", f"npz:{d / 'missing.npz'}", "--out", str(d / "advice")],
     ["missing.npz"]),
])
@pytest.mark.slow
def test_bad_input_after_tensorflow_import_is_one_line(tmp_path, module, make_args, words):
    (tmp_path / "empty").mkdir()
    (tmp_path / "image.png").write_bytes(b"not an image")
    result = run(module, *make_args(tmp_path), cwd=tmp_path)
    lines = result.stderr.splitlines()
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr[-2000:]
    for word in words:
        assert word in lines[0], lines[0]
    assert not os.path.exists(tmp_path / "advice")  # a rejected command creates nothing


@pytest.mark.parametrize("args, line", [
    (["missing.png", "--model", "."], "error: IMAGE missing.png: cannot read it (no such file)"),
    (["image.png", "--model", "missing"], "error: --model: missing is not a folder; pass a SavedModel folder, a model "
                                          "folder of numeric versions, or a run directory"),
])
@pytest.mark.slow
def test_predict_refuses_missing_paths_before_importing_tensorflow(tmp_path, args, line):
    (tmp_path / "image.png").write_bytes(b"not checked before the model loads")
    code = ("import sys; from pipeline.serving import client as predict; code = predict.main(sys.argv[1:]); "
            "print('tensorflow' in sys.modules); sys.exit(code)")
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=tmp_path,
                            env=dict(os.environ, PYTHONPATH=REPO), timeout=300)
    assert (result.returncode, result.stderr, result.stdout) == (2, line + "\n", "False\n")


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143), (None, 130)])
def test_an_interruption_ends_a_command_with_the_shells_code(signum, code, capsys):
    """pipeline.cli.run, every entry point's ending: SIGTERM ends a command as Ctrl-C does, with the code a shell
    gives a process ended by the signal (128 + its number); a KeyboardInterrupt raised otherwise ends it with 130."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def command():
        if signum is None:
            raise KeyboardInterrupt
        os.kill(os.getpid(), signum)
        time.sleep(60)  # the handler raises KeyboardInterrupt in here
        return 0

    try:
        assert cli.run(command, "interrupted; kept", interrupted_json={"status": "interrupted"}) == code
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    assert capsys.readouterr() == ('{"status": "interrupted"}\n', "interrupted; kept\n")
