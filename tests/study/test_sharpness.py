"""Sharpness in a sweep: findings from synthetic runs with known curvature, the loss line against a NumPy forward
pass, and a tiny real sweep whose report holds the sharpness plots and findings."""

import dataclasses
import math
import os

import keras
import numpy as np
import pytest
from scipy import stats
from sklearn.datasets import load_digits

from pipeline import config as config_lib
from pipeline import rundir
from pipeline.study import batch_sweep as sweep
from pipeline.study import loss_line, sharpness

BATCHES = (16, 32, 64, 128)


def _rows(slope, noise, scaling="none", seeds=(0, 1, 2), ratio=0.5, gap_slope=0.0):
    """Runs whose lambda_max = 10 B^slope (1 + noise x seed offset); their gap grows by gap_slope per doubling."""
    rows = []
    for seed in seeds:
        for batch in BATCHES:
            lr = 0.1 * batch / 32 if scaling == "linear" else 0.1
            offset = (-1, 0, 1, 2)[seed % 4] * (1 if batch % 32 else -1)  # seed noise that differs per batch
            value = 10.0 * batch**slope * (1 + noise * offset)
            rows.append({"norm": "batch", "batch": batch, "seed": seed, "status": "completed", "replicas": 1,
                         "lr": lr, "lr_scaling": scaling, "lr_over_batch": lr / batch, "max_eigenvalue": value,
                         "trace": 5 * value, "trace_lo": 4 * value, "trace_hi": 6 * value,
                         "stability_ratio": ratio, "max_stability_ratio": ratio,
                         "peak_stability_ratio": value * lr / 3.8,
                         "generalization_gap": 0.01 + gap_slope * math.log2(batch) + 0.001 * seed,
                         "loss_gap": 0.05})
    return rows


def test_resolved_sharper_minima_agree_with_keskar_at_fixed_lr():
    answers = sharpness.answers(_rows(slope=0.5, noise=0.01, gap_slope=0.01))
    text = answers["sharpness"][0]
    assert text.startswith("Yes: lambda_max at the end of training changes by a factor 1.41 per doubling of B")
    (_, fit, _), = sharpness.series_fits(_rows(slope=0.5, noise=0.01, gap_slope=0.01), "max_eigenvalue", log=True)
    q = stats.t.ppf(0.975, fit["slope_dof"])  # the slope's 95% interval: the t quantile of its error's dof
    assert f"beyond {q:.1f} standard errors, the 95% t quantile on {fit['slope_dof']} degrees of freedom)" in text
    assert "the data agree" in text and "Dinh et al. 2017" in text
    assert answers["generalization_gap"][0].startswith("Yes: the train - test accuracy gap changes by +0.01")
    assert "Cannot be answered by this sweep: every run uses lr scaling none" in answers["lr_over_batch"][0]
    assert answers["edge_of_stability"][0].startswith("No: the highest measured lambda_max x lr / (2(1+beta)) is 0.5")
    assert len(answers["sharpness"]) == 1  # no run measured at its target


def test_sharpness_at_the_target_is_answered_beside_the_end():
    # At the target lambda_max falls with B (factor 2^-0.5 per doubling), at the end it rises: two answers.
    rows = _rows(slope=0.5, noise=0.01)
    for row in rows:
        row["max_eigenvalue_at_target"] = 100.0 * row["batch"] ** -0.5 * (1 + 0.01 * row["seed"])
    end, at_target = sharpness.answers(rows)["sharpness"]
    assert end.startswith("Yes: lambda_max at the end of training changes by a factor 1.41")
    assert at_target.startswith("At the step each run first reached the target accuracy: No, the opposite: "
                                "lambda_max at the target changes by a factor 0.707 per doubling of B")
    assert "the data disagree with the paper" in at_target and at_target.endswith(sharpness.DINH)
    groups = sharpness.groups(rows)
    assert groups[0]["max_eigenvalue_at_target"]["n"] == 3
    lines = sharpness.markdown({"measured": True, "groups": groups, "answers": sharpness.answers(rows)}, None, rows)
    assert "| lambda_max at target |" in lines[2] and lines[4].count("|") == lines[2].count("|")


