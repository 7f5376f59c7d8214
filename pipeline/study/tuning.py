"""Learning-rate tuning per batch size with keras-tuner, as Shallue et al. (2018) tune each batch size.

For every (norm, batch) of a sweep, one keras-tuner search; each trial is an in-process call of train() whose
objective is the final validation accuracy (a diverged run scores 0). The search space, around the
rule-scaled learning rate lr_B of the sweep (base_lr scaled by --lr-scaling):

    lr            log-uniform in [lr_B / LR_RANGE, lr_B * LR_RANGE]
    momentum      (--tune lr,momentum) 1 - momentum log-uniform in [0.01, 0.5], as Shallue et al. tune 1 - gamma
    warmup        (--tune lr,warmup) warmup_epochs = f * epochs, f uniform in [0, MAX_WARMUP_FRACTION]

Trials live in <out>/tuner/<norm>-b<batch>/trial_<id>/ (keras-tuner's trial.json, and the run in run/); a
search stopped midway reloads and continues, an interrupted trial resumes its run. The sweep's seed runs then
use each batch size's best values, so the report compares batch sizes at their own best learning rate.
Hyperband (Li et al. 2018): its epochs are Config.epochs, at most the sweep's budget; every trial trains from
scratch (no weights are carried between rounds), and a step budget is scaled by the same fraction.

Distributed tuning (keras-tuner's chief/worker mode). Start the same sweep command, with --out on a shared
filesystem, once as the chief and once per worker (TUNER_ID unique per worker):

    export KERASTUNER_ORACLE_IP=10.0.0.1 KERASTUNER_ORACLE_PORT=8000   # the chief's address, on every machine
    KERASTUNER_TUNER_ID=chief  python -m pipeline.sweep --tuner bayesian --out /shared/sweep   # on 10.0.0.1
    KERASTUNER_TUNER_ID=tuner0 python -m pipeline.sweep --tuner bayesian --out /shared/sweep   # on a worker
    KERASTUNER_TUNER_ID=tuner1 python -m pipeline.sweep --tuner bayesian --out /shared/sweep   # on another

The chief runs the oracle and the workers run the trials. The searches go one after another in the sweep's
(norm, batch) order, search i on port KERASTUNER_ORACLE_PORT + i, so that a worker that finishes one search
never asks the previous search's oracle for trials. Workers exit after the last search; the chief then trains
the seed runs and writes the report. A finished search writes <out>/tuner/<norm>-b<batch>/best.json; every
process skips a search that has it (for the same config, tuner and trials), so a sweep run again, or a worker
started again, goes straight to the first unfinished search.

A worker that dies keeps its trial: keras-tuner's oracle holds it as running for that KERASTUNER_TUNER_ID
(Oracle.ongoing_trials), and the chief waits for it. Start the worker again with the same TUNER_ID: the oracle
hands it the same trial, whose run resumes from its last checkpoint, and finished trials are not run again. A
worker that cannot come back: stop the chief and start it again (the same command); its oracle reloads the
search from oracle.json and puts the trials that workers held back in the queue for any worker.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os

from pipeline import config as config_lib
from pipeline import rundir
from pipeline.config import Config, InputError
from pipeline.study import runner

TUNERS = ("random", "bayesian", "hyperband")
TUNABLE = ("lr", "momentum", "warmup")  # hyperparameters that --tune may name; lr always
LR_RANGE = 10.0  # the lr search spans a factor LR_RANGE below and above the rule-scaled lr
MAX_WARMUP_FRACTION = 0.3
HYPERBAND_FACTOR = 3  # Li et al. 2018's eta: each round keeps 1/3 of the trials and trains them 3x longer
OBJECTIVE = "val_accuracy"
FINISHED = "best.json"  # in a search's project folder: the best values, written once the search has finished


def search_space(config: Config, tune=("lr",)):
    """keras_tuner.HyperParameters around the config's effective (rule-scaled) learning rate."""
    import keras_tuner

    hp = keras_tuner.HyperParameters()
    lr = config.effective_lr
    hp.Float("lr", lr / LR_RANGE, lr * LR_RANGE, sampling="log", default=lr)
    if "momentum" in tune:
        hp.Float("one_minus_momentum", 0.01, 0.5, sampling="log", default=1 - config.momentum)
    if "warmup" in tune:
        fraction = min(config.warmup_epochs / config.epochs, MAX_WARMUP_FRACTION)
        hp.Float("warmup_fraction", 0.0, MAX_WARMUP_FRACTION, default=fraction)
    return hp


