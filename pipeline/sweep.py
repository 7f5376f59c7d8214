"""Batch-size sweeps over train(): `python -m pipeline.sweep --batch 8,16,32,64,128,256 --norm batch,group`.

Every (norm, batch, seed) combination is one in-process call of pipeline.train.train() with its own run
directory <out>/runs/<norm>-b<batch>-s<seed>. Running the same command again skips finished runs (completed,
or diverged: a failure is a result) and resumes the others from their last checkpoint (interrupted, killed, or
stopped by an error such as running out of memory, recorded in the run's error.txt), so a sweep stopped by
Ctrl-C or a crash continues where it stopped. The report (pipeline/report.py) is written
to <out> at the end: report.md, report.json, PNG plots and TensorBoard HParams data
(`tensorboard --logdir <out>`).

Budget: every run gets the same budget in epochs (--budget-epochs, the default: equal examples for every
batch), optimizer steps (--budget-steps: equal updates, Config.max_steps) or examples (--budget-examples:
max_steps = examples // batch). A step or example budget sets Config.epochs to the whole epochs that hold
it, ceil(max_steps / (num_train // batch)), and stops at max_steps; the schedule (cosine by default) spans
those whole epochs, so the learning rate has not quite decayed to its end value at max_steps.

Instruments: with automatic intervals (--grad-stats-every -1, --bn-stats-every -1), every run measures its
gradient and BatchNorm statistics MEASUREMENTS_PER_RUN times, evenly over its budget.

Learning rate: --base-lr is the learning rate at --base-batch examples per step, scaled to each batch by
--lr-scaling: linear, lr = base_lr * B / base_batch (Goyal et al. 2017), or sqrt, lr = base_lr *
sqrt(B / base_batch). With a scaling rule and no --warmup-epochs, each run warms up linearly over the first
WARMUP_FRACTION of its epochs (Goyal et al. 2017 warm up 5 of 90 epochs). --tuner tunes the learning rate
for each batch size instead (Shallue et al. 2018); see pipeline/tuning.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
import traceback

from pipeline import config as config_lib
from pipeline import flags, rundir
from pipeline import train as train_lib
from pipeline.config import Config, InputError

DEFAULT_BATCHES = (8, 16, 32, 64, 128, 256)
DEFAULT_BUDGET_EPOCHS = 12  # the default sweep on digits: about 6 minutes on 2 CPU cores (README)
DEFAULT_TARGET = 0.98  # validation accuracy on digits that ResNet-20 reaches in a few epochs, but not at every batch
DEFAULT_BASE_LR = 0.05  # peak lr at --base-batch 32 for SGD with momentum 0.9 (linear scaling: 0.4 at 256)
DEFAULT_SCALING = "linear"
WARMUP_FRACTION = 5 / 90  # share of each run's epochs spent warming up under a scaling rule (Goyal et al. 2017)
# Gradient and BN measurements per run when their interval is automatic (-1): the same number at every batch size,
# at the same fractions of the budget, instead of train's fixed step interval that leaves the few steps of a
# large batch unmeasured (plus one at step 0). A measurement costs about a training step; the report's time per
# step leaves the measuring out.
MEASUREMENTS_PER_RUN = 16
BUDGET_KINDS = ("epochs", "steps", "examples")
# Config fields that say where and how a run is started, not what it computes: a finished run may differ in them.
PER_RUN_FIELDS = ("run_dir", "resume", "overwrite", "verbose")


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


def run_name(norm: str, batch: int, seed: int) -> str:
    return f"{norm}-b{batch}-s{seed}"


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


_batches = _flag_type(lambda t: tuple(sorted(int(i) for i in _items(t))),
                      lambda v: min(v) >= 1 and len(set(v)) == len(v),
                      "use distinct positive integers separated by commas, e.g. 8,16,32")
_norms = _flag_type(_items, lambda v: set(v) <= set(config_lib.NORMS) and len(set(v)) == len(v),
                    f"use distinct names from {', '.join(config_lib.NORMS)} separated by commas, e.g. batch,group")
_positive_int = _flag_type(int, lambda v: v >= 1, "must be a positive integer")
_positive_float = _flag_type(float, lambda v: math.isfinite(v) and v > 0, "must be a finite number > 0")
_accuracy = _flag_type(float, lambda v: 0 <= v <= 1, "must be a number in [0, 1] (0: no target)")
_tuned = _flag_type(_items, lambda v: "lr" in v and set(v) <= {"lr", "momentum", "warmup"},
                    "use lr plus optionally momentum and warmup, e.g. lr,momentum")


def add_sweep_flags(parser: argparse.ArgumentParser) -> tuple[str, ...]:
    """Adds the sweep's flags; returns the Config fields they replace, which are then not added as train flags.

    Their destinations are not Config field names, so that flags.parse does not read them as Config values.
    """
    sweep = parser.add_argument_group("sweep")
    sweep.add_argument("--batch", dest="batches", type=_batches, default=",".join(map(str, DEFAULT_BATCHES)),
                       metavar="LIST", help="batch sizes, e.g. 8,16,32,64,128,256")
    sweep.add_argument("--norm", dest="norms", type=_norms, default="batch", metavar="LIST",
                       help=f"normalizations, each run at every batch size, from {', '.join(config_lib.NORMS)}")
    sweep.add_argument("--seeds", type=_positive_int, default=1, metavar="N", help="seeds 0..N-1 per (norm, batch)")
    sweep.add_argument("--base-lr", "--lr", type=_positive_float, default=argparse.SUPPRESS, metavar="FLOAT",
                       help=f"peak learning rate at --base-batch examples per step (default: {DEFAULT_BASE_LR})")
    sweep.add_argument("--lr-scaling", dest="sweep_lr_scaling", choices=config_lib.LR_SCALINGS,
                       default=argparse.SUPPRESS,
                       help="how the learning rate follows the batch: none, linear (Goyal et al. 2017) or sqrt "
                            f"(default: {DEFAULT_SCALING})")
    budget = sweep.add_mutually_exclusive_group()
    budget.add_argument("--budget-epochs", "--epochs", type=_positive_int, default=argparse.SUPPRESS, metavar="N",
                        help=f"epochs per run, the same examples for every batch (default: {DEFAULT_BUDGET_EPOCHS})")
    budget.add_argument("--budget-steps", "--max-steps", type=_positive_int, default=argparse.SUPPRESS, metavar="N",
                        help="optimizer steps per run, the same for every batch")
    budget.add_argument("--budget-examples", type=_positive_int, default=argparse.SUPPRESS, metavar="N",
                        help="training examples per run: max_steps = N // batch")
    sweep.add_argument("--target-accuracy", dest="sweep_target_accuracy", type=_accuracy, default=argparse.SUPPRESS,
                       metavar="FLOAT",
                       help="validation accuracy whose steps, epochs and time to reach are measured, 0: none "
                            f"(default: {DEFAULT_TARGET})")
    sweep.add_argument("--out", default=argparse.SUPPRESS, metavar="DIR",
                       help="sweep directory (default: sweeps/<dataset>-<model>)")
    sweep.add_argument("--tuner", choices=("random", "bayesian", "hyperband"), default=argparse.SUPPRESS,
                       help="tune the learning rate separately for every batch size with keras-tuner")
    sweep.add_argument("--max-trials", type=_positive_int, default=8, metavar="N",
                       help="tuning trials per batch size (random, bayesian)")
    sweep.add_argument("--tune", type=_tuned, default="lr", metavar="LIST",
                       help="hyperparameters to tune: lr, and optionally momentum and warmup")
    return ("batch", "norm", "seed", "lr", "lr_scaling", "epochs", "max_steps", "target_accuracy",
            "run_dir", "resume")


def changed_field(run_dir: str, config: Config) -> tuple[str, object] | None:
    """(field, recorded value) of the first field in which the run in run_dir differs from `config`, or None."""
    try:
        with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as f:
            recorded = json.load(f)["config"]
    except (OSError, ValueError, KeyError):
        return None  # Stopped before writing its config: nothing to compare, it starts afresh.
    wanted = config_lib.to_dict(config)
    changed = [k for k in wanted if k not in PER_RUN_FIELDS and k in recorded and recorded[k] != wanted[k]]
    return (changed[0], recorded[changed[0]]) if changed else None


def same_config(run_dir: str, config: Config) -> bool:
    """Whether run_dir holds no run, or a run of this config (which may then be skipped or resumed)."""
    return changed_field(run_dir, config) is None


def run_configs(config: Config, batches, norms, seeds, budget: Budget, num_train: int,
                warmup_fraction: float | None) -> list[Config]:
    """The validated config of every run, in the order they run: norm, then batch, then seed."""
    configs = []
    for norm in norms:
        for batch in batches:
            if batch > num_train:
                raise InputError(f"--batch: {batch} is larger than the training split ({num_train} examples)")
            for seed in seeds:
                run = budget.apply(dataclasses.replace(config, norm=norm, batch=batch, seed=seed), batch, num_train)
                if warmup_fraction is not None:
                    run = dataclasses.replace(run, warmup_epochs=warmup_fraction * run.epochs)
                interval = max(1, (run.max_steps or run.epochs * (num_train // batch)) // MEASUREMENTS_PER_RUN)
                run = dataclasses.replace(
                    run, grad_stats_every=interval if run.grad_stats_every == -1 else run.grad_stats_every,
                    bn_stats_every=interval if run.bn_stats_every == -1 else run.bn_stats_every)
                configs.append(config_lib.validate(run))
    return configs


def run_one(config: Config, run_dir: str) -> dict:
    """Trains one run unless it is finished; resumes it if unfinished. Returns its summary.json contents.

    An exception inside the run other than bad input (e.g. out of memory at a large batch) is recorded as a
    failed run with the traceback in error.txt, and the sweep goes on; the next sweep tries that run again.
    """
    summary = rundir.read_summary(run_dir)
    if not config.overwrite:
        changed = changed_field(run_dir, config)
        if changed:
            raise InputError(f"--out: {run_dir} was run with {changed[0]}={changed[1]!r}, this sweep asks for "
                             f"{getattr(config, changed[0])!r}; use a new --out, or pass --overwrite to run it again")
        # A diverged run is a result; a run that raised an error (error.txt) is tried again.
        error_file = os.path.join(run_dir, "error.txt")
        crashed = os.path.exists(error_file)
        if summary and (summary.get("status") == "completed" or (summary.get("status") == "failed" and not crashed)):
            return summary | {"skipped": True}
        if crashed:
            os.remove(error_file)
    started = os.path.isdir(run_dir) and bool(os.listdir(run_dir))
    config = dataclasses.replace(config, run_dir=run_dir, resume=started and not config.overwrite)
    try:
        result = dataclasses.asdict(train_lib.train(config))
    except (InputError, KeyboardInterrupt):
        raise
    except Exception as e:  # noqa: BLE001 -- one failed run must not end a sweep of many
        os.makedirs(run_dir, exist_ok=True)
        if not os.path.exists(os.path.join(run_dir, "config.json")):  # so that the report can place the failed run
            rundir.write_json_atomic(os.path.join(run_dir, "config.json"),
                                     {"config": config_lib.to_dict(config), "effective_lr": config.effective_lr})
        with open(os.path.join(run_dir, "error.txt"), "w", encoding="utf-8") as f:
            f.write(traceback.format_exc())
        message = str(e).splitlines()[0] if str(e) else ""
        result = dataclasses.asdict(train_lib.Summary(status="failed", run_dir=run_dir,
                                                      reason=f"{type(e).__name__}: {message}"))
        rundir.write_json_atomic(os.path.join(run_dir, "summary.json"), result)
    if result["status"] == "interrupted":
        raise KeyboardInterrupt
    return result


def sweep(config: Config, batches, norms=("batch",), seeds=(0,), out: str = "sweeps/default", *,
          budget: Budget | None = None, warmup_fraction: float | None = None, tuner: str | None = None,
          max_trials: int = 8, tune=("lr",), report: bool = True, log=print) -> dict:
    """Trains every (norm, batch, seed) combination and writes the report to `out`.

    Args:
      config: the base config of every run (model, data, optimizer, lr at base_batch, target_accuracy, ...).
      batches: batch sizes.
      norms: normalizations (Config.norm values).
      seeds: seeds; each (norm, batch) runs once per seed.
      out: the sweep directory.
      budget: per-run budget (default: config.epochs epochs).
      warmup_fraction: if given, each run warms up over this fraction of its epochs.
      tuner: None, or random | bayesian | hyperband to tune the lr per (norm, batch) before the seed runs.
      max_trials: tuning trials per (norm, batch) for random and bayesian.
      tune: hyperparameters to tune: "lr" and optionally "momentum", "warmup".
      report: build the report at the end.
      log: where progress lines go.
    Returns:
      The report (pipeline.report.build_report), or {"runs": [summaries]} when report is False.
    Raises:
      InputError: bad arguments, or an out directory holding runs with different settings.
      KeyboardInterrupt: a run was interrupted; run the sweep again to resume it.
    """
    from pipeline import data as data_lib

    budget = budget or Budget("epochs", config.epochs)
    if config.batch_schedule:
        raise InputError("--batch-schedule: a sweep varies --batch; run a batch schedule with pipeline.train")
    data = data_lib.load(config)
    num_train, num_val, num_test = data.num_train, data.num_val, data.num_test
    del data  # each run loads its own
    configs = run_configs(config, batches, norms, seeds, budget, num_train, warmup_fraction)
    os.makedirs(os.path.join(out, "runs"), exist_ok=True)
    rundir.write_json_atomic(os.path.join(out, "sweep.json"), {
        "batches": list(batches), "norms": list(norms), "seeds": list(seeds),
        "budget": dataclasses.asdict(budget), "warmup_fraction": warmup_fraction, "num_train": num_train,
        "num_val": num_val, "num_test": num_test,
        "tuner": tuner, "max_trials": max_trials, "tune": list(tune), "config": config_lib.to_dict(config),
        "command": sys.argv, "git_commit": rundir.git_commit(), "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })
    if tuner:
        from pipeline import tuning

        configs = tuning.tune_sweep(configs, out, tuner, max_trials=max_trials, tune=tune, log=log)
        if configs is None:  # A distributed-tuning worker: the chief runs the seeds and writes the report.
            return {}
    summaries = []
    for i, run in enumerate(configs):
        run_dir = os.path.join(out, "runs", run_name(run.norm, run.batch, run.seed))
        summary = run_one(run, run_dir)
        summaries.append(summary)
        state = "skipped (finished before)" if summary.get("skipped") else f"{summary['wall_time_s']:.0f} s"
        accuracy = summary.get("test_accuracy")
        log(f"[{i + 1}/{len(configs)}] {os.path.basename(run_dir)}: {summary['status']}"
            + (f", test accuracy {accuracy:.4f}" if accuracy is not None else f" ({summary.get('reason', '')})")
            + f", {state}")
    if not report:
        return {"runs": summaries}
    from pipeline import report as report_lib

    return report_lib.build_report(out)


def main(argv=None) -> int:
    """Parses flags, runs the sweep, prints the headline table; bad input exits with code 2 and one line."""
    try:
        config, args = flags.parse(argv, description=__doc__.splitlines()[0], extra=add_sweep_flags)
        given = vars(args)
        kinds = {kind: given.get(f"budget_{kind}") for kind in BUDGET_KINDS}
        kind = next((k for k, v in kinds.items() if v is not None), "epochs")
        budget = Budget(kind, kinds[kind] or (config.epochs if args.config else DEFAULT_BUDGET_EPOCHS))
        # Precedence: sweep flags, then a --config file, then the sweep's defaults (which suit digits on a CPU).
        defaults = {} if args.config else {"lr": DEFAULT_BASE_LR, "lr_scaling": DEFAULT_SCALING,
                                           "target_accuracy": DEFAULT_TARGET}
        chosen = {"lr": given.get("base_lr"),
                  "lr_scaling": given.get("sweep_lr_scaling"), "target_accuracy": given.get("sweep_target_accuracy")}
        config = config_lib.validate(dataclasses.replace(
            config, **(defaults | {k: v for k, v in chosen.items() if v is not None}),
            epochs=budget.amount if kind == "epochs" else config.epochs))
        # A scaling rule raises the lr at large batches, where warming up avoids early divergence (Goyal et al.).
        auto_warmup = config.lr_scaling != "none" and "warmup_epochs" not in given and not config.warmup_epochs
        warmup = WARMUP_FRACTION if auto_warmup else None
        name = config.dataset.rstrip("/").split("/")[-1]
        safe_dataset = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
        out = given.get("out") or os.path.join("sweeps", f"{safe_dataset}-{config.model}")
        report = sweep(config, args.batches, args.norms, tuple(range(args.seeds)), out, budget=budget,
                       warmup_fraction=warmup, tuner=given.get("tuner"), max_trials=args.max_trials, tune=args.tune)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sweep interrupted; run the same command again to resume it", file=sys.stderr)
        return 130
    if report:
        from pipeline import report as report_lib

        print(report_lib.headline(report))
        print(f"report: {os.path.join(out, 'report.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
