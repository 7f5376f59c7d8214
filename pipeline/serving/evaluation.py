"""Evaluates an exported SavedModel on a split, and measures its throughput: `python -m pipeline.evaluate RUN_DIR`.

The SavedModel's serving signature is called (not the Keras model), so the numbers are those of what TF Serving
would serve. Writes evaluation.json, confusion_matrix.json and .png, reliability.png, misclassified.png and
TensorBoard images to the output folder; with --benchmark-batches also throughput.json and throughput.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from pipeline import cli, flags, rundir, startup
from pipeline.config import InputError

BENCHMARK_EXAMPLE = "1,8,32,128,512"


def _batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(item) for item in text.split(",") if item.strip())
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1 or list(sizes) != sorted(set(sizes)):
        raise argparse.ArgumentTypeError(f"got {text!r}; use increasing positive batch sizes, e.g. {BENCHMARK_EXAMPLE}")
    return sizes


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"got {text!r}; expected a positive integer")
    return value


def parser() -> argparse.ArgumentParser:
    p = flags.Parser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("path", metavar="PATH", help="a run directory, a model folder of numeric versions, or a SavedModel "
                   "version folder; only this SavedModel is loaded (SavedModels are programs: load trusted ones only)")
    p.add_argument("--dataset", help="dataset to evaluate on (default: the run's own, from its config.json)")
    p.add_argument("--data-dir", help="prepared TFDS data directory (default: the run's)")
    p.add_argument("--split", choices=("train", "val", "test"), default="test", help="split to evaluate")
    p.add_argument("--out", help="output folder (default: <run>/evaluation/<split>, or ./evaluation/<model>-<version>-<split>)")
    p.add_argument("--batch", type=_positive, default=256, help="examples per signature call while evaluating")
    p.add_argument("--top-k", type=_positive, default=5, help="k of the top-k accuracy")
    p.add_argument("--calibration-bins", type=_positive, default=15, help="equal-width confidence bins of the ECE")
    p.add_argument("--gallery", type=_positive, default=25, help="misclassified examples shown in misclassified.png")
    p.add_argument("--benchmark-batches", type=_batch_sizes, default=(), metavar="B1,B2,...",
                   help=f"measure latency and throughput at these request batches, e.g. {BENCHMARK_EXAMPLE}")
    return p


def _data(served, dataset: str | None, data_dir: str | None):
    """The run's config with --dataset/--data-dir applied, loaded; checks that the images fit the SavedModel."""
    from pipeline import config as config_lib
    from pipeline.data import loading

    if served.run_dir:
        config = rundir.run_config(served.run_dir)
    elif dataset:
        config = config_lib.Config()
    else:
        raise InputError(f"--dataset: {served.path} is not inside a run directory, so its dataset is unknown; "
                         "name it, e.g. --dataset digits")
    changes = {k: v for k, v in (("dataset", dataset), ("data_dir", data_dir)) if v is not None}
    if dataset == "digits" or (dataset or "").startswith("npz:"):  # sources that only load into memory
        changes["input"] = "memory"
    data = loading.load(dataclasses.replace(config, **changes))
    if tuple(data.input_shape) != tuple(served.image_shape):
        raise InputError(f"--dataset: {data.source} has images of shape {data.input_shape}, but {served.path} takes "
                         f"{served.image_shape}")
    return data


