"""Forward models (operators) and noise models (likelihoods) for CT, MRI and PET.

Build them from JSON-like specs with :func:`build_operator` and :func:`build_likelihood`; a
measurement bundle stores exactly these specs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .base import LinearOperator, OperatorShapeError
from .ct import ParallelBeamCT, full_angles, limited_angle_angles, sparse_view_angles
from .likelihoods import GaussianLikelihood, Likelihood, PoissonLikelihood, TransmissionLikelihood
from .mri import CartesianMRI, centered_fft2, centered_ifft2
from .noise import post_log, simulate_measurement
from .pet import PETOperator, attenuation_factors
from .simple import Identity, Inpainting

__all__ = [
    "LinearOperator",
    "OperatorShapeError",
    "ParallelBeamCT",
    "CartesianMRI",
    "PETOperator",
    "Identity",
    "Inpainting",
    "Likelihood",
    "GaussianLikelihood",
    "PoissonLikelihood",
    "TransmissionLikelihood",
    "build_operator",
    "build_likelihood",
    "simulate_measurement",
    "post_log",
    "attenuation_factors",
    "centered_fft2",
    "centered_ifft2",
    "full_angles",
    "sparse_view_angles",
    "limited_angle_angles",
    "MODALITIES",
]

MODALITIES = ("ct", "mri", "pet", "denoise", "inpaint")


def _image_shape(spec: dict[str, Any]) -> tuple[int, ...]:
    shape = spec.get("image_shape")
    if shape is None:
        raise ValueError("operator spec lacks 'image_shape' (e.g. [256, 256])")
    try:
        shape = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise ValueError(f"operator 'image_shape' must be a list of integers, got {shape!r}") from None
    if len(shape) != 2 or min(shape) < 2:
        raise ValueError(f"operator 'image_shape' must be two integers ≥ 2, got {list(shape)}")
    return shape


def _require(spec: dict[str, Any], key: str, hint: str) -> Any:
    if spec.get(key) is None:
        raise ValueError(f"{spec.get('modality')} operator spec lacks '{key}': {hint}")
    return spec[key]


def build_operator(
    spec: dict[str, Any], device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> LinearOperator:
    """Build an operator from its spec (the inverse of ``operator.spec()``).

    Parameters
    ----------
    spec : dict
        ``modality`` ∈ {"ct", "mri", "pet", "denoise", "inpaint"}, ``image_shape`` and the
        modality's geometry: ``angles_deg`` (CT, PET); ``mask`` and optional ``coil_maps`` (MRI);
        optional ``attenuation`` and ``sensitivity_scale`` (PET); ``mask`` (inpaint). Arrays may
        be numpy arrays, tensors or nested lists.
    device, dtype
        Where and in which precision to build it.

    Returns
    -------
    LinearOperator
    """
    if not isinstance(spec, dict):
        raise ValueError(f"operator spec must be a dict, got {type(spec).__name__}")
    modality = str(spec.get("modality", "")).lower()
    if modality not in MODALITIES:
        raise ValueError(
            f"unknown modality {spec.get('modality')!r} in operator spec; use one of {', '.join(MODALITIES)}"
        )
    shape = _image_shape(spec)
    if modality in ("ct", "pet"):
        if shape[0] != shape[1]:
            raise ValueError(f"{modality} needs a square image_shape (n, n), got {list(shape)}")
        angles = _require(spec, "angles_deg", "list the projection angles in degrees")
        if modality == "ct":
            return ParallelBeamCT(shape[0], angles, device=device, dtype=dtype)
        return PETOperator(
            shape[0],
            angles,
            attenuation=spec.get("attenuation"),
            sensitivity_scale=float(spec.get("sensitivity_scale", 1.0)),
            device=device,
            dtype=dtype,
        )
    if modality == "mri":
        mask = np.asarray(_require(spec, "mask", "give the k-space sampling mask (H, W) or (W,)"))
        if mask.ndim == 1 and spec.get("coil_maps") is None:
            mask = np.broadcast_to(mask[None, :], shape)
        op = CartesianMRI(mask, spec.get("coil_maps"), device=device, dtype=dtype)
        if op.image_shape != shape:
            raise ValueError(f"MRI mask/coil maps are {op.image_shape} but image_shape says {list(shape)}")
        return op
    if modality == "inpaint":
        mask = np.asarray(_require(spec, "mask", "give the 0/1 mask of measured pixels"))
        if mask.shape != shape:
            raise ValueError(f"inpainting mask shape {mask.shape} does not match image_shape {list(shape)}")
        return Inpainting(mask, device=device, dtype=dtype)
    return Identity(shape, device=device, dtype=dtype)


def build_likelihood(noise: dict[str, Any] | None, device: str | torch.device = "cpu") -> Likelihood:
    """Build a likelihood from a noise spec.

    Parameters
    ----------
    noise : dict or None
        ``{"model": "gaussian", "sigma": s}`` (default when None: sigma 1),
        ``{"model": "poisson", "background": b}`` (PET counts) or
        ``{"model": "transmission", "I0": I0, "background": b}`` (low-dose CT counts).
    device : str or torch.device
        Where array-valued backgrounds live.
    """
    noise = dict(noise or {"model": "gaussian", "sigma": 1.0})
    model = str(noise.get("model", "gaussian")).lower()
    if model == "gaussian":
        return GaussianLikelihood(float(noise.get("sigma", 1.0)))
    if model == "poisson":
        return PoissonLikelihood(noise.get("background", 0.0), device=device)
    if model == "transmission":
        if noise.get("I0") is None:
            raise ValueError("transmission noise model lacks 'I0' (blank-scan photon count per detector bin)")
        return TransmissionLikelihood(float(noise["I0"]), noise.get("background", 0.0), device=device)
    raise ValueError(f"unknown noise model {model!r}; use 'gaussian', 'poisson' or 'transmission'")
