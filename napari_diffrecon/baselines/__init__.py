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
    "BASELINE_DEFAULTS",
    "BASELINE_PARAMS",
    "TV_DEFAULT_WEIGHT",
    "tv_default_weight",
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


#: The parameters each method reads from ``baseline_params`` (TV's weight absolute, ``lam``, or relative to the
#: data, ``lam_rel``): the workbench shows these rows, the CLI refuses the others' flags.
BASELINE_PARAMS: dict[str, tuple[str, ...]] = {
    "fbp": ("filter",),
    "zero_filled": (),
    "cg": ("iters",),
    "tv": ("iters", "lam", "lam_rel"),
    "mlem": ("iters",),
    "osem": ("iters", "subsets"),
}


#: Each method's default parameters, in one place (the CLI, the workbench and the provenance read them here).
#: MLEM / OSEM iterations "auto": stop at the first iteration whose data residual reaches the noise floor (Morozov's
#: discrepancy principle; at most ``AUTO_MAX_ITERS``): a fixed count is wrong either way — 50 MLEM iterations fit the
#: noise of low-count data (6.4 dB on the shipped PET sample, where the noise level is reached at 10: 15.1 dB).
BASELINE_DEFAULTS: dict[str, dict[str, Any]] = {
    "fbp": {"filter": "ramp"},
    "zero_filled": {},
    "cg": {"iters": 20, "damp": 0.0},
    "tv": {"iters": 1000},  # lam_rel: TV_DEFAULT_WEIGHT by modality
    "mlem": {"iters": "auto"},
    "osem": {"iters": "auto", "subsets": 6},
}
AUTO_MAX_ITERS = {"mlem": 200, "osem": 40}
#: TV's default relative weight (``lam_rel``) by modality, from the benchmark's converged TV on real images (its weight
#: grids, benchmarks/results/recon.md): CT 5e-4 (23 / 8 views, limited angle, low dose: 5e-4 / 1e-3 / 2.5e-4 / 5e-4),
#: PET 0.016, MRI single coil 0.1 (0.128, 0.128, 0.064 best on its three tasks), multi-coil 0.016. One 0.002 for all
#: gave PET 7.7 dB where 0.016 gives 18.5, MRI 4× 18.8 where 0.128 gives 23.1.
TV_DEFAULT_WEIGHT = {"ct": 5e-4, "pet": 0.016, "mri": 0.1, "mri-multicoil": 0.016}
#: FBP's default filter by modality: PET's counts are too few for the ramp (benchmark task pet-low, metrics.psnr: ramp
#: −1.45 dB, Hamming 6.40, Hann 7.09 against the truth), as clinical PET FBP apodises.
FBP_DEFAULT_FILTER = {"ct": "ramp", "pet": "hann"}


