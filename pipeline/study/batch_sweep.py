"""Batch-size sweeps over train(): `python -m pipeline.sweep --batch 8,16,32,64,128,256 --norm batch,group`.

Every (norm, batch, seed) combination is one in-process call of pipeline.training.fit_loop.train() with its own run
directory <out>/runs/<norm>-b<batch>-s<seed>. With --replicas 1,2,4 every combination also runs on each number of
replicas at the same global batch, in <out>/runs/<norm>-b<batch>-r<replicas>-s<seed>: one device for 1, else
MirroredStrategy over the first R GPUs, or over R logical CPUs when there is no GPU, each such run in a process
of its own (pipeline/study/runner.py says why). BatchNorm then normalizes over the per-replica batch B / R, the batch
per device of He et al. 2016 and Goyal et al. 2017 (syncbatch: over B), and the report sets the BN statistics'
error against it. Running the same command again skips finished runs (completed,
or diverged: a failure is a result) and resumes the others from their last checkpoint (interrupted, killed, or
stopped by an error such as running out of memory, recorded in the run's error.txt), so a sweep stopped by
Ctrl-C or a crash continues where it stopped. The report (pipeline/study/sweep_report.py) is written
to <out> at the end: report.md, report.json, PNG plots and TensorBoard HParams data
(`tensorboard --logdir <out>`).

By default a sweep runs seeds 0, 1 and 2 at batch 8, 16, 32, 64 and 128 (DEFAULT_SEEDS, DEFAULT_BATCHES), so that
its report shows run-to-run spread next to the validation set's sampling noise (pipeline/study/bootstrap.py).

A sweep is a preset Config (config.batch_study(), or --config FILE.json) that every train flag overrides with its
meaning in pipeline.train, plus a Spec: the batches, norms and seeds it runs, the budget and the tuner.

Budget: every run gets the same budget in epochs (--epochs, the default: equal examples for every batch; also
spelled --budget-epochs), optimizer steps (--budget-steps: equal updates, Config.max_steps) or examples
(--budget-examples: max_steps = examples // batch). A step or example budget sets Config.epochs to the whole epochs that hold
it, ceil(max_steps / (num_train // batch)), and stops at max_steps; the schedule (cosine by default) spans
those whole epochs, so the learning rate has not quite decayed to its end value at max_steps.

Instruments: with automatic intervals (--grad-stats-every -1, --bn-stats-every -1), every run measures its
gradient and BatchNorm statistics MEASUREMENTS_PER_RUN times, evenly over its budget
(pipeline/training/callback_setup.py's instrument_interval).

Learning rate: --lr (also spelled --base-lr) is the learning rate at --base-batch examples per step, scaled to each
batch by --lr-scaling: linear, lr = base_lr * B / base_batch (Goyal et al. 2017), or sqrt, lr = base_lr *
sqrt(B / base_batch). With a scaling rule and no --warmup-epochs, each run warms up linearly over the first
WARMUP_FRACTION of its epochs (Goyal et al. 2017 warm up 5 of 90 epochs). --tuner tunes the learning rate
for each batch size instead (Shallue et al. 2018); see pipeline/study/tuning.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import os
import sys
import time

from pipeline import config as config_lib
from pipeline import cli, flags, rundir, startup
from pipeline.config import Config, InputError
from pipeline.study import runner, tuning
from pipeline.study import sweep_report as report_lib
from pipeline.training import callback_setup, execution

WARMUP_FRACTION = 5 / 90  # share of each run's epochs spent warming up under a scaling rule (Goyal et al. 2017)
# The default study: three seeds per batch size, so that the report shows run-to-run spread (with one seed it can only
# say that the spread is unknown) with two degrees of freedom per batch size, within a ten-minute budget on a 2-core
# machine (docs/study.md has the measured times), at the five batch sizes that reach the default target on digits.
# Batch 256 never reached 98% in 12 epochs there and adds a run per seed; --batch 8,16,32,64,128,256 puts it back.
DEFAULT_BATCHES = (8, 16, 32, 64, 128)
DEFAULT_SEEDS = 3
BUDGET_KINDS = ("epochs", "steps", "examples")


@dataclasses.dataclass(frozen=True)
class Budget:
    """What every run of a sweep gets: `amount` epochs, optimizer steps or examples."""

    kind: str  # epochs | steps | examples
    amount: int

    def apply(self, config: Config, batch: int, num_train: int) -> Config:
        """The config's epochs and max_steps for this budget at `batch` examples per step."""
        steps_per_epoch = num_train // batch
        if self.kind == "epochs":
            return dataclasses.replace(config, epochs=self.amount, max_steps=0)
        max_steps = self.amount if self.kind == "steps" else max(1, self.amount // batch)
        epochs = math.ceil(max_steps / steps_per_epoch)
        if max_steps == epochs * steps_per_epoch:
            max_steps = 0  # A budget of whole epochs needs no early stop.
        return dataclasses.replace(config, epochs=epochs, max_steps=max_steps)


@dataclasses.dataclass(frozen=True)
class Spec:
    """What a sweep varies and gives each run; everything else is the preset Config of its runs.

    Attributes:
      batches: batch sizes.
      norms: normalizations (Config.norm values); each runs at every batch size.
      seeds: seeds; each (norm, batch) runs once per seed.
      replicas: None (every run on the preset's devices), or replica counts; each (norm, batch) runs on each.
      budget: per-run budget (None: the preset's epochs).
      warmup_fraction: if given, each run warms up over this fraction of its epochs.
      tuner: None, or random | bayesian | hyperband to tune the lr per (norm, batch) before the seed runs.
      max_trials: tuning trials per (norm, batch) for random and bayesian.
      tune: hyperparameters to tune (tuning.TUNABLE): "lr" and optionally "momentum", "warmup".
      advice: an advice.json of pipeline.advise, copied to <out>/advice.json; the report then puts its prediction
        beside the measurements (pipeline/study/prediction_check.py).
    """

    batches: tuple[int, ...] = DEFAULT_BATCHES
    norms: tuple[str, ...] = ("batch",)
    seeds: tuple[int, ...] = tuple(range(DEFAULT_SEEDS))
    replicas: tuple[int, ...] | None = None
    budget: Budget | None = None
    warmup_fraction: float | None = None
    tuner: str | None = None
    max_trials: int = 8
    tune: tuple[str, ...] = ("lr",)
    advice: str | None = None


def run_name(norm: str, batch: int, seed: int, replicas: int | None = None) -> str:
    return f"{norm}-b{batch or 'adaptive'}" + (f"-r{replicas}" if replicas else "") + f"-s{seed}"


def on_replicas(config: Config, replicas: int, gpus: int) -> Config:
    """The config on `replicas` devices: one device for 1, else mirrored over GPUs or as many logical CPUs.

    Raises:
      InputError: more replicas than GPUs, or --strategy multiworker (whose replicas are the cluster's).
    """
    if config.strategy == "multiworker":
        raise InputError("--replicas: a sweep over replicas runs on this machine; it cannot use --strategy multiworker")
    if gpus and replicas > gpus:
        raise InputError(f"--replicas: {replicas} replicas need {replicas} GPUs; this machine has {gpus}")
    if replicas == 1:
        return dataclasses.replace(config, strategy="one", replicas=1, logical_cpus=0)
    return dataclasses.replace(config, strategy="mirrored", replicas=replicas, logical_cpus=0 if gpus else replicas)


def run_configs(config: Config, spec: Spec, num_train: int, gpus: int = 0) -> list[Config]:
    """The validated config of every run, in the order they run: norm, batch, replicas, then seed."""
    budget = spec.budget or Budget("epochs", config.epochs)
    configs = []
    for norm, batch, replicas, seed in itertools.product(spec.norms, spec.batches, spec.replicas or (None,),
                                                         spec.seeds):
        if batch > num_train:
            raise InputError(f"--batch: {batch} is larger than the training split ({num_train} examples)")
        run = dataclasses.replace(config, norm=norm, batch=batch, seed=seed)
        if batch == config_lib.ADAPTIVE:  # starts at the base batch; AdaScale scales the lr (docs/adaptive_batch.md)
            run, batch = dataclasses.replace(run, lr_scaling="none"), config.base_batch
        run = budget.apply(run, batch, num_train)
        if replicas:
            run = on_replicas(run, replicas, gpus)
        if spec.warmup_fraction is not None:
            run = dataclasses.replace(run, warmup_epochs=spec.warmup_fraction * run.epochs)
        total_steps = run.max_steps or run.epochs * (num_train // batch)
        run = dataclasses.replace(
            run, grad_stats_every=callback_setup.instrument_interval(run.grad_stats_every, total_steps),
            bn_stats_every=callback_setup.instrument_interval(run.bn_stats_every, total_steps))
        configs.append(config_lib.validate(run))
    return configs


def sweep(config: Config, spec: Spec, out: str = "sweeps/default", *, report: bool = True, log=print) -> dict:
    """Trains every (norm, batch, seed) combination of `spec` and writes the report to `out`.

    Args:
      config: the preset config of every run (model, data, optimizer, lr at base_batch, target_accuracy, ...).
      spec: what the sweep varies, its budget and its tuner.
      out: the sweep directory.
      report: build the report at the end.
      log: where progress lines go.
    Returns:
      The report (pipeline.study.sweep_report.build_report), or {"runs": [summaries]} when report is False.
    Raises:
      InputError: bad arguments, or an out directory holding runs with different settings.
      KeyboardInterrupt: a run was interrupted; run the sweep again to resume it.
    """
    from pipeline.data import in_memory as data_lib

    if config.batch_schedule:
        raise InputError("--batch-schedule: a sweep varies --batch; run a batch schedule with pipeline.train")
    num_train, num_val, num_test = data_lib.count(config)
    gpus = 0
    if spec.replicas:
        import tensorflow as tf

        gpus = len(tf.config.list_physical_devices("GPU"))
    configs = run_configs(config, spec, num_train, gpus)
    budget = spec.budget or Budget("epochs", config.epochs)
    os.makedirs(os.path.join(out, "runs"), exist_ok=True)
    if spec.advice:
        from pipeline import advised_config

        rundir.write_json_atomic(os.path.join(out, "advice.json"), advised_config.read(spec.advice))
    rundir.write_json_atomic(os.path.join(out, "sweep.json"), {
        "batches": list(spec.batches), "norms": list(spec.norms), "seeds": list(spec.seeds),
        "replicas": list(spec.replicas) if spec.replicas else None,
        "budget": dataclasses.asdict(budget), "warmup_fraction": spec.warmup_fraction, "num_train": num_train,
        "num_val": num_val, "num_test": num_test, "tuner": spec.tuner, "max_trials": spec.max_trials,
        "tune": list(spec.tune), "config": config_lib.to_dict(config), "command": sys.argv,
        "git_commit": rundir.git_commit(), "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })
    if spec.tuner:
        configs = tuning.tune_sweep(configs, out, spec.tuner, max_trials=spec.max_trials, tune=spec.tune, log=log)
        if configs is None:  # A distributed-tuning worker: the chief runs the seeds and writes the report.
            return {}
    summaries = []
    for i, run in enumerate(configs):
        run_dir = os.path.join(out, "runs", run_name(run.norm, run.batch, run.seed, spec.replicas and run.replicas))
        summary = runner.run_one(run, run_dir)
        summaries.append(summary)
        state = "skipped (finished before)" if summary.get("skipped") else f"{summary['wall_time_s']:.0f} s"
        accuracy = summary.get("test_accuracy")
        log(f"[{i + 1}/{len(configs)}] {os.path.basename(run_dir)}: {summary['status']}"
            + (f", test accuracy {accuracy:.4f}" if accuracy is not None else f" ({summary.get('reason', '')})")
            + f", {state}")
    if not report:
        return {"runs": summaries}
    return report_lib.build_report(out)


def _flag_type(convert, valid, accepted: str):
    """An argparse type: converts the text and checks the value, or fails naming what is accepted."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not valid(value):
            raise argparse.ArgumentTypeError(f"got {text!r}; {accepted}")
        return value

    return parse


def _items(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(","))


def _counts(example: str):
    return _flag_type(lambda t: tuple(sorted(int(i) for i in _items(t))), lambda v: min(v) >= 1 and len(set(v)) == len(v),
                      f"use distinct positive integers separated by commas, e.g. {example}")


_replica_counts = _counts("1,2,4")
# Batch sizes, and "adaptive" (config_lib.ADAPTIVE, 0): a run whose batch follows the noise scale, at --base-batch.
def _batch_sizes(text: str) -> tuple[int, ...]:
    sizes = [config_lib.ADAPTIVE if item == "adaptive" else int(item) for item in _items(text)]
    if any(size < 1 for size, item in zip(sizes, _items(text)) if item != "adaptive"):
        raise ValueError(text)
    return tuple(sorted(sizes))


_batches = _flag_type(_batch_sizes, lambda v: len(set(v)) == len(v),
                      "use distinct positive integers or adaptive separated by commas, e.g. 8,16,32,adaptive")
_norms = _flag_type(_items, lambda v: set(v) <= set(config_lib.NORMS) and len(set(v)) == len(v),
                    f"use distinct names from {', '.join(config_lib.NORMS)} separated by commas, e.g. batch,group")
_positive_int = _flag_type(int, lambda v: v >= 1, "must be a positive integer")
_positive_float = _flag_type(float, lambda v: math.isfinite(v) and v > 0, "must be a finite number > 0")
_tuned = _flag_type(_items, lambda v: "lr" in v and set(v) <= set(tuning.TUNABLE),
                    "use lr plus optionally momentum and warmup, e.g. lr,momentum")


def add_sweep_flags(parser: argparse.ArgumentParser) -> tuple[str, ...]:
    """Adds the Spec's flags; returns the Config fields that the Spec decides, which then get no train flag.

    Their destinations are not Config field names, except for the old spellings --base-lr (--lr) and
    --budget-epochs (--epochs), so that flags.parse reads only those as Config values.
    """
    preset = config_lib.batch_study()
    sweep = parser.add_argument_group("sweep")
    sweep.add_argument("--batch", dest="batches", type=_batches, default=",".join(map(str, Spec.batches)),
                       metavar="LIST", help="batch sizes, e.g. 8,16,32,64,128,256, and adaptive (a run of pipeline.train "
                                            f"--batch adaptive) (default: {','.join(map(str, DEFAULT_BATCHES))})")
    sweep.add_argument("--norm", dest="norms", type=_norms, default="batch", metavar="LIST",
                       help=f"normalizations, each run at every batch size, from {', '.join(config_lib.NORMS)}")
    sweep.add_argument("--replicas", dest="replica_counts", type=_replica_counts, default=None, metavar="LIST",
                       help="replica counts, each run at every batch size (the global batch), e.g. 1,2,4: one "
                            "device, else mirrored over as many GPUs, or logical CPUs without GPUs")
    sweep.add_argument("--seeds", type=_positive_int, default=DEFAULT_SEEDS, metavar="N",
                       help="seeds 0..N-1 per (norm, batch); with 1 the report cannot show run-to-run spread")
    sweep.add_argument("--base-lr", dest="lr", type=_positive_float, default=argparse.SUPPRESS, metavar="FLOAT",
                       help="the same as --lr: peak learning rate at --base-batch examples per step")
    budget = sweep.add_mutually_exclusive_group()
    budget.add_argument("--budget-epochs", dest="epochs", type=_positive_int, default=argparse.SUPPRESS,
                        metavar="N", help=f"the same as --epochs: epochs per run, the same examples for every batch "
                                          f"(default: {preset.epochs})")
    budget.add_argument("--budget-steps", type=_positive_int, default=argparse.SUPPRESS, metavar="N",
                        help="optimizer steps per run, the same for every batch")
    budget.add_argument("--budget-examples", type=_positive_int, default=argparse.SUPPRESS, metavar="N",
                        help="training examples per run: max_steps = N // batch")
    sweep.add_argument("--out", default=argparse.SUPPRESS, metavar="DIR",
                       help="sweep directory (default: sweeps/<dataset>-<model>)")
    sweep.add_argument("--advice", dest="sweep_advice", default=None, metavar="FILE",
                       help="advice.json of pipeline.advise: the report puts its prediction beside the measurements")
    sweep.add_argument("--tuner", choices=tuning.TUNERS, default=None,
                       help="tune the learning rate separately for every batch size with keras-tuner")
    sweep.add_argument("--max-trials", type=_positive_int, default=Spec.max_trials, metavar="N",
                       help="tuning trials per batch size (random, bayesian)")
    sweep.add_argument("--tune", type=_tuned, default="lr", metavar="LIST",
                       help="hyperparameters to tune: lr, and optionally momentum and warmup")
    return ("batch", "norm", "seed", "max_steps", "run_dir", "resume", "advice", "replicas")


def spec_from_flags(config: Config, args: argparse.Namespace, argv) -> Spec:
    """The Spec of the parsed flags; `config` is the runs' config, whose epochs are the default budget."""
    given = vars(args)
    budgets = {kind: given.get(f"budget_{kind}") for kind in ("steps", "examples")}
    kind = next((k for k, v in budgets.items() if v is not None), None)
    words = sys.argv[1:] if argv is None else argv
    if kind and any(word == "--epochs" or word.startswith("--epochs=") for word in words):
        raise InputError(f"--budget-{kind}: cannot be combined with --budget-epochs (--epochs); give one budget")
    budget = Budget(kind, budgets[kind]) if kind else Budget("epochs", config.epochs)
    # A scaling rule raises the lr at large batches, where warming up avoids early divergence (Goyal et al.).
    auto_warmup = config.lr_scaling != "none" and "warmup_epochs" not in given and not config.warmup_epochs
    return Spec(batches=args.batches, norms=args.norms, seeds=tuple(range(args.seeds)), replicas=args.replica_counts,
                budget=budget,
                warmup_fraction=WARMUP_FRACTION if auto_warmup else None, tuner=args.tuner,
                max_trials=args.max_trials, tune=args.tune, advice=args.sweep_advice)


def main(argv=None) -> int:
    """Parses flags, runs the sweep, prints the headline table; bad input exits with code 2 and one line."""
    def command() -> int:
        config, args = flags.parse(argv, description=__doc__.splitlines()[0], extra=add_sweep_flags,
                                   preset=config_lib.batch_study())
        startup.import_tensorflow()
        execution.set_threads(config)  # before anything runs TensorFlow, for the runs made in this process
        spec = spec_from_flags(config, args, argv)
        out = vars(args).get("out") or rundir.default_out(config, "sweeps")
        report = sweep(config, spec, out)
        if report:
            print(report_lib.headline(report))
            print(f"report: {os.path.join(out, 'report.md')}")
        return 0

    return cli.run(command, "sweep interrupted; run the same command again to resume it")
