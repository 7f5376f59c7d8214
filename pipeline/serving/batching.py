"""TF Serving's batching parameters file (--batching_parameters_file): chosen from a throughput curve, validated.

The BatchingParameters message is defined in tensorflow_serving/servables/tensorflow/session_bundle_config.proto,
which the tensorflow-serving-api pip package does not ship. Its schema is declared here field by field (same
names, numbers and types), so that protobuf's own text_format writes and parses the file.
"""

from __future__ import annotations

import os

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format, wrappers_pb2

from pipeline.serving import throughput

_INT64_FIELDS = ("max_batch_size", "batch_timeout_micros", "max_enqueued_batches", "num_batch_threads")


def _message_class():
    field = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(
        name="batchscope/session_bundle_config.proto", package="tensorflow.serving", syntax="proto3",
        dependency=["google/protobuf/wrappers.proto"])
    message = proto.message_type.add(name="BatchingParameters")
    for number, name in enumerate(_INT64_FIELDS, start=1):
        message.field.add(name=name, number=number, type=field.TYPE_MESSAGE, label=field.LABEL_OPTIONAL,
                          type_name=".google.protobuf.Int64Value")
    message.field.add(name="thread_pool_name", number=5, type=field.TYPE_MESSAGE, label=field.LABEL_OPTIONAL,
                      type_name=".google.protobuf.StringValue")
    message.field.add(name="allowed_batch_sizes", number=6, type=field.TYPE_INT64, label=field.LABEL_REPEATED)
    message.field.add(name="pad_variable_length_inputs", number=7, type=field.TYPE_BOOL, label=field.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(wrappers_pb2.DESCRIPTOR.serialized_pb)
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.serving.BatchingParameters"))


BatchingParameters = _message_class()


def from_throughput(rows: list[dict], num_batch_threads: int | None = None) -> dict:
    """Batching parameters for a CPU server from the measured throughput curve (pipeline.serving.throughput.measure).

    - max_batch_size: the batch at which throughput stops growing (throughput.saturation): larger batches
      add latency without adding throughput on this machine.
    - allowed_batch_sizes: the measured batch sizes up to it; the server pads a batch to the next one, and
      the warmup requests cover exactly these sizes.
    - batch_timeout_micros: the median latency of a full batch: waiting for more requests at most as long as
      computing a full batch takes keeps the added latency within a factor of two.
    - num_batch_threads: the CPU cores (TF Serving's batching guide for CPU-only servers).
    - max_enqueued_batches: num_batch_threads (the guide's choice for online serving with bounded latency).
    """
    k = throughput.saturation(rows)
    threads = num_batch_threads or os.cpu_count() or 1
    return {
        "max_batch_size": rows[k]["batch"],
        "batch_timeout_micros": max(1, round(rows[k]["latency_p50_ms"] * 1e3)),
        "max_enqueued_batches": threads,
        "num_batch_threads": threads,
        "allowed_batch_sizes": [row["batch"] for row in rows[: k + 1]],
        "pad_variable_length_inputs": False,
    }


def to_text(parameters: dict) -> str:
    """The BatchingParameters text proto of a dict with the message's fields."""
    message = BatchingParameters()
    for name, value in parameters.items():
        if name in _INT64_FIELDS:
            getattr(message, name).value = int(value)
        elif name == "thread_pool_name":
            message.thread_pool_name.value = value
        elif name == "allowed_batch_sizes":
            message.allowed_batch_sizes.extend(int(v) for v in value)
        else:
            setattr(message, name, value)
    return text_format.MessageToString(message)


def validate(text: str) -> dict:
    """Parses a batching parameters file and checks it by the documented rules.

    Rules (session_bundle_config.proto and the batching guide): the text parses as BatchingParameters;
    max_batch_size is set and >= 1; num_batch_threads and max_enqueued_batches, when set, are >= 1;
    batch_timeout_micros, when set, is >= 0; allowed_batch_sizes, when given, are >= 1, strictly increasing,
    and the last equals max_batch_size.

    Returns:
      The parameters as a dict (set fields only).
    Raises:
      ValueError: naming the first broken rule.
    """
    message = BatchingParameters()
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as e:
        raise ValueError(f"not a BatchingParameters text proto: {e}") from None
    values = {name: getattr(message, name).value for name in _INT64_FIELDS if message.HasField(name)}
    sizes = list(message.allowed_batch_sizes)
    if "max_batch_size" not in values:
        raise ValueError("max_batch_size must be set, e.g. max_batch_size { value: 32 }")
    for name, low in (("max_batch_size", 1), ("num_batch_threads", 1), ("max_enqueued_batches", 1),
                      ("batch_timeout_micros", 0)):
        if name in values and values[name] < low:
            raise ValueError(f"{name} must be >= {low}, got {values[name]}")
    if sizes:
        if min(sizes) < 1:
            raise ValueError(f"allowed_batch_sizes must be >= 1, got {sizes}")
        if any(a >= b for a, b in zip(sizes, sizes[1:])):
            raise ValueError(f"allowed_batch_sizes must be strictly increasing, got {sizes}")
        if sizes[-1] != values["max_batch_size"]:
            raise ValueError(f"the last allowed_batch_sizes entry ({sizes[-1]}) must equal max_batch_size "
                             f"({values['max_batch_size']})")
        values["allowed_batch_sizes"] = sizes
    values["pad_variable_length_inputs"] = message.pad_variable_length_inputs
    return values
