"""Tests of callbacks.gradient_stats against brute-force gradients computed one example or one batch at a time."""

import csv
import glob
import json
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import callbacks.shared_traces as shared_traces
from callbacks import epoch_logs, gradient_stats, noise_estimates


def _softmax_regression(features, classes):
    inputs = keras.Input((features,))
    normal = keras.initializers.RandomNormal(stddev=1.0)  # far from the optimum: B_simple ~ 20 for W and b
    dense = keras.layers.Dense(classes, activation="softmax", kernel_initializer=normal, bias_initializer=normal)
    outputs = dense(inputs)
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
    return model


def _softmax_data(examples, features=10, classes=3, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(examples, features)).astype(np.float32)
    teacher = rng.normal(size=(features, classes))
    y = np.argmax(x @ teacher + rng.gumbel(size=(examples, classes)), axis=1).astype(np.int32)
    return x, y


def _softmax_per_example_gradients(model, x, y):
    """Analytic cross-entropy gradients, one example at a time: dW = x (p - e_y)^T, db = p - e_y."""
    kernel, bias = (v.numpy().astype(np.float64) for v in model.trainable_variables)
    kernels, biases = [], []
    for xi, yi in zip(x.astype(np.float64), y):
        logits = xi @ kernel + bias
        p = np.exp(logits - logits.max())
        p /= p.sum()
        p[yi] -= 1.0
        kernels.append(np.outer(xi, p))
        biases.append(p)
    kernel_path, bias_path = (v.path for v in model.trainable_variables)
    return {kernel_path: np.array(kernels), bias_path: np.array(biases)}


def _tape_per_example_gradients(model, loss_fn, x, y):
    """Per-example gradients, one example at a time with a plain Keras call and tape (no micro-batches)."""
    per_example = {v.path: [] for v in model.trainable_variables}
    for i in range(len(x)):
        with tf.GradientTape() as tape:
            loss = loss_fn(y[i : i + 1], model(x[i : i + 1]))
        for v, g in zip(model.trainable_variables, tape.gradient(loss, model.trainable_variables)):
            per_example[v.path].append(g.numpy())
    return {k: np.array(v, np.float64) for k, v in per_example.items()}


def _brute_force(per_example, ddof):
    """|G|^2 and tr(Sigma) per variable and in total from per-example gradients {path: (N, ...)}."""
    out = {}
    for path, g in per_example.items():
        g = g.reshape(len(g), -1)
        out[path] = (np.sum(g.mean(axis=0) ** 2), np.sum(g.var(axis=0, ddof=ddof)))
    out["total"] = tuple(sum(v[i] for v in out.values()) for i in (0, 1))
    return out


def test_per_example_estimates_match_softmax_regression_brute_force():
    # Two models of one architecture: the second reuses the first's traced function (callbacks/shared_traces.py, as
    # a sweep's next run does) and must measure its own weights.
    x, y = _softmax_data(1024)
    norms = []
    first, second = _softmax_regression(10, 3), _softmax_regression(10, 3)
    second.set_weights([3.0 * w for w in first.get_weights()])
    for model in (first, second):
        truth = _brute_force(_softmax_per_example_gradients(model, x, y), ddof=1)
        # b = 1 on all N examples: tr(Sigma) is the sample covariance trace, and |G|^2 is |mean gradient|^2 debiased
        # by tr(Sigma) / N, which is below 3% of it here, so it matches the mean gradient of the N examples within 5%.
        stats = gradient_stats.estimate(model, x, y, micro_batch_size=1)
        norm_sq, trace = truth["total"]
        assert trace / len(x) < 0.03 * norm_sq
        assert stats["grad/trace_cov"] == pytest.approx(trace, rel=1e-3)
        assert stats["grad/norm_sq"] == pytest.approx(norm_sq, rel=0.05)
        assert stats["grad/noise_scale"] == pytest.approx(trace / norm_sq, rel=0.05)
        assert stats["grad/batch_std"] == pytest.approx(math.sqrt(trace / len(x)), rel=1e-3)
        for path, values in stats["variables"].items():
            mean_sq, variance = truth[path]
            assert variance / len(x) < 0.03 * mean_sq
            assert values["trace_cov"] == pytest.approx(variance, rel=1e-3)
            assert values["norm_sq"] == pytest.approx(mean_sq, rel=0.05)
            assert values["noise_scale"] == pytest.approx(variance / mean_sq, rel=0.05)
        norms.append((norm_sq, trace))
    assert abs(norms[0][1] - norms[1][1]) > 0.1 * norms[0][1]  # the traces differ far beyond the 1e-3 checked
    assert _traced_functions(model) == 1


