"""Which changes --resume accepts (rundir.config_change), what it creates, and that an accepted change of epochs
gives the run that the new value gives uninterrupted."""

import dataclasses
import json
import os

import numpy as np
import pytest

from pipeline import rundir
from pipeline import config as config_lib
from pipeline import train as train_lib
from pipeline.config import Config, InputError
from pipeline.training import checkpoint

# A value different from the default for every field that --resume must refuse to change.
CHANGED = {
    "dataset": "npz:other.npz", "data_dir": "/data", "download": True, "val_fraction": 0.2, "augment": "none",
    "model": "cnn", "norm": "group", "ghost_batch": 16, "bn_momentum": 0.99, "batch": 64, "optimizer": "adam",
    "momentum": 0.8, "lr": 0.2, "lr_scaling": "linear", "base_batch": 64, "schedule": "step", "warmup_epochs": 1.0,
    "step_epochs": 5.0, "milestones": "15,25", "gamma": 0.5, "weight_decay": 0.0, "accumulate": 2,
    "batch_schedule": "32@0,64@10", "grad_stats_every": 10, "bn_stats_every": 10, "dynamics": False, "seed": 1,
    "deterministic": True, "advice": "advice.json", "target_accuracy": 0.9, "target_checks_per_epoch": 4,
    "input": "stream", "strategy": "mirrored", "logical_cpus": 2, "replicas": 1, "steps_per_execution": "4",
    "precision": "mixed_bfloat16", "jit": True,
    "grad_stats_precision": 0.25, "grad_stats_max_examples": 4096, "grad_stats_budget": 0.0, "bn_stats_samples": 512,
    # Measurement schedules leave the weights alone but decide what the run records, as grad/bn_stats_every do.
    "curvature_every": 10,
    # --batch adaptive's decisions: where the batch may go and how it is chosen.
    "max_batch": 512, "batch_policy": "norm-test", "norm_test_theta": 2.0,
}
ALLOWED = {"cache_dir": "cache", "intra_op_threads": 2, "verbose": 0, "run_dir": "elsewhere", "resume": False, "precise_bn_samples": 0, "export": False}


def recorded_run(tmp_path, config: Config, epoch: int, step: int) -> str:
    """A run folder as an interrupted run leaves it: config.json and a committed checkpoint."""
    run_dir = tmp_path / "run"
    os.makedirs(run_dir / "checkpoints")
    (run_dir / "config.json").write_text(json.dumps({"config": config_lib.to_dict(config)}))
    (run_dir / "checkpoints" / checkpoint.STATE).write_text(
        json.dumps({"epoch": epoch, "step": step, "weights": checkpoint.weights_name(epoch)}))
    return str(run_dir)


def test_every_field_is_either_refused_or_allowed():
    defaults = Config()
    assert [field for field, value in CHANGED.items() if getattr(defaults, field) == value] == []  # each a change
    fields = {f.name for f in dataclasses.fields(Config)}
    assert fields == set(CHANGED) | set(ALLOWED) | set(rundir.STOP_FIELDS) | {"overwrite"}


@pytest.mark.parametrize("field", sorted(CHANGED))
def test_a_field_that_changes_training_is_refused(tmp_path, field):
    recorded = Config(resume=True)
    run_dir = recorded_run(tmp_path, recorded, epoch=2, step=80)
    changed = dataclasses.replace(recorded, **{field: CHANGED[field]})
    assert rundir.config_change(run_dir, changed, resuming=True)[:3] == (field, getattr(recorded, field),
                                                                         CHANGED[field])
    with pytest.raises(InputError) as error:
        rundir.check(changed, run_dir)
    message = str(error.value)
    flag = "--" + field.replace("_", "-")
    assert message.startswith(f"{flag}: ") and "\n" not in message
    assert f"has {getattr(recorded, field)!r}, this command {CHANGED[field]!r}" in message


