"""The advisor's prediction checked against a sweep: predicted and measured steps and time to target by batch.

From the probe's B_simple = phi, steps to the target follow S(B) = S_min (1 + phi / B) (McCandlish et al. 2018).
The probe predicts the shape, not the scale: S_min is fitted to the sweep's measured steps with phi held fixed
(the geometric mean of S_measured / (1 + phi / B), so that every batch counts by its relative error). Predicted
time to target is S(B) x T_step(B), the probe's step-time fit. The sweep's measured time to target is each run's
training clock until the target (pipeline.run_timing.time_to_target: the first epoch's tracing and the epoch-end
validations included, which the prediction leaves out); "off" is predicted / measured.
"""

from __future__ import annotations

import math
import os

import numpy as np

from pipeline.training import goodput
from pipeline.study import bootstrap
from pipeline.study import fits as fits_lib


def for_sweep(sweep_dir: str, groups: list[dict]) -> dict | None:
    """check() with the advice the sweep was given (<sweep_dir>/advice.json, from --advice), or None without one."""
    from pipeline import advised_config

    path = os.path.join(sweep_dir, "advice.json")
    if not os.path.exists(path):
        return None
    return check(advised_config.read(path, flag=f"advice of {sweep_dir}"), groups)


def check(advice: dict, groups: list[dict]) -> dict | None:
    """Predicted beside measured for the sweep's groups of the advice's norm; None if no batch reached the target.

    Args:
        advice: pipeline.advised_config.read()'s dict (a recommendation).
        groups: pipeline.study.sweep_report.aggregate()'s rows (per norm and batch, mean over seeds).
    """
    phi = advice["noise"]["noise_scale"]
    step_time = goodput.StepTime(**advice["step_time"])
    norm = advice["config"]["norm"]
    members = [g for g in groups if g["norm"] == norm]
    reached = [(g["batch"], g["steps_to_target"]["mean"]) for g in members if g["steps_to_target"]["mean"]]
    if not reached:
        return None
    s_min = math.exp(np.mean([math.log(s / goodput.steps_ratio(b, phi)) for b, s in reached]))
    rows = []
    for g in members:
        batch = g["batch"]
        predicted_steps = s_min * float(goodput.steps_ratio(batch, phi))
        predicted_time = predicted_steps * float(step_time(batch))
        steps, seconds = g["steps_to_target"]["mean"], g["time_to_target_s"]["mean"]
        per_step = g["time_per_step_ms"]["mean"]
        interval = g.get("target_interval") or {}
        step_interval = seed_interval(g["time_per_step_ms"])
        rows.append({"batch": batch, "predicted_steps": predicted_steps, "measured_steps": steps,
                     "steps_off": predicted_steps / steps if steps else None,
                     "measured_steps_interval": interval.get("steps_to_target"),
                     "steps_inside": inside(predicted_steps, interval.get("steps_to_target")),
                     "predicted_step_ms": 1000 * float(step_time(batch)), "measured_step_ms": per_step,
                     "measured_step_ms_interval": step_interval,
                     "step_ms_inside": inside(1000 * float(step_time(batch)), step_interval),
                     "predicted_time_s": predicted_time, "measured_time_s": seconds,
                     "time_off": predicted_time / seconds if seconds else None,
                     "measured_time_interval": interval.get("time_to_target_s"),
                     "time_inside": inside(predicted_time, interval.get("time_to_target_s"))})
    # As the findings do: among the batches whose every run reached the target, the others bounding it from below.
    reached = [g for g in members if g["time_to_target_s"]["mean"] is not None and g["reached"] == g["completed"]]
    censored = [g for g in members if g.get("censored_bound")]
    race = bootstrap.winner(reached, "time_to_target_s", censored) if reached else None
    timed = [r for r in rows if r["measured_time_s"] and (not race or r["batch"] == race["best"]["batch"])]
    fastest = min(timed, key=lambda r: r["measured_time_s"]) if timed else None
    recommended = next((r for r in rows if r["batch"] == advice["batch"]), None)
    result = {"norm": norm, "recommended_batch": advice["batch"], "recommended_lr": advice["lr"],
              "noise_scale": phi, "noise_scale_lo": advice["noise"]["noise_scale_lo"],
              "noise_scale_hi": advice["noise"]["noise_scale_hi"], "s_min": s_min, "rows": rows,
              "fastest_batch": fastest["batch"] if fastest else None,
              "fastest_resolved": race["resolved"] if race else None,
              "runner_up_batch": race["runner_up"]["batch"] if race and race["runner_up"] else None,
              "fastest_separated": race["separated"] if race else None,
              "fastest_not_ruled_out": [g["batch"] for g in race["not_ruled_out"]] if race else [],
              "predicted_fastest": min(rows, key=lambda r: r["predicted_time_s"])["batch"],
              "recommended_vs_fastest": None}
    if fastest and recommended and recommended["measured_time_s"]:
        result["recommended_vs_fastest"] = recommended["measured_time_s"] / fastest["measured_time_s"]
    off = [abs(math.log(r["steps_off"])) for r in rows if r["steps_off"]]
    result["steps_off_typical"] = math.exp(float(np.median(off))) if off else None
    return result


