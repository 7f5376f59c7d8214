"""Quiet start-up: TensorFlow imported without its C++ start-up lines, and Python warnings that say nothing.

TensorFlow 2.21 logs its start-up lines (oneDNN, "Could not find cuda drivers", twice) through absl before
absl::InitializeLog() is called, and such messages reach stderr whatever TF_CPP_MIN_LOG_LEVEL says (absl
applies its thresholds only after initialization; abseil-cpp pull request 1957 is open). No setting of TF or
absl turns them off, so stderr's file descriptor is pointed at a temporary file while TensorFlow loads and
finds its devices; afterwards the captured lines are written back except those below the TF_CPP_MIN_LOG_LEVEL
in effect (2 unless the user set it, so that errors stay visible), absl's notice about logging before
initialization, and cuInit's error on a machine that TF already found has no CUDA driver.

Python warnings of the libraries (Keras, TensorFlow, TFDS, keras-tuner, scikit-learn, SciPy, Matplotlib, NumPy,
protobuf, absl) and the warnings of TensorFlow's and absl's Python loggers are not shown either: the commands say
what matters in their own lines. Set BATCHSCOPE_TF_LOGS=1 to see everything TensorFlow and the libraries print,
or TF_CPP_MIN_LOG_LEVEL=0 to see TensorFlow's start-up INFO lines.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
import warnings

ENV = "BATCHSCOPE_TF_LOGS"
DEFAULT_LEVEL = "2"  # TF_CPP_MIN_LOG_LEVEL: 0 all, 1 hides INFO, 2 also WARNING, 3 also ERROR
_SEVERITY = re.compile(r"^([IWEF])\d{4} ")  # absl's prefix: I0000 00:00:1796002490.09 8452 port.cc:153] ...
_NO_DRIVER = "Could not find cuda drivers"
_NOISE = ("All log messages before absl::InitializeLog() is called",)
# Modules whose Python warnings are hidden (a warning is attributed to the module that its stack level names).
LIBRARIES = ("keras", "tensorflow", "tensorflow_datasets", "keras_tuner", "sklearn", "scipy", "matplotlib", "numpy",
             "google", "absl", "tf_keras", "h5py", "jupyter_client", "jupyter_core", "nbclient", "nbformat", "zmq",
             "traitlets", "ipykernel", "IPython")


def _keep(lines: list[str], min_level: int) -> list[str]:
    """The captured lines worth showing; a line without absl's prefix follows the fate of the line before it."""
    no_driver = any(_NO_DRIVER in line for line in lines)
    kept, keep = [], True
    for line in lines:
        match = _SEVERITY.match(line)
        if match:
            keep = "IWEF".index(match.group(1)) >= min_level and not (no_driver and "failed call to cuInit" in line)
        elif any(noise in line for noise in _NOISE):
            keep = False
            continue
        if keep:
            kept.append(line)
    return kept


def import_tensorflow() -> None:
    """Imports TensorFlow (and Keras) with its start-up lines filtered; call it before anything imports TF.

    Entry points call it after parsing flags, so that --help stays fast. Without effect when TensorFlow is
    already imported or BATCHSCOPE_TF_LOGS=1.
    """
    if os.environ.get(ENV) == "1":
        return
    quiet_libraries()
    if "tensorflow" in sys.modules:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", DEFAULT_LEVEL)
    try:
        min_level = int(os.environ["TF_CPP_MIN_LOG_LEVEL"])
    except ValueError:
        min_level = 0
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import keras  # noqa: F401 -- imported here so that its own import-time lines are filtered too
            import tensorflow as tf

            tf.config.list_physical_devices()  # initializes the platforms, which logs cuInit's failure
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().decode("utf-8", "replace").splitlines(keepends=True)
            sys.stderr.write("".join(_keep(lines, min_level)))
            sys.stderr.flush()


def quiet_libraries() -> None:
    """Hides the libraries' Python warnings and their Python loggers' warnings (errors stay visible); entry points
    get it through import_tensorflow, the notebook calls it itself. Without effect when BATCHSCOPE_TF_LOGS=1."""
    if os.environ.get(ENV) == "1":
        return
    warnings.filterwarnings("ignore", module=rf"({'|'.join(LIBRARIES)})(\.|$)")
    # absl's logger carries TFDS's warning about a dataset that is not prepared, just before the error that
    # pipeline.data.sources turns into a one-line message.
    for name in ("tensorflow", "absl", "keras_tuner"):
        logging.getLogger(name).setLevel(logging.ERROR)
