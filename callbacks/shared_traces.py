"""Traced functions shared by the models of one architecture in a process, so that a sweep traces them once.

A sweep trains its runs one after another in one process, each with a new model of the same architecture, and every
traced function that reads a model's variables would be traced again for each (1-4 s each for ResNet-20: the
Hessian-vector product, precise BN's level functions). A function made here instead takes the weights as arguments
and evaluates a template model of the architecture at them: `keras.StatelessScope(state_mapping=template_mapping(
template, trainable, non_trainable))` makes the template's variables read as the given values. `shared(model, name,
make)` returns make(template) for the first model of `model`'s architecture seen under `name`, and the same object for
every later one.

Two models share a template only when they are functional or Sequential Keras models (exact classes: a subclass may
override call or compute_loss) whose configs agree once layer names are replaced by their positions (Keras names
layers with a per-process counter) and whose compiled losses serialize alike. Any other model gets make(model) of its
own. The most recent MAX_SHARED entries are kept (each holds its template model).
"""

from __future__ import annotations

import collections
import json

import keras
import tensorflow as tf

MAX_SHARED = 8
_SHARED: collections.OrderedDict = collections.OrderedDict()  # (name, architecture key) -> make(template)
_SHAREABLE = (("keras.src.models.functional", "Functional"), ("keras.src.models.sequential", "Sequential"))


def shared(model, name: str, make):
    """make(template) for `model`'s architecture under `name`, made on the first such model (module docstring)."""
    architecture = architecture_key(model)
    if architecture is None:
        return make(model)
    key = (name, architecture)
    if key not in _SHARED:
        _SHARED[key] = make(model)
        while len(_SHARED) > MAX_SHARED:
            _SHARED.popitem(last=False)
    _SHARED.move_to_end(key)
    return _SHARED[key]


def weights(model) -> tuple[list[tf.Tensor], list[tf.Tensor]]:
    """The current values of `model`'s trainable and non-trainable variables, the arguments of a shared function."""
    return ([tf.convert_to_tensor(v.value) for v in model.trainable_variables],
            [tf.convert_to_tensor(v.value) for v in model.non_trainable_variables])


def weight_specs(template) -> list[list[tf.TensorSpec]]:
    """The input signature of `weights(model)` for a model of `template`'s architecture."""
    return [[tf.TensorSpec(v.shape, v.dtype) for v in variables]
            for variables in (template.trainable_variables, template.non_trainable_variables)]


def template_mapping(template, trainable, non_trainable) -> list:
    """The StatelessScope state mapping that makes `template`'s variables read as the given values."""
    return [*zip(template.trainable_variables, trainable), *zip(template.non_trainable_variables, non_trainable)]


def architecture_key(model) -> str | None:
    """The model's config and compiled loss as JSON, layer names replaced by their positions; None for a model whose
    config does not define it (not exactly a functional or Sequential model, or no config)."""
    kind = type(model)
    if (kind.__module__, kind.__name__) not in _SHAREABLE:
        return None
    try:
        loss = keras.saving.serialize_keras_object(getattr(model, "loss", None))
        described = [kind.__name__, model.get_config(), loss]
    except (NotImplementedError, TypeError, ValueError):
        return None
    names = {layer.name: f"#layer{i}" for i, layer in enumerate(model._flatten_layers(include_self=True))}

    def renamed(value):
        if isinstance(value, str):
            return names.get(value, value)
        if isinstance(value, dict):
            return {k: renamed(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [renamed(v) for v in value]
        return value

    return json.dumps(renamed(described), sort_keys=True, default=repr)
