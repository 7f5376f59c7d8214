"""Two version-gated fixes that let Keras 3.15.1 `fit` run under tf.distribute.MultiWorkerMirroredStrategy.

Keras 3.15.1's TensorFlow trainer fails with two or more workers (upstream, open:
https://github.com/keras-team/keras/issues/20585; the TensorFlow report
https://github.com/tensorflow/tensorflow/issues/72388 was closed with "use Keras 2"):

1. `TensorFlowTrainer._maybe_symbolic_build` calls `strategy.reduce("MEAN", (x, y), axis=None)` on the first
   batch only to learn its shapes; the collective strategy cannot reduce a nested structure ("Attempt to
   convert a value (PerReplica:{...}) to a Tensor"). The fix builds from the first local replica's batch, which
   has the per-replica shape, as the single-worker path does.
2. `reduce_per_replica` reduces every log with `strategy.reduce("MEAN", v, axis=0)` in multi-worker mode; the
   logs are scalars ("Invalid reduction dimension 0 for input with 0 dimensions"). The fix reduces scalars
   with axis=None (the mean over replicas) and leaves every other case to the original function.

Nothing else in this project touches Keras internals. `patch()` refuses any Keras whose patched functions differ
from the ones these fixes were written against (their source hashes below), so a new Keras fails loudly here
instead of being patched blindly; tests/test_distribute.py checks the hashes against the installed Keras.
"""

from __future__ import annotations

import hashlib
import inspect

PATCHED_KERAS = "3.15.1"
# sha256 of inspect.getsource() of the functions patched below, as shipped in Keras PATCHED_KERAS.
SOURCE_SHA256 = {
    "TensorFlowTrainer._maybe_symbolic_build": "92a504f5eba9b29f81f1bf26180bdd5bf5186b06b7bda426534b90d2d02bc1c2",
    "reduce_per_replica": "2e7d54b1e6edc29a8c6a7e6b66cd4c8be3ba7842412c93753ac3afe169fa7fb8",
}

_applied = False


def _trainer_module():
    from keras.src.backend.tensorflow import trainer

    return trainer


def _originals() -> dict:
    trainer = _trainer_module()
    return {
        "TensorFlowTrainer._maybe_symbolic_build": getattr(trainer.TensorFlowTrainer._maybe_symbolic_build,
                                                           "__wrapped_original__",
                                                           trainer.TensorFlowTrainer._maybe_symbolic_build),
        "reduce_per_replica": getattr(trainer.reduce_per_replica, "__wrapped_original__", trainer.reduce_per_replica),
    }


def source_hashes() -> dict[str, str]:
    """sha256 of the installed Keras' source of each function that patch() replaces."""
    return {name: hashlib.sha256(inspect.getsource(fn).encode()).hexdigest() for name, fn in _originals().items()}


def check_patchable() -> None:
    """Raises RuntimeError unless the installed Keras is the version, and has the functions, these fixes are for."""
    import keras

    if keras.__version__ != PATCHED_KERAS:
        raise RuntimeError(
            f"multi-worker training needs Keras {PATCHED_KERAS} (installed: {keras.__version__}); "
            "pipeline/training/keras_compat.py patches two functions of that version only (keras-team/keras#20585)")
    changed = [name for name, digest in source_hashes().items() if digest != SOURCE_SHA256[name]]
    if changed:
        raise RuntimeError(f"Keras {keras.__version__} differs from the release pipeline/training/keras_compat.py was written "
                           f"for in {', '.join(changed)}; refusing to patch")


def patch() -> None:
    """Replaces the two Keras functions with their fixed versions (idempotent). Raises RuntimeError on other Keras."""
    global _applied
    if _applied:
        return
    check_patchable()
    import tensorflow as tf
    from keras.src import tree

    trainer = _trainer_module()
    original_build, original_reduce = trainer.TensorFlowTrainer._maybe_symbolic_build, trainer.reduce_per_replica

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        if self._distribute_strategy is None:
            return
        if iterator is not None:
            for _, _, it in iterator:
                batch = next(it)
                # The first local replica's batch: build only needs shapes, and a collective strategy cannot
                # reduce a nested structure.
                data_batch = tree.map_structure(
                    lambda x: self.distribute_strategy.experimental_local_results(x)[0]
                    if isinstance(x, tf.distribute.DistributedValues) else x, batch)
                break
        with self.distribute_strategy.scope():
            self._symbolic_build(data_batch=data_batch)

    def reduce_per_replica(values, strategy, reduction):
        if reduction in ("auto", "mean") and trainer._collective_all_reduce_multi_worker(strategy):
            def reduce(v):
                if v.shape.rank == 0:  # A scalar log: the mean over all replicas of all workers.
                    return strategy.reduce("MEAN", v, axis=None)
                return original_reduce(v, strategy, reduction)

            return tree.map_structure(reduce, values)
        return original_reduce(values, strategy, reduction)

    _maybe_symbolic_build.__wrapped_original__ = original_build
    reduce_per_replica.__wrapped_original__ = original_reduce
    trainer.TensorFlowTrainer._maybe_symbolic_build = _maybe_symbolic_build
    trainer.reduce_per_replica = reduce_per_replica
    _applied = True
