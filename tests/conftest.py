"""Shared test fixtures: quiet TensorFlow, a fixed seed, the tiny smoke preset, free ports on 127.0.0.1."""

import os
import socket

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest


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
    from pipeline import evaluate

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