@pytest.mark.parametrize("field", sorted(ALLOWED))
def test_a_field_that_does_not_change_training_is_allowed(tmp_path, field):
    recorded = Config(resume=True)
    run_dir = recorded_run(tmp_path, recorded, epoch=2, step=80)
    changed = dataclasses.replace(recorded, **{field: ALLOWED[field]})
    assert rundir.config_change(run_dir, changed, resuming=True) is None
    if field not in rundir.PER_RUN_FIELDS:  # a finished run, which a sweep would skip, must match exactly
        assert rundir.config_change(run_dir, changed, resuming=False)[0] == field


@pytest.mark.parametrize("schedule, epochs, max_steps, refused", [
    ("constant", 12, 0, None), ("step", 20, 0, None), ("multistep", 3, 0, None), ("exponential", 8, 0, None),
    ("step", 2, 0, None),  # the new end is the epoch already reached
    ("cosine", 12, 0, ("epochs", "cosine")), ("step", 1, 0, ("epochs", "2 epochs are already trained")),
    ("cosine", 10, 100, None), ("cosine", 10, 80, None), ("cosine", 10, 79, ("max_steps", "80 steps are already")),
])
def test_moving_the_end_of_training(tmp_path, schedule, epochs, max_steps, refused):
    recorded = Config(schedule=schedule, milestones="5" if schedule == "multistep" else "", epochs=10, resume=True)
    run_dir = recorded_run(tmp_path, recorded, epoch=2, step=80)  # 2 epochs of 40 steps trained
    moved = dataclasses.replace(recorded, epochs=epochs, max_steps=max_steps)
    change = rundir.config_change(run_dir, moved, resuming=True)
    if refused is None:
        assert change is None
    else:
        assert change[0] == refused[0] and refused[1] in change[3], change
    # A finished run (what a sweep skips) must match exactly.
    assert rundir.config_change(run_dir, moved, resuming=False)[0] in rundir.STOP_FIELDS


def test_a_run_stopped_at_max_steps_keeps_its_end(tmp_path):
    recorded = Config(schedule="constant", epochs=10, max_steps=50, resume=True)
    run_dir = recorded_run(tmp_path, recorded, epoch=2, step=50)  # stopped inside epoch 2 of 40 steps each
    change = rundir.config_change(run_dir, dataclasses.replace(recorded, max_steps=100), resuming=True)
    assert change[0] == "max_steps" and "already stopped at --max-steps 50" in change[3]


def test_resume_without_a_run_says_it_starts_one_and_creates_nothing(tmp_path, capsys):
    run_dir = str(tmp_path / "new" / "run")
    assert rundir.check(Config(resume=True, run_dir=run_dir), run_dir) is False
    assert capsys.readouterr().err == f"--resume: {run_dir} holds no run to resume; starting a new run\n"
    assert not os.path.exists(tmp_path / "new")


@pytest.mark.slow
def test_more_epochs_on_resume_equal_the_longer_run(tmp_path, interrupt_after_first_epoch, final_weights):
    """A step schedule is defined per epoch: 2 epochs, interrupted after 1, resumed with 3 = 3 uninterrupted."""
    base = dataclasses.replace(config_lib.smoke(), schedule="step", step_epochs=1.0, gamma=0.5, deterministic=True,
                               grad_stats_every=0, bn_stats_every=0, dynamics=False, export=False,
                               precise_bn_samples=0, seed=5)
    longer = train_lib.train(dataclasses.replace(base, epochs=3, run_dir=str(tmp_path / "longer")))
    assert longer.status == "completed"

    run_dir = str(tmp_path / "resumed")
    with interrupt_after_first_epoch():
        assert train_lib.train(dataclasses.replace(base, epochs=2, run_dir=run_dir)).status == "interrupted"
    resumed = train_lib.train(dataclasses.replace(base, epochs=3, run_dir=run_dir, resume=True))
    assert resumed.status == "completed" and resumed.steps == longer.steps == 3 * (1293 // 64)
    assert json.load(open(os.path.join(run_dir, "config.json")))["config"]["epochs"] == 3
    a, b = final_weights(run_dir), final_weights(longer.run_dir)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
