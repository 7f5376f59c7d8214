"""PNG images of matplotlib figures rendered without pyplot, and examples scaled for display in them."""

from __future__ import annotations

import io
import math

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def figure_png(figure: Figure) -> bytes:
    """The figure as PNG bytes."""
    # The Agg canvas renders without pyplot, so the user's global matplotlib backend is left alone.
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def display_image(image: np.ndarray) -> np.ndarray:
    """One example as (H, W) or (H, W, 3) in [0, 1], scaled by its own min and max, so that 0..16 digits and 0..255
    photos both show; flat features become a square image if their length is a square, else one row."""
    image = np.asarray(image, np.float64)
    if image.ndim == 1:
        side = math.isqrt(image.size)
        image = image.reshape(side, side) if side * side == image.size else image[None, :]
    if image.ndim == 3 and image.shape[-1] != 3:
        image = image[..., 0]  # grayscale (H, W, 1); other channel counts show their first channel
    low, high = np.nanmin(image), np.nanmax(image)
    return (image - low) / (high - low) if high > low else np.zeros_like(image)
