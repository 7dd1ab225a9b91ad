"""Simulating measurements: Gaussian noise, Poisson emission counts, transmission counts.

Noise is drawn on the CPU from a seeded generator and then moved to the operator's device, so
a simulation is identical whatever the device.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .base import LinearOperator
from .likelihoods import _as_background

__all__ = ["simulate_measurement", "post_log", "validate_counts"]


def validate_counts(m: Any, what: str = "measurement") -> None:
    """Raise ``ValueError`` unless ``m`` holds finite, non-negative counts."""
    t = torch.as_tensor(m)
    if t.is_complex():
        raise ValueError(f"{what} holds complex values but photon counts must be real and non-negative")
    if not torch.isfinite(t).all():
        raise ValueError(f"{what} contains NaN or Inf; counts must be finite")
    if (t < 0).any():
        raise ValueError(
            f"{what} has negative entries (min {float(t.min()):.3g}); counts must be ≥ 0 — "
            "pass raw counts, not a post-log or background-subtracted sinogram"
        )


def simulate_measurement(
    operator: LinearOperator, x: torch.Tensor, noise: dict[str, Any], seed: int = 0
) -> torch.Tensor:
    """Simulate a noisy measurement of the image ``x``.

    Parameters
    ----------
    operator : LinearOperator
        The forward model.
    x : torch.Tensor
        Ground-truth image(s), shape ``(*batch, *image_shape)``.
    noise : dict
        ``{"model": "gaussian", "sigma": s}``, ``{"model": "poisson", "background": b}`` (emission
        counts ``Poisson(A x + b)``), ``{"model": "transmission", "I0": I0, "background": b}``
        (counts ``Poisson(I0 exp(−A x) + b)``), or ``{"model": "none"}``.
    seed : int
        Seed of the noise generator.

    Returns
    -------
    torch.Tensor
        The measurement on the operator's device.
    """
    model = str(noise.get("model", "gaussian")).lower()
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    with torch.no_grad():
        ax = operator.forward(x).detach()
    ax_cpu = ax.cpu()
    if model == "none":
        out = ax_cpu
    elif model == "gaussian":
        sigma = float(noise.get("sigma", 0.0))
        if sigma < 0 or not np.isfinite(sigma):
            raise ValueError(f"noise sigma must be finite and ≥ 0, got {sigma}")
        if ax_cpu.is_complex():
            n = torch.complex(
                torch.randn(ax_cpu.shape, generator=g, dtype=ax_cpu.real.dtype),
                torch.randn(ax_cpu.shape, generator=g, dtype=ax_cpu.real.dtype),
            )
            mask = getattr(operator, "mask", None)
            if mask is not None:  # k-space noise only where something was sampled
                n = n * (mask.cpu() != 0)
        else:
            n = torch.randn(ax_cpu.shape, generator=g, dtype=ax_cpu.dtype)
        out = ax_cpu + sigma * n
    elif model == "poisson":
        if (ax_cpu < -1e-6 * ax_cpu.abs().max()).any():
            raise ValueError("the image has negative activity: emission images must be ≥ 0")
        b = _as_background(noise.get("background", 0.0), "cpu", ax_cpu.dtype)
        out = torch.poisson(torch.clamp(ax_cpu, min=0) + b, generator=g)
    elif model == "transmission":
        i0 = float(noise["I0"])
        if not np.isfinite(i0) or i0 <= 0:
            raise ValueError(f"I0 must be a positive photon count, got {i0}")
        b = _as_background(noise.get("background", 0.0), "cpu", ax_cpu.dtype)
        out = torch.poisson(i0 * torch.exp(-ax_cpu) + b, generator=g)
    else:
        raise ValueError(f"unknown noise model {model!r}; use 'gaussian', 'poisson', 'transmission' or 'none'")
    return out.to(operator.device)


def post_log(counts: Any, I0: float, background: Any = 0.0, min_count: float = 0.5) -> torch.Tensor:  # noqa: N803
    """Line integrals ``−log((m − b) / I0)`` from transmission counts (the post-log sinogram).

    Counts at or below the background (photon starvation) are floored at ``min_count`` so the
    logarithm stays finite.
    """
    m = torch.as_tensor(counts)
    validate_counts(m, "counts")
    m = m.to(torch.float32) if not m.is_floating_point() else m
    b = _as_background(background, m.device, m.dtype)
    return -torch.log(torch.clamp(m - b, min=min_count) / float(I0))