def trial_config(config: Config, values: dict) -> Config:
    """The run config of one trial: the tuned lr is the learning rate itself (no further scaling)."""
    changes = {"lr": float(values["lr"]), "lr_scaling": "none"}
    epochs = int(values.get("tuner/epochs", config.epochs))
    if epochs != config.epochs:  # A Hyperband round: a fraction of the budget.
        fraction = epochs / config.epochs
        changes.update(epochs=epochs, warmup_epochs=config.warmup_epochs * fraction,
                       max_steps=max(1, round(config.max_steps * fraction)) if config.max_steps else 0)
    if "one_minus_momentum" in values:
        changes["momentum"] = 1.0 - float(values["one_minus_momentum"])
    if "warmup_fraction" in values:
        changes["warmup_epochs"] = float(values["warmup_fraction"]) * changes.get("epochs", config.epochs)
    return dataclasses.replace(config, **changes)


def _tuner_class():
    import keras_tuner

    class TrainTuner(keras_tuner.engine.base_tuner.BaseTuner):
        """Runs each trial as a call of train() in <project>/trial_<id>/run."""

        def __init__(self, oracle, config: Config, **kwargs):
            super().__init__(oracle, **kwargs)
            self.config = config

        def run_trial(self, trial):
            config = trial_config(self.config, trial.hyperparameters.values)
            run_dir = os.path.join(self.get_trial_dir(trial.trial_id), "run")
            # A stale run from an earlier search with other values is replaced, not resumed.
            stale = not runner.same_config(run_dir, config)
            config = dataclasses.replace(config, overwrite=config.overwrite or stale)
            try:
                summary = runner.run_one(config, run_dir)
            except InputError as e:
                raise _BadInput(str(e)) from e  # keras-tuner would count other errors as failed trials
            return {OBJECTIVE: summary.get(OBJECTIVE) or 0.0}

    class _BadInput(keras_tuner.errors.FatalError):
        pass

    return TrainTuner, _BadInput


def _oracle(kind: str, config: Config, hp, max_trials: int):
    import keras_tuner

    common = dict(objective=keras_tuner.Objective(OBJECTIVE, "max"), hyperparameters=hp, seed=config.seed,
                  tune_new_entries=False)
    if kind == "random":
        return keras_tuner.oracles.RandomSearchOracle(max_trials=max_trials, **common)
    if kind == "bayesian":
        return keras_tuner.oracles.BayesianOptimizationOracle(max_trials=max_trials, **common)
    if kind == "hyperband":
        return keras_tuner.oracles.HyperbandOracle(max_epochs=config.epochs, factor=HYPERBAND_FACTOR, **common)
    raise InputError(f"--tuner: got {kind!r}; choose one of {', '.join(TUNERS)}")


def search(config: Config, kind: str, directory: str, project: str, *, max_trials: int = 8, tune=("lr",)) -> dict:
    """Searches the learning rate (and optionally momentum, warmup) of one (norm, batch).

    Args:
      config: the run config at this batch size (its effective_lr is the centre of the lr range).
      kind: random | bayesian | hyperband.
      directory, project: trials go to <directory>/<project>/trial_<id>/.
      max_trials: trials for random and bayesian search.
      tune: hyperparameters to tune, from TUNABLE; "lr" always.
    Returns:
      The best trial's values ({"lr": ..., and "one_minus_momentum", "warmup_fraction" if tuned}), or {} on a
      distributed-tuning worker, which does not see the results.
    """
    from keras_tuner.src.distribute import utils as dist_utils

    worker = dist_utils.has_chief_oracle() and not dist_utils.is_chief_oracle()
    finished_file = os.path.join(directory, project, FINISHED)
    trained = {k: v for k, v in config_lib.to_dict(config).items() if k not in rundir.PER_RUN_FIELDS}  # not verbose
    search_key = {"tuner": kind, "max_trials": max_trials, "tune": list(tune), "config": trained}
    finished = None if config.overwrite else _read_finished(finished_file)
    if finished and finished["search"] == search_key:
        return {} if worker else finished["values"]
    TrainTuner, BadInput = _tuner_class()
    # --overwrite starts the search again; only the chief (or a lone process) deletes the shared project.
    tuner = TrainTuner(_oracle(kind, config, search_space(config, tune), max_trials), config, directory=directory,
                       project_name=project, overwrite=config.overwrite and not worker)
    try:
        tuner.search()
    except BadInput as e:
        raise e.__cause__ from None
    if worker:
        return {}
    best = tuner.oracle.get_best_trials(1)
    if not best or best[0].status != "COMPLETED":
        raise InputError(f"--tuner: no trial of {project} completed; see {os.path.join(directory, project)}")
    values = dict(best[0].hyperparameters.values)
    rundir.write_json_atomic(finished_file, {"search": search_key, "values": values})
    return values


