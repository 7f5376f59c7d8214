"""Trains, evaluates and exports one model: `python -m pipeline.train --batch 32`.

This file only wires the stages (config -> data -> model -> fit with callbacks -> precise BN -> evaluate
-> export); each stage lives in its own module so that it can be tested and used from a notebook.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

from pipeline import config as config_lib
from pipeline import flags, rundir, startup
from pipeline.config import Config, InputError


@dataclasses.dataclass
class Summary:
    """What a run reports; written to <run_dir>/summary.json."""

    status: str  # completed | failed | interrupted
    run_dir: str
    reason: str = ""  # why a run failed or where it was interrupted, what is done and what a rerun does
    stage: str = ""  # where a failed or interrupted run stopped: setup | training | precise_bn | evaluation | export
    train_accuracy: float | None = None  # inference mode, on the whole training split
    val_accuracy: float | None = None
    test_accuracy: float | None = None
    test_loss: float | None = None
    steps: int = 0  # batches trained (optimizer updates are steps / accumulate)
    epochs: int = 0
    wall_time_s: float = 0.0  # this process, from start to summary
    train_time_s: float = 0.0  # time inside training epochs, summed over resumed attempts
    instrument_time_s: float = 0.0  # the part of train_time_s spent measuring (gradient/BN statistics, dynamics)
    examples_per_sec: float = 0.0  # this and the times below leave out the first epoch and the measuring
    time_per_step_s: float = 0.0
    export_path: str | None = None
    bn_statistics: str = ""  # which statistics the evaluated and exported model uses
    batch_source: str = "--batch"  # where the batch and learning rate came from (--batch, or --advice's file)
    target_accuracy: float | None = None
    # Checked every pipeline.target.interval steps (the same fraction of an epoch at every batch):
    steps_to_target: int | None = None  # step of the first check at which val_accuracy >= target_accuracy
    epochs_to_target: float | None = None  # epochs trained up to that step (fractional)
    time_to_target_s: float | None = None  # training time up to that step, without measuring and checks
    final_logs: dict = dataclasses.field(default_factory=dict)  # last epoch's logs (incl. instruments)


def _fill_from_history(summary: Summary, history: list[dict], target: float, reached: dict | None) -> None:
    """Steps, epochs, training time and time-to-target from the run's history, which survives resumes, and
    pipeline/target.py's record of the target."""
    if not history:
        return
    summary.steps = history[-1]["step"]
    summary.epochs = history[-1]["epoch"] + 1
    summary.train_time_s = sum(r["epoch_time_s"] for r in history)
    summary.instrument_time_s = sum(r.get("instrument_time_s", 0.0) for r in history)
    training = [r["epoch_time_s"] - r.get("instrument_time_s", 0.0) for r in history]
    # Throughput leaves out the first epoch, which includes tracing and compiling the train step.
    steady = history[1:] or history
    seconds = sum(training[1:] or training)
    summary.examples_per_sec = sum(r["examples_per_sec"] * t for r, t in zip(steady, training[-len(steady):]))
    summary.examples_per_sec /= max(seconds, 1e-9)
    steps = steady[-1]["step"] - (history[0]["step"] if len(history) > 1 else 0)
    summary.time_per_step_s = seconds / max(steps, 1)
    summary.final_logs = {k: v for k, v in history[-1].items() if isinstance(v, (int, float))}
    if target > 0:
        summary.target_accuracy = target
    if target > 0 and reached:  # pipeline/target.py's record
        summary.steps_to_target = reached["step"]
        summary.epochs_to_target = reached["epoch"] + reached["epoch_fraction"]
        earlier = sum(seconds for record, seconds in zip(history, training) if record["epoch"] < reached["epoch"])
        summary.time_to_target_s = earlier + reached["seconds_into_epoch"]


# Training examples whose predictions LearningDynamics follows at each epoch end (Toneva et al. 2019 use the
# whole set). A look costs ~0.1 of a training step per example (ResNet-20 on digits: ~12 ms for 258 examples
# against a 0.6 s epoch), so a tenth of the training set costs ~1% of an epoch; at most 1000 examples.
DYNAMICS_FRACTION, DYNAMICS_MAX = 0.1, 1000


