"""Hallucination guard: per-voxel maps of how well the measurements support a reconstruction.

Three maps, each in image units, and one combined score:

- ``std``: posterior standard deviation over the samples (where the prior, not the data, decides);
- ``residual``: the data residual back-projected to image space as the correction one step of the
  classical method would make (SIRT step ``Aᴴ W (A x − m) / Aᴴ W A 1`` for Gaussian / post-log data,
  MLEM step ``x · Aᴴ(1 − m/ȳ) / Aᴴ1`` for emission counts): where the data contradict the image;
- ``difference``: ``|x − x_classical|`` (what the prior added or removed relative to a classical
  reconstruction of the same data).

``score`` combines them after a little smoothing. Default (``normalise="median"``): each map is divided by its own
median over the voxels where it is non-zero ("times typical"), and ``score = sqrt(Σ w·map² / Σ w)``, so 1 is typical,
and the default threshold 3 flags voxels three times less supported than typical. ``normalise="range"`` divides by
the image's 1st–99th percentile range instead (score in fractions of the dynamic range). High score = weakly
supported by the measurements (look twice); ``mask = score > threshold``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = ["SupportMaps", "posterior_std", "residual_backprojection", "classical_difference", "support_maps"]

DEFAULT_WEIGHTS = {"std": 1.0, "residual": 1.0, "difference": 0.25}


@dataclass
class SupportMaps:
    """Per-voxel support maps (numpy, image shape) and the combined, thresholded score."""

    std: np.ndarray | None
    residual: np.ndarray | None
    difference: np.ndarray | None
    score: np.ndarray
    mask: np.ndarray
    threshold: float
    scale: float
    weights: dict[str, float] = field(default_factory=dict)
    norms: dict[str, float] = field(default_factory=dict)
    normalise: str = "median"

    def summary(self) -> dict[str, Any]:
        """Numbers for provenance: threshold, scale, weights and the flagged fraction."""
        return {
            "threshold": self.threshold,
            "scale": self.scale,
            "weights": self.weights,
            "normalise": self.normalise,
            "norms": self.norms,
            "flagged_fraction": float(self.mask.mean()),
        }


def _np(a: Any) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    return np.asarray(a)


def posterior_std(samples: Any) -> np.ndarray:
    """Per-voxel standard deviation over samples ``(S, *image_shape)`` (magnitude for complex; 0 for S = 1)."""
    s = _np(samples)
    if s.ndim < 2:
        raise ValueError(f"samples must be (n_samples, *image_shape), got shape {s.shape}")
    if s.shape[0] < 2:
        return np.zeros(s.shape[1:], np.float32)
    if np.iscomplexobj(s):
        return np.sqrt(s.real.var(0, ddof=1) + s.imag.var(0, ddof=1)).astype(np.float32)
    return s.std(0, ddof=1).astype(np.float32)


def residual_backprojection(operator: Any, x: Any, m: Any, likelihood: Any = None) -> np.ndarray:
    """The image-space correction the data ask for at ``x`` (magnitude), in image units.

    Gaussian data: one SIRT step ``|Aᴴ(A x − m)| / Aᴴ A 1``. Transmission counts: the same on the post-log
    sinogram with weights ∝ counts. Emission counts (PET): one MLEM step ``|x · Aᴴ(1 − m/ȳ)| / Aᴴ 1``.
    Voxels no measurement sees get 0 (nothing to contradict them — ``std`` covers them).
    """
    from .physics.likelihoods import PoissonLikelihood, TransmissionLikelihood
    from .physics.noise import post_log

    dev = operator.device
    xt = torch.as_tensor(_np(x)).to(dev)
    if not operator.is_complex and xt.is_complex():
        xt = xt.real
    mt = torch.as_tensor(_np(m)).to(dev)
    ones_img = torch.ones(operator.image_shape, dtype=operator.image_dtype, device=dev)
    if isinstance(likelihood, PoissonLikelihood):
        xt = torch.clamp(xt, min=0)
        ybar = likelihood.mean(operator.forward(xt))
        sens = operator.adjoint(torch.ones(operator.data_shape, dtype=operator.data_dtype, device=dev))
        g = xt * operator.adjoint(1 - mt / ybar) / torch.clamp(sens, min=1e-12 * float(sens.abs().max()))
        g = torch.where(sens > 1e-6 * float(sens.abs().max()), g, torch.zeros_like(g))
        return g.abs().cpu().numpy().astype(np.float32)
    w = None
    if isinstance(likelihood, TransmissionLikelihood):
        counts = torch.clamp(mt - likelihood.background, min=0.5)
        mt = post_log(mt, likelihood.I0, likelihood.background).to(operator.dtype)
        w = counts / counts.mean()
    r = operator.forward(xt) - mt
    num = operator.adjoint(r if w is None else r * w)
    a1 = operator.forward(ones_img)
    den = operator.adjoint(a1 if w is None else a1 * w).abs()
    peak = float(den.max())
    g = torch.where(den > 1e-6 * peak, num.abs() / torch.clamp(den, min=1e-12 * peak), torch.zeros_like(den))
    return g.cpu().numpy().astype(np.float32)


def classical_difference(x: Any, classical: Any) -> np.ndarray:
    """``|x − x_classical|`` per voxel (magnitudes for complex images)."""
    a, b = _np(x), _np(classical)
    if a.shape != b.shape:
        raise ValueError(f"reconstruction {a.shape} and classical reconstruction {b.shape} differ in shape")
    if np.iscomplexobj(a) or np.iscomplexobj(b):
        a, b = np.abs(a), np.abs(b)
    return np.abs(a - b).astype(np.float32)


def _smooth(a: np.ndarray, sigma_px: float) -> np.ndarray:
    if sigma_px <= 0:
        return a
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(a, sigma_px).astype(np.float32)


def support_maps(
    x: Any,
    operator: Any = None,
    measurement: Any = None,
    likelihood: Any = None,
    samples: Any = None,
    classical: Any = None,
    std: Any = None,
    weights: dict[str, float] | None = None,
    threshold: float | None = None,
    smooth_px: float = 1.0,
    scale: float | None = None,
    normalise: str = "median",
    std_pooled_px: float = 0.0,
) -> SupportMaps:
    """Combine the available maps into one support score with a threshold mask.

    Parameters
    ----------
    x : array-like
        The reconstruction (image shape; complex allowed).
    operator, measurement, likelihood
        Forward model, data and noise model for the residual map (all three, or none to skip it).
    samples : array-like, optional
        Posterior samples ``(S, *image_shape)`` for the std map (S ≥ 2).
    classical : array-like, optional
        A classical reconstruction of the same data (FBP, CG-SENSE, MLEM, TV) for the difference map.
    std : array-like, optional
        A posterior std map already computed (instead of ``samples``).
    weights : dict, optional
        Weights of ``std``, ``residual``, ``difference`` in the combination (default std 1, residual 1,
        difference 0.25: classical images carry their own noise and streaks).
    threshold : float, optional
        Flag voxels whose score exceeds it (default 3 for ``normalise="median"``: three times the typical value;
        0.1 for ``"range"``: a tenth of the dynamic range).
    smooth_px : float
        Gaussian smoothing (pixels) of each map before combining (speckle in the std of few samples).
    scale : float, optional
        The dynamic range for ``normalise="range"`` (default: 1st–99th percentile range of ``|x|``).
    normalise : {"median", "range"}
        How each map is made unitless before combining (see the module docstring).
    std_pooled_px : float
        How far a given ``std`` was already pooled (a run's ``RunSettings.std_pool``): the std map is then only
        smoothed by the rest, √(smooth_px² − std_pooled_px²), not twice.

    Returns
    -------
    SupportMaps
    """
    xa = _np(x)
    mag = np.abs(xa)
    if scale is None:
        lo, hi = np.percentile(mag, [1, 99])
        scale = float(max(hi - lo, 1e-12 * max(float(mag.max()), 1.0)))
    w = dict(DEFAULT_WEIGHTS, **(weights or {}))
    if samples is not None:
        std = posterior_std(samples)
    elif std is not None:
        std = _np(std).astype(np.float32)
    res = None
    if operator is not None and measurement is not None:
        res = residual_backprojection(operator, xa, measurement, likelihood)
    diff = classical_difference(xa, classical) if classical is not None else None
    if normalise not in ("median", "range"):
        raise ValueError(f"normalise must be 'median' or 'range', got {normalise!r}")
    if threshold is None:
        threshold = 3.0 if normalise == "median" else 0.1
    total = np.zeros(xa.shape, np.float32)
    used: dict[str, float] = {}
    norms: dict[str, float] = {}
    for name, arr in (("std", std), ("residual", res), ("difference", diff)):
        if arr is None or w.get(name, 0) <= 0:
            continue
        px = smooth_px
        if name == "std" and samples is None and std_pooled_px > 0:
            px = float(np.sqrt(max(smooth_px**2 - std_pooled_px**2, 0.0)))
        a = _smooth(arr, px)
        if normalise == "median":
            nz = a[a > 1e-12 * max(float(a.max()), 1e-30)]
            ref = float(np.median(nz)) if nz.size else 0.0
            if ref <= 0:  # an all-zero map (e.g. a noise-free exact fit): nothing to flag from it
                continue
        else:
            ref = scale
        total += w[name] * (a / ref) ** 2
        used[name] = w[name]
        norms[name] = ref
    if not used:
        raise ValueError("support_maps needs at least one of: samples (≥2) or std, operator+measurement, classical")
    if normalise == "median":
        total /= sum(used.values())
    score = np.sqrt(total).astype(np.float32)
    out = SupportMaps(std, res, diff, score, score > threshold, float(threshold), float(scale), used)
    out.norms = norms
    out.normalise = normalise
    return out
