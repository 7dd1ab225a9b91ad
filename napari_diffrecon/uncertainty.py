"""Per-voxel summaries of posterior samples: mean, standard deviation, 95% interval."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["summarize"]


def summarize(samples: Any, interval: float = 0.95) -> dict[str, Any]:
    """Summarise posterior samples stacked on the first axis.

    Parameters
    ----------
    samples : array-like or torch.Tensor
        Shape ``(K, *image_shape)``; complex samples are summarised by magnitude.
    interval : float
        Central credible-interval mass, reported when there are at least 8 samples.

    Returns
    -------
    dict
        ``mean``, ``std`` (unbiased, 0 for one sample) and, for K ≥ 8, ``lower`` and ``upper``
        (per-voxel quantiles); same type as the input (numpy or torch).
    """
    is_torch = isinstance(samples, torch.Tensor)
    t = samples if is_torch else torch.as_tensor(np.asarray(samples))
    if t.ndim < 2:
        raise ValueError(f"samples must be stacked on the first axis, got shape {tuple(t.shape)}")
    if t.is_complex():
        t = t.abs()
    t = t.to(torch.float64) if not t.is_floating_point() else t
    k = t.shape[0]
    out = {"mean": t.mean(0), "std": t.std(0, unbiased=True) if k > 1 else torch.zeros_like(t[0]), "n_samples": k}
    if k >= 8:
        q = torch.tensor([(1 - interval) / 2, (1 + interval) / 2], dtype=t.dtype, device=t.device)
        lo, hi = torch.quantile(t, q, dim=0)
        out["lower"], out["upper"] = lo, hi
    if not is_torch:
        out = {key: (v.cpu().numpy() if isinstance(v, torch.Tensor) else v) for key, v in out.items()}
    return out
