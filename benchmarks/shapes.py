"""A CIFAR-sized synthetic image dataset that a network has to learn: 32x32 RGB, 10 classes of shapes, as an .npz.

Usage: python benchmarks/shapes.py OUT.npz [--train 4096] [--test 1024] [--noise 24] [--distractors] [--seed 0]
       then --dataset npz:OUT.npz in pipeline.train, pipeline.sweep, pipeline.advise or benchmarks/advisor.py.

Offline stand-in for CIFAR-10 (same shape and class count, no download) for the benchmarks: class k is one shape
(horizontal bar, vertical bar, diagonal, anti-diagonal, filled square, square outline, disc, ring, plus, cross) at
a random position and size, in a random colour on a random background colour, with Gaussian pixel noise of
standard deviation `noise` (of 255); with --distractors, a second shape of another class at half the contrast
(harder). Random labels (benchmarks/instrument_overhead.py's synthetic images) time a network but cannot be
learned; these can, so steps to a target accuracy exist.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

CLASSES = ("hbar", "vbar", "diagonal", "antidiagonal", "square", "outline", "disc", "ring", "plus", "cross")
SIZE = 32


def masks(kind, cy, cx, radius, width):
    """Boolean (n, SIZE, SIZE) masks of n shapes of one kind, centred at (cy, cx) with half-size radius."""
    y, x = np.mgrid[:SIZE, :SIZE].astype(np.float32)
    dy, dx = y[None] - cy[:, None, None], x[None] - cx[:, None, None]
    r, w = radius[:, None, None], width[:, None, None] / 2
    inside = (np.abs(dy) <= r) & (np.abs(dx) <= r)
    distance = np.hypot(dy, dx)
    return {
        "hbar": (np.abs(dy) <= w) & (np.abs(dx) <= r),
        "vbar": (np.abs(dx) <= w) & (np.abs(dy) <= r),
        "diagonal": (np.abs(dy - dx) <= w * 1.4) & inside,
        "antidiagonal": (np.abs(dy + dx) <= w * 1.4) & inside,
        "square": inside,
        "outline": inside & ~((np.abs(dy) <= r - 2 * w) & (np.abs(dx) <= r - 2 * w)),
        "disc": distance <= r,
        "ring": (distance <= r) & (distance >= r - 2 * w),
        "plus": ((np.abs(dy) <= w) | (np.abs(dx) <= w)) & inside,
        "cross": ((np.abs(dy - dx) <= w * 1.4) | (np.abs(dy + dx) <= w * 1.4)) & inside,
    }[kind]


def images(n, rng, noise, distractors=False):
    """n images (uint8, (n, 32, 32, 3)) and their labels."""
    labels = rng.integers(0, len(CLASSES), n)
    others = (labels + rng.integers(1, len(CLASSES), n)) % len(CLASSES)
    background = rng.uniform(0, 255, (n, 1, 1, 3))
    foreground = rng.uniform(0, 255, (n, 1, 1, 3))
    # At least 80 of 255 apart in some channel, so that every shape is visible through the noise.
    faint = np.abs(foreground - background).max(axis=-1, keepdims=True) < 80
    foreground = np.where(faint, 255 - background, foreground)
    pictures = np.broadcast_to(background, (n, SIZE, SIZE, 3)).copy()
    layers = ((others, 0.5), (labels, 1.0)) if distractors else ((labels, 1.0),)
    for kinds, contrast in layers:
        radius = rng.uniform(6, 12, n).astype(np.float32)
        cy, cx = (rng.uniform(radius, SIZE - 1 - radius).astype(np.float32) for _ in range(2))
        width = rng.uniform(2, 4, n).astype(np.float32)
        for k, kind in enumerate(CLASSES):
            chosen = np.flatnonzero(kinds == k)
            if chosen.size:
                shape = masks(kind, cy[chosen], cx[chosen], radius[chosen], width[chosen])[..., None]
                colour = background[chosen] + contrast * (foreground[chosen] - background[chosen])
                pictures[chosen] = np.where(shape, colour, pictures[chosen])
    pictures += rng.normal(0, noise, pictures.shape)
    return np.clip(pictures, 0, 255).astype(np.uint8), labels.astype(np.int64)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="the .npz file to write")
    parser.add_argument("--train", type=int, default=4096)
    parser.add_argument("--test", type=int, default=1024)
    parser.add_argument("--noise", type=float, default=24.0, help="pixel noise standard deviation, of 255")
    parser.add_argument("--distractors", action="store_true", help="add a fainter shape of another class")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.train < 10 or args.test < 10 or args.noise < 0:
        parser.error("--train and --test must be >= 10 and --noise >= 0")
    rng = np.random.default_rng(args.seed)
    x_train, y_train = images(args.train, rng, args.noise, args.distractors)
    x_test, y_test = images(args.test, rng, args.noise, args.distractors)
    np.savez(args.out, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    print(f"{args.out}: {args.train} train and {args.test} test images of {SIZE}x{SIZE}x3, {len(CLASSES)} classes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