def test_unresolved_direction_and_disagreement_with_linear_scaling():
    # A slope of 0.05 under seed noise of 30%: within its 95% interval of none.
    unresolved = sharpness.answers(_rows(slope=0.05, noise=0.3))["sharpness"][0]
    assert unresolved.startswith("No: ") and "degrees of freedom, of none)." in unresolved
    # Linear scaling keeps lr/B fixed: Jastrzebski et al. predict alike minima, so a resolved rise disagrees.
    rising = sharpness.answers(_rows(slope=0.5, noise=0.01, scaling="linear"))["sharpness"][0]
    assert rising.startswith("Yes") and "disagree with the paper" in rising
    one_seed = sharpness.answers(_rows(slope=0.5, noise=0.0, seeds=(0,)))
    assert one_seed["sharpness"][0].startswith("Not enough data") and "this sweep has 1" in one_seed["sharpness"][0]


def test_two_seeds_that_agree_on_the_slope_by_chance_do_not_resolve_a_direction():
    """Each seed is off the law 10 B^0.1 by a factor 2 at alternate ends (seed 0 high at 16 and 128, seed 1 at 32
    and 64): both seeds' own slopes are exactly 0.1, so the spread of the per-seed slopes is 0, but the seeds disagree
    by 2x at every batch size. The seeds' spread pooled over the batch sizes (4 degrees of freedom) gives the slope
    a standard error of ~0.21 (relative std ~0.47 of one run over sqrt(sum n (ln B - mean)^2) = sqrt(4.8)): 0.1 is
    within the 95% interval, t_4 = 2.78 of them."""
    rows = _rows(slope=0.1, noise=0.0, seeds=(0, 1))
    for row in rows:
        high = (row["batch"] in (16, 128)) == (row["seed"] == 0)
        row["max_eigenvalue"] *= 2.0 if high else 1.0
    text = sharpness.answers(rows)["sharpness"][0]
    assert text.startswith("No: lambda_max at the end of training changes by a factor 1.07 per doubling of B")
    assert "within 2.8 standard errors, the 95% t quantile on 4 degrees of freedom, of none)." in text
    (series, fit, seeds), = sharpness.series_fits(rows, "max_eigenvalue", log=True)
    relative = np.std([2.0, 1.0], ddof=1) / 1.5
    assert fit["replicate_se"] == pytest.approx(relative / math.sqrt(2 * 1.25 * math.log(2) ** 2 * 4), rel=1e-9)
    assert series == ("batch", "none") and seeds == 2


def test_lr_over_batch_predictor_needs_both_scalings_and_edge_is_reached():
    # lambda_max = 1 / (lr / B) exactly in both halves: lr/B predicts it perfectly, B alone does not.
    rows = _rows(slope=0.0, noise=0.0, scaling="none") + _rows(slope=0.0, noise=0.0, scaling="linear", ratio=0.95)
    for row in rows:
        row["max_eigenvalue"] = 1.0 / row["lr_over_batch"]
    answers = sharpness.answers(rows)
    assert answers["lr_over_batch"][0].startswith("Yes: ln lambda_max fits log2(lr/B) with R^2 1.00")
    assert answers["edge_of_stability"][0].startswith("Yes: the highest measured")


