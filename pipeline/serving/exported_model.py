"""Finds and loads an exported SavedModel (the reader of pipeline.serving.export's layout) and checks its signatures.

A SavedModel is a program: loading one runs its graph. Only the path the user names is loaded (a version
folder, a model folder with numeric versions, or a run directory holding an export), never a path guessed
elsewhere.
"""

from __future__ import annotations

import dataclasses
import os

from pipeline import rundir
from pipeline.config import InputError
from pipeline.serving import tf_serving_files

ACCEPTED = "a SavedModel folder (with saved_model.pb), a model folder of numeric versions, or a run directory"


@dataclasses.dataclass
class ServedModel:
    """A loaded export: its signatures, the image shape they take, and where it came from."""

    path: str  # the version folder
    model_name: str  # the folder above the version: TF Serving's model name
    version: int | None
    signatures: dict  # name -> concrete function
    image_shape: tuple[int, int, int]  # (H, W, C) of serving_default's `images`
    class_names: list[str] | None
    run_dir: str | None  # the run that exported it, when the layout shows one (for its config and summary)


def _is_saved_model(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "saved_model.pb")) or os.path.isfile(os.path.join(path, "saved_model.pbtxt"))


def _latest_version(model_dir: str) -> str | None:
    versions = [int(v) for v in os.listdir(model_dir) if v.isdigit() and _is_saved_model(os.path.join(model_dir, v))]
    return os.path.join(model_dir, str(max(versions))) if versions else None


def _run_of(version_dir: str) -> str | None:
    """The run directory of <run>/export/<model>/<version>, if that is where the version is."""
    run_dir = os.path.dirname(os.path.dirname(os.path.dirname(version_dir)))
    return run_dir if rundir.read_summary(run_dir) is not None else None


def resolve(path: str, flag: str = "PATH") -> tuple[str, str | None]:
    """The version folder that `path` names, and the run directory it belongs to (or None).

    Raises:
      InputError: path is none of ACCEPTED.
    """
    if not os.path.isdir(path):
        raise InputError(f"{flag}: {path} is not a folder; pass {ACCEPTED}")
    path = os.path.abspath(path)
    if _is_saved_model(path):
        return path, _run_of(path)
    latest = _latest_version(path)
    if latest:
        return latest, _run_of(latest)
    if rundir.read_summary(path) is not None:
        exports = os.path.join(path, "export")
        models = sorted(m for m in os.listdir(exports) if not m.startswith(".")) if os.path.isdir(exports) else []
        versions = [v for v in (_latest_version(os.path.join(exports, m)) for m in models
                                if os.path.isdir(os.path.join(exports, m))) if v]
        if len(versions) == 1:
            return versions[0], path
        found = "no export (trained with --no-export?)" if not versions else f"exports of {len(versions)} models"
        raise InputError(f"{flag}: the run {path} has {found}; pass {ACCEPTED}")
    raise InputError(f"{flag}: {path} is not a SavedModel; pass {ACCEPTED}")


def load(path: str, flag: str = "PATH") -> ServedModel:
    """Loads the SavedModel that `path` names and checks that it has this project's two signatures.

    Raises:
      InputError: not a SavedModel, unreadable, or a signature with other inputs than pipeline.serving.export writes.
    """
    import tensorflow as tf

    version_dir, run_dir = resolve(path, flag)
    try:
        loaded = tf.saved_model.load(version_dir)
    except (OSError, ValueError, tf.errors.OpError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"{flag}: cannot load the SavedModel {version_dir} ({first})") from None
    signatures = dict(loaded.signatures)
    expected = {tf_serving_files.SIGNATURE: (tf_serving_files.INPUT_NAME, tf.float32, 4), tf_serving_files.BYTES_SIGNATURE: (tf_serving_files.BYTES_INPUT_NAME, tf.string, 1)}
    for name, (input_name, dtype, rank) in expected.items():
        if name not in signatures:
            raise InputError(f"{flag}: {version_dir} has no signature {name!r} (it has {', '.join(sorted(signatures)) or 'none'}); "
                             "export it with pipeline.train")
        _, inputs = signatures[name].structured_input_signature
        specs = {key: spec for key, spec in inputs.items()}
        spec = specs.get(input_name)
        if set(specs) != {input_name} or spec.dtype != dtype or spec.shape.rank != rank:
            got = ", ".join(f"{k} {v.dtype.name} {v.shape}" for k, v in specs.items())
            raise InputError(f"{flag}: signature {name!r} of {version_dir} takes {got}; expected one input "
                             f"{input_name!r} of {dtype.name} with rank {rank}")
        outputs = set(signatures[name].structured_outputs)
        if not set(tf_serving_files.OUTPUT_NAMES) <= outputs:
            raise InputError(f"{flag}: signature {name!r} of {version_dir} returns {', '.join(sorted(outputs))}; "
                             f"expected {', '.join(tf_serving_files.OUTPUT_NAMES)}")
    image_shape = tuple(signatures[tf_serving_files.SIGNATURE].structured_input_signature[1][tf_serving_files.INPUT_NAME].shape[1:])
    if None in image_shape:
        raise InputError(f"{flag}: signature {tf_serving_files.SIGNATURE!r} of {version_dir} takes images of unknown size {image_shape}")
    names_file = os.path.join(version_dir, "assets.extra", "class_names.txt")
    class_names = None
    if os.path.isfile(names_file):
        with open(names_file, encoding="utf-8") as f:
            class_names = [line.rstrip("\n") for line in f]
    base = os.path.basename(version_dir)
    return ServedModel(path=version_dir, model_name=os.path.basename(os.path.dirname(version_dir)),
                       version=int(base) if base.isdigit() else None, signatures=signatures,
                       image_shape=tuple(int(d) for d in image_shape), class_names=class_names, run_dir=run_dir)
