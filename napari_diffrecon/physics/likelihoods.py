"""Likelihoods p(m | x): Gaussian, Poisson emission counts (PET) and transmission counts (low-dose CT).

Each likelihood gives the negative log-likelihood per batch item (summed over the measurement
axes, never across the batch) and its exact gradient with respect to the image; constants
independent of ``x`` (e.g. ``log m!``) are dropped. The Poisson forms stay finite where the
expected counts vanish: the mean is floored at ``eps``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import torch

from .base import LinearOperator

__all__ = ["Likelihood", "GaussianLikelihood", "PoissonLikelihood", "TransmissionLikelihood"]


def _per_item_sum(t: torch.Tensor, n_core: int) -> torch.Tensor:
    return t.sum(dim=tuple(range(t.ndim - n_core, t.ndim)))


def _as_background(b: Any, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor | float:
    if b is None:
        return 0.0
    if isinstance(b, (int, float)):
        if not np.isfinite(b) or b < 0:
            raise ValueError(f"background must be finite and non-negative, got {b}")
        return float(b)
    t = torch.as_tensor(np.asarray(b) if not isinstance(b, torch.Tensor) else b, device=device).to(dtype)
    if not torch.isfinite(t).all() or (t < 0).any():
        raise ValueError("background must be finite and non-negative everywhere")
    return t


class Likelihood(ABC):
    """Negative log-likelihood ``-log p(m | x)`` of a measurement given an image."""

    name: str = "likelihood"

    @abstractmethod
    def nll_forward(self, ax: torch.Tensor, m: torch.Tensor, n_core: int) -> torch.Tensor:
        """NLL per item given the noiseless forward projection ``ax = A x``."""

    @abstractmethod
    def grad_forward(self, ax: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """Gradient of the NLL with respect to ``A x`` (same shape as ``m``)."""

    def nll(self, operator: LinearOperator, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood of ``m`` given images ``x``, one value per batch item."""
        return self.nll_forward(operator.forward(x), m, len(operator.data_shape))

    def grad(self, operator: LinearOperator, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """Gradient of :meth:`nll` with respect to ``x`` (``Aᴴ`` of :meth:`grad_forward`)."""
        return operator.adjoint(self.grad_forward(operator.forward(x), m))

    @abstractmethod
    def spec(self) -> dict[str, Any]:
        """JSON-serialisable noise model (arrays as numpy)."""

    def to(self, device: str | torch.device) -> Likelihood:
        """Move tensors held by the likelihood to ``device``."""
        for name, value in list(vars(self).items()):
            if isinstance(value, torch.Tensor):
                setattr(self, name, value.to(device))
        return self


class GaussianLikelihood(Likelihood):
    """``m = A x + n`` with i.i.d. Gaussian ``n`` of standard deviation ``sigma``.

    For complex data ``sigma`` is the standard deviation of each real component, so the NLL is
    ``‖A x − m‖² / (2 σ²)`` in both cases.
    """

    name = "gaussian"

    def __init__(self, sigma: float = 1.0) -> None:
        if not np.isfinite(sigma) or sigma <= 0:
            raise ValueError(f"Gaussian noise sigma must be a positive number, got {sigma}")
        self.sigma = float(sigma)

    def nll_forward(self, ax: torch.Tensor, m: torch.Tensor, n_core: int) -> torch.Tensor:
        r = ax - m
        r2 = r.real**2 + r.imag**2 if r.is_complex() else r**2
        return _per_item_sum(r2, n_core) / (2 * self.sigma**2)

    def grad_forward(self, ax: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return (ax - m) / self.sigma**2

    def spec(self) -> dict[str, Any]:
        return {"model": "gaussian", "sigma": self.sigma}


class PoissonLikelihood(Likelihood):
    """Emission counts ``m ~ Poisson(A x + b)`` with mean background ``b`` (randoms + scatter).

    NLL ``Σ (ȳ − m log ȳ)`` with ``ȳ = max(A x + b, eps)``.
    """

    name = "poisson"

    def __init__(self, background: Any = 0.0, eps: float = 1e-8, device: str | torch.device = "cpu") -> None:
        self.background = _as_background(background, device, torch.float32)
        self.eps = float(eps)

    def mean(self, ax: torch.Tensor) -> torch.Tensor:
        """Expected counts ``ȳ`` (floored at ``eps``)."""
        return torch.clamp(ax + self.background, min=self.eps)

    def subset(self, index: Any) -> PoissonLikelihood:
        """The likelihood of the views ``index`` (the data's last axis), as ``operator.subset`` is the operator's:
        a background that varies along the views is restricted to them (ordered subsets)."""
        b = self.background
        if isinstance(b, torch.Tensor) and b.ndim >= 1 and b.shape[-1] > 1:
            b = b[..., torch.as_tensor(index, device=b.device)]
        out = PoissonLikelihood(eps=self.eps)
        out.background = b
        return out

    def nll_forward(self, ax: torch.Tensor, m: torch.Tensor, n_core: int) -> torch.Tensor:
        ybar = self.mean(ax)
        return _per_item_sum(ybar - m * torch.log(ybar), n_core)

    def grad_forward(self, ax: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        ybar = self.mean(ax)
        return 1.0 - m / ybar

    def spec(self) -> dict[str, Any]:
        b = self.background
        return {"model": "poisson", "background": b if isinstance(b, float) else b.detach().cpu().numpy()}


class TransmissionLikelihood(Likelihood):
    """Low-dose CT counts ``m ~ Poisson(I0 · exp(−A x) + b)`` (Beer–Lambert).

    Parameters
    ----------
    I0 : float
        Unattenuated photon count per detector bin (blank scan).
    background : float
        Mean additive counts (scatter, electronic noise), default 0.
    """

    name = "transmission"

    def __init__(self, I0: float, background: Any = 0.0, eps: float = 1e-8, device: str | torch.device = "cpu") -> None:  # noqa: N803
        if not np.isfinite(I0) or I0 <= 0:
            raise ValueError(f"I0 (blank-scan photon count) must be a positive number, got {I0}")
        self.I0 = float(I0)
        self.background = _as_background(background, device, torch.float32)
        self.eps = float(eps)

    def mean(self, ax: torch.Tensor) -> torch.Tensor:
        """Expected counts ``I0 exp(−A x) + b`` (floored at ``eps``)."""
        return torch.clamp(self.I0 * torch.exp(-ax) + self.background, min=self.eps)

    def nll_forward(self, ax: torch.Tensor, m: torch.Tensor, n_core: int) -> torch.Tensor:
        ybar = self.mean(ax)
        return _per_item_sum(ybar - m * torch.log(ybar), n_core)

    def grad_forward(self, ax: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        ybar = self.mean(ax)
        return (m / ybar - 1.0) * self.I0 * torch.exp(-ax)

    def spec(self) -> dict[str, Any]:
        b = self.background
        return {
            "model": "transmission",
            "I0": self.I0,
            "background": b if isinstance(b, float) else b.detach().cpu().numpy(),
        }
