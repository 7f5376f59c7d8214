"""TF Serving artifacts of an export: PredictRequests, warmup records, models.config and the batching file.

Formats (tensorflow/serving): the warmup file is assets.extra/tf_serving_warmup_requests, a TFRecord of
PredictionLog protos (prediction_log_pb2), at most 1000 records; models.config is a ModelServerConfig text
proto (model_server_config_pb2) for --model_config_file; the batching file is a BatchingParameters text proto
for --batching_parameters_file (pipeline.serving.batching).
"""

from __future__ import annotations

import json
import os

import numpy as np

from callbacks import checked_io
from pipeline.serving import batching, throughput

# The serving contract: signature, input and output names of every export (pipeline.serving.export writes them).
SIGNATURE = "serving_default"  # raw pixels
INPUT_NAME = "images"
BYTES_SIGNATURE = "serving_bytes"  # encoded PNG/JPEG images
BYTES_INPUT_NAME = "image_bytes"
OUTPUT_NAMES = ("probabilities", "classes")
WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")
MAX_WARMUP_RECORDS = 1000  # TF Serving refuses to load a model whose warmup file has more
MODELS_CONFIG = "models.config"
BATCHING_FILE = "batching_parameters.txt"
SERVING_ROOT = "/models"  # where the README's docker command mounts the export folder


def predict_request(model_name: str, signature: str, inputs: dict):
    """A tensorflow-serving-api PredictRequest carrying `inputs` ({input name: numpy array or list of bytes})."""
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = signature
    for name, value in inputs.items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
    return request


def answer(request, signatures) -> dict:
    """Answers a PredictRequest with a loaded SavedModel's signatures, as the server would: numpy outputs."""
    import tensorflow as tf

    signature = signatures[request.model_spec.signature_name or "serving_default"]
    feeds = {name: tf.constant(tf.make_ndarray(proto)) for name, proto in request.inputs.items()}
    return {name: value.numpy() for name, value in signature(**feeds).items()}


def encode_png(images: np.ndarray) -> list[bytes]:
    """PNG bytes of raw images, their pixel values rounded and clipped to 0..255 (exact for integer pixels)."""
    import tensorflow as tf

    pixels = np.clip(np.rint(images), 0, 255).astype(np.uint8)
    return [tf.io.encode_png(image).numpy() for image in pixels]


def warmup_requests(model_name: str, examples: np.ndarray, batch_sizes) -> list:
    """PredictionLog records: for each batch size, one request of that many examples to each signature."""
    from tensorflow_serving.apis import prediction_log_pb2

    logs = []
    for batch_size in batch_sizes:
        images = np.resize(np.asarray(examples, np.float32), (batch_size,) + tuple(examples.shape[1:]))
        for signature, inputs in ((SIGNATURE, {INPUT_NAME: images}),
                                  (BYTES_SIGNATURE, {BYTES_INPUT_NAME: encode_png(images)})):
            request = predict_request(model_name, signature, inputs)
            logs.append(prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request)))
    if len(logs) > MAX_WARMUP_RECORDS:
        raise ValueError(f"{len(logs)} warmup records; TF Serving accepts at most {MAX_WARMUP_RECORDS}")
    return logs


def write_warmup(version_dir: str, logs: list) -> str:
    import tensorflow as tf

    path = os.path.join(version_dir, WARMUP_FILE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tf.io.TFRecordWriter(path) as writer:
        for log in logs:
            writer.write(log.SerializeToString())
    return path


def read_warmup(version_dir: str) -> list:
    """The warmup file's records parsed back as PredictionLog protos."""
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    dataset = tf.data.TFRecordDataset(os.path.join(version_dir, WARMUP_FILE))
    return [prediction_log_pb2.PredictionLog.FromString(record.numpy()) for record in dataset]


def prepare_version(version_dir: str, model_name: str, examples: np.ndarray, batch_sizes) -> dict:
    """Measures the exported signature's throughput, chooses batching parameters, writes the warmup records.

    Writes assets.extra/throughput.json (the curve and the finding) and the warmup file at the allowed batch
    sizes. Returns the batching parameters (pipeline.serving.batching.from_throughput).
    """
    import tensorflow as tf

    signature = tf.saved_model.load(version_dir).signatures[SIGNATURE]
    rows = throughput.measure(lambda images: signature(**{INPUT_NAME: images}), examples, batch_sizes,
                              min_calls=5, min_seconds=0.3)
    parameters = batching.from_throughput(rows)
    with open(os.path.join(version_dir, "assets.extra", "throughput.json"), "w", encoding="utf-8") as f:
        json.dump({"rows": rows, "finding": throughput.finding(rows), "batching_parameters": parameters}, f, indent=2)
    write_warmup(version_dir, warmup_requests(model_name, examples, parameters["allowed_batch_sizes"]))
    return parameters


def models_config(base_dir: str, serving_root: str = SERVING_ROOT):
    """A ModelServerConfig serving the latest version of every model folder under base_dir.

    base_path is where the folder is seen by the server: serving_root/<model name> (the docker mount).
    """
    from tensorflow_serving.config import model_server_config_pb2

    config = model_server_config_pb2.ModelServerConfig()
    for name in sorted(os.listdir(base_dir)):
        folder = os.path.join(base_dir, name)
        if not name.startswith(".") and os.path.isdir(folder) and any(v.isdigit() for v in os.listdir(folder)):
            model = config.model_config_list.config.add(name=name, base_path=f"{serving_root}/{name}",
                                                        model_platform="tensorflow")
            model.model_version_policy.latest.num_versions = 1
    return config


def write_models_config(base_dir: str, serving_root: str = SERVING_ROOT) -> str:
    from google.protobuf import text_format

    path = os.path.join(base_dir, MODELS_CONFIG)
    checked_io.write_atomic(path, text_format.MessageToString(models_config(base_dir, serving_root)))
    return path


def read_models_config(path: str):
    """Parses a models.config file as ModelServerConfig (raises text_format.ParseError when it is not one)."""
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    with open(path, encoding="utf-8") as f:
        return text_format.Parse(f.read(), model_server_config_pb2.ModelServerConfig())


def write_batching_parameters(base_dir: str, parameters: dict) -> str:
    text = batching.to_text(parameters)
    batching.validate(text)
    path = os.path.join(base_dir, BATCHING_FILE)
    checked_io.write_atomic(path, text)
    return path
