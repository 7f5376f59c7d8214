"""No library warning reaches the terminal from a documented command: train, sweep, advise, evaluate, predict and
report run as a user runs them, on tiny configs; BATCHSCOPE_TF_LOGS=1 lets the libraries' warnings through."""

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

from pipeline import startup

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model", "cnn", "--verbose", "0", "--grad-stats-every", "0", "--no-dynamics", "--precise-bn-samples", "64"]


def _start(module, *args, cwd):
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", startup.ENV, "PYTHONWARNINGS")}
    env["PYTHONPATH"] = REPO
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(processes: dict) -> dict:
    """{name: stderr} once every process has exited 0."""
    errors = {}
    for name, process in processes.items():
        _, stderr = process.communicate(timeout=900)
        assert process.returncode == 0, (name, stderr[-3000:])
        errors[name] = stderr
    return errors


@pytest.mark.slow
def test_documented_commands_print_no_library_warnings(tmp_path):
    import tensorflow as tf

    first = _finish({
        "train": _start("pipeline.train", *TINY, "--max-steps", "6", "--run-dir", "run", cwd=tmp_path),
        "sweep": _start("pipeline.sweep", *TINY, "--batch", "64,128", "--budget-steps", "6", "--out", "sweep",
                        cwd=tmp_path),
        "advise": _start("pipeline.advise", "--model", "cnn", "--probe-steps", "8", "--max-batch", "128", "--out",
                         "advice", cwd=tmp_path),
    })
    image = np.random.default_rng(0).integers(0, 17, (8, 8, 1), dtype=np.uint8)
    tf.io.write_file(str(tmp_path / "digit.png"), tf.io.encode_png(image))
    second = _finish({
        "evaluate": _start("pipeline.evaluate", "run", cwd=tmp_path),
        "predict": _start("pipeline.predict", "digit.png", "--model", "run", cwd=tmp_path),
        "report": _start("pipeline.report", "sweep", cwd=tmp_path),
    })
    for name, stderr in {**first, **second}.items():
        # What may remain is our own: the notes of a command, never a library's "...Warning: ..." or a log line.
        assert not [line for line in stderr.splitlines() if "Warning" in line or "WARNING" in line], (name, stderr)
        assert "Traceback" not in stderr, (name, stderr)


@pytest.mark.parametrize("shown", [False, True])
def test_library_warnings_are_hidden_unless_batchscope_tf_logs_is_set(monkeypatch, shown):
    for name in ("tensorflow", "absl", "keras_tuner"):  # quiet_libraries sets their levels; restored after
        monkeypatch.setattr(startup.logging.getLogger(name), "level", startup.logging.getLogger(name).level)
    if shown:
        monkeypatch.setenv(startup.ENV, "1")
    else:
        monkeypatch.delenv(startup.ENV, raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        startup.quiet_libraries()
        for module in ("keras.src.trainers.epoch_iterator", "tensorflow.python.data", "sklearn.model_selection"):
            warnings.warn_explicit("a library's warning", UserWarning, "library.py", 1, module=module)
        warnings.warn_explicit("our own warning", UserWarning, "pipeline/x.py", 1, module="pipeline.x")
    assert [str(w.message) for w in caught] == ["a library's warning"] * 3 * shown + ["our own warning"]
