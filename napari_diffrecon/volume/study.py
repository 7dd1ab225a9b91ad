"""Volume studies on disk: a stack of per-slice measurements with one 2D operator spec, and checks.

A study file (``.npz``) holds ``measurement`` ``(D, *slice_data_shape)``, ``operator`` (the JSON spec
of one slice's 2D operator, as in measurement bundles), ``noise``, ``metadata`` (JSON with
``spacing_mm = [dz, dy, dx]`` and ``orientation``), optional ``data_weights`` (per-slice masks /
attenuation factors), optional ``ground_truth`` ``(D, H, W)`` and ``format = "napari-diffrecon volume"``.
Reading validates everything and never unpickles (the bundle reader's helpers do the work).

:func:`check_study` and :func:`check_folder` refuse, before any work starts, what slice-wise
reconstruction cannot handle — missing or in-plane anisotropic spacing, very thick slices with
z-TV, non-axial stacks, folders mixing modalities or slice geometries — each with the fix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..io.bundle import (
    VOLUME_STUDY_FORMAT,
    BundleError,
    atomic_write,
    json_field,
    load_keys,
    resolve_arrays,
    split_arrays,
)
from .operators import SliceWiseOperator, build_volume_operator

__all__ = [
    "VolumeStudy",
    "VolumeInputError",
    "read_volume_study",
    "write_volume_study",
    "check_study",
    "check_folder",
    "find_studies",
    "simulate_ct_study",
    "simulate_mri_study",
    "simulate_pet_study",
    "simulate_study",
    "STUDY_FORMAT",
]

STUDY_FORMAT = VOLUME_STUDY_FORMAT
STUDY_SUFFIXES = (".npz",)


class VolumeInputError(ValueError):
    """A study or a folder of studies that slice-wise reconstruction cannot take as it is; says the fix."""


@dataclass
class VolumeStudy:
    """One volume's measurements with everything needed to rebuild its slice-wise forward model.

    Attributes
    ----------
    data : np.ndarray
        ``(D, *slice_data_shape)`` (complex for MRI).
    operator : dict
        Spec of one slice's 2D operator (:func:`napari_diffrecon.physics.build_operator`).
    noise : dict
        Noise model (``{"model": "gaussian", "sigma": ...}``, ``poisson``, ``transmission``).
    spacing_mm : tuple of float or None
        ``(dz, dy, dx)``: slice distance and in-plane pixel size.
    orientation : str or None
        Plane of the slices (``"axial"``, ``"coronal"``, ``"sagittal"``).
    data_weights : np.ndarray or None
        Per-slice data weights (MRI masks ``(D, H, W)``, PET attenuation ``(D, n, n_angles)``).
    ground_truth : np.ndarray or None
        ``(D, H, W)`` for simulated studies.
    metadata : dict
        Anything else (``intensity``, ``study_id`` ...).
    path : str or None
        Where it was read from.
    """

    data: np.ndarray
    operator: dict[str, Any]
    noise: dict[str, Any] = field(default_factory=dict)
    spacing_mm: tuple[float, float, float] | None = None
    orientation: str | None = "axial"
    data_weights: np.ndarray | None = None
    ground_truth: np.ndarray | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    path: str | None = None

    @property
    def n_slices(self) -> int:
        """Number of slices ``D``."""
        return int(self.data.shape[0])

    @property
    def name(self) -> str:
        """Study id: ``metadata["study_id"]`` or the file stem."""
        sid = self.metadata.get("study_id")
        if sid:
            return str(sid)
        return Path(self.path).name.split(".")[0] if self.path else "study"

    @property
    def modality(self) -> str:
        """The operator's modality."""
        return str(self.operator.get("modality", "")).lower()

    def build_operator(self, device: str | torch.device = "cpu", max_batch: int | None = None) -> SliceWiseOperator:
        """The slice-wise forward model on ``device``."""
        try:
            return build_volume_operator(self.operator, self.n_slices, self.data_weights, device, max_batch=max_batch)
        except ValueError as e:
            raise VolumeInputError(f"{self.name}: operator: {e}") from None

    def build_likelihood(self, device: str | torch.device = "cpu"):
        """The noise model (array backgrounds ``(D, ...)`` broadcast over the volume)."""
        from ..physics import build_likelihood

        try:
            return build_likelihood(self.noise, device=device)
        except ValueError as e:
            raise VolumeInputError(f"{self.name}: noise: {e}") from None

    def to_tensor(self, device: str | torch.device = "cpu") -> torch.Tensor:
        """The measurement as a tensor (complex64 or float32)."""
        d = self.data.astype(np.complex64 if np.iscomplexobj(self.data) else np.float32)
        return torch.from_numpy(d).to(device)

    def slab(self, start: int, stop: int) -> VolumeStudy:
        """Slices ``start:stop`` as a study of their own (per-slice arrays cut along)."""
        if not 0 <= start < stop <= self.n_slices:
            raise ValueError(f"slab {start}:{stop} outside {self.name}'s {self.n_slices} slices")
        noise = dict(self.noise)
        bg = noise.get("background")
        if isinstance(bg, np.ndarray) and bg.ndim == self.data.ndim and bg.shape[0] == self.n_slices:
            noise["background"] = bg[start:stop]
        cut = (lambda a: None if a is None else a[start:stop])  # noqa: E731
        return replace(
            self, data=self.data[start:stop], noise=noise, data_weights=cut(self.data_weights),
            ground_truth=cut(self.ground_truth), metadata={**self.metadata, "slab": [start, stop]},
        )


