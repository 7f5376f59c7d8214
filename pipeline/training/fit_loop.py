"""One training run, `train(config) -> Summary`: config -> data -> compiled model -> fit with callbacks -> precise BN
-> evaluate -> export; every ending writes summary.json.

`python -m pipeline.train` (pipeline/train.py) is its command line; a sweep's runner, the advisor's probe and a
notebook call `train()` and `compiled_model()` from here. Each stage lives in its own module so that it can be
tested and used from a notebook; this module only wires them.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

from pipeline import config as config_lib
from pipeline import interrupts, run_timing, rundir
from pipeline.config import Config, InputError
from pipeline.training import callback_setup, distribute


@dataclasses.dataclass
class Summary:
    """What a run reports; written to <run_dir>/summary.json.

    A run may take several attempts (processes: interrupted, then --resume). The times wall_time_s, train_time_s and
    instrument_time_s are all the last attempt's, the one that wrote this summary; `attempts` counts them. The
    per-step and per-example rates come from every epoch of the run (pipeline/rundir.py).
    """

    status: str  # completed | failed | interrupted
    run_dir: str
    reason: str = ""  # why a run failed or where it was interrupted, what is done and what a rerun does
    stage: str = ""  # where a failed or interrupted run stopped: setup | training | precise_bn | evaluation | export
    strategy: str = "one"  # one | mirrored | multiworker: how the global batch was spread
    replicas: int = 1  # model copies over all devices and workers, each computing on a slice of every batch
    workers: int = 1
    per_replica_batch: int = 0  # examples per replica per step (the first phase's with a batch schedule)
    steps_per_execution: int = 1  # training steps per compiled call (--steps-per-execution resolved)
    intra_op_threads: int = 0  # threads per op in effect (--intra-op-threads resolved; 0: TensorFlow's default)
    bn_batch: int = 0  # examples that a batch-norm layer normalizes over in training (per replica, or all: syncbatch)
    train_accuracy: float | None = None  # inference mode, on the whole training split
    val_accuracy: float | None = None
    test_accuracy: float | None = None
    test_loss: float | None = None
    train_loss: float | None = None  # inference mode, on the whole training split (the generalization gap's loss)
    steps: int = 0  # batches trained, the unit of every step in the run's files (callbacks/steps.py)
    updates: int = 0  # optimizer updates: steps // accumulate
    epochs: int = 0
    attempts: int = 1  # processes that worked on this run: 1, plus one per --resume
    wall_time_s: float = 0.0  # the last attempt's, from its start to this summary
    train_time_s: float = 0.0  # the last attempt's time inside the training epochs it finished
    instrument_time_s: float = 0.0  # the part of train_time_s spent measuring (gradient/BN statistics, dynamics)
    # --batch adaptive, goodput policy: the last attempt's seconds timing the grid's batches before training (each
    # traced there), outside train_time_s and the time to target.
    batch_ladder_s: float = 0.0
    # What the instruments could not restore from the checkpoint when the run resumed, one line each.
    instruments_not_restored: list = dataclasses.field(default_factory=list)
    # These three are defined once, in pipeline/rundir.py (medians over the epochs after the first, measuring
    # left out), and the sweep report shows the same numbers.
    examples_per_sec: float = 0.0
    time_per_step_s: float = 0.0
    export_path: str | None = None
    bn_statistics: str = ""  # which statistics the evaluated and exported model uses
    batch_source: str = "--batch"  # where the batch and learning rate came from (--batch, or --advice's file)
    target_accuracy: float | None = None
    # Checked every pipeline.training.target.interval steps (the same fraction of an epoch at every batch):
    steps_to_target: int | None = None  # step of the first check at which val_accuracy >= target_accuracy
    epochs_to_target: float | None = None  # epochs trained up to that step (fractional)
    time_to_target_s: float | None = None  # training time up to that step, without measuring and checks
    final_logs: dict = dataclasses.field(default_factory=dict)  # last epoch's logs (incl. instruments)


def _fill_from_history(summary: Summary, history: list[dict], target: float, reached: dict | None,
                       accumulate: int = 1, first_epoch: int = 0) -> None:
    """Steps, epochs, training time and time-to-target from the run's history, which survives resumes, and
    pipeline/training/target.py's record of the target; the times of the epochs from first_epoch on, this attempt's."""
    from callbacks.steps import updates

    if not history:
        return
    summary.steps = history[-1]["step"]
    summary.updates = updates(summary.steps, accumulate)
    summary.epochs = history[-1]["epoch"] + 1
    attempt = [record for record in history if record["epoch"] >= first_epoch]
    summary.train_time_s = run_timing.train_time(attempt)
    summary.instrument_time_s = run_timing.instrument_time(attempt)
    summary.examples_per_sec = run_timing.examples_per_sec(history) or 0.0
    summary.time_per_step_s = run_timing.time_per_step(history) or 0.0
    summary.final_logs = {k: v for k, v in history[-1].items() if isinstance(v, (int, float))}
    if target > 0:
        summary.target_accuracy = target
    if target > 0 and reached:  # pipeline/training/target.py's record
        summary.steps_to_target = reached["step"]
        summary.epochs_to_target = reached["epoch"] + reached["epoch_fraction"]
        summary.time_to_target_s = run_timing.time_to_target(history, reached)


def compiled_model(config: Config, data, steps_per_execution: int = 1, replica_norms: bool = False,
                   adaptive: bool = False):
    """The run's model compiled with its optimizer, loss and accuracy metric; returns (model, lr schedule).

    Under a tf.distribute strategy, call it inside strategy.scope(). steps_per_execution: training steps per
    compiled call (speed.steps_per_execution); config.jit compiles them with XLA. replica_norms: the training step
    also reports the replica gradients' squared norms (callbacks/replica_norms.py; same update and weights).
    adaptive: the schedule is an optim.AdaptiveSchedule, whose phases --batch adaptive sets during the run.
    """
    from models import Norm, build_model
    from pipeline.training import optim

    norm = Norm(config.norm, ghost_batch=config.ghost_batch, bn_momentum=config.bn_momentum)
    model = build_model(config.model, data.input_shape, data.num_classes, norm, mean=data.mean,
                        variance=data.variance)
    if replica_norms:
        from callbacks.replica_norms import with_replica_norms

        model = with_replica_norms(model)
    phases = [(epoch, data.num_train // batch) for epoch, batch in config.batch_phases]
    schedule = optim.adaptive_learning_rate(config, phases[0][1]) if adaptive else optim.learning_rate(config, phases)
    model.compile(optimizer=optim.build_optimizer(config, schedule), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"], steps_per_execution=steps_per_execution, jit_compile=config.jit)
    return model, schedule


def train(config: Config) -> Summary:
    """Runs one training job described by `config` and returns its summary (also in summary.json).

    The run directory is created only once the config, the data and the checkpoint to resume are accepted.
    From then on every ending writes summary.json: completed, failed (non-finite loss, or an error, which is
    raised again after), or interrupted, with the stage it stopped in.

    Raises:
      InputError: the config, the data, the run directory or its checkpoint is unusable.
    """
    config = config_lib.validate(config)
    adaptive = config.adaptive_batch
    batch_source = "--batch-schedule" if config.batch_schedule else "--batch adaptive" if adaptive else "--batch"
    if config.advice:
        from pipeline import advised_config

        config, batch_source = advised_config.apply(config)
    # config.json records --batch adaptive as given; the run itself starts at its first phase's batch.
    recorded = config
    # With a batch schedule, --batch is the first phase's batch (the lr scaling rule refers to it).
    config = dataclasses.replace(config, batch=config.batch_phases[0][1])
    recorded = recorded if adaptive else config
    if config.strategy == "multiworker" and not config.run_dir:
        raise InputError("--run-dir: a multiworker run needs one --run-dir, the same on every worker")
    run_dir = config.run_dir or rundir.default_run_dir(recorded, time.strftime("%Y%m%d-%H%M%S"))
    if config.resume and not config.run_dir:  # the most recent unfinished run of this config, next to new runs
        run_dir = rundir.latest_resumable(recorded, os.path.dirname(run_dir))
    config, recorded = (dataclasses.replace(c, run_dir=run_dir) for c in (config, recorded))
    chief = config.strategy != "multiworker" or distribute.is_chief(distribute.read_tf_config())
    # Only the chief checks and writes the run directory; another worker continues when told to (--resume).
    continuing = rundir.check(recorded, run_dir) if chief else config.resume
    started = time.perf_counter()

    import keras
    import tensorflow as tf

    from pipeline.data import loading
    from pipeline.training import checkpoint, execution, run_control

    threads = execution.set_threads(config)  # These two before anything starts TensorFlow's runtime.
    strategy, topology = distribute.build_strategy(config)
    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    data = loading.load(config)
    for _, batch in config.batch_phases:
        if batch > data.num_train:
            raise InputError(f"--batch: {batch} is larger than the training split ({data.num_train} examples)")
        if batch % topology.replicas:
            raise InputError(f"--batch: {batch} does not split evenly over the {topology.replicas} replicas; use a "
                             "multiple of the replica count (it is the global batch)")
    parallel = {"strategy": topology.strategy, "replicas": topology.replicas, "workers": topology.workers,
                "per_replica_batch": topology.per_replica_batch(config.batch),
                # --batch adaptive: one step per call, whatever the batch's steps per epoch (validated: auto or 1).
                "steps_per_execution": 1 if adaptive else execution.steps_per_execution(config, data.num_train,
                                                                                        topology.replicas),
                "intra_op_threads": threads}
    execution.set_precision(config)
    # With replicas, the gradient statistics come from the training step itself (callbacks/replica_norms.py).
    replica_norms = topology.replicas > 1 and callback_setup.instrument_interval(config.grad_stats_every) != 0
    with strategy.scope():
        model, schedule = compiled_model(config, data, parallel["steps_per_execution"], replica_norms, adaptive)
    checkpoints = os.path.join(run_dir, "checkpoints")
    restored = None
    if continuing:  # Another worker restores from a copy: restoring removes unfinished files from its folder.
        with strategy.scope():  # Restoring builds the optimizer's variables.
            restored = checkpoint.restore(model, checkpoints if chief else distribute.worker_folder(checkpoints))
    first_epoch = restored["epoch"] if restored else 0  # of this attempt: later history records are its own
    with interrupts.deferred():  # A signal from here on ends the run with its summary (checked in the try below).
        attempts = rundir.create(recorded, run_dir, parallel) if chief else 1
        summary = Summary(status="completed", run_dir=run_dir, stage="setup", batch_source=batch_source,
                          attempts=attempts, **parallel)
    lost_worker = tf.errors.OpError if topology.workers > 1 else ()  # a collective failed: a worker is gone
    try:
        interrupts.check()
        _fit(config, data, model, run_dir, restored, schedule, summary, strategy, topology, adaptive)
        _finish(config, data, model, run_dir, summary, chief)
    except run_control.NonFiniteLoss as e:
        summary.status, summary.reason = "failed", str(e)
    except KeyboardInterrupt:
        summary.status = "interrupted"
    except lost_worker as e:
        summary.status, summary.reason = "failed", distribute.lost_worker_message(e)
    except Exception as e:
        summary.status, summary.reason = "failed", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if chief:
            _write_summary(summary, config, started, first_epoch)
        raise
    if chief:
        _write_summary(summary, config, started, first_epoch)
    return summary


@interrupts.deferred()
def _write_summary(summary: Summary, config: Config, started: float, first_epoch: int) -> None:
    """Completes the summary from the run directory and writes it; a further signal meanwhile is only recorded.
    The times are those of this attempt's epochs, from `first_epoch` on."""
    from pipeline.training import checkpoint
    from pipeline.training import target as target_lib

    _fill_from_history(summary, rundir.read_history(summary.run_dir), config.target_accuracy,
                       target_lib.read(summary.run_dir), config.accumulate, first_epoch)
    if summary.status == "interrupted":
        summary.reason = checkpoint.interrupted_reason(summary.stage, summary.epochs, summary.steps,
                                                       os.path.join(summary.run_dir, "checkpoints"))
    summary.wall_time_s = time.perf_counter() - started
    rundir.write_summary(summary.run_dir, dataclasses.asdict(summary))


