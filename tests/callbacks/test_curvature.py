"""callbacks.Curvature against the exact Hessian of small models on the digits, and its side effects on training.

The truth: the Hessian of the mean cross-entropy over the same examples, formed as the Jacobian of the gradient with
respect to one flat parameter vector through `Model.stateless_call` in inference mode (not the callback's
StatelessScope, chunks or double-backprop product), and numpy.linalg.eigvalsh of it.
"""

import json
import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from sklearn.datasets import load_digits

from callbacks import Curvature, hessian
from callbacks.curvature import TOLERANCE, TRACE_BLOCK, TRACE_TOLERANCE

EXAMPLES = 200  # K: examples of the measured loss
CASES = [(kind, stage) for kind in ("mlp", "cnn", "mlp_bn") for stage in ("init", "trained")]


def _digits(kind):
    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    return (x.reshape(-1, 8, 8, 1) if kind == "cnn" else x), digits.target.astype("int32")


def _model(kind, dropout=0.0):
    """An MLP (610 parameters), a tiny CNN (410), or the MLP with BatchNormalization after its hidden layer."""
    if kind == "cnn":
        inputs = keras.Input((8, 8, 1))
        hidden = keras.layers.MaxPooling2D(2)(keras.layers.Conv2D(4, 3, activation="relu")(inputs))
        hidden = keras.layers.Flatten()(hidden)
    else:
        inputs = keras.Input((64,))
        hidden = keras.layers.Dense(8)(inputs)
        if kind == "mlp_bn":
            hidden = keras.layers.BatchNormalization()(hidden)
        hidden = keras.layers.Activation("relu")(hidden)
    if dropout:
        hidden = keras.layers.Dropout(dropout)(hidden)
    model = keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(hidden))
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9), "sparse_categorical_crossentropy")
    return model


def exact_hessian(model, x, y):
    """d^2/d theta^2 of the mean cross-entropy of (x, y), inference mode, as a float64 (P, P) array."""
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    sizes = [int(np.prod(v.shape)) for v in trainable]
    theta = tf.concat([tf.reshape(v, [-1]) for v in trainable], 0)
    with tf.GradientTape() as outer:
        outer.watch(theta)
        with tf.GradientTape() as inner:
            inner.watch(theta)
            parts = [tf.reshape(p, v.shape) for p, v in zip(tf.split(theta, sizes), trainable)]
            predictions, _ = model.stateless_call(parts, non_trainable, x, training=False)
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, predictions))
        gradient = inner.gradient(loss, theta)
    matrix = outer.jacobian(gradient, theta).numpy().astype(np.float64)
    return (matrix + matrix.T) / 2


@pytest.fixture(scope="module")
def measured():
    """Per case: the exact Hessian, the callback's products H v of three random v, and its measurement's record.

    "trained": after 30 SGD steps (batch 32, lr 0.1, momentum 0.9) on examples outside the measured ones, which
    also moves the BN model's moving statistics away from their initial values.
    """
    results = {}
    for kind in ("mlp", "cnn", "mlp_bn"):
        keras.utils.set_random_seed(0)
        x, y = _digits(kind)
        model = _model(kind)
        for stage in ("init", "trained"):
            if stage == "trained":
                model.fit(x[EXAMPLES:], y[EXAMPLES:], batch_size=32, steps_per_epoch=30, epochs=1, verbose=0)
            # Two chunks of the product (128 + 72), so that their weighting is checked too.
            callback = Curvature(x, y, examples=EXAMPLES, batch_size=128)
            callback.set_model(model)
            callback.on_train_begin()
            record = callback.measure()
            vectors = np.random.default_rng(1).standard_normal((3, callback._products.dimension))
            products = [callback._products(vector) for vector in vectors]
            results[kind, stage] = exact_hessian(model, x[:EXAMPLES], y[:EXAMPLES]), (vectors, products), record
    return results
    return results


@pytest.mark.parametrize("case", CASES, ids=["-".join(case) for case in CASES])
def test_top_eigenvalue_within_1_percent_of_exact(measured, case):
    matrix, _, record = measured[case]
    truth = np.linalg.eigvalsh(matrix)[-1]
    assert record["curvature/max_eigenvalue"] == pytest.approx(truth, rel=0.01)
    assert record["curvature/max_eigenvalue_converged"]
    assert record["curvature/max_eigenvalue_residual"] <= TOLERANCE * abs(record["curvature/max_eigenvalue"])
    # Lanczos' products plus one per probe (whole blocks of TRACE_BLOCK, at most 32); far fewer than the P products
    # of forming H.
    probes = record["curvature/trace_probes"]
    assert probes % TRACE_BLOCK == 0 and TRACE_BLOCK <= probes <= 32
    assert probes < record["curvature/hessian_vector_products"] < probes + 100


