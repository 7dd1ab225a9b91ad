"""Reading 2D images to simulate from: DICOM (file or series folder), NIfTI, TIFF, PNG/JPG, NPY."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

#: The fewest pixels a slice read as an image may have on a side (a colour .npy's 3 samples read as slices are not).
MIN_SIDE = 8

__all__ = ["read_image", "read_volume"]


def _dicom_volume(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    import pydicom
    from pydicom.errors import InvalidDicomError

    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    slices = []
    for f in files:
        try:
            ds = pydicom.dcmread(f)
            arr = ds.pixel_array.astype(np.float32)
        except (InvalidDicomError, AttributeError, ValueError, OSError) as e:
            if path.is_dir():
                continue
            raise ValueError(f"cannot read {f.name} as DICOM image: {e}") from None
        if int(getattr(ds, "SamplesPerPixel", 1) or 1) > 1:  # colour (a secondary capture): grey, as PNG / TIFF
            arr = _grey(arr)
        if arr.ndim == 3 and "PerFrameFunctionalGroupsSequence" in ds:  # enhanced multi-frame: per-frame groups
            arr = _enhanced_frames(ds, arr)
        else:
            arr = arr * float(getattr(ds, "RescaleSlope", 1.0)) + float(getattr(ds, "RescaleIntercept", 0.0))
        pos = getattr(ds, "ImagePositionPatient", None)
        key = float(pos[2]) if pos is not None else float(getattr(ds, "InstanceNumber", 0) or 0)
        slices.append((key, arr, ds, f.name))
    if not slices:
        raise ValueError(f"no readable DICOM images in {path}")
    slices.sort(key=lambda s: s[0])
    ds = slices[0][2]
    units = "HU" if is_rescaled_ct(ds) else "arbitrary"
    measures = _group_item(ds, 0, "PixelMeasuresSequence")
    spacing = getattr(ds, "PixelSpacing", None) or getattr(measures, "PixelSpacing", None) or []
    info = {"format": "dicom", "units": units, "pixel_spacing_mm": [float(v) for v in spacing]}
    axes = dicom_axes(ds)
    if axes:
        info["axes_ras"] = axes
    keys = np.asarray([sl[0] for sl in slices], dtype=np.float64)
    dz = float(np.median(np.diff(keys))) if keys.size > 1 else 0.0  # from the positions, else the thickness
    thickness = getattr(ds, "SpacingBetweenSlices", None) or getattr(ds, "SliceThickness", None)
    if dz > 0 and any(getattr(sl[2], "ImagePositionPatient", None) is not None for sl in slices):
        info["slice_spacing_mm"] = dz
    elif thickness:
        info["slice_spacing_mm"] = float(thickness)
    if any(int(getattr(s[2], "SamplesPerPixel", 1) or 1) > 1 for s in slices):
        info["converted"] = "colour image converted to grey"
    if len(slices) == 1 and slices[0][1].ndim == 3:  # one multi-frame file: its frames are the volume
        return slices[0][1], info
    shapes = {}
    for _key, arr, _ds, name in slices:
        shapes.setdefault(arr.shape, []).append(name)
    if len(shapes) > 1:
        listing = "; ".join(f"{shape}: {', '.join(names[:3])}{' …' if len(names) > 3 else ''}"
                            for shape, names in shapes.items())
        raise ValueError(f"{path.name}: the DICOM files are not one series (their images differ in shape: {listing}); "
                         "put one series per folder")
    return np.stack([s[1] for s in slices]), info


def _group_item(ds: Any, frame: int, sequence: str) -> Any:
    """The first item of a functional-group ``sequence`` for ``frame`` of an enhanced multi-frame DICOM (per-frame
    groups first, then the shared ones); None when absent."""
    per, shared = ds.get("PerFrameFunctionalGroupsSequence"), ds.get("SharedFunctionalGroupsSequence")
    for groups, i in ((per, frame), (shared, 0)):
        seq = getattr(groups[i], sequence, None) if groups is not None and len(groups) > i else None
        if seq:
            return seq[0]
    return None


def _enhanced_frames(ds: Any, arr: np.ndarray) -> np.ndarray:
    """An enhanced multi-frame image's frames in stored values → modality values (each frame's rescale from its
    functional groups), ordered along z by each frame's position where the file gives one."""
    out = np.empty(arr.shape, np.float32)
    z = []
    for i in range(arr.shape[0]):
        pvt = _group_item(ds, i, "PixelValueTransformationSequence")
        slope = float(getattr(pvt, "RescaleSlope", 1.0)) if pvt is not None else 1.0
        intercept = float(getattr(pvt, "RescaleIntercept", 0.0)) if pvt is not None else 0.0
        out[i] = arr[i] * slope + intercept
        pos = getattr(_group_item(ds, i, "PlanePositionSequence"), "ImagePositionPatient", None)
        z.append(float(pos[2]) if pos is not None else float(i))
    return out[np.argsort(z, kind="stable")]


