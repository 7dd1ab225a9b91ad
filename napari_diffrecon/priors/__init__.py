"""Diffusion priors: networks, noise schedules, model cards, training, shipped weights."""

from __future__ import annotations

from .card import CardError, ModelCard
from .prior import (
    GaussianPrior,
    NetworkPrior,
    Prior,
    channels_to_complex,
    complex_to_channels,
    load_prior_file,
    save_prior,
)
from .registry import default_prior_for, list_priors, load_prior
from .schedules import EDMSchedule, Schedule, VESchedule, VPSchedule, get_schedule

__all__ = [
    "CardError",
    "ModelCard",
    "Prior",
    "NetworkPrior",
    "GaussianPrior",
    "save_prior",
    "load_prior_file",
    "complex_to_channels",
    "channels_to_complex",
    "Schedule",
    "EDMSchedule",
    "VPSchedule",
    "VESchedule",
    "get_schedule",
    "list_priors",
    "load_prior",
    "default_prior_for",
]
