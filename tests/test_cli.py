"""The train command line: bad input ends with one line naming the flag or file and exit code 2."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_train(*args, cwd=REPO, timeout=300):
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "BATCHSCOPE_TF_LOGS")}
    env["PYTHONPATH"] = REPO  # TensorFlow's start-up lines are filtered by default, not by the caller
    return subprocess.run([sys.executable, "-m", "pipeline.train", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


def assert_one_line_error(result, *words):
    """Exit code 2 and exactly one line on stderr, ours: no TensorFlow start-up lines, warnings or traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr[-2000:]
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.parametrize(
    "args, words",
    [
        (["--batch", "0"], ["--batch", "positive"]),
        (["--batch", "-3"], ["--batch"]),
        (["--batch", "2.5"], ["--batch", "integer"]),
        (["--batch", "many"], ["--batch", "integer"]),
        (["--model", "resnet7"], ["--model", "resnet20"]),
        (["--replicas", "2"], ["--replicas", "--strategy mirrored"]),
        (["--intra-op-threads", "-2"], ["--intra-op-threads", "automatic"]),
        (["--replicas", "4", "--strategy", "mirrored", "--logical-cpus", "2"], ["--replicas", "--logical-cpus is 2"]),
        (["--replicas", "4", "--strategy", "mirrored", "--batch", "30"], ["--batch", "4 replicas"]),
        (["--norm", "instance"], ["--norm", "group"]),
        (["--optimizer", "lbfgs"], ["--optimizer", "adam"]),
        (["--schedule", "poly"], ["--schedule", "cosine"]),
        (["--lr", "0"], ["--lr"]),
        (["--lr", "-1"], ["--lr"]),
        (["--lr", "nan"], ["--lr", "finite"]),
        (["--lr", "inf"], ["--lr", "finite"]),
        (["--epochs", "0"], ["--epochs"]),
        (["--schedule", "multistep"], ["--milestones"]),
        (["--batch-schedule", "32@5,64@2"], ["--batch-schedule"]),
        (["--no-such-flag", "1"], ["no-such-flag"]),
        (["--config", "/nonexistent/config.json"], ["--config", "/nonexistent/config.json"]),
    ],
)
@pytest.mark.slow
def test_bad_flags(args, words):
    assert_one_line_error(run_train(*args), *words)


@pytest.mark.slow
def test_bad_config_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"batch": "big"}))
    assert_one_line_error(run_train("--config", str(path)), "batch", "int")
    path.write_text(json.dumps({"btach": 32}))
    assert_one_line_error(run_train("--config", str(path)), "btach")
    path.write_text("{not json")
    assert_one_line_error(run_train("--config", str(path)), "--config", "JSON")


@pytest.mark.slow
def test_unwritable_run_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    assert_one_line_error(run_train("--run-dir", str(blocker / "run")), "--run-dir")


@pytest.mark.slow
def test_finished_run_needs_resume_or_overwrite(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "summary.json").write_text(json.dumps({"status": "completed"}))
    assert_one_line_error(run_train("--run-dir", str(run_dir)), "--run-dir", "--overwrite")
    # --overwrite replaces the run only once the new command is accepted.
    assert_one_line_error(run_train("--run-dir", str(run_dir), "--overwrite", "--batch", "100000"), "--batch")
    assert json.loads((run_dir / "summary.json").read_text()) == {"status": "completed"}
    (run_dir / "summary.json").write_text(json.dumps({"status": "interrupted"}))
    assert_one_line_error(run_train("--run-dir", str(run_dir)), "--run-dir", "--resume")


