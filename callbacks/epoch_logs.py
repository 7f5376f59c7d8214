"""Epoch logs that show only measured values: instruments' NaN placeholders are dropped before display."""

import math

import keras

# Key prefixes of the instruments that log NaN for an epoch without a new measurement (gradient_stats, bn_stats,
# curvature).
MEASURED_PREFIXES = ("grad/", "bn/", "curvature/")


class DropUnmeasured(keras.callbacks.Callback):
    """Removes the NaN values of instrument keys from the epoch logs.

    GradientStatistics and BatchNormStatistics put NaN into every key of theirs in an epoch without a new
    measurement, so that CSVLogger (listed before this callback) keeps stable columns. Listed after CSVLogger and
    before TensorBoard, this callback removes those placeholders, so that TensorBoard's `epoch_grad/*` and
    `epoch_bn/*` and the console's epoch line (Keras' progress bar runs after every listed callback) get only
    measured values.
    """

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        for key in [k for k, v in logs.items() if k.startswith(MEASURED_PREFIXES) and _is_nan(v)]:
            del logs[key]


def _is_nan(value) -> bool:
    try:
        return math.isnan(float(value))
    except (TypeError, ValueError):
        return False
