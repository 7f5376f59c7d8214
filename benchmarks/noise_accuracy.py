"""Accuracy of the gradient statistics on least squares, where the truth is exact at every measured step.

Usage: python benchmarks/noise_accuracy.py [--every 5] [--epochs 5] [--budget 0] [--max-examples M]

Linear regression y = x . w* + noise on N = 4096 examples (16 features), trained by SGD (lr 0.02) at batch 64 with
the mean squared error and measured by callbacks.GradientStatistics every --every steps with its defaults (--budget:
its budget_fraction, 0 for none: at every 5 steps a tenth of the examples trained would hold every measurement to
its pilot; --max-examples: its max_examples, whose default exceeds the split, so that every measurement takes the
whole split: below N = 4096, e.g. 4032, the measurements are sized by pilots, drawn without replacement, and |G|^2's
error carries the finite-population factor). Per-example gradients are 2 (x . w - y) x, so tr(Sigma), |G|^2 and
B_simple of the training split at the measured weights are exact (NumPy). Prints, and writes to
benchmarks/results/noise_accuracy.json, the ratios of the reported values to the truth at steps 10, 30 and 300, and
how often the 95% intervals hold the truth over the run. Goals (issue "every measurement says something"): |G|^2 and
B_simple within 2x at those steps (or B_simple's lower bound at or above half the truth), the truth inside 90% of
the intervals.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

N, FEATURES, BATCH, LR = 4096, 16, 64, 0.02
CHECKED_STEPS = (10, 30, 300)
KEYS = ("trace_cov", "norm_sq", "noise_scale")


def least_squares(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """x (N, FEATURES) float32 with unequal feature scales, y = x . w* + 0.5 * noise as (N, 1) float32."""
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(N, FEATURES)) * rng.uniform(0.5, 1.5, FEATURES)).astype(np.float32)
    y = (x @ rng.normal(size=FEATURES) + rng.normal(size=N) * 0.5).astype(np.float32)[:, None]
    return x, y


def exact_statistics(w, x, y) -> dict:
    """tr(Sigma) (unbiased per-example variance, summed), |G|^2 and B_simple of all of (x, y) at weights w."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    g = 2 * (x @ w - y) * x  # (N, FEATURES): d/dw (x . w - y)^2
    trace, norm_sq = float(np.sum(g.var(axis=0, ddof=1))), float(np.sum(g.mean(axis=0) ** 2))
    return {"trace_cov": trace, "norm_sq": norm_sq, "noise_scale": trace / norm_sq}