@pytest.mark.parametrize("case", CASES, ids=["-".join(case) for case in CASES])
def test_hessian_vector_products_equal_exact(measured, case):
    matrix, (vectors, products), _ = measured[case]
    for vector, product in zip(vectors, products):
        np.testing.assert_allclose(product, matrix @ vector, rtol=0,
                                   atol=1e-5 * np.abs(matrix @ vector).max())


def test_models_of_one_architecture_share_one_trace():
    """A second model of the architecture (new weights, new layer names, as in the next run of a sweep) reuses the
    first one's traced product: its callback files no tracing, and its products are H v at its own weights (exact
    Hessian). A model of the same layers compiled with another loss (the sum over the K examples, in one chunk: K
    times the Hessian of the mean) gets a product of its own. Dropout 0.125 makes the architecture new to this process."""
    keras.utils.set_random_seed(7)
    x, y = _digits("mlp")
    callbacks = []
    for model in (_model("mlp", dropout=0.125), _model("mlp", dropout=0.125)):
        callback = Curvature(x, y, examples=EXAMPLES, batch_size=128)
        callback.set_model(model)
        callback.on_train_begin()
        first = callback.measure()
        second = callback.measure()
        callbacks.append(callback)
    first_phases, second_phases = (c.phase_seconds for c in callbacks)
    assert first_phases["tracing"] > 0 and first_phases["execution"] > 0
    assert second_phases.get("tracing", 0.0) == 0.0 and second_phases["execution"] > 0
    # Every product's time is filed under a phase; the rest of the two measurements is "other".
    total = first["curvature/seconds"] + second["curvature/seconds"]
    assert sum(second_phases.values()) == pytest.approx(callbacks[1].seconds) and callbacks[1].seconds >= total
    vector = np.random.default_rng(2).standard_normal(callbacks[1]._products.dimension)
    model = callbacks[1].model
    truth = exact_hessian(model, x[:EXAMPLES], y[:EXAMPLES]) @ vector
    other = exact_hessian(callbacks[0].model, x[:EXAMPLES], y[:EXAMPLES]) @ vector
    assert np.linalg.norm(other - truth) > 0.5 * np.linalg.norm(truth)  # the two models' weights differ
    np.testing.assert_allclose(callbacks[1]._products(vector), truth, rtol=0, atol=1e-5 * np.abs(truth).max())
    summed = _model("mlp", dropout=0.125)
    summed.set_weights(model.get_weights())
    summed.compile("sgd", keras.losses.SparseCategoricalCrossentropy(reduction="sum"))
    products = hessian.HessianVectorProducts(summed, x[:EXAMPLES], y[:EXAMPLES], EXAMPLES)  # one chunk: the sum
    np.testing.assert_allclose(products(vector), EXAMPLES * truth, rtol=0, atol=1e-5 * EXAMPLES * np.abs(truth).max())


@pytest.mark.slow
def test_trace_interval_covers_exact_trace(measured):
    """The 95% interval covers tr(H) in >= 90% of 400 repeated estimates per trained case (32 Rademacher probes each),
    here from the quadratic forms of the exact H (the instrument's products equal it, test above; 400 x 32 products
    per case would take minutes); and the instrument's own measurements, one per case, cover it in 5 of 6 or more.
    The forms are skewed (skewness 0.8-1.3 here), so the t interval covers 93-95% (2000 repeats per case); at 93%,
    fewer than 360 of 400 has probability ~1%. A biased estimate, or the standard deviation of the forms in place
    of their standard error, fails."""
    covered_by_measurements = 0
    for case, (matrix, _, record) in measured.items():
        truth = np.trace(matrix)
        covered_by_measurements += record["curvature/trace_lo"] <= truth <= record["curvature/trace_hi"]
        if case[1] != "trained":  # the trained cases have the most skewed forms (see the docstring)
            continue
        probes = (np.random.default_rng(5).integers(0, 2, (400, 32, len(matrix)), dtype=np.int8) * 2 - 1)
        probes = probes.astype(np.float32)
        forms = np.einsum("rpi,rpi->rp", probes @ matrix.astype(np.float32), probes).astype(np.float64)
        intervals = [hessian.trace_interval(row) for row in forms]
        covered = sum(interval["lo"] <= truth <= interval["hi"] for interval in intervals)
        assert covered >= 360, f"{case}: the interval covered tr(H) = {truth:.3f} in {covered} of 400 estimates"
    assert covered_by_measurements >= 5


