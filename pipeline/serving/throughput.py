"""Inference latency and throughput of a serving signature by request batch size, and where throughput stops growing."""

from __future__ import annotations

import time

import numpy as np


def measure(call, images: np.ndarray, batch_sizes, *, warmup_calls: int = 3, min_calls: int = 10,
            max_calls: int = 200, min_seconds: float = 1.0) -> list[dict]:
    """Times `call` on request batches of each size, after warm-up, one call at a time.

    Each batch is made of `images` (repeated when there are fewer than the batch size). After `warmup_calls`
    untimed calls (tracing, memory allocation), calls are timed until at least `min_calls` were made and
    `min_seconds` passed, or `max_calls` were made. A call's time includes copying its outputs to numpy.

    Args:
      call: a function mapping a float32 tensor (B, H, W, C) to a dict of output tensors.
      images: (N, H, W, C) raw input images.
      batch_sizes: increasing request batch sizes.
    Returns:
      One dict per batch size: batch, calls, latency_p50_ms, latency_p99_ms, latency_mean_ms, and
      examples_per_sec = batch / median latency with examples_per_sec_q25 and _q75, the quartiles of the
      per-call throughput batch / latency (their spread is the measurement's variability).
    """
    import tensorflow as tf

    rows = []
    for batch_size in batch_sizes:
        batch = tf.constant(np.resize(np.asarray(images, np.float32), (batch_size,) + tuple(images.shape[1:])))
        for _ in range(warmup_calls):
            _fetch(call(batch))
        latencies, started = [], time.perf_counter()
        while len(latencies) < max_calls and (len(latencies) < min_calls or time.perf_counter() - started < min_seconds):
            begin = time.perf_counter()
            _fetch(call(batch))
            latencies.append(time.perf_counter() - begin)
        latencies = np.array(latencies)
        per_call = batch_size / latencies
        rows.append({
            "batch": int(batch_size),
            "calls": len(latencies),
            "latency_p50_ms": float(np.percentile(latencies, 50) * 1e3),
            "latency_p99_ms": float(np.percentile(latencies, 99) * 1e3),
            "latency_mean_ms": float(latencies.mean() * 1e3),
            "examples_per_sec": float(batch_size / np.median(latencies)),
            "examples_per_sec_q25": float(np.percentile(per_call, 25)),
            "examples_per_sec_q75": float(np.percentile(per_call, 75)),
        })
    return rows


def _fetch(outputs) -> None:
    for value in outputs.values():
        value.numpy()


def saturation(rows: list[dict]) -> int:
    """Index of the batch size at which throughput stops growing.

    A larger batch b' beats batch b when the lower quartile of its per-call throughput is above the upper
    quartile of b's, i.e. the gain is larger than the spread of the measurements. The answer is the first
    batch size that no larger measured batch beats (the last one when throughput grows all along).
    """
    for k, row in enumerate(rows):
        if not any(later["examples_per_sec_q25"] > row["examples_per_sec_q75"] for later in rows[k + 1:]):
            return k
    return len(rows) - 1


def finding(rows: list[dict]) -> str:
    """One sentence saying where throughput stops growing, with the numbers and their spread."""
    k = saturation(rows)
    row = rows[k]
    spread = f"{row['examples_per_sec']:.0f} examples/s (per-call quartiles {row['examples_per_sec_q25']:.0f}-" \
             f"{row['examples_per_sec_q75']:.0f})"
    if k == len(rows) - 1:
        if len(rows) == 1:
            return f"Only batch {row['batch']} was measured: {spread}, p50 latency {row['latency_p50_ms']:.2f} ms."
        previous = rows[k - 1]
        return (f"Throughput was still growing at the largest batch measured, {row['batch']}: {spread}, against "
                f"{previous['examples_per_sec']:.0f} at batch {previous['batch']}; measure larger batches to find "
                "where it stops.")
    later = ", ".join(f"{r['batch']}: {r['examples_per_sec']:.0f}" for r in rows[k + 1:])
    return (f"Throughput stops growing at batch {row['batch']}: {spread}; no larger batch beats it by more than "
            f"the spread of the measurements ({later} examples/s), while p50 latency grows from "
            f"{row['latency_p50_ms']:.2f} ms to {rows[-1]['latency_p50_ms']:.2f} ms at batch {rows[-1]['batch']}.")