def write_volume_study(study: VolumeStudy, path: str | Path, overwrite: bool = False) -> Path:
    """Write a study atomically (temp file + rename); refuses to overwrite unless ``overwrite``."""
    path = Path(path)
    if path.suffix not in STUDY_SUFFIXES:
        raise ValueError(f"volume studies are written as .npz files, not {path.suffix!r}")
    spec, noise, arrays = split_arrays(study.operator, study.noise)
    meta = dict(study.metadata)
    meta["spacing_mm"] = None if study.spacing_mm is None else [float(v) for v in study.spacing_mm]
    meta["orientation"] = study.orientation
    keys: dict[str, Any] = {
        "measurement": np.asarray(study.data),
        "operator": np.array(json.dumps(spec)),
        "noise": np.array(json.dumps(noise)),
        "metadata": np.array(json.dumps(meta, default=str)),
        "format": np.array(STUDY_FORMAT),
        **arrays,
    }
    if study.data_weights is not None:
        keys["data_weights"] = np.asarray(study.data_weights)
    if study.ground_truth is not None:
        keys["ground_truth"] = np.asarray(study.ground_truth)

    def writer(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **keys)

    atomic_write(path, writer, overwrite)
    return path


def read_volume_study(path: str | Path) -> VolumeStudy:
    """Read and validate a study file (see the module docstring); raises :class:`VolumeInputError`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"volume study {path} not found")
    try:
        keys = load_keys(path)
        fmt = keys.get("format")
        if fmt is None or str(np.asarray(fmt).item()) != STUDY_FORMAT:
            raise VolumeInputError(
                f"{path.name} is not a volume study (no format = {STUDY_FORMAT!r}); 2D measurement bundles are "
                "reconstructed with 'napari-diffrecon reconstruct', volumes are written with write_volume_study"
            )
        for k in ("measurement", "operator"):
            if k not in keys:
                raise VolumeInputError(f"{path.name}: lacks {k!r}")
        arrays = {k: np.asarray(v) for k, v in keys.items() if k in ("mask", "coil_maps", "attenuation", "background")}
        spec = resolve_arrays(json_field(keys["operator"], "operator") or {}, arrays)
        noise = json_field(keys.get("noise"), "noise") or {}
        if "background" in arrays and isinstance(noise.get("background"), dict):
            noise["background"] = arrays["background"]
        meta = json_field(keys.get("metadata"), "metadata") or {}
    except BundleError as e:
        raise VolumeInputError(str(e)) from None
    for k in ("measurement", "data_weights", "ground_truth"):
        if k in keys and np.asarray(keys[k]).dtype == object:
            raise VolumeInputError(f"{path.name}: {k}: object arrays are refused (untrusted file)")
    spacing = meta.pop("spacing_mm", None)
    study = VolumeStudy(
        data=np.asarray(keys["measurement"]),
        operator=spec,
        noise=noise,
        spacing_mm=None if spacing is None else tuple(float(v) for v in spacing),
        orientation=meta.pop("orientation", None),
        data_weights=None if keys.get("data_weights") is None else np.asarray(keys["data_weights"]),
        ground_truth=None if keys.get("ground_truth") is None else np.asarray(keys["ground_truth"]),
        metadata=meta,
        path=str(path),
    )
    _validate_arrays(study)
    return study


def _validate_arrays(study: VolumeStudy) -> None:
    name, data = study.name, study.data
    if not np.issubdtype(data.dtype, np.number):
        raise VolumeInputError(f"{name}: measurement must be numeric, got {data.dtype}")
    if not np.all(np.isfinite(data)):
        raise VolumeInputError(f"{name}: measurement contains NaN or Inf; remove or replace those entries")
    op = study.build_operator("cpu")
    if tuple(data.shape) != tuple(op.data_shape):
        raise VolumeInputError(
            f"{name}: measurement shape {data.shape} is not (n_slices, *slice data shape) = {op.data_shape}"
        )
    if study.ground_truth is not None and tuple(study.ground_truth.shape) != tuple(op.image_shape):
        raise VolumeInputError(f"{name}: ground_truth shape {study.ground_truth.shape} is not {op.image_shape}")
    model = str(study.noise.get("model", "gaussian")).lower()
    if model in ("poisson", "transmission") and np.any(data < 0):
        raise VolumeInputError(f"{name}: negative entries but the {model} noise model needs raw counts ≥ 0")
    study.build_likelihood("cpu")


def check_study(
    study: VolumeStudy,
    ztv: float = 0.0,
    max_ratio: float = 3.0,
    allow_anisotropic: bool = False,
    assume_spacing: tuple[float, float, float] | None = None,
) -> dict[str, Any]:
    """Refuse what slice-wise reconstruction cannot take; return the checks' findings for provenance.

    Parameters
    ----------
    study : VolumeStudy
        The study.
    ztv : float
        The z-TV weight the run will use (thick slices only matter when it is > 0).
    max_ratio : float
        Largest slice distance / pixel size accepted with z-TV.
    allow_anisotropic : bool
        Accept thicker slices anyway (the z-TV weight is then scaled by ``dx / dz``).
    assume_spacing : tuple, optional
        ``(dz, dy, dx)`` to use when the study has none.

    Returns
    -------
    dict
        ``spacing_mm``, ``z_ratio`` (dz/dx) and ``ztv_scale`` (factor applied to the z-TV weight).
    """
    _validate_arrays(study)
    name = study.name
    orient = (study.orientation or "axial").lower()
    if orient not in ("axial", "transverse", "transaxial"):
        raise VolumeInputError(
            f"{name}: the slices are {orient}, but the slice-wise operators model one acquisition per axial "
            "slice: reorder the stack so its first axis runs along the scanner axis (e.g. nibabel's "
            "as_closest_canonical, then put the S axis first), or set orientation='axial' if the slices are "
            "in fact the acquired planes"
        )
    spacing = study.spacing_mm if study.spacing_mm is not None else assume_spacing
    if spacing is None:
        raise VolumeInputError(
            f"{name}: no voxel spacing: store spacing_mm = (dz, dy, dx) in the study (write_volume_study), "
            "or pass assume_spacing=(dz, dy, dx) (CLI --spacing DZ DY DX) if you know it"
        )
    try:
        dz_mm, dy_mm, dx_mm = (float(v) for v in spacing)
    except (TypeError, ValueError):
        raise VolumeInputError(f"{name}: spacing_mm must be three numbers (dz, dy, dx), got {spacing!r}") from None
    if not all(np.isfinite(v) and v > 0 for v in (dz_mm, dy_mm, dx_mm)):
        raise VolumeInputError(f"{name}: spacing_mm must be positive, got {spacing!r}")
    if abs(dy_mm - dx_mm) > 0.01 * max(dx_mm, dy_mm):
        raise VolumeInputError(
            f"{name}: in-plane pixels are {dy_mm:g} × {dx_mm:g} mm, but the 2D priors and operators assume square "
            "pixels: resample the slices to square pixels first"
        )
    ratio = dz_mm / dx_mm
    scale = 1.0
    if ztv > 0 and ratio > 1.0 + 1e-6:
        if ratio > max_ratio and not allow_anisotropic:
            raise VolumeInputError(
                f"{name}: slices are {dz_mm:g} mm apart but pixels are {dx_mm:g} mm "
                f"(ratio {ratio:.1f} > {max_ratio:g}); "
                "z-TV assumes neighbouring slices look alike. Run slice by slice (ztv=0, CLI --ztv 0), or accept "
                "it with allow_anisotropic=True (CLI --allow-anisotropic; the z-TV weight is then scaled by dx/dz)"
            )
        scale = 1.0 / ratio
    return {"spacing_mm": [dz_mm, dy_mm, dx_mm], "z_ratio": ratio, "ztv_scale": scale}


def find_studies(folder: str | Path) -> list[Path]:
    """Study files in ``folder`` (``*.npz`` at the top level, sorted); hidden files are skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise VolumeInputError(f"{folder} is not a folder of studies")
    files = sorted(p for p in folder.iterdir() if p.suffix in STUDY_SUFFIXES and not p.name.startswith("."))
    if not files:
        raise VolumeInputError(f"no volume studies (*.npz) in {folder}")
    return files


