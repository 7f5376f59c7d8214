"""Shared test fixtures: quiet TensorFlow, a fixed seed, and the tiny smoke preset."""

import os

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
