"""Rendering of DRRL-Attention-v0: the ranks chosen so far, as a text table or a heatmap image."""

from __future__ import annotations

from typing import Any

import numpy as np


def rank_heatmap_rgb(grid: np.ndarray, low: float, high: float, cell: tuple[int, int] = (16, 32)) -> np.ndarray:
    """A ``(L, S)`` grid of ranks as an RGB ``uint8`` image: dark blue at ``low``, yellow at ``high``, grey for NaN."""
    level = np.nan_to_num((grid - low) / max(high - low, 1), nan=-1.0)
    image = np.zeros((*grid.shape, 3), dtype=np.uint8)
    known = level >= 0
    image[..., 0] = np.where(known, 255 * level, 40).astype(np.uint8)
    image[..., 1] = np.where(known, 200 * level, 40).astype(np.uint8)
    image[..., 2] = np.where(known, 255 * (1 - level), 40).astype(np.uint8)
    return np.kron(image, np.ones((*cell, 1), dtype=np.uint8))


def rank_table_ansi(history: list[list[Any]]) -> str:
    """``history[layer][segment]`` (a rank, per-head ranks, or None if not chosen yet) as a text table."""
    num_segments = len(history[0]) if history else 0
    rows = ["layer | " + " ".join(f"seg{s:<3}" for s in range(num_segments))]
    for layer, ranks in enumerate(history):
        cells = ["  -   " if r is None else f"{'/'.join(map(str, np.atleast_1d(r))):<6}" for r in ranks]
        rows.append(f"{layer:>5} | " + " ".join(cells))
    return "\n".join(rows)


def rank_grid(history: list[list[Any]]) -> np.ndarray:
    """``(L, S)`` mean rank per layer and segment, NaN where none was chosen yet."""
    return np.array([[np.nan if r is None else float(np.mean(r)) for r in ranks] for ranks in history])