def _read_finished(path: str) -> dict | None:
    """best.json of a finished search, or None (none yet, or unreadable: the search then runs, or reloads)."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) and {"search", "values"} <= set(value) else None


def tune_sweep(configs: list[Config], out: str, kind: str, *, max_trials: int = 8, tune=("lr",), log=print):
    """Tunes every (norm, batch) of a sweep on its first seed's config; returns the configs with the best values.

    Returns None on a distributed-tuning worker (KERASTUNER_TUNER_ID other than chief).
    """
    from keras_tuner.src.distribute import utils as dist_utils

    groups: dict[tuple[str, int], Config] = {}
    for config in configs:
        groups.setdefault((config.norm, config.batch), config)
    base_port = os.environ.get("KERASTUNER_ORACLE_PORT")
    best = {}
    for i, ((norm, batch), config) in enumerate(groups.items()):
        if base_port is not None:
            os.environ["KERASTUNER_ORACLE_PORT"] = str(int(base_port) + i)
        values = search(config, kind, os.path.join(out, "tuner"), f"{norm}-b{batch}", max_trials=max_trials,
                        tune=tune)
        if values:
            best[(norm, batch)] = values
            log(f"tuned {norm}-b{batch}: " + ", ".join(f"{k}={v:.4g}" for k, v in values.items()
                                                      if not k.startswith("tuner/")))
    if base_port is not None:
        os.environ["KERASTUNER_ORACLE_PORT"] = base_port
    if dist_utils.has_chief_oracle() and not dist_utils.is_chief_oracle():
        return None
    tuned = []
    for config in configs:
        values = {k: v for k, v in best[(config.norm, config.batch)].items() if not k.startswith("tuner/")}
        tuned.append(trial_config(config, values))
    return tuned


def _norm_and_batch(project: str) -> tuple[str, int]:
    norm, batch = project.rsplit("-b", 1)
    return norm, int(batch)


def best_lrs(searches: dict[str, list[dict]]) -> dict[str, list[tuple[int, float]]]:
    """Per norm, (batch, learning rate of the best trial) of every search, by batch."""
    result = {}
    for project, trials in searches.items():
        scored = [t for t in trials if t["score"] is not None]
        if scored:
            norm, batch = _norm_and_batch(project)
            result.setdefault(norm, []).append((batch, max(scored, key=lambda t: t["score"])["values"]["lr"]))
    return {norm: sorted(pairs) for norm, pairs in result.items()}


def read_trials(sweep_dir: str) -> dict[str, list[dict]]:
    """Every search's trials, {"<norm>-b<batch>": [{"trial_id", "status", "score", "values"}, ...]}."""
    searches = {}
    paths = glob.glob(os.path.join(sweep_dir, "tuner", "*", "trial_*", "trial.json"))
    for path in sorted(paths, key=lambda p: (_norm_and_batch(p.split(os.sep)[-3]), p)):
        with open(path, encoding="utf-8") as f:
            trial = json.load(f)
        project = os.path.basename(os.path.dirname(os.path.dirname(path)))
        searches.setdefault(project, []).append({
            "trial_id": trial.get("trial_id"), "status": trial.get("status"), "score": trial.get("score"),
            "values": trial.get("hyperparameters", {}).get("values", {}),
        })
    return searches
