"""Checked input and output of the instruments: positive-integer arguments, JSON without NaN, atomic files."""

from __future__ import annotations

import json
import math
import numbers
import os


def check_positive_int(name: str, value) -> int:
    """Returns `value` as an int, or raises ValueError naming the argument when it is not an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name}: must be a positive integer, got {value!r}")
    return int(value)


def finite_or_none(value):
    """`value` with NaN and infinities replaced by None, in nested dicts, lists and NumPy arrays (as lists), so that
    JSON stays standard."""
    if hasattr(value, "tolist"):  # a NumPy array or scalar
        value = value.tolist()
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_atomic(path: str, data: bytes | str) -> None:
    """Writes a temporary file next to `path` and renames it into place, so readers never see half a file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
    os.replace(tmp, path)


def write_json_atomic(path: str, value, **dump_options) -> None:
    """Writes `value` as JSON (keys sorted, indented by 2 unless told otherwise) with write_atomic."""
    options = {"indent": 2, "sort_keys": True, "default": str} | dump_options
    write_atomic(path, json.dumps(value, **options) + "\n")