@pytest.mark.slow
def test_sequential_trace_rule_covers_exact_trace(measured):
    """The callback's default rule (a Lanczos run for lambda_max, then probes deflated by its vectors in blocks of
    TRACE_BLOCK until the interval is within TRACE_TOLERANCE of the estimate, at most 32) stops early and still covers
    tr(H) in >= 90% of 1000 estimates per case (here 91.7-94.9%, with 8.4-14.5 probes on average), from the exact H's
    products. Stopping at the first narrow interval costs coverage: blocks of 8 without deflation covered the trained
    MLP in 88.8%; deflation leaves less variance, so the rule rarely stops on a lucky block."""
    for case, (matrix, _, _) in measured.items():
        truth, rng = np.trace(matrix), np.random.default_rng(5)
        estimates = []
        for _ in range(1000):
            top = hessian.top_eigenvalue(lambda z: matrix @ z, len(matrix), rng, TOLERANCE, 100)  # noqa: B023
            estimates.append(hessian.hutchinson_trace(lambda z: matrix @ z, len(matrix), rng, 32,  # noqa: B023
                                                      relative_half_width=TRACE_TOLERANCE, min_probes=TRACE_BLOCK,
                                                      deflation=(top["basis"], top["restricted_trace"])))
        covered = sum(e["lo"] <= truth <= e["hi"] for e in estimates)
        assert covered >= 900, f"{case}: the sequential interval covered tr(H) = {truth:.3f} in {covered} of 1000"
        assert np.mean([e["probes"] for e in estimates]) < 20


def test_deflation_by_the_lanczos_basis_splits_the_trace_exactly_and_lowers_the_variance(measured):
    """Against the exact H: the Lanczos vectors are orthonormal, tr(Q^T H Q) is the sum of the alphas, and it plus
    tr((I - P) H (I - P)) (what the deflated probes' mean estimates: E[z^T A z] = tr(A) for Rademacher z) is tr(H);
    on every trained case the deflated probes' variance is below the plain probes'."""
    for case, (matrix, _, _) in measured.items():
        rng = np.random.default_rng(11)
        top = hessian.top_eigenvalue(lambda z: matrix @ z, len(matrix), rng, TOLERANCE, 100)  # noqa: B023
        basis = top["basis"]
        np.testing.assert_allclose(basis @ basis.T, np.eye(len(basis)), atol=1e-10)
        assert top["restricted_trace"] == pytest.approx(np.trace(basis @ matrix @ basis.T), rel=1e-9)
        projector = np.eye(len(matrix)) - basis.T @ basis
        rest = np.trace(projector @ matrix @ projector)
        assert top["restricted_trace"] + rest == pytest.approx(np.trace(matrix), rel=1e-9)
        if case[1] == "trained":
            deflated = projector @ matrix @ projector
            # Var(z^T A z) = 2 sum_{i != j} A_ij^2 for Rademacher z.
            def variance(a):
                return 2 * (np.sum(a**2) - np.sum(np.diag(a) ** 2))
            assert variance(deflated) < variance(matrix)


def test_stability_ratio_uses_learning_rate_and_momentum(measured):
    record = measured["mlp", "trained"][2]
    expected = record["curvature/max_eigenvalue"] * 0.1 / (2 * (1 + 0.9))
    assert record["curvature/stability_ratio"] == pytest.approx(expected, rel=1e-6)
    assert record["curvature/learning_rate"] == pytest.approx(0.1)


def _fit(with_callback, tmp_path):
    keras.utils.set_random_seed(3)
    x, y = _digits("mlp_bn")
    model = _model("mlp_bn", dropout=0.3)
    callbacks = []
    if with_callback:
        callbacks = [Curvature(x, y, every_n_steps=4, examples=64, trace_probes=4, max_products=10,
                               out_path=str(tmp_path / "c.jsonl"), log_dir=str(tmp_path / "tb"))]
    history = model.fit(x[:320], y[:320], batch_size=32, epochs=2, shuffle=True, verbose=0, callbacks=callbacks)
    return model, history, callbacks


