"""SavedModel export: TF Serving layout, versions, atomic rename, both signatures, warmup, models.config, batching."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from pipeline.serving import batching, export, tf_serving_files, throughput


def tiny_model():
    inputs = keras.Input((8, 8, 1), name="images")
    x = keras.layers.Normalization(mean=[8.0], variance=[16.0])(inputs)
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(3, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs)


def integer_images(n, seed=0):
    """Images of integer pixels 0..16 (as the digits), which PNG stores exactly."""
    return np.random.default_rng(seed).integers(0, 17, (n, 8, 8, 1)).astype("float32")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = tiny_model()
    base = tmp_path_factory.mktemp("export")
    path = export.export_model(model, str(base), "tiny", examples=integer_images(40), class_names=["a", "b", "c"])
    return model, base, path


def test_layout_is_tf_serving(exported):
    _, base, path = exported
    assert path == os.path.join(str(base), "tiny", "1")
    assert os.path.exists(os.path.join(path, "saved_model.pb"))
    assert sorted(os.listdir(os.path.join(str(base), "tiny"))) == ["1"]  # no temporary folder left behind
    assert sorted(os.listdir(os.path.join(path, "assets.extra"))) == [
        "class_names.txt", "tf_serving_warmup_requests", "throughput.json"]
    assert sorted(os.listdir(str(base))) == ["batching_parameters.txt", "models.config", "tiny"]


def test_versions_increase_and_are_never_overwritten(tmp_path, monkeypatch):
    model = tiny_model()
    first = export.export_model(model, str(tmp_path), "tiny")
    second = export.export_model(model, str(tmp_path), "tiny")
    assert [os.path.basename(first), os.path.basename(second)] == ["1", "2"]
    with pytest.raises(FileExistsError):
        export.export_model(model, str(tmp_path), "tiny", version=1)
    # Another export takes the chosen number between choosing and renaming: this one moves to the next number.
    before = open(os.path.join(second, "saved_model.pb"), "rb").read()
    real, calls = export.next_version, []

    def stale(model_dir):
        calls.append(model_dir)
        return 2 if len(calls) == 1 else real(model_dir)

    monkeypatch.setattr(export, "next_version", stale)
    third = export.export_model(model, str(tmp_path), "tiny")
    assert os.path.basename(third) == "3" and len(calls) == 2
    assert open(os.path.join(second, "saved_model.pb"), "rb").read() == before
    assert sorted(os.listdir(tmp_path / "tiny")) == ["1", "2", "3"]


def test_reloaded_predictions_equal_keras(exported):
    model, _, path = exported
    images = np.random.default_rng(0).uniform(0, 16, (5, 8, 8, 1)).astype("float32")
    outputs = tf.saved_model.load(path).signatures["serving_default"](images=tf.constant(images))
    expected = model(images, training=False).numpy()
    np.testing.assert_allclose(outputs["probabilities"].numpy(), expected, atol=1e-5)
    np.testing.assert_array_equal(outputs["classes"].numpy(), expected.argmax(-1))


@pytest.mark.slow
def test_saved_model_cli_lists_signature(exported):
    _, _, path = exported
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    result = subprocess.run([cli, "show", "--dir", path, "--all"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "signature_def['serving_default']" in result.stdout
    assert "inputs['images']" in result.stdout
    assert "outputs['probabilities']" in result.stdout and "outputs['classes']" in result.stdout
    assert "signature_def['serving_bytes']" in result.stdout and "inputs['image_bytes']" in result.stdout


def test_bytes_signature_answers_as_pixels(exported):
    model, _, path = exported
    images = integer_images(6, seed=2)
    signatures = tf.saved_model.load(path).signatures
    from_bytes = signatures["serving_bytes"](image_bytes=tf.constant(tf_serving_files.encode_png(images)))
    np.testing.assert_allclose(from_bytes["probabilities"].numpy(), model(images, training=False).numpy(), atol=1e-5)
    jpeg = tf.io.encode_jpeg(tf.cast(images[0], tf.uint8), quality=100).numpy()  # JPEG decodes too
    assert signatures["serving_bytes"](image_bytes=tf.constant([jpeg]))["classes"].shape == (1,)
    wrong_size = tf.io.encode_png(np.zeros((9, 8, 1), np.uint8)).numpy()
    with pytest.raises(tf.errors.InvalidArgumentError, match="8x8"):
        signatures["serving_bytes"](image_bytes=tf.constant([wrong_size]))


def test_warmup_records_match_signatures_and_replay(exported):
    _, base, path = exported
    logs = tf_serving_files.read_warmup(path)
    parameters = batching.validate(open(os.path.join(str(base), "batching_parameters.txt")).read())
    assert 0 < len(logs) <= 1000
    signatures = tf.saved_model.load(path).signatures
    seen = set()
    for log in logs:
        request = log.predict_log.request
        assert request.model_spec.name == "tiny"
        _, specs = signatures[request.model_spec.signature_name].structured_input_signature
        assert set(request.inputs) == set(specs)
        for name, proto in request.inputs.items():
            value = tf.make_ndarray(proto)
            assert tf.dtypes.as_dtype(proto.dtype) == specs[name].dtype
            assert specs[name].shape.is_compatible_with(value.shape)
            seen.add((request.model_spec.signature_name, value.shape[0]))
        outputs = tf_serving_files.answer(request, signatures)
        assert np.isfinite(outputs["probabilities"]).all()
    # Both signatures are warmed at every batch size the server may form, and nothing else.
    sizes = parameters["allowed_batch_sizes"]
    assert seen == {(name, b) for name in ("serving_default", "serving_bytes") for b in sizes}


def test_models_config_parses_and_names_the_model(exported):
    _, base, _ = exported
    config = tf_serving_files.read_models_config(os.path.join(str(base), "models.config"))
    [model] = config.model_config_list.config
    assert (model.name, model.base_path, model.model_platform) == ("tiny", "/models/tiny", "tensorflow")
    assert model.model_version_policy.latest.num_versions == 1


def test_batching_parameters_come_from_the_measured_curve(exported):
    _, base, path = exported
    parameters = batching.validate(open(os.path.join(str(base), "batching_parameters.txt")).read())
    curve = json.load(open(os.path.join(path, "assets.extra", "throughput.json")))
    rows = curve["rows"]
    assert [r["batch"] for r in rows] == list(export.SERVED_BATCH_SIZES)
    k = throughput.saturation(rows)
    assert parameters["max_batch_size"] == rows[k]["batch"]
    assert parameters["allowed_batch_sizes"] == [r["batch"] for r in rows[: k + 1]]
    assert parameters["batch_timeout_micros"] == max(1, round(rows[k]["latency_p50_ms"] * 1e3))
    assert curve["finding"] == throughput.finding(rows)


def test_predict_request_proto_round_trip(exported):
    """A TF Serving PredictRequest built with tensorflow-serving-api, answered by the loaded SavedModel."""
    from tensorflow_serving.apis import predict_pb2

    model, _, path = exported
    images = np.random.default_rng(1).uniform(0, 16, (3, 8, 8, 1)).astype("float32")
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "tiny"
    request.model_spec.signature_name = "serving_default"
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(images))
    wire = request.SerializeToString()

    received = predict_pb2.PredictRequest.FromString(wire)
    signature = tf.saved_model.load(path).signatures[received.model_spec.signature_name]
    feeds = {name: tf.constant(tf.make_ndarray(proto)) for name, proto in received.inputs.items()}
    response = predict_pb2.PredictResponse()
    for name, value in signature(**feeds).items():
        response.outputs[name].CopyFrom(tf.make_tensor_proto(value.numpy()))
    probabilities = tf.make_ndarray(response.outputs["probabilities"])
    np.testing.assert_allclose(probabilities, model(images, training=False).numpy(), atol=1e-5)


def test_interrupted_export_leaves_no_version(tmp_path, monkeypatch):
    model = tiny_model()

    def crash(self, path, **kwargs):
        os.makedirs(path)
        open(os.path.join(path, "saved_model.pb"), "w").close()
        raise KeyboardInterrupt

    # ExportArchive() returns a backend-specific subclass; patch the class that really writes.
    monkeypatch.setattr(type(keras.export.ExportArchive()), "write_out", crash)
    with pytest.raises(KeyboardInterrupt):
        export.export_model(model, str(tmp_path), "tiny")
    versions = [name for name in os.listdir(tmp_path / "tiny") if name.isdigit()]
    assert versions == []


def test_interrupted_warmup_leaves_no_version(tmp_path, monkeypatch):
    """An export stopped while measuring or writing warmup requests (after the SavedModel) is not visible."""

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tf_serving_files, "prepare_version", crash)
    with pytest.raises(KeyboardInterrupt):
        export.export_model(tiny_model(), str(tmp_path), "tiny", examples=integer_images(4))
    assert [name for name in os.listdir(tmp_path / "tiny") if not name.startswith(".")] == []
    assert not (tmp_path / "models.config").exists()


@pytest.mark.slow
def test_the_next_export_removes_temporary_folders_of_ended_processes(tmp_path):
    """An export interrupted for good leaves its hidden folder; the next export into that folder removes it, but not
    the folder of a process that still runs (it may still finish)."""
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        for pid in (ended.pid, running.pid):
            folder = tmp_path / "tiny" / f"{export.TMP_PREFIX}{pid}"
            folder.mkdir(parents=True)
            (folder / "saved_model.pb").touch()
        path = export.export_model(tiny_model(), str(tmp_path), "tiny")
        assert sorted(os.listdir(tmp_path / "tiny")) == sorted(["1", f"{export.TMP_PREFIX}{running.pid}"])
        assert os.path.exists(os.path.join(path, "saved_model.pb"))
    finally:
        running.kill()
        running.wait()
