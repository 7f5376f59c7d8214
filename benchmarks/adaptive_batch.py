"""Does `--batch adaptive` reach the target sooner than the best fixed batch? A sweep of fixed batches plus adaptive.

Usage: python benchmarks/adaptive_batch.py [--out /tmp/adaptive_bench] [--batch 16,32,64,128] [--seeds 3]
                                           [--base-batch 32] [--epochs 12] [--model resnet20] [--dataset digits]
                                           [--policy goodput] [--target-accuracy 0.98] [--resume]

Runs pipeline.sweep's batch study (config.batch_study(): lr 0.05 at batch 32, linear scaling for the fixed batches)
at the given batches plus `adaptive` (from --base-batch, 32 by default, with AdaScale's gain; lr is scaled to the base
batch, so the fixed runs keep theirs), one sweep over all seeds, side by side on the same machine, and compares per
seed and over the seeds' means:
  goal 1: adaptive time to target <= 0.85 x the best fixed batch's (least mean time to target);
  goal 2: adaptive examples to target <= 1.2 x the fixed batch's with the fewest (mean);
  goal 3: on no seed is adaptive's time to target more than 1.1 x that seed's best fixed run.
Time to target at steady speed: each step up to the target at its batch's steady seconds per step, the least over
all the sweep's epochs at that batch without measuring, leaving out each run's epoch that traced it
(`steady_seconds_per_step`; the fixed runs' long phases give the speed of the adaptive run's short ones). Beside it, the
training clock (summary.json's time to target, tracing of each new batch size included; for adaptive, plus all the
time its step-time ladder took, summary.json's batch_ladder_s, though the ladder's timing before a phase after the
target is not part of reaching it) and the wall clock.
When a goal is missed, the result says by how much and checks the goodput model's two terms against the run: the
step time it predicted for each new batch (decisions' T_step fit) against the run's measured seconds per step there,
and the B_simple it decided on against the next decision's measurement. It also gives the ceiling of any schedule on
this machine under the same model (`ceiling`): with the steady step times measured and the noise scale phi_k of each
decision before the target, an oracle that trains each phase at its best batch against the best single batch.
Writes benchmarks/results/adaptive_batch.json, with -<dataset file's stem> for another dataset and -base<B> for another
base batch (`result_name`; benchmarks/results.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import results  # noqa: E402
from pipeline import config as config_lib  # noqa: E402

GOALS = {"time_ratio": 0.85, "examples_ratio": 1.2, "worst_seed_time_ratio": 1.1}


def with_batches(history: list[dict], batch: int | None = None) -> list[dict]:
    """The history's records with "batch_size" (a fixed run's, `batch`, where the record has none)."""
    return [r if "batch_size" in r else {**r, "batch_size": batch} for r in history]


def steady_seconds_per_step(histories: list[list[dict]]) -> dict[int, float]:
    """{batch: the least training seconds per step (measuring left out) over every run's epochs at that batch, except
    the epoch in which a run first trained at it (it traces the train step)}, over all the sweep's runs: the fixed
    batches' long phases give the steady speed of the adaptive run's short ones."""
    table = {}
    for history in histories:
        previous, seen = 0, set()
        for record in history:
            steps, batch = record["step"] - previous, int(record["batch_size"])
            previous = record["step"]
            if batch in seen and steps > 0:
                seconds = (record["epoch_time_s"] - record.get("instrument_time_s", 0.0)) / steps
                table[batch] = min(table.get(batch, seconds), seconds)
            seen.add(batch)
    return table


def steady_time_to_target(history: list[dict], target_step: int | None, table: dict[int, float]) -> float | None:
    """Seconds to `target_step` at steady speed: each step at its batch's steady seconds per step (`table`; a batch
    missing from it at its own epochs' time, tracing included); None without a target step."""
    if target_step is None:
        return None
    total, previous = 0.0, 0
    for record in history:
        steps, batch = min(record["step"], target_step) - previous, int(record["batch_size"])
        own = (record["epoch_time_s"] - record.get("instrument_time_s", 0.0)) / max(record["step"] - previous, 1)
        total += max(steps, 0) * table.get(batch, own)
        previous = record["step"]
        if previous >= target_step:
            break
    return total


