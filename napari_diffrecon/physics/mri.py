"""Cartesian MRI: undersampled (multi-coil) Fourier sampling with the centred orthonormal FFT.

Convention: ``k = fftshift(fft2(ifftshift(x), norm="ortho"))`` over the last two axes, so the
k-space centre sits at index ``(H // 2, W // 2)`` and the transform is unitary. Measurements are
stored on the full Cartesian grid with zeros where nothing was sampled (fastMRI style).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .base import LinearOperator

__all__ = ["CartesianMRI", "centered_fft2", "centered_ifft2", "rss"]

_DIMS = (-2, -1)


def centered_fft2(x: torch.Tensor) -> torch.Tensor:
    """Centred, orthonormal 2D FFT over the last two axes."""
    return torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(x, dim=_DIMS), norm="ortho"), dim=_DIMS)


def centered_ifft2(k: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`centered_fft2` (also its adjoint: the transform is unitary)."""
    return torch.fft.fftshift(torch.fft.ifft2(torch.fft.ifftshift(k, dim=_DIMS), norm="ortho"), dim=_DIMS)


def rss(coil_images: torch.Tensor, dim: int = -3) -> torch.Tensor:
    """Root-sum-of-squares coil combination."""
    return torch.sqrt((coil_images.abs() ** 2).sum(dim=dim))


def _as_tensor(a: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a.to(device=device, dtype=dtype)
    return torch.as_tensor(np.asarray(a), device=device).to(dtype)


class CartesianMRI(LinearOperator):
    """``A x = M ⊙ F(S_c x)`` for each coil ``c``; single-coil when ``coil_maps`` is None.

    Parameters
    ----------
    mask : array-like
        Sampling mask, shape ``(H, W)``, or ``(W,)`` for a 1D mask selecting whole columns
        (phase-encode lines). Real, usually 0/1.
    coil_maps : array-like, optional
        Complex coil sensitivities ``(C, H, W)`` (SENSE). ``None`` for single-coil data.
    device : str or torch.device
        Where the operator lives.
    dtype : torch.dtype
        Real precision; images and data are the matching complex dtype.

    Notes
    -----
    Images are complex ``(*batch, H, W)``; data are ``(*batch, H, W)`` single-coil or
    ``(*batch, C, H, W)`` multi-coil.
    """

    modality = "mri"
    is_complex = True

    def __init__(
        self,
        mask: Any,
        coil_maps: Any = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(device=device, dtype=dtype)
        mask_t = _as_tensor(mask, dtype, self.device)
        if coil_maps is not None:
            maps = _as_tensor(coil_maps, self.image_dtype, self.device)
            if maps.ndim != 3:
                raise ValueError(f"coil_maps must have shape (C, H, W), got {tuple(maps.shape)}")
            shape = tuple(maps.shape[-2:])
        else:
            maps = None
            if mask_t.ndim != 2:
                raise ValueError(
                    f"a 1D mask of shape {tuple(mask_t.shape)} needs an image shape: pass a full (H, W) mask"
                )
            shape = tuple(mask_t.shape)
        if mask_t.ndim == 1:
            if mask_t.shape[0] != shape[1]:
                raise ValueError(f"1D mask has {mask_t.shape[0]} lines but images have {shape[1]} columns")
            mask_t = mask_t[None, :].expand(shape).contiguous()
        if tuple(mask_t.shape) != shape:
            raise ValueError(f"mask shape {tuple(mask_t.shape)} does not match the image shape {shape}")
        if not torch.isfinite(mask_t).all():
            raise ValueError("mask contains NaN or Inf")
        if maps is not None and not torch.isfinite(torch.view_as_real(maps)).all():
            raise ValueError("coil_maps contain NaN or Inf")
        self.mask = mask_t
        self.coil_maps = maps
        self.image_shape = shape
        self.n_coils = 0 if maps is None else int(maps.shape[0])
        self.data_shape = shape if maps is None else (self.n_coils, *shape)

    @property
    def acceleration(self) -> float:
        """Undersampling factor: grid size over the number of sampled locations."""
        return float(self.mask.numel() / max(float((self.mask != 0).sum()), 1.0))

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.coil_maps is not None:
            x = x[:, None] * self.coil_maps
        return centered_fft2(x) * self.mask

    def _adjoint(self, y: torch.Tensor) -> torch.Tensor:
        img = centered_ifft2(y * self.mask)
        if self.coil_maps is not None:
            img = (img * self.coil_maps.conj()).sum(dim=1)
        return img

    def spec(self) -> dict[str, Any]:
        """Modality, image shape, mask and coil maps (arrays as numpy)."""
        return {
            "modality": "mri",
            "image_shape": list(self.image_shape),
            "mask": self.mask.detach().cpu().numpy(),
            "coil_maps": None if self.coil_maps is None else self.coil_maps.detach().cpu().numpy(),
        }
