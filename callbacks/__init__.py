"""Keras callbacks that measure what the batch size does: gradient noise, BatchNorm statistics, learning dynamics,
curvature."""

from callbacks.bn_stats import BatchNormStatistics
from callbacks.curvature import Curvature
from callbacks.dynamics import LearningDynamics
from callbacks.gradient_stats import GradientStatistics
from callbacks.precise_bn import PreciseBN, batch_norm_inputs, precise_bn

__all__ = ["BatchNormStatistics", "Curvature", "GradientStatistics", "LearningDynamics", "PreciseBN",
           "batch_norm_inputs", "precise_bn"]
