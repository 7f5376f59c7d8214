"""SavedModel export: TF Serving layout, atomic rename, signature, and predictions equal to Keras'."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from pipeline import export


def tiny_model():
    inputs = keras.Input((8, 8, 1), name="images")
    x = keras.layers.Normalization(mean=[8.0], variance=[16.0])(inputs)
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(3, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = tiny_model()
    base = tmp_path_factory.mktemp("export")
    path = export.export_model(model, str(base), "tiny")
    return model, base, path


def test_layout_is_tf_serving(exported):
    _, base, path = exported
    assert path == os.path.join(str(base), "tiny", "1")
    assert os.path.exists(os.path.join(path, "saved_model.pb"))
    assert sorted(os.listdir(os.path.join(str(base), "tiny"))) == ["1"]  # no temporary folder left behind


def test_next_export_gets_next_version(exported):
    model, base, _ = exported
    assert export.next_version(os.path.join(str(base), "tiny")) == 2


def test_reloaded_predictions_equal_keras(exported):
    model, _, path = exported
    images = np.random.default_rng(0).uniform(0, 16, (5, 8, 8, 1)).astype("float32")
    outputs = tf.saved_model.load(path).signatures["serving_default"](images=tf.constant(images))
    expected = model(images, training=False).numpy()
    np.testing.assert_allclose(outputs["probabilities"].numpy(), expected, atol=1e-5)
    np.testing.assert_array_equal(outputs["classes"].numpy(), expected.argmax(-1))


def test_saved_model_cli_lists_signature(exported):
    _, _, path = exported
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    result = subprocess.run([cli, "show", "--dir", path, "--all"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "signature_def['serving_default']" in result.stdout
    assert "inputs['images']" in result.stdout
    assert "outputs['probabilities']" in result.stdout and "outputs['classes']" in result.stdout


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
