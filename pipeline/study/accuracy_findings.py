"""The report's findings on test accuracy: which batch size gave the best, BatchNorm against GroupNorm at the
smallest batch, and the fewest against the most replicas at one global batch.

A difference is called only beyond its 95% interval: q standard errors of the difference (fits.difference_noise: the
seeds' variance pooled over the batch sizes of the series, or the test set's binomial error with one seed), q the
Student t quantile of that error's degrees of freedom (fits.difference_quantile; 1.96 for the binomial error); the
best batch is named only where it is above the runner-up by that much.
"""

from __future__ import annotations

from pipeline.study import claims
from pipeline.study import fits as fits_lib


def accuracy(report, mine, prefix):
    """The best batch by test accuracy, named only when it is above the runner-up by more than q standard errors of
    the difference (the seeds' variance pooled over the series, fits.difference_noise and difference_quantile); and
    best against worst."""
    measured = sorted((g for g in mine if g["test_accuracy"]["mean"] is not None),
                      key=lambda g: -g["test_accuracy"]["mean"])
    if not measured:
        return []
    stats, num_test = [g["test_accuracy"] for g in measured], report["sweep"].get("num_test")
    gaps = [g for g in measured if g["generalization_gap"]["mean"] is not None]
    widest = max(gaps, key=lambda g: g["generalization_gap"]["mean"]) if gaps else None
    tail = ("" if widest is None else f"; the widest generalization gap (train - test) was "
            f"{widest['generalization_gap']['mean']:+.4f} at batch {widest['batch']}")
    best = measured[0]
    if len(measured) == 1:
        return [f"{prefix}not enough data: test accuracy was {best['test_accuracy']['mean']:.4f} at batch "
                f"{best['batch']}, the only batch size measured{tail}."]
    pooled = fits_lib.pooled_variance(stats)
    note = (f"; the seeds' variance pooled over {pooled['groups']} batch sizes, {pooled['dof']} degrees of freedom"
            if pooled else claims.binomial_note(*stats))

    def against(other):
        noise = fits_lib.difference_noise(best["test_accuracy"], other["test_accuracy"], num_test, stats)
        q, _ = fits_lib.difference_quantile(best["test_accuracy"], other["test_accuracy"], stats)
        gap = best["test_accuracy"]["mean"] - other["test_accuracy"]["mean"]
        return gap, noise, noise is not None and gap > q * noise, q

    runner, worst = measured[1], measured[-1]
    gap, noise, resolved, q = against(runner)
    b, r = best["test_accuracy"]["mean"], runner["test_accuracy"]["mean"]
    if noise is None:
        return [f"{prefix}not determined: the highest mean test accuracy was {b:.4f} at batch {best['batch']}, then "
                f"{r:.4f} at batch {runner['batch']}, with no noise estimate{tail}."]
    if resolved:
        head = (f"batch {best['batch']} gave the best test accuracy, {b:.4f}, above the runner-up, batch "
                f"{runner['batch']} ({r:.4f}), by {gap:.4f}: more than {q:.2f} standard errors of the "
                f"difference ({noise:.4f}{note})")
    else:
        head = (f"not determined: the highest mean test accuracy, {b:.4f} at batch {best['batch']}, is not "
                f"distinguishable from batch {runner['batch']}'s {r:.4f} (difference {gap:.4f} against a standard "
                f"error of {noise:.4f}{note}; naming a best batch needs {q:.2f} of them)")
    if worst is not runner:
        spread, spread_noise, beyond, q = against(worst)
        head += (f"; best minus worst (batch {worst['batch']}, {worst['test_accuracy']['mean']:.4f}) {spread:.4f}, "
                 f"{'more' if beyond else 'not more'} than {q:.2f} standard errors ({spread_noise:.4f})")
    return [f"{prefix}{head}{tail}."]


def bn_vs_gn(report):
    groups = report["groups"]
    measured = {norm: {g["batch"]: g["test_accuracy"] for g in groups if g["norm"] == norm
                       and g["test_accuracy"]["mean"] is not None} for norm in ("batch", "group")}
    common = sorted(set(measured["batch"]) & set(measured["group"]))
    if not common:
        return []
    b = common[0]
    bn, gn = measured["batch"][b], measured["group"][b]
    pool = [g["test_accuracy"] for g in groups
            if g["norm"] in ("batch", "group") and g["test_accuracy"]["mean"] is not None]
    noise = fits_lib.difference_noise(bn, gn, report["sweep"].get("num_test"), pool)
    q, _ = fits_lib.difference_quantile(bn, gn, pool)
    gap = gn["mean"] - bn["mean"]
    if noise is None:
        return [f"Not enough data: at the smallest batch ({b}) test accuracy was {bn['mean']:.4f} with BatchNorm and "
                f"{gn['mean']:.4f} with GroupNorm, with no noise estimate."]
    verdict = ("Yes: BatchNorm fell behind" if gap > q * noise else
               "No: BatchNorm was ahead of" if gap < -q * noise else "No: BatchNorm was within noise of")
    return [f"{verdict} GroupNorm at the smallest batch ({b}): test accuracy {bn['mean']:.4f} vs {gn['mean']:.4f} "
            f"(standard error of the difference {noise:.4f}; a verdict needs {q:.2f} of them"
            f"{claims.binomial_note(bn, gn)})."]


def per_device(report, mine, prefix):
    """Test accuracy on the fewest against the most replicas, per global batch, within its noise."""
    out = []
    for batch in sorted({g["batch"] for g in mine}):
        done = sorted((g for g in mine if g["batch"] == batch and g["test_accuracy"]["mean"] is not None),
                      key=lambda g: g["replicas"])
        if len(done) < 2:
            out.append(f"{prefix}not enough data: at global batch {batch}, {len(done)} replica count(s) completed; a "
                       "comparison needs two.")
            continue
        few, many = done[0], done[-1]
        gap = many["test_accuracy"]["mean"] - few["test_accuracy"]["mean"]
        pool = [g["test_accuracy"] for g in mine if g["test_accuracy"]["mean"] is not None]
        noise = fits_lib.difference_noise(few["test_accuracy"], many["test_accuracy"], report["sweep"].get("num_test"),
                                          pool)
        q, _ = fits_lib.difference_quantile(few["test_accuracy"], many["test_accuracy"], pool)
        verdict = (" (no noise estimate)" if noise is None else
                   f"; the difference {gap:+.4f} is {'more' if abs(gap) > q * noise else 'not more'} than "
                   f"{q:.2f} standard errors of the difference (standard error {noise:.4f}"
                   f"{claims.binomial_note(few['test_accuracy'], many['test_accuracy'])})")
        few_text, many_text = (claims.stat_text(g["test_accuracy"], "{:.4f}") for g in (few, many))
        out.append(f"{prefix}at global batch {batch}, test accuracy was {few_text} on {few['replicas']} replica(s) "
                   f"({few['per_replica_batch']} examples per device) and {many_text} on {many['replicas']} "
                   f"({many['per_replica_batch']} per device){verdict}.")
    return out
