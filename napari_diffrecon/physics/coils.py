"""Coil sensitivity maps for multi-coil (SENSE) MRI."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["simulate_coil_maps", "estimate_coil_maps"]


def simulate_coil_maps(shape: tuple[int, int], n_coils: int, seed: int = 0) -> np.ndarray:
    """Smooth birdcage-like sensitivities, normalised so ``Σ_c |S_c|² = 1`` at every pixel.

    Coils sit on a circle around the field of view; magnitudes decay with distance from each coil
    and every coil carries its own smooth phase. Returns complex64 ``(C, H, W)``.
    """
    h, w = int(shape[0]), int(shape[1])
    if n_coils < 1:
        raise ValueError(f"n_coils must be ≥ 1, got {n_coils}")
    if n_coils == 1:
        return np.ones((1, h, w), np.complex64)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    yy = (yy - h / 2) / max(h, w)
    xx = (xx - w / 2) / max(h, w)
    maps = []
    for k in range(n_coils):
        a = 2 * np.pi * k / n_coils + rng.uniform(-0.1, 0.1)
        cy, cx = 0.75 * np.sin(a), 0.75 * np.cos(a)
        mag = 1.0 / (0.15 + (yy - cy) ** 2 + (xx - cx) ** 2)
        phase = rng.uniform(0, 2 * np.pi) + 2.0 * (np.cos(a) * yy - np.sin(a) * xx)
        maps.append(mag * np.exp(1j * phase))
    maps = np.stack(maps)
    return (maps / np.sqrt((np.abs(maps) ** 2).sum(0))).astype(np.complex64)


def _cfft2(x: np.ndarray) -> np.ndarray:
    ax = (-2, -1)
    return np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(x, axes=ax), norm="ortho"), axes=ax)


def estimate_coil_maps(
    kspace: Any,
    calib: int = 24,
    kernel_size: int = 6,
    threshold: float = 0.02,
    eig_threshold: float = 0.95,
) -> np.ndarray:
    """ESPIRiT coil sensitivities (Uecker et al. 2014) from the fully sampled k-space centre.

    Parameters
    ----------
    kspace : array-like
        Multi-coil k-space ``(C, H, W)`` (centred convention), zeros where not sampled.
    calib : int
        Side of the calibration (ACS) square at the k-space centre; must be fully sampled.
    kernel_size : int
        ESPIRiT kernel side.
    threshold : float
        Keep calibration-matrix singular vectors with σ ≥ threshold · σ_max.
    eig_threshold : float
        Pixels whose top eigenvalue is below this are outside the object: maps set to 0.

    Returns
    -------
    np.ndarray
        complex64 ``(C, H, W)``, phase referenced to coil 0.
    """
    k = np.asarray(kspace.cpu() if hasattr(kspace, "cpu") else kspace)
    if k.ndim != 3:
        raise ValueError(f"kspace must be multi-coil (C, H, W), got shape {k.shape}")
    if not np.all(np.isfinite(k)):
        raise ValueError("kspace contains NaN or Inf")
    c, h, w = k.shape
    if calib < kernel_size + 2 or calib > min(h, w):
        raise ValueError(f"calib={calib} must be between kernel_size + 2 = {kernel_size + 2} and the image size")
    y0, x0 = h // 2 - calib // 2, w // 2 - calib // 2
    acs = k[:, y0 : y0 + calib, x0 : x0 + calib]
    if np.any(np.abs(acs).sum(0) == 0):
        raise ValueError(f"the central {calib}×{calib} k-space region is not fully sampled; lower calib")
    from numpy.lib.stride_tricks import sliding_window_view

    patches = sliding_window_view(acs, (kernel_size, kernel_size), axis=(1, 2))  # (C, ny, nx, k, k)
    a = patches.transpose(1, 2, 3, 4, 0).reshape(-1, kernel_size * kernel_size * c)
    _, s, vh = np.linalg.svd(a, full_matrices=False)
    n = int(np.sum(s >= threshold * s[0]))
    kernels = vh[:n].conj().T.reshape(kernel_size, kernel_size, c, n)
    # Image-space kernels: flipped, conjugated, zero-padded, Fourier transformed.
    padded = np.zeros((c, n, h, w), np.complex128)
    ky, kx = h // 2 - kernel_size // 2, w // 2 - kernel_size // 2
    padded[:, :, ky : ky + kernel_size, kx : kx + kernel_size] = kernels[::-1, ::-1].conj().transpose(2, 3, 0, 1)
    kerimgs = _cfft2(padded) * np.sqrt(h * w) / kernel_size  # (C, n, H, W)
    g = kerimgs.transpose(2, 3, 0, 1).reshape(h * w, c, n)
    u, sv, _ = np.linalg.svd(g, full_matrices=False)
    maps = u[:, :, 0] * (sv[:, :1] ** 2 > eig_threshold)
    maps = maps * np.exp(-1j * np.angle(maps[:, :1]))
    return maps.T.reshape(c, h, w).astype(np.complex64)