def test_micro_batch_estimates_match_softmax_regression_brute_force():
    # The N examples are the population: G is their mean gradient and Sigma their covariance. Micro-batches of 4
    # (M = 2048) estimate tr(Sigma) with 2047 degrees of freedom; |G|^2 differs from |G|^2 of the population by the
    # debiasing term tr(Sigma) / N, below 1% here.
    x, y = _softmax_data(8192, seed=2)
    model = _softmax_regression(10, 3)
    truth = _brute_force(_softmax_per_example_gradients(model, x, y), ddof=0)
    stats = gradient_stats.estimate(model, x, y, micro_batch_size=4, batch_size=32)
    norm_sq, trace = truth["total"]
    assert stats["grad/trace_cov"] == pytest.approx(trace, rel=0.05)
    assert stats["grad/norm_sq"] == pytest.approx(norm_sq, rel=0.05)
    assert stats["grad/noise_scale"] == pytest.approx(trace / norm_sq, rel=0.05)
    assert stats["grad/snr"] == pytest.approx(norm_sq / (trace / 32), rel=0.05)
    for path, values in stats["variables"].items():
        assert values["trace_cov"] == pytest.approx(truth[path][1], rel=0.05)
        assert values["norm_sq"] == pytest.approx(truth[path][0], rel=0.05)


def test_default_measurements_are_unbiased_and_their_intervals_cover_the_truth():
    # Frozen weights (lr 0) and fresh examples drawn with replacement from a population of 4096: a fixed size at
    # B = 32 (32 micro-batches of 32) gives tr(Sigma) and |G|^2 whose means over 40 measurements match the
    # population's (computed one example at a time), and whose 95% intervals hold it in most measurements.
    x, y = _softmax_data(4096, seed=11)
    model = _softmax_regression(10, 3)
    model.compile(keras.optimizers.SGD(0.0), "sparse_categorical_crossentropy")  # lr 0: the weights stay put
    truth = _brute_force(_softmax_per_example_gradients(model, x, y), ddof=0)
    index = np.random.default_rng(12).integers(0, len(x), size=40 * 1024)
    dataset = tf.data.Dataset.from_tensor_slices((x[index], y[index])).batch(32)
    callback = gradient_stats.GradientStatistics(dataset, every_n_steps=1, batch_size=32, micro_batches=32)
    assert callback.sizes(1, 0) == (0, 32) and callback.micro_batch_size == 32
    model.fit(x[:39 * 32], y[:39 * 32], batch_size=32, callbacks=[callback], verbose=0)
    assert len(callback.history) == 40
    norm_sq, trace = truth["total"]
    expected = {"trace_cov": trace, "norm_sq": norm_sq, "noise_scale": trace / norm_sq}
    for key, value in expected.items():
        values = [record[f"grad/{key}"] for record in callback.history]
        assert np.mean(values) == pytest.approx(value, rel=0.05), key
        inside = [r[f"grad/{key}_lo"] <= value <= r[f"grad/{key}_hi"] for r in callback.history]
        assert 0.85 <= np.mean(inside), key
    assert not any(record["grad/noise_scale_is_lower_bound"] for record in callback.history)


