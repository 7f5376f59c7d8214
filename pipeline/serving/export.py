"""SavedModel export in TF Serving's layout <base>/<model_name>/<version>/, written atomically, ready to serve.

Every export gets, besides the SavedModel:
  <version>/assets.extra/tf_serving_warmup_requests  PredictionLog records at the batch sizes that will be served
  <version>/assets.extra/throughput.json             the inference throughput curve the batching file comes from
  <version>/assets.extra/class_names.txt             one class name per line, in class-id order
  <base>/models.config                               ModelServerConfig text proto listing every model under base
  <base>/batching_parameters.txt                     BatchingParameters text proto from the throughput curve
"""

from __future__ import annotations

import os
import shutil

from pipeline.serving import tf_serving_files
from pipeline.serving.tf_serving_files import BYTES_INPUT_NAME, BYTES_SIGNATURE, INPUT_NAME, SIGNATURE

SERVED_BATCH_SIZES = (1, 8, 32, 128, 512)  # request batches measured at export to choose the batching parameters
TMP_PREFIX = ".tmp-export-"  # + the exporting process id: a hidden folder, which TF Serving never loads


def next_version(model_dir: str) -> int:
    """One more than the largest numeric version folder (TF Serving serves the largest), or 1."""
    if not os.path.isdir(model_dir):
        return 1
    versions = [int(name) for name in os.listdir(model_dir) if name.isdigit()]
    return max(versions, default=0) + 1


def serving_functions(model):
    """The two tf.functions exported as signatures.

    `serving_default` takes `images`, raw pixels float32 (None, H, W, C) in the training data's own scale
    (the model normalizes inside). `serving_bytes` takes `image_bytes`, a string (None,) of encoded PNG, JPEG,
    BMP or GIF images, decoded with tf.io.decode_image to C channels (converting grey <-> RGB); their pixel
    values are used as raw pixels, and an image whose height or width differs from (H, W) fails the request
    with InvalidArgumentError. Both return `probabilities` (None, classes) float32 and `classes` (None,) int64.
    """
    import tensorflow as tf

    height, width, channels = (int(d) for d in model.input_shape[1:])

    def predict(images):
        probabilities = model(images, training=False)
        return {"probabilities": probabilities, "classes": tf.argmax(probabilities, axis=-1)}

    @tf.function(input_signature=[tf.TensorSpec((None, height, width, channels), tf.float32, name=INPUT_NAME)])
    def serve(images):
        return predict(images)

    def decode(contents):
        image = tf.io.decode_image(contents, channels=channels, expand_animations=False)
        fits = tf.reduce_all(tf.equal(tf.shape(image)[:2], [height, width]))

        def refuse():
            # Only this branch runs for an image of another size, so the request fails with this message.
            message = f"{BYTES_INPUT_NAME}: every image must be {height}x{width} pixels (height x width)"
            with tf.control_dependencies([tf.debugging.Assert(False, [message, tf.shape(image)])]):
                return tf.zeros((height, width, channels), image.dtype)

        image = tf.cond(fits, lambda: tf.reshape(image, (height, width, channels)), refuse)
        return tf.cast(image, tf.float32)

    @tf.function(input_signature=[tf.TensorSpec((None,), tf.string, name=BYTES_INPUT_NAME)])
    def serve_bytes(image_bytes):
        images = tf.map_fn(decode, image_bytes, fn_output_signature=tf.TensorSpec((height, width, channels), tf.float32))
        return predict(images)

    return serve, serve_bytes


def export_model(model, base_dir: str, model_name: str, version: int | None = None, *, examples=None,
                 class_names=None, batch_sizes=SERVED_BATCH_SIZES) -> str:
    """Exports `model` for TF Serving and returns the version folder.

    The SavedModel (signatures: see serving_functions) is written to a hidden temporary folder next to its final
    place, completed there (warmup requests, throughput curve) and renamed into place: TF Serving only loads
    numeric folders, so an interrupted export never becomes visible. A version that exists is never replaced:
    without `version`, a version taken meanwhile by another export moves this one to the next free number.

    With `examples`, the exported signature's throughput is measured at each of `batch_sizes` (see
    pipeline.serving.throughput), the batching parameters are chosen from it (pipeline.serving.batching), and warmup requests
    of those examples are written at the allowed batch sizes of both signatures (pipeline.serving.tf_serving_files).

    Args:
      model: a Keras model mapping raw images to class probabilities.
      base_dir: the export root, e.g. <run_dir>/export.
      model_name: the model's folder name under base_dir (TF Serving's model name).
      version: the version number; by default one more than the latest.
      examples: representative raw input images (N, H, W, C), e.g. training images; None skips warmup,
        measuring and the batching parameters file.
      class_names: names of the classes in class-id order, written to assets.extra/class_names.txt.
      batch_sizes: request batch sizes to measure.
    Returns:
      The path <base_dir>/<model_name>/<version>.
    Raises:
      FileExistsError: the requested `version` exists.
    """
    import keras

    model_dir = os.path.join(base_dir, model_name)
    os.makedirs(model_dir, exist_ok=True)
    if version is not None and os.path.exists(os.path.join(model_dir, str(version))):
        raise FileExistsError(f"export version {os.path.join(model_dir, str(version))} exists; TF Serving versions "
                              "are immutable")
    _remove_abandoned(model_dir)
    tmp = os.path.join(model_dir, f"{TMP_PREFIX}{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)

    serve, serve_bytes = serving_functions(model)
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(SIGNATURE, serve)
    archive.add_endpoint(BYTES_SIGNATURE, serve_bytes)
    archive.write_out(tmp, verbose=False)
    extra = os.path.join(tmp, "assets.extra")
    os.makedirs(extra, exist_ok=True)
    if class_names is not None:
        with open(os.path.join(extra, "class_names.txt"), "w", encoding="utf-8") as f:
            f.writelines(f"{name}\n" for name in class_names)
    parameters = None
    if examples is not None:
        parameters = tf_serving_files.prepare_version(tmp, model_name, examples, batch_sizes)
    final = _publish(tmp, model_dir, version)
    tf_serving_files.write_models_config(base_dir)
    if parameters is not None:
        tf_serving_files.write_batching_parameters(base_dir, parameters)
    return final


def _remove_abandoned(model_dir: str) -> None:
    """Removes the temporary folders of interrupted exports whose process has ended (a live one may still finish)."""
    for name in os.listdir(model_dir):
        pid = name[len(TMP_PREFIX):]
        if not (name.startswith(TMP_PREFIX) and pid.isdigit()) or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(os.path.join(model_dir, name), ignore_errors=True)
        except OSError:  # the process exists (another user's): leave its folder
            pass


def _publish(tmp: str, model_dir: str, version: int | None) -> str:
    """Renames tmp to the version folder; os.rename fails rather than replace a version folder with content."""
    while True:
        number = next_version(model_dir) if version is None else version
        final = os.path.join(model_dir, str(number))
        try:
            os.rename(tmp, final)
            return final
        except OSError:
            if version is not None or not os.path.isdir(final):
                raise  # Not a version taken meanwhile: a real error (permissions, disk).