def instruments(config: Config, data, model, run_dir: str) -> list:
    """The measuring callbacks that config turns on: gradient and BN statistics, learning dynamics.

    They draw their batches from a dataset object of their own (seed + 1), never from the training iterator.
    """
    import callbacks

    tensorboard_dir = os.path.join(run_dir, "tensorboard")
    instrument_data = data.stream(config.batch, seed=config.seed + 1)
    grad_every = config_lib.instrument_interval(config.grad_stats_every)
    bn_every = config_lib.instrument_interval(config.bn_stats_every)
    result = []
    if grad_every:
        with config_lib.as_flag_error("grad_stats_every"):
            result.append(callbacks.GradientStatistics(
                instrument_data, every_n_steps=grad_every, batch_size=config.batch * config.accumulate,
                population=data.num_train, log_dir=tensorboard_dir,
                out_path=os.path.join(run_dir, "grad_stats.jsonl")))
    if bn_every and callbacks.batch_norm_inputs(model):
        # Population statistics over the un-augmented training examples that precise BN uses.
        population = data.train_dataset(config.batch, seed=config.seed, augment=False, epoch=0)
        with config_lib.as_flag_error("bn_stats_every"):
            result.append(callbacks.BatchNormStatistics(instrument_data, every_n_steps=bn_every, log_dir=tensorboard_dir,
                                                        out_dir=run_dir, population=population))
    if config.dynamics:
        x, y = data.arrays("train")
        subset = min(DYNAMICS_MAX, max(1, int(len(x) * DYNAMICS_FRACTION)))
        with config_lib.as_flag_error("dynamics"):
            result.append(callbacks.LearningDynamics(
                x[:subset], y[:subset], class_names=data.class_names, log_dir=tensorboard_dir,
                out_dir=os.path.join(run_dir, "dynamics")))
    return result