def seed_interval(stat: dict) -> list | None:
    """[mean - Z se, mean + Z se] with se = std / sqrt(n) over the seeds (fits.Z); None with one seed, whose
    run-to-run spread is unknown."""
    if stat["mean"] is None or stat["std"] is None:
        return None
    half = fits_lib.Z * stat["std"] / math.sqrt(stat["n"])
    return [stat["mean"] - half, stat["mean"] + half]


def inside(value: float, interval: list | None) -> bool | None:
    """Whether a predicted value lies in a measured [low, high] interval (high None: unbounded); None without one."""
    if not interval:
        return None
    return interval[0] <= value and (interval[1] is None or value <= interval[1])


def _measured(value, interval, fmt: str) -> str:
    if value is None:
        return "–"
    return fmt.format(value) + (f" {bootstrap.interval_text(interval, fmt)}" if interval else "")


def _off(ratio, within) -> str:
    if ratio is None:
        return "–"
    return f"{ratio:.2f}x" + _within(within)


def _within(inside_interval) -> str:
    return {True: " (inside)", False: " (outside)", None: ""}[inside_interval]


def _number(value, fmt: str) -> str:
    return fmt.format(value) if value is not None else "–"


def markdown(result: dict) -> str:
    """The report's "Predicted vs measured" section."""
    lines = ["## Predicted vs measured (batch-size advisor)", "",
             f"The advisor's probe measured B_simple {result['noise_scale']:.3g} ({result['noise_scale_lo']:.3g} to "
             f"{result['noise_scale_hi']:.3g}) and recommended batch {result['recommended_batch']} (lr "
             f"{result['recommended_lr']:.3g}). Predicted steps: S_min (1 + B_simple / B) with S_min "
             f"{result['s_min']:.0f} fitted to the measured steps; predicted time: those steps x the probe's step-time "
             "fit (steady steps only). Measured: this sweep (its own learning rates, not the advised one); its time is "
             "each run's training clock until the target, which also holds the first epoch's tracing and the "
             "epoch-end validations.", "",
             "| batch | steps predicted | steps measured | off | ms/step predicted | ms/step measured | "
             "time predicted (s) | time measured (s) | off |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['batch']} | {r['predicted_steps']:.0f} | "
                     f"{_measured(r['measured_steps'], r.get('measured_steps_interval'), '{:.0f}')} | "
                     f"{_off(r['steps_off'], r.get('steps_inside'))} | {r['predicted_step_ms']:.1f} | "
                     f"{_measured(r['measured_step_ms'], r.get('measured_step_ms_interval'), '{:.1f}')}"
                     f"{_within(r.get('step_ms_inside'))} | {r['predicted_time_s']:.1f} | "
                     f"{_measured(r['measured_time_s'], r.get('measured_time_interval'), '{:.1f}')} | "
                     f"{_off(r['time_off'], r.get('time_inside'))} |")
    lines += ["", "Measured [low, high]: the 95% bootstrap interval of the sweep's steps and time to target "
              "(validation noise, and the run-to-run spread with several seeds; pipeline/study/bootstrap.py), and for "
              f"ms/step the mean ± {fits_lib.Z:.0f} standard errors over seeds (none with one seed: run-to-run spread "
              "unknown); inside / outside: whether the prediction lies in it."]
    resolved = result.get("fastest_resolved")
    if resolved:
        measured = (f"{result['fastest_batch']} (its interval lies below the runner-up's, batch "
                    f"{result['runner_up_batch']})" if result["runner_up_batch"] is not None else
                    f"{result['fastest_batch']} (its interval lies below the bounds of the runs that did not reach "
                    "the target)")
    elif resolved is False:
        reasons = [] if result.get("fastest_separated") else [
            f"batch {result['fastest_batch']} and {result['runner_up_batch']} are not distinguishable (their intervals "
            "overlap)"]
        if result.get("fastest_not_ruled_out"):
            reasons.append(f"the runs of batch {', '.join(map(str, result['fastest_not_ruled_out']))} that did not "
                           f"reach the target bound their time only from below, under batch {result['fastest_batch']}'s "
                           "upper end")
        measured = "not resolved: " + "; ".join(reasons)
    elif result.get("runner_up_batch") is not None:
        measured = (f"not determined: batch {result['fastest_batch']} had the least mean time, with no interval to "
                    f"separate it from batch {result['runner_up_batch']}")
    else:
        measured = _number(result["fastest_batch"], "{}")
    summary = f"Predicted fastest batch: {result['predicted_fastest']}; measured fastest: {measured}."
    if result["recommended_vs_fastest"] is not None:
        summary += (f" The recommended batch's measured time to target was {result['recommended_vs_fastest']:.2f}x "
                    "the fastest's (at the sweep's learning rate for that batch).")
    if result["steps_off_typical"] is not None:
        summary += f" Predicted steps were off by a factor {result['steps_off_typical']:.2f} (median over batches)."
    return "\n".join(lines + ["", summary])
