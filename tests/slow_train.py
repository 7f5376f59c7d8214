"""`python -m pipeline.train` with test-only pauses, so that tests can interrupt a run at a chosen moment.

Usage: python tests/slow_train.py TRAIN_FLAGS..., with these environment variables (all optional):
  SLOW_CHECKPOINT_S  seconds of each pause inside a checkpoint save: the weights file is written in two
                     halves with a pause between them (a signal then leaves a truncated file), then it pauses
                     before the rename and again before checkpoint.json is replaced (the commit)
  PAUSE_STAGE        precise_bn | evaluation | export: pause PAUSE_S seconds (default 600) in that stage, after
                     creating the file PAUSE_MARKER, so that a test knows when to send its signal; training: the
                     same after the second training batch; weakref: the same inside a weakref callback run after
                     the second training batch (where a KeyboardInterrupt is printed and lost)
  SUMMARY_MARKER     pause SUMMARY_PAUSE_S seconds (default 600) while the summary is written, after creating this file
"""

import os
import signal
import sys
import time
import weakref

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline import train  # noqa: E402
from pipeline.training import checkpoint, fit_loop


def slow_checkpoints(pause: float) -> None:
    write_weights, commit = checkpoint._write_weights, checkpoint._commit

    def slow_write(model, path):
        write_weights(model, path)
        with open(path, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            time.sleep(pause)
            f.write(data[len(data) // 2 :])
        time.sleep(pause)

    def slow_commit(directory, state):
        time.sleep(pause)
        commit(directory, state)

    checkpoint._write_weights, checkpoint._commit = slow_write, slow_commit


def pause_in(stage: str, marker: str, seconds: float) -> None:
    def pause():
        open(marker, "w").close()
        time.sleep(seconds)

    if stage == "precise_bn":
        import callbacks

        precise_bn = callbacks.precise_bn
        callbacks.precise_bn = lambda *args, **kwargs: (pause(), precise_bn(*args, **kwargs))[1]
    elif stage == "evaluation":
        import keras

        evaluate = keras.Model.evaluate

        def paused_evaluate(self, *args, **kwargs):
            if "_use_cached_eval_dataset" not in kwargs:  # not fit's validation
                pause()
            return evaluate(self, *args, **kwargs)

        keras.Model.evaluate = paused_evaluate
    elif stage == "export":
        import keras

        archive_class = type(keras.export.ExportArchive())  # the backend's class, which export.py gets
        write_out = archive_class.write_out

        def paused_write_out(self, *args, **kwargs):
            write_out(self, *args, **kwargs)  # the SavedModel is in its hidden folder, not yet renamed into place
            pause()

        archive_class.write_out = paused_write_out
    elif stage in ("training", "weakref"):
        import keras

        from pipeline.training import callback_setup

        class Resource:  # stands for a TensorFlow object whose deleter runs in a weakref callback
            pass

        def after_batch(batch, logs=None, calls=[]):
            calls.append(batch)
            if len(calls) != 2:
                return
            if stage == "training":
                pause()
                return
            resource = Resource()
            deleter = weakref.ref(resource, lambda ref: pause())  # noqa: F841 -- alive until `del` runs it
            del resource

        build = callback_setup.build
        callback_setup.build = lambda *args: build(*args) + [keras.callbacks.LambdaCallback(on_train_batch_end=after_batch)]


def pause_in_summary(marker: str, seconds: float) -> None:
    fill = fit_loop._fill_from_history

    def paused_fill(*args):
        open(marker, "w").close()
        time.sleep(seconds)
        fill(*args)

    fit_loop._fill_from_history = paused_fill


if __name__ == "__main__":
    # The tests interrupt this process with SIGINT: Python turns it into KeyboardInterrupt only when SIGINT was not
    # ignored at start-up, and a shell's background job (`pytest &` without job control) starts with it ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if os.environ.get("SLOW_CHECKPOINT_S"):
        slow_checkpoints(float(os.environ["SLOW_CHECKPOINT_S"]))
    if os.environ.get("PAUSE_STAGE"):
        from pipeline import startup

        startup.import_tensorflow()
        pause_in(os.environ["PAUSE_STAGE"], os.environ["PAUSE_MARKER"], float(os.environ.get("PAUSE_S", 600)))
    if os.environ.get("SUMMARY_MARKER"):
        pause_in_summary(os.environ["SUMMARY_MARKER"], float(os.environ.get("SUMMARY_PAUSE_S", 600)))
    sys.exit(train.main())
