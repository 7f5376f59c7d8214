"""The run directory's readers and writers (the metrics derived from a run's history: tests/test_run_timing.py)."""

import json
import os

import pytest

from pipeline import rundir
from pipeline.config import Config, InputError


def test_readers(tmp_path):
    run_dir = str(tmp_path)
    assert rundir.read_config(run_dir) is None and rundir.read_summary(run_dir) is None
    assert rundir.read_history(run_dir) == []
    (tmp_path / "config.json").write_text("{not json")
    assert rundir.read_config(run_dir) is None
    (tmp_path / "config.json").write_text(json.dumps({"config": {"batch": 8}, "effective_lr": 0.1}))
    rundir.write_summary(run_dir, {"status": "completed"})
    for record in [{"epoch": 0, "step": 10, "epoch_time_s": 2.0}, {"epoch": 1, "step": 20, "epoch_time_s": 1.0}]:
        rundir.append_history(run_dir, record)
    assert rundir.read_config(run_dir)["config"] == {"batch": 8}
    assert rundir.run_config(run_dir) == Config(batch=8)
    assert rundir.read_summary(run_dir) == {"status": "completed"}
    assert [r["epoch"] for r in rundir.read_history(run_dir)] == [0, 1]
    rundir.keep_history_before(run_dir, 1)  # a resume at epoch 1 trains it again
    assert [r["epoch"] for r in rundir.read_history(run_dir)] == [0]
    assert sorted(os.listdir(run_dir)) == ["config.json", "metrics.jsonl", "summary.json"]
    (tmp_path / "config.json").write_text(json.dumps({"config": {"btach": 8}}))
    with pytest.raises(InputError, match="config.json: unknown field 'btach'"):
        rundir.run_config(run_dir)
    with pytest.raises(InputError, match="missing"):
        rundir.run_config(str(tmp_path / "elsewhere"))
