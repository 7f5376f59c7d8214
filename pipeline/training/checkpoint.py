"""Training checkpoints that survive any interruption: written beside the previous one, committed by a rename.

Layout of <run_dir>/checkpoints/:
  epoch-0004.weights.h5       model and optimizer variables after 4 epochs (Keras `save_weights`)
  epoch-0004.instruments.json the instruments' state after 4 epochs ({name: get_state()}, see `instrument_states`)
  epoch-0003.*                the ones before, kept as a fallback
  checkpoint.json             {"epoch": 4, "step": 80, "weights": "epoch-0004.weights.h5",
                               "instruments": "epoch-0004.instruments.json", "previous": {...}}

A save writes the weights and the instruments' state to hidden `.partial-*` files, flushes them to disk, renames
them to their final names and then replaces checkpoint.json (itself written to a temporary file and renamed). The
rename of checkpoint.json is the commit, of the weights and the instruments' state together: a signal or `kill -9`
at any instant leaves the previous commit intact, and whatever the interrupted save left behind is removed at the
next restore with a one-line notice.

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


def instruments_name(epoch: int) -> str:
    return f"epoch-{epoch:04d}.instruments.json"


FILES = r"epoch-\d+\.(weights\.h5|instruments\.json)"  # the files of one checkpoint (a pattern)


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


def _write_instruments(states: dict, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(states, f, default=_plain)  # floats as Python writes them: read back bit for bit


def _plain(value):
    """NumPy scalars and arrays as JSON values."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def save(model, directory: str, epoch: int, step: int, instruments: dict | None = None) -> dict:
    """Commits a checkpoint of `model` and of the instruments' state after `epoch` finished epochs and `step`
    batches, and drops the one before the previous.

    Args:
      instruments: {name: state} of the run's instruments (`instrument_states`), or None.

    Returns:
      The new record of checkpoint.json.
    """
    os.makedirs(directory, exist_ok=True)
    files = [(weights_name(epoch), lambda path: _write_weights(model, path))]
    if instruments is not None:
        files.append((instruments_name(epoch), lambda path: _write_instruments(instruments, path)))
    for name, write in files:
        partial = os.path.join(directory, PARTIAL + name)
        write(partial)
        _fsync(partial)  # so that a crash of the machine, not only of the process, cannot commit a hole
        os.replace(partial, os.path.join(directory, name))
    previous = read_state(directory)
    state = {"epoch": epoch, "step": step, "weights": files[0][0],
             "instruments": files[1][0] if instruments is not None else None,
             "previous": {k: v for k, v in previous.items() if k != "previous"} if previous else None}
    _commit(directory, state)
    _remove_uncommitted(directory, state, notice=False)
    return state


def _remove_uncommitted(directory: str, state: dict | None, notice: bool) -> None:
    """Deletes checkpoint files that the committed record does not name: older ones and interrupted saves."""
    records = [state, state.get("previous") or {}] if state else []
    keep = {record.get(key) for record in records for key in ("weights", "instruments")}
    stale = [name for name in sorted(os.listdir(directory))
             if name not in keep and (name.startswith(PARTIAL) or re.fullmatch(FILES, name))]
    # Files of a later epoch than the commit (or any, without one) were left by a save that a signal cut short.
    last = state["weights"].split(".")[0] if state else ""
    unfinished = [n for n in stale if n.startswith(PARTIAL) or not state or n.split(".")[0] > last]
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
      The record of the loaded checkpoint ({"epoch": finished epochs, "step": batches trained, ...}), or None
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


def instrument_states(instruments) -> dict:
    """{name: state} of the instruments (callbacks with get_state), keyed by their class name, for `save`."""
    return {type(instrument).__name__: instrument.get_state() for instrument in instruments}


