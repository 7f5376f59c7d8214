"""PNG plots of a sweep's sharpness: lambda_max and the generalization gap against B and lr/B, and the loss line."""

from __future__ import annotations

import os

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

PANELS = (("batch", "max_eigenvalue", "batch B", "lambda_max (end of training)"),
          ("batch", "generalization_gap", "batch B", "train - test accuracy"),
          ("lr_over_batch", "max_eigenvalue", "lr / B", "lambda_max (end of training)"),
          ("lr_over_batch", "generalization_gap", "lr / B", "train - test accuracy"))


def plots(rows: list[dict], line: dict | None, sweep_dir: str) -> dict[str, str]:
    """Writes sharpness.png (every completed run, one color per norm) and loss_line.png; returns {name: file}."""
    files = {}
    done = [r for r in rows if r["status"] == "completed"]
    if any(r.get("max_eigenvalue") is not None for r in done):
        figure = Figure(figsize=(11, 8.4), layout="constrained")
        FigureCanvasAgg(figure)
        for i, (x_key, y_key, x_label, y_label) in enumerate(PANELS):
            axes = figure.add_subplot(2, 2, i + 1)
            for norm in sorted({r["norm"] for r in done}):
                points = [(r[x_key], r[y_key]) for r in done if r["norm"] == norm and r.get(x_key)
                          and r.get(y_key) is not None]
                if points:
                    axes.plot(*zip(*sorted(points)), "o", label=norm, alpha=0.8)
            axes.set_xscale("log", base=2)
            if y_key == "max_eigenvalue":
                axes.set_yscale("log")
            axes.set_xlabel(x_label)
            axes.set_ylabel(y_label)
            axes.grid(alpha=0.3)
            axes.legend(fontsize=8)
        figure.suptitle("Sharpness and generalization gap per run (sharpness is not reparametrization-invariant: "
                        "Dinh et al. 2017)", fontsize=9)
        figure.savefig(os.path.join(sweep_dir, "sharpness.png"), dpi=100)
        files["sharpness"] = "sharpness.png"
    if line:
        figure = Figure(figsize=(5.5, 4.2), layout="constrained")
        FigureCanvasAgg(figure)
        axes = figure.add_subplot(1, 1, 1)
        axes.plot(line["alphas"], line["train_loss"], "o-", label="train loss")
        axes.plot(line["alphas"], line["test_loss"], "s--", label="test loss")
        axes.axvline(0, color="gray", lw=0.5)
        axes.axvline(1, color="gray", lw=0.5)
        axes.set_yscale("log")
        axes.set_xlabel(f"alpha (0: batch {line['small']['batch']}, 1: batch {line['large']['batch']})")
        axes.set_ylabel("loss")
        axes.set_title(line["bn"], fontsize=7)
        axes.legend(fontsize=8)
        figure.savefig(os.path.join(sweep_dir, "loss_line.png"), dpi=100)
        files["loss_line"] = "loss_line.png"
    return files
