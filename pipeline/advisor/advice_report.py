"""The advisor's artifact: advice from the probe's measurements, written as advice.json / advice.md / goodput.png.

`build` turns pipeline.advisor.probe's measurements into advice with pipeline.training.goodput's formulas; `write`
writes it.
Its one reader is pipeline/advised_config.py (pipeline.train --advice, the sweep's prediction check).
"""

from __future__ import annotations

import math
import os

from pipeline.training import goodput
from pipeline.config import Config

MAX_SPREAD = 4.0  # B_simple's interval hi / lo above which the noise scale counts as not determined
MEMORY_MARGIN = 0.9  # after an out-of-memory error, candidates stop 10% below the largest batch that ran


def _undetermined(noise: dict) -> str:
    """Why the probe's noise scale cannot carry a recommendation, or "" when it can."""
    if not noise["norm_sq_lo"] > 0:
        return (f"|G|^2 is indistinguishable from zero ({noise['norm_sq']:.3g}, interval {noise['norm_sq_lo']:.3g} "
                f"to {noise['norm_sq_hi']:.3g})")
    if not noise["noise_scale_lo"] > 0 or noise["noise_scale_hi"] / noise["noise_scale_lo"] > MAX_SPREAD:
        return (f"B_simple's interval {noise['noise_scale_lo']:.3g} to {noise['noise_scale_hi']:.3g} spans more than "
                f"{MAX_SPREAD:g}x")
    return ""


def phase_text(phase: dict) -> str:
    """Which phase of training the probe reached, in words."""
    text = (f"the first {phase['steps']} steps ({phase['fraction_of_run']:.0%} of the planned run), training loss "
            f"{phase['loss_start']:.3g} -> {phase['loss_end']:.3g}, validation accuracy {phase['val_accuracy']:.3f}")
    if phase.get("target_accuracy"):
        text += f" against the target {phase['target_accuracy']:.3f}"
    return text + ("; B_simple grows later in training (McCandlish et al. 2018, fig. 6), so this is a lower "
                   "estimate of the later critical batch")


def build(measured: dict, config: Config, max_batch: int) -> dict:
    """Advice from probe.probe()'s measurements (see pipeline/training/goodput.py for the formulas).

    Returns:
        A dict with "status" ("recommended" or "undetermined"), "message" (one line), the measurements, and for
        a recommendation "batch", "lr", "step_time", "table" (one row per candidate batch) and "prediction".
    """
    noise, base = measured["noise"], config.base_batch
    fitting = [r for r in measured["ladder"] if "seconds_per_step" in r]
    out_of_memory = [r for r in measured["ladder"] if "error" in r]
    advice = {"base_batch": base, "base_lr": config.lr, "optimizer": config.optimizer, "max_batch": max_batch,
              "noise": noise, "phase": measured["phase"], "ladder": measured["ladder"],
              "probe_seconds": measured["seconds"], "config": {k: getattr(config, k) for k in
                                                               ("dataset", "model", "norm", "optimizer", "seed")}}
    why = _undetermined(noise)
    if not why and len(fitting) < 2:
        why = f"only {len(fitting)} batch size ran ({out_of_memory[0]['error'] if out_of_memory else 'none'})"
    if why:
        longer = 2 * noise["steps"]
        return advice | {"status": "undetermined", "reason": why, "message": (
            f"no recommendation: the noise scale is not determined after {noise['steps']} probe steps ({why}); "
            f"run a longer probe, e.g. --probe-steps {longer}")}
    largest = fitting[-1]["batch"]
    cap = min(max_batch, int(MEMORY_MARGIN * largest) if out_of_memory else largest)
    step_time = goodput.fit_step_time([r["batch"] for r in fitting], [r["seconds_per_step"] for r in fitting])
    phi, phi_lo, phi_hi = noise["noise_scale"], noise["noise_scale_lo"], noise["noise_scale_hi"]
    smallest = fitting[0]["batch"]
    choice = goodput.recommend(step_time, phi, base, cap, smallest)
    batch = choice["batch"]
    ends = [goodput.speedup(batch, step_time, p, base) for p in (phi_lo, phi_hi)]
    lr = float(goodput.learning_rate(batch, phi, base, config.lr, config.optimizer))
    table = []
    for b in goodput.candidates(base, cap, smallest):
        table.append({"batch": b, "step_time_s": float(step_time(b)), "throughput": float(b / step_time(b)),
                      "efficiency": float(goodput.efficiency(b, phi, base)),
                      "goodput": float(goodput.goodput(b, step_time, phi, base)),
                      "goodput_lo": float(goodput.goodput(b, step_time, phi_lo, base)),
                      "goodput_hi": float(goodput.goodput(b, step_time, phi_hi, base)),
                      "lr": float(goodput.learning_rate(b, phi, base, config.lr, config.optimizer)),
                      "steps_ratio": float(goodput.steps_ratio(b, phi)),
                      "examples_ratio": float(goodput.examples_ratio(b, phi)),
                      "speedup": goodput.speedup(b, step_time, phi, base)})
    prediction = {"speedup": goodput.speedup(batch, step_time, phi, base), "speedup_lo": min(ends),
                  "speedup_hi": max(ends), "steps_ratio": float(goodput.steps_ratio(batch, phi)),
                  "examples_ratio": float(goodput.examples_ratio(batch, phi)),
                  "base_steps_ratio": float(goodput.steps_ratio(base, phi)),
                  "batch_range": sorted(goodput.recommend(step_time, p, base, cap, smallest)["batch"]
                                        for p in (phi_lo, phi_hi)),
                  "best_batch": choice["best_batch"], "gain": choice["gain"], "switched": choice["switched"]}
    rule = "sqrt of the AdaScale gain" if config.optimizer in goodput.ADAM_TYPES else "AdaScale gain"
    kept = "" if choice["switched"] else (f" (kept: batch {choice['best_batch']} would gain only "
                                          f"{choice['gain'] - 1:.1%}, under {goodput.MIN_GAIN - 1:.0%})")
    message = (f"use batch {batch} with lr {lr:.3g}{kept}: predicted {prediction['speedup']:.2f}x "
               f"({prediction['speedup_lo']:.2f}-{prediction['speedup_hi']:.2f}x) the speed to the target of batch "
               f"{base}, from B_simple {phi:.3g} ({phi_lo:.3g}-{phi_hi:.3g}) after {noise['steps']} probe steps "
               f"and step times up to batch {largest}")
    return advice | {"status": "recommended", "batch": batch, "lr": lr, "lr_rule": rule, "cap": cap,
                     "step_time": vars(step_time), "table": table, "prediction": prediction, "message": message}


