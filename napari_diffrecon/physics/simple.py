"""Simple operators for tests and demos: denoising (identity) and inpainting (pixel mask)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .base import LinearOperator

__all__ = ["Identity", "Inpainting"]


class Identity(LinearOperator):
    """``A = I``: the denoising problem.

    Parameters
    ----------
    image_shape : tuple of int
        Shape of one image.
    complex_ : bool
        Complex images and data (e.g. to sample a 2-channel MRI prior unconditionally).
    """

    modality = "denoise"

    def __init__(
        self,
        image_shape: tuple[int, ...],
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        complex_: bool = False,
    ) -> None:
        super().__init__(device=device, dtype=dtype)
        self.is_complex = bool(complex_)
        self.image_shape = tuple(int(s) for s in image_shape)
        self.data_shape = self.image_shape

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    def _adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return y.clone()

    def spec(self) -> dict[str, Any]:
        """Modality and image shape."""
        return {"modality": "denoise", "image_shape": list(self.image_shape)}


class Inpainting(LinearOperator):
    """``A x = M ⊙ x`` with a fixed 0/1 mask of measured pixels (data on the full grid).

    Parameters
    ----------
    mask : array-like
        1 where a pixel is measured, 0 where missing; its shape is the image shape.
    """

    modality = "inpaint"

    def __init__(self, mask: Any, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> None:
        super().__init__(device=device, dtype=dtype)
        m = torch.as_tensor(np.asarray(mask), device=self.device).to(dtype)
        if m.ndim < 1 or not torch.isfinite(m).all():
            raise ValueError("inpainting mask must be a finite array with the image's shape")
        self.mask = m
        self.image_shape = tuple(m.shape)
        self.data_shape = self.image_shape

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask

    def _adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return y * self.mask

    def spec(self) -> dict[str, Any]:
        """Modality, image shape and mask (numpy)."""
        return {"modality": "inpaint", "image_shape": list(self.image_shape), "mask": self.mask.cpu().numpy()}