def reconstruct_baseline(
    method: str,
    operator: LinearOperator,
    measurement: torch.Tensor,
    likelihood: Likelihood | None = None,
    info: dict[str, Any] | None = None,
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
        the Poisson background (randoms + scatter) is modelled by MLEM/OSEM and subtracted from the data for
        FBP/CG/TV.
    info : dict, optional
        Filled with ``params`` (every parameter the method used, defaults included) and, for MLEM / OSEM,
        ``iters_run`` (the iterations taken) and ``stopped_at_noise_floor``.
    **params
        ``filter`` (FBP, default "ramp", for PET "hann"); ``iters`` (CG 20, TV 1000, MLEM / OSEM "auto": up to
        the noise level); ``damp`` (CG, 0); ``lam`` / ``lam_rel`` (TV, default relative
        :data:`TV_DEFAULT_WEIGHT`); ``subsets`` (OSEM, 6); ``nonneg`` (TV; default on for CT/PET). See
        :data:`BASELINE_DEFAULTS`.

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
    if isinstance(likelihood, PoissonLikelihood) and method in ("fbp", "cg", "tv"):
        # the expected randoms + scatter are not activity: subtracted, as analytic PET reconstruction does
        # (MLEM/OSEM model them); without it FBP/CG/TV overestimate the activity by the background's share
        m = m - torch.as_tensor(likelihood.background, dtype=m.dtype, device=m.device)
    if "filter_name" in params:
        params = {**{k: v for k, v in params.items() if k != "filter_name"}, "filter": params["filter_name"]}
    p = {**BASELINE_DEFAULTS[method], **{k: v for k, v in params.items() if v is not None}}
    if method == "fbp" and params.get("filter") is None:
        p["filter"] = FBP_DEFAULT_FILTER.get(operator.modality, "ramp")
    if method == "tv" and p.get("lam") is None and p.get("lam_rel") is None:
        p["lam_rel"] = tv_default_weight(operator)
    if method == "tv":
        p.setdefault("nonneg", operator.modality in ("ct", "pet"))
    if str(p.get("iters")) == "auto" and method not in AUTO_MAX_ITERS:
        raise ValueError(f"{method}: iters 'auto' (stop at the noise level) is for MLEM / OSEM; give a number")
    _check_params(method, {k: v for k, v in params.items() if not (k == "iters" and v == "auto")}, operator)
    if info is not None:
        info["params"] = dict(p)
    # zero outside the operator's field of view (CT / PET), where nothing was measured: TV's and CG's values there
    # are free (the projector does not see them), EM's and FBP's are already zero
    return operator.restrict(_dispatch(method, operator, m, likelihood, p, info))


def _dispatch(method: str, operator: LinearOperator, m: torch.Tensor, likelihood: Likelihood | None,
              p: dict[str, Any], info: dict[str, Any] | None) -> torch.Tensor:
    if method == "fbp":
        return fbp(operator, m, p["filter"])
    if method == "zero_filled":
        return zero_filled(operator, m)
    if method == "cg":
        return cg_least_squares(operator, m, n_iter=int(p["iters"]), damp=float(p["damp"]))
    if method == "tv":
        lam = p.get("lam")
        return tv_reconstruct(operator, m, lam=None if lam is None else float(lam), n_iter=int(p["iters"]),
                              nonneg=bool(p["nonneg"]), lam_rel=float(p.get("lam_rel") or 0.0))
    return _em(method, operator, m, likelihood, p, info)


def tv_default_weight(operator: LinearOperator) -> float:
    """TV's default relative weight for ``operator`` (:data:`TV_DEFAULT_WEIGHT`; 0.002 for other modalities)."""
    modality = str(operator.modality)
    if modality == "mri" and int(getattr(operator, "n_coils", 0) or 0) > 1:
        modality = "mri-multicoil"
    return float(TV_DEFAULT_WEIGHT.get(modality, 0.002))


def _em(method: str, operator: LinearOperator, m: torch.Tensor, likelihood: Likelihood | None, p: dict[str, Any],
        info: dict[str, Any] | None) -> torch.Tensor:
    """MLEM / OSEM for a fixed number of iterations, or ("auto") until the data residual reaches the noise floor."""
    from ..metrics import data_residual, noise_floor

    if likelihood is None:  # EM is a Poisson method: counts without a background
        likelihood = PoissonLikelihood(0.0, device=m.device)
    bg = likelihood.background if isinstance(likelihood, PoissonLikelihood) else 0.0
    auto = p["iters"] == "auto"
    # the noise level of the data's own noise model (Poisson counts, or the Gaussian σ a bundle declares)
    floor = noise_floor(operator, m, likelihood) if auto else None
    state = {"k": 0, "stopped": False}

    def at_noise_level(k: int, x: torch.Tensor) -> bool:
        state["k"] = k
        if floor is not None and bool((data_residual(operator, x, m, likelihood) <= floor).all()):
            state["stopped"] = True  # a batch: when every item has reached it
        return state["stopped"]

    n_iter = AUTO_MAX_ITERS[method] if auto else int(p["iters"])
    if method == "mlem":
        x = mlem(operator, m, bg, n_iter=n_iter, callback=at_noise_level)
    else:
        x = osem(operator, m, bg, n_subsets=int(p["subsets"]), n_iter=n_iter, callback=at_noise_level)
    if info is not None:
        info["iters_run"] = state["k"]
        if auto:
            info["stopped_at_noise_floor"] = state["stopped"]
    return x


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
