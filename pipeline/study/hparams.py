"""TensorBoard HParams data of a sweep: one session per run, its settings and its report metrics."""

from __future__ import annotations

import os
import shutil


def write_hparams(rows: list[dict], sweep_dir: str, metrics: list[str]) -> str:
    """TensorBoard HParams data, one session per run, under <sweep_dir>/tensorboard (rewritten each time).

    Args:
      rows: the report's run rows (pipeline.study.run_row.read_run).
      sweep_dir: the sweep directory.
      metrics: the row keys written as each session's metrics (None values are left out).
    Returns:
      The log directory.
    """
    import tensorflow as tf
    from tensorboard.plugins.hparams import api as hp

    log_dir = os.path.join(sweep_dir, "tensorboard")
    shutil.rmtree(log_dir, ignore_errors=True)
    params = {
        "norm": hp.HParam("norm", hp.Discrete(sorted({r["norm"] for r in rows}))),
        "batch": hp.HParam("batch", hp.Discrete(sorted({r["batch"] for r in rows}))),
        "replicas": hp.HParam("replicas", hp.Discrete(sorted({r["replicas"] for r in rows}))),
        "seed": hp.HParam("seed", hp.Discrete(sorted({r["seed"] for r in rows}))),
        "lr": hp.HParam("lr", hp.RealInterval(min(r["lr"] for r in rows), max(r["lr"] for r in rows))),
        "status": hp.HParam("status", hp.Discrete(sorted({r["status"] for r in rows}))),
    }
    with tf.summary.create_file_writer(log_dir).as_default():
        hp.hparams_config(hparams=list(params.values()), metrics=[hp.Metric(m) for m in metrics])
    for row in rows:
        with tf.summary.create_file_writer(os.path.join(log_dir, row["name"])).as_default():
            hp.hparams({params[k]: row[k] for k in params}, trial_id=row["name"])
            for key in metrics:
                if row[key] is not None:
                    tf.summary.scalar(key, row[key], step=0)
    return log_dir
