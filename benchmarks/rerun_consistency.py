"""Does the sweep's report survive a rerun? The default sweep several times, its verdicts and B_crit compared.

Usage: python benchmarks/rerun_consistency.py [--out /tmp/rerun_bench] [--reruns 3] [--same-seeds] [--resume]
                                              [--batch 8,16,32,64,128] [--seeds 2] [--epochs 12] [--model resnet20]
                                              [--val-fraction 0.1] [--target-accuracy 0.98]

Runs the default sweep (pipeline.sweep's defaults and config.batch_study(), without --deterministic) --reruns times
into <out>/rerun-<i>, each with its own seeds (rerun i uses seeds i*S .. i*S+S-1 for S seeds, so that the reruns
differ as reruns on new seeds do; --same-seeds gives every rerun seeds 0..S-1, which then differ only by
nondeterministic ops), and checks the acceptance rules of the report's uncertainty:
  1. every finding gives the same verdict in all reruns, or is undetermined in some of them. Findings are paired
     across reruns by topic (classify: the question, the normalization, and which finding: least time, fewest steps,
     the onset of diminishing returns, a batch's accuracy on more replicas, ...), not by position. A verdict is the
     decided answer ("Yes", "No", "batch 64" for a resolved winner, "onset at batch 32", "best accuracy at batch
     16"); undetermined ones say "not resolved", "Not enough data", "Not clearly", "not determined", "within noise",
     "Mixed", or leave the finding out; sentences that state measurements (how many batches reached the target, a
     batch that did not, the S(B) fit with its errors, what a fit leaves out) are information, not verdicts;
  2. each rerun's fitted B_crit lies inside every other rerun's bootstrap interval (None, not False, when no rerun
     has a B_crit and another an interval to hold it). Beside it, the same check against every other rerun's rerun
     interval (pipeline/study/bootstrap.py: where another sweep's B_crit falls, sqrt(2) or so wider than the
     interval of the true B_crit, which holds another estimate only about 83% of the time even when right).
A noisy study (a small validation split, a target near the plateau: --val-fraction 0.03 --target-accuracy 0.99) shows
whether the report says which differences it cannot resolve instead of naming a winner.
--resume continues the reruns in --out; a rerun directory whose runs are all finished (at least batches x seeds run
directories, each completed or failed) trains nothing: its report is rebuilt from the runs by this code
(pipeline.study.sweep_report.build_report), so that a finished benchmark can be re-judged after the report changes.
Writes benchmarks/results/rerun_consistency-<S>seeds.json (benchmarks/results.py) with every rerun's verdicts, B_crit
and its interval, wall and CPU seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import math
import os
import re
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import results  # noqa: E402
from pipeline import config as config_lib  # noqa: E402
from pipeline.study import findings  # noqa: E402

UNDETERMINED = re.compile(r"not resolved|not enough data|not clearly|not determined|unclear|mixed|within noise|"
                          r"\(absent\)", re.IGNORECASE)
INFO = "(information)"  # a sentence that states a measurement or what was left out, not a verdict
NORM_NAMES = tuple(name[:1].upper() + name[1:] for name in findings.NAMES.values())


def split_norm(sentence: str) -> tuple[str, str]:
    """('BatchNorm: ', the rest) for a finding prefixed with its normalization, else ('', sentence)."""
    for name in NORM_NAMES:
        if sentence.startswith(name + ": "):
            return name + ": ", sentence[len(name) + 2:]
    return "", sentence


def classify(question: str, sentence: str) -> tuple[str, str]:
    """(topic, verdict) of a finding: the topic pairs the same finding across reruns (question, normalization and,
    where a question has several, which finding: least time, fewest steps, the onset, a batch that did not reach the
    target, an accuracy at one global batch), the verdict is its decided answer, an undetermined one (UNDETERMINED)
    or INFO for sentences that state measurements (counts, fits with their errors, what a fit leaves out)."""
    norm, body = split_norm(sentence)
    text = body.lower()
    topic = f"{question}: {norm}"
    winner = re.search(r"took (the least time|the fewest steps)", text)
    if winner:
        batch = re.match(r"batch (\d+) took", text)
        return topic + winner[1], f"batch {batch[1]}" if batch else "not resolved"
    if question == "target":
        not_reached = re.match(r"batch (\d+) did not reach", text)
        if not_reached:
            return topic + f"batch {not_reached[1]} did not reach the target", INFO
        if text.startswith("not enough data"):
            return topic + "the least time", "not enough data"
        return topic + ("run-to-run spread" if "run-to-run spread is unknown" in text else "runs that reached"), INFO
    if "within noise of" in text:  # BatchNorm against GroupNorm within the noise of the difference
        return topic.rstrip(": "), "within noise"
    onset = re.match(r"diminishing returns begin at batch (\d+)", text)
    if onset or "no diminishing returns yet" in text or text.startswith("where returns diminish"):
        return topic + "onset", f"onset at batch {onset[1]}" if onset else (
            "no onset" if "no diminishing returns yet" in text else "not resolved")
    if text.startswith("the fit s(b)") or "leave out the batch sizes" in text or text.startswith("tuned per batch") \
            or text.startswith("the bn batch was") or question == "failed":
        return topic + text[:20], INFO
    best = re.match(r"batch (\d+) gave the best test accuracy", text)
    if best or "the highest mean test accuracy" in text:
        return topic + "best accuracy", f"best accuracy at batch {best[1]}" if best else "not determined"
    per_device = re.match(r"at global batch (\d+), test accuracy", text)
    if per_device:
        gap = re.search(r"the difference ([+-])[0-9.]+ is (more|not more) than", text)
        decided = gap and gap[2] == "more"
        return topic + f"accuracy at global batch {per_device[1]}", (
            f"accuracy {'higher' if gap[1] == '+' else 'lower'} on more replicas" if decided else "not determined")
    return topic.rstrip(": "), re.split(r"[:(]", body, maxsplit=1)[0].strip()


def verdict(sentence: str, question: str = "") -> str:
    """The verdict of one finding (classify's second part)."""
    return classify(question, sentence)[1]


def consistent(heads: list[str]) -> bool:
    """Whether the reruns' verdicts of one finding agree, ignoring the reruns that left it undetermined (or did not
    state it) and sentences that are information rather than verdicts."""
    decided = {head for head in heads if head != INFO and not UNDETERMINED.search(head)}
    return len(decided) <= 1


def compare(reports: list[dict]) -> dict:
    """Verdicts per finding across the reruns (paired by classify's topic), and each rerun's B_crit against every
    other rerun's interval."""
    per_rerun = []
    for report in reports:
        topics = {}
        for question, sentences in report["answers"].items():
            for sentence in sentences:
                topic, head = classify(question, sentence)
                while topic in topics:  # the same topic twice in one report: keep both, in order
                    topic += "+"
                topics[topic] = head
        per_rerun.append(topics)
    findings = {}
    for topic in dict.fromkeys(t for topics in per_rerun for t in topics):
        heads = [topics.get(topic, "(absent)") for topics in per_rerun]
        findings[topic] = {"heads": heads, "consistent": consistent(heads),
                           "decided": sum(h != INFO and not UNDETERMINED.search(h) for h in heads),
                           "information": all(h in (INFO, "(absent)") for h in heads)}
    crits = []
    for i, r in enumerate(reports):
        for norm, fit in r["fits"].items():
            interval = fit.get("steps_to_target_interval")
            crits.append({"rerun": i, "norm": norm,
                          "b_crit": fit["steps_to_target"]["b_crit"] if fit["steps_to_target"] else None,
                          "interval": interval["b_crit"] if interval else None,
                          "rerun_interval": interval.get("b_crit_rerun") if interval else None})
    inside = []
    for mine in crits:
        for other in crits:
            if other["rerun"] != mine["rerun"] and mine["norm"] == other["norm"] and mine["b_crit"] is not None \
                    and other["interval"]:
                entry = {"rerun": mine["rerun"], "in_interval_of": other["rerun"], "norm": mine["norm"]}
                for name, key in (("inside", "interval"), ("inside_rerun_interval", "rerun_interval")):
                    if other[key]:
                        low, high = other[key]
                        entry[name] = (low is None or low <= mine["b_crit"]) and (high is None or mine["b_crit"] <= high)
                inside.append(entry)
    rerun_checks = [x["inside_rerun_interval"] for x in inside if "inside_rerun_interval" in x]
    return {"findings": findings, "b_crit": crits, "b_crit_inside": inside,
            "all_verdicts_consistent": all(f["consistent"] for f in findings.values()),
            # None: no rerun has both a fitted B_crit and another rerun's interval to hold it (not determined).
            "all_b_crit_inside": all(x["inside"] for x in inside) if inside else None,
            "all_b_crit_inside_rerun_intervals": all(rerun_checks) if rerun_checks else None}


def seeds_against_reruns(reports: list[dict]) -> dict | None:
    """Do a sweep's seeds show the spread of a rerun? The variance of log(steps to target) between the reruns' means
    of a (norm, batch) against the within-rerun variance of its seeds over n, pooled over the groups (a one-way
    analysis of variance per group, the groups' sums added).

    Within rerun k a group has n_k seeds with mean m_k and sample variance s_k^2. If the reruns differ only as their
    seeds do, Var(m_k) = sigma^2 / n_k, estimated by the pooled s^2 = sum (n_k - 1) s_k^2 / sum (n_k - 1), and
    F = [sum_k n_k (m_k - m)^2 / (K - 1)] / s^2 (m the seeds' grand mean) follows F(K - 1, sum (n_k - 1)). Adding the
    groups' numerators and denominators (with their degrees of freedom) gives one F for the sweep. F well above 1
    means something shared by one sweep's runs and not seen in its seeds (the same validation split is shared by
    every rerun too, so its noise is in neither term) moves the reruns apart, and intervals built from the seeds'
    spread are too narrow for a rerun.

    Returns:
      None with fewer than 2 reruns or no group with 2 seeds in a rerun; else {"f", "dof": [between, within],
      "p_value" (the upper tail of F under no rerun effect), "groups": {"norm b<batch>": {"f", "between_var",
      "within_var", "reruns"}}}.
    """
    from scipy import stats

    groups = {}
    for k, report in enumerate(reports):
        for run in report["runs"]:
            if run.get("status") == "completed" and run.get("steps_to_target"):
                key = f"{run['norm']} b{run['batch']}"
                groups.setdefault(key, {}).setdefault(k, []).append(math.log(run["steps_to_target"]))
    between_ss = between_dof = within_ss = within_dof = 0.0
    per_group = {}
    for key, by_rerun in groups.items():
        samples = [np.asarray(v) for v in by_rerun.values()]
        if len(samples) < 2 or not any(len(v) > 1 for v in samples):
            continue
        grand = np.concatenate(samples).mean()
        b_ss = sum(len(v) * (v.mean() - grand) ** 2 for v in samples)
        w_ss = sum(((v - v.mean()) ** 2).sum() for v in samples)
        b_dof, w_dof = len(samples) - 1, sum(len(v) - 1 for v in samples)
        per_group[key] = {"f": (b_ss / b_dof) / (w_ss / w_dof) if w_ss > 0 else None, "between_var": b_ss / b_dof,
                          "within_var": w_ss / w_dof, "reruns": len(samples)}
        between_ss, between_dof, within_ss, within_dof = (between_ss + b_ss, between_dof + b_dof,
                                                          within_ss + w_ss, within_dof + w_dof)
    if not per_group or within_ss <= 0:
        return None
    f = (between_ss / between_dof) / (within_ss / within_dof)
    return {"f": f, "dof": [between_dof, within_dof], "p_value": float(stats.f.sf(f, between_dof, within_dof)),
            "groups": per_group}


def finished(sweep_dir: str, expected: int) -> bool:
    """Whether sweep_dir holds at least `expected` runs and every one is finished (completed, or failed: a result)."""
    from pipeline import rundir

    runs = glob.glob(os.path.join(sweep_dir, "runs", "*"))
    statuses = [(rundir.read_summary(run) or {}).get("status") for run in runs]
    return len(runs) >= expected and all(status in ("completed", "failed") for status in statuses)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/rerun_bench")
    parser.add_argument("--reruns", type=int, default=3)
    parser.add_argument("--same-seeds", action="store_true", help="every rerun on seeds 0..S-1")
    parser.add_argument("--resume", action="store_true",
                        help="continue the reruns in --out (finished runs are skipped, as the sweep does; a rerun "
                             "whose runs are all finished only gets its report rebuilt)")
    parser.add_argument("--batch", default=None, help="batch sizes, comma-separated (default: the sweep's)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per batch (default: the sweep's)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--model", default=None)
    parser.add_argument("--val-fraction", type=float, default=None)
    parser.add_argument("--target-accuracy", type=float, default=None)
    args = parser.parse_args(argv)

    from pipeline import startup
    from pipeline.study import batch_sweep as sweep
    from pipeline.study import sweep_report
    from pipeline.training import execution

    startup.import_tensorflow()
    config = dataclasses.replace(config_lib.batch_study(), verbose=0)
    overrides = {"epochs": args.epochs, "model": args.model, "val_fraction": args.val_fraction,
                 "target_accuracy": args.target_accuracy}
    config = config_lib.validate(dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None}))
    execution.set_threads(config)
    batches = tuple(int(b) for b in args.batch.split(",")) if args.batch else sweep.DEFAULT_BATCHES
    seeds = args.seeds or sweep.DEFAULT_SEEDS
    recorder = results.Recorder(f"rerun_consistency-{seeds}seeds")
    if os.path.isdir(args.out) and os.listdir(args.out) and not args.resume:
        parser.error(f"--out: {args.out} is not empty; give a new directory, or --resume to continue it (a "
                     "finished rerun only gets its report rebuilt)")
    reports, rounds = [], []
    for rerun in range(args.reruns):
        first = 0 if args.same_seeds else rerun * seeds
        spec = sweep.Spec(batches=batches, seeds=tuple(range(first, first + seeds)),
                          warmup_fraction=sweep.WARMUP_FRACTION)
        wall, cpu = time.perf_counter(), time.process_time()
        sweep_dir = os.path.join(args.out, f"rerun-{rerun}")
        rebuilt = args.resume and finished(sweep_dir, len(batches) * seeds)
        if rebuilt:  # every run is finished: only the report is made again, by this code
            report = sweep_report.build_report(sweep_dir)
            print(f"rerun {rerun}: {sweep_dir} is finished; report rebuilt from its runs", flush=True)
        else:
            report = sweep.sweep(config, spec, sweep_dir, log=lambda line: print(line, flush=True))
        # Each run's own wall time (summary.json) survives a resumed benchmark, where this process's clock does not.
        runs = {r["name"]: {"wall_s": r["wall_time_s"], "status": r["status"]} for r in report["runs"]}
        rounds.append({"rerun": rerun, "seeds": list(spec.seeds), "report_rebuilt_only": rebuilt,
                       "wall_s": time.perf_counter() - wall,
                       "cpu_s": time.process_time() - cpu, "runs": runs, "findings": report["findings"],
                       "b_crit": {n: f["steps_to_target"] for n, f in report["fits"].items()},
                       "b_crit_interval": {n: f.get("steps_to_target_interval") for n, f in report["fits"].items()}})
        reports.append(report)
        print(f"rerun {rerun}: {rounds[-1]['wall_s']:.0f} s wall, {rounds[-1]['cpu_s']:.0f} s CPU", flush=True)
    summary = compare(reports) if len(reports) > 1 else {}
    summary["seeds_against_reruns"] = spread = seeds_against_reruns(reports)
    summary["wall_s"] = [r["wall_s"] for r in rounds]
    summary["cpu_s"] = [r["cpu_s"] for r in rounds]
    for key, value in summary.get("findings", {}).items():
        if not value["information"]:
            print(f"{'consistent' if value['consistent'] else 'INCONSISTENT'}: {key}: {value['heads']}")
    print(f"verdicts consistent: {summary.get('all_verdicts_consistent')}; each B_crit inside the others' intervals: "
          f"{summary.get('all_b_crit_inside')}; inside the others' rerun intervals: "
          f"{summary.get('all_b_crit_inside_rerun_intervals')}")
    if spread:
        print(f"steps to target, between reruns against within (one-way ANOVA of log steps pooled over the groups): "
              f"F = {spread['f']:.2f} on {spread['dof'][0]:.0f}, {spread['dof'][1]:.0f} dof, "
              f"p = {spread['p_value']:.3f}")
    settings = {"batches": list(batches), "seeds_per_rerun": seeds, "same_seeds": args.same_seeds,
                "reruns": args.reruns, "config": config_lib.to_dict(config)}
    print(f"result: {recorder.write(rounds=rounds, summary=summary, settings=settings)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