def _numpy_loss(weights, x, y, bn=False, epsilon=1e-3):
    """Mean cross-entropy of Dense(8) [-> BN with these examples' statistics] -> relu -> Dense(10) softmax."""
    hidden = x @ weights[0] + weights[1]
    if bn:
        gamma, beta = weights[2], weights[3]
        hidden = gamma * (hidden - hidden.mean(0)) / np.sqrt(hidden.var(0) + epsilon) + beta
        weights = weights[:2] + weights[6:]
    logits = np.maximum(hidden, 0) @ weights[2] + weights[3]
    logits -= logits.max(1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    return float(-log_probs[np.arange(len(y)), y].mean())


@pytest.mark.parametrize("bn", [False, True], ids=["mlp", "mlp_bn"])
def test_loss_line_matches_numpy_forward_pass(bn):
    """losses_along_line against the loss of theta(alpha) computed in NumPy; with BN, against BN normalizing with
    the statistics of the same examples at theta(alpha) (what recomputing them at every alpha means)."""
    import tensorflow as tf

    digits = load_digits()
    x, y = (digits.data[:300] / 16.0).astype("float32"), digits.target[:300].astype("int32")
    keras.utils.set_random_seed(0)
    layers = [keras.Input((64,)), keras.layers.Dense(8)]
    layers += [keras.layers.BatchNormalization()] if bn else []
    layers += [keras.layers.Activation("relu"), keras.layers.Dense(10, activation="softmax")]
    model = keras.Sequential(layers)
    model.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy", metrics=["accuracy"])
    start = model.get_weights()
    model.fit(x, y, batch_size=32, epochs=3, verbose=0)
    end = model.get_weights()
    alphas = (-0.5, 0.5, 1.5)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(128)
    line = loss_line.losses_along_line(model, start, end, alphas, {"train": dataset},
                                       bn_dataset=dataset if bn else None, bn_examples=len(x))
    for alpha, measured in zip(alphas, line["train_loss"]):
        weights = [(1 - alpha) * a.astype(np.float64) + alpha * b for a, b in zip(start, end)]
        assert measured == pytest.approx(_numpy_loss(weights, x.astype(np.float64), y, bn=bn), rel=1e-4)
    assert line["bn"].startswith("BN statistics recomputed") if bn else line["bn"] == "no batch-norm layers"


@pytest.mark.slow
def test_tiny_sweep_reports_sharpness_and_the_loss_line(tmp_path, monkeypatch):
    """Two runs of a real sweep with --curvature-every -1: a measurement at the step each reaches the target and one at
    the end; the report holds the table, the four findings, sharpness.png and loss_line.png."""
    from pipeline.training import callback_setup

    monkeypatch.setattr(callback_setup, "CURVATURE_EXAMPLES", 128)
    monkeypatch.setattr(loss_line, "BN_EXAMPLES", 256)
    out = str(tmp_path / "sweep")
    config = dataclasses.replace(config_lib.smoke(), export=False, dynamics=False, precise_bn_samples=64,
                                 target_accuracy=0.3, grad_stats_every=0, bn_stats_every=0, curvature_every=-1)
    report = sweep.sweep(config, sweep.Spec(batches=(64, 128), seeds=(0,), budget=sweep.Budget("examples", 2000)),
                         out)
    for batch, steps in ((64, 31), (128, 15)):
        run = os.path.join(out, "runs", f"batch-b{batch}-s0")
        records = rundir.read_jsonl(os.path.join(run, "curvature.jsonl"))
        reached = rundir.read_json(os.path.join(run, "target.json"))["step"]
        assert [(r["step"], r["at_target"]) for r in records] == (
            [(steps, True)] if reached == steps else [(reached, True), (steps, False)])
        row = next(r for r in report["runs"] if r["name"] == f"batch-b{batch}-s0")
        assert row["max_eigenvalue_at_target"] == records[0]["curvature/max_eigenvalue"]
    part = report["sharpness"]
    assert part["measured"] and [g["batch"] for g in part["groups"]] == [64, 128]
    assert all(r["max_eigenvalue"] > 0 and r["loss_gap"] is not None for r in report["runs"])
    assert 0 < part["cost"]["curvature_s"] < part["cost"]["wall_time_s"] and part["cost"]["runs"] == 2
    line = part["line"]
    assert line["alphas"][0] == -0.5 and line["alphas"][-1] == 1.5 and len(line["test_loss"]) == 9
    assert line["small"]["batch"] == 64 and line["large"]["batch"] == 128 and "recomputed" in line["bn"]
    with open(os.path.join(out, "report.md")) as f:
        text = f.read()
    for question in sharpness.QUESTIONS.values():
        assert question in text
    assert ("Not enough data: a direction of lambda_max at the end of training needs 3 batch sizes with a measurement; "
            "this sweep has 2.") in text
    assert "Cost: the curvature measurements took" in text
    assert "![sharpness](sharpness.png)" in text and "![loss_line](loss_line.png)" in text
    assert os.path.getsize(os.path.join(out, "sharpness.png")) > 0 and os.path.getsize(os.path.join(out, "loss_line.png"))
