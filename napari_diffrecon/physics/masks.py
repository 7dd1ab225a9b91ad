"""Cartesian k-space sampling masks, deterministic under a seed.

All masks live on the image grid ``(H, W)`` with the k-space centre at ``(H // 2, W // 2)`` (the centred
FFT convention of :mod:`napari_diffrecon.physics.mri`). They are float32 arrays of 0 and 1.

* 1D masks (:func:`random_mask_1d`, :func:`equispaced_mask_1d`) follow fastMRI: the phase-encode
  direction is the columns (axis −1), so a mask selects whole columns (every row of a chosen column),
  with a fully sampled block of low-frequency columns in the centre.
* :func:`poisson_disc_mask_2d` is 2D variable-density Poisson-disc sampling (for 3D Cartesian
  acquisitions where both in-plane axes are phase encodes) with a fully sampled calibration box.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np

__all__ = [
    "MASK_KINDS",
    "acceleration_of",
    "equispaced_mask_1d",
    "make_mask",
    "poisson_disc_mask_2d",
    "poisson_disc_radius",
    "random_mask_1d",
]

MASK_KINDS = ("random", "equispaced", "poisson")

SeedLike = int | np.random.Generator | None

_MIN_SIDE_1D = 4
_MIN_SIDE_2D = 8


# --------------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------------
def _check_shape(shape: Sequence[int], min_side: int) -> tuple[int, int]:
    try:
        dims = tuple(int(s) for s in shape)
        ok = len(dims) == 2 and all(d == s for d, s in zip(dims, shape, strict=True))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"mask shape must be two integers (H, W), e.g. (256, 256); got {shape!r}")
    if min(dims) < min_side:
        raise ValueError(
            f"mask shape {dims} is too small: both sides must be at least {min_side}; "
            "pass the full image size (H, W) of the k-space grid"
        )
    return dims


def _check_acceleration(acceleration: float) -> float:
    if isinstance(acceleration, (bool, str, bytes)):  # float("4") and float(True) would pass silently
        raise ValueError(f"acceleration must be a number ≥ 1 (e.g. 4 or 8), got {acceleration!r}")
    try:
        acc = float(acceleration)
    except (TypeError, ValueError):
        raise ValueError(f"acceleration must be a number ≥ 1 (e.g. 4 or 8), got {acceleration!r}") from None
    if not math.isfinite(acc) or acc < 1:
        raise ValueError(
            f"acceleration must be a finite number ≥ 1 (e.g. 4 for 4× undersampling, 1 for full sampling), "
            f"got {acceleration!r}"
        )
    return acc


def _center_fraction(acceleration: float, center_fraction: float | None) -> float:
    """fastMRI defaults: 0.08 for 4×, 0.04 for 8×, otherwise 0.32 / acceleration."""
    if center_fraction is None:
        if math.isclose(acceleration, 4.0):
            return 0.08
        if math.isclose(acceleration, 8.0):
            return 0.04
        return 0.32 / acceleration
    try:
        cf = float(center_fraction) if not isinstance(center_fraction, (bool, str, bytes)) else float("nan")
    except (TypeError, ValueError):
        cf = float("nan")
    if not math.isfinite(cf) or not 0.0 <= cf <= 1.0:
        raise ValueError(
            f"center_fraction is the fraction of columns sampled fully at the k-space centre and must be in "
            f"[0, 1] (fastMRI uses 0.08 for 4×, 0.04 for 8×); got {center_fraction!r}"
        )
    return cf


def _center_columns(w: int, acceleration: float, cf: float) -> tuple[np.ndarray, int]:
    """Boolean column selector of the ``round(W · cf)`` central columns (containing column ``W // 2``)."""
    n_center = int(round(w * cf))
    if cf > 0:
        n_center = max(n_center, 1)
    if n_center > w / acceleration + 1e-9:
        raise ValueError(
            f"the fully sampled centre ({n_center} of {w} columns, center_fraction={cf:g}) alone exceeds the "
            f"budget of {w / acceleration:.1f} columns at {acceleration:g}× acceleration; lower center_fraction "
            "or the acceleration"
        )
    cols = np.zeros(w, bool)
    start = w // 2 - n_center // 2
    cols[start : start + n_center] = True
    return cols, n_center


def _columns_to_mask(cols: np.ndarray, h: int) -> np.ndarray:
    return np.ascontiguousarray(np.broadcast_to(cols[None, :], (h, cols.size)), dtype=np.float32)


# --------------------------------------------------------------------------------------------------
# 1D (column) masks
# --------------------------------------------------------------------------------------------------
def random_mask_1d(
    shape: Sequence[int],
    acceleration: float,
    center_fraction: float | None = None,
    seed: SeedLike = 0,
) -> np.ndarray:
    """Random 1D column mask (fastMRI ``RandomMaskFunc``).

    The ``round(W · center_fraction)`` central columns are always sampled; every other column is
    sampled independently with probability ``(W / acceleration − n_center) / (W − n_center)``, so
    the *expected* acceleration equals ``acceleration`` (a single draw scatters around it).

    Parameters
    ----------
    shape : (int, int)
        Grid ``(H, W)``; columns (axis −1) are the phase-encode lines.
    acceleration : float
        Undersampling factor ≥ 1.
    center_fraction : float, optional
        Fraction of columns sampled fully at the centre. Default: 0.08 for 4×, 0.04 for 8×,
        otherwise ``0.32 / acceleration``.
    seed : int or numpy.random.Generator, optional
        Seed for :func:`numpy.random.default_rng`; the same seed gives the same mask.

    Returns
    -------
    numpy.ndarray
        float32 0/1 mask of shape ``(H, W)``, constant along each column.

    Raises
    ------
    ValueError
        On a malformed shape, an acceleration < 1, a centre fraction outside [0, 1], or a centre
        that alone exceeds the sampling budget.
    """
    h, w = _check_shape(shape, _MIN_SIDE_1D)
    acc = _check_acceleration(acceleration)
    cols, n_center = _center_columns(w, acc, _center_fraction(acc, center_fraction))
    prob = (w / acc - n_center) / (w - n_center) if w > n_center else 0.0
    rng = np.random.default_rng(seed)
    cols |= rng.uniform(size=w) < prob
    return _columns_to_mask(cols, h)


def equispaced_mask_1d(
    shape: Sequence[int],
    acceleration: float,
    center_fraction: float | None = None,
    seed: SeedLike = 0,
) -> np.ndarray:
    """Equispaced 1D column mask (fastMRI ``EquispacedMaskFractionFunc``).

    The central ``round(W · center_fraction)`` columns are sampled, plus every ``a``-th column
    from a random integer offset, with the spacing adjusted for the centre,
    ``a = acceleration · (W − n_center) / (W − n_center · acceleration)``, so that the total number of
    sampled columns is ≈ ``W / acceleration``.

    Parameters
    ----------
    shape : (int, int)
        Grid ``(H, W)``; columns (axis −1) are the phase-encode lines.
    acceleration : float
        Undersampling factor ≥ 1.
    center_fraction : float, optional
        As in :func:`random_mask_1d`.
    seed : int or numpy.random.Generator, optional
        Seed for the offset of the equispaced lines.

    Returns
    -------
    numpy.ndarray
        float32 0/1 mask of shape ``(H, W)``, constant along each column.

    Raises
    ------
    ValueError
        As :func:`random_mask_1d`.
    """
    h, w = _check_shape(shape, _MIN_SIDE_1D)
    acc = _check_acceleration(acceleration)
    cols, n_center = _center_columns(w, acc, _center_fraction(acc, center_fraction))
    if w / acc - n_center > 1e-9:
        spacing = acc * (w - n_center) / (w - n_center * acc)
        offset = int(np.random.default_rng(seed).integers(0, max(int(round(spacing)), 1)))
        idx = np.round(np.arange(offset, w - 1, spacing)).astype(np.int64)
        cols[idx[idx < w]] = True
    return _columns_to_mask(cols, h)


# --------------------------------------------------------------------------------------------------
# 2D variable-density Poisson disc
# --------------------------------------------------------------------------------------------------
def poisson_disc_radius(shape: Sequence[int], scale: float = 1.0, falloff: float = 3.0) -> np.ndarray:
    """Minimum-distance map of :func:`poisson_disc_mask_2d` (in grid units).

    ``r(k) = scale · (1 + falloff · ρ(k))`` with ``ρ = sqrt((ky / (H/2))² + (kx / (W/2))²)`` the
    normalised distance from the k-space centre (0 at the centre, 1 at the edge midpoints), so the
    sampling density ∝ 1 / r² falls off with ``|k|``.

    Parameters
    ----------
    shape : (int, int)
        Grid ``(H, W)``.
    scale : float
        Minimum distance at the k-space centre.
    falloff : float
        How fast the minimum distance grows outward (0: uniform Poisson disc).

    Returns
    -------
    numpy.ndarray
        float64 ``(H, W)``.
    """
    h, w = (int(s) for s in shape)
    ky = (np.arange(h) - h // 2) / (h / 2)
    kx = (np.arange(w) - w // 2) / (w / 2)
    rho = np.sqrt(ky[:, None] ** 2 + kx[None, :] ** 2)
    return float(scale) * (1.0 + float(falloff) * rho)


def _calib_box(h: int, w: int, acc: float, calib: int | float | Sequence[int] | None) -> tuple[int, int]:
    """Calibration-box size ``(cy, cx)`` from an int, a pair, a fraction of each side, or None (auto)."""
    if calib is None:
        # 24 × 24 (the usual ACS size), reduced on small grids so the box holds ≤ 1/4 of the budget.
        side = min(24, int(math.floor(math.sqrt(h * w / acc / 4.0))))
        cy, cx = min(side, h), min(side, w)
    elif isinstance(calib, float | np.floating) and 0.0 <= calib < 1.0:
        cy, cx = int(round(h * calib)), int(round(w * calib))
    elif isinstance(calib, int | float | np.integer | np.floating):
        if not float(calib).is_integer():
            raise ValueError(f"calib must be an integer side, a pair (cy, cx) or a fraction in [0, 1); got {calib!r}")
        cy = cx = int(calib)
    else:
        try:
            cy, cx = (int(c) for c in calib)
        except (TypeError, ValueError):
            raise ValueError(
                f"calib must be an int (square side), a pair (cy, cx), a fraction in [0, 1) or None; got {calib!r}"
            ) from None
    if cy < 0 or cx < 0 or cy > h or cx > w:
        raise ValueError(f"calibration box {(cy, cx)} does not fit the {h}×{w} grid; use a smaller calib")
    if cy * cx > h * w / acc:
        raise ValueError(
            f"the {cy}×{cx} calibration box alone ({cy * cx} samples) exceeds the budget of "
            f"{h * w / acc:.0f} samples at {acc:g}× on a {h}×{w} grid; use a smaller calib or a lower acceleration"
        )
    return cy, cx


def _dart_throw(radius: np.ndarray, seeded: np.ndarray, order: np.ndarray, rmax: int) -> np.ndarray:
    """Grid dart throwing: visit grid points in ``order``, accept a point unless it is blocked.

    Accepting ``q`` blocks every ``p`` with ``|p − q| < max(r(p), r(q))``, so any two accepted points
    (and an accepted point and a seeded one) are at least ``max(r(p), r(q))`` apart. Every grid point
    is visited once, so the result is saturated (maximal).
    """
    h, w = radius.shape
    oy, ox = np.mgrid[-rmax : rmax + 1, -rmax : rmax + 1]
    dist = np.hypot(oy, ox)
    accepted = seeded.copy()
    blocked = np.zeros((h, w), bool)

    def block(y: int, x: int) -> None:
        y0, y1, x0, x1 = max(y - rmax, 0), min(y + rmax + 1, h), max(x - rmax, 0), min(x + rmax + 1, w)
        d = dist[rmax - (y - y0) : rmax + (y1 - y), rmax - (x - x0) : rmax + (x1 - x)]
        blocked[y0:y1, x0:x1] |= (d < radius[y0:y1, x0:x1]) | (d < radius[y, x])

    for y, x in np.argwhere(seeded):
        block(int(y), int(x))
    flat_blocked = blocked.reshape(-1)
    flat_accepted = accepted.reshape(-1)
    for idx in order.tolist():
        if flat_blocked[idx] or flat_accepted[idx]:
            continue
        flat_accepted[idx] = True
        block(*divmod(idx, w))
    return accepted


def poisson_disc_mask_2d(
    shape: Sequence[int],
    acceleration: float,
    calib: int | float | Sequence[int] | None = None,
    seed: SeedLike = 0,
    falloff: float = 3.0,
    tol: float = 0.02,
    max_iter: int = 40,
) -> np.ndarray:
    """2D variable-density Poisson-disc mask with a fully sampled calibration box.

    Grid points are visited in a random order and accepted unless an accepted point lies closer
    than ``max(r(p), r(q))``, with ``r = scale · (1 + falloff · ρ)`` the radius map of
    :func:`poisson_disc_radius` (small near the k-space centre, so the density falls outward). The
    calibration box seeds the set, so *every* sample outside the box is at least ``r`` from every
    other sample. ``scale`` is found by bisection (in log scale) until the acceleration is within
    ``tol`` of the request.

    Parameters
    ----------
    shape : (int, int)
        Grid ``(H, W)``; both sides ≥ 8.
    acceleration : float
        Target acceleration ``H · W / #samples`` ≥ 1.
    calib : int, (int, int), float or None
        Fully sampled calibration (ACS) box at the centre: a side, ``(cy, cx)``, or a fraction in
        (0, 1) of each side. Default: 24 × 24, reduced on small grids to at most a quarter of the
        sampling budget.
    seed : int or numpy.random.Generator, optional
        Seed of the visiting order; the same seed gives the same mask.
    falloff : float
        Growth of the minimum distance from the centre to the edge midpoints (``r`` is
        ``1 + falloff`` times larger there); 0 gives uniform-density Poisson-disc sampling.
    tol : float
        Relative tolerance on the achieved acceleration.
    max_iter : int
        Maximum number of bisection steps; the closest mask is returned with a warning when the
        tolerance is not reached (only on very small grids or extreme settings).

    Returns
    -------
    numpy.ndarray
        float32 0/1 mask of shape ``(H, W)``.

    Raises
    ------
    ValueError
        On a malformed shape, acceleration < 1, a calibration box that does not fit or alone
        exceeds the sampling budget, or a negative falloff.
    """
    if int(max_iter) < 1:
        raise ValueError(f"max_iter must be ≥ 1, got {max_iter!r}")
    h, w = _check_shape(shape, _MIN_SIDE_2D)
    acc = _check_acceleration(acceleration)
    if not math.isfinite(falloff) or falloff < 0:
        raise ValueError(f"falloff must be ≥ 0 (0 = uniform density), got {falloff!r}")
    if not 0 < tol < 1:
        raise ValueError(f"tol is a relative tolerance on the acceleration and must be in (0, 1), got {tol!r}")
    if acc == 1.0:
        return np.ones((h, w), np.float32)
    cy, cx = _calib_box(h, w, acc, calib)
    seeded = np.zeros((h, w), bool)
    y0, x0 = h // 2 - cy // 2, w // 2 - cx // 2
    seeded[y0 : y0 + cy, x0 : x0 + cx] = True
    order = np.random.default_rng(seed).permutation(h * w)
    profile = poisson_disc_radius((h, w), 1.0, falloff)
    target = h * w / acc

    def sample(scale: float) -> np.ndarray:
        radius = scale * profile
        return _dart_throw(radius, seeded, order, int(math.ceil(radius.max())))

    # Initial guess from random-sequential-adsorption packing (≈ 0.55 / (π r² / 4) points per unit area).
    lo, hi = 0.0, float("inf")
    scale = math.sqrt(0.7 * float(np.sum(profile**-2.0)) / target)
    best, best_err = None, float("inf")
    for _ in range(max_iter):
        mask = sample(scale)
        err = abs(h * w / mask.sum() - acc) / acc
        if err < best_err:
            best, best_err = mask, err
        if err <= tol:
            break
        if mask.sum() > target:  # too many samples: larger radius
            lo = scale
            scale = scale * 1.5 if math.isinf(hi) else math.sqrt(lo * hi)
        else:
            hi = scale
            scale = scale / 1.5 if lo == 0.0 else math.sqrt(lo * hi)
        if hi - lo < 1e-6 * hi:
            break
    if best_err > tol and abs(float(best.sum()) - target) > 1.0:  # not just the granularity of one sample
        warnings.warn(
            f"Poisson-disc mask reached {h * w / best.sum():.2f}× instead of {acc:g}× (tolerance {tol:.0%}); "
            "use a larger grid, another seed or a looser tol",
            stacklevel=2,
        )
    return best.astype(np.float32)


# --------------------------------------------------------------------------------------------------
# dispatch and utilities
# --------------------------------------------------------------------------------------------------
def make_mask(
    kind: str,
    shape: Sequence[int],
    acceleration: float,
    center_fraction: float | None = None,
    seed: SeedLike = 0,
) -> np.ndarray:
    """A sampling mask of ``kind`` in :data:`MASK_KINDS`.

    Parameters
    ----------
    kind : {"random", "equispaced", "poisson"}
        :func:`random_mask_1d`, :func:`equispaced_mask_1d` or :func:`poisson_disc_mask_2d`.
    shape : (int, int)
        Grid ``(H, W)``.
    acceleration : float
        Undersampling factor ≥ 1.
    center_fraction : float, optional
        Fully sampled centre: fraction of columns (1D kinds) or fraction of each side of the
        calibration box (``"poisson"``). Default: the per-kind default.
    seed : int or numpy.random.Generator, optional
        Seed; the same seed gives the same mask.

    Returns
    -------
    numpy.ndarray
        float32 0/1 mask ``(H, W)``.

    Raises
    ------
    ValueError
        On an unknown kind or invalid parameters.
    """
    if kind == "random":
        return random_mask_1d(shape, acceleration, center_fraction, seed)
    if kind == "equispaced":
        return equispaced_mask_1d(shape, acceleration, center_fraction, seed)
    if kind == "poisson":
        if center_fraction is not None:
            center_fraction = float(center_fraction)
            if not 0.0 <= center_fraction < 1.0:
                raise ValueError(f"center_fraction for a Poisson-disc mask must be in [0, 1), got {center_fraction}")
        return poisson_disc_mask_2d(shape, acceleration, calib=center_fraction, seed=seed)
    raise ValueError(f"unknown mask kind {kind!r}; use one of {', '.join(repr(k) for k in MASK_KINDS)}")


def acceleration_of(mask: np.ndarray) -> float:
    """Acceleration of a mask: grid size over the number of sampled (non-zero) locations.

    Parameters
    ----------
    mask : array-like
        Sampling mask (0/1 or weights); zeros are unsampled.

    Returns
    -------
    float
        ``mask.size / count_nonzero(mask)``; ``inf`` for an empty mask.
    """
    m = np.asarray(mask)
    n = int(np.count_nonzero(m))
    return float(m.size / n) if n else float("inf")
