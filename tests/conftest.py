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
