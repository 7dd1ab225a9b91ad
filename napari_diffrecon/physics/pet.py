"""PET: a Radon system model with attenuation and sensitivity, for Poisson count data.

``A x = s · a ⊙ R x`` with ``R`` the parallel-beam projector of :mod:`.ct` (one Radon, not two),
``a = exp(-R μ)`` the attenuation factors per line of response and ``s`` a sensitivity scale.
Counts follow ``m ~ Poisson(A x + b)`` with a mean background ``b`` (randoms + scatter) that
belongs to the likelihood (:class:`~napari_diffrecon.physics.likelihoods.PoissonLikelihood`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .base import LinearOperator
from .ct import ParallelBeamCT

__all__ = ["PETOperator", "attenuation_factors"]


def attenuation_factors(mu_map: Any, angles_deg: Any) -> np.ndarray:
    """Attenuation factors ``exp(-R μ)`` for an attenuation map given per pixel length.

    Parameters
    ----------
    mu_map : array-like
        Linear attenuation coefficients times the pixel size (dimensionless per pixel), ``(n, n)``.
    angles_deg : array-like
        Projection angles in degrees.

    Returns
    -------
    np.ndarray
        Factors in (0, 1], shape ``(n, n_angles)``.
    """
    mu = torch.as_tensor(np.asarray(mu_map, dtype=np.float32))
    if mu.ndim != 2 or mu.shape[0] != mu.shape[1]:
        raise ValueError(f"mu_map must be a square 2D image, got shape {tuple(mu.shape)}")
    if (mu < 0).any() or not torch.isfinite(mu).all():
        raise ValueError("mu_map must be finite and non-negative")
    radon = ParallelBeamCT(mu.shape[0], angles_deg)
    return torch.exp(-radon.forward(mu)).numpy()


class PETOperator(LinearOperator):
    """Emission tomography system model with attenuation factors and a sensitivity scale.

    Parameters
    ----------
    n : int
        Image side length.
    angles_deg : array-like
        Projection angles in degrees.
    attenuation : array-like, optional
        Attenuation factors in (0, 1], shape ``(n, n_angles)`` (see :func:`attenuation_factors`).
        ``None`` means no attenuation.
    sensitivity_scale : float
        Global scale (acquisition time × detector efficiency), counts per unit activity.
    device, dtype
        Where and in which precision the operator lives.
    """

    modality = "pet"

    def __init__(
        self,
        n: int,
        angles_deg: Any,
        attenuation: Any = None,
        sensitivity_scale: float = 1.0,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(device=device, dtype=dtype)
        self.radon = ParallelBeamCT(n, angles_deg, device=device, dtype=dtype)
        self.n = self.radon.n
        self.angles_deg = self.radon.angles_deg
        self.n_angles = self.radon.n_angles
        self.image_shape = self.radon.image_shape
        self.data_shape = self.radon.data_shape
        if not np.isfinite(sensitivity_scale) or sensitivity_scale <= 0:
            raise ValueError(f"sensitivity_scale must be a positive number, got {sensitivity_scale}")
        self.sensitivity_scale = float(sensitivity_scale)
        if attenuation is None:
            self.attenuation = None
        else:
            att = torch.as_tensor(np.asarray(attenuation), dtype=dtype, device=self.device)
            if tuple(att.shape) != self.data_shape:
                raise ValueError(
                    f"attenuation factors have shape {tuple(att.shape)} but the sinogram is {self.data_shape} "
                    "(n_det, n_angles)"
                )
            if not torch.isfinite(att).all() or (att < 0).any() or (att > 1 + 1e-6).any():
                raise ValueError("attenuation factors must be finite and in [0, 1] (they are exp(-∫μ))")
            self.attenuation = att

    def _weights(self) -> torch.Tensor | float:
        if self.attenuation is None:
            return self.sensitivity_scale
        return self.attenuation * self.sensitivity_scale

    @property
    def support(self) -> torch.Tensor:
        """The field of view of the projector (:attr:`ParallelBeamCT.support`)."""
        return self.radon.support

    def to(self, device: str | torch.device) -> PETOperator:
        """Move the operator (and its projector) to ``device``."""
        self.radon.to(device)
        if self.attenuation is not None:
            self.attenuation = self.attenuation.to(device)
        self.device = torch.device(device)
        return self

    def subset(self, index: Any) -> PETOperator:
        """The operator restricted to the views ``angles_deg[index]`` (for OSEM)."""
        att = None if self.attenuation is None else self.attenuation[:, index].cpu().numpy()
        sub = PETOperator(
            self.n, self.angles_deg[index], att, self.sensitivity_scale, device=self.device, dtype=self.dtype
        )
        sub.radon = self.radon.subset(index)  # rows cut from this projector's matrix when it is built
        return sub

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.radon._forward(x) * self._weights()

    def _adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return self.radon._adjoint(y * self._weights())

    def spec(self) -> dict[str, Any]:
        """Modality, geometry, attenuation factors (numpy) and sensitivity scale."""
        return {
            "modality": "pet",
            "image_shape": list(self.image_shape),
            "angles_deg": self.angles_deg.tolist(),
            "attenuation": None if self.attenuation is None else self.attenuation.detach().cpu().numpy(),
            "sensitivity_scale": self.sensitivity_scale,
        }
