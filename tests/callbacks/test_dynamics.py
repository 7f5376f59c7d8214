"""Tests of callbacks/dynamics.py: forgetting counts, per-class accuracy, PNGs and TensorBoard images."""

import glob
import json
import os

import keras
import numpy as np
import pytest
import sklearn.datasets
import sklearn.metrics
import tensorflow as tf

from callbacks.dynamics import LearningDynamics

CLASS_NAMES = ["zero", "one", "two", "T-shirt/top", "absent"]  # no example of "absent" in the subset


class ScriptedModel:
    """Stands in for a Keras model: returns, at look `look`, the prediction scripted for each example.

    The example's index is stored in pixel (0, 0, 0), so answers do not depend on how the subset is batched.
    """

    def __init__(self, predictions, confidences, num_classes):
        self.predictions, self.confidences, self.num_classes, self.look = predictions, confidences, num_classes, 0

    def predict_on_batch(self, x):
        index = np.rint(x[:, 0, 0, 0]).astype(int)
        probabilities = np.full((len(x), self.num_classes), 0.0, np.float32)
        rows = np.arange(len(x))
        probabilities[rows, self.predictions[self.look, index]] = self.confidences[self.look, index]
        return probabilities


def scripted_correctness(looks, n, rng):
    """A correctness matrix (looks, n) with always-right, never-right and flipping examples."""
    correct = rng.random((looks, n)) < 0.6
    correct[:, 0] = True  # learned at the first look, never forgotten
    correct[:, 1] = False  # never learned
    correct[:, 2] = [t % 2 == 0 for t in range(looks)]  # forgotten at every other look
    return correct


def brute_force(correct):
    """Forgetting events and first-learned look per example, with plain Python loops over looks."""
    looks, n = correct.shape
    events, first = [0] * n, [None] * n
    for i in range(n):
        for t in range(looks):
            if t > 0 and correct[t - 1, i] and not correct[t, i]:
                events[i] += 1
            if correct[t, i] and first[i] is None:
                first[i] = t
    return np.array(events), first


