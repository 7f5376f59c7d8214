"""The models a run can train, by name: CIFAR ResNets, a plain CNN and an MLP, each with a choice of normalization."""

from __future__ import annotations

import functools

import keras

from models.cnn import build_cnn, build_mlp
from models.norm import NORMS, GhostBatchNormalization, Norm
from models.resnet import build_resnet

__all__ = ["MODELS", "NORMS", "GhostBatchNormalization", "Norm", "build_model"]

# Every builder takes (input_shape, num_classes, norm: Norm, *, mean, variance).
MODELS = {
    "resnet20": functools.partial(build_resnet, 20),
    "resnet32": functools.partial(build_resnet, 32),
    "resnet44": functools.partial(build_resnet, 44),
    "resnet56": functools.partial(build_resnet, 56),
    "resnet110": functools.partial(build_resnet, 110),
    "cnn": build_cnn,
    "mlp": build_mlp,
}


def build_model(name: str, input_shape, num_classes: int, norm: Norm | str = "batch", *, mean=None,
                variance=None) -> keras.Model:
    """Builds a model that maps raw pixels to class probabilities.

    Args:
        name: a key of MODELS (resnet20, resnet32, resnet44, resnet56, resnet110, cnn, mlp).
        input_shape: (height, width, channels) of one raw example.
        num_classes: number of output probabilities.
        norm: the normalization layers (models.norm.Norm), or a kind alone with Norm's default settings
            (batch | ghost | group | layer | none).
        mean: per-channel mean of the raw training pixels, shape (channels,); with `variance`, the model's first
            layer is keras Normalization, so the model takes raw pixels. None: no input normalization.
        variance: per-channel variance of the raw training pixels, shape (channels,), or None.

    Returns:
        A functional keras.Model named `name` with input "images" and softmax output "probabilities".

    Raises:
        ValueError: unknown model name or normalization kind.
    """
    if name not in MODELS:
        raise ValueError(f"name: got {name!r}; choose one of {', '.join(MODELS)}")
    norm = Norm(norm) if isinstance(norm, str) else norm
    return MODELS[name](input_shape, num_classes, norm, mean=mean, variance=variance)
