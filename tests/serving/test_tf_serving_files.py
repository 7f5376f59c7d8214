"""TF Serving files checked offline: the batching parameters validator, the choice from a throughput curve, the
finding sentence, and PredictRequests built with tensorflow-serving-api."""

import numpy as np
import pytest

from pipeline.serving import batching, tf_serving_files, throughput


def curve(throughputs, spread=0.05, batches=(1, 8, 32, 128, 512)):
    """Rows as throughput.measure returns them, with per-call quartiles +-spread around the median."""
    return [{"batch": b, "calls": 20, "examples_per_sec": t, "examples_per_sec_q25": t * (1 - spread),
             "examples_per_sec_q75": t * (1 + spread), "latency_p50_ms": 1e3 * b / t, "latency_p99_ms": 2e3 * b / t,
             "latency_mean_ms": 1e3 * b / t} for b, t in zip(batches, throughputs)]


VALID = """
max_batch_size { value: 32 }
batch_timeout_micros { value: 2000 }
max_enqueued_batches { value: 4 }
num_batch_threads { value: 2 }
allowed_batch_sizes: 8
allowed_batch_sizes: 32
pad_variable_length_inputs: false
"""


def test_valid_file_parses():
    assert batching.validate(VALID) == {
        "max_batch_size": 32, "batch_timeout_micros": 2000, "max_enqueued_batches": 4, "num_batch_threads": 2,
        "allowed_batch_sizes": [8, 32], "pad_variable_length_inputs": False}
    assert batching.validate("max_batch_size { value: 1 }")["max_batch_size"] == 1  # the other fields are optional


@pytest.mark.parametrize("text, words", [
    ("", ["max_batch_size must be set"]),
    (VALID.replace("allowed_batch_sizes: 32", "allowed_batch_sizes: 16"), ["last", "must equal max_batch_size"]),
    (VALID.replace("allowed_batch_sizes: 8", "allowed_batch_sizes: 64"), ["strictly increasing"]),
    (VALID.replace("allowed_batch_sizes: 8", "allowed_batch_sizes: 32"), ["strictly increasing"]),
    (VALID.replace("allowed_batch_sizes: 8", "allowed_batch_sizes: 0"), [">= 1"]),
    (VALID.replace("{ value: 32 }", "{ value: 0 }"), ["max_batch_size must be >= 1"]),
    (VALID.replace("num_batch_threads { value: 2 }", "num_batch_threads { value: 0 }"), ["num_batch_threads"]),
    (VALID.replace("{ value: 4 }", "{ value: 0 }"), ["max_enqueued_batches"]),
    (VALID.replace("{ value: 2000 }", "{ value: -1 }"), ["batch_timeout_micros must be >= 0"]),
    (VALID.replace("max_batch_size { value: 32 }", "max_batch_size: 32"), ["not a BatchingParameters"]),
    (VALID + "max_batch_sizes { value: 3 }", ["not a BatchingParameters", "max_batch_sizes"]),
    ("max_batch_size { value: 32 ", ["not a BatchingParameters"]),
])
def test_invalid_files_are_refused(text, words):
    with pytest.raises(ValueError) as error:
        batching.validate(text)
    for word in words:
        assert word in str(error.value)


def test_parameters_from_a_curve_that_levels_off():
    rows = curve([1000, 7000, 20000, 20500, 19000])  # +2.5% from 32 to 128 is inside the +-5% spread
    assert throughput.saturation(rows) == 2
    parameters = batching.from_throughput(rows, num_batch_threads=2)
    assert parameters == {"max_batch_size": 32, "batch_timeout_micros": 1600, "max_enqueued_batches": 2,
                          "num_batch_threads": 2, "allowed_batch_sizes": [1, 8, 32], "pad_variable_length_inputs": False}
    text = batching.to_text(parameters)
    assert batching.validate(text) == parameters
    sentence = throughput.finding(rows)
    assert sentence.startswith("Throughput stops growing at batch 32: 20000 examples/s (per-call quartiles 19000-21000)")
    assert "128: 20500, 512: 19000" in sentence


def test_growth_beyond_the_spread_counts():
    rows = curve([1000, 7000, 20000, 24000, 24500])  # +20% from 32 to 128 is beyond the spread; 512 is not
    assert throughput.saturation(rows) == 3
    still_growing = curve([1000, 7000, 20000, 40000, 80000])
    assert throughput.saturation(still_growing) == 4
    assert throughput.finding(still_growing).startswith("Throughput was still growing at the largest batch measured, 512")
    assert batching.from_throughput(still_growing)["max_batch_size"] == 512


def test_a_noisy_curve_does_not_stop_early():
    # 128 is no better than 32 within the spread, but 512 is: throughput has not stopped growing at 32.
    rows = curve([1000, 7000, 20000, 19000, 40000], spread=0.1)
    assert throughput.saturation(rows) == 4


def test_measure_reports_every_batch(tmp_path):
    import tensorflow as tf

    calls = []

    def call(images):
        calls.append(int(images.shape[0]))
        return {"classes": tf.zeros(images.shape[0], tf.int64)}

    rows = throughput.measure(call, np.zeros((5, 2, 2, 1), np.float32), (1, 8), warmup_calls=2, min_calls=4,
                              max_calls=4, min_seconds=0.0)
    assert [r["batch"] for r in rows] == [1, 8] and calls == [1] * 6 + [8] * 6  # warm-up calls are not timed
    for row in rows:
        assert row["calls"] == 4
        assert row["examples_per_sec_q25"] <= row["examples_per_sec_q75"]
        assert row["latency_p50_ms"] <= row["latency_p99_ms"]


def test_request_round_trips_through_the_wire():
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    images = np.arange(2 * 3 * 3 * 1, dtype=np.float32).reshape(2, 3, 3, 1)
    request = tf_serving_files.predict_request("cnn", "serving_default", {"images": images})
    received = predict_pb2.PredictRequest.FromString(request.SerializeToString())
    assert received.model_spec.name == "cnn" and received.model_spec.signature_name == "serving_default"
    np.testing.assert_array_equal(tf.make_ndarray(received.inputs["images"]), images)
    pngs = tf_serving_files.encode_png(images)
    request = tf_serving_files.predict_request("cnn", "serving_bytes", {"image_bytes": pngs})
    assert list(tf.make_ndarray(request.inputs["image_bytes"])) == pngs


def test_png_keeps_integer_pixels():
    import tensorflow as tf

    images = np.random.default_rng(0).integers(0, 256, (3, 4, 5, 3)).astype(np.float32)
    decoded = np.stack([tf.io.decode_png(png).numpy() for png in tf_serving_files.encode_png(images)])
    np.testing.assert_array_equal(decoded, images)
