"""The measuring callbacks that a config turns on, and their automatic intervals."""

import dataclasses
import types

import pytest

from callbacks.replica_gradient_stats import ReplicaGradientStatistics
from pipeline import config as config_lib
from pipeline.training import callback_setup


def _replica_interval(tmp_path, num_train, **flags):
    config = dataclasses.replace(config_lib.Config(), bn_stats_every=0, dynamics=False, curvature_every=0, **flags)
    data = types.SimpleNamespace(num_train=num_train)
    (callback,) = callback_setup.instruments(config, data, None, str(tmp_path), replicas=2)
    assert isinstance(callback, ReplicaGradientStatistics)
    return callback.every_n_steps


@pytest.mark.parametrize("num_train, flags, expected", [
    (1293, {"batch": 32}, 10),  # the digits: an epoch of 40 steps, a record every quarter epoch
    (50000, {"batch": 32}, 100),  # a long epoch (1562 steps): AUTO_INTERVAL
    (1293, {"batch": 32, "grad_stats_every": 7}, 7),  # an explicit interval is kept
    (1293, {"batch": 16, "batch_schedule": "16@0,64@1"}, 20),  # the first phase's batch: 80 steps an epoch
    (1293, {"batch": config_lib.ADAPTIVE, "base_batch": 32, "lr_scaling": "none"}, 10),  # the base batch
    (100, {"batch": 32}, 2),  # 3 steps an epoch: a record pools at least 2 steps
])
def test_replica_statistics_record_at_least_every_quarter_epoch_by_default(tmp_path, num_train, flags, expected):
    # With 100 steps for every run, a fixed-batch mirrored run of two 40-step epochs on the digits had no record.
    assert _replica_interval(tmp_path, num_train, **flags) == expected
