"""Classification metrics of predicted probabilities: accuracy, loss, top-k, per-class scores, confusion, calibration."""

from __future__ import annotations

import numpy as np

CALIBRATION_BINS = 15  # equal-width confidence bins, as Guo et al. 2017 use for ECE


def calibration(confidence: np.ndarray, correct: np.ndarray, bins: int = CALIBRATION_BINS) -> dict:
    """Expected calibration error and the reliability diagram's bins.

    The confidence of a prediction is its largest probability. With M equal-width bins
    B_m = {i : (m-1)/M < confidence_i <= m/M} (the first bin also holds confidence 0),

        ECE = sum_m |B_m| / n * |acc(B_m) - conf(B_m)|

    where acc(B_m) is the fraction of correct predictions in B_m and conf(B_m) their mean confidence (Naeini
    et al. 2015; Guo et al. 2017, "On Calibration of Modern Neural Networks", eq. 3). Empty bins add nothing.

    Args:
      confidence: (n,) the largest predicted probability of each example.
      correct: (n,) bool, whether the predicted class is the label.
      bins: M.
    Returns:
      {"ece", "bins", "binning", "bin_edges", "bin_count", "bin_accuracy", "bin_confidence"}; empty bins have
      accuracy and confidence None.
    """
    confidence = np.asarray(confidence, np.float64)
    correct = np.asarray(correct, bool)
    index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    count = np.bincount(index, minlength=bins)
    hits = np.bincount(index, weights=correct, minlength=bins)
    total_confidence = np.bincount(index, weights=confidence, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy, mean_confidence = hits / count, total_confidence / count
    gaps = np.where(count > 0, np.abs(accuracy - mean_confidence), 0.0)
    return {
        "ece": float(np.sum(count / max(len(confidence), 1) * gaps)),
        "bins": bins,
        "binning": f"{bins} equal-width bins of the top-class probability over (0, 1]",
        "bin_edges": np.linspace(0, 1, bins + 1).tolist(),
        "bin_count": count.tolist(),
        "bin_accuracy": [float(a) if n else None for a, n in zip(accuracy, count)],
        "bin_confidence": [float(c) if n else None for c, n in zip(mean_confidence, count)],
    }


def classification(probabilities: np.ndarray, labels: np.ndarray, class_names: list[str], top_k: int = 5,
                   bins: int = CALIBRATION_BINS) -> dict:
    """Everything evaluation.json reports about predictions, from the probabilities and the labels.

    Loss and top-k accuracy are Keras' (the same loss as model.evaluate); precision, recall, F1 and the
    confusion matrix are scikit-learn's (rows: true class, columns: predicted class).

    Args:
      probabilities: (n, classes) predicted probabilities.
      labels: (n,) integer class ids.
      class_names: names in class-id order.
      top_k: k of the top-k accuracy (skipped when k >= the number of classes, where it is 1).
      bins: calibration bins.
    """
    import keras
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    probabilities = np.asarray(probabilities, np.float32)
    labels = np.asarray(labels).astype(np.int64)
    predicted = probabilities.argmax(axis=-1)
    classes = list(range(len(class_names)))
    precision, recall, f1, support = precision_recall_fscore_support(labels, predicted, labels=classes, zero_division=0)
    macro = precision_recall_fscore_support(labels, predicted, labels=classes, average="macro", zero_division=0)
    result = {
        "num_examples": int(len(labels)),
        "accuracy": float(np.mean(predicted == labels)),
        "loss": float(keras.losses.SparseCategoricalCrossentropy()(labels, probabilities)),
        "per_class": {
            name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(class_names, precision, recall, f1, support)
        },
        "macro_avg": {"precision": float(macro[0]), "recall": float(macro[1]), "f1": float(macro[2])},
        "confusion_matrix": confusion_matrix(labels, predicted, labels=classes).tolist(),
        "calibration": calibration(probabilities.max(axis=-1), predicted == labels, bins),
    }
    if top_k < len(class_names):
        hits = keras.metrics.sparse_top_k_categorical_accuracy(labels, probabilities, k=top_k)
        result[f"top_{top_k}_accuracy"] = float(np.mean(keras.ops.convert_to_numpy(hits)))
    return result
