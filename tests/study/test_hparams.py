"""pipeline/study/hparams.py: the HParams data TensorBoard reads back is one session per run with its settings and
its metrics, a missing (None) metric left out, and a rewrite replaces the previous data."""

import glob
import os

import tensorflow as tf
from tensorboard.plugins.hparams import plugin_data_pb2

from pipeline.study import hparams


def _row(name, batch, lr, accuracy):
    return {"name": name, "norm": "batch", "batch": batch, "replicas": 1, "seed": 0, "lr": lr, "status": "completed",
            "test_accuracy": accuracy}


def _events(directory):
    """(session settings or None, {tag: value}) from the event files directly in `directory`."""
    settings, scalars = None, {}
    for path in glob.glob(os.path.join(directory, "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "hparams":
                    data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
                    if data.HasField("session_start_info"):
                        settings = {k: v.number_value if v.HasField("number_value") else v.string_value
                                    for k, v in data.session_start_info.hparams.items()}
                else:
                    scalars[value.tag] = float(tf.make_ndarray(value.tensor))
    return settings, scalars


def test_one_session_per_run_with_its_settings_and_metrics(tmp_path):
    rows = [_row("batch-b32-s0", 32, 0.05, 0.97), _row("batch-b64-s0", 64, 0.1, None)]
    (tmp_path / "tensorboard").mkdir()
    (tmp_path / "tensorboard" / "stale").write_text("a previous report's data")
    log_dir = hparams.write_hparams(rows, str(tmp_path), ["test_accuracy"])
    assert log_dir == str(tmp_path / "tensorboard")
    assert sorted(os.listdir(log_dir)) == ["batch-b32-s0", "batch-b64-s0"] + sorted(
        os.path.basename(p) for p in glob.glob(os.path.join(log_dir, "events.out.tfevents.*")))
    settings, scalars = _events(os.path.join(log_dir, "batch-b32-s0"))
    assert settings == {"norm": "batch", "batch": 32.0, "replicas": 1.0, "seed": 0.0, "lr": 0.05, "status": "completed"}
    assert scalars == {"test_accuracy": tf.constant(0.97).numpy().item()}
    settings, scalars = _events(os.path.join(log_dir, "batch-b64-s0"))
    assert settings["batch"] == 64.0 and settings["lr"] == 0.1
    assert scalars == {}  # None is left out, not written as 0