def test_per_example_estimates_match_linear_regression_gradient_tape_loop():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(512, 6)).astype(np.float32)
    y = (x @ rng.normal(size=(6, 2)) + 0.3 * rng.normal(size=(512, 2))).astype(np.float32)
    inputs = keras.Input((6,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    model.compile("sgd", "mse")
    truth = _brute_force(_tape_per_example_gradients(model, keras.losses.mean_squared_error, x, y), ddof=1)
    stats = gradient_stats.estimate(model, x, y, micro_batch_size=1)
    assert truth["total"][1] / len(x) < 0.03 * truth["total"][0]
    assert stats["grad/trace_cov"] == pytest.approx(truth["total"][1], rel=1e-3)
    assert stats["grad/norm_sq"] == pytest.approx(truth["total"][0], rel=0.05)


def test_per_example_estimates_match_cnn_gradient_tape_loop():
    # Strided, dilated, "same" and "valid" convolutions: the per-micro-batch filter gradients must equal gradients
    # taken one example at a time.
    inputs = keras.Input((9, 9, 2))
    x = keras.layers.Conv2D(4, 3, strides=2, padding="same", activation="relu")(inputs)
    x = keras.layers.Conv2D(3, (3, 2), dilation_rate=2, activation="relu")(x)
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(keras.layers.Flatten()(x)))
    model.compile("sgd", "sparse_categorical_crossentropy")
    rng = np.random.default_rng(6)
    x = rng.normal(size=(48, 9, 9, 2)).astype(np.float32)
    y = rng.integers(0, 3, size=48).astype(np.int32)
    truth = _brute_force(
        _tape_per_example_gradients(model, keras.losses.sparse_categorical_crossentropy, x, y), ddof=1
    )
    stats = gradient_stats.estimate(model, x, y, micro_batch_size=1)
    for path, values in stats["variables"].items():
        assert values["trace_cov"] == pytest.approx(truth[path][1], rel=1e-3), path


def test_dropout_masks_differ_between_micro_batches():
    # Identical examples: any spread of the micro-batch gradients comes from dropout masks.
    inputs = keras.Input((6,))
    hidden = keras.layers.Dropout(0.5)(keras.layers.Dense(16, activation="relu")(inputs))
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(hidden))
    model.compile("sgd", "sparse_categorical_crossentropy")
    seed_states = [v.numpy() for v in model.non_trainable_variables]
    x, y = np.ones((32, 6), np.float32), np.zeros(32, np.int32)
    assert gradient_stats.estimate(model, x, y, micro_batch_size=1)["grad/trace_cov"] > 0.01  # 0 if masks repeat
    for value, v in zip(seed_states, model.non_trainable_variables):
        np.testing.assert_array_equal(value, v.numpy())


def _small_cnn(batch_norm=False, dropout=0.0):
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    if batch_norm:
        x = keras.layers.BatchNormalization(momentum=0.5)(x)
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    if dropout:
        x = keras.layers.Dropout(dropout)(x)
    return keras.Model(inputs, keras.layers.Dense(4, activation="softmax")(x))


def _image_data(examples, seed=4):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, size=(examples, 8, 8, 1)).astype(np.float32)
    y = (2 * (x[:, :4].mean(axis=(1, 2, 3)) > 0.5) + (x[:, :, :4].mean(axis=(1, 2, 3)) > 0.5)).astype(np.int32)
    return x, y


def _traced_functions(model) -> int:
    """How many micro-batch gradient functions the process holds for `model`'s architecture (one per structure of the
    data; callbacks/shared_traces.py), for every micro-batch size and count."""
    key = shared_traces.architecture_key(model)
    return sum(name.startswith("micro_batch_gradients ") and architecture == key
               for name, architecture in shared_traces._SHARED)


@pytest.mark.parametrize("micro_batches, micro_batch_size, measurements", [(64, 4, 16), (4, 16, 64)])
def test_mini_batch_gradient_std_matches_many_real_mini_batches(micro_batches, micro_batch_size, measurements):
    x, y = _image_data(1024)
    model = _small_cnn()
    model.compile(keras.optimizers.SGD(0.0), "sparse_categorical_crossentropy")  # lr 0: the weights stay put
    rng = np.random.default_rng(5)

    @tf.function(reduce_retracing=True)
    def flat_gradient(xb, yb):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(yb, model(xb, training=True)))
        return tf.concat([tf.reshape(g, [-1]) for g in tape.gradient(loss, model.trainable_variables)], 0)

    measured = {}
    for batch in (8, 32, 128):  # real mini-batches drawn with replacement, 200 at each size
        draws = [flat_gradient(x[i], y[i]).numpy() for i in rng.integers(0, len(x), size=(200, batch))]
        measured[batch] = math.sqrt(np.sum(np.var(np.array(draws, np.float64), axis=0, ddof=1)))
    # The callback's own batches, also drawn with replacement.
    index = rng.integers(0, len(x), size=measurements * micro_batches * micro_batch_size)
    dataset = tf.data.Dataset.from_tensor_slices((x[index], y[index])).batch(micro_batches * micro_batch_size)
    callback = gradient_stats.GradientStatistics(
        dataset, every_n_steps=1, micro_batch_size=micro_batch_size, micro_batches=micro_batches, batch_size=32
    )
    steps = index[: 32 * (measurements - 1)]
    model.fit(x[steps], y[steps], batch_size=32, callbacks=[callback], verbose=0)
    assert len(callback.history) == measurements  # step 0 and one per step
    assert _traced_functions(model) == 1  # one for every number and size of micro-batches
    trace = np.mean([record["grad/trace_cov"] for record in callback.history])
    for batch, std in measured.items():
        assert math.sqrt(trace / batch) == pytest.approx(std, rel=0.15), batch
    # The measurements pooled (noise_estimates.pool): the same standard deviation.
    pooled = noise_estimates.pool(callback.history)
    assert pooled["measurements"] == measurements and pooled["batch_std"] == pytest.approx(measured[32], rel=0.15)