def evaluate(path: str, *, dataset: str | None = None, data_dir: str | None = None, split: str = "test",
             out: str | None = None, batch: int = 256, top_k: int = 5, calibration_bins: int = 15,
             gallery: int = 25, benchmark_batches=()) -> dict:
    """Evaluates the SavedModel at `path` on a split and writes the report; returns evaluation.json's content.

    Raises:
      InputError: the path, dataset or split cannot be used.
    """
    import numpy as np
    import tensorflow as tf

    from callbacks import checked_io
    from pipeline.serving import batching, classification_metrics, evaluation_plots, exported_model, tf_serving_files, throughput

    served = exported_model.load(path)
    data = _data(served, dataset, data_dir)
    images, labels = data.arrays(split)
    serve = served.signatures[tf_serving_files.SIGNATURE]
    probabilities = np.concatenate([
        serve(**{tf_serving_files.INPUT_NAME: tf.constant(images[i : i + batch])})["probabilities"].numpy()
        for i in range(0, len(images), batch)])
    if probabilities.shape[1] != data.num_classes:
        raise InputError(f"--dataset: {data.source} has {data.num_classes} classes, but {served.path} predicts "
                         f"{probabilities.shape[1]}")
    names = data.class_names
    result = {"saved_model": served.path, "model_name": served.model_name, "version": served.version,
              "dataset": data.source, "split": split}
    result.update(classification_metrics.classification(probabilities, labels, names, top_k=top_k, bins=calibration_bins))
    summary = rundir.read_summary(served.run_dir) if served.run_dir else None
    if summary and split == "test" and summary.get("test_accuracy") is not None:
        result["run_test_accuracy"] = summary["test_accuracy"]
    predicted, confidence = probabilities.argmax(-1), probabilities.max(-1)
    wrong = np.flatnonzero(predicted != labels)
    wrong = wrong[np.argsort(-confidence[wrong], kind="stable")]  # most confident mistakes first
    result["misclassified"] = [{"index": int(i), "label": names[labels[i]], "predicted": names[predicted[i]],
                                "confidence": float(confidence[i])} for i in wrong]

    default_out = (os.path.join(served.run_dir, "evaluation", split) if served.run_dir
                   else os.path.join("evaluation", f"{served.model_name}-{served.version}-{split}"))
    out = out or default_out
    os.makedirs(out, exist_ok=True)
    where = f"{served.model_name} v{served.version}, {data.source} {split}"
    pngs = {
        "confusion_matrix": evaluation_plots.confusion_png(result["confusion_matrix"], names, f"Confusion matrix: {where}"),
        "reliability": evaluation_plots.reliability_png(
            result["calibration"], f"Reliability: {where}\nECE {result['calibration']['ece']:.4f} "
                                   f"({calibration_bins} equal-width bins, {len(labels)} examples)"),
        "misclassified": evaluation_plots.gallery_png(
            images[wrong], labels[wrong], predicted[wrong], confidence[wrong], names,
            f"Misclassified {split} examples: {len(wrong)} of {len(labels)} (most confident first)", limit=gallery),
    }
    if benchmark_batches:
        rows = throughput.measure(lambda x: serve(**{tf_serving_files.INPUT_NAME: x}), images, benchmark_batches)
        result["throughput"] = {"rows": rows, "finding": throughput.finding(rows), "cpu_count": os.cpu_count(),
                                "batching_parameters": batching.from_throughput(rows)}
        rundir.write_json_atomic(os.path.join(out, "throughput.json"), result["throughput"])
        pngs["throughput"] = evaluation_plots.throughput_png(rows, f"Inference throughput: {where}")
    for name, png in pngs.items():
        checked_io.write_atomic(os.path.join(out, f"{name}.png"), png)
    rundir.write_json_atomic(os.path.join(out, "confusion_matrix.json"),
                             {"class_names": names, "rows": "true class", "columns": "predicted class",
                              "matrix": result["confusion_matrix"]})
    with tf.summary.create_file_writer(os.path.join(out, "tensorboard")).as_default():
        for name, png in pngs.items():
            tf.summary.image(f"evaluation/{name}", tf.image.decode_png(png, channels=3)[tf.newaxis], step=0)
        for name in ("accuracy", "loss"):
            tf.summary.scalar(f"evaluation/{name}", result[name], step=0)
        tf.summary.scalar("evaluation/ece", result["calibration"]["ece"], step=0)
    result["out"] = out
    rundir.write_json_atomic(os.path.join(out, "evaluation.json"), result)
    return result


def main(argv=None) -> int:
    """Parses flags, evaluates, prints a JSON line (and the throughput finding); bad input: one line, exit 2."""
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)

    def command() -> int:
        startup.import_tensorflow()  # without its C++ start-up lines (pipeline/startup.py)
        result = evaluate(args.path, dataset=args.dataset, data_dir=args.data_dir, split=args.split, out=args.out,
                          batch=args.batch, top_k=args.top_k, calibration_bins=args.calibration_bins,
                          gallery=args.gallery, benchmark_batches=args.benchmark_batches)
        keys = ("accuracy", "loss", f"top_{args.top_k}_accuracy", "run_test_accuracy", "num_examples", "out")
        line = {k: result[k] for k in keys if k in result} | {"ece": result["calibration"]["ece"]}
        print(json.dumps(line))
        if "throughput" in result:
            print(result["throughput"]["finding"])
        return 0

    return cli.run(command)
