"""The models a run can train, by name: CIFAR ResNets, a plain CNN and an MLP, each with a choice of normalization."""

from __future__ import annotations

import functools

import keras

from models.cnn import build_cnn, build_mlp
from models.norm import GhostBatchNormalization, normalization
from models.resnet import build_resnet
from pipeline.config import NORMS, InputError

__all__ = ["MODELS", "GhostBatchNormalization", "build_model", "normalization"]

# Every builder takes (input_shape, num_classes, norm, *, mean, variance, ghost_batch, bn_momentum).
MODELS = {
    "resnet20": functools.partial(build_resnet, 20),
    "resnet32": functools.partial(build_resnet, 32),
    "resnet44": functools.partial(build_resnet, 44),
    "resnet56": functools.partial(build_resnet, 56),
    "resnet110": functools.partial(build_resnet, 110),
    "cnn": build_cnn,
    "mlp": build_mlp,
}


def build_model(
    name: str,
    input_shape,
    num_classes: int,
    norm: str = "batch",
    *,
    mean=None,
    variance=None,
    ghost_batch: int = 8,
    bn_momentum: float = 0.9,
) -> keras.Model:
    """Builds a model that maps raw pixels to class probabilities.

    Args:
        name: a key of MODELS (resnet20, resnet32, resnet44, resnet56, resnet110, cnn, mlp).
        input_shape: (height, width, channels) of one raw example.
        num_classes: number of output probabilities.
        norm: batch | ghost | group | layer | none (see models.norm.normalization).
        mean: per-channel mean of the raw training pixels, shape (channels,); with `variance`, the model's first
            layer is keras Normalization, so the model takes raw pixels. None: no input normalization.
        variance: per-channel variance of the raw training pixels, shape (channels,), or None.
        ghost_batch: examples per virtual batch when norm is ghost.
        bn_momentum: moving-average momentum of batch and ghost batch norm.

    Returns:
        A functional keras.Model named `name` with input "images" and softmax output "probabilities".

    Raises:
        InputError: unknown model name (--model) or normalization (--norm).
    """
    if name not in MODELS:
        raise InputError(f"--model: got {name!r}; choose one of {', '.join(MODELS)}")
    if norm not in NORMS:
        raise InputError(f"--norm: got {norm!r}; choose one of {', '.join(NORMS)}")
    return MODELS[name](
        input_shape,
        num_classes,
        norm,
        mean=mean,
        variance=variance,
        ghost_batch=ghost_batch,
        bn_momentum=bn_momentum,
    )
