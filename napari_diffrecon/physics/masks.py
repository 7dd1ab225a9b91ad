"""Cartesian k-space sampling masks (fastMRI-style 1D masks), deterministic under a seed.

1D masks select whole columns (phase-encode lines along axis −1) with a fully sampled centre.
"""

from __future__ import annotations

import numpy as np

__all__ = ["random_mask_1d", "equispaced_mask_1d", "make_mask", "acceleration_of", "MASK_KINDS"]

MASK_KINDS = ("random", "equispaced")


def _center_fraction(acceleration: float, center_fraction: float | None) -> float:
    if center_fraction is not None:
        return float(center_fraction)
    return {4: 0.08, 8: 0.04}.get(int(round(acceleration)), 0.32 / acceleration)


def _check(shape: tuple[int, int], acceleration: float) -> tuple[int, int]:
    if len(shape) != 2 or min(shape) < 8:
        raise ValueError(f"mask shape must be (H, W) with both ≥ 8, got {tuple(shape)}")
    if not np.isfinite(acceleration) or acceleration < 1:
        raise ValueError(f"acceleration must be ≥ 1 (e.g. 4 or 8), got {acceleration}")
    return int(shape[0]), int(shape[1])


def _centre(w: int, cf: float) -> tuple[np.ndarray, int]:
    n_center = max(1, int(round(w * cf)))
    cols = np.zeros(w, bool)
    start = w // 2 - n_center // 2
    cols[start : start + n_center] = True
    return cols, n_center


def random_mask_1d(
    shape: tuple[int, int], acceleration: float, center_fraction: float | None = None, seed: int = 0
) -> np.ndarray:
    """fastMRI RandomMaskFunc: centre columns plus others drawn with probability
    ``(W/acc − n_center) / (W − n_center)``; returns float32 ``(H, W)``."""
    h, w = _check(shape, acceleration)
    cols, n_center = _centre(w, _center_fraction(acceleration, center_fraction))
    p = max((w / acceleration - n_center) / max(w - n_center, 1), 0.0)
    rng = np.random.default_rng(seed)
    cols |= rng.uniform(size=w) < p
    return np.broadcast_to(cols[None, :], (h, w)).astype(np.float32)


def equispaced_mask_1d(
    shape: tuple[int, int], acceleration: float, center_fraction: float | None = None, seed: int = 0
) -> np.ndarray:
    """Centre columns plus equispaced columns (random offset), spacing set so the total ≈ W/acc."""
    h, w = _check(shape, acceleration)
    cols, n_center = _centre(w, _center_fraction(acceleration, center_fraction))
    n_more = max(w / acceleration - n_center, 0.0)
    if n_more > 0:
        spacing = (w - n_center) / n_more
        offset = np.random.default_rng(seed).uniform(0, spacing)
        idx = np.round(np.arange(offset, w - 1e-9, spacing)).astype(int)
        cols[idx[idx < w]] = True
    return np.broadcast_to(cols[None, :], (h, w)).astype(np.float32)


def make_mask(
    kind: str, shape: tuple[int, int], acceleration: float, center_fraction: float | None = None, seed: int = 0
) -> np.ndarray:
    """A mask of ``kind`` in :data:`MASK_KINDS`."""
    if kind == "random":
        return random_mask_1d(shape, acceleration, center_fraction, seed)
    if kind == "equispaced":
        return equispaced_mask_1d(shape, acceleration, center_fraction, seed)
    raise ValueError(f"unknown mask kind {kind!r}; use one of {', '.join(MASK_KINDS)}")


def acceleration_of(mask: np.ndarray) -> float:
    """Grid size over the number of sampled locations."""
    return float(mask.size / max(float((np.asarray(mask) != 0).sum()), 1.0))