def _fit_bn_model(callbacks):
    keras.utils.set_random_seed(7)
    model = _small_cnn(batch_norm=True, dropout=0.25)
    optimizer = keras.optimizers.SGD(0.05, momentum=0.9)
    model.compile(optimizer, "sparse_categorical_crossentropy", metrics=["accuracy"])
    x, y = _image_data(192)
    train = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(192, seed=1).batch(16, drop_remainder=True)
    model.fit(train, epochs=2, callbacks=callbacks, shuffle=False, verbose=0)
    return model


def test_training_is_unchanged_by_measuring_every_step():
    x, y = _image_data(192, seed=8)
    own = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(192, seed=2).batch(16, drop_remainder=True)
    callback = gradient_stats.GradientStatistics(own, every_n_steps=1, micro_batch_size=4, micro_batches=8)
    measured, plain = _fit_bn_model([callback]), _fit_bn_model([])
    assert len(callback.history) == 25
    assert any("moving_variance" in v.path for v in plain.non_trainable_variables)
    assert any("seed_generator" in v.path for v in plain.non_trainable_variables)
    state = lambda model: model.variables + model.optimizer.variables  # noqa: E731
    for a, b in zip(state(measured), state(plain)):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    assert int(measured.optimizer.iterations) == int(plain.optimizer.iterations) == 24


