"""Filtered back-projection (scikit-image's filters, our exact adjoint as the back-projector) and zero filling."""

from __future__ import annotations

import math

import numpy as np
import torch

from ..physics.base import LinearOperator
from ..physics.ct import ParallelBeamCT

__all__ = ["FILTERS", "fourier_filter", "filter_sinogram", "fbp", "zero_filled"]

FILTERS = ("ramp", "shepp-logan", "cosine", "hamming", "hann")


def fourier_filter(size: int, filter_name: str = "ramp") -> np.ndarray:
    """The frequency response used by ``skimage.transform.iradon`` (ramp built in real space, then windowed)."""
    if filter_name not in FILTERS:
        raise ValueError(f"unknown FBP filter {filter_name!r}; use one of {', '.join(FILTERS)}")
    n = np.concatenate((np.arange(1, size / 2 + 1, 2, dtype=int), np.arange(size / 2 - 1, 0, -2, dtype=int)))
    f = np.zeros(size)
    f[0] = 0.25
    f[1::2] = -1 / (np.pi * n) ** 2
    filt = 2 * np.real(np.fft.fft(f))
    if filter_name == "shepp-logan":
        omega = np.pi * np.fft.fftfreq(size)[1:]
        filt[1:] *= np.sin(omega) / omega
    elif filter_name == "cosine":
        filt *= np.fft.fftshift(np.sin(np.linspace(0, np.pi, size, endpoint=False)))
    elif filter_name == "hamming":
        filt *= np.fft.fftshift(np.hamming(size))
    elif filter_name == "hann":
        filt *= np.fft.fftshift(np.hanning(size))
    return filt


def filter_sinogram(sinogram: torch.Tensor, filter_name: str = "ramp") -> torch.Tensor:
    """Filter ``(*batch, n_det, n_angles)`` sinograms along the detector axis (zero-padded FFT)."""
    n = sinogram.shape[-2]
    padded = max(64, int(2 ** math.ceil(math.log2(2 * n))))
    filt = torch.as_tensor(fourier_filter(padded, filter_name), dtype=sinogram.dtype, device=sinogram.device)
    spec = torch.fft.fft(sinogram, n=padded, dim=-2) * filt[:, None]
    return torch.fft.ifft(spec, dim=-2).real[..., :n, :]


def fbp(operator: ParallelBeamCT, sinogram: torch.Tensor, filter_name: str = "ramp") -> torch.Tensor:
    """Filtered back-projection, comparable with ``skimage.transform.iradon(..., circle=True)``.

    Parameters
    ----------
    operator : ParallelBeamCT
        CT (or PET: its Radon part is used after dividing out attenuation and sensitivity) operator.
    sinogram : torch.Tensor
        ``(*batch, n, n_angles)`` line integrals (post-log for CT).
    filter_name : str
        One of ``ramp``, ``shepp-logan``, ``cosine``, ``hamming``, ``hann``.
    """
    radon = getattr(operator, "radon", operator)
    if not isinstance(radon, ParallelBeamCT):
        raise ValueError(f"FBP needs a CT or PET operator, not {operator.modality}")
    s = sinogram.to(radon.device, radon.dtype)
    if radon is not operator:  # PET: undo attenuation and sensitivity before back-projecting
        w = operator._weights()
        # a bin with no weight (fully attenuated, dead detector) holds no activity information: 0, not b/1e-6
        s = s / w if isinstance(w, float) else torch.where(w > 1e-6, s / torch.clamp(w, min=1e-6), 0.0)
    return radon.adjoint(filter_sinogram(s, filter_name)) * (math.pi / (2 * radon.n_angles))  # 0 outside the FOV


def zero_filled(operator: LinearOperator, kspace: torch.Tensor) -> torch.Tensor:
    """Zero-filled reconstruction ``Aᴴ m`` (coil-combined with the maps for multi-coil MRI)."""
    if operator.modality != "mri":
        raise ValueError(f"zero filling is for MRI k-space, not {operator.modality}")
    return operator.adjoint(kspace)