def nifti_napari_order(img: Any, first_frame: bool = False) -> tuple[np.ndarray, list[float]]:
    """A NIfTI image's voxels in napari's axis order and its voxel sizes in that order.

    NIfTI stores (x, y, z); napari shows (z, y, x) — the order :func:`napari_diffrecon.io.export_image`
    writes NIfTI in, so a NIfTI in and a NIfTI out are the same way round.

    Parameters
    ----------
    img : nibabel.Nifti1Image
        A loaded NIfTI image.
    first_frame : bool
        Keep only the first frame of a 4D (or longer) series (read without loading the others); otherwise only
        trailing axes of length 1 are dropped, and a series comes back as (t, z, y, x).

    Returns
    -------
    data : numpy.ndarray
        float32, in napari order.
    spacing : list of float
        Voxel size per axis (mm), in napari order.
    """
    shape = tuple(img.shape)
    while len(shape) > 3 and (first_frame or shape[-1] == 1):
        shape = shape[:-1]
    data = np.asarray(img.dataobj[(...,) + (0,) * (len(img.shape) - len(shape))], dtype=np.float32)
    zooms = [float(z) for z in img.header.get_zooms()[: data.ndim]]
    return np.ascontiguousarray(data.T), zooms[::-1]


#: TIFF ResolutionUnit values (and ImageJ's 'unit' strings) in mm per unit: metric ones only — an inch unit is what
#: image editors write by default (72 / 96 / 300 dpi), not a physical pixel size.
_TIFF_UNIT_MM = {3: 10.0, 4: 1.0, 5: 1e-3, "cm": 10.0, "mm": 1.0, "micron": 1e-3, "um": 1e-3, "µm": 1e-3}


#: Image editors' default resolutions (dots per inch): written in centimetres they are not a physical pixel size.
_EDITOR_DPI = (72.0, 96.0, 150.0, 300.0, 600.0)


def _tiff_spacing(tif: Any) -> list[float] | None:
    """The (row, column) pixel spacing in mm of a TIFF: this package's export record (``spacing_mm`` in the image
    description), else its X/YResolution tags in a metric unit (the TIFF ResolutionUnit, or ImageJ's ``unit``); None
    when it declares none."""
    page = tif.pages[0]
    try:
        desc = json.loads(page.description) if page.description.lstrip().startswith("{") else {}
        if isinstance(desc, dict) and desc.get("spacing_mm"):
            return [float(v) for v in desc["spacing_mm"][-2:]]
    except (ValueError, TypeError):
        pass
    tags = page.tags
    if "XResolution" not in tags or "YResolution" not in tags:
        return None
    value = getattr(tags.get("ResolutionUnit"), "value", None)  # (tifffile's RESUNIT.NONE is falsy: no `or`)
    unit: int | str = 2 if value is None else int(value)  # TIFF's default unit: the inch
    if unit == 1:  # none: ImageJ keeps its unit in its own metadata
        unit = str((tif.imagej_metadata or {}).get("unit", "")).lower()
    mm = _TIFF_UNIT_MM.get(unit)
    if mm is None:
        return None
    try:
        per_unit = [float(n) / float(d) for n, d in (tags["YResolution"].value, tags["XResolution"].value)]
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    if not all(np.isfinite(p) and p > 0 for p in per_unit):
        return None
    if mm == 10.0 and all(any(abs(p * 2.54 - dpi) < 0.5 for dpi in _EDITOR_DPI) for p in per_unit):
        return None  # an editor's default dpi written in centimetres (72 dpi = 28.35 px/cm), not a pixel size
    return [mm / p for p in per_unit]