def model_check(run_dir: str, measured: dict[int, float]) -> list[dict]:
    """Per change of batch: the step-time ratio the goodput model predicted against the steady one measured in the
    sweep (`measured`), and the B_simple decided on against the next decision's."""
    from pipeline import rundir

    decisions = rundir.read_jsonl(os.path.join(run_dir, "batch_decisions.jsonl"))
    checks = []
    for i, d in enumerate(decisions):
        if not d["changed"]:
            continue
        fit = d.get("step_time")
        predicted = ((fit["alpha"] + fit["beta"] * d["new_batch"]) / (fit["alpha"] + fit["beta"] * d["old_batch"])
                     if fit else None)
        actual = (measured[d["new_batch"]] / measured[d["old_batch"]]
                  if d["new_batch"] in measured and d["old_batch"] in measured else None)
        later = next((e["noise_used"] for e in decisions[i + 1:] if e["noise_used"] is not None), None)
        checks.append({"step": d["step"], "old_batch": d["old_batch"], "new_batch": d["new_batch"],
                       "predicted_gain": d["predicted_gain"], "step_time_ratio_predicted": predicted,
                       "step_time_ratio_measured": actual, "noise_used": d["noise_used"], "noise_next": later})
    return checks


def phases(run_dir: str, target_step: int | None) -> list[float]:
    """The phi of each decision up to the run's target step (all of them without one; at least the first)."""
    from pipeline import rundir

    decisions = [d for d in rundir.read_jsonl(os.path.join(run_dir, "batch_decisions.jsonl"))
                 if d["noise_used"] is not None]
    kept = [d["noise_used"] for d in decisions if target_step is None or d["step"] <= target_step]
    return kept or [d["noise_used"] for d in decisions[:1]]


def compare(report: dict, sweep_dir: str) -> dict:
    """The goals' ratios per seed and over the means, at steady speed; the training and wall clocks beside them."""
    from pipeline import rundir

    fixed = [r for r in report["runs"] if r["status"] == "completed"]
    histories = {r["name"]: with_batches(rundir.read_history(os.path.join(sweep_dir, "runs", r["name"])), r["batch"])
                 for r in fixed}
    histories |= {r["name"]: rundir.read_history(os.path.join(sweep_dir, "runs", r["name"]))
                  for r in report["adaptive"]["runs"]}
    table = steady_seconds_per_step(list(histories.values()))

    def steady(row):
        return steady_time_to_target(histories[row["name"]], row["steps_to_target"], table)

    for r in fixed:
        r["steady_time_to_target_s"] = steady(r)
        r["examples_to_target"] = r["batch"] * r["steps_to_target"] if r["steps_to_target"] is not None else None
    by_batch = {}
    for r in fixed:
        by_batch.setdefault(r["batch"], []).append(r)
    means = {b: {key: statistics.mean(r[key] for r in rows) if all(r[key] is not None for r in rows) else None
                 for key in ("steady_time_to_target_s", "time_to_target_s", "examples_to_target")}
             for b, rows in by_batch.items()}
    reached = {b: m for b, m in means.items() if m["steady_time_to_target_s"] is not None}
    fastest = min(reached, key=lambda b: reached[b]["steady_time_to_target_s"], default=None)
    fewest = min(reached, key=lambda b: reached[b]["examples_to_target"], default=None)
    per_seed = []
    for run in report["adaptive"]["runs"]:
        summary = rundir.read_summary(os.path.join(sweep_dir, "runs", run["name"])) or {}
        mine = [r for r in fixed if r["seed"] == run["seed"] and r["steady_time_to_target_s"] is not None]
        best = min(mine, key=lambda r: r["steady_time_to_target_s"], default=None)
        steady_time = steady(run)
        per_seed.append({
            "seed": run["seed"], "adaptive": run["name"], "batches": run["batches"],
            "steps_to_target": run["steps_to_target"], "examples_to_target": run["examples_to_target"],
            "steady_time_to_target_s": steady_time, "time_to_target_s": run["time_to_target_s"],
            "batch_ladder_s": summary.get("batch_ladder_s", 0.0), "wall_time_s": run["wall_time_s"],
            "best_fixed": best and best["name"], "best_fixed_steady_time_s": best and best["steady_time_to_target_s"],
            "best_fixed_time_to_target_s": best and best["time_to_target_s"],
            "best_fixed_wall_time_s": best and best["wall_time_s"],
            "time_ratio": steady_time / best["steady_time_to_target_s"] if best and steady_time is not None else None,
            # The training clock, with the tracing of each new batch size and, for adaptive, all of its ladder's time
            # (the ladder traced the batches it timed).
            "clock_ratio": ((run["time_to_target_s"] + summary.get("batch_ladder_s", 0.0)) / best["time_to_target_s"]
                            if best and run["time_to_target_s"] is not None else None),
            "model_check": model_check(os.path.join(sweep_dir, "runs", run["name"]), table),
            "ceiling": ceiling(phases(os.path.join(sweep_dir, "runs", run["name"]), run["steps_to_target"]), table)})
    times = [s["steady_time_to_target_s"] for s in per_seed if s["steady_time_to_target_s"] is not None]
    examples = [s["examples_to_target"] for s in per_seed if s["examples_to_target"] is not None]
    reached_all = len(times) == len(per_seed)
    summary = {
        "best_fixed_batch_by_steady_time": fastest, "fewest_examples_fixed_batch": fewest,
        "fixed_means": {str(b): m for b, m in sorted(means.items())},
        "steady_seconds_per_step": {str(b): v for b, v in sorted(table.items())},
        "time_ratio": (statistics.mean(times) / reached[fastest]["steady_time_to_target_s"]
                       if times and fastest and reached_all else None),
        "examples_ratio": (statistics.mean(examples) / reached[fewest]["examples_to_target"]
                           if examples and fewest and reached_all else None),
        "worst_seed_time_ratio": (max((s["time_ratio"] for s in per_seed if s["time_ratio"] is not None),
                                      default=None) if reached_all else None),
        "clock_ratios": [s["clock_ratio"] for s in per_seed],
        "adaptive_reached_target": f"{len(times)}/{len(per_seed)}",
    }
    summary["goals"] = {k: {"goal": f"<= {v}", "measured": summary[k],
                            "met": summary[k] is not None and summary[k] <= v,
                            "missed_by": None if summary[k] is None or summary[k] <= v else summary[k] / v - 1}
                        for k, v in GOALS.items()}
    summary["all_goals_met"] = all(g["met"] for g in summary["goals"].values())
    summary["diagnosis"] = diagnosis(report, per_seed)
    return {"per_seed": per_seed, "summary": summary}


