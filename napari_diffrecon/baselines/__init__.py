"""Classical reconstructions: FBP, zero filling, CG / CG-SENSE, TV (PDHG), MLEM / OSEM.

They are comparisons for the diffusion samplers and their hot starts. Call them through
:func:`reconstruct_baseline`, which also turns low-dose CT counts into a post-log sinogram.
"""

from __future__ import annotations

from typing import Any

import torch

from .._checks import check_number
from ..physics.base import LinearOperator
from ..physics.likelihoods import Likelihood, PoissonLikelihood, TransmissionLikelihood
from ..physics.noise import post_log
from .cg import cg_least_squares, conjugate_gradient
from .em import mlem, osem, poisson_loglik
from .fbp import FILTERS, fbp, zero_filled
from .tv import operator_norm, tv_reconstruct

__all__ = [
    "BASELINES",
    "reconstruct_baseline",
    "conjugate_gradient",
    "cg_least_squares",
    "fbp",
    "zero_filled",
    "tv_reconstruct",
    "operator_norm",
    "mlem",
    "osem",
    "poisson_loglik",
    "FILTERS",
]

# method -> (modalities it applies to, one-line description)
BASELINES: dict[str, tuple[tuple[str, ...], str]] = {
    "fbp": (("ct", "pet"), "filtered back-projection (filter: ramp, shepp-logan, cosine, hamming, hann)"),
    "zero_filled": (("mri",), "zero-filled inverse FFT, coil-combined (Aᴴm)"),
    "cg": (("ct", "mri", "pet", "denoise", "inpaint"), "CG least squares / CG-SENSE (iters, damp)"),
    "tv": (("ct", "mri", "pet", "denoise", "inpaint"), "TV-regularised least squares by PDHG (lam, iters)"),
    "mlem": (("pet",), "maximum-likelihood EM (iters)"),
    "osem": (("pet",), "ordered-subsets EM (subsets, iters)"),
}


def reconstruct_baseline(
    method: str,
    operator: LinearOperator,
    measurement: torch.Tensor,
    likelihood: Likelihood | None = None,
    **params: Any,
) -> torch.Tensor:
    """Run a classical reconstruction.

    Parameters
    ----------
    method : str
        A key of :data:`BASELINES`.
    operator : LinearOperator
        The forward model.
    measurement : torch.Tensor
        The data (counts for low-dose CT and PET).
    likelihood : Likelihood, optional
        Noise model: transmission data are converted to post-log line integrals for FBP/CG/TV;
        the Poisson background is used by MLEM/OSEM.
    **params
        ``filter`` (FBP, default "ramp"); ``iters`` (CG 20, TV 300, MLEM 50, OSEM 5); ``damp``
        (CG, 0); ``lam`` / ``lam_rel`` (TV, default relative 0.002); ``subsets`` (OSEM, 6);
        ``nonneg`` (TV; default on for CT/PET).

    Returns
    -------
    torch.Tensor
        The image, ``operator.image_shape`` (complex for MRI).
    """
    method = method.lower()
    if method not in BASELINES:
        raise ValueError(f"unknown classical method {method!r}; use one of {', '.join(BASELINES)}")
    modalities = BASELINES[method][0]
    if operator.modality not in modalities:
        raise ValueError(f"{method} applies to {', '.join(modalities)} data, not {operator.modality}")
    m = measurement.to(operator.device)
    if isinstance(likelihood, TransmissionLikelihood) and method in ("fbp", "cg", "tv"):
        m = post_log(m, likelihood.I0, likelihood.background).to(operator.dtype)
    p = dict(params)
    _check_params(method, p, operator)
    if method == "fbp":
        return fbp(operator, m, p.pop("filter", p.pop("filter_name", "ramp")))
    if method == "zero_filled":
        return zero_filled(operator, m)
    if method == "cg":
        return cg_least_squares(operator, m, n_iter=int(p.pop("iters", 20)), damp=float(p.pop("damp", 0.0)))
    if method == "tv":
        nonneg = bool(p.pop("nonneg", operator.modality in ("ct", "pet")))
        lam = p.pop("lam", None)
        return tv_reconstruct(
            operator,
            m,
            lam=None if lam is None else float(lam),
            n_iter=int(p.pop("iters", 300)),
            nonneg=nonneg,
            lam_rel=float(p.pop("lam_rel", 0.002)),
        )
    bg = likelihood.background if isinstance(likelihood, PoissonLikelihood) else 0.0
    if method == "mlem":
        return mlem(operator, m, bg, n_iter=int(p.pop("iters", 50)))
    return osem(operator, m, bg, n_subsets=int(p.pop("subsets", 6)), n_iter=int(p.pop("iters", 5)))


def _check_params(method: str, params: dict[str, Any], operator: LinearOperator) -> None:
    """Refuse parameter values that would return garbage (NaN weights, no iterations) with a message saying why."""
    ctx = f"{method}: "
    check_number("iters", params.get("iters"), 1, integer=True, context=ctx)
    for name in ("damp", "lam", "lam_rel"):
        check_number(name, params.get(name), context=ctx)
    check_number("subsets", params.get("subsets"), 1, integer=True, context=ctx)
    if method == "osem" and params.get("subsets") is not None:
        n_views = int(operator.data_shape[-1])
        if int(params["subsets"]) > n_views:
            raise ValueError(f"osem: {params['subsets']} subsets of {n_views} views; use at most {n_views}")
