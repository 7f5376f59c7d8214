"""The one frozen configuration of a run: fields, presets, validation, JSON load and save."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math

MODEL_NAMES = ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "cnn", "mlp")
NORMS = ("batch", "syncbatch", "ghost", "group", "layer", "none")
OPTIMIZERS = ("sgd", "nesterov", "adam", "adamw")
SCHEDULES = ("constant", "step", "multistep", "exponential", "cosine")
LR_SCALINGS = ("none", "linear", "sqrt")
AUGMENTS = ("auto", "none", "crop-flip")
INPUTS = ("memory", "stream")
STRATEGIES = ("auto", "one", "mirrored", "multiworker")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
BATCH_POLICIES = ("goodput", "norm-test")
ADAPTIVE = 0  # the value of --batch adaptive
INFERENCE_MIN_BATCH = 256  # the smallest batch of forward-only passes (Config.inference_batch)


class InputError(ValueError):
    """A bad flag, file or config value; entry points print it on one line and exit with code 2."""


def _field(default, help: str, names: dict | None = None, words_only: bool = False):
    """A Config field with its default and the help text of its flag (flags.py reads it from the metadata).

    names: words its flag also accepts for values, e.g. {"auto": -1}.
    words_only: the values in names are given only as their words: the flag refuses the number itself (--batch 0 is
      an error, not --batch adaptive).
    """
    return dataclasses.field(default=default, metadata={"help": help, "names": names or {}, "words_only": words_only})


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything that decides a run. CLI flags map 1:1 to these fields (`--warmup-epochs` -> warmup_epochs); the
    text after each default is its flag's help."""

    # Data.
    dataset: str = _field("digits", "digits | a TFDS name (cifar10, mnist, ...) | folder:PATH | npz:PATH")
    data_dir: str = _field("", 'prepared TFDS data directory ("" = TFDS default, ~/tensorflow_datasets)')
    download: bool = _field(False, "let TFDS download a dataset that is not prepared (needs network)")
    val_fraction: float = _field(0.1, "fraction of train held out for validation when a dataset has none")
    input: str = _field("memory", "memory (decode every split once and hold it in memory) | stream (read TFDS and "
                        "folder: data from its files every epoch, each worker its own files; docs/streaming.md)")
    cache_dir: str = _field("", "--input stream: keep the decoded examples in files here after the first pass, reused "
                            "by later runs (\"\": decode every epoch)")
    augment: str = _field("auto", "auto (crop-flip for 32x32 colour images, none otherwise) | none | crop-flip")
    # Model.
    model: str = _field("resnet20", "resnet20 | resnet32 | resnet44 | resnet56 | resnet110 | cnn | mlp")
    norm: str = _field("batch", "batch (statistics per replica) | syncbatch (over the global batch) | ghost | group | "
                       "layer | none")
    ghost_batch: int = _field(8, "examples per virtual batch of ghost batch norm (Hoffer et al. 2017)")
    bn_momentum: float = _field(0.9, "moving-average momentum of BatchNormalization (Keras default is 0.99)")
    # Optimization.
    batch: int = _field(32, "examples per step over all replicas, the global batch (per optimizer update: "
                        "batch * accumulate); adaptive: start at --base-batch and follow the measured noise scale "
                        "(--batch-policy, docs/adaptive_batch.md)", names={"adaptive": ADAPTIVE},
                        words_only=True)
    epochs: int = _field(30, "passes over the training split")
    max_steps: int = _field(0, "stop after this many steps (0: no limit); a sweep's step or example budget")
    optimizer: str = _field("sgd", "sgd | nesterov | adam | adamw")
    momentum: float = _field(0.9, "SGD/Nesterov momentum")
    lr: float = _field(0.1, "peak learning rate at --base-batch examples per step (see effective_lr)")
    lr_scaling: str = _field("none", "none | linear | sqrt: how lr follows batch / base_batch (Goyal et al. 2017)")
    base_batch: int = _field(32, "batch size at which --lr is the learning rate")
    schedule: str = _field("cosine", "constant | step | multistep | exponential | cosine")
    warmup_epochs: float = _field(0.0, "linear warmup from ~0 to the peak learning rate, in epochs")
    step_epochs: float = _field(10.0, "schedule=step: multiply by gamma every this many epochs (Caffe's stepsize)")
    milestones: str = _field("", 'schedule=multistep: comma-separated epochs, e.g. "15,25"')
    gamma: float = _field(0.1, "step/multistep factor; per-epoch factor for exponential")
    weight_decay: float = _field(5e-4, "decoupled weight decay of the optimizer (not on biases or norm parameters)")
    accumulate: int = _field(1, "average gradients over this many batches before each update")
    advice: str = _field("", "advice.json of pipeline.advise: train at its batch and learning rate (over --batch, --lr)")
    batch_schedule: str = _field(
        "", 'e.g. "32@0,128@10": batch 32 from epoch 0, 128 from epoch 10 (Smith et al. 2018)')
    max_batch: int = _field(0, "--batch adaptive: the largest batch it may move to (0: the training split); the "
                            "step-time ladder's memory limit caps it too")
    batch_policy: str = _field("goodput", "--batch adaptive, decided at every epoch's end: goodput (the batch of "
                               "highest predicted goodput, Pollux) | norm-test (double while the batch gradient's "
                               "variance exceeds theta^2 |G|^2, De et al. 2017)")
    norm_test_theta: float = _field(1.0, "--batch-policy norm-test: theta; the batch doubles while it is below "
                                    "B_simple / theta^2")
    # Evaluation and instruments.
    precise_bn_samples: int = _field(8192, "training examples for the precise-BN pass before evaluation (0: off)")
    grad_stats_every: int = _field(-1, "steps between gradient-statistics measurements (0: off, -1: automatic: "
                                   "steps 0, 10, 20, 40, ... and the last; in a sweep 16 per run, evenly spaced)")
    bn_stats_every: int = _field(-1, "steps between BN-statistics measurements (0: off, -1: automatic, as "
                                 "--grad-stats-every)")
    # Precision and cost of a measurement (callbacks/gradient_stats.py, callbacks/bn_stats.py).
    grad_stats_precision: float = _field(0.5, "half-width of |G|^2's 95% interval sought, as a fraction of |G|^2 "
                                         "(a pilot decides the examples, a fresh sample measures)")
    grad_stats_max_examples: int = _field(8192, "examples one gradient measurement takes at most (and at most the "
                                          "training split)")
    grad_stats_budget: float = _field(0.1, "a gradient measurement takes at most this fraction of the examples "
                                      "trained since the previous one (0: no such limit)")
    bn_stats_samples: int = _field(256, "examples of the population sample of the BN statistics (at most the "
                                   "training split); errors below its resolution are reported as < resolution")
    dynamics: bool = _field(True, "per-class accuracy and forgetting events on a fixed subset")
    curvature_every: int = _field(0, "steps between measurements of the loss's top Hessian eigenvalue and trace on a "
                                  "fixed training subset (0: off; also at step 0 and the end; -1: at the end only, as a "
                                  "sweep's study of sharpness uses it; curvature.jsonl)")
    target_accuracy: float = _field(0.0, "record steps and time until validation accuracy first reaches this")
    target_checks_per_epoch: int = _field(8, "validation checks for --target-accuracy per epoch (pipeline/training/target.py)")
    # Devices and speed.
    strategy: str = _field("auto", "auto (mirrored with >1 GPU, else one) | one | mirrored | multiworker (reads "
                           "TF_CONFIG)")
    logical_cpus: int = _field(0, "split the CPU into this many devices, to try mirrored without GPUs (0: no split)")
    replicas: int = _field(0, "devices that mirrored trains on: the first N GPUs, else the first N logical CPUs "
                           "(0: all of them)")
    steps_per_execution: str = _field("auto", "training steps per compiled call: a positive integer or auto")
    precision: str = _field("float32", "float32 | mixed_float16 | mixed_bfloat16 (Keras dtype policy; mixed for GPUs)")
    jit: bool = _field(False, "compile the training step with XLA (jit_compile)")
    intra_op_threads: int = _field(-1, "threads one op may use (0: TensorFlow's default, one per core; -1 or auto: "
                                   "automatic, 1 on a machine of at most 2 cores and no GPU, where it measured "
                                   "faster)", names={"auto": -1})
    # Run.
    seed: int = _field(0, "initialization, data order, augmentation and instrument batches")
    deterministic: bool = _field(False, "bit-reproducible ops (tf.config.experimental.enable_op_determinism)")
    run_dir: str = _field("", '"" = runs/<time>-<model>-b<batch>')
    resume: bool = _field(False, "continue the run in run_dir from its last checkpoint (without --run-dir: the "
                                 "most recent interrupted or failed run of this config under runs/)")
    overwrite: bool = _field(False, "replace a finished run in run_dir")
    export: bool = _field(True, "write a SavedModel in TF Serving layout under <run_dir>/export")
    verbose: int = _field(-1, "Keras fit verbosity (-1: progress bar on a terminal, one line per epoch otherwise)")

    @property
    def effective_lr(self) -> float:
        """Peak learning rate after the batch-size scaling rule.

        lr * (batch / base_batch) for linear scaling (Goyal et al. 2017) and lr * sqrt(batch / base_batch)
        for square-root scaling (Krizhevsky 2014; Hoffer et al. 2017). The batch is the update's batch,
        batch * accumulate.
        """
        ratio = (self.batch or self.base_batch) * self.accumulate / self.base_batch
        return self.lr * {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[self.lr_scaling]

    @property
    def adaptive_batch(self) -> bool:
        """--batch adaptive: the batch starts at base_batch and is decided during the run (training/adaptive_batch.py)."""
        return self.batch == ADAPTIVE

    @property
    def inference_batch(self) -> int:
        """Batch of forward-only passes (evaluation, target checks, precise BN, the loss line): no gradients to hold,
        and at a small training batch the per-call overhead would dominate (precise BN calls per BN level and batch)."""
        return max(self.batch or self.base_batch, INFERENCE_MIN_BATCH)

    @property
    def milestone_epochs(self) -> tuple[float, ...]:
        return tuple(float(m) for m in self.milestones.split(",") if m.strip())

    @property
    def batch_phases(self) -> tuple[tuple[int, int], ...]:
        """The batch schedule as ((first_epoch, batch), ...), or ((0, batch),) when there is none; an adaptive batch's
        first phase is ((0, base_batch),), the later ones are decided during the run."""
        if not self.batch_schedule:
            return ((0, self.base_batch if self.adaptive_batch else self.batch),)
        phases = []
        for item in self.batch_schedule.split(","):
            batch, epoch = item.split("@")
            phases.append((int(epoch), int(batch)))
        return tuple(phases)


def smoke() -> Config:
    """A run of a few seconds for tests: a small CNN, two epochs, instruments at every few steps."""
    return dataclasses.replace(Config(), model="cnn", epochs=2, batch=64, precise_bn_samples=256, grad_stats_every=5,
                               bn_stats_every=5, verbose=0)


def batch_study() -> Config:
    """The runs of the default batch-size sweep on digits (pipeline.sweep: three seeds at batch 8 to 128).

    12 epochs per run; lr 0.05 at batch 32 for SGD with momentum 0.9, scaled linearly (0.4 at batch 256); target
    98% validation accuracy, which ResNet-20 reaches on digits in a few epochs, but not at every batch.
    """
    return dataclasses.replace(Config(), epochs=12, lr=0.05, lr_scaling="linear", target_accuracy=0.98)


@contextlib.contextmanager
def as_flag_error(field: str):
    """Reports a library's ValueError about an argument taken from Config.<field> as an InputError naming its flag."""
    try:
        yield
    except InputError:
        raise
    except ValueError as e:
        raise InputError(f"--{field.replace('_', '-')}: {e}") from None


def _check(ok: bool, flag: str, message: str) -> None:
    if not ok:
        raise InputError(f"--{flag.replace('_', '-')}: {message}")


def _finite(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _check_adaptive(c: Config) -> None:
    """The fields of --batch adaptive, and the flags it cannot be combined with."""
    _check(c.max_batch >= 0, "max_batch", f"got {c.max_batch}; must be >= 0 (0: the training split)")
    _check(c.batch_policy in BATCH_POLICIES, "batch_policy",
           f"got {c.batch_policy!r}; choose one of {', '.join(BATCH_POLICIES)}")
    _check(_finite(c.norm_test_theta) and c.norm_test_theta > 0, "norm_test_theta", "must be a number > 0, e.g. 1")
    if not c.adaptive_batch:
        return
    _check(not c.batch_schedule, "batch_schedule", "cannot be combined with --batch adaptive; choose one way for the "
           "batch to change")
    _check(not c.advice, "advice", "cannot be combined with --batch adaptive")
    _check(c.max_batch == 0 or c.max_batch >= c.base_batch, "max_batch", f"{c.max_batch} is below --base-batch "
           f"{c.base_batch}; --batch adaptive starts at the base batch and grows from it")
    _check(c.lr_scaling == "none", "lr_scaling", "--batch adaptive scales --lr by AdaScale's gain from --base-batch; "
           "use --lr-scaling none")
    _check(c.accumulate == 1, "accumulate", "--batch adaptive sets the batch itself; use --accumulate 1")
    _check(c.strategy != "multiworker", "strategy", "--batch adaptive decides on one worker; use one or mirrored")
    _check(c.grad_stats_every != 0, "grad_stats_every", "--batch adaptive decides from the gradient statistics; use "
           "-1 (automatic) or N > 0 steps")
    _check(c.steps_per_execution in ("auto", "1"), "steps_per_execution", "--batch adaptive times single steps; use "
           "1 or auto")


def validate(config: Config) -> Config:
    """Checks every field that can be checked without reading data; raises InputError naming the flag."""
    c = config
    _check(bool(c.dataset), "dataset", "must not be empty; use digits, a TFDS name, folder:PATH or npz:PATH")
    _check(c.input in INPUTS, "input", f"got {c.input!r}; choose one of {', '.join(INPUTS)}")
    _check(c.input == "memory" or not (c.dataset == "digits" or c.dataset.startswith("npz:")), "input",
           "stream reads TFDS and folder:PATH datasets from their files; digits and npz:PATH are held in memory, "
           "use --input memory")
    _check(not c.cache_dir or c.input == "stream", "cache_dir", "needs --input stream (in-memory data is decoded "
           "once per run already)")
    _check(_finite(c.val_fraction) and 0 < c.val_fraction < 1, "val_fraction", "must be in (0, 1)")
    _check(c.augment in AUGMENTS, "augment", f"got {c.augment!r}; choose one of {', '.join(AUGMENTS)}")
    _check(c.model in MODEL_NAMES, "model", f"got {c.model!r}; choose one of {', '.join(MODEL_NAMES)}")
    _check(c.norm in NORMS, "norm", f"got {c.norm!r}; choose one of {', '.join(NORMS)}")
    _check(c.ghost_batch >= 1, "ghost_batch", "must be a positive integer")
    _check(_finite(c.bn_momentum) and 0 <= c.bn_momentum < 1, "bn_momentum", "must be in [0, 1)")
    _check(c.batch >= 1 or c.adaptive_batch, "batch", f"got {c.batch}; must be a positive integer or adaptive")
    _check(c.epochs >= 1, "epochs", f"got {c.epochs}; must be a positive integer")
    _check(c.max_steps >= 0, "max_steps", "must be >= 0 (0: no limit)")
    _check(c.optimizer in OPTIMIZERS, "optimizer", f"got {c.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    _check(_finite(c.momentum) and 0 <= c.momentum < 1, "momentum", "must be in [0, 1)")
    _check(_finite(c.lr) and c.lr > 0, "lr", f"got {c.lr}; must be a finite number > 0")
    _check(c.lr_scaling in LR_SCALINGS, "lr_scaling", f"got {c.lr_scaling!r}; choose one of {', '.join(LR_SCALINGS)}")
    _check(c.base_batch >= 1, "base_batch", "must be a positive integer")
    _check(c.schedule in SCHEDULES, "schedule", f"got {c.schedule!r}; choose one of {', '.join(SCHEDULES)}")
    _check(_finite(c.warmup_epochs) and 0 <= c.warmup_epochs < c.epochs, "warmup_epochs", "must be in [0, --epochs)")
    _check(_finite(c.step_epochs) and c.step_epochs > 0, "step_epochs", "must be a number > 0")
    _check(_finite(c.gamma) and 0 < c.gamma <= 1, "gamma", "must be in (0, 1]")
    try:
        milestones = c.milestone_epochs
    except ValueError:
        milestones = None
    _check(milestones is not None and list(milestones) == sorted(set(milestones)) and all(m > 0 for m in milestones),
           "milestones", f"got {c.milestones!r}; use increasing positive epochs separated by commas, e.g. 15,25")
    _check(c.schedule != "multistep" or bool(milestones), "milestones", "schedule multistep needs --milestones, e.g. 15,25")
    _check(_finite(c.weight_decay) and c.weight_decay >= 0, "weight_decay", "must be a finite number >= 0")
    _check(c.accumulate >= 1, "accumulate", "must be a positive integer")
    try:
        phases = c.batch_phases
    except ValueError:
        phases = None
    increasing = phases is not None and all(e1 < e2 for (e1, _), (e2, _) in zip(phases, phases[1:]))
    _check(increasing and phases[0][0] == 0 and all(b >= 1 for _, b in phases) and phases[-1][0] < c.epochs,
           "batch_schedule", f"got {c.batch_schedule!r}; use BATCH@EPOCH items with increasing epochs below --epochs, "
           "the first at 0, e.g. 32@0,128@10")
    _check(not (c.advice and c.batch_schedule), "advice", "cannot be combined with --batch-schedule")
    _check_adaptive(c)
    _check(c.precise_bn_samples >= 0, "precise_bn_samples", "must be >= 0 (0: off)")
    _check(c.grad_stats_every >= -1, "grad_stats_every", "must be >= 0 steps (0: off) or -1 (automatic)")
    _check(c.bn_stats_every >= -1, "bn_stats_every", "must be >= 0 steps (0: off) or -1 (automatic)")
    _check(c.curvature_every >= -1, "curvature_every", "must be >= 0 steps (0: off) or -1 (at the end only)")
    _check(_finite(c.grad_stats_precision) and c.grad_stats_precision > 0, "grad_stats_precision",
           "must be a fraction > 0, e.g. 0.5")
    _check(c.grad_stats_max_examples >= 1, "grad_stats_max_examples", "must be >= 1 example")
    _check(_finite(c.grad_stats_budget) and c.grad_stats_budget >= 0, "grad_stats_budget",
           "must be a fraction >= 0 (0: no limit)")
    _check(c.bn_stats_samples >= 2, "bn_stats_samples", "must be >= 2 examples")
    _check(_finite(c.target_accuracy) and 0 <= c.target_accuracy <= 1, "target_accuracy", "must be in [0, 1]")
    _check(c.target_checks_per_epoch >= 1, "target_checks_per_epoch", "must be an integer >= 1")
    _check(c.strategy in STRATEGIES, "strategy", f"got {c.strategy!r}; choose one of {', '.join(STRATEGIES)}")
    _check(c.logical_cpus >= 0, "logical_cpus", "must be >= 0 (0: no split)")
    _check(c.replicas >= 0, "replicas", "must be >= 0 (0: every device)")
    _check(c.replicas <= 1 or c.strategy == "mirrored", "replicas",
           f"{c.replicas} replicas need --strategy mirrored (got {c.strategy})")
    _check(c.replicas <= 1 or c.logical_cpus <= 1 or c.replicas <= c.logical_cpus, "replicas",
           f"{c.replicas} replicas need at least as many devices; --logical-cpus is {c.logical_cpus}")
    _check((c.batch or c.base_batch) % max(1, c.replicas) == 0, "base_batch" if c.adaptive_batch else "batch",
           f"{c.batch} does not split evenly over {c.replicas} replicas; use a multiple of --replicas")
    _check(c.steps_per_execution == "auto" or (c.steps_per_execution.isdigit() and int(c.steps_per_execution) >= 1),
           "steps_per_execution", f"got {c.steps_per_execution!r}; use a positive integer or auto")
    _check(c.intra_op_threads >= -1, "intra_op_threads", "must be >= 1 thread, 0 (TensorFlow's default) or -1 "
           "(automatic)")
    _check(c.precision in PRECISIONS, "precision", f"got {c.precision!r}; choose one of {', '.join(PRECISIONS)}")
    _check(c.seed >= 0, "seed", "must be an integer >= 0")
    _check(not (c.resume and c.overwrite), "resume", "cannot be combined with --overwrite")
    return c


def from_dict(values: dict, base: Config | None = None, source: str = "config") -> Config:
    """Builds a Config from a dict, refusing unknown keys and values of the wrong type."""
    base = base or Config()
    fields = {f.name: f for f in dataclasses.fields(Config)}
    changes = {}
    for key, value in values.items():
        if key not in fields:
            raise InputError(f"{source}: unknown field {key!r}; known fields are {', '.join(fields)}")
        expected = type(getattr(base, key))
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise InputError(f"{source}: field {key!r} must be {expected.__name__}, got {value!r}")
        changes[key] = value
    return dataclasses.replace(base, **changes)


def read_json(path: str, flag: str):
    """The JSON value in a file a user named with `flag`; InputError naming the flag and file when unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        raise InputError(f"{flag}: cannot read {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{flag}: {path} is not valid JSON ({e.msg} at line {e.lineno})") from None


def load_json(path: str) -> Config:
    """Reads a config file written by save_json (or by hand); the resolved config of a run loads back."""
    values = read_json(path, "--config")
    if not isinstance(values, dict):
        raise InputError(f"--config: {path} must hold a JSON object of config fields")
    values = values.get("config", values)  # A run's config.json nests the fields under "config".
    return from_dict(values, source=f"--config {path}")


def to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)
