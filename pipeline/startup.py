"""Quiet start-up: TensorFlow imported without its C++ start-up lines, and Python warnings that say nothing.

TensorFlow 2.21 logs its start-up lines (oneDNN, "Could not find cuda drivers", twice) through absl before
absl::InitializeLog() is called, and such messages reach stderr whatever TF_CPP_MIN_LOG_LEVEL says (absl
applies its thresholds only after initialization; abseil-cpp pull request 1957 is open). No setting of TF or
absl turns them off, so stderr's file descriptor is pointed at a temporary file while TensorFlow loads and
finds its devices; afterwards the captured lines are written back except those below the TF_CPP_MIN_LOG_LEVEL
in effect (2 unless the user set it, so that errors stay visible), absl's notice about logging before
initialization, and cuInit's error on a machine that TF already found has no CUDA driver.

Set BATCHSCOPE_TF_LOGS=1 to see everything TensorFlow prints, or TF_CPP_MIN_LOG_LEVEL=0 to see its
start-up INFO lines.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile

ENV = "BATCHSCOPE_TF_LOGS"
DEFAULT_LEVEL = "2"  # TF_CPP_MIN_LOG_LEVEL: 0 all, 1 hides INFO, 2 also WARNING, 3 also ERROR
_SEVERITY = re.compile(r"^([IWEF])\d{4} ")  # absl's prefix: I0000 00:00:1796002490.09 8452 port.cc:153] ...
_NO_DRIVER = "Could not find cuda drivers"
_NOISE = ("All log messages before absl::InitializeLog() is called",)


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
    if "tensorflow" in sys.modules or os.environ.get(ENV) == "1":
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
    # TFDS warns through absl's Python logger when it looks for a dataset that is not prepared, just before
    # raising the error that pipeline.sources turns into a one-line message.
    logging.getLogger("absl").addFilter(lambda record: "has no dataset_info.json" not in record.getMessage())
