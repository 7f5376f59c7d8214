"""Cost of a curvature measurement (callbacks.Curvature) against a training step: plain against deflated trace probes.

Usage: python benchmarks/curvature_cost.py [--model resnet20] [--batch 32] [--epochs 2] [--rounds 1]

One process trains the default config's model (ResNet-20 on the digits) for --epochs with Keras fit, timing each
epoch, then measures the curvature on the pipeline's 512 examples with two settings side by side, alternating:
  before  plain Hutchinson: probes in blocks of 16 until the trace's 95% interval is within 25% of the estimate, at
          most 32 (the callback's earlier defaults);
  after   the callback's defaults: the probes deflated by lambda_max's Lanczos vectors, in blocks of 8, same rule;
both with lambda_max to a relative tolerance of 1e-2;
at initialization and after training. Each setting has its own Hessian-vector product function, so its first
measurement at initialization holds its one-time tracing ("first s"); "s" is the mean of the --rounds measurements
after the first of each stage. Printed
and written to benchmarks/results/curvature_cost.json:
  step s          training time per step (the epochs after the first, Keras fit, no callbacks);
  ratio           measurement s / step s: a measurement costs this many training steps;
  speedup         before s / after s at the same weights;
  sweep_fraction  after's first s at the trained weights (a sweep run measures once, at its end, tracing included)
                  over the training time of a default sweep run at --batch (12 epochs x steps per epoch x step s).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import results  # noqa: E402
from pipeline import config as config_lib  # noqa: E402

SETTINGS = {"before": {"trace_block": 16, "deflate": False}, "after": {}}


def measure(callbacks_by_setting: dict, rounds: int) -> dict:
    """Per setting: the first measurement's seconds (tracing included when new), then `rounds` more, alternating."""
    out = {name: {"first_s": callback.measure()["curvature/seconds"], "s": [], "products": []}
           for name, callback in callbacks_by_setting.items()}
    for _ in range(rounds):
        for name, callback in callbacks_by_setting.items():
            record = callback.measure()
            out[name]["s"].append(record["curvature/seconds"])
            out[name]["products"].append(record["curvature/hessian_vector_products"])
            out[name].setdefault("probes", []).append(record["curvature/trace_probes"])
            out[name]["max_eigenvalue"] = record["curvature/max_eigenvalue"]
            out[name]["trace"] = [record["curvature/trace_lo"], record["curvature/trace"], record["curvature/trace_hi"]]
    for entry in out.values():
        entry["mean_s"] = statistics.mean(entry["s"])
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args(argv)
    import keras

    from callbacks import Curvature
    from pipeline.data import loading
    from pipeline.training import callback_setup, fit_loop

    recorder = results.Recorder("curvature_cost")
    config = config_lib.Config(model=args.model, batch=args.batch)
    data = loading.load(config)
    model, _ = fit_loop.compiled_model(config, data)
    x, y = data.arrays("train", limit=callback_setup.CURVATURE_EXAMPLES)
    callbacks_by_setting = {}
    for name, settings in SETTINGS.items():
        callbacks_by_setting[name] = Curvature(x, y, **settings)
        callbacks_by_setting[name].set_model(model)
        callbacks_by_setting[name].on_train_begin()
    stages = {"init": measure(callbacks_by_setting, args.rounds)}
    epoch_seconds = []

    class EpochTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            epoch_seconds.append(time.perf_counter() - self.started)

    steps_per_epoch = data.num_train // args.batch
    for epoch in range(args.epochs):
        model.fit(data.train_dataset(args.batch, seed=0, epoch=epoch), epochs=1, verbose=0, callbacks=[EpochTimer()])
    step_s = statistics.mean(epoch_seconds[1:] or epoch_seconds) / steps_per_epoch
    stages["trained"] = measure(callbacks_by_setting, args.rounds)
    summary = {"step_s": step_s}
    for stage, by_setting in stages.items():
        before, after = by_setting["before"], by_setting["after"]
        summary[stage] = {
            name: {"s": entry["mean_s"], "first_s": entry["first_s"], "products": statistics.mean(entry["products"]),
                   "probes": statistics.mean(entry["probes"]), "ratio_measurement_to_step": entry["mean_s"] / step_s}
            for name, entry in by_setting.items()}
        summary[stage]["speedup"] = before["mean_s"] / after["mean_s"]
        print(f"{stage}: before {before['mean_s']:.1f} s ({statistics.mean(before['products']):.0f} products, "
              f"{statistics.mean(before['probes']):.0f} probes), after {after['mean_s']:.1f} s "
              f"({statistics.mean(after['products']):.0f} products, {statistics.mean(after['probes']):.0f} probes): "
              f"{summary[stage]['speedup']:.2f}x; after = {after['mean_s'] / step_s:.0f} training steps "
              f"(step {step_s * 1000:.1f} ms)", flush=True)
    sweep_run_s = 12 * steps_per_epoch * step_s
    # The trained stage's "after" callback already traced at init; a sweep run traces once, so add the init's
    # tracing share (first_s - s there).
    traced = stages["init"]["after"]["first_s"] - stages["init"]["after"]["mean_s"]
    summary["sweep_fraction"] = (summary["trained"]["after"]["s"] + max(traced, 0.0)) / sweep_run_s
    summary["tracing_s"] = traced
    print(f"a sweep run at batch {args.batch} (12 epochs, {sweep_run_s:.0f} s of training here) spends "
          f"{summary['sweep_fraction']:.0%} of it on one end-of-run measurement ({traced:.1f} s of it tracing)")
    path = recorder.write(rounds=[stages], summary=summary, settings=vars(args))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
