"""Image-quality and data-fit metrics: PSNR, SSIM, NRMSE, normalised data residual."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .physics.base import LinearOperator

__all__ = ["psnr", "ssim", "nrmse", "data_residual"]


def _np(a: Any) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    a = np.asarray(a)
    return np.abs(a).astype(np.float64) if np.iscomplexobj(a) else a.astype(np.float64)


def _range(ref: np.ndarray, data_range: float | None) -> float:
    return float(data_range) if data_range is not None else float(ref.max() - ref.min()) or 1.0


def psnr(x: Any, ref: Any, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB (data range defaults to the reference's max − min)."""
    x, ref = _np(x), _np(ref)
    if x.shape != ref.shape:
        raise ValueError(f"image shape {x.shape} differs from reference shape {ref.shape}")
    mse = float(np.mean((x - ref) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(_range(ref, data_range) ** 2 / mse)


def ssim(x: Any, ref: Any, data_range: float | None = None) -> float:
    """Structural similarity (scikit-image's implementation, Gaussian-free 7×7 windows)."""
    from skimage.metrics import structural_similarity

    x, ref = _np(x), _np(ref)
    if x.shape != ref.shape:
        raise ValueError(f"image shape {x.shape} differs from reference shape {ref.shape}")
    return float(structural_similarity(x, ref, data_range=_range(ref, data_range)))


def nrmse(x: Any, ref: Any) -> float:
    """‖x − ref‖ / ‖ref‖."""
    x, ref = _np(x), _np(ref)
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def data_residual(operator: LinearOperator, x: torch.Tensor, m: torch.Tensor, likelihood: Any = None) -> torch.Tensor:
    """Normalised data residual per item (a 0-d tensor for a single image), in the data's own domain.

    - Gaussian (or no likelihood): ``‖A x − m‖ / ‖m‖``.
    - Poisson emission counts: ``‖(A x + b) − m‖ / ‖m‖`` (the expected counts include the background).
    - Transmission counts (low-dose CT): on the post-log sinogram, ``‖A x − ℓ‖ / ‖ℓ‖`` with
      ``ℓ = −log((m − b)/I0)`` (comparing line integrals with raw counts would be meaningless).

    A value near the ground truth's own residual (the noise floor) is a good fit; far below it
    means the noise is being fitted.
    """
    from .physics.likelihoods import PoissonLikelihood, TransmissionLikelihood
    from .physics.noise import post_log

    m = m.to(operator.device)
    ax = operator.forward(x)
    if isinstance(likelihood, TransmissionLikelihood):
        m = post_log(m, likelihood.I0, likelihood.background).to(ax.dtype)
    elif isinstance(likelihood, PoissonLikelihood):
        ax = ax + likelihood.background
    r = ax - m
    n = len(operator.data_shape)
    num = (r.abs() ** 2).flatten(-n).sum(-1).sqrt()
    den = (m.abs() ** 2).flatten(-n).sum(-1).sqrt().clamp(min=1e-30)
    return num / den.to(num.device)
