"""3D volumes from 2D priors: slice-wise operators, the DiffusionMBIR-style sampler, memory budgets."""

from __future__ import annotations

from .mbir import VolumeIterate, VolumeParams, VolumeProblem, denoise_slices, mbir, slice_seed, volume_data_step
from .memory import MemoryPlan, VolumeMemoryError, detect_budget, parse_bytes, plan_memory
from .operators import SliceWiseOperator, build_volume_operator, volume_ct, volume_mri, volume_pet
from .ztv import ZTVState, admm_ztv, dz, dz_adjoint, mean_abs_dz, soft_threshold, ztv_objective

__all__ = [
    "SliceWiseOperator",
    "build_volume_operator",
    "volume_ct",
    "volume_mri",
    "volume_pet",
    "VolumeParams",
    "VolumeProblem",
    "VolumeIterate",
    "mbir",
    "slice_seed",
    "denoise_slices",
    "volume_data_step",
    "ZTVState",
    "admm_ztv",
    "dz",
    "dz_adjoint",
    "soft_threshold",
    "ztv_objective",
    "mean_abs_dz",
    "MemoryPlan",
    "VolumeMemoryError",
    "plan_memory",
    "parse_bytes",
    "detect_budget",
]