def is_rescaled_ct(ds: Any) -> bool:
    """Whether a DICOM dataset holds CT values in HU: a CT with a rescale (classic, or an enhanced multi-frame's
    pixel value transformation group); a CT without any may store raw detector units, not claimed to be HU."""
    rescaled = "RescaleIntercept" in ds or _group_item(ds, 0, "PixelValueTransformationSequence") is not None
    return str(getattr(ds, "Modality", "")).upper() == "CT" and rescaled


def dicom_axes(ds: Any) -> dict[str, list[float]] | None:
    """The orientation record (:func:`_unit_axes`) of a DICOM dataset: its ImageOrientationPatient (classic, or an
    enhanced multi-frame's plane orientation group), LPS direction cosines of the column and row index → RAS+."""
    iop = (getattr(ds, "ImageOrientationPatient", None)
           or getattr(_group_item(ds, 0, "PlaneOrientationSequence"), "ImageOrientationPatient", None))
    if iop is None or len(iop) != 6:
        return None
    try:
        v = [float(c) for c in iop]
    except (TypeError, ValueError):
        return None
    return _unit_axes([-v[0], -v[1], v[2]], [-v[3], -v[4], v[5]])


def nifti_axes(img: Any) -> dict[str, list[float]] | None:
    """The orientation record (:func:`_unit_axes`) of a nibabel image: its affine's voxel axes i (columns, x),
    j (rows, y), k (slices), in RAS+."""
    affine = np.asarray(img.affine, dtype=np.float64)[:3, :3]
    return _unit_axes(affine[:, 0], affine[:, 1], affine[:, 2])


def _unit_axes(x: Any, y: Any, z: Any = None) -> dict[str, list[float]] | None:
    """``{"x": …, "y": …[, "z": …]}``: the RAS+ directions (unit vectors) in which the column index (x), the row index
    (y) and the slice index (z; a NIfTI's third axis, else x × y) of an image increase — what an exported NIfTI's
    affine needs to show it the way the source did. None when x or y is degenerate (zero, non-finite, parallel)."""
    out: dict[str, list[float]] = {}
    for key, v in (("x", x), ("y", y), ("z", z)):
        if v is None:
            continue
        v = np.asarray(v, dtype=np.float64).reshape(3)
        n = float(np.linalg.norm(v))
        if not (np.isfinite(n) and n > 0):
            if key == "z":
                continue
            return None
        out[key] = [round(float(c), 6) for c in v / n]
    if np.linalg.norm(np.cross(out["x"], out["y"])) < 1e-3:
        return None
    return out


def _refuse_complex(dtype: Any, name: str) -> None:
    """A complex image file is refused: an image to simulate from is real (for MRI, the simulation makes k-space)."""
    if np.dtype(dtype).kind == "c":
        raise ValueError(f"{name} holds complex values; pass a real image (e.g. the magnitude: np.abs) — measured "
                         "k-space goes into a bundle's 'measurement' instead (see README, bundles)")


def _grey(vol: np.ndarray) -> np.ndarray:
    """Colour samples in the last axis (grey + alpha, RGB, RGBA) → one grey value per pixel; alpha is dropped."""
    return vol[..., 0] if vol.shape[-1] == 2 else vol[..., :3].mean(-1)


