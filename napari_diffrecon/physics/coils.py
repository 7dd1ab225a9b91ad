"""Coil sensitivity maps for multi-coil (SENSE) MRI."""

from __future__ import annotations

import numpy as np

__all__ = ["simulate_coil_maps"]


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
