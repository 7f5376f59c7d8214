"""Training checkpoints that survive any interruption: written beside the previous one, committed by a rename.

Layout of <run_dir>/checkpoints/:
  epoch-0004.weights.h5   model and optimizer variables after 4 epochs (Keras `save_weights`)
  epoch-0003.weights.h5   the one before, kept as a fallback
  checkpoint.json         {"epoch": 4, "step": 80, "weights": "epoch-0004.weights.h5", "previous": {...}}

A save writes the weights to a hidden `.partial-*` file, flushes it to disk, renames it to its final name and
then replaces checkpoint.json (itself written to a temporary file and renamed). The rename of checkpoint.json is
the commit: a signal or `kill -9` at any instant leaves the previous commit intact, and whatever the interrupted
save left behind is removed at the next restore with a one-line notice.

Keras' BackupAndRestore (3.15, keras/src/callbacks/backup_and_restore.py, `_save_model`) is not used because it
overwrites `latest.weights.h5` in place and writes `training_metadata.json` in a second, separate step: a signal
during the first write destroys the only checkpoint, one between the two pairs new weights with the old epoch
count. Its `double_checkpoint` option copies the previous files first, but falls back to them only on OSError,
while a truncated file fails to load with ValueError.
"""

from __future__ import annotations

import json
import os
import re
import sys

from pipeline.config import InputError
from pipeline.rundir import CHECKPOINT_STATE as STATE
from pipeline.rundir import read_checkpoint_state as read_state

PARTIAL = ".partial-"  # prefix of files that a save has not committed yet


class CheckpointError(InputError):
    """No committed checkpoint in the folder can be loaded."""


def weights_name(epoch: int) -> str:
    return f"epoch-{epoch:04d}.weights.h5"


def latest_weights(directory: str) -> str | None:
    """Path of the last committed weights file, or None when nothing was committed."""
    state = read_state(directory)
    return os.path.join(directory, state["weights"]) if state else None


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_weights(model, path: str) -> None:
    """Writes the model's and optimizer's variables to `path` (its own function so that tests can slow it)."""
    model.save_weights(path, overwrite=True)


def _commit(directory: str, state: dict) -> None:
    """Replaces checkpoint.json by `state` with one rename: the instant a checkpoint becomes the latest."""
    tmp = os.path.join(directory, PARTIAL + STATE)
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(state, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(directory, STATE))
    _fsync(directory)  # the rename itself reaches the disk


def save(model, directory: str, epoch: int, step: int) -> dict:
    """Commits a checkpoint of `model` after `epoch` finished epochs and `step` batches, and drops the one before
    the previous.

    Returns:
      The new record of checkpoint.json.
    """
    os.makedirs(directory, exist_ok=True)
    name = weights_name(epoch)
    partial = os.path.join(directory, PARTIAL + name)
    _write_weights(model, partial)
    _fsync(partial)  # so that a crash of the machine, not only of the process, cannot commit a hole
    os.replace(partial, os.path.join(directory, name))
    previous = read_state(directory)
    state = {"epoch": epoch, "step": step, "weights": name,
             "previous": {k: v for k, v in previous.items() if k != "previous"} if previous else None}
    _commit(directory, state)
    _remove_uncommitted(directory, state, notice=False)
    return state


def _remove_uncommitted(directory: str, state: dict | None, notice: bool) -> None:
    """Deletes checkpoint files that the committed record does not name: older ones and interrupted saves."""
    keep = {state["weights"], (state.get("previous") or {}).get("weights")} if state else set()
    stale = [name for name in sorted(os.listdir(directory))
             if name not in keep and (name.startswith(PARTIAL) or re.fullmatch(r"epoch-\d+\.weights\.h5", name))]
    # Files newer than the commit (or any, without one) were left by a save that a signal cut short.
    unfinished = [n for n in stale if n.startswith(PARTIAL) or not state or n > state["weights"]]
    if notice and unfinished:
        print(f"checkpoint: ignoring {', '.join(unfinished)} in {directory}, left unfinished by an interrupted save",
              file=sys.stderr)
    for name in stale:
        os.remove(os.path.join(directory, name))


def restore(model, directory: str) -> dict | None:
    """Loads the last committed checkpoint into `model` (weights and optimizer state) and returns its record.

    A committed file that cannot be read (damaged after the commit, e.g. by a full disk) is reported in one
    line and the previous checkpoint is loaded instead.

    Returns:
      The record of the loaded checkpoint ({"epoch": finished epochs, "step": optimizer steps, ...}), or None
      when the folder holds no committed checkpoint.
    Raises:
      CheckpointError: no committed checkpoint can be loaded.
    """
    if not os.path.isdir(directory):
        return None
    state = read_state(directory)
    _remove_uncommitted(directory, state, notice=True)
    if state is None:
        return None
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)  # its variables must exist to be loaded
    for record in (state, state.get("previous")):
        if not record:
            continue
        path = os.path.join(directory, record["weights"])
        try:
            model.load_weights(path)
            return record
        except (OSError, ValueError) as e:
            print(f"checkpoint: cannot load {path} ({str(e).splitlines()[0][:120]}); trying the previous one",
                  file=sys.stderr)
    raise CheckpointError(f"no checkpoint in {directory} can be loaded; pass --overwrite to start the run again")


def callback(directory: str, first_step):
    """A Keras callback that commits a checkpoint at the end of every epoch.

    A run stopped by a non-finite loss raises inside the epoch, before this runs, so the last good epoch stays.

    Args:
      directory: the checkpoint folder.
      first_step: function of an epoch giving the batches trained before it (a stop at max_steps can end an
        epoch early, so the batches of the last epoch are counted).
    """
    import keras

    class EpochCheckpoint(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self._batches = 0

        def on_train_batch_end(self, batch, logs=None):
            self._batches = batch + 1

        def on_epoch_end(self, epoch, logs=None):
            save(self.model, directory, epoch + 1, first_step(epoch) + self._batches)

    return EpochCheckpoint()
