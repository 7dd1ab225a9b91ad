"""Cartesian k-space sampling masks (fastMRI-style 1D masks), deterministic under a seed.

1D masks select whole columns (phase-encode lines along axis −1) with a fully sampled centre.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "random_mask_1d",
    "equispaced_mask_1d",
    "poisson_disc_mask_2d",
    "make_mask",
    "acceleration_of",
    "MASK_KINDS",
]

MASK_KINDS = ("random", "equispaced", "poisson")


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


def _dart_throw(h: int, w: int, scale: float, density_power: float, order: np.ndarray) -> np.ndarray:
    """Variable-density Poisson-disc on the grid: accept a point unless an accepted one lies within r(k)."""
    cy, cx = h // 2, w // 2
    yy, xx = np.mgrid[:h, :w]
    kr = np.sqrt(((yy - cy) / (h / 2)) ** 2 + ((xx - cx) / (w / 2)) ** 2) / np.sqrt(2)
    radius = scale * (1.0 + 4.0 * kr**density_power)
    occ = np.zeros((h, w), bool)
    rmax = int(np.ceil(radius.max()))
    oy, ox = np.mgrid[-rmax : rmax + 1, -rmax : rmax + 1]
    dist = np.sqrt(oy**2 + ox**2)
    for idx in order:
        y, x = divmod(int(idx), w)
        r = radius[y, x]
        if r <= 1.0:
            occ[y, x] = True
            continue
        ri = int(np.ceil(r))
        y0, y1, x0, x1 = max(y - ri, 0), min(y + ri + 1, h), max(x - ri, 0), min(x + ri + 1, w)
        win = occ[y0:y1, x0:x1]
        d = dist[rmax - (y - y0) : rmax + (y1 - y), rmax - (x - x0) : rmax + (x1 - x)]
        if not np.any(win & (d < r)):
            occ[y, x] = True
    return occ


def poisson_disc_mask_2d(
    shape: tuple[int, int],
    acceleration: float,
    calib: int = 16,
    seed: int = 0,
    density_power: float = 1.0,
    tol: float = 0.05,
) -> np.ndarray:
    """2D variable-density Poisson-disc mask with a fully sampled ``calib × calib`` centre.

    The minimum distance between samples grows linearly with the distance from the k-space
    centre (density falls outward); its scale is found by bisection so the acceleration is
    within ``tol`` of the request. Returns float32 ``(H, W)``.
    """
    h, w = _check(shape, acceleration)
    if calib * calib * acceleration > h * w:
        raise ValueError(f"a {calib}×{calib} calibration region alone exceeds 1/{acceleration} of the grid")
    order = np.random.default_rng(seed).permutation(h * w)
    cal = np.zeros((h, w), bool)
    cal[h // 2 - calib // 2 : h // 2 - calib // 2 + calib, w // 2 - calib // 2 : w // 2 - calib // 2 + calib] = True
    lo, hi = 0.2, 0.6 * np.sqrt(acceleration) * 2
    best = None
    for _ in range(14):
        mid = 0.5 * (lo + hi)
        mask = _dart_throw(h, w, mid, density_power, order) | cal
        acc = acceleration_of(mask)
        best = mask if best is None or abs(acc - acceleration) < abs(acceleration_of(best) - acceleration) else best
        if abs(acc - acceleration) / acceleration <= tol:
            break
        lo, hi = (mid, hi) if acc < acceleration else (lo, mid)
    return best.astype(np.float32)


def make_mask(
    kind: str, shape: tuple[int, int], acceleration: float, center_fraction: float | None = None, seed: int = 0
) -> np.ndarray:
    """A mask of ``kind`` in :data:`MASK_KINDS`."""
    if kind == "random":
        return random_mask_1d(shape, acceleration, center_fraction, seed)
    if kind == "equispaced":
        return equispaced_mask_1d(shape, acceleration, center_fraction, seed)
    if kind == "poisson":
        return poisson_disc_mask_2d(shape, acceleration, seed=seed)
    raise ValueError(f"unknown mask kind {kind!r}; use one of {', '.join(MASK_KINDS)}")


def acceleration_of(mask: np.ndarray) -> float:
    """Grid size over the number of sampled locations."""
    return float(mask.size / max(float((np.asarray(mask) != 0).sum()), 1.0))