def test_fit_with_callback_leaves_training_unchanged(tmp_path):
    plain, _, _ = _fit(False, tmp_path)
    measured_model, history, (callback,) = _fit(True, tmp_path)
    for name, variables in [("weights", "variables"), ("optimizer", None)]:
        ours = measured_model.optimizer.variables if variables is None else getattr(measured_model, variables)
        theirs = plain.optimizer.variables if variables is None else getattr(plain, variables)
        for a, b in zip(ours, theirs, strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"{name}: {a.path}")
    # Step 0, every 4 of 20 steps (the last one is 20, so no extra one at the end).
    assert [r["step"] for r in callback.history] == [0, 4, 8, 12, 16, 20]
    lines = [json.loads(line) for line in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [0, 4, 8, 12, 16, 20]
    assert all(math.isfinite(history.history["curvature/max_eigenvalue"][epoch]) for epoch in (0, 1))
    assert list((tmp_path / "tb" / "curvature").iterdir())


def test_a_measurement_at_the_target_is_marked_not_repeated_at_a_measured_step(tmp_path):
    """measure_at_target() measures at the current step, or marks the measurement this step already has, in memory
    and in out_path."""
    x, y = _digits("mlp")
    model = _model("mlp")
    out = tmp_path / "c.jsonl"
    callback = Curvature(x, y, every_n_steps=4, examples=32, trace_probes=2, max_products=10, out_path=str(out))

    class Target(keras.callbacks.Callback):  # after the curvature callback, as the pipeline's target check
        def __init__(self):
            super().__init__()
            self.step = 0

        def on_train_batch_end(self, batch, logs=None):
            self.step += 1
            if self.step in (4, 6):
                callback.measure_at_target()

    model.fit(x[:320], y[:320], batch_size=32, epochs=1, verbose=0, callbacks=[callback, Target()])
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["step"], r["at_target"]) for r in lines] == [(0, False), (4, True), (6, True), (8, False), (10, False)]
    assert [(r["step"], r["at_target"]) for r in callback.history] == [(r["step"], r["at_target"]) for r in lines]


def test_state_resumes_and_rewrites_records(tmp_path):
    x, y = _digits("mlp")
    out = tmp_path / "c.jsonl"
    first = Curvature(x, y, every_n_steps=2, examples=32, trace_probes=2, out_path=str(out))
    first.history = [{"step": 0, "curvature/trace_hi": math.inf}, {"step": 2, "curvature/trace_hi": 1.0}]
    state = json.loads(json.dumps(first.get_state()))
    out.write_text("stale\n")
    second = Curvature(x, y, every_n_steps=2, examples=32, trace_probes=2, out_path=str(out))
    assert second.set_state({**state, "step": 1, "history": state["history"][:1]}) == []
    assert [r["step"] for r in second.history] == [0] and second.get_state()["step"] == 1
    assert math.isnan(second.history[0]["curvature/trace_hi"])
    assert [json.loads(line)["step"] for line in out.read_text().splitlines()] == [0]


def test_checkpoint_carries_the_step_and_records_over_a_resume(tmp_path):
    """pipeline/training/checkpoint.py commits the state with the weights after epoch 1; the run goes on to epoch 2 and is
    interrupted; a resumed fit of epoch 2 counts on from the committed step and ends with the records of an
    uninterrupted run's steps, each once, in memory and in out_path."""
    from pipeline.training import checkpoint

    x, y = _digits("mlp")
    out, folder = tmp_path / "c.jsonl", str(tmp_path / "checkpoints")

    def callback():
        return Curvature(x, y, every_n_steps=4, examples=32, trace_probes=2, max_products=10, out_path=str(out))

    model, first = _model("mlp"), callback()
    model.fit(x[:320], y[:320], batch_size=32, epochs=1, verbose=0, callbacks=[first])
    record = checkpoint.save(model, folder, 1, 10, checkpoint.instrument_states([first]))
    model.fit(x[:320], y[:320], batch_size=32, initial_epoch=1, epochs=2, verbose=0, callbacks=[first])
    assert [json.loads(line)["step"] for line in out.read_text().splitlines()] == [0, 4, 8, 10, 12, 16, 20]
    resumed = callback()
    assert checkpoint.restore_instruments([resumed], folder, record) == []
    assert [r["step"] for r in resumed.history] == [0, 4, 8, 10]
    assert [json.loads(line)["step"] for line in out.read_text().splitlines()] == [0, 4, 8, 10]
    model.fit(x[:320], y[:320], batch_size=32, initial_epoch=1, epochs=2, verbose=0, callbacks=[resumed])
    assert [r["step"] for r in resumed.history] == [0, 4, 8, 10, 12, 16, 20]
    assert [json.loads(line)["step"] for line in out.read_text().splitlines()] == [0, 4, 8, 10, 12, 16, 20]


