"""The pipeline.predict client: its PredictRequest answered by the SavedModel agrees with evaluate; bad input and an
unreachable server end with one line and exit code 2."""

import json
import socket

import numpy as np
import pytest
import tensorflow as tf

from pipeline.data import in_memory as data_lib
from pipeline.serving import client, tf_serving_files


@pytest.fixture(scope="module")
def images(trained_run, trained_evaluation, tmp_path_factory):
    """PNG files of test images, misclassified ones first, and the classes evaluate reports for them."""
    config, _ = trained_run
    report = trained_evaluation
    x, y = data_lib.load(config).arrays("test")
    wrong = {m["index"]: int(m["predicted"]) for m in report["misclassified"]}  # digits' class names are "0".."9"
    chosen = list(wrong)[:3] + [i for i in range(len(y)) if i not in wrong][:5]
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for i, png in zip(chosen, tf_serving_files.encode_png(x[chosen])):
        paths.append(str(folder / f"test{i}.png"))
        with open(paths[-1], "wb") as f:
            f.write(png)
    expected = [wrong.get(i, int(y[i])) for i in chosen]  # evaluate: misclassified as `predicted`, else right
    return paths, expected


def test_client_request_decoded_and_fed_to_the_signature_agrees_with_evaluate(trained_run, images):
    from tensorflow_serving.apis import predict_pb2

    _, summary = trained_run
    paths, expected = images
    request = client.build_request("cnn", client.read_images(paths))
    received = predict_pb2.PredictRequest.FromString(request.SerializeToString())
    assert (received.model_spec.name, received.model_spec.signature_name) == ("cnn", "serving_bytes")
    signature = tf.saved_model.load(summary.export_path).signatures[received.model_spec.signature_name]
    feeds = {name: tf.constant(tf.make_ndarray(proto)) for name, proto in received.inputs.items()}
    assert list(feeds) == ["image_bytes"]
    assert signature(**feeds)["classes"].numpy().tolist() == expected


def test_model_flag_prints_the_classes(trained_run, images, capsys):
    config, _ = trained_run
    paths, expected = images
    assert client.main([*paths, "--model", config.run_dir]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["image"] for line in lines] == paths
    assert [line["class"] for line in lines] == expected
    assert [line["name"] for line in lines] == [str(c) for c in expected]
    assert all(0 < line["probability"] <= 1 for line in lines)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def test_unreachable_server(images, cli_error):
    port = closed_port()
    line = cli_error(client.main, [images[0][0], "--server", f"localhost:{port}", "--timeout", "5"])
    assert f"--server localhost:{port}" in line and "cannot reach" in line
    assert "--server" in cli_error(client.main, [images[0][0], "--server", "localhost"])


def test_bad_images(trained_run, images, tmp_path, cli_error):
    config, _ = trained_run
    png = open(images[0][0], "rb").read()
    (tmp_path / "truncated.png").write_bytes(png[: len(png) // 2])
    (tmp_path / "text.jpg").write_bytes(b"not an image at all")
    (tmp_path / "wide.png").write_bytes(tf.io.encode_png(np.zeros((8, 9, 1), np.uint8)).numpy())
    for name, words in (("truncated.png", ["not a PNG"]), ("text.jpg", ["not a PNG"]), ("wide.png", ["8x9", "8x8"]),
                        ("missing.png", ["cannot read"])):
        line = cli_error(client.main, [images[0][0], str(tmp_path / name), "--model", config.run_dir])
        assert str(tmp_path / name) in line
        for word in words:
            assert word in line, line


def test_bad_model_path(images, tmp_path, cli_error):
    line = cli_error(client.main, [images[0][0], "--model", str(tmp_path)])
    assert line.startswith("error: --model:") and "not a SavedModel" in line
    assert "--model" in cli_error(client.main, [images[0][0]])  # neither --server nor --model
