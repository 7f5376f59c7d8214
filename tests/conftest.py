"""Shared test fixtures: quiet TensorFlow, a fixed seed, the tiny smoke preset, free ports on 127.0.0.1."""

import os
import socket

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest


def pytest_configure(config):
    """Threads per op as pipeline.train's default sets them in a process of its own: the runs of this process then
    round like the runs that tests start as subprocesses (the thread count changes the order of sums)."""
    from pipeline import config as config_lib
    from pipeline import startup
    from pipeline.training import execution

    startup.import_tensorflow()  # without its C++ start-up lines
    execution.set_threads(config_lib.Config())


@pytest.fixture(autouse=True)
def seed():
    """Every test starts from the same Python, NumPy and TensorFlow random state."""
    import keras

    keras.utils.set_random_seed(0)
    return 0


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """One smoke training run (instruments off) and its export, shared by the evaluate and predict tests."""
    import dataclasses

    from pipeline import config as config_lib
    from pipeline import train

    config = dataclasses.replace(config_lib.smoke(), run_dir=str(tmp_path_factory.mktemp("trained") / "run"),
                                 grad_stats_every=0, bn_stats_every=0, dynamics=False)
    summary = train.train(config)
    if summary.status != "completed":
        raise RuntimeError(f"the shared smoke run did not complete: {summary.reason}")
    return config, summary


@pytest.fixture(scope="session")
def trained_evaluation(trained_run):
    """pipeline.evaluate of the shared run's export on its test split, with throughput at request batches 1, 8, 32."""
    from pipeline.serving import evaluation as evaluate

    config, _ = trained_run
    return evaluate.evaluate(config.run_dir, benchmark_batches=(1, 8, 32))


@pytest.fixture
def cli_error(capsys):
    """Runs an entry point's main(argv) in-process; checks exit code 2 and one stderr line, and returns that line."""

    def run(main, argv):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse exits for a bad flag
            code = e.code
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert code == 2, (code, lines)
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
        return lines[0]

    return run


@pytest.fixture(scope="session")
def write_image_folder():
    """A function writing `per_class` random uint8 PNG images of `shape` into each of 3 class folders under root;
    it returns "folder:root"."""
    import numpy as np
    import tensorflow as tf

    def write(root, per_class: int, shape: tuple[int, int, int], seed: int) -> str:
        rng = np.random.default_rng(seed)
        for label in range(3):
            os.makedirs(root / f"class{label}")
            for i in range(per_class):
                image = rng.integers(0, 256, shape, dtype=np.uint8)
                tf.io.write_file(str(root / f"class{label}" / f"{i}.png"), tf.io.encode_png(image))
        return f"folder:{root}"

    return write


@pytest.fixture
def free_ports():
    """A function giving `count` distinct TCP ports on 127.0.0.1 that were free a moment ago."""

    def ports(count: int) -> list[int]:
        sockets = [socket.socket() for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        found = [s.getsockname()[1] for s in sockets]
        for s in sockets:
            s.close()
        return found

    return ports


@pytest.fixture
def final_weights():
    """A function: {name: array} of every variable (model and optimizer) in a run directory's last checkpoint."""
    import h5py

    from pipeline.training import checkpoint

    def read(run_dir):
        arrays = {}
        with h5py.File(checkpoint.latest_weights(os.path.join(run_dir, "checkpoints")), "r") as f:
            f.visititems(lambda name, item: arrays.__setitem__(name, item[()]) if isinstance(item, h5py.Dataset)
                         else None)
        return arrays

    return read


@pytest.fixture
def interrupt_after_first_epoch(monkeypatch):
    """A context manager: inside it checkpoint.save raises KeyboardInterrupt right after committing epoch 1, as a run
    interrupted there leaves its run directory."""
    import contextlib

    from pipeline.training import checkpoint

    @contextlib.contextmanager
    def interrupting():
        save = checkpoint.save

        def save_then_interrupt(model, directory, epoch, step, instruments=None):
            state = save(model, directory, epoch, step, instruments)
            if epoch == 1:
                raise KeyboardInterrupt
            return state

        monkeypatch.setattr(checkpoint, "save", save_then_interrupt)
        try:
            yield
        finally:
            monkeypatch.setattr(checkpoint, "save", save)

    return interrupting
