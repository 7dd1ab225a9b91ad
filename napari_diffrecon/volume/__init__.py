"""3D volumes from 2D priors: slice-wise operators, the DiffusionMBIR-style sampler, memory budgets, slabs,
studies on disk."""

from __future__ import annotations

from .mbir import VolumeIterate, VolumeParams, VolumeProblem, denoise_slices, mbir, slice_seed, volume_data_step
from .memory import MemoryPlan, VolumeMemoryError, detect_budget, parse_bytes, plan_memory
from .operators import SliceWiseOperator, build_volume_operator, volume_ct, volume_mri, volume_pet
from .run import (
    Slab,
    VolumeResult,
    VolumeUpdate,
    intensity_for,
    iter_slab,
    plan_slabs,
    reconstruct_volume,
    run_slab,
    stream_volume,
)
from .study import (
    VolumeInputError,
    VolumeStudy,
    check_folder,
    check_study,
    find_studies,
    read_volume_study,
    simulate_ct_study,
    write_volume_study,
)
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
    "Slab",
    "plan_slabs",
    "intensity_for",
    "iter_slab",
    "run_slab",
    "stream_volume",
    "reconstruct_volume",
    "VolumeUpdate",
    "VolumeResult",
    "VolumeStudy",
    "VolumeInputError",
    "read_volume_study",
    "write_volume_study",
    "check_study",
    "check_folder",
    "find_studies",
    "simulate_ct_study",
]
