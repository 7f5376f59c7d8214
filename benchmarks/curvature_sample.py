"""How much the measured curvature depends on which K examples define the loss: disjoint samples against the split.

Usage: python benchmarks/curvature_sample.py --sweep DIR [--examples 512]

callbacks.Curvature measures the Hessian of the loss on K fixed examples (the pipeline's first 512 un-augmented
training examples), not of the whole training loss. For every completed run of the sweep in DIR (a sweep with
curvature, e.g. benchmarks/sharpness_sweep.py's), this loads the run's last checkpoint and measures lambda_max
(Lanczos to a relative tolerance of 1e-3) and tr(H) (deflated Hutchinson until the 95% interval is within 10%) on:
  sample 0, 1, ...  the first K training examples (what the sweep's callback measured), the next K, ...: disjoint;
  whole             the whole training split.
Printed and written to benchmarks/results/curvature_sample.json: per run every value, and in the summary, over the
runs, the ratio of sample 0's lambda_max (and trace) to the whole split's (median, smallest, largest) and the largest
ratio between two disjoint samples of one run. The batch-size findings compare runs on the same K examples; these
ratios say how far those examples' curvature may be from the training loss's.
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import results  # noqa: E402
from pipeline import rundir  # noqa: E402

TOLERANCE, TRACE_TOLERANCE, MAX_PROBES = 1e-3, 0.1, 64


def measure(products, seed: int) -> dict:
    """lambda_max and the trace of one set of examples (module docstring's precision)."""
    import numpy as np

    from callbacks import hessian

    rng = np.random.default_rng(seed)
    top = hessian.top_eigenvalue(products, products.dimension, rng, TOLERANCE, 200)
    trace = hessian.hutchinson_trace(products, products.dimension, rng, MAX_PROBES, relative_half_width=TRACE_TOLERANCE,
                                     deflation=(top["basis"], top["restricted_trace"]))
    return {"max_eigenvalue": top["value"], "converged": top["converged"], "trace": trace["value"],
            "trace_lo": trace["lo"], "trace_hi": trace["hi"], "products": products.products}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", required=True, help="a sweep directory whose runs have checkpoints")
    parser.add_argument("--examples", type=int, default=512, help="K, the examples of one sample")
    args = parser.parse_args(argv)
    run_dirs = sorted(d for d in glob.glob(os.path.join(args.sweep, "runs", "*"))
                      if (rundir.read_summary(d) or {}).get("status") == "completed")
    if not run_dirs:
        print(f"--sweep: {args.sweep} holds no completed run (expected runs/<name>/summary.json)", file=sys.stderr)
        return 2

    from callbacks import hessian
    from pipeline.data import loading
    from pipeline.training import checkpoint, fit_loop

    recorder = results.Recorder("curvature_sample")
    rounds = []
    for run_dir in run_dirs:
        config = rundir.run_config(run_dir)
        data = loading.load(config)
        model, _ = fit_loop.compiled_model(config, data)
        model.optimizer.build(model.trainable_variables)
        model.load_weights(checkpoint.latest_weights(os.path.join(run_dir, "checkpoints")))
        x, y = data.arrays("train", limit=data.num_train)
        sets = {f"sample {i}": (i * args.examples, (i + 1) * args.examples) for i in range(len(x) // args.examples)}
        sets["whole"] = (0, len(x))
        measured = {}
        for name, (start, stop) in sets.items():
            products = hessian.HessianVectorProducts(model, x[start:stop], y[start:stop], 256)
            measured[name] = measure(products, config.seed)
            print(f"{os.path.basename(run_dir)} {name} ({stop - start} examples): lambda_max "
                  f"{measured[name]['max_eigenvalue']:.4g}, trace {measured[name]['trace']:.4g} "
                  f"[{measured[name]['trace_lo']:.4g}, {measured[name]['trace_hi']:.4g}]", flush=True)
        samples = [v for k, v in measured.items() if k != "whole"]
        whole = measured["whole"]
        rounds.append({"run": os.path.basename(run_dir), "batch": config.batch, "seed": config.seed,
                       "train_examples": len(x), "measured": measured,
                       "first_over_whole": {key: samples[0][key] / whole[key] for key in ("max_eigenvalue", "trace")},
                       "largest_between_samples": {key: max(s[key] for s in samples) / min(s[key] for s in samples)
                                                   for key in ("max_eigenvalue", "trace")}})
    summary = {"examples": args.examples, "runs": len(rounds)}
    for key in ("max_eigenvalue", "trace"):
        ratios = [r["first_over_whole"][key] for r in rounds]
        summary[key] = {"first_over_whole_median": statistics.median(ratios), "first_over_whole_min": min(ratios),
                        "first_over_whole_max": max(ratios),
                        "largest_between_samples": max(r["largest_between_samples"][key] for r in rounds)}
        print(f"{key}: the first {args.examples} examples over the whole split, median "
              f"{summary[key]['first_over_whole_median']:.2f} (range {min(ratios):.2f}-{max(ratios):.2f}); two "
              f"disjoint samples of one run differ by up to {summary[key]['largest_between_samples']:.2f}x")
    path = recorder.write(rounds=rounds, summary=summary, settings=vars(args))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