def ceiling(phis: list[float], table: dict[int, float]) -> dict | None:
    """What any batch schedule over `table`'s batches could gain over the best fixed one, by McCandlish et al. 2018
    (sec. 2, a step at batch B makes the progress of 1 / (1 + phi / B) steps at an infinite batch; app. D models a
    batch that varies during training the same way):

        time per unit of progress at B in phase k   c_k(B) = T(B) (1 + phi_k / B)
        oracle schedule                             sum_k min_B c_k(B)
        best fixed batch                            min_B sum_k c_k(B)

    with T(B) the steady seconds per step measured and one equal unit of progress per phase (a decision's epoch).
    Returns {"ratio": oracle / best fixed, "best_fixed", "oracle_batches"}, or None without a phi or two batches.
    The ratio is the least time ratio a policy could reach if the model holds: near 1 when T(B) (1 + phi / B) is
    flat over the batches, as when the step time grows in proportion to the batch."""
    if not phis or len(table) < 2:
        return None
    cost = {b: [t * (1 + phi / b) for phi in phis] for b, t in table.items()}
    best = min(cost, key=lambda b: sum(cost[b]))
    oracle = sum(min(c[k] for c in cost.values()) for k in range(len(phis)))
    return {"ratio": oracle / sum(cost[best]), "best_fixed": best,
            "oracle_batches": [min(cost, key=lambda b: cost[b][k]) for k in range(len(phis))], "phis": phis}


def diagnosis(report: dict, per_seed: list[dict]) -> dict:
    """Which term of the goodput model was wrong: the step time (the decisions' T_step fit against the steady step
    times measured in the sweep) and the statistical efficiency (the B_simple decided on against the B_crit that
    the fixed runs' steps to target give, S(B) = S_min (1 + B_crit / B), McCandlish et al. 2018)."""
    checks = [c for s in per_seed for c in s["model_check"]]
    ratios = [c["step_time_ratio_measured"] / c["step_time_ratio_predicted"] for c in checks
              if c["step_time_ratio_measured"] and c["step_time_ratio_predicted"]]
    used = [c["noise_used"] for c in checks if c["noise_used"]]
    fit = next(iter(report["fits"].values()), {}).get("steps_to_target") or {}
    interval = (next(iter(report["fits"].values()), {}).get("steps_to_target_interval") or {}).get("b_crit")
    b_crit = fit.get("b_crit") if fit.get("determined") else None
    result = {"step_time_measured_over_predicted": statistics.median(ratios) if ratios else None,
              "b_simple_decided_on": used, "b_crit_of_fixed_runs": b_crit, "b_crit_interval": interval,
              "b_simple_over_b_crit": statistics.median(used) / b_crit if used and b_crit else None}
    lines = []
    if result["step_time_measured_over_predicted"] is not None:
        lines.append(f"step time: a doubling of the batch cost {result['step_time_measured_over_predicted']:.2f}x "
                     "the step time the fit predicted (median over the changes)")
    if result["b_simple_over_b_crit"] is not None:
        lines.append(f"efficiency: the B_simple decided on (median {statistics.median(used):.0f}) was "
                     f"{result['b_simple_over_b_crit']:.1f}x the B_crit of the fixed runs' steps to target "
                     f"({b_crit:.0f}" + (f", 95% interval {interval[0]:.3g} to {interval[1]:.3g}" if interval else "")
                     + "), so the model overstated what larger batches save in steps")
    ceilings = [s["ceiling"] for s in per_seed if s.get("ceiling")]
    if ceilings:
        result["ceiling_ratio_per_seed"] = [c["ratio"] for c in ceilings]
        low = min(result["ceiling_ratio_per_seed"])
        lines.append(f"ceiling: trained at the best batch for each decision's B_simple, a schedule would take at "
                     f"least {low:.2f}x the time of the best fixed batch under the same model (per seed "
                     + ", ".join(f"{c['ratio']:.2f}" for c in ceilings) + f"; goal {GOALS['time_ratio']})"
                     + (", so no policy could meet the goal on these step times" if low > GOALS["time_ratio"] else ""))
    result["text"] = "; ".join(lines)
    return result