def read_events(log_dir):
    """{tag: [(step, plugin name, summary value), ...]} from every event file in log_dir."""
    tags = {}
    for path in sorted(glob.glob(os.path.join(log_dir, "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                tags.setdefault(value.tag, []).append((event.step, value.metadata.plugin_data.plugin_name, value))
    return tags


def assert_png(data):
    image = tf.image.decode_png(data).numpy()
    assert image.ndim == 3 and image.shape[0] > 0 and image.shape[1] > 0


@pytest.fixture(scope="module")
def scripted_run(tmp_path_factory):
    """Seven epoch-end looks of a scripted model over RGB images in an odd value range, 3 steps per epoch."""
    rng = np.random.default_rng(1)
    looks, n, steps_per_epoch = 7, 60, 3
    y = rng.integers(0, 4, n).astype(np.int32)
    correct = scripted_correctness(looks, n, rng)
    wrong = (y + rng.integers(1, len(CLASS_NAMES), (looks, n))) % len(CLASS_NAMES)
    predictions = np.where(correct, y, wrong)
    confidences = rng.uniform(0.3, 1.0, (looks, n))
    x = rng.uniform(-3.0, 500.0, (n, 6, 5, 3)).astype(np.float32)
    x[:, 0, 0, 0] = np.arange(n)
    model = ScriptedModel(predictions, confidences, len(CLASS_NAMES))
    out_dir, log_dir = tmp_path_factory.mktemp("out"), tmp_path_factory.mktemp("tb")
    callback = LearningDynamics(x, y, CLASS_NAMES, log_dir=str(log_dir), out_dir=str(out_dir), max_gallery=9)
    callback.set_model(model)
    callback.on_train_begin()
    epoch_logs = []
    for epoch in range(looks):
        model.look = epoch
        callback.on_epoch_begin(epoch)
        for batch in range(steps_per_epoch):
            callback.on_train_batch_end(batch)
        logs = {"loss": 1.0}
        callback.on_epoch_end(epoch, logs)
        epoch_logs.append(logs)
    callback.on_train_end()
    return dict(callback=callback, correct=correct, predictions=predictions, y=y, epoch_logs=epoch_logs,
                out_dir=out_dir, log_dir=log_dir, steps=[steps_per_epoch * (t + 1) for t in range(looks)])


def test_forgetting_counts_match_brute_force(scripted_run):
    events, first = brute_force(scripted_run["correct"])
    assert events[2] == 3 and first[1] is None  # the script exercises both special cases
    callback = scripted_run["callback"]
    np.testing.assert_array_equal(callback.forgetting_events, events)
    summary = json.loads((scripted_run["out_dir"] / "forgetting.json").read_text())
    assert summary["examples"]["forgetting_events"] == events.tolist()
    assert summary["examples"]["first_learned_look"] == first
    assert summary["examples"]["first_learned_step"] == [None if t is None else scripted_run["steps"][t] for t in first]
    assert summary["examples"]["final_correct"] == scripted_run["correct"][-1].tolist()
    assert summary["forgetting_events_total"] == events.sum()
    assert summary["num_never_learned"] == sum(t is None for t in first)
    assert summary["num_unforgettable"] == sum(t is not None and e == 0 for t, e in zip(first, events))
    assert summary["looks"]["step"] == scripted_run["steps"]
    # Epoch logs carry the running total: events up to and including each look.
    running = [brute_force(scripted_run["correct"][: t + 1])[0].sum() for t in range(len(scripted_run["steps"]))]
    assert [logs["dynamics/forgetting_events"] for logs in scripted_run["epoch_logs"]] == running
    accuracy = scripted_run["correct"].mean(axis=1)
    np.testing.assert_allclose([logs["dynamics/subset_accuracy"] for logs in scripted_run["epoch_logs"]], accuracy)


def test_class_accuracy_matches_sklearn(scripted_run):
    summary = json.loads((scripted_run["out_dir"] / "forgetting.json").read_text())
    y = scripted_run["y"]
    for look, predicted in enumerate(scripted_run["predictions"]):
        recall = sklearn.metrics.recall_score(y, predicted, labels=[0, 1, 2, 3], average=None, zero_division=0)
        for k in range(4):
            assert summary["class_accuracy"][CLASS_NAMES[k]][look] == pytest.approx(recall[k])
    assert summary["class_accuracy"]["absent"] == [None] * len(scripted_run["predictions"])
    assert summary["class_counts"] == {name: int((y == k).sum()) for k, name in enumerate(CLASS_NAMES)}


def test_tensorboard_has_class_scalars_and_images(scripted_run):
    tags = read_events(str(scripted_run["log_dir"]))
    y, steps = scripted_run["y"], scripted_run["steps"]
    scalars = tags["dynamics/class_accuracy/T-shirt_top"]
    assert [step for step, _, _ in scalars] == steps
    expected = [np.mean(predicted[y == 3] == 3) for predicted in scripted_run["predictions"]]
    np.testing.assert_allclose([tf.make_ndarray(value.tensor) for _, _, value in scalars], expected, rtol=1e-6)
    assert "dynamics/class_accuracy/absent" not in tags
    for tag in ("dynamics/gallery_forgotten", "dynamics/gallery_misclassified", "dynamics/class_accuracy_plot"):
        assert {plugin for _, plugin, _ in tags[tag]} == {"images"}
        ((step, _, value),) = tags[tag]
        assert step == steps[-1]
        assert_png(value.tensor.string_val[2])  # an image summary holds [width, height, PNG bytes]


def test_pngs_decode_to_images(scripted_run):
    for name in ("gallery_forgotten", "gallery_misclassified", "class_accuracy"):
        assert_png((scripted_run["out_dir"] / f"{name}.png").read_bytes())


def test_empty_galleries_on_grayscale_images(tmp_path):
    n = 12
    y = np.arange(n) % 3
    x = np.random.default_rng(0).uniform(0, 16, (n, 8, 8, 1)).astype(np.float32)
    x[:, 0, 0, 0] = np.arange(n)
    always_right = np.tile(y, (2, 1))
    model = ScriptedModel(always_right, np.ones((2, n)), 3)
    callback = LearningDynamics(x, y, out_dir=str(tmp_path))
    callback.set_model(model)
    for epoch in range(2):
        model.look = epoch
        callback.on_epoch_end(epoch, {})
    callback.on_train_end()
    summary = json.loads((tmp_path / "forgetting.json").read_text())
    assert summary["class_names"] == ["0", "1", "2"] and summary["num_unforgettable"] == n
    for name in ("gallery_forgotten", "gallery_misclassified", "class_accuracy"):
        assert_png((tmp_path / f"{name}.png").read_bytes())


def digits_subset(n):
    digits = sklearn.datasets.load_digits()
    x = digits.images[..., np.newaxis].astype(np.float32)  # raw pixels 0..16
    return x[:n], digits.target[:n].astype(np.int32)


def tiny_model():
    inputs = keras.Input((8, 8, 1))
    hidden = keras.layers.Rescaling(1 / 16)(inputs)
    hidden = keras.layers.Flatten()(hidden)
    hidden = keras.layers.Dense(32, activation="relu")(hidden)
    hidden = keras.layers.BatchNormalization()(hidden)  # differs between training and inference mode
    outputs = keras.layers.Dense(10, activation="softmax", name="probabilities")(hidden)
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def test_end_to_end_on_digits_matches_independent_predictions(tmp_path):
    x, y = digits_subset(320)
    model = tiny_model()
    callback = LearningDynamics(x[:200], y[:200], log_dir=str(tmp_path / "tb"), out_dir=str(tmp_path / "out"))
    # An independent record of correctness at each epoch end, with model.predict.
    looks = []
    record = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: looks.append(model.predict(x[:200], verbose=0).argmax(axis=1) == y[:200])
    )
    history = model.fit(x, y, batch_size=64, epochs=4, callbacks=[callback, record], verbose=0)
    correct = np.array(looks)
    events, first = brute_force(correct)
    np.testing.assert_array_equal(callback.forgetting_events, events)
    assert history.history["dynamics/forgetting_events"][-1] == events.sum()
    np.testing.assert_allclose(history.history["dynamics/subset_accuracy"], correct.mean(axis=1))
    summary = json.loads((tmp_path / "out" / "forgetting.json").read_text())
    assert summary["looks"]["step"] == [5, 10, 15, 20]  # 320 examples / 64 per step
    assert summary["examples"]["first_learned_look"] == first
    final = model.predict(x[:200], verbose=0).argmax(axis=1)
    recall = sklearn.metrics.recall_score(y[:200], final, labels=range(10), average=None)
    np.testing.assert_allclose([summary["class_accuracy"][str(k)][-1] for k in range(10)], recall)
    tags = read_events(str(tmp_path / "tb"))
    assert {"dynamics/gallery_forgotten", "dynamics/gallery_misclassified", "dynamics/class_accuracy_plot"} <= set(tags)
    assert len(tags["dynamics/class_accuracy/7"]) == 4
    for name in ("gallery_forgotten", "gallery_misclassified", "class_accuracy"):
        assert_png((tmp_path / "out" / f"{name}.png").read_bytes())


@pytest.mark.slow
def test_every_n_steps_looks_at_multiples_and_at_the_end():
    x, y = digits_subset(300)
    model = tiny_model()
    callback = LearningDynamics(x[:100], y[:100], every_n_steps=4)
    history = model.fit(x, y, batch_size=64, epochs=2, callbacks=[callback], verbose=0)
    # 300 examples at 64 per step: 5 steps per epoch (the last one of 44), 10 in all.
    assert callback.look_steps == [4, 8, 10] and callback.look_epochs == [0, 1, 1]
    assert history.history["dynamics/subset_accuracy"] == callback.subset_accuracy[:2]
    # A second fit() continues the step count from the optimizer and keeps accumulating.
    model.fit(x, y, batch_size=64, epochs=1, callbacks=[callback], verbose=0)
    assert callback.look_steps == [4, 8, 10, 12, 15]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(x=np.zeros((3, 8, 8, 1)), y=np.zeros(2, np.int32)), "x, y"),
        (dict(x=np.zeros((3, 8, 8, 1)), y=np.zeros(3, np.float32)), "y:"),
        (dict(x=np.zeros((3, 8, 8, 1)), y=np.zeros(3, np.int32), every_n_steps=0), "every_n_steps"),
        (dict(x=np.zeros((3, 8, 8, 1)), y=np.array([0, 1, 5]), class_names=["a", "b"]), "class_names"),
        (dict(x=np.zeros((3, 8, 8, 1)), y=np.zeros(3, np.int32), max_gallery=0), "max_gallery"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LearningDynamics(**kwargs)


def test_class_names_must_match_model_outputs():
    x, y = digits_subset(20)
    callback = LearningDynamics(x, y % 3, class_names=["a", "b", "c"])
    callback.set_model(tiny_model())
    with pytest.raises(ValueError, match="10 outputs"):
        callback.look()
