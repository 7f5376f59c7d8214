"""pipeline.evaluate on a trained run's SavedModel: agreement with the run, metrics against brute force, files,
throughput, and bad input."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from pipeline.data import in_memory as data_lib
from pipeline.serving import classification_metrics, evaluation as evaluate

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def evaluated(trained_run, trained_evaluation):
    config, summary = trained_run
    return config, summary, trained_evaluation


@pytest.fixture(scope="module")
def test_split(trained_run):
    config, summary = trained_run
    x, y = data_lib.load(config).arrays("test")
    probabilities = tf.saved_model.load(summary.export_path).signatures["serving_default"](images=tf.constant(x))
    return x, y, probabilities["probabilities"].numpy()


def test_accuracy_and_loss_equal_the_runs(evaluated):
    _, summary, result = evaluated
    assert result["saved_model"] == os.path.abspath(summary.export_path)
    assert result["num_examples"] == 360 and result["split"] == "test" and result["dataset"] == "digits"
    assert abs(result["accuracy"] - summary.test_accuracy) <= 0.001
    assert result["run_test_accuracy"] == summary.test_accuracy
    assert result["loss"] == pytest.approx(summary.test_loss, rel=1e-4)


def test_metrics_against_brute_force(evaluated, test_split):
    _, _, result = evaluated
    _, y, probabilities = test_split
    predicted = probabilities.argmax(-1)
    assert result["accuracy"] == pytest.approx(sum(int(p == t) for p, t in zip(predicted, y)) / len(y))
    assert result["loss"] == pytest.approx(-np.mean([np.log(probabilities[i, y[i]]) for i in range(len(y))]), rel=1e-4)
    top5 = np.mean([y[i] in np.argsort(-probabilities[i])[:5] for i in range(len(y))])
    assert result["top_5_accuracy"] == pytest.approx(top5)
    matrix = np.zeros((10, 10), int)
    for t, p in zip(y, predicted):
        matrix[t, p] += 1
    assert result["confusion_matrix"] == matrix.tolist()
    for k in range(10):
        scores = result["per_class"][str(k)]
        true_positive = matrix[k, k]
        precision = true_positive / matrix[:, k].sum() if matrix[:, k].sum() else 0.0
        recall = true_positive / matrix[k].sum()
        assert scores["precision"] == pytest.approx(precision) and scores["recall"] == pytest.approx(recall)
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        assert scores["f1"] == pytest.approx(f1) and scores["support"] == matrix[k].sum()
    wrong = [i for i in range(len(y)) if predicted[i] != y[i]]
    assert sorted(m["index"] for m in result["misclassified"]) == wrong
    confidences = [m["confidence"] for m in result["misclassified"]]
    assert confidences == sorted(confidences, reverse=True)


def brute_force_ece(confidence, correct, bins):
    """ECE with a Python loop over bins and examples (Guo et al. 2017, eq. 3)."""
    total = 0.0
    for m in range(bins):
        low, high = m / bins, (m + 1) / bins
        members = [i for i, c in enumerate(confidence) if (low < c <= high) or (m == 0 and c == 0)]
        if members:
            accuracy = sum(correct[i] for i in members) / len(members)
            mean_confidence = sum(confidence[i] for i in members) / len(members)
            total += len(members) / len(confidence) * abs(accuracy - mean_confidence)
    return total


@pytest.mark.parametrize("bins", [1, 10, 15])
def test_ece_against_brute_force(bins):
    rng = np.random.default_rng(bins)
    confidence = np.concatenate([rng.uniform(0.1, 1.0, 300), [1.0, 0.5, 0.2, 0.0]])  # edges land in the lower bin
    correct = rng.uniform(size=len(confidence)) < confidence ** 2
    result = classification_metrics.calibration(confidence, correct, bins)
    assert result["ece"] == pytest.approx(brute_force_ece(confidence, correct, bins), abs=1e-12)
    assert sum(result["bin_count"]) == len(confidence)


def test_ece_of_the_run(evaluated, test_split):
    _, _, result = evaluated
    _, y, probabilities = test_split
    confidence, correct = probabilities.max(-1), probabilities.argmax(-1) == y
    assert result["calibration"]["ece"] == pytest.approx(brute_force_ece(confidence, correct, 15), abs=1e-6)
    assert result["calibration"]["binning"].startswith("15 equal-width bins")


def test_writes_files_and_tensorboard_images(evaluated):
    config, _, result = evaluated
    out = os.path.join(config.run_dir, "evaluation", "test")
    assert result["out"] == out
    for name in ("evaluation.json", "confusion_matrix.json", "confusion_matrix.png", "reliability.png",
                 "misclassified.png", "throughput.json", "throughput.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    saved = json.load(open(os.path.join(out, "evaluation.json")))
    assert saved["accuracy"] == result["accuracy"]
    assert json.load(open(os.path.join(out, "confusion_matrix.json")))["matrix"] == result["confusion_matrix"]
    tags = set()
    for name in os.listdir(os.path.join(out, "tensorboard")):
        for event in tf.compat.v1.train.summary_iterator(os.path.join(out, "tensorboard", name)):
            tags.update(value.tag for value in event.summary.value)
    assert {"evaluation/confusion_matrix", "evaluation/reliability", "evaluation/misclassified",
            "evaluation/throughput", "evaluation/accuracy", "evaluation/ece"} <= tags


def test_throughput_by_request_batch(evaluated):
    _, _, result = evaluated
    report = result["throughput"]
    assert [row["batch"] for row in report["rows"]] == [1, 8, 32]
    for row in report["rows"]:
        assert row["calls"] >= 10 and row["examples_per_sec"] > 0
        assert row["examples_per_sec_q25"] <= row["examples_per_sec"] <= row["examples_per_sec_q75"]
        assert row["examples_per_sec"] == pytest.approx(row["batch"] / (row["latency_p50_ms"] / 1e3))
    assert report["finding"].startswith("Throughput ")
    assert report["batching_parameters"]["allowed_batch_sizes"][-1] == report["batching_parameters"]["max_batch_size"]


def test_evaluate_a_version_folder_with_a_dataset(trained_run, tmp_path):
    _, summary = trained_run
    result = evaluate.evaluate(summary.export_path, dataset="digits", split="val", out=str(tmp_path / "val"))
    assert result["split"] == "val" and result["num_examples"] == 144 and "run_test_accuracy" not in result
    assert abs(result["accuracy"] - summary.val_accuracy) <= 0.001


def test_not_a_saved_model(tmp_path, cli_error):
    (tmp_path / "saved_model.txt").write_text("hello")
    line = cli_error(evaluate.main, [str(tmp_path)])
    assert str(tmp_path) in line and "not a SavedModel" in line
    line = cli_error(evaluate.main, [str(tmp_path / "missing")])
    assert "not a folder" in line
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "saved_model.pb").write_bytes(b"\x00garbage")
    assert "cannot load" in cli_error(evaluate.main, [str(tmp_path / "broken"), "--dataset", "digits"])


def test_signature_with_unexpected_inputs(tmp_path, cli_error):
    module = tf.Module()
    module.serve = tf.function(lambda x: {"probabilities": x, "classes": tf.argmax(x, -1)},
                               input_signature=[tf.TensorSpec((None, 10), tf.float32, name="x")])
    tf.saved_model.save(module, str(tmp_path / "1"), signatures={"serving_default": module.serve,
                                                                 "serving_bytes": module.serve})
    line = cli_error(evaluate.main, [str(tmp_path / "1"), "--dataset", "digits"])
    assert "'serving_default'" in line and "x float32" in line and "'images'" in line


def test_bad_flags_and_datasets(trained_run, tmp_path, cli_error):
    config, summary = trained_run
    assert "--benchmark-batches" in cli_error(evaluate.main, [config.run_dir, "--benchmark-batches", "8,1"])
    assert "--split" in cli_error(evaluate.main, [config.run_dir, "--split", "holdout"])
    shutil.copytree(summary.export_path, tmp_path / "copy" / "cnn" / "1")
    line = cli_error(evaluate.main, [str(tmp_path / "copy" / "cnn")])
    assert "--dataset" in line  # a copied export has no run around it to name its dataset
    images = np.zeros((20, 4, 4, 1), np.float32)
    npz = tmp_path / "small.npz"
    np.savez(npz, x_train=images, y_train=np.arange(20) % 2, x_test=images, y_test=np.arange(20) % 2)
    line = cli_error(evaluate.main, [config.run_dir, "--dataset", f"npz:{npz}"])
    assert "(4, 4, 1)" in line and "(8, 8, 1)" in line
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "summary.json").write_text(json.dumps({"status": "failed"}))
    assert "no export" in cli_error(evaluate.main, [str(tmp_path / "run")])


@pytest.mark.slow
def test_help_does_not_import_tensorflow():
    code = ("import sys; from pipeline.serving import evaluation as evaluate, client as predict; "
            "[m.parser().format_help() for m in (evaluate, predict)]; print('tensorflow' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60,
                            env=dict(os.environ, PYTHONPATH=REPO))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
