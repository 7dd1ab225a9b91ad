"""MLEM and OSEM for Poisson emission data (PET), with background; images stay non-negative."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..physics.base import LinearOperator

__all__ = ["mlem", "osem", "poisson_loglik", "view_subsets"]


def _bg(background: Any, like: torch.Tensor, index: Any = None) -> torch.Tensor | float:
    if background is None:
        return 0.0
    if isinstance(background, (int, float)):
        return float(background)
    b = torch.as_tensor(np.asarray(background) if not isinstance(background, torch.Tensor) else background)
    b = b.to(like.device, like.dtype)
    # a number or one value per detector bin applies to every view (as PoissonLikelihood.subset reads it)
    return b[..., index] if index is not None and b.ndim >= 1 and b.shape[-1] > 1 else b


def poisson_loglik(
    operator: LinearOperator, x: torch.Tensor, counts: torch.Tensor, background: Any = 0.0
) -> torch.Tensor:
    """``Σ m log(Ax + b) − (Ax + b)`` per item (constants dropped)."""
    ybar = torch.clamp(operator.forward(x) + _bg(background, counts), min=1e-12)
    r = counts * torch.log(ybar) - ybar
    return r.flatten(-len(operator.data_shape)).sum(-1)


def _check(operator: LinearOperator, counts: torch.Tensor) -> None:
    if operator.is_complex:
        raise ValueError("EM reconstruction needs a real, non-negative system model (PET or CT), not MRI")
    if (counts < 0).any() or not torch.isfinite(counts).all():
        raise ValueError("counts must be finite and non-negative for MLEM/OSEM")


def mlem(
    operator: LinearOperator,
    counts: torch.Tensor,
    background: Any = 0.0,
    n_iter: int = 50,
    x0: torch.Tensor | None = None,
    callback: Callable[[int, torch.Tensor], Any] | None = None,
) -> torch.Tensor:
    """Maximum-likelihood EM: ``x ← x / Aᵀ1 · Aᵀ(m / (A x + b))``.

    Monotone in the Poisson log-likelihood; pixels with zero sensitivity stay 0. ``callback(k, x)`` is called after
    each iteration; a true return value stops the iterations there (e.g. at the noise level).
    """
    counts = counts.to(operator.device, operator.dtype)
    _check(operator, counts)
    sens = operator.adjoint(torch.ones(operator.data_shape, device=operator.device, dtype=operator.dtype))
    safe = torch.clamp(sens, min=1e-12)
    x = torch.ones_like(operator.adjoint(counts)) if x0 is None else torch.clamp(x0.clone(), min=0)
    x = torch.where(sens > 0, x, torch.zeros_like(x))
    b = _bg(background, counts)
    for k in range(int(n_iter)):
        ybar = torch.clamp(operator.forward(x) + b, min=1e-12)
        x = x * operator.adjoint(counts / ybar) / safe
        x = torch.where(sens > 0, x, torch.zeros_like(x))
        if callback is not None and callback(k + 1, x):
            break
    return x


def view_subsets(operator: Any, n_subsets: int) -> list[tuple[np.ndarray, Any, torch.Tensor]]:
    """Interleaved view subsets of a CT/PET operator (views ``s, s+S, s+2S, …``): ``[(views, Aⱼ, Aⱼᵀ1), …]``.

    ``S`` is ``n_subsets`` clipped to 1 … number of views. Shared by :func:`osem` and the samplers' ordered-subsets
    EM data step.
    """
    n_views = int(operator.data_shape[-1])
    n_subsets = max(1, min(int(n_subsets), n_views))
    out = []
    for start in range(n_subsets):
        idx = np.arange(start, n_views, n_subsets)
        op = operator.subset(idx)
        out.append((idx, op, op.adjoint(torch.ones(op.data_shape, device=op.device, dtype=op.dtype))))
    return out


def osem(
    operator: LinearOperator,
    counts: torch.Tensor,
    background: Any = 0.0,
    n_subsets: int = 6,
    n_iter: int = 5,
    x0: torch.Tensor | None = None,
    callback: Callable[[int, torch.Tensor], Any] | None = None,
) -> torch.Tensor:
    """Ordered-subsets EM: MLEM updates over interleaved view subsets (``n_iter`` full passes).

    The operator must offer ``subset(index)`` (CT and PET operators do). ``callback(k, x)`` after each full pass; a
    true return value stops there.
    """
    if not hasattr(operator, "subset"):
        raise ValueError(f"OSEM needs an operator with view subsets (CT/PET), not {operator.modality}")
    counts = counts.to(operator.device, operator.dtype)
    _check(operator, counts)
    parts = view_subsets(operator, n_subsets)
    full_sens = operator.adjoint(torch.ones(operator.data_shape, device=operator.device, dtype=operator.dtype))
    x = torch.ones_like(operator.adjoint(counts)) if x0 is None else torch.clamp(x0.clone(), min=0)
    x = torch.where(full_sens > 0, x, torch.zeros_like(x))
    for k in range(int(n_iter)):
        for idx, op, s in parts:
            ybar = torch.clamp(op.forward(x) + _bg(background, counts, torch.as_tensor(idx)), min=1e-12)
            x_new = x * op.adjoint(counts[..., idx] / ybar) / torch.clamp(s, min=1e-12)
            x = torch.where(s > 0, x_new, x)  # a pixel this subset does not see keeps its value
        if callback is not None and callback(k + 1, x):
            break
    return x