def restore_instruments(instruments, directory: str, record: dict | None) -> list[str]:
    """Gives every instrument the state that the checkpoint `record` committed with the weights, before training
    resumes; without a record (a run that starts, or resumes before its first checkpoint), the state of a new
    instrument, which also removes what an earlier attempt wrote (set_state).

    Returns:
      What could not be restored, one line each: the instruments' own (a dataset whose iterator cannot be
      restored), and the state a checkpoint lacks (one written before instruments had a state).
    """
    states, lost = {}, []
    if record:
        try:
            with open(os.path.join(directory, record.get("instruments") or ""), encoding="utf-8") as f:
                states = json.load(f)
        except (OSError, ValueError):
            states = None
    for instrument in instruments:
        name = type(instrument).__name__
        state = (states or {}).get(name)
        if state is None:
            state = instrument.get_state() | {"step": record["step"] if record else 0}
            if record:
                lost.append(f"{name}: the checkpoint of epoch {record['epoch']} holds no state of it; its records "
                            f"before step {record['step']} are lost")
        lost += instrument.set_state(state)
    return lost


def resume_instruments(instruments, model, directory: str, record: dict | None, ended_fit: bool) -> list[str]:
    """restore_instruments, then, if the checkpoint `record` ended a fit() call (`ended_fit`: the last epoch, a batch
    phase's last epoch, max_steps), that call's on_train_end, where the instruments make their last measurement and
    write their files: the checkpoint came before it, so that a run resumed from it makes them as the call would have.

    Returns:
      restore_instruments' lines, each also printed to stderr.
    """
    lost = restore_instruments(instruments, directory, record)
    for line in lost:
        print(f"--resume: {line}", file=sys.stderr)
    if ended_fit:
        for instrument in instruments:
            instrument.set_model(model)
            instrument.on_train_begin()
            instrument.on_train_end()
    return lost


def callback(directory: str, first_step, instruments=()):
    """A Keras callback that commits a checkpoint at the end of every epoch.

    A run stopped by a non-finite loss raises inside the epoch, before this runs, so the last good epoch stays.

    Args:
      directory: the checkpoint folder.
      first_step: function of an epoch giving the batches trained before it (a stop at max_steps can end an
        epoch early, so the batches of the last epoch are counted).
      instruments: callbacks with get_state and set_state, whose state is committed with the weights; they must
        come before this callback in the list, so that the state includes their work of the epoch.
    """
    import keras

    from callbacks.steps import Steps

    class EpochCheckpoint(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self._steps = Steps(None)
            self._steps.set_step(first_step(epoch))
            self._steps.epoch_begin(self.params["steps"])

        def on_train_batch_end(self, batch, logs=None):
            self._steps.batch_end(batch)

        def on_epoch_end(self, epoch, logs=None):
            save(self.model, directory, epoch + 1, self._steps.step,
                 instrument_states(instruments) if instruments else None)

    return EpochCheckpoint()


# What a rerun with --resume does after an interruption at each stage (fit_loop.Summary.stage).
STAGES = {
    "setup": "it continues from the last checkpoint",
    "training": "it continues from the last checkpoint",
    "precise_bn": "it redoes precise BN, evaluation and export from the final checkpoint without training",
    "evaluation": "it redoes precise BN, evaluation and export from the final checkpoint without training",
    "export": "it redoes precise BN, evaluation and export from the final checkpoint without training; the "
              "interrupted export stays a hidden folder that TF Serving never loads (the next export removes it)",
}


def interrupted_reason(stage: str, epochs: int, steps: int, directory: str) -> str:
    """The reason of a run interrupted at `stage` after `epochs` (`steps`): where it stopped, what is done (the last
    committed checkpoint in `directory`) and what a rerun will do."""
    state = read_state(directory)
    saved = f"checkpoint of epoch {state['epoch']}" if state else "no checkpoint yet"
    done = f"{epochs} epochs ({steps} steps) trained, {saved}"
    return (f"interrupted during {stage.replace('_', ' ')} ({done}); run the same command with --resume: "
            f"{STAGES[stage]}")