def check_folder(
    folder: str | Path, allow_mixed: bool = False, **check_kw: Any
) -> list[tuple[Path, VolumeStudy, dict[str, Any]]]:
    """Read and check every study of a folder before any work starts.

    Raises :class:`VolumeInputError` listing every bad study (not just the first), and when the
    folder mixes modalities or slice geometries (one prior and one setting per run) unless
    ``allow_mixed``. Study ids must be unique (they name the outputs).
    """
    out, problems, groups, names = [], [], {}, {}
    for p in find_studies(folder):
        try:
            st = read_volume_study(p)
            info = check_study(st, **check_kw)
        except (VolumeInputError, FileNotFoundError) as e:
            problems.append(str(e) if p.name in str(e) or p.stem in str(e) else f"{p.name}: {e}")
            continue
        key = (st.modality, tuple(st.build_operator("cpu").base.image_shape), tuple(st.data.shape[1:]))
        groups.setdefault(key, []).append(p.name)
        if st.name in names:
            problems.append(f"{p.name}: study id {st.name!r} is also used by {names[st.name]}; ids name the outputs")
        names[st.name] = p.name
        out.append((p, st, info))
    if problems:
        raise VolumeInputError(f"{len(problems)} of the studies in {folder} cannot be run:\n  " + "\n  ".join(problems))
    if len(groups) > 1 and not allow_mixed:
        desc = "; ".join(
            f"{len(v)} × {k[0]} {k[1][0]}×{k[1][1]} data {'×'.join(map(str, k[2]))} ({', '.join(v[:3])}"
            f"{', …' if len(v) > 3 else ''})"
            for k, v in groups.items()
        )
        raise VolumeInputError(
            f"{folder} mixes studies of different kinds: {desc}. Put each kind in its own folder (one prior and "
            "one setting per run), or pass allow_mixed=True (CLI --allow-mixed) to run each with its own geometry"
        )
    return out


