"""Classifies image files with TF Serving or a local SavedModel: `python -m pipeline.predict IMG.png --server HOST:PORT`.

The request is a tensorflow-serving-api PredictRequest to the `serving_bytes` signature carrying the files'
encoded bytes as `image_bytes`; `--server` sends it over gRPC, `--model PATH` answers the same request with the
SavedModel at PATH (only that path is loaded; SavedModels are programs, load trusted ones only). Prints one JSON
line per image: the file, the class id (and name when the export has them) and its probability.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from pipeline import cli, flags, startup
from pipeline.config import InputError

DEFAULT_MODEL_NAME = "resnet20"  # the default run's export folder, TF Serving's --model_name


def _address(text: str) -> str:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"got {text!r}; expected HOST:PORT, e.g. localhost:8500")
    return text


def parser() -> argparse.ArgumentParser:
    p = flags.Parser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="PNG, JPEG, BMP or GIF files of the model's image size")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--server", type=_address, metavar="HOST:PORT", help="TF Serving's gRPC address, e.g. localhost:8500")
    where.add_argument("--model", metavar="PATH", help="answer locally with this SavedModel (version folder, model folder or run)")
    p.add_argument("--model-name", default=DEFAULT_MODEL_NAME, help="the model's name on the server (its export folder name)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the server")
    return p


def read_images(paths: list[str], image_shape=None) -> list[bytes]:
    """The files' bytes, each checked to decode as an image (of image_shape (H, W, C) when given).

    Raises:
      InputError: naming the file, when it is missing, not an image, or of another height or width.
    """
    import tensorflow as tf

    contents = []
    for path in paths:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise InputError(f"IMAGE {path}: cannot read it ({e.strerror})") from None
        try:
            shape = tuple(tf.io.decode_image(data, expand_animations=False).shape)
        except (tf.errors.InvalidArgumentError, ValueError):
            raise InputError(f"IMAGE {path}: not a PNG, JPEG, BMP or GIF image (corrupt or another format)") from None
        if image_shape is not None and shape[:2] != tuple(image_shape[:2]):
            raise InputError(f"IMAGE {path}: is {shape[0]}x{shape[1]} pixels; the model takes "
                             f"{image_shape[0]}x{image_shape[1]} (height x width)")
        contents.append(data)
    return contents


def check_paths(paths: list[str], model: str | None) -> None:
    """Refuses a missing image file or --model path before TensorFlow is imported (which takes seconds).

    Raises:
      InputError: naming the first missing path.
    """
    for path in paths:
        if not os.path.isfile(path):
            raise InputError(f"IMAGE {path}: cannot read it ({'a folder' if os.path.isdir(path) else 'no such file'})")
    if model is not None and not os.path.isdir(model):
        # pipeline.serving.exported_model (which imports TensorFlow) says the same of a path that is no SavedModel.
        raise InputError(f"--model: {model} is not a folder; pass a SavedModel folder, a model folder of numeric "
                         "versions, or a run directory")


def build_request(model_name: str, contents: list[bytes]):
    """The PredictRequest this client sends: the encoded images to the bytes signature."""
    from pipeline.serving import tf_serving_files

    return tf_serving_files.predict_request(model_name, tf_serving_files.BYTES_SIGNATURE, {tf_serving_files.BYTES_INPUT_NAME: contents})


def ask_server(address: str, request, timeout: float) -> dict:
    """Sends the request over gRPC and returns the outputs as numpy arrays.

    Raises:
      InputError: the server is unreachable or refuses the request.
    """
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=timeout)
        except grpc.RpcError as e:
            details = (e.details() or "").splitlines()[0] if e.details() else ""
            if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise InputError(f"--server {address}: cannot reach TF Serving ({e.code().name}: {details})") from None
            raise InputError(f"--server {address}: the server refused the request ({e.code().name}: {details})") from None
    return {name: tf.make_ndarray(proto) for name, proto in response.outputs.items()}


def predict(paths: list[str], *, server: str | None = None, model: str | None = None,
            model_name: str = DEFAULT_MODEL_NAME, timeout: float = 10.0) -> list[dict]:
    """One result per image: {"image", "class", "probability"} (+ "name" when class names are known)."""
    import tensorflow as tf

    from pipeline.serving import exported_model, tf_serving_files

    if model is not None:
        served = exported_model.load(model, flag="--model")
        request = build_request(served.model_name, read_images(paths, served.image_shape))
        try:
            outputs = tf_serving_files.answer(request, served.signatures)
        except tf.errors.InvalidArgumentError as e:
            raise InputError(f"--model {model}: refused the images ({e.message.splitlines()[0]})") from None
        names = served.class_names
    else:
        outputs = ask_server(server, build_request(model_name, read_images(paths)), timeout)
        names = None
    results = []
    for path, label, probabilities in zip(paths, outputs["classes"], outputs["probabilities"]):
        result = {"image": path, "class": int(label), "probability": float(probabilities[label])}
        if names and 0 <= label < len(names):
            result["name"] = names[label]
        results.append(result)
    return results


def main(argv=None) -> int:
    """Parses flags, classifies, prints one JSON line per image; bad input or no server: one line, exit 2."""
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)

    def command() -> int:
        check_paths(args.images, args.model)
        startup.import_tensorflow()  # without its C++ start-up lines (pipeline/startup.py)
        results = predict(args.images, server=args.server, model=args.model, model_name=args.model_name,
                          timeout=args.timeout)
        for result in results:
            print(json.dumps(result))
        return 0

    return cli.run(command)
