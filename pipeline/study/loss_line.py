"""Training and test loss along the straight line between two solutions (Keskar et al. 2017, fig. 3).

For weights theta_s (the smallest-batch run's) and theta_l (the largest-batch run's), the loss at

    theta(alpha) = (1 - alpha) theta_s + alpha theta_l,   alpha in [-0.5, 1.5]

(Goodfellow et al. 2015 introduced the 1-D plot; Keskar et al. 2017 use it to show that the large-batch solution
sits in a sharper basin). Every weight is interpolated, BatchNormalization's moving statistics included; with BN
layers those statistics are then recomputed at every alpha from training examples (callbacks.precise_bn), because
the interpolated statistics do not belong to the interpolated weights, so the curve is that of the network that
inference would use at theta(alpha). Without a recomputation (bn_examples 0) the curve says so.
"""

from __future__ import annotations

import os
import time

import numpy as np

from pipeline import rundir

ALPHAS = tuple(float(a) for a in np.linspace(-0.5, 1.5, 9))
BN_EXAMPLES = 1024  # training examples whose statistics BN gets at each alpha (callbacks.precise_bn)
FILE = "loss_line.json"


def losses_along_line(model, start: list, end: list, alphas, splits: dict, bn_dataset=None,
                      bn_examples: int = BN_EXAMPLES) -> dict:
    """The compiled loss and accuracy of `model` at theta(alpha) on each split (module docstring).

    Args:
        model: a compiled Keras model of the architecture of both solutions; its weights are overwritten.
        start, end: theta_s and theta_l as lists of arrays in the order of model.weights.
        alphas: the points alpha.
        splits: {name: tf.data.Dataset of (x, y) batches} to evaluate on.
        bn_dataset: un-augmented training batches for recomputing BN statistics at each alpha; None keeps the
            interpolated moving statistics (and the result says so).
        bn_examples: examples of that recomputation.

    Returns:
        {"alphas": [...], "<split>_loss": [...], "<split>_accuracy": [...], "bn": how BN statistics were set}.
    """
    from callbacks import batch_norm_inputs, precise_bn

    has_bn = bool(batch_norm_inputs(model))
    result = {"alphas": [float(a) for a in alphas]}
    for alpha in alphas:
        model.set_weights([(1.0 - alpha) * np.asarray(a) + alpha * np.asarray(b) for a, b in zip(start, end)])
        if has_bn and bn_dataset is not None:
            precise_bn(model, bn_dataset, bn_examples)
        for name, dataset in splits.items():
            loss, accuracy = model.evaluate(dataset, verbose=0)
            result.setdefault(f"{name}_loss", []).append(float(loss))
            result.setdefault(f"{name}_accuracy", []).append(float(accuracy))
    if not has_bn:
        result["bn"] = "no batch-norm layers"
    elif bn_dataset is not None:
        result["bn"] = f"BN statistics recomputed at each alpha over {bn_examples} training examples (precise BN)"
    else:
        result["bn"] = "BN moving statistics interpolated with the weights, NOT recomputed"
    return result


def sweep_line(sweep_dir: str, small: dict, large: dict, alphas=ALPHAS) -> dict | None:
    """The line between two runs of a sweep (rows of the report), from their last checkpoints; cached in sweep_dir.

    The cache (loss_line.json) is reused while it names the same two runs and their checkpoint files.

    Returns:
        losses_along_line's result with "small" and "large" (run names and batches) and "seconds" (the time it took,
        model building and data loading included), or None when a run has no checkpoint.
    """
    from pipeline.training import checkpoint

    paths = [checkpoint.latest_weights(os.path.join(sweep_dir, "runs", row["name"], "checkpoints"))
             for row in (small, large)]
    if not all(paths):
        return None
    key = {"small": small["name"], "large": large["name"], "checkpoints": [os.path.basename(p) for p in paths],
           "alphas": [float(a) for a in alphas]}
    cached = rundir.read_json(os.path.join(sweep_dir, FILE))
    if cached and cached.get("key") == key:
        return cached
    from pipeline.data import loading
    from pipeline.training import fit_loop

    started = time.perf_counter()
    config = rundir.run_config(os.path.join(sweep_dir, "runs", small["name"]))
    data = loading.load(config)
    weights = []
    for path in paths:
        model, _ = fit_loop.compiled_model(config, data)
        model.optimizer.build(model.trainable_variables)
        model.load_weights(path)
        weights.append(model.get_weights())
    batch = config.inference_batch
    splits = {"train": data.eval_dataset("train", batch), "test": data.eval_dataset("test", batch)}
    bn_dataset = data.train_dataset(batch, seed=config.seed, augment=False, epoch=0)
    result = losses_along_line(model, weights[0], weights[1], alphas, splits, bn_dataset,
                               min(BN_EXAMPLES, data.num_train))
    result.update(key=key, small={"name": small["name"], "batch": small["batch"]},
                  large={"name": large["name"], "batch": large["batch"]}, seconds=time.perf_counter() - started)
    rundir.write_json_atomic(os.path.join(sweep_dir, FILE), result)
    return result