def simulate_ct_study(
    volume: np.ndarray,
    n_views: int,
    noise_fraction: float = 0.01,
    spacing_mm: tuple[float, float, float] | None = (1.0, 1.0, 1.0),
    seed: int = 0,
    arc: float = 180.0,
    study_id: str | None = None,
    units: str = "auto",
) -> VolumeStudy:
    """A sparse-view parallel-beam CT study of a ``(D, n, n)`` volume, Gaussian noise relative to the data RMS.

    Parameters
    ----------
    volume : np.ndarray
        Ground-truth attenuation ``(D, n, n)``, or a CT volume in Hounsfield units (``units="HU"``, or "auto" with
        values below −500 present): it is then converted to attenuation relative to water, ``1 + HU/1000`` (≥ 0; HU
        as attenuation gave negative attenuation), and ``metadata["intensity"]`` records the mapping so that the
        workbench shows and exports the results in HU.
    n_views : int
        Views evenly spread over ``arc`` degrees.
    noise_fraction : float
        Noise σ as a fraction of the sinogram's RMS.
    spacing_mm : tuple or None
        ``(dz, dy, dx)``.
    """
    from ..physics import sparse_view_angles
    from ..simulate import is_hounsfield
    from .operators import volume_ct

    vol = _check_volume(volume, "simulate_ct_study").astype(np.float32)
    is_hu = is_hounsfield(vol, units)  # the 2D simulation's rule
    if is_hu:
        vol = np.clip(1.0 + vol / 1000.0, 0.0, None).astype(np.float32)
    angles = sparse_view_angles(int(n_views), arc=arc)
    op = volume_ct(vol.shape[0], vol.shape[1], angles)
    clean = op.forward(torch.from_numpy(vol)).numpy()
    sigma = float(noise_fraction * np.sqrt(np.mean(clean**2)))
    rng = np.random.default_rng(seed)
    data = (clean + sigma * rng.standard_normal(clean.shape)).astype(np.float32)
    st = _simulated(data, op, {"model": "gaussian", "sigma": max(sigma, 1e-8)}, spacing_mm, vol, None, study_id,
                    {"modality": "ct", "n_views": int(n_views), "arc": float(arc),
                     "noise_fraction": float(noise_fraction), "seed": int(seed), "units": "HU" if is_hu else units})
    if is_hu:  # image = scale · HU + offset, as a 2D measurement's metadata["intensity"]
        st.metadata["intensity"] = {"native_units": "HU", "scale": 1e-3, "offset": 1.0}
    return st


