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
    "ddim_step",
    "time_grid",
]