def _fit(config: Config, data, model, run_dir: str, restored: dict | None, schedule, summary: Summary, strategy,
         topology, adaptive: bool = False) -> None:
    """Trains from the restored checkpoint (if any) through the batch phases to config.epochs or max_steps; with
    `adaptive` (--batch adaptive) through the phases that training/adaptive_batch.py decides as it goes."""

    bn_batch = config.batch if config.norm == "syncbatch" else topology.per_replica_batch(config.batch)
    # Under multiworker only the gradient statistics from the replicas measure (on fresh batches, BN statistics,
    # dynamics and curvature would run on the chief alone).
    if topology.workers == 1:
        measuring = callback_setup.instruments(config, data, model, run_dir, bn_batch, topology.replicas)
    else:
        gradients_only = dataclasses.replace(config, bn_stats_every=0, dynamics=False, curvature_every=0)
        measuring = callback_setup.instruments(gradients_only, data, model, run_dir, replicas=topology.replicas)
    controller = callback_setup.adaptive_batch(config, data, run_dir, topology, measuring) if adaptive else None
    if controller:  # First: at an epoch's end it decides before the instruments log their values.
        measuring.insert(0, controller)
    if config.target_accuracy and topology.workers == 1:
        measuring.append(callback_setup.target_check(config, data, run_dir, measuring))
    phases = controller.phases if controller else config.batch_phases
    # Last: a signal whose KeyboardInterrupt was lost (pipeline/interrupts.py) ends the run after the batch.
    callbacks = callback_setup.build(config, data, run_dir, schedule, strategy, topology, measuring, phases)
    callbacks.append(interrupts.callback())
    if topology.is_chief:  # the instruments go on from the state committed with the weights
        from pipeline.training import checkpoint

        folder = os.path.join(run_dir, "checkpoints")
        if controller and restored:  # its phases first: they say which epochs ended a fit() call
            checkpoint.restore_instruments([controller], folder, restored)
        fit_ends = [first for first, _ in phases[1:]] + [config.epochs]
        ended = bool(restored) and (restored["epoch"] in fit_ends or 0 < config.max_steps <= restored["step"])
        summary.instruments_not_restored = checkpoint.resume_instruments(measuring, model, folder, restored, ended)
    verbose = config.verbose if config.verbose >= 0 else (1 if sys.stdout.isatty() else 2)
    val = data.eval_dataset("val", config.batch)
    trained, steps = (restored["epoch"], restored["step"]) if restored else (0, 0)
    summary.stage = "training"
    if config.max_steps and steps >= config.max_steps:
        return
    if controller:
        from pipeline.training import adaptive_batch

        summary.batch_ladder_s = adaptive_batch.train_phases(config, data, model, controller, schedule, strategy,
                                                             topology, callbacks, val, verbose, trained)
        return
    for i, (first_epoch, batch) in enumerate(config.batch_phases):
        last_epoch = config.batch_phases[i + 1][0] if i + 1 < len(config.batch_phases) else config.epochs
        if last_epoch <= trained:
            continue
        start = max(first_epoch, trained)
        # DataInfo.fit_input chooses how each epoch's batches reach fit (one iterator for the whole call where it can,
        # so that the next epoch's input is prepared while this one trains), with the callbacks that choice needs.
        fit_input = data.fit_input(batch, seed=config.seed, first_epoch=start, epochs=last_epoch,
                                   steps_per_execution=summary.steps_per_execution)
        train_data = distribute.distribute_train(strategy, topology, fit_input.make, batch,
                                                 sharded=config.input == "stream")
        # Our datasets shuffle themselves by (seed, epoch); shuffle=False also keeps Keras from warning about it.
        model.fit(train_data, validation_data=val, shuffle=False, initial_epoch=start, epochs=last_epoch,
                  steps_per_epoch=fit_input.steps_per_epoch, callbacks=[*fit_input.callbacks, *callbacks],
                  verbose=verbose)
        if model.stop_training:
            break