def read_volume(path: str | Path) -> tuple[np.ndarray, dict[str, Any]]:
    """Read an image or volume as ``(n_slices, H, W)`` float32 plus an info dict (units, spacing)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"image file {path} not found")
    name = path.name.lower()
    try:
        if path.is_dir() or name.endswith((".dcm", ".dicom")):
            vol, info = _dicom_volume(path)
        elif name.endswith((".nii", ".nii.gz")):
            import nibabel as nib

            nii = nib.load(str(path))
            _refuse_complex(nii.get_data_dtype(), path.name)
            vol, spacing = nifti_napari_order(nii, first_frame=True)
            info = {
                "format": "nifti",
                "units": "auto",  # NIfTI declares no intensity units: the values decide (simulate: below −500 → HU)
                "pixel_spacing_mm": spacing[-2:],  # (row = y, column = x)
            }
            if len(spacing) == 3:
                info["slice_spacing_mm"] = float(spacing[0])
            axes = nifti_axes(nii)
            if axes:
                info["axes_ras"] = axes
        elif name.endswith((".tif", ".tiff")):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                raw, axes = tif.asarray(), tif.series[0].axes
                spacing = _tiff_spacing(tif)
            _refuse_complex(raw.dtype, path.name)
            vol, info = np.asarray(raw, dtype=np.float32), {"format": "tiff", "units": "auto"}
            if spacing:
                info["pixel_spacing_mm"] = spacing
            if "S" in axes:  # colour samples per pixel (RGB, RGBA, grey + alpha; interleaved or planar): grey
                vol = np.moveaxis(vol, axes.index("S"), -1)
                vol, info["converted"] = _grey(vol), "colour image converted to grey"
        elif name.endswith(".npy"):
            raw = np.load(path, allow_pickle=False)
            _refuse_complex(raw.dtype, path.name)
            vol, info = raw.astype(np.float32), {"format": "npy", "units": "auto"}
        elif name.endswith((".png", ".jpg", ".jpeg", ".bmp")):
            from skimage.io import imread

            vol, info = (
                np.asarray(imread(path), dtype=np.float32),
                {"format": name.rsplit(".", 1)[-1], "units": "auto"},
            )
            if vol.ndim == 3 and vol.shape[-1] in (2, 3, 4):
                vol, info["converted"] = _grey(vol), "colour image converted to grey"
        else:
            raise ValueError(f"unsupported image format {path.name}: use DICOM, NIfTI, TIFF, PNG/JPG or .npy")
    except ValueError:
        raise
    except Exception as e:  # corrupt files surface as many exception types across readers
        raise ValueError(f"cannot read {path.name}: {e}") from None
    if vol.ndim == 2:
        vol = vol[None]
    if vol.ndim != 3:
        raise ValueError(f"{path.name} has {vol.ndim} dimensions; expected a 2D image or a 3D volume")
    if not np.all(np.isfinite(vol)):
        raise ValueError(f"{path.name} contains NaN or Inf pixels")
    return vol.astype(np.float32), info


def read_image(path: str | Path, slice_index: int | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Read one 2D image (a volume's slice ``slice_index``, default the middle one)."""
    vol, info = read_volume(path)
    if min(vol.shape[1:]) < MIN_SIDE:
        hint = (f"; a colour .npy ({vol.shape[0]}, {vol.shape[1]}, {vol.shape[2]}) reads as {vol.shape[0]} slices of "
                f"{vol.shape[1]}×{vol.shape[2]}: save it as grey, e.g. np.save(path, arr.mean(-1))"
                if Path(path).suffix.lower() == ".npy" and vol.shape[-1] in (2, 3, 4) else "")
        raise ValueError(f"{Path(path).name}'s slices are {vol.shape[1]}×{vol.shape[2]} pixels; an image to simulate "
                         f"from needs at least {MIN_SIDE} on each side{hint}")
    k = vol.shape[0] // 2 if slice_index is None else int(slice_index)
    if not 0 <= k < vol.shape[0]:
        raise ValueError(f"slice {slice_index} out of range: {Path(path).name} has {vol.shape[0]} slices")
    info = {**info, "slice_index": k, "n_slices": vol.shape[0]}
    return vol[k], info