def result_name(dataset: str | None, base_batch: int | None) -> str:
    """adaptive_batch for the digits at the study's base batch; -<dataset file's stem> for another dataset (shapes for
    npz:.../shapes.npz) and -base<B> for another base batch are appended."""
    stem = os.path.splitext(os.path.basename((dataset or "digits").split(":", 1)[-1]))[0]
    name = "adaptive_batch" if stem == "digits" else f"adaptive_batch-{stem}"
    default = config_lib.batch_study().base_batch
    return name if base_batch in (None, default) else f"{name}-base{base_batch}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/adaptive_bench")
    parser.add_argument("--batch", default="16,32,64,128", help="fixed batch sizes, comma-separated")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=None, help="default: the batch study's (12)")
    parser.add_argument("--model", default=None, help="default: the batch study's (resnet20)")
    parser.add_argument("--dataset", default=None, help="default: digits; e.g. npz:shapes.npz (benchmarks/shapes.py)")
    parser.add_argument("--policy", default="goodput", choices=("goodput", "norm-test"))
    parser.add_argument("--target-accuracy", type=float, default=None, help="default: the batch study's (0.98)")
    parser.add_argument("--base-batch", type=int, default=None,
                        help="the adaptive run's first batch (default: the batch study's 32); lr scales linearly to "
                             "it, so the fixed runs keep their learning rates")
    parser.add_argument("--resume", action="store_true", help="continue the sweep in --out (finished runs skipped)")
    args = parser.parse_args(argv)
    recorder = results.Recorder(result_name(args.dataset, args.base_batch))

    from pipeline import startup
    from pipeline.study import batch_sweep as sweep
    from pipeline.training import execution

    startup.import_tensorflow()
    overrides = {"epochs": args.epochs, "model": args.model, "dataset": args.dataset,
                 "target_accuracy": args.target_accuracy}
    config = dataclasses.replace(config_lib.batch_study(), verbose=0, export=False, batch_policy=args.policy,
                                 **{k: v for k, v in overrides.items() if v is not None})
    if args.base_batch is not None:
        if args.base_batch < 1:
            parser.error(f"--base-batch: must be a positive integer, got {args.base_batch}")
        # lr is the learning rate at base_batch and the fixed runs scale it linearly: the same lr at every fixed batch.
        config = dataclasses.replace(config, base_batch=args.base_batch,
                                     lr=config.lr * args.base_batch / config.base_batch)
    config = config_lib.validate(config)
    execution.set_threads(config)
    if os.path.isdir(args.out) and os.listdir(args.out) and not args.resume:
        parser.error(f"--out: {args.out} is not empty; give a new directory or --resume")
    batches = tuple(sorted(int(b) for b in args.batch.split(","))) + (config_lib.ADAPTIVE,)
    spec = sweep.Spec(batches=batches, seeds=tuple(range(args.seeds)))
    report = sweep.sweep(config, spec, args.out, log=lambda line: print(line, flush=True))
    result = compare(report, args.out)
    path = recorder.write(rounds=result["per_seed"], summary=result["summary"],
                          settings={"batches": list(batches), "seeds": args.seeds, "epochs": config.epochs,
                                    "model": config.model, "dataset": config.dataset, "policy": args.policy,
                                    "base_batch": config.base_batch, "lr": config.lr,
                                    "target_accuracy": config.target_accuracy, "out": args.out})
    for name, goal in result["summary"]["goals"].items():
        measured = "not measured" if goal["measured"] is None else f"{goal['measured']:.3f}"
        print(f"{name}: {measured} (goal {goal['goal']}: {'met' if goal['met'] else 'missed'})")
    print(f"diagnosis: {result['summary']['diagnosis']['text']}")
    print(f"result: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