def _callbacks(config, data, model, run_dir, schedule):
    """The callback list, in order: instruments first, so that loggers after them see their values."""
    import keras

    from callbacks import timing
    from callbacks.epoch_logs import DropUnmeasured
    from pipeline import checkpoint
    from pipeline import run_callbacks as run
    from pipeline import target as target_lib

    phases = config.batch_phases
    measuring = instruments(config, data, model, run_dir)
    if config.target_accuracy:  # its checking time is left out of training time, as the instruments' is
        every = target_lib.interval(data.num_train // config.batch, config.target_checks_per_epoch)
        measuring.append(target_lib.TargetCheck(data.eval_dataset("val", max(config.batch, 256)),
                                                config.target_accuracy, every, run_dir,
                                                lambda: timing.seconds(measuring)))
    result = [run.SetEpoch(data), run.StopOnNonFinite()]
    if config.max_steps:
        result.append(run.StopAtMaxSteps(config.max_steps, phases, data.num_train))
    result += measuring
    result += [
        run.MetricsLogger(run_dir, phases, data.num_train, schedule, measuring),
        # CSVLogger sees an instrument's NaN in epochs without a new measurement (stable columns); TensorBoard and
        # the console line, after DropUnmeasured, see only measured values.
        keras.callbacks.CSVLogger(os.path.join(run_dir, "metrics.csv"), append=True),
        DropUnmeasured(),
        keras.callbacks.TensorBoard(os.path.join(run_dir, "tensorboard"), write_graph=False),
        # Committed at every epoch end and kept at the end, so a NaN stop keeps the last good epoch.
        checkpoint.callback(os.path.join(run_dir, "checkpoints"),
                            lambda epoch: run.first_step(epoch, phases, data.num_train)),
    ]
    return result


def compiled_model(config: Config, data):
    """The run's model compiled with its optimizer, loss and accuracy metric; returns (model, lr schedule)."""
    from models import Norm, build_model
    from pipeline import optim

    norm = Norm(config.norm, ghost_batch=config.ghost_batch, bn_momentum=config.bn_momentum)
    model = build_model(config.model, data.input_shape, data.num_classes, norm, mean=data.mean,
                        variance=data.variance)
    schedule = optim.learning_rate(config, [(epoch, data.num_train // batch) for epoch, batch in config.batch_phases])
    model.compile(optimizer=optim.build_optimizer(config, schedule), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model, schedule


# What a rerun with --resume does after an interruption at each stage (Summary.stage).
STAGES = {
    "setup": "it continues from the last checkpoint",
    "training": "it continues from the last checkpoint",
    "precise_bn": "it redoes precise BN, evaluation and export from the final checkpoint without training",
    "evaluation": "it redoes precise BN, evaluation and export from the final checkpoint without training",
    "export": "it redoes precise BN, evaluation and export from the final checkpoint without training; the "
              "interrupted export stays a hidden folder that TF Serving never loads",
}


def _interrupted(summary: Summary, checkpoint_state: dict | None) -> str:
    """The reason of an interrupted run: where it stopped, what is done and what a rerun will do."""
    saved = f"checkpoint of epoch {checkpoint_state['epoch']}" if checkpoint_state else "no checkpoint yet"
    done = f"{summary.epochs} epochs ({summary.steps} steps) trained, {saved}"
    return (f"interrupted during {summary.stage.replace('_', ' ')} ({done}); run the same command with --resume: "
            f"{STAGES[summary.stage]}")


def train(config: Config) -> Summary:
    """Runs one training job described by `config` and returns its summary (also in summary.json).

    The run directory is created only once the config, the data and the checkpoint to resume are accepted.
    From then on every ending writes summary.json: completed, failed (non-finite loss, or an error, which is
    raised again after), or interrupted, with the stage it stopped in.

    Raises:
      InputError: the config, the data, the run directory or its checkpoint is unusable.
    """
    config = config_lib.validate(config)
    batch_source = "--batch-schedule" if config.batch_schedule else "--batch"
    if config.advice:
        from pipeline import advice

        config, batch_source = advice.apply(config)
    # With a batch schedule, --batch is the first phase's batch (the lr scaling rule refers to it).
    config = dataclasses.replace(config, batch=config.batch_phases[0][1])
    run_dir = config.run_dir or config_lib.default_run_dir(config, time.strftime("%Y%m%d-%H%M%S"))
    config = dataclasses.replace(config, run_dir=run_dir)
    continuing = rundir.check(config, run_dir)
    started = time.perf_counter()

    import keras
    import tensorflow as tf

    from pipeline import checkpoint
    from pipeline import data as data_lib
    from pipeline import run_callbacks

    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    data = data_lib.load(config)
    for _, batch in config.batch_phases:
        if batch > data.num_train:
            raise InputError(f"--batch: {batch} is larger than the training split ({data.num_train} examples)")
    model, schedule = compiled_model(config, data)
    checkpoints = os.path.join(run_dir, "checkpoints")
    restored = checkpoint.restore(model, checkpoints) if continuing else None
    rundir.create(config, run_dir)

    summary = Summary(status="completed", run_dir=run_dir, stage="setup", batch_source=batch_source)
    try:
        _fit(config, data, model, run_dir, restored, schedule, summary)
        _finish(config, data, model, run_dir, summary)
    except run_callbacks.NonFiniteLoss as e:
        summary.status, summary.reason = "failed", str(e)
    except KeyboardInterrupt:
        summary.status = "interrupted"
    except Exception as e:
        summary.status, summary.reason = "failed", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        _write_summary(summary, config, started)
        raise
    _write_summary(summary, config, started)
    return summary


def _write_summary(summary: Summary, config: Config, started: float) -> None:
    from pipeline import checkpoint

    from pipeline import target as target_lib

    _fill_from_history(summary, rundir.read_history(summary.run_dir), config.target_accuracy,
                       target_lib.read(summary.run_dir))
    if summary.status == "interrupted":
        summary.reason = _interrupted(summary, checkpoint.read_state(os.path.join(summary.run_dir, "checkpoints")))
    summary.wall_time_s = time.perf_counter() - started
    rundir.write_json_atomic(os.path.join(summary.run_dir, "summary.json"), dataclasses.asdict(summary))


def _fit(config: Config, data, model, run_dir: str, restored: dict | None, schedule, summary: Summary) -> None:
    """Trains from the restored checkpoint (if any) through the batch phases to config.epochs or max_steps."""
    callbacks = _callbacks(config, data, model, run_dir, schedule)
    verbose = config.verbose if config.verbose >= 0 else (1 if sys.stdout.isatty() else 2)
    val = data.eval_dataset("val", config.batch)
    trained, steps = (restored["epoch"], restored["step"]) if restored else (0, 0)
    summary.stage = "training"
    if config.max_steps and steps >= config.max_steps:
        return
    for i, (first_epoch, batch) in enumerate(config.batch_phases):
        last_epoch = config.batch_phases[i + 1][0] if i + 1 < len(config.batch_phases) else config.epochs
        if last_epoch <= trained:
            continue
        # Our datasets shuffle themselves by (seed, epoch); shuffle=False also keeps Keras from warning about it.
        model.fit(data.train_dataset(batch, seed=config.seed), validation_data=val, shuffle=False,
                  initial_epoch=max(first_epoch, trained), epochs=last_epoch, callbacks=callbacks, verbose=verbose)
        if model.stop_training:
            break


def _finish(config: Config, data, model, run_dir: str, summary: Summary) -> None:
    """Precise BN, evaluation on every split and export, each recorded as the summary's stage while it runs."""
    from callbacks import batch_norm_inputs, precise_bn
    from pipeline import export as export_lib

    summary.stage = "precise_bn"
    has_batch_norm = bool(batch_norm_inputs(model))
    if has_batch_norm and config.precise_bn_samples:
        num = min(config.precise_bn_samples, data.num_train)
        precise_bn(model, data.train_dataset(config.batch, seed=config.seed, augment=False, epoch=0), num)
        summary.bn_statistics = f"precise BN: population statistics over {num} training examples"
    elif has_batch_norm:
        summary.bn_statistics = "moving averages from training (--precise-bn-samples 0)"
    else:
        summary.bn_statistics = "no batch-norm layers"
    summary.stage = "evaluation"
    for split in ("train", "val", "test"):
        loss, accuracy = model.evaluate(data.eval_dataset(split, max(config.batch, 256)), verbose=0)
        setattr(summary, f"{split}_accuracy", float(accuracy))
        if split == "test":
            summary.test_loss = float(loss)
    summary.stage = "export"
    if config.export:
        # The first 512 training images are the warmup requests and the throughput measurement's inputs.
        examples, _ = next(iter(data.eval_dataset("train", 512)))
        summary.export_path = export_lib.export_model(model, os.path.join(run_dir, "export"), config.model,
                                                      examples=examples.numpy(), class_names=data.class_names)
    summary.stage = ""


def main(argv=None) -> int:
    """Parses flags, trains, prints the summary as one JSON line; bad input exits with code 2 and one line."""
    try:
        config, _ = flags.parse(argv, description=__doc__.splitlines()[0])
        startup.import_tensorflow()
        summary = train(config)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Before the run directory was created: there is nothing to resume.
        print(json.dumps({"status": "interrupted", "stage": "setup", "run_dir": None}))
        print("interrupted before the run started; nothing was written", file=sys.stderr)
        return 130
    keys = ("status", "stage", "reason", "test_accuracy", "val_accuracy", "train_accuracy", "steps", "wall_time_s",
            "export_path", "run_dir")
    print(json.dumps({k: getattr(summary, k) for k in keys}, default=str))
    if summary.status != "completed":
        print(f"run {summary.status}: {summary.reason}", file=sys.stderr)
    return {"completed": 0, "failed": 1, "interrupted": 130}[summary.status]


if __name__ == "__main__":
    sys.exit(main())
