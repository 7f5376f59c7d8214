"""PNG plots of a batch-size sweep report: accuracy, steps and time to target, gradient std, noise scale, BN, replicas."""

from __future__ import annotations

import os

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pipeline.study.fits import series


def _figure(panels: int = 1):
    figure = Figure(figsize=(5.5 * panels, 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    return figure, [figure.add_subplot(1, panels, i + 1) for i in range(panels)]


def _errorbar(axes, groups, norm, key, label, log=False, **style):
    """Means over seeds with bars: the bootstrap interval of the target metrics where a group has one (an unbounded
    upper end drawn as an open triangle up), else the std over seeds."""
    points = [g for g in groups if g["norm"] == norm and g[key]["mean"] is not None and (g[key]["mean"] > 0 or not log)]
    if points:
        batches, means = [g["batch"] for g in points], [g[key]["mean"] for g in points]
        bars = [[], []]
        for g, mean in zip(points, means):
            interval = (g.get("target_interval") or {}).get(key)
            low, high = (interval[0], interval[1] if interval[1] is not None else mean) if interval else (
                mean - (g[key]["std"] or 0.0), mean + (g[key]["std"] or 0.0))
            bars[0].append(max(mean - low, 0.0))
            bars[1].append(max(high - mean, 0.0))
        axes.errorbar(batches, means, yerr=bars, capsize=3, label=label, **({"marker": "o"} | style))
        unbounded = [(b, m) for g, b, m in zip(points, batches, means)
                     if ((g.get("target_interval") or {}).get(key) or [0, 0])[1] is None]
        if unbounded:
            axes.plot(*zip(*unbounded), "^", fillstyle="none", markersize=9, color=style.get("color"))
    return bool(points)


def _power_law_lines(axes, fit, batches, color, label, reference_label):
    """The fitted power law (its slope ± standard error in the label) and a slope -0.5 line through its middle."""
    if not fit:
        return
    b = np.asarray(batches, float)
    se = f" ± {fit['slope_se']:.2f}" if fit["determined"] else " (not determined: < 3 points)"
    axes.plot(b, fit["c"] * b ** fit["slope"], color=color, label=f"{label}, slope {fit['slope']:.2f}{se}")
    middle = np.exp(np.mean(np.log(b)))
    axes.plot(b, fit["c"] * middle ** fit["slope"] * (b / middle) ** -0.5, color="gray", linestyle="--",
              label=reference_label)


def _log_log(axes, groups, ylabel, title):
    _log2_batch_axis(axes, groups)
    axes.set_yscale("log")
    axes.set(ylabel=ylabel, title=title)
    _legend(axes, 8)


def _legend(axes, fontsize=8):
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize=fontsize)


def _log2_batch_axis(axes, groups):
    axes.set_xscale("log", base=2)
    batches = sorted({g["batch"] for g in groups})
    axes.set_xticks(batches, [str(b) for b in batches])
    axes.set_xlabel("batch size B")
    axes.grid(True, which="both", alpha=0.3)


def plots(report: dict, rows: list[dict], sweep_dir: str) -> dict[str, str]:
    """Writes the PNGs that the sweep has data for; returns {name: file name in sweep_dir}."""
    groups, norms, written = report["groups"], list(report["fits"]), {}

    def save(figure, name):
        figure.savefig(os.path.join(sweep_dir, f"{name}.png"), dpi=110)
        written[name] = f"{name}.png"

    figure, (axes,) = _figure()
    for i, norm in enumerate(norms):
        _errorbar(axes, groups, norm, "test_accuracy", f"{norm}: test", color=f"C{i}")
        _errorbar(axes, groups, norm, "train_accuracy", f"{norm}: train", color=f"C{i}", linestyle="--", alpha=0.6)
    failed = sorted({g["batch"] for g in groups if g["failed"]})
    if failed:  # at the bottom of the axes, whatever the accuracies
        axes.plot(failed, [0.02] * len(failed), "x", color="red", markersize=10, transform=axes.get_xaxis_transform(),
                  label="a run failed")
    _log2_batch_axis(axes, groups)
    axes.set(ylabel="accuracy (mean ± std over seeds)", title="Final accuracy; the gap is train - test")
    _legend(axes, 8)
    save(figure, "accuracy")

    if any(g["steps_to_target"]["mean"] is not None for g in groups):
        figure, (steps_axes, time_axes) = _figure(2)
        fitted = []
        for i, norm in enumerate(norms):
            _errorbar(steps_axes, groups, norm, "steps_to_target", norm, log=True, color=f"C{i}", linestyle="none")
            _errorbar(time_axes, groups, norm, "time_to_target_s", norm, log=True, color=f"C{i}")
            missed = [g["batch"] for g in groups if g["norm"] == norm and g["completed"] and not g["reached"]]
            if missed:  # at the top of the axes: these batch sizes never reached the target
                time_axes.plot(missed, [0.97] * len(missed), "^", color=f"C{i}", markersize=9, fillstyle="none",
                               transform=time_axes.get_xaxis_transform(), label=f"{norm}: target not reached")
                steps_axes.plot(missed, [0.97] * len(missed), "^", color=f"C{i}", markersize=9, fillstyle="none",
                                transform=steps_axes.get_xaxis_transform(), label=f"{norm}: target not reached")
            fit = report["fits"][norm]["steps_to_target"]
            if fit and fit["determined"]:
                b = np.geomspace(min(g["batch"] for g in groups), max(g["batch"] for g in groups), 100)
                resampled = report["fits"][norm].get("steps_to_target_interval")
                spread = (f", 95% [{resampled['b_crit'][0]:.3g}, " + (f"{resampled['b_crit'][1]:.3g}]"
                          if resampled["b_crit"][1] is not None else "unbounded]")
                          if resampled and resampled["b_crit"][0] is not None else "")
                steps_axes.plot(b, fit["s_min"] * (1 + fit["b_crit"] / b), color=f"C{i}", alpha=0.7,
                                label=f"{norm}: S(B) fit, B_crit={fit['b_crit']:.3g} ± {fit['b_crit_se']:.2g}{spread}")
                fitted.append(norm)
        for axes in (steps_axes, time_axes):
            _log2_batch_axis(axes, groups)
            axes.set_yscale("log")
            _legend(axes, 7)
        fit_title = "S(B) fit" if fitted else "S(B) fit not determined (< 3 batches reached)"
        bars = ("95% bootstrap interval" if any(g.get("target_interval") for g in groups) else "std over seeds")
        steps_axes.set(ylabel=f"steps to target (mean over seeds, {bars})",
                       title=f"Steps to {report['target_accuracy']:.0%} val acc; {fit_title}")
        time_axes.set(ylabel=f"time to target (s; {bars})", title="Time to target: the training clock")
        save(figure, "steps_to_target")

    if any(g["grad_std"]["mean"] is not None for g in groups):
        figure, (axes,) = _figure()
        for i, norm in enumerate(norms):
            batches, stds = series(groups, norm, "grad_std")
            if not batches:
                continue
            axes.plot(batches, stds, "o", color=f"C{i}", label=f"{norm}: measured")
            _power_law_lines(axes, report["fits"][norm]["grad_std"], batches, f"C{i}", f"{norm}: fit",
                             "slope -0.50 (sigma / sqrt(B))" if i == 0 else None)
        _log_log(axes, groups, "std of the minibatch gradient (RMS over the run)", "Gradient noise vs batch size")
        save(figure, "grad_std")

    _noise_scale(rows, norms, save)
    _bn(report, groups, norms, save)
    _replicas(report, save)

    figure, (step_axes, rate_axes) = _figure(2)
    for i, norm in enumerate(norms):
        _errorbar(step_axes, groups, norm, "time_per_step_ms", norm, log=True, color=f"C{i}")
        _errorbar(rate_axes, groups, norm, "examples_per_sec", norm, log=True, color=f"C{i}")
    for axes, label, title in ((step_axes, "time per step (ms)", "Time per step (median over epochs 2+)"),
                               (rate_axes, "training examples / s", "Throughput")):
        _log2_batch_axis(axes, groups)
        axes.set(ylabel=label, title=title, yscale="log" if axes.has_data() else "linear")
        _legend(axes, 8)
    save(figure, "throughput")

    if report["tuning"]:
        figure, (axes,) = _figure()
        for i, (project, trials) in enumerate(report["tuning"].items()):
            done = sorted((t["values"]["lr"], t["score"]) for t in trials if t["score"] is not None)
            if done:
                axes.plot(*zip(*done), "o-", color=f"C{i % 10}", alpha=0.8, label=project)
        axes.set(xscale="log", xlabel="learning rate", ylabel="validation accuracy", title="Tuning trials per batch")
        axes.grid(True, alpha=0.3)
        _legend(axes, 7)
        save(figure, "tuning")
    return written


def _noise_scale(rows, norms, save):
    """Raw B_simple of every measurement (band: its interval, where the run recorded one; an open triangle where
    it is only a lower bound) and the value pooled near the target (a thick bar over its window, shaded over its
    interval); one panel per norm, first seed."""
    curves = sorted((r for r in rows if r["noise_curve"] and r["status"] == "completed"), key=lambda r: r["batch"])
    if not curves:
        return
    figure, panels = _figure(len(norms))
    batches, seed = sorted({r["batch"] for r in curves}), min(r["seed"] for r in curves)
    for axes, norm in zip(panels, norms):
        unresolved = []
        for r in (r for r in curves if r["norm"] == norm and r["seed"] == seed):
            color = f"C{batches.index(r['batch']) % 10}"
            valued = [p for p in r["noise_curve"] if p["noise_scale"] is not None and p["noise_scale"] > 0]
            points = [p for p in valued if not p.get("lower_bound")]
            bounds = [p for p in valued if p.get("lower_bound")]  # |G|^2 not resolved: B_simple > this value
            unresolved += [p["examples"] for p in r["noise_curve"] if p not in valued]
            if points:
                axes.plot([p["examples"] for p in points], [p["noise_scale"] for p in points], "o-", color=color,
                          markersize=3, linewidth=0.8, label=f"B={r['batch']}")
            if bounds:
                axes.plot([p["examples"] for p in bounds], [p["noise_scale"] for p in bounds], "^", color=color,
                          markersize=5, fillstyle="none", label=f"B={r['batch']}: lower bound only")
            band = [p for p in points if p["lo"] is not None and p["hi"] is not None]
            if band:
                axes.fill_between([p["examples"] for p in band], [max(p["lo"], 1e-12) for p in band],
                                  [p["hi"] for p in band], color=color, alpha=0.15, linewidth=0)
            near = r["noise_near_target"]
            if near and near["noise_scale"] is not None:
                x = np.array([near["first_step"], near["last_step"]]) * r["batch"]
                axes.plot(x, [near["noise_scale"]] * 2, color=color, linewidth=3, alpha=0.8)
                if near["noise_scale_lo"] is not None and near["noise_scale_hi"] is not None:
                    axes.fill_between(x, near["noise_scale_lo"], near["noise_scale_hi"], color=color, alpha=0.3)
        if unresolved:  # at the bottom of the axes: |G|^2 <= 0, no finite B_simple from that measurement
            axes.plot(unresolved, [0.03] * len(unresolved), "x", color="gray", transform=axes.get_xaxis_transform(),
                      label="|G|^2 <= 0: no B_simple")
        axes.set(xlabel="examples seen", ylabel="B_simple = tr(Sigma) / |G|^2", yscale="log",
                 title=f"{norm}: raw B_simple per measurement;\nthick: pooled over [S/2, S] to target")
        axes.grid(True, alpha=0.3)
        _legend(axes, 7)
    save(figure, "noise_scale")


def _bn(report, groups, norms, save):
    """BatchNorm's batch-vs-population discrepancies against B, with the fitted slope and a slope -0.5 line."""
    bn_norms = [n for n in norms if series(groups, n, "bn_batch_var_error")[0]]
    if not bn_norms:
        return
    figure, (axes,) = _figure()
    for i, norm in enumerate(bn_norms):
        _errorbar(axes, groups, norm, "bn_batch_mean_error", f"{norm}: mean", log=True, color=f"C{i}",
                  linestyle="none")
        _errorbar(axes, groups, norm, "bn_batch_var_error", f"{norm}: variance", log=True, color=f"C{i}",
                  linestyle="none", marker="s")
        _power_law_lines(axes, report["fits"][norm]["bn_batch_var_error"],
                         series(groups, norm, "bn_batch_var_error")[0], f"C{i}", f"{norm}: variance fit",
                         "slope -0.50 (1 / sqrt(B))" if i == 0 else None)
    _log_log(axes, groups, "batch vs population (RMS over the run)", "BN batch statistics vs population statistics")
    save(figure, "bn_discrepancy")


def _replicas(report, save):
    """A sweep over replica counts: BN's discrepancy against the BN batch per device, and test accuracy against
    the replica count at each global batch."""
    groups = report.get("replica_groups")
    if not groups:
        return
    figure, (bn_axes, accuracy_axes) = _figure(2)
    for i, (norm, fits) in enumerate(report["replica_fits"].items()):
        mine = [g for g in groups if g["norm"] == norm]
        points = [(g["bn_batch"], g["bn_batch_var_error"]["mean"], g["bn_batch_var_error"]["std"] or 0.0)
                  for g in mine if g["bn_batch_var_error"]["mean"] is not None]
        if points:
            bn_batches, errors, stds = zip(*points)
            bn_axes.errorbar(bn_batches, errors, yerr=stds, fmt="s", capsize=3, color=f"C{i}", label=f"{norm}: measured")
            _power_law_lines(bn_axes, fits["bn_batch_var_error"], fits["bn_batches"], f"C{i}", f"{norm}: fit",
                             "slope -0.50 (1 / sqrt(BN batch))" if i == 0 else None)
        for j, batch in enumerate(sorted({g["batch"] for g in mine})):
            done = sorted((g["replicas"], g["test_accuracy"]["mean"], g["test_accuracy"]["std"] or 0.0)
                          for g in mine if g["batch"] == batch and g["test_accuracy"]["mean"] is not None)
            if done:
                accuracy_axes.errorbar([d[0] for d in done], [d[1] for d in done], yerr=[d[2] for d in done],
                                       marker="o", capsize=3, color=f"C{i}", alpha=1 - 0.25 * (j % 3),
                                       label=f"{norm}, batch {batch}")
    bn_axes.set(xscale="log", yscale="log" if bn_axes.has_data() else "linear",
                xlabel="BN batch: examples per BatchNorm normalization (per device; global with syncbatch)",
                ylabel="batch vs population variance (RMS over the run)",
                title="BN statistics vs the batch per device (fixed global batch)")
    bn_batches = sorted({g["bn_batch"] for g in groups if g["bn_batch_var_error"]["mean"] is not None})
    if bn_batches:
        bn_axes.set_xticks(bn_batches, [str(b) for b in bn_batches])
    replica_counts = sorted({g["replicas"] for g in groups})
    accuracy_axes.set_xscale("log", base=2)
    accuracy_axes.set_xticks(replica_counts, [str(r) for r in replica_counts])
    accuracy_axes.set(xlabel="replicas (the global batch is split over them)",
                      ylabel="test accuracy (mean ± std over seeds)", title="Test accuracy vs replicas")
    for axes in (bn_axes, accuracy_axes):
        axes.grid(True, which="both", alpha=0.3)
        _legend(axes, 7)
    save(figure, "replicas")
