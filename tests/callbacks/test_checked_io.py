"""The instruments' shared helpers: argument checks, JSON without NaN, atomic files, and flag names at the CLI."""

import json
import math
import os

import numpy as np
import pytest

from callbacks.checked_io import check_positive_int, finite_or_none, write_atomic, write_json_atomic
from pipeline import config as config_lib


def test_check_positive_int():
    assert check_positive_int("n", 3) == 3 and check_positive_int("n", np.int64(7)) == 7
    for bad in (0, -1, 2.0, True, "3", None):
        with pytest.raises(ValueError, match=f"^n: must be a positive integer, got {bad!r}$"):
            check_positive_int("n", bad)


def test_finite_or_none_makes_standard_json():
    value = {"a": math.nan, "b": [1.0, math.inf, {"c": -math.inf}], "d": np.array([0.5, np.nan]), "e": 2,
             "f": np.float32(np.nan)}
    cleaned = finite_or_none(value)
    assert cleaned == {"a": None, "b": [1.0, None, {"c": None}], "d": [0.5, None], "e": 2, "f": None}
    json.loads(json.dumps(cleaned, allow_nan=False))  # standard JSON: no NaN or Infinity tokens


def test_atomic_writes_leave_only_the_file(tmp_path):
    path = str(tmp_path / "out.json")
    write_json_atomic(path, {"b": 1, "a": [1, 2]})
    write_atomic(str(tmp_path / "raw.bin"), b"\x00\x01")
    assert json.load(open(path)) == {"a": [1, 2], "b": 1}
    assert open(tmp_path / "raw.bin", "rb").read() == b"\x00\x01"
    assert sorted(os.listdir(tmp_path)) == ["out.json", "raw.bin"]


def test_the_cli_names_the_flag_of_a_library_argument():
    from callbacks import BatchNormStatistics

    with pytest.raises(config_lib.InputError,
                       match="^--bn-stats-every: every_n_steps: must be a positive integer, got -5$"):
        with config_lib.as_flag_error("bn_stats_every"):
            BatchNormStatistics(None, every_n_steps=-5)
    with pytest.raises(config_lib.InputError, match="^--batch: stays as it is$"):
        with config_lib.as_flag_error("lr"):
            raise config_lib.InputError("--batch: stays as it is")  # already about a flag: passed on unchanged
