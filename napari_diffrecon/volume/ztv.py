"""Total variation along z and the ADMM data step of DiffusionMBIR (Chung et al., CVPR 2023).

The data step solves, for a volume ``x`` of shape ``(*batch, D, H, W)``,

    min_x  Q(x) + λ ‖D_z x‖₁,     Q(x) = ½ ⟨x, N x⟩ − Re⟨b, x⟩   (N Hermitian, positive)

with ``N``, ``b`` the normal operator and right-hand side of the sampler's quadratic data term
(e.g. ``N = I + γ̃ AᴴA``, ``b = x0_hat + γ̃ Aᴴm``). ADMM with the split ``w = D_z x`` and the
scaled dual ``u`` (both persist across diffusion steps, as in DiffusionMBIR):

    x ← CG[(N + ρ D_zᵀD_z) x = b + ρ D_zᵀ(w − u)]     (started at the current x)
    w ← soft(D_z x + u, λ/ρ)
    u ← u + D_z x − w

With λ = 0 there is no coupling: the step is CG on ``N x = b`` with per-slice inner products,
i.e. exactly the 2D data step applied to each slice independently. The conjugate gradient is the
project's one (:func:`napari_diffrecon.baselines.cg.conjugate_gradient`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..baselines.cg import conjugate_gradient

__all__ = ["dz", "dz_adjoint", "soft_threshold", "ZTVState", "admm_ztv", "ztv_objective", "mean_abs_dz"]


def dz(x: torch.Tensor) -> torch.Tensor:
    """Forward differences along z (axis −3): ``(D_z x)[k] = x[k+1] − x[k]``, shape ``(..., D−1, H, W)``."""
    return x[..., 1:, :, :] - x[..., :-1, :, :]


def dz_adjoint(g: torch.Tensor) -> torch.Tensor:
    """Adjoint of :func:`dz`: ``(D_zᵀ g)[k] = g[k−1] − g[k]`` with zero ends, shape ``(..., D, H, W)``."""
    pad = torch.zeros_like(g[..., :1, :, :])
    return torch.cat([pad, g], dim=-3) - torch.cat([g, pad], dim=-3)


def soft_threshold(v: torch.Tensor, t: float) -> torch.Tensor:
    """Proximal map of ``t‖·‖₁``: shrink magnitudes by ``t`` (complex values keep their phase)."""
    if t <= 0:
        return v
    if v.is_complex():
        mag = v.abs()
        return v * torch.clamp(1 - t / torch.clamp(mag, min=1e-30), min=0)
    return torch.sign(v) * torch.clamp(v.abs() - t, min=0)


def _re_dot(a: torch.Tensor, b: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    return (a.conj() * b).real.sum(dim=dims) if a.is_complex() else (a * b).sum(dim=dims)


def ztv_objective(
    normal: Callable[[torch.Tensor], torch.Tensor], rhs: torch.Tensor, x: torch.Tensor, lam: float
) -> torch.Tensor:
    """``½⟨x, N x⟩ − Re⟨b, x⟩ + λ‖D_z x‖₁`` per batch item (the data-step objective up to a constant)."""
    dims = (-3, -2, -1)
    q = 0.5 * _re_dot(x, normal(x), dims) - _re_dot(rhs, x, dims)
    return q + lam * dz(x).abs().sum(dim=dims)


@dataclass
class ZTVState:
    """ADMM variables that persist across diffusion steps: split ``w ≈ D_z x`` and scaled dual ``u``."""

    w: torch.Tensor | None = None
    u: torch.Tensor | None = None

    def reset(self) -> None:
        """Forget the split and the dual (e.g. when λ is switched to 0 mid-run)."""
        self.w = None
        self.u = None


def admm_ztv(
    normal: Callable[[torch.Tensor], torch.Tensor],
    rhs: torch.Tensor,
    x0: torch.Tensor,
    lam: float,
    rho: float = 1.0,
    cg_iters: int = 5,
    n_iter: int = 1,
    state: ZTVState | None = None,
) -> torch.Tensor:
    """ADMM iterations for ``Q(x) + λ‖D_z x‖₁`` (see the module docstring).

    Parameters
    ----------
    normal : callable
        ``v -> N v`` on volumes ``(*batch, D, H, W)``.
    rhs : torch.Tensor
        ``b``, same shape as the volume.
    x0 : torch.Tensor
        Starting volume (the denoised estimate in the sampler).
    lam : float
        z-TV weight λ (image units). ``0`` = independent slices (per-slice CG, no ADMM).
    rho : float
        ADMM penalty ρ (> 0).
    cg_iters : int
        CG iterations per x-update.
    n_iter : int
        ADMM iterations.
    state : ZTVState, optional
        Persistent ``w``, ``u``; updated in place (a fresh state starts from ``w = D_z x0``, ``u = 0``).

    Returns
    -------
    torch.Tensor
        The updated volume.
    """
    if lam <= 0:
        if state is not None:
            state.reset()
        if cg_iters <= 0:
            return x0
        return conjugate_gradient(normal, rhs, x0=x0, n_iter=cg_iters, n_core_dims=2)
    if rho <= 0:
        raise ValueError(f"the ADMM penalty rho must be positive, got {rho}")
    state = state if state is not None else ZTVState()
    x = x0
    if state.w is None or state.w.shape != dz(x0).shape:
        state.w = soft_threshold(dz(x0), lam / rho)
        state.u = torch.zeros_like(state.w)

    def system(v: torch.Tensor) -> torch.Tensor:
        return normal(v) + rho * dz_adjoint(dz(v))

    for _ in range(max(int(n_iter), 1)):
        b = rhs + rho * dz_adjoint(state.w - state.u)
        if cg_iters > 0:
            x = conjugate_gradient(system, b, x0=x, n_iter=cg_iters, n_core_dims=3)
        dx = dz(x)
        state.w = soft_threshold(dx + state.u, lam / rho)
        state.u = state.u + dx - state.w
    return x


def mean_abs_dz(x: torch.Tensor) -> torch.Tensor:
    """Mean ``|D_z x|`` per batch item: with ``x`` the error volume, the slice-consistency error."""
    return dz(x).abs().mean(dim=(-3, -2, -1))
