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


# (arguments, words the error line names) of flags that are refused.
BAD_FLAGS = [
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
]


@pytest.mark.parametrize("index", range(len(BAD_FLAGS)), ids=[" ".join(args) for args, _ in BAD_FLAGS])
@pytest.mark.slow
def test_bad_flags(index, refusals):
    args, words = BAD_FLAGS[index]
    assert_one_line_error(refusals["flags", index], *words)


# (arguments given the folder of the files below, words the error line names) of a config file or run directory that
# is refused.
BAD_FILES = [
    (lambda tmp: ["--config", f"{tmp}/config_big.json"], ["batch", "int"]),
    (lambda tmp: ["--config", f"{tmp}/config_typo.json"], ["btach"]),
    (lambda tmp: ["--config", f"{tmp}/config_broken.json"], ["--config", "JSON"]),
    (lambda tmp: ["--run-dir", f"{tmp}/file/run"], ["--run-dir"]),  # a file where a folder should be
    (lambda tmp: ["--run-dir", f"{tmp}/completed"], ["--run-dir", "--overwrite"]),
    # --overwrite replaces the run only once the new command is accepted.
    (lambda tmp: ["--run-dir", f"{tmp}/completed", "--overwrite", "--batch", "100000"], ["--batch"]),
    (lambda tmp: ["--run-dir", f"{tmp}/interrupted"], ["--run-dir", "--resume"]),
]


@pytest.mark.parametrize("index", range(len(BAD_FILES)), ids=[" ".join(words) for _, words in BAD_FILES])
@pytest.mark.slow
def test_bad_config_file_or_run_dir(index, refusals):
    assert_one_line_error(refusals["files", index], *BAD_FILES[index][1])
    assert json.loads((refusals["folder"] / "completed" / "summary.json").read_text()) == {"status": "completed"}
    assert not os.path.exists(refusals["folder"] / "file" / "run")


# (arguments given the folder of the data files below, words the error line names) of data that is refused.
BAD_DATA = [
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
]


def _write_bad_data(tmp) -> None:
    """The files BAD_FILES and BAD_DATA refer to, in the folder tmp."""
    (tmp / "config_big.json").write_text(json.dumps({"batch": "big"}))
    (tmp / "config_typo.json").write_text(json.dumps({"btach": 32}))
    (tmp / "config_broken.json").write_text("{not json")
    (tmp / "file").write_text("a file where a folder should be")
    for status in ("completed", "interrupted"):
        (tmp / status).mkdir()
        (tmp / status / "summary.json").write_text(json.dumps({"status": status}))
    rng = np.random.default_rng(0)
    np.savez(tmp / "bad_keys.npz", x_train=np.zeros((10, 4, 4)), y_train=np.zeros(10))
    np.savez(tmp / "bad_labels.npz", x_train=np.zeros((10, 4, 4)), y_train=np.zeros(9, int),
             x_test=np.zeros((5, 4, 4)), y_test=np.zeros(5, int))
    np.savez(tmp / "one_label.npz", x_train=rng.random((40, 4, 4)), y_train=np.zeros(40, int),
             x_test=rng.random((10, 4, 4)), y_test=np.arange(10) % 2)
    np.savez(tmp / "whole.npz", x_train=rng.random((40, 4, 4)), y_train=np.arange(40) % 2,
             x_test=rng.random((10, 4, 4)), y_test=np.arange(10) % 2)
    whole = (tmp / "whole.npz").read_bytes()
    (tmp / "truncated.npz").write_bytes(whole[: len(whole) // 2])  # as an interrupted copy leaves it
    import tensorflow as tf

    for folder, classes in (("corrupt", ("a", "b")), ("empty_class", ("a", "b")), ("one_class", ("a",))):
        for name in classes:
            os.makedirs(tmp / folder / name)
            if folder == "empty_class" and name == "b":
                continue
            for i in range(6):
                image = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
                (tmp / folder / name / f"{i}.png").write_bytes(tf.io.encode_png(image).numpy())
    (tmp / "corrupt" / "a" / "broken.png").write_bytes(b"this is not a png")
    os.makedirs(tmp / "tfds" / "cifar10" / "3.0.2")


@pytest.fixture(scope="module")
def refusals(tmp_path_factory):
    """{("flags" | "files" | "data", index): the result of that case}: every case of BAD_FLAGS, BAD_FILES and
    BAD_DATA run by `python -m pipeline.train` code in one process of its own (tests/train_cases.py), each case's
    stdout and stderr captured apart at their file descriptors, so that a line from TensorFlow's C++ code would show
    too."""
    tmp = tmp_path_factory.mktemp("refusals")
    _write_bad_data(tmp)
    keys = [("flags", i) for i in range(len(BAD_FLAGS))] + [("files", i) for i in range(len(BAD_FILES))] + [
        ("data", i) for i in range(len(BAD_DATA))]
    cases = [args for args, _ in BAD_FLAGS] + [make_args(tmp) for make_args, _ in BAD_FILES] + [
        [*make_args(tmp), "--run-dir", str(tmp / f"runs{i}" / "run"), "--epochs", "1"]
        for i, (make_args, _) in enumerate(BAD_DATA)]
    (tmp / "cases.json").write_text(json.dumps(cases))
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "BATCHSCOPE_TF_LOGS")}
    env["PYTHONPATH"] = REPO
    done = subprocess.run([sys.executable, os.path.join(REPO, "tests", "train_cases.py"),
                           str(tmp / "cases.json"), str(tmp / "results.json")], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=900)
    assert done.returncode == 0 and done.stderr == "", done.stderr[-3000:]
    results = json.loads((tmp / "results.json").read_text())
    return {key: subprocess.CompletedProcess([], r["code"], r["stdout"], r["stderr"])
            for key, r in zip(keys, results)} | {"folder": tmp}


@pytest.mark.parametrize("index", range(len(BAD_DATA)), ids=[" ".join(words) for _, words in BAD_DATA])
@pytest.mark.slow
def test_bad_data(index, refusals):
    assert_one_line_error(refusals["data", index], *BAD_DATA[index][1])
    assert not os.path.exists(refusals["folder"] / f"runs{index}")  # a rejected command creates nothing


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


def test_forward_only_passes_batch_at_least_256_examples():
    """Evaluation, target checks, precise BN and the loss line run in batches of the training batch or 256: at batch
    8, precise BN's one call per BN level and batch would otherwise make 32x the calls."""
    from pipeline import config as config_lib

    assert config_lib.Config(batch=8).inference_batch == 256
    assert config_lib.Config(batch=512).inference_batch == 512
    assert config_lib.Config(batch=config_lib.ADAPTIVE, base_batch=1024).inference_batch == 1024
