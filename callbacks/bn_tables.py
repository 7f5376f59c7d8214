"""The BN statistics' tables: errors below the population sample's resolution, run means, bn_stats.md."""

import numpy as np

# Per-layer quantities of one measurement, in the order of the markdown table.
QUANTITIES = (
    "batch_mean_error",
    "batch_var_error",
    "moving_mean_error",
    "moving_var_error",
    "moving_mean_drift",
    "moving_variance_drift",
    "moving_mean_avg",
    "moving_mean_min",
    "moving_mean_max",
    "moving_variance_avg",
    "moving_variance_min",
    "moving_variance_max",
)
ERRORS = QUANTITIES[:4]  # averaged over layers as bn/<error> in the logs and TensorBoard


def resolved(errors, resolutions) -> dict:
    """{error: value, or None when value <= its resolution; "<error>_resolution": resolution} for ERRORS.

    The population sample's own noise has been subtracted from each squared error; an error at or below the RMS
    standard error of the population statistics (the resolution) is not distinguishable from that noise, so it is
    reported as "< resolution" (None here, "bn/<error>_below" in the logs), never as 0.
    """
    result = {}
    for key, error, resolution in zip(ERRORS, np.asarray(errors, float), np.asarray(resolutions, float)):
        result[key] = float(error) if error > resolution else None
        result[f"{key}_resolution"] = float(resolution)
    return result


def run_mean(rows: list[dict]) -> dict:
    """Each error's mean over the measurements that resolved it (None if none did)."""
    means = {}
    for key in ERRORS:
        values = [row[key] for row in rows if row[key] is not None]
        means[key] = float(np.mean(values)) if values else None
    return means


def markdown(table: dict, final_step: int, schedule) -> str:
    """bn_stats.md: per layer the final measurement, run means and drift, from BatchNormStatistics.table()."""
    lines = [
        f"# BatchNorm statistics (final step {final_step}, {schedule})",
        "",
        "Errors against population statistics at the measured weights (RMS over channels): batch = a fresh "
        "batch's statistics (sampling noise), moving = the moving averages (lag); mean shift in population-std "
        "units, relative error of the variance; \"< r\": below the resolution r of the population sample.",
        "",
        "| layer | channels | batch mean error | batch var error | moving mean error | moving var error "
        "| run mean batch var error | run mean moving var error | moving mean drift | moving var drift |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, entry in table["layers"].items():
        final, run = entry["final"], entry["run_mean"]
        cells = [_shown(final[key], final[f"{key}_resolution"]) for key in ERRORS]
        cells += [_shown(run["batch_var_error"]), _shown(run["moving_var_error"])]
        cells += [f"{final['moving_mean_drift']:.4g}", f"{final['moving_variance_drift']:.4g}"]
        lines.append(f"| {name} | {entry['channels']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _shown(value, resolution=None) -> str:
    """A table cell: the value, "< resolution" for an error below it, or "n/a"."""
    if value is not None:
        return f"{value:.4g}"
    return f"< {resolution:.2g}" if resolution is not None else "n/a"