def test_dataset_gives_the_first_examples():
    x, y = _digits("mlp")
    dataset = tf.data.Dataset.from_tensor_slices((x[:100], y[:100])).batch(16)
    from_dataset, from_arrays = Curvature(dataset, examples=40), Curvature(x, y, examples=40)
    np.testing.assert_array_equal(from_dataset.x, from_arrays.x)
    np.testing.assert_array_equal(from_dataset.y, from_arrays.y)


@pytest.mark.parametrize("arguments, message", [
    ({"every_n_steps": 0}, "every_n_steps"),
    ({"examples": 0}, "examples"),
    ({"trace_probes": 1}, "trace_probes"),
    ({"tolerance": 0.0}, "tolerance"),
    ({"tolerance": 2}, "tolerance"),
    ({"trace_tolerance": 0}, "trace_tolerance"),
    ({"trace_block": 1}, "trace_block"),
    ({"trace_block": 2.5}, "trace_block"),
    ({"max_products": -1}, "max_products"),
    ({"momentum": 1.5}, "momentum"),
    ({"y": None}, "y"),
])
def test_bad_arguments_raise_value_error(arguments, message):
    x, y = _digits("mlp")
    arguments = {"y": y, **arguments}
    with pytest.raises(ValueError, match=f"Curvature {message}"):
        Curvature(x, **arguments)


def test_mismatched_lengths_and_dataset_with_y_raise():
    x, y = _digits("mlp")
    with pytest.raises(ValueError, match="same number"):
        Curvature(x[:10], y[:9])
    with pytest.raises(ValueError, match="must be None"):
        Curvature(tf.data.Dataset.from_tensor_slices((x, y)).batch(4), y)


def test_train_flag_writes_curvature_records(tmp_path, monkeypatch):
    """pipeline.train --curvature-every: records at step 0, every N steps, at the step the run first reaches
    --target-accuracy and at the end, in curvature.jsonl and the epoch metrics, with the measuring time counted as
    instrument time. (With several steps per execution a measurement falls on the end of the execution that passes a
    multiple of N; one step here.)"""
    import dataclasses

    from pipeline import config as config_lib
    from pipeline import train
    from pipeline.training import callback_setup

    monkeypatch.setattr(callback_setup, "CURVATURE_EXAMPLES", 128)  # a quarter of the cost
    config = dataclasses.replace(config_lib.smoke(), run_dir=str(tmp_path / "run"), epochs=1, curvature_every=15,
                                 grad_stats_every=0, bn_stats_every=0, dynamics=False, steps_per_execution="1",
                                 target_accuracy=0.3)
    summary = train.train(config)
    assert summary.status == "completed", summary.reason
    steps = 1293 // 64  # one epoch of the digits' training split
    reached = json.loads((tmp_path / "run" / "target.json").read_text())["step"]
    assert 0 < reached < steps and reached == summary.steps_to_target
    records = [json.loads(line) for line in (tmp_path / "run" / "curvature.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == sorted({0, 15, reached, steps})
    assert [r["step"] for r in records if r["at_target"]] == [reached]
    assert all(r["curvature/max_eigenvalue_converged"] and r["curvature/trace_lo"] <= r["curvature/trace"]
               <= r["curvature/trace_hi"] and r["examples"] == 128 for r in records)
    # The epoch's logs hold its last measurement before it ended (the one at the end of training comes after).
    epoch = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert epoch["curvature/max_eigenvalue"] == pytest.approx(records[-2]["curvature/max_eigenvalue"])
    assert epoch["instrument_time_s"] >= sum(r["curvature/seconds"] for r in records[:-1])


def test_train_flag_rejects_negative_interval(cli_error):
    from pipeline import train

    line = cli_error(train.main, ["--curvature-every", "-2"])
    assert "--curvature-every" in line