def test_keys_reach_later_callbacks_csv_jsonl_and_tensorboard(tmp_path):
    x, y = _image_data(128, seed=9)
    model = _small_cnn()
    model.compile(keras.optimizers.SGD(0.05), "sparse_categorical_crossentropy")
    own = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(128, seed=3).batch(16, drop_remainder=True)
    callback = gradient_stats.GradientStatistics(
        own, every_n_steps=3, micro_batches=4, window=0.5, log_dir=str(tmp_path / "tb"),
        out_path=str(tmp_path / "grad.jsonl"))
    seen = []  # the batch logs a callback listed after GradientStatistics receives, in order
    later = keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: seen.append(dict(logs)))
    stop = keras.callbacks.EarlyStopping(monitor="grad/trace_cov_smoothed", mode="min", patience=10)
    csv_logger = keras.callbacks.CSVLogger(str(tmp_path / "log.csv"))
    model.fit(x, y, batch_size=16, epochs=2, callbacks=[callback, later, stop, csv_logger], verbose=0)

    keys = [f"grad/{key}{suffix}" for key in gradient_stats.KEYS for suffix in gradient_stats.SUFFIXES]
    measured_steps = [record["step"] for record in callback.history]
    assert measured_steps == [0, 3, 6, 9, 12, 15, 16]  # step 0: before the first update; 16: the last step
    assert [i + 1 for i, logs in enumerate(seen) if "grad/trace_cov" in logs] == measured_steps[1:-1]
    assert seen[14]["grad/trace_cov"] == callback.history[-2]["grad/trace_cov"] and seen[14]["grad/step"] == 15
    # Smoothed at step 15 with window 0.5: the measurements at steps >= 7.5 (9, 12, 15), pooled.
    last = callback.history[-2]
    assert (last["smoothed_first_step"], last["smoothed_measurements"]) == (9, 3)
    pooled = noise_estimates.pool(callback.history[3:6])
    for key in gradient_stats.KEYS:
        assert last[f"grad/{key}_smoothed"] == pytest.approx(pooled[key], rel=1e-12, nan_ok=True)
    trace = np.mean([record["grad/trace_cov"] for record in callback.history[3:6]])
    assert last["grad/trace_cov_smoothed"] == pytest.approx(trace, rel=1e-9)
    assert last["grad/batch_std_smoothed"] == pytest.approx(math.sqrt(trace / 16), rel=1e-9)
    assert math.isfinite(stop.best)
    with open(tmp_path / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and set(keys) <= set(rows[0])
    assert float(rows[1]["grad/trace_cov_smoothed"]) == pytest.approx(last["grad/trace_cov_smoothed"])
    assert float(rows[1]["grad/step"]) == 15
    lines = (tmp_path / "grad.jsonl").read_text().splitlines()
    assert len(lines) == 7
    records = [json.loads(line) for line in lines]
    assert records[-1]["step"] == 16 and set(keys) <= set(records[-1])
    # The first measurement pools nothing else: no smoothed keys.
    assert not any(key.endswith("_smoothed") for key in records[0])
    for record in records:
        assert {"epoch", "batch_size", "micro_batch_size", "micro_batches", "grad/noise_scale_is_lower_bound",
                "notes"} <= set(record)
        assert ("grad/noise_scale_smoothed_is_lower_bound" in record) == (record["step"] >= 6)  # pools >= 2
        assert (record["micro_batch_size"], record["micro_batches"]) == (16, 4)
    # Per-variable values at every histogram_every-th (10th) measurement, the first included.
    assert [("variables" in record) for record in records] == [True] + [False] * 6
    assert set(records[0]["variables"]) == {v.path for v in model.trainable_variables}
    tags = set()
    for path in glob.glob(str(tmp_path / "tb" / "gradients" / "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            tags.update(value.tag for value in event.summary.value)
    kernel = model.trainable_variables[0].path
    assert {"grad/trace_cov", "grad/trace_cov_lo", "grad/trace_cov_smoothed_hi", f"grad_mean/{kernel}",
            f"grad_std/{kernel}"} <= tags
    # A value that no measurement determined is never written (no 0 or NaN in its place).
    for key in ("grad/noise_scale", "grad/noise_scale_smoothed", "grad/norm_sq"):
        assert (key in tags) == any(record.get(key) is not None for record in records), key
    assert f"grad_variables/{kernel}/snr" in tags
    assert _traced_functions(model) == 1  # one for every number of micro-batches


def test_epochs_without_a_new_measurement_report_none(tmp_path):
    # 4 steps per epoch (steps 1-4, 5-8, 9-12, 13-16) and a measurement at steps 0, 6 and 12: epoch 3 has none.
    x, y = _image_data(64, seed=14)
    model = _small_cnn()
    model.compile(keras.optimizers.SGD(0.05), "sparse_categorical_crossentropy")
    own = tf.data.Dataset.from_tensor_slices((x, y)).batch(16, drop_remainder=True)
    callback = gradient_stats.GradientStatistics(own, every_n_steps=6, micro_batches=4)
    epochs = []  # what TensorBoard and the console would get: the epoch logs after DropUnmeasured
    shown = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: epochs.append(dict(logs)))
    csv_logger = keras.callbacks.CSVLogger(str(tmp_path / "log.csv"))
    model.fit(x, y, batch_size=16, epochs=4, verbose=0,
              callbacks=[callback, csv_logger, epoch_logs.DropUnmeasured(), shown])
    assert [record["step"] for record in callback.history] == [0, 6, 12, 16]  # 16: the end of training
    assert [logs.get("grad/step") for logs in epochs] == [0, 6, 12, None]
    assert not any(key.startswith("grad/") for key in epochs[3]) and "loss" in epochs[3]
    assert epochs[2]["grad/trace_cov"] == callback.history[2]["grad/trace_cov"]
    with open(tmp_path / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["grad/step"] for row in rows] == ["0.0", "6.0", "12.0", "nan"]
    assert all(rows[3][key] == "nan" for key in gradient_stats.EPOCH_KEYS)


def test_rejects_bad_arguments():
    examples = tf.data.Dataset.from_tensor_slices((np.zeros((8, 3), np.float32), np.zeros(8, np.int32)))
    dataset = examples.batch(4, drop_remainder=True)
    with pytest.raises(ValueError, match="batch_size"):
        gradient_stats.GradientStatistics(examples.batch(4))
    with pytest.raises(ValueError, match="every_n_steps"):
        gradient_stats.GradientStatistics(dataset, every_n_steps=0)
    with pytest.raises(ValueError, match="micro_batch_size: needs at least 3 micro-batches"):
        gradient_stats.GradientStatistics(dataset, micro_batch_size=4, micro_batches=2)
    with pytest.raises(ValueError, match="window"):
        gradient_stats.GradientStatistics(dataset, window=0.0)
    with pytest.raises(ValueError, match="population"):
        gradient_stats.GradientStatistics(dataset, population=0)


def test_steps_per_execution_measures_once_per_crossed_interval():
    x, y = _image_data(160, seed=13)
    model = _small_cnn()
    model.compile(keras.optimizers.SGD(0.05), "sparse_categorical_crossentropy", steps_per_execution=4)
    own = tf.data.Dataset.from_tensor_slices((x, y)).batch(16, drop_remainder=True)
    callback = gradient_stats.GradientStatistics(own, every_n_steps=3, micro_batches=4)
    model.fit(x, y, batch_size=16, epochs=1, callbacks=[callback], verbose=0)  # 10 steps: executions end at 4, 8, 10
    assert [record["step"] for record in callback.history] == [0, 4, 8, 10]
