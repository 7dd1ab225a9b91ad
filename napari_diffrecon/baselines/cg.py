"""The project's one conjugate gradient (baselines, CG-SENSE, DDS data steps all use it)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..physics.base import LinearOperator

__all__ = ["conjugate_gradient", "cg_least_squares"]


def _dot(a: torch.Tensor, b: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Per-item ``<a, b> = Σ conj(a)·b`` (real part; the conjugate matters for complex data)."""
    return (a.conj() * b).real.sum(dim=dims, keepdim=True) if a.is_complex() else (a * b).sum(dim=dims, keepdim=True)


def conjugate_gradient(
    apply_normal: Callable[[torch.Tensor], torch.Tensor],
    rhs: torch.Tensor,
    x0: torch.Tensor | None = None,
    n_iter: int = 20,
    tol: float = 1e-6,
    n_core_dims: int = 2,
    callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Solve ``M x = rhs`` for Hermitian positive (semi-)definite ``M``, independently per batch item.

    Parameters
    ----------
    apply_normal : callable
        ``v -> M v`` on tensors shaped like ``rhs``.
    rhs : torch.Tensor
        Right-hand side ``(*batch, *core)``.
    x0 : torch.Tensor, optional
        Starting point (default zeros).
    n_iter : int
        Maximum iterations.
    tol : float
        Per-item stop when ``‖r‖ ≤ tol · ‖rhs‖``; converged items are frozen.
    n_core_dims : int
        Number of trailing axes forming one item (inner products run over them).
    callback : callable, optional
        ``callback(k, x, residual_norm)`` after each iteration.

    Returns
    -------
    torch.Tensor
        The approximate solution.

    Notes
    -----
    Inner products use ``conj(r)·r`` for complex data (one public DDS code forgets the conjugate).
    """
    dims = tuple(range(rhs.ndim - n_core_dims, rhs.ndim))
    x = torch.zeros_like(rhs) if x0 is None else x0.clone().to(rhs.dtype)
    r = rhs - apply_normal(x) if x0 is not None else rhs.clone()
    p = r.clone()
    rs = _dot(r, r, dims)
    stop = (tol * torch.sqrt(_dot(rhs, rhs, dims))) ** 2
    for k in range(int(n_iter)):
        active = rs > stop
        if not bool(active.any()):
            break
        ap = apply_normal(p)
        denom = _dot(p, ap, dims)
        alpha = torch.where(active & (denom > 0), rs / torch.where(denom > 0, denom, torch.ones_like(denom)), 0.0)
        x = x + alpha * p
        r = r - alpha * ap
        rs_new = _dot(r, r, dims)
        beta = torch.where(active, rs_new / torch.clamp(rs, min=torch.finfo(rs.dtype).tiny), 0.0)
        p = torch.where(active, r + beta * p, p)
        rs = torch.where(active, rs_new, rs)
        if callback is not None:
            callback(k + 1, x, torch.sqrt(rs).reshape(rs.shape[: rhs.ndim - n_core_dims]))
    return x


def cg_least_squares(
    operator: LinearOperator,
    m: torch.Tensor,
    n_iter: int = 30,
    damp: float = 0.0,
    x0: torch.Tensor | None = None,
    callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Least squares ``min ‖A x − m‖² + damp ‖x‖²`` by CG on the normal equations (CG-SENSE for multi-coil MRI).

    Parameters
    ----------
    operator : LinearOperator
        The forward model.
    m : torch.Tensor
        Measurements ``(*batch, *data_shape)``.
    n_iter : int
        CG iterations (early stopping regularises: 10–30 is typical for undersampled data).
    damp : float
        Tikhonov weight.
    x0 : torch.Tensor, optional
        Starting image.
    callback : callable, optional
        Passed to :func:`conjugate_gradient`.
    """
    rhs = operator.adjoint(m)

    def normal(v: torch.Tensor) -> torch.Tensor:
        return operator.normal(v) + damp * v if damp else operator.normal(v)

    return conjugate_gradient(
        normal, rhs, x0=x0, n_iter=n_iter, n_core_dims=len(operator.image_shape), callback=callback
    )
