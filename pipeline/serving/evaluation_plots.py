"""PNG figures of an evaluation: confusion matrix, reliability diagram, misclassified gallery, throughput curve."""

from __future__ import annotations

import math

import numpy as np
from matplotlib.figure import Figure

from callbacks.figures import display_image, figure_png


def confusion_png(matrix, class_names: list[str], title: str) -> bytes:
    """scikit-learn's ConfusionMatrixDisplay: rows are true classes, columns predicted classes."""
    from sklearn.metrics import ConfusionMatrixDisplay

    size = min(16.0, 3.0 + 0.5 * len(class_names))
    figure = Figure(figsize=(size, size), dpi=100)
    axes = figure.add_subplot(1, 1, 1)
    ConfusionMatrixDisplay(np.asarray(matrix), display_labels=class_names).plot(
        ax=axes, cmap="Blues", colorbar=False, include_values=len(class_names) <= 30)
    axes.set_title(title, fontsize=9)
    figure.tight_layout()
    return figure_png(figure)


def reliability_png(calibration: dict, title: str) -> bytes:
    """Accuracy against mean confidence per bin (bars), the diagonal of perfect calibration, and bin counts."""
    edges = np.array(calibration["bin_edges"])
    width = edges[1] - edges[0]
    filled = [i for i, n in enumerate(calibration["bin_count"]) if n]
    figure = Figure(figsize=(5, 6), dpi=100)
    top, bottom = figure.subplots(2, 1, gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    top.bar(edges[:-1][filled], [calibration["bin_accuracy"][i] for i in filled], width=width, align="edge",
            edgecolor="black", alpha=0.7, label="accuracy in bin")
    top.plot([c for i, c in enumerate(calibration["bin_confidence"]) if i in filled],
             [calibration["bin_accuracy"][i] for i in filled], "r.", label="(mean confidence, accuracy)")
    top.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    top.set(ylabel="accuracy", ylim=(0, 1.02), xlim=(0, 1))
    top.set_title(title, fontsize=9)
    top.legend(fontsize=7, loc="upper left")
    bottom.bar(edges[:-1], calibration["bin_count"], width=width, align="edge", edgecolor="black")
    bottom.set(xlabel="confidence (top-class probability)", ylabel="examples", yscale="symlog")
    figure.tight_layout()
    return figure_png(figure)


def gallery_png(images, labels, predicted, confidence, class_names: list[str], title: str, limit: int = 25) -> bytes:
    """Images with 'true X / pred Y (p)' above each, the first `limit` of them."""
    count = min(limit, len(images))
    columns = max(1, math.ceil(math.sqrt(count)))
    rows = max(1, math.ceil(count / columns))
    figure = Figure(figsize=(max(4.0, 1.7 * columns), 0.6 + 1.9 * rows), dpi=100)
    figure.suptitle(title, fontsize=9)
    if count == 0:
        figure.text(0.5, 0.5, "none", ha="center", va="center")
    for position in range(count):
        axes = figure.add_subplot(rows, columns, position + 1)
        axes.imshow(display_image(images[position]), cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        axes.set_title(f"true {class_names[labels[position]]} / pred {class_names[predicted[position]]}\n"
                       f"p={confidence[position]:.2f}", fontsize=6)
        axes.set_axis_off()
    figure.tight_layout()
    return figure_png(figure)


def throughput_png(rows: list[dict], title: str) -> bytes:
    """Examples/sec (with the per-call quartiles) and p50/p99 latency against the request batch, log-log."""
    batches = [r["batch"] for r in rows]
    figure = Figure(figsize=(10, 4), dpi=100)
    left, right = figure.subplots(1, 2)
    median = np.array([r["examples_per_sec"] for r in rows])
    low = median - np.array([r["examples_per_sec_q25"] for r in rows])
    high = np.array([r["examples_per_sec_q75"] for r in rows]) - median
    left.errorbar(batches, median, yerr=[np.maximum(low, 0), np.maximum(high, 0)], marker="o", capsize=3)
    left.set(xscale="log", yscale="log", xlabel="request batch", ylabel="examples/sec (median, quartiles)")
    right.plot(batches, [r["latency_p50_ms"] for r in rows], "o-", label="p50")
    right.plot(batches, [r["latency_p99_ms"] for r in rows], "s--", label="p99")
    right.set(xscale="log", yscale="log", xlabel="request batch", ylabel="latency per request (ms)")
    right.legend(fontsize=8)
    for axes in (left, right):
        axes.grid(alpha=0.3, which="both")
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    return figure_png(figure)