def markdown(advice: dict) -> str:
    """advice.md: the recommendation, the phase it is for, and the goodput table."""
    noise = advice["noise"]
    lines = ["# Batch-size advice", "", advice["message"] + ".", "",
             f"Phase: {phase_text(advice['phase'])}.", "",
             f"Noise scale (steps {noise['first_step']}-{noise['last_step']}, {noise['measurements']} measurements, "
             f"pooled, 95% intervals): tr(Sigma) {noise['trace_cov']:.4g} ({noise['trace_cov_lo']:.4g} to "
             f"{noise['trace_cov_hi']:.4g}), |G|^2 {noise['norm_sq']:.4g} ({noise['norm_sq_lo']:.4g} to "
             f"{noise['norm_sq_hi']:.4g}), B_simple {noise['noise_scale']:.4g} ({noise['noise_scale_lo']:.4g} to "
             f"{noise['noise_scale_hi']:.4g}).", "", "| batch | measured s/step | |", "|---:|---:|---|"]
    for row in advice["ladder"]:
        lines.append(f"| {row['batch']} | " + (f"{row['seconds_per_step'] * 1000:.2f} ms | |" if "error" not in row
                                               else f"– | {row['error']} |"))
    if advice["status"] == "recommended":
        fit = advice["step_time"]
        lines += ["", f"Step time fit: T_step(B) = {fit['alpha'] * 1000:.3g} ms + {fit['beta'] * 1e6:.3g} us x B "
                  f"(rms log error {fit['rms_log_error']:.2f}); candidates up to batch {advice['cap']}. "
                  f"Learning rate: {advice['base_lr']:.3g} at batch {advice['base_batch']} times the "
                  f"{advice['lr_rule']}.", "",
                  "| batch | T_step (ms) | examples/s | efficiency | goodput | lr | S/S_min | E/E_min | speed-up |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in advice["table"]:
            mark = " **<-**" if r["batch"] == advice["batch"] else ""
            lines.append(f"| {r['batch']}{mark} | {r['step_time_s'] * 1000:.2f} | {r['throughput']:.0f} | "
                         f"{r['efficiency']:.3f} | {r['goodput']:.0f} | {r['lr']:.3g} | {r['steps_ratio']:.2f} | "
                         f"{r['examples_ratio']:.2f} | {r['speedup']:.2f}x |")
        lines += ["", "![goodput](goodput.png)"]
    return "\n".join(lines) + "\n"


def plot(advice: dict, path: str) -> None:
    """goodput.png: measured and fitted step times; goodput relative to the base batch with B_simple's interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = advice["table"]
    batches = [r["batch"] for r in rows]
    base = next(r for r in rows if r["batch"] == advice["base_batch"])
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    measured = [r for r in advice["ladder"] if "seconds_per_step" in r]
    left.plot([r["batch"] for r in measured], [r["seconds_per_step"] * 1000 for r in measured], "o", label="measured")
    left.plot(batches, [r["step_time_s"] * 1000 for r in rows], "-", label="fit alpha + beta B")
    left.set(xscale="log", xlabel="batch", ylabel="ms per step", title="Step time")
    right.fill_between(batches, [r["goodput_lo"] / base["goodput"] for r in rows],
                       [r["goodput_hi"] / base["goodput"] for r in rows], alpha=0.3, label="B_simple interval")
    right.plot(batches, [r["goodput"] / base["goodput"] for r in rows], "-", label="goodput / goodput(base)")
    right.plot(batches, [r["throughput"] / base["throughput"] for r in rows], "--", label="throughput / base")
    right.axvline(advice["batch"], color="k", lw=0.8, label=f"recommended {advice['batch']}")
    right.set(xscale="log", xlabel="batch", ylabel="relative to the base batch", title="Goodput (predicted)")
    for axes in (left, right):
        axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write(advice: dict, out_dir: str) -> None:
    """advice.json (atomic), advice.md and, for a recommendation, goodput.png in out_dir."""
    from pipeline import rundir

    os.makedirs(out_dir, exist_ok=True)
    if advice["status"] == "recommended":
        plot(advice, os.path.join(out_dir, "goodput.png"))
    with open(os.path.join(out_dir, "advice.md"), "w", encoding="utf-8") as f:
        f.write(markdown(advice))
    rundir.write_json_atomic(os.path.join(out_dir, "advice.json"), _finite_or_none(advice))


def _finite_or_none(value):
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value