def _simulated(
    data: np.ndarray, op: SliceWiseOperator, noise: dict[str, Any], spacing_mm: tuple[float, float, float] | None,
    ground_truth: np.ndarray, data_weights: np.ndarray | None, study_id: str | None, options: dict[str, Any],
) -> VolumeStudy:
    """A simulated axial study; the simulation options are kept in ``metadata["simulated"]``."""
    meta: dict[str, Any] = {"simulated": options}
    if study_id:
        meta["study_id"] = study_id
    return VolumeStudy(data=data, operator=op.base.spec(), noise=noise, spacing_mm=spacing_mm, orientation="axial",
                       data_weights=data_weights, ground_truth=ground_truth, metadata=meta)


def _check_volume(volume: np.ndarray, what: str) -> np.ndarray:
    vol = np.asarray(volume)
    if vol.ndim != 3 or vol.shape[1] != vol.shape[2]:
        raise ValueError(f"{what}: the volume must be (D, n, n) with square slices, got {vol.shape}; crop or pad "
                         "the slices to squares first")
    if not np.all(np.isfinite(vol)):
        raise ValueError(f"{what}: the volume contains NaN or Inf")
    return vol


def simulate_mri_study(
    volume: np.ndarray,
    acceleration: float = 4.0,
    n_coils: int = 1,
    noise_fraction: float = 0.01,
    spacing_mm: tuple[float, float, float] | None = (1.0, 1.0, 1.0),
    seed: int = 0,
    mask_kind: str = "random",
    phase: bool = True,
    study_id: str | None = None,
) -> VolumeStudy:
    """A 2D multi-slice Cartesian MRI study of a ``(D, n, n)`` volume: each slice has its own mask.

    Every slice is sampled by its own random (or equispaced) column mask of the same acceleration, drawn
    with seed ``seed + k``, as a multi-slice acquisition would; coil sensitivities (when ``n_coils > 1``)
    are shared by the slices. Complex Gaussian noise of σ = ``noise_fraction`` × the RMS of the
    sampled k-space is added where k-space is sampled.

    Parameters
    ----------
    volume : np.ndarray
        ``(D, n, n)`` magnitude (real) or complex image.
    acceleration : float
        Undersampling factor of every slice's mask.
    n_coils : int
        Receive coils (1 = single coil).
    noise_fraction : float
        Noise σ relative to the RMS of the sampled k-space values.
    spacing_mm : tuple or None
        ``(dz, dy, dx)``.
    seed : int
        Seed of masks, phase, coil maps and noise.
    mask_kind : str
        ``"random"``, ``"equispaced"`` or ``"poisson"`` (:func:`napari_diffrecon.physics.masks.make_mask`).
    phase : bool
        Give a real volume a smooth phase (the same for every slice), as MR images have.
    study_id : str, optional
        Study id (names the outputs).

    Returns
    -------
    VolumeStudy
        Data ``(D, n, n)`` (or ``(D, C, n, n)`` with coils), the per-slice masks as ``data_weights``,
        the complex ground truth.
    """
    from ..physics.coils import simulate_coil_maps
    from ..physics.masks import make_mask
    from .operators import volume_mri

    vol = _check_volume(volume, "simulate_mri_study")
    d, n = vol.shape[0], vol.shape[1]
    if not np.iscomplexobj(vol) and phase:
        yy, xx = np.mgrid[:n, :n] / n - 0.5
        coef = np.random.default_rng(seed + 1).uniform(-1, 1, 3)
        ph = np.tensordot(coef, np.stack([yy, xx, yy * xx]), 1) * np.pi / 2
        vol = vol * np.exp(1j * ph)[None]
    x = vol.astype(np.complex64)
    masks = np.stack([make_mask(mask_kind, (n, n), float(acceleration), seed=seed + k) for k in range(d)])
    masks = masks.astype(np.float32)
    maps = simulate_coil_maps((n, n), int(n_coils), seed=seed) if n_coils and int(n_coils) > 1 else None
    op = volume_mri(masks, maps)
    with torch.no_grad():
        clean = op.forward(torch.from_numpy(x)).numpy()
    sampled = np.broadcast_to(np.asarray(op.data_weights.cpu().numpy()) != 0, clean.shape)
    sigma = float(noise_fraction * np.sqrt(np.mean(np.abs(clean[sampled]) ** 2))) if sampled.any() else 0.0
    rng = np.random.default_rng(seed)
    noise = (rng.standard_normal(clean.shape) + 1j * rng.standard_normal(clean.shape)) * sampled
    data = (clean + sigma * noise).astype(np.complex64)
    return _simulated(data, op, {"model": "gaussian", "sigma": max(sigma, 1e-8)}, spacing_mm, x, masks, study_id,
                      {"modality": "mri", "acceleration": float(acceleration), "n_coils": int(n_coils or 1),
                       "mask_kind": mask_kind, "noise_fraction": float(noise_fraction), "seed": int(seed)})


