"""Reverse-diffusion samplers: unconditional checks and posterior sampling for reconstruction."""

from __future__ import annotations

from .base import Iterate, Problem, SamplerParams, SamplingError, ddim_step, time_grid
from .methods import SAMPLERS, UNCONDITIONAL, get_sampler

__all__ = [
    "Iterate",
    "Problem",
    "SamplerParams",
    "SamplingError",
    "SAMPLERS",
    "UNCONDITIONAL",
    "get_sampler",
    "PARAMS_READ",
    "ddim_step",
    "time_grid",
]

#: The parameters each sampler reads (``SamplerParams`` fields and ``extra`` keys; every sampler also reads
#: ``prior_weight`` and, hot-started, ``t0``): the workbench shows these rows, the CLI refuses the others' flags.
PARAMS_READ: dict[str, tuple[str, ...]] = {
    "dds": ("n_steps", "eta", "renoise", "gamma", "cg_iters", "posterior_draw", "orientations", "adapt_steps",
            "adapt_lr", "adapt_every", "adapt_start"),
    "dps": ("n_steps", "eta", "zeta", "orientations", "adapt_steps", "adapt_lr", "adapt_every", "adapt_start"),
    "mcg": ("n_steps", "eta", "zeta", "lam", "cg_iters", "orientations"),
    "song": ("n_steps", "lam", "cg_iters", "snr", "orientations"),
    "consistency": ("n_steps", "gamma", "cg_iters", "orientations"),
    "ddim": ("n_steps", "eta"),
    "ddpm": ("n_steps",),
    "heun": ("n_steps",),
    "euler": ("n_steps",),
}
