"""Simulate a measurement bundle from an image: CT (sparse-view, limited-angle, low-dose), MRI, PET."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from skimage.transform import resize

from ._checks import check_number
from .io.bundle import Measurement
from .physics import (
    CartesianMRI,
    ParallelBeamCT,
    PETOperator,
    attenuation_factors,
    limited_angle_angles,
    simulate_measurement,
    sparse_view_angles,
)
from .physics.coils import simulate_coil_maps
from .physics.ct import fov_mask
from .physics.masks import make_mask

__all__ = ["simulate_from_image", "activity_from_anatomy", "is_hounsfield", "hu_image", "pet_activity",
           "MU_WATER_PER_MM", "MU_WATER_511_PER_MM"]

MU_WATER_PER_MM = 0.02  # ~70 keV
MU_WATER_511_PER_MM = 0.0096


#: How a CT simulated from an image not in Hounsfield units got its HU (``metadata.intensity.assumed``).
ASSUMED_HU = ("the image declared no Hounsfield units and has no values below −500, so its 0.5–99.5 % intensity "
              "range was mapped to −1000 (air) … +1000 HU (bone): its results' HU are this mapping's, not a scanner's")


def _unit(img: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(img, [0.5, 99.5])
    return np.clip((img - lo) / max(hi - lo, 1e-12), 0, 1)


def is_hounsfield(image: np.ndarray, units: str) -> bool:
    """Whether an image is read as Hounsfield units: ``units="HU"``, or "auto" with values below −500 (air)."""
    return str(units).upper() == "HU" or (units == "auto" and float(np.min(image)) < -500)


def hu_image(image: np.ndarray, is_hu: bool) -> np.ndarray:
    """A CT image in HU: as it is when ``is_hu``, else its 0.5–99.5 % intensity range mapped to −1000 (air) …
    +1000 HU (bone) — the mapping :data:`ASSUMED_HU` describes."""
    return image if is_hu else _unit(image) * 2000.0 - 1000.0


def pet_activity(image: np.ndarray, is_hu: bool) -> np.ndarray:
    """A PET activity map from an image: a CT's tissues as an FDG-like uptake (:func:`activity_from_anatomy`; HU as
    activity would make bone the hottest), else the normalised intensity above 5 % (below: no activity)."""
    if is_hu:
        return activity_from_anatomy(image, "ct").astype(np.float64)
    body = _unit(image)
    return body * (body > 0.05)


def activity_from_anatomy(image: np.ndarray, kind: str, fwhm_px: float = 1.5) -> np.ndarray:
    """An FDG-like PET activity map in [0, 1] derived from a real anatomical image (for PET samples/benchmarks).

    Tissue classes by intensity, each given a typical relative uptake, then blurred by the scanner
    resolution. The structure (outlines, folding, texture) is the real image's; only the contrast is modelled.

    Parameters
    ----------
    image : np.ndarray
        2D image: ``kind="ct"`` in Hounsfield units (air < −500: none, lung 0.15, fat 0.3, soft tissue 1,
        bone 0.6 with marrow), ``kind="mr"`` a T1-weighted brain slice (CSF 0.1, grey matter 4, white matter 1,
        scalp/other 0.5; classes by the head's intensity percentiles).
    kind : {"ct", "mr"}
        Which kind of anatomical image ``image`` is.
    fwhm_px : float
        Gaussian blur (full width at half maximum, pixels) standing in for the PET resolution.

    Returns
    -------
    np.ndarray
        Activity, float32, scaled so its 99.5th percentile is 1.
    """
    from scipy import ndimage

    img = np.asarray(image, dtype=np.float64)
    if img.ndim != 2 or not np.all(np.isfinite(img)):
        raise ValueError("activity_from_anatomy needs a finite 2D image")
    if kind == "ct":
        act = np.select(
            [img < -500, img < -30, img < 150, img >= 150],
            [np.where(img < -900, 0.0, 0.15), 0.3 * (img >= -200) + 0.15 * (img < -200), 1.0, 0.6],
        )
    elif kind == "mr":
        u = _unit(img)
        head = ndimage.binary_fill_holes(ndimage.binary_opening(u > 0.08, iterations=2))
        inside = u[head]
        if inside.size < 16:
            raise ValueError("the MR image has no visible head (foreground) to derive uptake from")
        p_csf, p_wm = np.percentile(inside, [25, 75])
        gm_lo, gm_hi = p_csf + 0.15 * (p_wm - p_csf), p_wm - 0.1 * (p_wm - p_csf)
        act = np.where(u < gm_lo, 0.1, np.where(u < gm_hi, 4.0, 1.0)) * head
        act = np.where(head & (u < 0.05), 0.5, act)
    else:
        raise ValueError(f"kind must be 'ct' or 'mr', not {kind!r}")
    act = ndimage.gaussian_filter(act, fwhm_px / 2.355)
    return (act / max(float(np.percentile(act, 99.5)), 1e-12)).clip(0, None).astype(np.float32)


# More views than this many per image pixel are refused (π/2 per pixel already sample an image fully).
MAX_VIEWS_PER_PIXEL = 8


def _check_options(views, limited_angle, photons, coils, counts, noise_sigma, pixel_size_mm) -> None:
    """Refuse zero, negative or non-finite simulation options (they used to fall back to defaults silently); the MRI
    acceleration is checked by :func:`~napari_diffrecon.physics.masks.make_mask`."""
    check_number("views", views, 1, integer=True)
    check_number("limited_angle (degrees)", limited_angle, above=True)
    check_number("photons", photons, above=True)
    check_number("counts", counts, above=True)
    check_number("pixel_size_mm", pixel_size_mm, above=True)
    check_number("coils", coils, 1, integer=True)
    check_number("noise_sigma", noise_sigma)
    if noise_sigma is not None and float(noise_sigma) == 0:  # the bundle would be refused by every reader
        raise ValueError("noise_sigma must be above 0: a Gaussian likelihood needs σ > 0 (for nearly noise-free data "
                         "pass a small σ, e.g. 1e-4)")


#: The simulation options each modality uses.
OPTIONS_USED = {"ct": ("views", "limited_angle", "photons", "noise_sigma"), "mri": ("accel", "coils", "noise_sigma"),
                "pet": ("views", "limited_angle", "counts")}


def check_options_apply(modality: str, **options: Any) -> None:
    """Refuse options ``modality`` does not use (the CLI's flags: ``--photons`` with PET was ignored, and recorded
    as if it had been used); None values are unset options. :func:`simulate_from_image` itself ignores them and
    does not record them.

    Raises
    ------
    ValueError
        Naming the unused options and the ones the modality takes.
    """
    modality = modality.lower()
    uses = OPTIONS_USED.get(modality)
    if uses is None:
        return  # an unknown modality is refused below with its own message
    unused = [k for k, v in options.items() if v is not None and k not in uses]
    if options.get("photons") is not None and options.get("noise_sigma") is not None:
        unused.append("noise_sigma (low-dose CT's noise is the photon counts')")
    if unused:
        hint = {"ct": "CT takes views, limited_angle, photons (low dose) or noise_sigma",
                "mri": "MRI takes accel, coils and noise_sigma", "pet": "PET takes views, limited_angle and counts"}
        raise ValueError(f"{modality.upper()} does not use {', '.join(unused)}: {hint[modality]}")


def _to_square(img: np.ndarray, size: int, spacing: Any, fill: float | None = None) -> tuple[np.ndarray, bool]:
    """``img`` resized to ``size``² keeping its aspect ratio in mm (the pixel ``spacing``, when known): the longer
    side fills the square and the shorter is padded, centred, with ``fill`` (default the image's minimum: air,
    background; −1000 for HU) — a non-square image used to be stretched. Returns the image and whether it was
    padded."""
    sp = _spacing_pair(spacing)
    extent = np.asarray(img.shape, dtype=np.float64) * (np.ones(2) if sp is None else sp)
    target = tuple(int(max(1, round(size * e / extent.max()))) for e in extent)
    out = resize(img, target, anti_aliasing=True, preserve_range=True)
    if target == (size, size):
        return out, False
    pad = [((size - n) // 2, size - n - (size - n) // 2) for n in target]
    return np.pad(out, pad, constant_values=float(img.min()) if fill is None else float(fill)), True


def _pixel_size(shape: tuple[int, ...], size: int, pixel_size_mm: float | None, spacing: Any) -> float:
    """Pixel size in mm after resizing to ``size``²: given, from the input's spacing, or a 350 mm field of view."""
    if pixel_size_mm is not None:
        return float(pixel_size_mm)
    sp = _spacing_pair(spacing)
    if sp is None:
        return 350.0 / size
    return float(max(shape[0] * sp[0], shape[1] * sp[1]) / size)


def _spacing_pair(spacing: Any) -> np.ndarray | None:
    """An image's pixel spacing as ``(row, column)`` mm (one value: square pixels); None when not given."""
    sp = np.atleast_1d(np.asarray(spacing if spacing is not None else [], dtype=np.float64)).ravel()
    if sp.size == 0:
        return None
    sp = np.resize(sp[-2:], 2)
    if not (np.all(np.isfinite(sp)) and np.all(sp > 0)):
        raise ValueError(f"the image's pixel spacing must be positive numbers (mm), got {list(sp)}")
    return sp


def simulate_from_image(
    image: np.ndarray,
    modality: str,
    *,
    size: int = 128,
    views: int | None = None,
    limited_angle: float | None = None,
    photons: float | None = None,
    accel: float | None = None,
    coils: int | None = None,
    mask_kind: str = "random",
    counts: float | None = None,
    noise_sigma: float | None = None,
    units: str = "auto",
    pixel_size_mm: float | None = None,
    pixel_spacing_mm: Any = None,
    seed: int = 0,
    source: str | None = None,
    axes_ras: dict[str, Any] | None = None,
) -> Measurement:
    """Simulate measurements of a 2D image.

    Parameters
    ----------
    image : np.ndarray
        2D image; ``units="HU"`` (or "auto" with values below −500 present) is read as Hounsfield units; CT from
        an image in other units maps its 0.5–99.5 % range to −1000 … +1000 HU and says so
        (``metadata["intensity"]["assumed"]``).
    modality : {"ct", "mri", "pet"}
        What to simulate. PET from a CT image (HU) simulates an FDG-like uptake of its tissues
        (:func:`activity_from_anatomy`); from any other image, its normalised intensity is the activity. Options
        the modality does not use are refused.
    size : int
        Side length of the square image: the image is resized keeping its aspect ratio (in mm when
        ``pixel_spacing_mm`` is given), the longer side filling it, the shorter padded with the image's minimum.
    views, limited_angle : optional
        CT/PET geometry: ``views`` evenly spaced views over 180°, or ``limited_angle`` degrees
        (one view per degree unless ``views`` is given). Default 180 views.
    photons : float, optional
        CT: blank-scan photons per detector bin; gives transmission (low-dose) counts.
    accel, coils, mask_kind : optional
        MRI: acceleration (default 4), number of coils (default 1), mask kind.
    counts : float, optional
        PET: expected total true counts (default 2e5).
    noise_sigma : float, optional
        Gaussian noise σ (CT post-log default 0.5% of the sinogram max; MRI default 0.2% of k-space max).
    pixel_size_mm : float, optional
        CT / PET pixel size after resizing, in mm: it sets the attenuation per pixel (and so the photon
        starvation of low-dose CT). Default: from ``pixel_spacing_mm``, else a 350 mm field of view / size.
    pixel_spacing_mm : float or (row, column) floats, optional
        The input image's own pixel spacing (a DICOM's PixelSpacing, a NIfTI's zooms): the pixel size after
        resizing is then the image's larger extent / ``size``. Ignored when ``pixel_size_mm`` is given.
    seed : int
        Noise seed.
    source : str, optional
        Recorded in the metadata.
    axes_ras : dict, optional
        The input's orientation (``{"x": …, "y": …}``: the RAS+ directions of its column and row index, a DICOM's or
        NIfTI's, :func:`napari_diffrecon.io.read_image`): recorded with the intensity mapping, so that exported
        NIfTI images keep it.
    """
    if np.iscomplexobj(image):  # np.asarray(..., float64) would keep the real part with a warning only
        raise ValueError("simulate takes a real image; pass its magnitude (np.abs) — k-space goes into a bundle's "
                         "measurement instead")
    img = np.asarray(image, dtype=np.float64)
    if img.ndim != 2:
        raise ValueError(f"simulate needs a 2D image, got shape {img.shape}; pick one slice (on the command line: "
                         "--slice)")
    if not np.all(np.isfinite(img)):
        raise ValueError("the image contains NaN or Inf")
    if size < 16:
        raise ValueError(f"size must be ≥ 16, got {size}")
    _check_options(views, limited_angle, photons, coils, counts, noise_sigma, pixel_size_mm)
    if views is not None and views > MAX_VIEWS_PER_PIXEL * size:
        raise ValueError(f"views = {views} for a {size}-pixel image: π/2 · {size} ≈ {int(np.pi / 2 * size)} views "
                         f"sample it fully, and more than {MAX_VIEWS_PER_PIXEL * size} only cost time and memory "
                         "(the system matrix grows with them); ask for fewer")
    modality = modality.lower()
    given = {"views": views, "limited_angle": limited_angle, "photons": photons, "accel": accel, "coils": coils,
             "counts": counts, "noise_sigma": noise_sigma}
    if modality in OPTIONS_USED:  # options the modality does not use: ignored, and not recorded as used
        given = {k: (v if k in OPTIONS_USED[modality] else None) for k, v in given.items()}
        views, limited_angle, photons, accel, coils, counts, noise_sigma = given.values()
        noise_sigma = None if photons is not None else noise_sigma  # low-dose CT: the counts are the noise
    if float(img.max()) == float(img.min()):
        raise ValueError(f"the image is constant (every pixel {float(img.min()):g}): there is nothing to measure; "
                         "pick another slice or image (on the command line: --slice)")
    px = _pixel_size(img.shape, size, pixel_size_mm, pixel_spacing_mm)
    is_hu = is_hounsfield(img, units)
    img, padded = _to_square(img, size, pixel_spacing_mm, fill=-1000.0 if is_hu else None)  # HU: pad with air
    meta: dict[str, Any] = {
        "source": source,
        "options": {
            "modality": modality,
            "size": size,
            "views": views,
            "limited_angle": limited_angle,
            "photons": photons,
            "accel": accel,
            "coils": coils,
            "mask_kind": mask_kind if modality == "mri" else None,
            "counts": counts,
            "noise_sigma": noise_sigma,
            "seed": seed,
            "units": "HU" if is_hu else ("arbitrary" if units == "auto" else units),
            "input_shape": list(np.shape(image)),
            "padded_to_square": padded,
        },
    }
    disk = fov_mask(size)
    if modality in ("ct", "pet"):
        if limited_angle is not None:
            angles = limited_angle_angles(limited_angle, views)
        else:
            angles = sparse_view_angles(180 if views is None else views)
    if modality == "ct":
        w = MU_WATER_PER_MM * px
        hu = hu_image(img, is_hu)
        hu = np.where(disk, hu, -1000.0)
        x = np.clip(w * (1 + hu / 1000.0), 0, None)
        op = ParallelBeamCT(size, angles)
        xt = torch.tensor(x, dtype=torch.float32)
        if photons is not None:
            noise = {"model": "transmission", "I0": float(photons), "background": 0.0}
        else:
            sigma = noise_sigma if noise_sigma is not None else 0.005 * float(op.forward(xt).max())
            noise = {"model": "gaussian", "sigma": float(sigma)}
        meta["intensity"] = {"native_units": "HU", "scale": w / 1000.0, "offset": w, "pixel_size_mm": px}
        if not is_hu:  # the HU of its results are this mapping's, not a scanner's: said where the units are
            meta["intensity"]["assumed"] = ASSUMED_HU
        meta["description"] = f"CT, {len(angles)} views" + (f", {photons:g} photons" if photons else "")
    elif modality == "mri":
        mag = _unit(img)
        yy, xx = np.mgrid[:size, :size] / size - 0.5
        phase = (
            np.tensordot(np.random.default_rng(seed + 1).uniform(-1, 1, 3), np.stack([yy, xx, yy * xx]), 1) * np.pi / 2
        )
        x = (mag * np.exp(1j * phase)).astype(np.complex64)
        mask = make_mask(mask_kind, (size, size), float(4 if accel is None else accel), seed=seed)
        maps = simulate_coil_maps((size, size), int(coils), seed=seed) if coils is not None and coils > 1 else None
        op = CartesianMRI(mask, maps)
        xt = torch.tensor(x)
        sigma = noise_sigma if noise_sigma is not None else 0.002 * float(op.forward(xt).abs().max())
        noise = {"model": "gaussian", "sigma": float(sigma)}
        meta["intensity"] = {"native_units": "magnitude", "scale": 1.0, "offset": 0.0}
        if pixel_size_mm is not None or pixel_spacing_mm is not None:  # a declared size (CT / PET assume 350 mm)
            meta["intensity"]["pixel_size_mm"] = px
        meta["description"] = f"MRI, {op.acceleration:.1f}x {mask_kind}, {max(op.n_coils, 1)} coil(s)"
    elif modality == "pet":
        activity = np.where(disk, pet_activity(img, is_hu), 0.0)
        if is_hu:  # a CT: attenuation where its tissues are
            body_mask = disk & (img > -500)
            meta["options"]["activity"] = "FDG-like uptake from the CT's tissues (activity_from_anatomy)"
        else:
            body_mask = activity > 0
        mu = np.where(body_mask, MU_WATER_511_PER_MM * px, 0.0)
        att = attenuation_factors(mu, angles)
        unit_op = PETOperator(size, angles, att)
        total = float(unit_op.forward(torch.tensor(activity, dtype=torch.float32)).sum())
        counts = 2e5 if counts is None else float(counts)
        scale = counts / max(total, 1e-12)
        op = PETOperator(size, angles, att, sensitivity_scale=scale)
        x = activity
        xt = torch.tensor(x, dtype=torch.float32)
        mean_true = float(op.forward(xt).mean())
        noise = {"model": "poisson", "background": 0.2 * mean_true}
        meta["intensity"] = {"native_units": "activity", "scale": 1.0, "offset": 0.0, "pixel_size_mm": px}
        meta["description"] = f"PET, {len(angles)} views, {counts:g} true counts"
    else:
        raise ValueError(f"unknown modality {modality!r}; use ct, mri or pet")
    if axes_ras:  # the image's orientation travels with its units (measurement → result provenance → export)
        meta["intensity"]["axes_ras"] = {k: [float(v) for v in axes_ras[k]] for k in ("x", "y", "z") if k in axes_ras}
    m = simulate_measurement(op, xt, noise, seed=seed)
    data = m.numpy().astype(np.complex64 if m.is_complex() else np.float32)
    gt = x.astype(np.complex64 if np.iscomplexobj(x) else np.float32)
    return Measurement(data=data, operator=op.spec(), noise=noise, ground_truth=gt, metadata=meta)