def run(every: int = 5, epochs: int = 5, budget_fraction: float | None = None, seed: int = 0,
        max_examples: int | None = None):
    """Trains and measures; returns (the instrument's history, {step: exact_statistics at that step's weights}).
    max_examples: the instrument's (None: its default, more than the split, so every measurement takes the whole
    split); below N, measurements are sized by their pilots."""
    import keras
    import tensorflow as tf

    from callbacks import gradient_stats

    class Truth(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.truth = {}

        def on_train_batch_begin(self, batch, logs=None):
            self.on_train_batch_end(batch)

        def on_train_batch_end(self, batch, logs=None):
            if instrument.history and instrument.history[-1]["step"] not in self.truth:
                w = self.model.trainable_variables[0].numpy().astype(np.float64)
                self.truth[instrument.history[-1]["step"]] = exact_statistics(w, x, y)

    keras.utils.set_random_seed(seed)
    x, y = least_squares(seed)
    model = keras.Sequential([keras.Input((FEATURES,)),
                              keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros")])
    model.compile(keras.optimizers.SGD(LR), "mse")
    examples = tf.data.Dataset.from_tensor_slices((x, y))

    def draws(step):
        """The measurement's examples at `step`: one pass over the split in an order of (seed, step), as the
        pipeline's instruments draw them, so that a measurement's examples are distinct (drawn without replacement)."""
        order = examples.shuffle(N, seed=(seed + 1) * 1_000_003 + step, reshuffle_each_iteration=False)
        return order.batch(BATCH, drop_remainder=True)

    instrument = gradient_stats.GradientStatistics(draws, every_n_steps=every, budget_fraction=budget_fraction,
                                                   population=N, population_data=examples.batch(1024),
                                                   seed=seed + 1, histograms=False,
                                                   max_examples=max_examples or gradient_stats.MAX_EXAMPLES)
    truth = Truth()
    model.fit(x, y, batch_size=BATCH, epochs=epochs, shuffle=True, callbacks=[instrument, truth], verbose=0)
    return instrument.history, truth.truth


def inside(record: dict, key: str, value: float) -> bool:
    """Whether the record's interval of `key` holds `value` (a missing end is unbounded: 0 or infinity)."""
    lo, hi = record[f"grad/{key}_lo"], record[f"grad/{key}_hi"]
    lo, hi = (lo if lo is not None and np.isfinite(lo) else 0.0), (hi if hi is not None and np.isfinite(hi) else np.inf)
    return lo * (1 - 1e-6) <= value <= hi * (1 + 1e-6)


def main(argv=None) -> int:
    from benchmarks import results

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--budget", type=float, default=0.0, help="budget_fraction (0: none)")
    parser.add_argument("--max-examples", type=int, default=None, help="the instrument's max_examples")
    args = parser.parse_args(argv)
    too_few = args.max_examples is not None and args.max_examples < 3 * BATCH  # three micro-batches at least
    if args.every < 1 or args.epochs < 1 or args.budget < 0 or too_few:
        parser.error(f"--every and --epochs must be >= 1, --budget >= 0, --max-examples >= {3 * BATCH}")
    recorder = results.Recorder("noise_accuracy" + (f"-max{args.max_examples}" if args.max_examples else ""))
    history, truth = run(args.every, args.epochs, args.budget or None, max_examples=args.max_examples)
    rounds, summary = [], {"steps": {}, "coverage": {}}
    for record in history:
        exact = truth[record["step"]]
        rounds.append({"step": record["step"], "examples": record["examples"], "exact_norm_sq": record["exact_norm_sq"],
                       **{f"{key}_ratio": (record[f"grad/{key}"] / exact[key]
                                           if record[f"grad/{key}"] is not None else None) for key in KEYS},
                       "noise_scale_lo_ratio": (record["grad/noise_scale_lo"] / exact["noise_scale"]
                                                if record["grad/noise_scale_lo"] is not None else None),
                       **{f"{key}_inside": inside(record, key, exact[key]) for key in KEYS}})
    for step in CHECKED_STEPS:
        row = next((r for r in rounds if r["step"] == step), None)
        if row is None:
            continue
        noise_ok = (row["noise_scale_ratio"] is not None and 0.5 <= row["noise_scale_ratio"] <= 2) or (
            row["noise_scale_ratio"] is None and (row["noise_scale_lo_ratio"] or 0) >= 0.5)
        norm_ok = row["norm_sq_ratio"] is not None and 0.5 <= row["norm_sq_ratio"] <= 2
        summary["steps"][step] = {**row, "goal_met": bool(noise_ok and norm_ok)}
        print(f"step {step:4d}: {row['examples']:5d} examples, |G|^2 x{row['norm_sq_ratio'] or float('nan'):.3f}, "
              f"tr(Sigma) x{row['trace_cov_ratio']:.3f}, B_simple x{row['noise_scale_ratio'] or float('nan'):.3f} "
              f"(lower bound x{row['noise_scale_lo_ratio'] or float('nan'):.3f}), goal met: {noise_ok and norm_ok}")
    for key in KEYS:
        summary["coverage"][key] = float(np.mean([r[f"{key}_inside"] for r in rounds]))
    summary["measurements"] = len(rounds)
    summary["mean_examples"] = float(np.mean([r["examples"] for r in rounds]))
    summary["coverage_goal_met"] = all(v >= 0.9 for v in summary["coverage"].values())
    print(f"{len(rounds)} measurements, {summary['mean_examples']:.0f} examples on average; the truth inside the 95% "
          "intervals: " + ", ".join(f"{key} {value:.0%}" for key, value in summary["coverage"].items()))
    path = recorder.write(rounds=rounds, summary=summary,
                          settings={"examples": N, "features": FEATURES, "batch": BATCH, "lr": LR, **vars(args)})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