def _enter(summary: Summary, stage: str) -> None:
    """Records that the run enters `stage` ("" once finished), after a signal's safe point (pipeline/interrupts.py)."""
    interrupts.check()
    summary.stage = stage


def _finish(config: Config, data, model, run_dir: str, summary: Summary, chief: bool = True) -> None:
    """Precise BN, evaluation on every split and export, each recorded as the summary's stage while it runs."""
    from callbacks import batch_norm_inputs, precise_bn
    from pipeline.serving import export as export_lib

    _enter(summary, "precise_bn")
    has_batch_norm = bool(batch_norm_inputs(model))
    if has_batch_norm and config.precise_bn_samples:
        num = min(config.precise_bn_samples, data.num_train)
        precise_bn(model, data.train_dataset(config.inference_batch, seed=config.seed, augment=False, epoch=0), num)
        summary.bn_statistics = f"precise BN: population statistics over {num} training examples"
    elif has_batch_norm:
        summary.bn_statistics = "moving averages from training (--precise-bn-samples 0)"
    else:
        summary.bn_statistics = "no batch-norm layers"
    if has_batch_norm:
        summary.bn_batch = config.batch if config.norm == "syncbatch" else summary.per_replica_batch
        summary.bn_statistics += f"; in training, batch statistics over {summary.bn_batch} examples"
        if summary.replicas > 1:
            scope = "the global batch, all-reduced" if config.norm == "syncbatch" else "each replica's slice"
            summary.bn_statistics += f" ({scope}); one set for all {summary.replicas} replicas after training"
    _enter(summary, "evaluation")
    for split in ("train", "val", "test"):
        loss, accuracy = model.evaluate(data.eval_dataset(split, config.inference_batch), verbose=0)
        setattr(summary, f"{split}_accuracy", float(accuracy))
        if split in ("train", "test"):
            setattr(summary, f"{split}_loss", float(loss))
    _enter(summary, "export")
    if config.export:
        # The first 512 training images are the warmup requests and the throughput measurement's inputs.
        examples, _ = next(iter(data.eval_dataset("train", 512)))
        # Every worker exports (saving may read variables through collectives); only the chief's export stays.
        export_dir = os.path.join(run_dir, "export") if chief else distribute.worker_folder()
        exported = export_lib.export_model(model, export_dir, config.model, examples=examples.numpy(),
                                           class_names=data.class_names)
        summary.export_path = exported if chief else None
    _enter(summary, "")
