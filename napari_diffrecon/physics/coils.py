"""Coil sensitivity maps for multi-coil (SENSE) MRI: simulation and ESPIRiT estimation.

Conventions follow :mod:`napari_diffrecon.physics.mri`: images and k-space share the ``(H, W)`` grid,
the k-space centre is at ``(H // 2, W // 2)`` and ``k = fftshift(fft2(ifftshift(x), norm="ortho"))``.
Maps are complex ``(C, H, W)`` and normalised so that ``Σ_c |S_c(r)|² = 1`` wherever they are defined.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .mri import centered_ifft2

__all__ = ["coil_combine", "estimate_coil_maps", "simulate_coil_maps"]


def _as_numpy(a: Any) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().resolve_conj().numpy()
    return np.asarray(a)


def _check_image_shape(shape: Sequence[int]) -> tuple[int, int]:
    """Two positive integers ``(H, W)`` (the masks' shape check: a float side is refused, not truncated)."""
    from .masks import _check_shape

    return _check_shape(shape, 1)


# --------------------------------------------------------------------------------------------------
# simulation
# --------------------------------------------------------------------------------------------------
def simulate_coil_maps(
    shape: Sequence[int],
    n_coils: int,
    seed: int | np.random.Generator | None = 0,
    coil_distance: float = 1.3,
    loop_radius: float = 0.6,
    phase_scale: float = 1.0,
) -> np.ndarray:
    """Smooth birdcage-like coil sensitivities, normalised so that ``Σ_c |S_c|² = 1`` at every pixel.

    ``n_coils`` surface loops sit evenly on a circle around the field of view (with a small random
    jitter of their angles). Each magnitude follows the on-axis Biot–Savart field of a circular loop,
    ``a² / (a² + d²)^{3/2}`` with ``d`` the distance from the loop centre, and each coil carries a
    smooth phase: a random constant plus a linear ramp along the loop's tangent. The maps are then
    divided by the root-sum-of-squares over coils.

    Parameters
    ----------
    shape : (int, int)
        Image grid ``(H, W)``.
    n_coils : int
        Number of coils ≥ 1; a single coil returns all ones.
    seed : int or numpy.random.Generator, optional
        Seed of the angle jitter and constant phases; the same seed gives the same maps.
    coil_distance : float
        Radius of the coil circle in units of half the larger image side (> 1 places the loops
        outside the field of view's inscribed circle).
    loop_radius : float
        Loop radius in the same units: larger loops give flatter, more overlapping profiles.
    phase_scale : float
        Strength of the per-coil phase ramp (radians across half the field of view).

    Returns
    -------
    numpy.ndarray
        complex64 ``(C, H, W)``.

    Raises
    ------
    ValueError
        On a malformed shape, ``n_coils < 1`` or non-positive geometry parameters.
    """
    h, w = _check_image_shape(shape)
    try:
        ok = not isinstance(n_coils, bool) and int(n_coils) == n_coils and n_coils >= 1
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"n_coils must be an integer ≥ 1 (e.g. 8), got {n_coils!r}")
    if not math.isfinite(phase_scale):
        raise ValueError(f"phase_scale must be a finite number, got {phase_scale!r}")
    n_coils = int(n_coils)
    if not (coil_distance > 0 and loop_radius > 0 and math.isfinite(coil_distance) and math.isfinite(loop_radius)):
        raise ValueError(
            f"coil_distance and loop_radius must be positive (units of half the image side); "
            f"got {coil_distance!r}, {loop_radius!r}"
        )
    if n_coils == 1:
        return np.ones((1, h, w), np.complex64)
    rng = np.random.default_rng(seed)
    half = max(h, w) / 2.0
    yy = ((np.arange(h) - h // 2) / half)[:, None]
    xx = ((np.arange(w) - w // 2) / half)[None, :]
    angles = 2 * np.pi * np.arange(n_coils) / n_coils + rng.uniform(-0.15, 0.15, n_coils) * np.pi / n_coils
    offsets = rng.uniform(0, 2 * np.pi, n_coils)
    maps = np.empty((n_coils, h, w), np.complex128)
    for c, (a, phi0) in enumerate(zip(angles, offsets, strict=True)):
        cy, cx = coil_distance * np.sin(a), coil_distance * np.cos(a)
        d2 = (yy - cy) ** 2 + (xx - cx) ** 2
        mag = loop_radius**2 / (loop_radius**2 + d2) ** 1.5
        tangent = np.cos(a) * yy - np.sin(a) * xx  # coordinate along the loop's tangent
        maps[c] = mag * np.exp(1j * (phi0 + phase_scale * tangent))
    maps /= np.sqrt((np.abs(maps) ** 2).sum(0))
    return maps.astype(np.complex64)


def coil_combine(coil_images: Any, maps: Any) -> np.ndarray:
    """SENSE-style coil combination ``Σ_c conj(S_c) y_c / Σ_c |S_c|²`` (zero where the maps are zero).

    Parameters
    ----------
    coil_images : array-like
        Complex coil images ``(C, H, W)`` (numpy or torch).
    maps : array-like
        Coil sensitivities ``(C, H, W)``.

    Returns
    -------
    numpy.ndarray
        complex64 ``(H, W)``.
    """
    y, s = _as_numpy(coil_images), _as_numpy(maps)
    if y.shape != s.shape or y.ndim != 3:
        raise ValueError(f"coil_images {y.shape} and maps {s.shape} must both be (C, H, W)")
    num = (np.conj(s) * y).sum(0)
    den = (np.abs(s) ** 2).sum(0)
    out = np.divide(num, den, out=np.zeros_like(num), where=den > 1e-12)
    return out.astype(np.complex64)


# --------------------------------------------------------------------------------------------------
# ESPIRiT
# --------------------------------------------------------------------------------------------------
def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(value, int | np.integer):
        return int(value), int(value)
    try:
        a, b = (int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}") from None
    return a, b


def _centred_extent(line: np.ndarray, centre: int) -> int:
    """Length of the longest run of True around ``centre`` that is placed like our calibration boxes."""
    n = line.size
    best = 0
    for size in range(1, n + 1):
        start = centre - size // 2
        if start < 0 or start + size > n or not line[start : start + size].all():
            break
        best = size
    return best


def _detect_calibration(sampled: np.ndarray) -> tuple[int, int]:
    """Largest fully sampled centred box (rows h//2 − cy//2 …, cols w//2 − cx//2 …) of a sampling pattern."""
    h, w = sampled.shape
    cy = _centred_extent(sampled[:, w // 2], h // 2)
    cx = _centred_extent(sampled[h // 2, :], w // 2)
    best = (0, 0)
    for y in range(cy, 0, -1):  # the tallest box is not always the largest: try every height
        y0 = h // 2 - y // 2
        rows = sampled[y0 : y0 + y].all(0)
        x = _centred_extent(rows, w // 2)
        if x > cx:
            x = cx
        if y * x > best[0] * best[1]:
            best = (y, x)
        if y * cx <= best[0] * best[1]:
            break
    return best


def _calibration_kernel(
    acs: np.ndarray, kernel: tuple[int, int], threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """Signal-subspace projector of the calibration (block-Hankel) matrix, and the singular values.

    Rows of the calibration matrix are the kernel-sized patches of the ACS data (all coils).
    """
    from numpy.lib.stride_tricks import sliding_window_view

    c = acs.shape[0]
    ky, kx = kernel
    patches = sliding_window_view(acs, (ky, kx), axis=(1, 2))  # (C, ny, nx, ky, kx)
    a = patches.transpose(1, 2, 3, 4, 0).reshape(-1, ky * kx * c)
    _, s, vh = np.linalg.svd(a, full_matrices=False)
    n = int(np.sum(s > threshold * s[0]))
    # Rows a of the calibration matrix satisfy a = a V Vᴴ (V: leading right singular vectors); for a patch as a
    # column vector y = aᵀ this reads y = conj(V) Vᵀ y, so the projector acting on patches is conj(V) Vᵀ.
    vt = vh[:n]  # (n, ky·kx·C) = Vᴴ
    return vt.T @ vt.conj(), s


def _image_space_operator(proj: np.ndarray, kernel: tuple[int, int], c: int, shape: tuple[int, int]) -> np.ndarray:
    """Per-pixel ESPIRiT matrices ``M(r) = (1/K) Σ_d A(d) e^{+2πi d·r}`` of shape ``(H·W, C, C)``.

    The consistency condition ``y_patch = P y_patch`` averaged over the ``K = ky·kx`` kernel positions is a
    convolution in k-space whose image-space form is multiplication by ``M(r)``; its kernel ``A(d)`` sums
    the projector entries ``P[(q, c), (q', c')]`` over ``q − q' = d`` (support ``(2ky − 1) × (2kx − 1)``).
    Sensitivities are the eigenvectors of ``M(r)`` with eigenvalue 1.
    """
    ky, kx = kernel
    h, w = shape
    p6 = proj.reshape(ky, kx, c, ky, kx, c)
    auto = np.zeros((2 * ky - 1, 2 * kx - 1, c, c), np.complex128)
    for qy in range(ky):
        for qx in range(kx):
            # d = q − q' for q' = 0..k−1 runs from q down to q − k + 1: a flipped block.
            auto[qy : qy + ky, qx : qx + kx] += p6[qy, qx].transpose(1, 2, 0, 3)[::-1, ::-1]
    grid = np.zeros((c, c, h, w), np.complex64)
    y0, x0 = h // 2 - (ky - 1), w // 2 - (kx - 1)  # d = 0 at the k-space centre
    grid[:, :, y0 : y0 + 2 * ky - 1, x0 : x0 + 2 * kx - 1] = auto.transpose(2, 3, 0, 1)
    # centred inverse FFT = Σ_d A(d) e^{+2πi d·r} / sqrt(HW)
    m = centered_ifft2(torch.from_numpy(grid)).numpy() * (math.sqrt(h * w) / (ky * kx))
    # Hermitian up to rounding: eigh reads the lower triangle, so no symmetrised copy is made (fastMRI-size grids
    # with 16 coils hold ~1 GB per copy).
    return m.transpose(2, 3, 0, 1).reshape(h * w, c, c)


def _top_eigenpairs(m: np.ndarray, chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Largest eigenvalue and its eigenvector of each Hermitian ``(C, C)`` matrix, in pixel chunks (bounded memory)."""
    n, c = m.shape[0], m.shape[1]
    top = np.empty(n, np.float64)
    vec = np.empty((n, c), np.complex128)
    for i in range(0, n, chunk):
        evals, evecs = np.linalg.eigh(m[i : i + chunk])  # ascending eigenvalues
        top[i : i + chunk] = evals[:, -1].real
        vec[i : i + chunk] = evecs[:, :, -1]
    return top, vec


def estimate_coil_maps(
    kspace: Any,
    calib_size: int | Sequence[int] | None = 24,
    kernel_size: int | Sequence[int] = 6,
    threshold: float = 0.02,
    eig_threshold: float = 0.95,
    phase_reference: int | None = None,
    return_eigenvalues: bool = False,
    mask: Any = None,
    warn_narrow: bool = True,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """ESPIRiT coil sensitivities (Uecker et al., MRM 2014) from the fully sampled k-space centre.

    1. The calibration (block-Hankel) matrix is built from all kernel-sized patches of the fully
       sampled calibration (ACS) box, all coils side by side; its right singular vectors with
       singular value > ``threshold · σ_max`` span the signal subspace.
    2. The projector onto that subspace is turned into a per-pixel ``C × C`` matrix ``M(r)``
       (zero-padded, centred inverse FFT of its kernel autocorrelation).
    3. ``numpy.linalg.eigh`` on all pixels at once; the map is the eigenvector of the largest
       eigenvalue, which is ≈ 1 inside the object. Pixels whose largest eigenvalue is below
       ``eig_threshold`` (outside the object) are set to zero.
    4. The per-pixel phase, which ESPIRiT leaves free, is fixed relative to a reference so the maps
       are smooth: a virtual body coil (the dominant coil combination of the ACS data) by default,
       or coil ``phase_reference``.

    Parameters
    ----------
    kspace : array-like
        Multi-coil k-space ``(C, H, W)`` (numpy or torch, centred convention), zero where not sampled.
    calib_size : int, (int, int) or None
        Size of the calibration box centred at ``(H // 2, W // 2)`` (rows ``H//2 − cy//2 …``); it must be
        fully sampled. ``None`` detects the largest fully sampled centred box.
    kernel_size : int or (int, int)
        ESPIRiT kernel size; the calibration box must be larger than it. With ``calib_size=None`` a
        kernel wider than a third of the detected box is narrowed (with a warning): a 6-wide kernel on
        the 8–10 fully sampled columns of a fastMRI 4×/8× mask leaves most of the object without maps.
    threshold : float
        Relative singular-value threshold of the calibration matrix, in (0, 1).
    eig_threshold : float
        Pixels whose top eigenvalue is below this are treated as outside the object (maps zero).
        Use 0 to keep every pixel.
    phase_reference : int, optional
        Coil whose phase is set to zero; default: a virtual body coil (smoother, no phase
        singularities where a single coil is weak).
    return_eigenvalues : bool
        Also return the top eigenvalue map ``(H, W)`` (≈ 1 inside the object).
    mask : array-like, optional
        The sampling mask, ``(W,)`` columns or ``(H, W)`` (non-zero = sampled). Default: guessed from the
        non-zero entries of ``kspace`` (noise-free synthetic data can hold exact zeros: pass the mask).
    warn_narrow : bool
        With ``calib_size=None``, warn when the detected calibration region is too narrow for the kernel and the
        kernel is narrowed (a reader that expects it passes False; the filter of ``warnings.catch_warnings()``
        is process-wide and not safe from a worker thread).

    Returns
    -------
    numpy.ndarray or (numpy.ndarray, numpy.ndarray)
        complex64 maps ``(C, H, W)`` with ``Σ_c |S_c|² = 1`` where kept; with
        ``return_eigenvalues`` also the float32 eigenvalue map.

    Raises
    ------
    ValueError
        On wrong dimensions, NaN/Inf, a calibration box that is not fully sampled, does not fit the
        grid or is too small for the kernel, or thresholds out of range.
    """
    k = _as_numpy(kspace)
    if k.ndim != 3:
        raise ValueError(
            f"kspace must be multi-coil k-space of shape (C, H, W), got shape {k.shape}; "
            "single-coil data need no coil maps (use ones)"
        )
    if not np.all(np.isfinite(k)):
        raise ValueError("kspace contains NaN or Inf; replace unsampled entries by zeros")
    k = k.astype(np.complex128)
    c, h, w = k.shape
    if c < 1:
        raise ValueError("kspace has no coils (C = 0)")
    ky, kx = _pair(kernel_size, "kernel_size")
    if ky < 1 or kx < 1 or 2 * ky - 1 > h or 2 * kx - 1 > w:
        raise ValueError(f"kernel_size {(ky, kx)} must be ≥ 1 and at most half the grid {(h, w)}")
    if not 0 < threshold < 1:
        raise ValueError(f"threshold is relative to the largest singular value and must be in (0, 1), got {threshold}")
    if not 0 <= eig_threshold < 1:
        raise ValueError(f"eig_threshold must be in [0, 1) (eigenvalues are ≤ 1), got {eig_threshold}")
    if phase_reference is not None and (
        int(phase_reference) != phase_reference or not 0 <= int(phase_reference) < c
    ):
        raise ValueError(f"phase_reference must be a coil index in [0, {c}), got {phase_reference}")

    if mask is None:
        sampled = np.any(k != 0, axis=0)
    else:
        if np.ndim(mask) not in (1, 2) or np.shape(mask)[-1] != w or (np.ndim(mask) == 2 and np.shape(mask)[0] != h):
            raise ValueError(f"mask must be (W,) = ({w},) or (H, W) = ({h}, {w}), got shape {np.shape(mask)}")
        sampled = np.broadcast_to(np.asarray(mask) != 0, (h, w))
    if calib_size is None:
        cy, cx = _detect_calibration(sampled)
        narrow = (min(ky, max(3, cy // 3)), min(kx, max(3, cx // 3)))
        if narrow != (ky, kx) and cy > narrow[0] and cx > narrow[1]:
            import warnings

            if warn_narrow:
                warnings.warn(
                    f"the {cy}×{cx} calibration region is narrow for a {ky}×{kx} ESPIRiT kernel; using "
                    f"{narrow[0]}×{narrow[1]}",
                    stacklevel=2,
                )
            ky, kx = narrow
        if cy <= ky or cx <= kx:
            raise ValueError(
                f"the largest fully sampled box at the k-space centre is {cy}×{cx}, too small for the "
                f"{ky}×{kx} kernel; acquire a larger calibration region or lower kernel_size"
            )
    else:
        cy, cx = _pair(calib_size, "calib_size")
        if cy > h or cx > w:
            raise ValueError(f"calib_size {(cy, cx)} exceeds the k-space grid {(h, w)}; use a smaller calib_size")
        if cy <= ky or cx <= kx:
            raise ValueError(
                f"calib_size {(cy, cx)} is too small for the {ky}×{kx} kernel: it must be larger than "
                "kernel_size in both directions (e.g. calib_size=24, kernel_size=6)"
            )
    y0, x0 = h // 2 - cy // 2, w // 2 - cx // 2
    if not sampled[y0 : y0 + cy, x0 : x0 + cx].all():
        found = _detect_calibration(sampled)
        raise ValueError(
            f"the central {cy}×{cx} calibration box is not fully sampled (the largest fully sampled centred "
            f"box is {found[0]}×{found[1]}); pass a smaller calib_size or calib_size=None to detect it"
        )
    acs = k[:, y0 : y0 + cy, x0 : x0 + cx]
    if not np.any(acs):
        raise ValueError("the calibration region is all zeros")

    proj, _ = _calibration_kernel(acs, (ky, kx), threshold)
    m = _image_space_operator(proj, (ky, kx), c, (h, w))
    top, maps = _top_eigenpairs(m)  # (H·W,), (H·W, C) unit norm
    if phase_reference is None:
        # Virtual body coil: the dominant coil combination of the calibration data.
        _, _, vh = np.linalg.svd(acs.reshape(c, -1).T, full_matrices=False)
        ref = maps @ vh[0].conj()
    else:
        ref = maps[:, int(phase_reference)]
    maps = maps * np.exp(-1j * np.angle(ref))[:, None]
    maps[top < eig_threshold] = 0
    maps = maps.T.reshape(c, h, w).astype(np.complex64)
    if return_eigenvalues:
        return maps, top.reshape(h, w).astype(np.float32)
    return maps