@pytest.mark.parametrize(
    "make_args, words",
    [
        (lambda tmp: ["--batch", "100000"], ["--batch", "larger than the training split"]),
        (lambda tmp: ["--batch-schedule", "32@0,5000@1", "--epochs", "2"], ["--batch", "5000"]),
        # An empty version folder, as an interrupted `tfds build` leaves it: TFDS also warns about it through absl.
        (lambda tmp: ["--dataset", "cifar10", "--data-dir", f"{tmp}/tfds"], ["--dataset", "cifar10", "prepared"]),
        (lambda tmp: ["--dataset", "no_such_dataset_xyz"], ["--dataset", "no_such_dataset_xyz"]),
        (lambda tmp: ["--dataset", f"npz:{tmp}/missing.npz"], ["missing.npz"]),
        (lambda tmp: ["--dataset", f"npz:{tmp}/bad_keys.npz"], ["bad_keys.npz", "x_test"]),
        (lambda tmp: ["--dataset", f"npz:{tmp}/bad_labels.npz"], ["bad_labels.npz"]),
        (lambda tmp: ["--dataset", f"folder:{tmp}/corrupt"], ["broken.png"]),
        (lambda tmp: ["--dataset", f"folder:{tmp}/empty_class"], ["b"]),
        (lambda tmp: ["--dataset", f"npz:{tmp}/truncated.npz"], ["truncated.npz", "truncated"]),
        (lambda tmp: ["--dataset", f"folder:{tmp}/one_class"], ["one_class", "1 class (a)", "at least 2"]),
        (lambda tmp: ["--dataset", f"npz:{tmp}/one_label.npz"], ["one_label.npz", "only one class (0)"]),
    ],
)
@pytest.mark.slow
def test_bad_data(tmp_path, make_args, words):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "bad_keys.npz", x_train=np.zeros((10, 4, 4)), y_train=np.zeros(10))
    np.savez(tmp_path / "bad_labels.npz", x_train=np.zeros((10, 4, 4)), y_train=np.zeros(9, int),
             x_test=np.zeros((5, 4, 4)), y_test=np.zeros(5, int))
    np.savez(tmp_path / "one_label.npz", x_train=rng.random((40, 4, 4)), y_train=np.zeros(40, int),
             x_test=rng.random((10, 4, 4)), y_test=np.arange(10) % 2)
    np.savez(tmp_path / "whole.npz", x_train=rng.random((40, 4, 4)), y_train=np.arange(40) % 2,
             x_test=rng.random((10, 4, 4)), y_test=np.arange(10) % 2)
    whole = (tmp_path / "whole.npz").read_bytes()
    (tmp_path / "truncated.npz").write_bytes(whole[: len(whole) // 2])  # as an interrupted copy leaves it
    import tensorflow as tf

    for folder, classes in (("corrupt", ("a", "b")), ("empty_class", ("a", "b")), ("one_class", ("a",))):
        for name in classes:
            os.makedirs(tmp_path / folder / name)
            if folder == "empty_class" and name == "b":
                continue
            for i in range(6):
                image = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
                (tmp_path / folder / name / f"{i}.png").write_bytes(tf.io.encode_png(image).numpy())
    (tmp_path / "corrupt" / "a" / "broken.png").write_bytes(b"this is not a png")
    os.makedirs(tmp_path / "tfds" / "cifar10" / "3.0.2")
    result = run_train(*make_args(tmp_path), "--run-dir", str(tmp_path / "runs" / "run"), "--epochs", "1")
    assert_one_line_error(result, *words)
    assert not os.path.exists(tmp_path / "runs")  # a rejected command creates nothing


@pytest.mark.slow
def test_help_comes_from_the_config_fields():
    from pipeline import config as config_lib
    from pipeline import flags

    result = run_train("--help")
    assert result.returncode == 0, result.stderr[-2000:]
    text = " ".join(result.stdout.split())  # argparse wraps the help text
    for field in config_lib.dataclasses.fields(config_lib.Config):  # every field, so a "%" in any help is caught
        assert "--" + field.name.replace("_", "-") in text, field.name
        help_text = " ".join(field.metadata.get("help", "").split())
        assert help_text and f"{help_text} (default: {getattr(config_lib.Config(), field.name)!r})" in text, field.name
    assert "95% interval" in text  # a literal percent sign is shown as written, not %-formatted
    parser = flags.Parser()
    flags.add_config_flags(parser, preset=config_lib.batch_study())  # the sweep shows its preset's defaults
    assert "(default: 0.05)" in " ".join(parser.format_help().split())


def test_intra_op_threads_takes_auto_as_its_config_does():
    from pipeline import flags

    assert flags.parse(["--intra-op-threads", "auto"], "")[0].intra_op_threads == -1  # Config's automatic
    assert flags.parse(["--intra-op-threads", "3"], "")[0].intra_op_threads == 3
    assert flags.parse([], "")[0].intra_op_threads == -1
