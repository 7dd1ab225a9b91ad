"""Recommended sampler parameters per modality, tuned on ``benchmarks/recon.py`` (see its README table).

Starting points were the papers' defaults (DDS: 50 DDIM steps, η 0.85, 5 CG steps; DPS: ζ 0.3–1,
ancestral steps; Song 2022: CT λ ≈ 0.84, MRI λ = 1; MCG: λ 1 → 0.6). Step counts are cut for CPUs.
"""

from __future__ import annotations

from typing import Any

from .base import SamplerParams

__all__ = ["RECOMMENDED", "recommended_params"]

# method -> modality ("*" = any) -> parameter overrides of SamplerParams' defaults
RECOMMENDED: dict[str, dict[str, dict[str, Any]]] = {
    "dds": {"*": {"n_steps": 50, "eta": 0.85, "cg_iters": 5, "gamma": 1.0}},
    "dds-hot": {"*": {"n_steps": 20, "t0": 0.4, "eta": 0.85, "cg_iters": 5, "gamma": 1.0}},
    "dps": {"*": {"n_steps": 100, "eta": 1.0, "zeta": 0.5}},
    "mcg": {"*": {"n_steps": 100, "eta": 1.0, "zeta": 0.5, "lam": 1.0, "cg_iters": 5}},
    "song": {"ct": {"n_steps": 100, "lam": 0.84, "snr": 0.0, "cg_iters": 5},
             "*": {"n_steps": 100, "lam": 1.0, "snr": 0.0, "cg_iters": 5}},
}


def recommended_params(method: str, modality: str = "*", hot_start: bool = False, **overrides: Any) -> SamplerParams:
    """Tuned :class:`SamplerParams` for ``method`` on ``modality`` ("ct", "mri", "pet").

    Parameters
    ----------
    method : str
        A sampler name; unknown ones (e.g. unconditional samplers) get the plain defaults.
    modality : str
        The operator's modality.
    hot_start : bool
        Use the hot-start (CCDF) setting: fewer steps entered at ``t0`` from a classical image.
    **overrides
        Any :class:`SamplerParams` field, applied last.
    """
    key = f"{method}-hot" if hot_start and f"{method}-hot" in RECOMMENDED else method
    table = RECOMMENDED.get(key, {})
    values = dict(table.get("*", {}))
    values.update(table.get(modality, {}))
    if hot_start and "t0" not in values:
        values["t0"] = 0.4
    values.update(overrides)
    return SamplerParams(**values)
