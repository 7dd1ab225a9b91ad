"""Running a volume: memory plan, slabs, intensity mapping, streaming updates, provenance.

:func:`stream_volume` is the generator the GUI iterates (its ``estimate`` grows as slabs and steps
complete); :func:`reconstruct_volume` consumes it (CLI, tests); :func:`run_slab` is the unit of work
the distributed runner sends to workers. A volume that fits the budget runs as one slab (its
denoiser calls chunked by the plan, results identical to unchunked); one that doesn't is refused
up front unless ``slab_slices`` is given (or ``"auto"``): then overlapping slabs of that many slices
run one after the other, each keeping only its core slices (``halo`` slices of overlap carry the
z-coupling across slab borders; with z-TV off the result is exactly the whole-volume one).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..samplers.base import SamplerParams, SamplingError
from .mbir import VolumeParams, VolumeProblem, live, mbir, raise_if_cancelled, recommended_volume_params
from .memory import MemoryPlan, Slab, detect_budget, parse_bytes, plan_memory, plan_slabs, plan_volume_slabs
from .study import VolumeStudy

__all__ = ["Slab", "plan_slabs", "intensity_for", "iter_slab", "run_slab", "VolumeUpdate", "VolumeResult",
           "stream_volume", "reconstruct_volume", "volume_provenance"]

_REFERENCE = {"ct": "fbp", "pet": "mlem", "mri": "zero_filled"}
# a fixed MLEM count for the intensity reference (the classical MLEM's own default now stops at the noise level,
# which would change every PET volume's mapping with the data; 50 is what the volume runs were made with)
_REFERENCE_PARAMS: dict[str, dict[str, int]] = {"mlem": {"iters": 50}}


def intensity_for(study: VolumeStudy, prior: Any, device: str | torch.device = "cpu") -> tuple[float, float, str]:
    """Image units from the prior's model units for the whole study (the same for every slab).

    The package's :func:`napari_diffrecon.reconstruct.intensity_mapping` on the study's classical
    reconstruction (FBP for CT, MLEM for PET, zero filling for MRI) over all slices, inside their field of view.
    """
    from ..baselines import reconstruct_baseline
    from ..reconstruct import intensity_mapping

    op = study.build_operator(device)
    method = _REFERENCE.get(op.modality, "cg")
    target = op.base if (method == "fbp" and op.data_weights is None) else op
    if method == "fbp" and target is op:
        method = "cg"
    ref = reconstruct_baseline(method, target, study.to_tensor(device), study.build_likelihood(device),
                               **_REFERENCE_PARAMS.get(method, {}))
    return intensity_mapping(study, prior, ref, support=op.base.support)  # each slice's field of view


def iter_slab(
    study: VolumeStudy,
    slab: Slab,
    prior: Any,
    params: SamplerParams,
    scale: float,
    offset: float,
    n_samples: int = 1,
    seed: int = 0,
    device: str = "cpu",
    memory_budget: int | str | None = None,
    ztv_scale: float = 1.0,
    cancel: Any = None,
    max_chunk_slices: int | None = None,
) -> Iterator[Any]:
    """Reconstruct one slab: yields its :class:`~napari_diffrecon.volume.VolumeIterate` s, then its result dict.

    The result (the last item) holds the slab's core: ``mean``, ``std`` (numpy ``(core, H, W)``)
    and ``info`` (residual, NFE, wall time, memory plan). Stop iterating to cancel, or set ``cancel``
    (a ``threading.Event``, checked between denoiser chunks) to raise
    :class:`~napari_diffrecon.volume.mbir.VolumeCancelled` from inside a step. ``max_chunk_slices`` caps the
    memory plan's denoiser chunk (smaller chunks: a cancel acts sooner, results are identical). The std is the raw
    per-voxel std of the magnitudes (2D runs pool it: ``RunSettings.std_pool``; volumes do not).
    """
    t0 = time.perf_counter()
    part = study.slab(slab.start, slab.stop)
    op = part.build_operator(device)
    op.z_offset = slab.start
    budget = parse_bytes(memory_budget) if memory_budget is not None else detect_budget(device)
    prior = prior.to(device)
    if hasattr(prior, "network"):  # volumes run the network in float32 (the memory plan assumes it)
        prior.precision = "float32"
    plan = plan_memory(op, prior, budget, n_samples)
    chunk = min(plan.chunk_slices, int(max_chunk_slices)) if max_chunk_slices else plan.chunk_slices
    op.max_batch = max(chunk // max(n_samples, 1), 1)
    problem = VolumeProblem(
        op, part.to_tensor(device), prior, part.build_likelihood(device), scale=scale, offset=offset,
        nonneg=op.modality == "pet",
    )
    run_params = _scaled(params, ztv_scale)
    last = None
    for it in mbir(problem, run_params, n_samples=n_samples, seed=seed, chunk_slices=chunk,
                   cancel=cancel):
        last = it
        yield it
        if run_params is not params:  # keep following live changes of the caller's params
            run_params.ztv = float(live(params, "ztv", 0.0)) * ztv_scale
    assert last is not None and last.done
    k0, k1 = slab.core_start - slab.start, slab.core_stop - slab.start
    x = last.x0_hat[:, k0:k1].detach().cpu()
    mean = x.mean(0)
    std = x.abs().std(0) if n_samples > 1 else torch.zeros(mean.shape)
    res = float(problem.residual(last.x0_hat.mean(0, keepdim=True))[0])
    yield {
        "mean": mean.numpy().astype(np.complex64 if mean.is_complex() else np.float32),
        "std": std.numpy().astype(np.float32),
        "info": {
            "slab": slab.to_dict(),
            "data_residual": res,
            "nfe": last.nfe,
            "wall_time_s": time.perf_counter() - t0,
            "memory_plan": plan.to_dict(),
        },
    }


def run_slab(*args: Any, callback: Any = None, **kw: Any) -> dict[str, Any]:
    """:func:`iter_slab` to the end; ``callback(iterate)`` sees every iterate. Returns the result dict."""
    result = None
    for item in iter_slab(*args, **kw):
        if isinstance(item, dict):
            result = item
        elif callback is not None:
            callback(item)
    assert result is not None
    return result


def _scaled(params: SamplerParams, factor: float) -> SamplerParams:
    """``params`` with the z-TV weight scaled (a copy; the original is followed live by run_slab)."""
    if factor == 1.0:
        return params
    import copy

    out = copy.copy(params)
    if hasattr(out, "ztv"):
        out.ztv = float(out.ztv) * factor
    else:
        out = VolumeParams(**{**params.to_dict(), "ztv": float(live(params, "ztv", 0.0)) * factor})
    return out


@dataclass
class VolumeUpdate:
    """A streamed state of a volume run.

    Attributes
    ----------
    estimate : np.ndarray
        ``(D, H, W)`` current estimate: finished slabs' cores, the running slab's current x0_hat, zeros elsewhere.
    done : np.ndarray
        ``(D,)`` bool, slices whose final value is in ``estimate``.
    slab : Slab
        The slab this update comes from.
    step, n_steps : int
        Progress within the slab.
    finished : bool
        True once, for the last update of the whole volume.
    """

    estimate: np.ndarray
    done: np.ndarray
    slab: Slab
    step: int
    n_steps: int
    finished: bool = False


@dataclass
class VolumeResult:
    """A reconstructed volume with per-voxel std over posterior samples and provenance."""

    reconstruction: np.ndarray
    std: np.ndarray
    provenance: dict[str, Any]
    residual: float
    slab_info: list[dict[str, Any]] = field(default_factory=list)

    def arrays(self) -> dict[str, np.ndarray]:
        """Arrays to write (magnitude reconstruction plus the complex one for MRI)."""
        cplx = np.iscomplexobj(self.reconstruction)
        mag = np.abs(self.reconstruction) if cplx else self.reconstruction
        out = {"reconstruction": mag.astype(np.float32), "std": self.std}
        if cplx:
            out["reconstruction_complex"] = self.reconstruction
        return out


def _order(slabs: list[Slab], focus: int | None) -> list[Slab]:
    if focus is None:
        return list(slabs)
    return sorted(slabs, key=lambda s: 0 if s.core_start <= focus < s.core_stop else
                  min(abs(focus - s.core_start), abs(focus - s.core_stop + 1)))


def stream_volume(
    study: VolumeStudy,
    prior: Any,
    params: SamplerParams | None = None,
    n_samples: int = 1,
    seed: int = 0,
    device: str = "cpu",
    memory_budget: int | str | None = None,
    slab_slices: int | str | None = None,
    halo: int | None = None,
    intensity: tuple[float, float] | None = None,
    check: dict[str, Any] | None = None,
    out: dict[str, Any] | None = None,
    cancel: Any = None,
    max_chunk_slices: int | None = None,
) -> Iterator[VolumeUpdate]:
    """Reconstruct a study slab by slab, yielding :class:`VolumeUpdate` as steps and slabs complete.

    Parameters
    ----------
    study : VolumeStudy
        What to reconstruct (checked with :func:`~napari_diffrecon.volume.study.check_study` first).
    prior : Prior
        The 2D prior.
    params : VolumeParams, optional
        Live parameters (default :func:`~napari_diffrecon.volume.recommended_volume_params` of the study's
        modality; ``ztv`` read every step; ``extra["focus_slice"]`` — the viewer's current
        slice — read before each slab, so the slab holding it runs next).
    memory_budget : int or str, optional
        Bytes or e.g. ``"16GB"``; default: 70% of the device's free memory.
    slab_slices : int or "auto", optional
        Slab size when the volume does not fit the budget (``"auto"``: the largest that fits).
    halo : int, optional
        Overlap slices per side (default 4 with z-TV, 0 without; see
        :func:`~napari_diffrecon.volume.memory.plan_volume_slabs`).
    intensity : (scale, offset), optional
        Model→image mapping; default from the study's classical reconstruction.
    check : dict, optional
        Keyword arguments of :func:`check_study` (``assume_spacing``, ``allow_anisotropic`` ...).
    out : dict, optional
        Filled with the :class:`VolumeResult` under ``"result"`` when the run finishes.
    cancel : threading.Event, optional
        Set it from another thread to stop the run within one denoiser chunk:
        :class:`~napari_diffrecon.volume.mbir.VolumeCancelled` is raised (the last yielded
        ``estimate`` holds what was computed).
    max_chunk_slices : int, optional
        At most this many slices per denoiser call (default: as many as the memory plan allows). A GUI on
        the CPU passes 1 so that a cancel acts within one slice's network call; the results are identical.
    """
    from .study import check_study

    params = params if params is not None else recommended_volume_params(study.modality)
    t0 = time.perf_counter()
    ztv = float(live(params, "ztv", 0.0))
    findings = check_study(study, ztv=ztv, **(check or {}))
    budget = parse_bytes(memory_budget) if memory_budget is not None else detect_budget(device)
    op = study.build_operator(device)
    prior = prior.to(device)
    if hasattr(prior, "network"):  # volumes run the network in float32 (the memory plan assumes it)
        prior.precision = "float32"
    d, h, w = op.image_shape
    plan: MemoryPlan | None
    slabs, halo, plan = plan_volume_slabs(op, prior, budget, n_samples, slab_slices, halo, ztv)
    scale, offset, how = (*intensity, "given") if intensity is not None else intensity_for(study, prior, device)
    dtype = np.complex64 if op.is_complex else np.float32
    estimate = np.zeros((d, h, w), dtype=dtype)
    std = np.zeros((d, h, w), dtype=np.float32)
    done = np.zeros(d, dtype=bool)
    infos, pending = [], list(slabs)
    while pending:
        raise_if_cancelled(cancel)
        focus = params.extra.get("focus_slice") if isinstance(params.extra, dict) else None
        slab = _order(pending, None if focus is None else int(focus))[0]
        pending.remove(slab)
        result = None
        k0, k1 = slab.core_start - slab.start, slab.core_stop - slab.start
        for item in iter_slab(study, slab, prior, params, scale, offset, n_samples, seed, device, budget,
                              findings["ztv_scale"], cancel, max_chunk_slices):
            if isinstance(item, dict):
                result = item
                continue
            estimate[slab.core_start : slab.core_stop] = item.x0_hat.mean(0)[k0:k1].detach().cpu().numpy()
            yield VolumeUpdate(estimate, done.copy(), slab, item.step, item.n_steps)
        assert result is not None
        estimate[slab.core_start : slab.core_stop] = result["mean"]
        std[slab.core_start : slab.core_stop] = result["std"]
        done[slab.core_start : slab.core_stop] = True
        infos.append(result["info"])
        yield VolumeUpdate(estimate, done.copy(), slab, result["info"]["nfe"], result["info"]["nfe"], not pending)
    op_full = study.build_operator(device)
    x = torch.from_numpy(estimate).to(device)
    from ..metrics import data_residual

    residual = float(data_residual(op_full, x[None], study.to_tensor(device), study.build_likelihood(device))[0])
    prov = volume_provenance(study, params, {
        "kind": "diffusion-volume",
        "sampler": "mbir",
        "prior": getattr(getattr(prior, "card", None), "name", type(prior).__name__),
        "n_samples": n_samples,
        "seed": seed,
        "device": str(device),
        "intensity_mapping": {"scale": scale, "offset": offset, "how": how},
        "checks": findings,
        "memory_budget": budget,
        "memory_plan": None if plan is None else plan.to_dict(),
        "slabs": [s.to_dict() for s in slabs],
        "halo": halo,
        "slab_runs": infos,
        "data_residual": residual,
        "wall_time_s": time.perf_counter() - t0,
    })
    if out is not None:
        out["result"] = VolumeResult(estimate, std, prov, residual, infos)


def volume_provenance(study: VolumeStudy, params: SamplerParams, extra: dict[str, Any]) -> dict[str, Any]:
    """Provenance of a volume result: input file and hash, operator summary, every parameter, versions."""
    from ..io.bundle import file_sha256

    spec = {k: v for k, v in study.operator.items() if not isinstance(v, (np.ndarray, torch.Tensor))}
    if "angles_deg" in spec:
        spec["n_angles"] = len(spec["angles_deg"])
    rec = {
        "software": "napari-diffrecon",
        "software_version": __version__,
        "torch_version": torch.__version__,
        "study": study.name,
        "measurement_file": str(Path(study.path).resolve()) if study.path else None,  # the user's file, not a link
        "measurement_sha256": file_sha256(study.path),
        **({"measurement_intensity": study.metadata["intensity"]}  # image units → native (HU), as 2D results record
           if isinstance((study.metadata or {}).get("intensity"), dict) else {}),
        "n_slices": study.n_slices,
        "spacing_mm": [float(v) for v in study.spacing_mm] if study.spacing_mm is not None else None,  # (dz, dy, dx):
        "slice_operator": spec,  # exports of the result are written at the study's voxel size
        "noise": {k: v for k, v in study.noise.items() if not isinstance(v, np.ndarray)},
        "params": params.to_dict(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    rec.update(extra)
    return json.loads(json.dumps(rec, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def reconstruct_volume(study: VolumeStudy, prior: Any, params: SamplerParams | None = None, callback: Any = None,
                       **kw: Any) -> VolumeResult:
    """Run :func:`stream_volume` to the end and return the :class:`VolumeResult` (``callback(update)`` per update)."""
    box: dict[str, Any] = {}
    for upd in stream_volume(study, prior, params, out=box, **kw):
        if callback is not None:
            callback(upd)
    if "result" not in box:
        raise SamplingError("the volume run ended without a result")
    res = box["result"]
    if not math.isfinite(res.residual):
        raise SamplingError("the volume run finished with a non-finite data residual")
    return res
