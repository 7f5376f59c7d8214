"""SavedModel export in TF Serving's layout <base>/<model_name>/<version>/, written atomically."""

from __future__ import annotations

import os
import shutil

SIGNATURE = "serving_default"
INPUT_NAME = "images"


def next_version(model_dir: str) -> int:
    """One more than the largest numeric version folder (TF Serving serves the largest), or 1."""
    if not os.path.isdir(model_dir):
        return 1
    versions = [int(name) for name in os.listdir(model_dir) if name.isdigit()]
    return max(versions, default=0) + 1


def export_model(model, base_dir: str, model_name: str, version: int | None = None) -> str:
    """Exports `model` for TF Serving and returns the version folder.

    The signature `serving_default` takes `images`, raw pixels of shape (None, H, W, C) float32 (the model
    normalizes inside), and returns `probabilities` (None, classes) and `classes` (None,) int64 class ids.
    The SavedModel is written to a hidden temporary folder next to its final place and renamed into
    place: TF Serving only loads numeric folders, so an interrupted export never becomes visible.

    Args:
      model: a Keras model mapping raw images to class probabilities.
      base_dir: the export root, e.g. <run_dir>/export.
      model_name: the model's folder name under base_dir (TF Serving's --model_name).
      version: the version number; by default one more than the latest.
    Returns:
      The path <base_dir>/<model_name>/<version>.
    """
    import keras
    import tensorflow as tf

    model_dir = os.path.join(base_dir, model_name)
    os.makedirs(model_dir, exist_ok=True)
    version = next_version(model_dir) if version is None else version
    final = os.path.join(model_dir, str(version))
    if os.path.exists(final):
        raise FileExistsError(f"export version {final} exists; TF Serving versions are immutable")
    tmp = os.path.join(model_dir, f".tmp-{version}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)

    input_shape = (None,) + tuple(model.input_shape[1:])

    @tf.function(input_signature=[tf.TensorSpec(input_shape, tf.float32, name=INPUT_NAME)])
    def serve(images):
        probabilities = model(images, training=False)
        return {"probabilities": probabilities, "classes": tf.argmax(probabilities, axis=-1)}

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(SIGNATURE, serve)
    archive.write_out(tmp, verbose=False)
    os.replace(tmp, final)
    return final