def simulate_pet_study(
    volume: np.ndarray,
    n_views: int = 180,
    counts_per_slice: float = 2e5,
    background_fraction: float = 0.2,
    spacing_mm: tuple[float, float, float] | None = (1.0, 1.0, 1.0),
    seed: int = 0,
    mu_per_mm: float = 0.0096,
    study_id: str | None = None,
) -> VolumeStudy:
    """A PET study of a ``(D, n, n)`` activity volume, slice by slice, with each slice's own attenuation.

    The attenuation map of slice ``k`` is water (μ = ``mu_per_mm`` per mm at 511 keV) inside that slice's
    body (activity above 5 % of the volume's maximum), so every slice has its own attenuation factors
    (``data_weights`` ``(D, n, n_views)``). The sensitivity is set so that the volume yields
    ``counts_per_slice × D`` expected true counts; a uniform background of ``background_fraction`` × the
    mean true count per bin is added and the counts are Poisson.

    Parameters
    ----------
    volume : np.ndarray
        ``(D, n, n)`` activity, ≥ 0.
    n_views : int
        Views evenly spread over 180°.
    counts_per_slice : float
        Expected true counts per slice on average.
    background_fraction : float
        Randoms/scatter background relative to the mean true count per bin.
    spacing_mm : tuple or None
        ``(dz, dy, dx)``; ``dx`` sets the attenuation per pixel (1 mm when None).
    seed : int
        Noise seed.
    mu_per_mm : float
        Linear attenuation coefficient of the body (water at 511 keV by default).
    study_id : str, optional
        Study id (names the outputs).

    Returns
    -------
    VolumeStudy
        Counts ``(D, n, n_views)``, Poisson noise with the background, per-slice attenuation factors.
    """
    from ..physics import attenuation_factors, sparse_view_angles
    from .operators import volume_pet

    vol = _check_volume(volume, "simulate_pet_study")
    if np.iscomplexobj(vol) or np.any(vol < 0):
        raise ValueError("simulate_pet_study: activity must be real and ≥ 0")
    act = vol.astype(np.float32)
    d, n = act.shape[0], act.shape[1]
    if not act.max() > 0:
        raise ValueError("simulate_pet_study: the volume has no activity")
    angles = sparse_view_angles(int(n_views))
    px = float(spacing_mm[2]) if spacing_mm is not None else 1.0
    body = act > 0.05 * float(act.max())
    att = np.stack([attenuation_factors(np.where(body[k], mu_per_mm * px, 0.0), angles) for k in range(d)])
    att = att.astype(np.float32)
    unit = volume_pet(d, n, angles, att)
    with torch.no_grad():
        total = float(unit.forward(torch.from_numpy(act)).sum())
    scale = float(counts_per_slice) * d / max(total, 1e-12)
    op = volume_pet(d, n, angles, att, sensitivity_scale=scale)
    with torch.no_grad():
        mean = op.forward(torch.from_numpy(act)).numpy()
    bg = float(background_fraction * mean.mean())
    rng = np.random.default_rng(seed)
    data = rng.poisson(np.clip(mean, 0, None) + bg).astype(np.float32)
    return _simulated(data, op, {"model": "poisson", "background": bg}, spacing_mm, act, att, study_id,
                      {"modality": "pet", "n_views": int(n_views), "counts_per_slice": float(counts_per_slice),
                       "background_fraction": float(background_fraction), "mu_per_mm": float(mu_per_mm),
                       "seed": int(seed)})


def simulate_study(volume: np.ndarray, modality: str, **options: Any) -> VolumeStudy:
    """A study of ``volume`` for ``modality``: :func:`simulate_ct_study`, :func:`simulate_mri_study` or
    :func:`simulate_pet_study` with ``options`` (each function's keyword arguments)."""
    makers = {"ct": simulate_ct_study, "mri": simulate_mri_study, "pet": simulate_pet_study}
    key = str(modality).lower()
    if key not in makers:
        raise ValueError(f"unknown modality {modality!r}; use ct, mri or pet")
    return makers[key](volume, **options)
