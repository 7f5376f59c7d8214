"""How often the replica statistics' determined B_simple intervals, and their Bonferroni bounds, hold a known truth.

Usage: python benchmarks/replica_interval_selection.py [--records 300]

A simulation of late training on 2 replicas x 16 examples: per-example gradients of a population of 1293 (as the
digits' training split) with B_simple in the thousands, each record the mean of 10 steps' two-batch estimates
(noise_estimates.step_means, as callbacks/replica_gradient_stats.py records them), for Gaussian gradients, for
heavy-tailed ones (3% of the examples carry most of the variance), and with the scatter taken over 40 steps; and the
same with a 4x larger mean gradient (B_simple 100-175, where about half the records resolve |G|^2). It counts
the records whose B_simple is determined (a finite Fieller interval) and how many of those hold the truth, and the
records with only a Bonferroni lower bound and how many of those hold. Writes
benchmarks/results/replica_interval_selection.json (benchmarks/results.py).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from callbacks import noise_estimates  # noqa: E402

REPLICAS, BATCH, EXAMPLES, DIMENSIONS = 2, 32, 1293, 50


def population(heavy: bool, signal: float = 0.03, seed: int = 0):
    """Per-example gradients, their tr(Sigma) and |G|^2 (the population's own, as the callbacks define them)."""
    rng = np.random.default_rng(seed)
    gradients = rng.normal(size=(EXAMPLES, DIMENSIONS)) * rng.uniform(0.2, 2.0, DIMENSIONS)
    if heavy:
        gradients *= np.where(rng.random(EXAMPLES) < 0.03, 6.0, 0.5)[:, None]
    gradients = gradients - gradients.mean(axis=0) + signal * rng.normal(size=DIMENSIONS)
    mean = gradients.mean(axis=0)
    return gradients, float(np.sum(np.var(gradients, axis=0, ddof=1))), float(mean @ mean)


def simulate(heavy: bool, steps: int, scatter_steps: int, records: int, signal: float = 0.03, seed: int = 1) -> dict:
    gradients, trace, norm_sq = population(heavy, signal)
    truth = trace / norm_sq
    rng = np.random.default_rng(seed)
    counts = {"determined": 0, "determined_held": 0, "bounded": 0, "bound_held": 0, "missed_below": 0}
    for _ in range(records):
        small, big = [], []
        for _ in range(scatter_steps):
            chosen = gradients[rng.choice(EXAMPLES, BATCH, replace=False)]
            slices = chosen.reshape(REPLICAS, BATCH // REPLICAS, -1).mean(axis=1)
            small.append(np.mean(np.sum(slices**2, axis=1)))
            big.append(np.sum(chosen.mean(axis=0) ** 2))
        traces, norms_sq = noise_estimates.two_batch_estimates(np.array(small), np.array(big), BATCH // REPLICAS,
                                                               BATCH, EXAMPLES)
        record = noise_estimates.step_means(traces, norms_sq, BATCH, steps=steps)
        if not record["noise_scale_is_lower_bound"]:
            counts["determined"] += 1
            counts["determined_held"] += record["noise_scale_lo"] <= truth <= record["noise_scale_hi"]
            counts["missed_below"] += record["noise_scale_hi"] < truth
        elif not math.isnan(record["noise_scale_lo"]):
            counts["bounded"] += 1
            counts["bound_held"] += record["noise_scale_lo"] <= truth
    return {"heavy_tailed": heavy, "steps": steps, "scatter_steps": scatter_steps, "signal": signal,
            "truth_noise_scale": truth, **counts}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=300)
    args = parser.parse_args(argv)
    if args.records < 1:
        parser.error("--records must be >= 1")
    from benchmarks import results

    recorder = results.Recorder("replica_interval_selection")
    # Late training (|G|^2 resolved in a few percent of the records), then a larger signal (in about half of them).
    cases = [(False, 10, 0.03), (True, 10, 0.03), (True, 40, 0.03), (False, 10, 0.12), (True, 10, 0.12),
             (True, 40, 0.12)]
    rounds = [simulate(heavy, 10, scatter, args.records, signal) for heavy, scatter, signal in cases]
    for r in rounds:
        print(f"signal {r['signal']:.2f} heavy-tailed {r['heavy_tailed']!s:5s} scatter over {r['scatter_steps']:2d} "
              f"steps, truth B_simple {r['truth_noise_scale']:.0f}: determined {r['determined']}, held "
              f"{r['determined_held']} ({r['missed_below']} missed below); bounded {r['bounded']}, held "
              f"{r['bound_held']}")
    totals = {key: sum(r[key] for r in rounds) for key in ("determined", "determined_held", "bounded", "bound_held")}
    recorder.write(rounds=rounds, summary=totals, settings=vars(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
