"""Steps to target checked every k steps: against a brute-force check at every step, and in a real run's summary."""

import dataclasses
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from pipeline import config as config_lib
from pipeline import train as train_lib
from pipeline.training import target as target_lib
from pipeline.training import target_record


def test_interval_is_the_same_fraction_of_an_epoch_at_every_batch():
    # Digits: 1293 training examples -> 161, 80, 40, 20, 10, 5 steps per epoch at batch 8 ... 256.
    assert [target_lib.interval(1293 // b, 8) for b in (8, 16, 32, 64, 128, 256)] == [20, 10, 5, 2, 1, 1]
    assert target_lib.interval(3, 8) == 1


def test_first_reaching_check_matches_brute_force_during_training(tmp_path):
    """A check every 3 steps reports the first multiple of 3 at which an independent NumPy accuracy of the whole
    validation split, computed after every step, is >= the target; and the checking time is left out."""
    from sklearn.datasets import load_digits

    keras.utils.set_random_seed(2)
    x, y = load_digits(return_X_y=True)
    x, y = x.reshape(-1, 64).astype("float32") / 16, y.astype("int32")
    train_x, train_y, val_x, val_y = x[:1400], y[:1400], x[1400:], y[1400:]
    inputs = keras.Input((64,))
    model = keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(keras.layers.Dense(32, "relu")(inputs)))
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss="sparse_categorical_crossentropy")
    seconds = {"measured": 0.0}
    check = target_lib.TargetCheck(tf.data.Dataset.from_tensor_slices((val_x, val_y)).batch(100), 0.85, 3,
                                   str(tmp_path), lambda: seconds["measured"] + check_seconds())

    def check_seconds():
        return getattr(check, "seconds", 0.0)

    accuracies, corrects = [], []

    class BruteForce(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            weights = [np.asarray(w, np.float64) for w in self.model.get_weights()]
            hidden = np.maximum(val_x @ weights[0] + weights[1], 0)
            corrects.append(np.argmax(hidden @ weights[2] + weights[3], axis=1) == val_y)
            accuracies.append(float(np.mean(corrects[-1])))

    model.fit(train_x, train_y, batch_size=32, epochs=4, shuffle=False, verbose=0, callbacks=[check, BruteForce()])
    steps = np.arange(1, len(accuracies) + 1)
    expected = next(s for s, a in zip(steps, accuracies) if s % 3 == 0 and a >= 0.85)
    assert expected > 44  # reached after the first epoch, whose end a check at epoch ends would have used
    reached = target_lib.read(str(tmp_path))
    assert reached["step"] == expected
    assert reached["val_accuracy"] == pytest.approx(accuracies[expected - 1], abs=1e-6)
    steps_per_epoch = 1400 // 32 + 1  # 44, the last batch partial
    assert reached["epoch"] == (expected - 1) // steps_per_epoch
    assert reached["epoch"] + reached["epoch_fraction"] == pytest.approx(expected / steps_per_epoch)
    assert check.seconds > 0 and reached["seconds_into_epoch"] > 0

    # The per-example record: every check from step 3 on, each example's correctness as NumPy computes it, going on
    # after the crossing until a check is settled 3 binomial standard errors above the target or at twice its step.
    record = target_record.read(str(tmp_path))
    stop = next((s for s, a in zip(steps, accuracies) if s % 3 == 0 and s >= expected and (
        target_record.settled(a, len(val_y), 0.85) or s >= 2 * expected)), steps[-1] - steps[-1] % 3)
    assert record["steps"].tolist() == list(range(3, stop + 1, 3))
    for step, correct in zip(record["steps"], record["correct"]):
        assert np.array_equal(correct, corrects[step - 1])
    assert record["epochs"].tolist() == [(s - 1) // steps_per_epoch for s in record["steps"]]
    first = record["steps"].tolist().index(expected)
    assert record["seconds_into_epoch"][first] == reached["seconds_into_epoch"]  # target.json and the record agree


def test_record_resumes_with_the_checks_of_its_checkpoint(tmp_path):
    """A resumed run reads its earlier checks back, keeps those its checkpoint counted and forgets the later ones,
    in memory and in the file."""
    record = target_record.CheckRecord(str(tmp_path), 0.5)
    for step, epoch, right in ((2, 0, 1), (4, 0, 3), (6, 1, 2), (8, 1, 4)):
        record.add(step, epoch, step / 4 - epoch, 0.1 * step, [i < right for i in range(4)])
    assert record.first_crossing == 4 and record.done  # 4 right of 4 at step 8 is settled
    record.write()
    resumed = target_record.CheckRecord(str(tmp_path), 0.5)
    assert resumed.first_crossing == 4 and len(resumed.rows) == 4
    assert resumed.keep_first(2) == 2
    assert [row[0] for row in resumed.rows] == [2, 4] and not resumed.done
    assert target_record.read(str(tmp_path))["steps"].tolist() == [2, 4]
    assert [name for name in os.listdir(tmp_path) if name.startswith(".")] == []  # no temporary file left
    assert target_record.CheckRecord(str(tmp_path), 0.5).keep_first(3) == 2  # the file holds fewer: said so
    assert resumed.keep_first(0) == 0 and target_record.read(str(tmp_path)) is None  # a run that starts again


@pytest.mark.slow
def test_summary_reports_steps_epochs_and_time_to_target(tmp_path):
    config = dataclasses.replace(config_lib.smoke(), run_dir=str(tmp_path / "run"), target_accuracy=0.5, epochs=3,
                                 export=False, dynamics=False, grad_stats_every=0, bn_stats_every=0,
                                 precise_bn_samples=0)
    summary = train_lib.train(config)
    every = target_lib.interval(1293 // 64, 8)  # 20 steps per epoch: a check every 2 steps
    assert every == 2
    reached = target_lib.read(str(tmp_path / "run"))
    assert summary.steps_to_target == reached["step"] and summary.steps_to_target % every == 0
    assert summary.epochs_to_target == pytest.approx(summary.steps_to_target / 20)
    history = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    earlier = sum(r["epoch_time_s"] - r["instrument_time_s"] for r in history if r["epoch"] < reached["epoch"])
    assert summary.time_to_target_s == pytest.approx(earlier + reached["seconds_into_epoch"])
    assert 0 < summary.time_to_target_s < summary.train_time_s
    # The checks' time is counted as measuring, and left out of the epoch's training time.
    assert history[reached["epoch"]]["instrument_time_s"] > 0
    with open(os.path.join(config.run_dir, "summary.json")) as f:
        assert json.load(f)["steps_to_target"] == summary.steps_to_target
