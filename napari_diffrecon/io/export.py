"""Exporting images with their provenance: NIfTI (nibabel), DICOM secondary capture (pydicom), TIFF (tifffile).

Every writer is atomic (temp file + rename, via the bundle writer's helper) and refuses to
overwrite an existing file unless ``overwrite=True``. The provenance (a JSON object: measurement
file, operator, prior card, sampler and every parameter, seed, software version) is stored

- NIfTI: as a header extension (code 6, "comment") holding the JSON; ``descrip`` names the software;
- DICOM: in a private block (group 0x0011, creator ``napari-diffrecon``, element 0x01, VR UT) plus a
  short ``ImageComments``; pixel values as 16-bit integers with RescaleSlope/Intercept (so
  floats round-trip to 1/65535 of their range);
- TIFF: as the ImageDescription JSON ``{"napari-diffrecon": provenance}`` beside float32 pixels.

CT images are reconstructed in attenuation per pixel (image = scale · HU + offset, the measurement's
``metadata["intensity"]``); :func:`export_image` writes them in Hounsfield units when it is told the
layer's role and that intensity (:func:`native_units`), as a clinician's viewer expects: DICOM with
RescaleType "HU" and a soft-tissue window, the provenance saying what was converted. The viewer shows CT images in
HU already (their layers say ``units: "HU"``); :func:`export_image` is then told ``data_units="HU"`` and writes them
as they are. :func:`image_units` is the inverse (HU back to attenuation per pixel, for the core).

:func:`read_exported` reads any of them back as ``(data, provenance, info)``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .bundle import RESULT_IMAGES, atomic_write, read_result, result_units
from .images import _unit_axes, dicom_axes, is_rescaled_ct, nifti_axes, nifti_napari_order

__all__ = ["export_image", "write_nifti", "write_dicom", "write_tiff", "read_exported", "EXPORT_FORMATS",
           "format_for", "native_units", "image_units", "export_result", "IMAGE_ROLES", "SPREAD_ROLES"]

EXPORT_FORMATS = {"nifti": (".nii", ".nii.gz"), "dicom": (".dcm",), "tiff": (".tif", ".tiff")}
_TAG = "napari-diffrecon"
_SC_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
_PRIVATE_GROUP = 0x0011
#: Roles of layers whose values are images (exported as ``(x − offset) / scale`` in the native units) and spreads
#: (``x / scale``); any other role (data residual, support score, measurement) is exported as it is.
IMAGE_ROLES = ("iterate", "estimate", "mean", "baseline", "ground truth", "sample", "lower", "upper",
               "volume_estimate")
SPREAD_ROLES = ("std", "volume_std")
_HU_WINDOW = (40.0, 400.0)  # DICOM WindowCenter / WindowWidth: soft tissue


def _hu_mapping(intensity: dict[str, Any] | None) -> tuple[float, float] | None:
    """``(scale, offset)`` of a measurement's intensity whose native units are HU (image = scale · HU + offset);
    None for other units or an unusable mapping."""
    if not isinstance(intensity, dict) or str(intensity.get("native_units", "")).upper() != "HU":
        return None
    try:
        scale, offset = float(intensity["scale"]), float(intensity["offset"])
    except (KeyError, TypeError, ValueError):
        return None
    if not (np.isfinite(scale) and np.isfinite(offset)) or scale <= 0:
        return None
    return scale, offset


def native_units(data: Any, role: str | None, intensity: dict[str, Any] | None) -> tuple[np.ndarray, str | None]:
    """A layer's values in the measurement's native units where those are Hounsfield units (CT).

    Parameters
    ----------
    data : array_like
        The layer's values in image units (CT: attenuation per pixel).
    role : str or None
        What the layer shows: one of :data:`IMAGE_ROLES` or :data:`SPREAD_ROLES` is converted, anything else not.
    intensity : dict or None
        The measurement's ``metadata["intensity"]`` (``native_units``, ``scale``, ``offset``: image = scale · native
        + offset).

    Returns
    -------
    tuple
        ``(values, units)``: the converted values and "HU", or the data as they are and None.
    """
    a = np.asarray(data)
    hu = _hu_mapping(intensity)
    if hu is None or np.iscomplexobj(a):
        return a, None
    scale, offset = hu
    if role in IMAGE_ROLES:
        return ((a.astype(np.float64) - offset) / scale).astype(np.float32), "HU"
    if role in SPREAD_ROLES:
        return (a.astype(np.float64) / scale).astype(np.float32), "HU"
    return a, None


def image_units(data: Any, role: str | None, intensity: dict[str, Any] | None, units: str | None) -> np.ndarray:
    """The inverse of :func:`native_units`: a layer's values back in image units (CT: attenuation per pixel).

    Parameters
    ----------
    data : array_like
        The layer's values.
    role : str or None
        What the layer shows (as in :func:`native_units`).
    intensity : dict or None
        The measurement's ``metadata["intensity"]``.
    units : str or None
        The units the layer's values are in (its metadata's ``units``): only "HU" is converted.

    Returns
    -------
    np.ndarray
        ``scale · HU + offset`` for an image, ``scale · HU`` for a spread, else the data as they are.

    Raises
    ------
    ValueError
        The values are in HU but ``intensity`` does not say how HU map to image units.
    """
    a = np.asarray(data)
    if str(units or "").upper() != "HU" or (role not in IMAGE_ROLES and role not in SPREAD_ROLES):
        return a
    hu = _hu_mapping(intensity)
    if hu is None:
        raise ValueError("the layer's values are in HU but its metadata has no HU intensity mapping "
                         "(metadata['intensity'] with native_units 'HU', scale and offset)")
    scale, offset = hu
    out = a.astype(np.float64) * scale + (offset if role in IMAGE_ROLES else 0.0)
    return out.astype(np.float32)


def format_for(path: str | Path) -> str:
    """``"nifti"``, ``"dicom"`` or ``"tiff"`` from the file name (ValueError otherwise)."""
    name = str(path).lower()
    for fmt, exts in EXPORT_FORMATS.items():
        if name.endswith(exts):
            return fmt
    raise ValueError(f"cannot export to {Path(path).name}: use .nii/.nii.gz (NIfTI), .dcm (DICOM) or .tif (TIFF)")


def _json(provenance: dict[str, Any] | None) -> str:
    return json.dumps(provenance or {}, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))


def _image(data: Any) -> np.ndarray:
    a = np.asarray(data)
    if np.iscomplexobj(a):
        a = np.abs(a)
    if a.ndim not in (2, 3):
        raise ValueError(f"can export 2D images or 3D volumes, got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.number):
        raise ValueError(f"cannot export non-numeric data (dtype {a.dtype})")
    return a.astype(np.float32)


def _spacing(spacing: Sequence[float] | None, ndim: int) -> list[float]:
    s = [float(v) for v in (spacing or [])][-ndim:]
    return [1.0] * (ndim - len(s)) + s


def _source_axes(axes_ras: dict[str, Any] | None) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The unit RAS+ directions (x, y, z) of the column, row and slice index that an orientation record
    (``intensity["axes_ras"]``, :func:`napari_diffrecon.io.images.read_image`) gives: z is the record's own when it has
    one not within x and y's plane, else x × y. None without a usable record (missing, non-finite, x parallel to y)."""
    if not isinstance(axes_ras, dict):
        return None
    try:  # the reader's own normalisation and checks (a record in a file may have been edited)
        unit = _unit_axes(axes_ras["x"], axes_ras["y"], axes_ras.get("z"))
    except (KeyError, TypeError, ValueError):
        unit = None
    if unit is None:
        return None  # an unreadable record: the identity orientation, as before records existed
    x, y = np.asarray(unit["x"]), np.asarray(unit["y"])
    z = np.cross(x, y)
    if "z" in unit and abs(float(np.dot(unit["z"], z))) > 1e-3:  # the source's own slice direction (a NIfTI's third
        z = np.asarray(unit["z"])  # axis may point against x × y), unless it lies in the slice plane
    return x, y, z


def _nifti_affine(sp: list[float], ndim: int, axes_ras: dict[str, Any] | None) -> np.ndarray:
    """The affine of an image stored as (x, y[, z]) with napari-order spacing ``sp``: the voxel axes along the
    source's directions (:func:`_source_axes`), else along +x, +y, +z (the identity orientation)."""
    sx, sy, sz = sp[-1], sp[-2], (sp[0] if ndim == 3 else 1.0)
    axes = _source_axes(axes_ras) or (np.array([1.0, 0, 0]), np.array([0, 1.0, 0]), np.array([0, 0, 1.0]))
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1], affine[:3, 2] = axes[0] * sx, axes[1] * sy, axes[2] * sz
    return affine


def write_nifti(path: str | Path, data: Any, provenance: dict[str, Any] | None = None,
                spacing: Sequence[float] | None = None, overwrite: bool = False,
                axes_ras: dict[str, Any] | None = None) -> Path:
    """Write a NIfTI-1 image (napari's (z, y, x) / (y, x) order stored as (x, y[, z])); ``axes_ras`` orients it
    (the source image's RAS+ directions of its column and row index, :func:`_nifti_affine`)."""
    import nibabel as nib

    path = Path(path)
    a = _image(data)
    sp = _spacing(spacing, a.ndim)
    vol = a.T  # (y, x) -> (x, y); (z, y, x) -> (x, y, z)
    affine = _nifti_affine(sp, a.ndim, axes_ras)
    img = nib.Nifti1Image(vol, affine)
    img.header["descrip"] = _TAG.encode()
    img.header.extensions.append(nib.nifti1.Nifti1Extension(6, _json(provenance).encode("utf-8")))
    img.header.set_xyzt_units("mm")

    gz = str(path).lower().endswith(".gz")

    def writer(tmp: str) -> None:  # serialise in memory: the temp name has no .nii suffix for nibabel to see
        raw = img.to_bytes()
        if gz:
            import gzip

            raw = gzip.compress(raw, compresslevel=6)
        with open(tmp, "wb") as f:
            f.write(raw)

    if str(path).lower().endswith(".nii.gz") or path.suffix.lower() == ".nii":
        atomic_write(path, writer, overwrite)
    else:
        raise ValueError(f"{path.name}: a NIfTI file name ends with .nii or .nii.gz")
    return path


def write_dicom(path: str | Path, data: Any, provenance: dict[str, Any] | None = None,
                spacing: Sequence[float] | None = None, overwrite: bool = False, description: str = "",
                units: str | None = None, axes_ras: dict[str, Any] | None = None) -> Path:
    """Write a DICOM Secondary Capture (multi-frame for volumes) carrying the provenance.

    ``units="HU"``: RescaleType "HU" and a soft-tissue window (values already in Hounsfield units). ``axes_ras``
    (the source image's RAS+ directions of its column and row index): ImageOrientationPatient, in DICOM's LPS.
    """
    import datetime

    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    path = Path(path)
    a = _image(data)
    if not np.isfinite(a).all():  # 16-bit integers with a rescale cannot hold them: the file would be garbage
        raise ValueError(f"cannot write {path.name}: the image holds NaN or Inf values, which DICOM's integer pixels "
                         "cannot store; export it as NIfTI or TIFF (float32), or fix the image first")
    lo, hi = float(a.min()), float(a.max())
    slope = (hi - lo) / 65535.0 if hi > lo else 1.0
    pix = np.round((a - lo) / slope).clip(0, 65535).astype(np.uint16)
    sp = _spacing(spacing, a.ndim)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = _SC_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    now = datetime.datetime.now()
    ds.SOPClassUID = _SC_SOP_CLASS
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    ds.ContentDate, ds.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.PatientName, ds.PatientID = "anonymous", "anonymous"
    ds.SeriesDescription = (description or "napari-diffrecon reconstruction")[:64]
    ds.Manufacturer = _TAG
    prov = provenance or {}
    ds.SoftwareVersions = str(prov.get("software_version", ""))[:64] or "unknown"
    ds.ImageComments = (f"napari-diffrecon: {prov.get('settings', {}).get('method', '')} "
                        f"seed {prov.get('settings', {}).get('seed', '')}")[:10240]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(a.shape[-2]), int(a.shape[-1])
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = f"{slope:.10g}"[:16], f"{lo:.10g}"[:16]
    ds.RescaleType = "HU" if units == "HU" else "US"
    if units == "HU":
        ds.WindowCenter, ds.WindowWidth = f"{_HU_WINDOW[0]:g}", f"{_HU_WINDOW[1]:g}"
    ds.PixelSpacing = [f"{sp[-2]:.6g}", f"{sp[-1]:.6g}"]
    axes = _source_axes(axes_ras)
    if axes is not None:  # the source's orientation, RAS → DICOM's LPS (x and y negated): columns' then rows' direction
        lps = [v * np.array([-1.0, -1.0, 1.0]) for v in axes[:2]]
        ds.ImageOrientationPatient = [f"{v:.6g}" for v in (*lps[0], *lps[1])]
    if a.ndim == 3:
        ds.NumberOfFrames = int(a.shape[0])
        ds.SliceThickness = f"{sp[0]:.6g}"
    ds.PixelData = pix.tobytes()
    block = ds.private_block(_PRIVATE_GROUP, _TAG, create=True)
    block.add_new(0x01, "UT", _json(provenance))

    def writer(tmp: str) -> None:
        ds.save_as(tmp, enforce_file_format=True)

    atomic_write(path, writer, overwrite)
    return path


def write_tiff(path: str | Path, data: Any, provenance: dict[str, Any] | None = None,
               spacing: Sequence[float] | None = None, overwrite: bool = False) -> Path:
    """Write a float32 TIFF with the provenance JSON as its ImageDescription."""
    import tifffile

    path = Path(path)
    a = _image(data)
    sp = _spacing(spacing, a.ndim)
    desc = json.dumps({_TAG: json.loads(_json(provenance)), "spacing_mm": sp})

    def writer(tmp: str) -> None:
        tifffile.imwrite(tmp, a, description=desc, metadata=None, photometric="minisblack",
                         resolution=(1.0 / sp[-1], 1.0 / sp[-2]), resolutionunit="MILLIMETER")

    atomic_write(path, writer, overwrite)
    return path


def export_image(path: str | Path, data: Any, provenance: dict[str, Any] | None = None,
                 spacing: Sequence[float] | None = None, name: str = "", overwrite: bool = False,
                 role: str | None = None, intensity: dict[str, Any] | None = None,
                 data_units: str | None = None, axes_ras: dict[str, Any] | None = None) -> Path:
    """Write ``data`` in the format named by the file extension (see :data:`EXPORT_FORMATS`).

    With ``role`` and ``intensity`` (the measurement's ``metadata["intensity"]``) a CT image or its std is written in
    Hounsfield units (:func:`native_units`), and the provenance records it (``exported_units``). With
    ``data_units="HU"`` the values are in HU already (a viewer layer): written as they are, recorded the same way.
    A result's provenance gives both when they are not passed: ``export_image(path, r.mean, r.provenance,
    role="mean")`` writes a CT result in HU at its pixel size (``intensity`` and ``spacing`` from its
    ``measurement_intensity``); without ``role`` the values are written as they are.

    ``axes_ras`` orients NIfTI and DICOM files (the source image's RAS+ directions of its column and row index);
    default: the one ``intensity`` records, else none (+x +y).

    Raises
    ------
    FileExistsError
        The file exists and ``overwrite`` is False.
    ValueError
        Unknown extension, or data that is not a 2D/3D numeric image.
    """
    fmt = format_for(path)
    if provenance and (intensity is None or spacing is None):  # a result's: the measurement's mapping and pixel size
        inten, px = result_units(provenance, np.ndim(data))
        intensity = inten if intensity is None else intensity
        spacing = px if spacing is None else spacing
    if str(data_units or "").upper() == "HU" and (role is None or role in IMAGE_ROLES or role in SPREAD_ROLES):
        units, source = "HU", f"{role or 'image'} as shown in the viewer, in HU"  # (no role: a CT image layer)
    else:
        data, units = native_units(data, role, intensity)
        source = None
        if units is not None:
            source = (f"{role} in image units (attenuation per pixel) = {intensity['scale']:.6g} · HU + "
                      f"{intensity['offset']:.6g}" if role not in SPREAD_ROLES
                      else f"{role} in image units = {intensity['scale']:.6g} · HU")
    if units is not None:
        provenance = {**(provenance or {}), "exported_units": units, "exported_from": source}
    axes_ras = axes_ras or (intensity or {}).get("axes_ras")  # the source's orientation: travels with its units
    if fmt == "nifti":
        return write_nifti(path, data, provenance, spacing, overwrite, axes_ras=axes_ras)
    if fmt == "dicom":
        return write_dicom(path, data, provenance, spacing, overwrite, description=name, units=units,
                           axes_ras=axes_ras)
    return write_tiff(path, data, provenance, spacing, overwrite)


def export_result(result: str | Path, path: str | Path, field: str | None = None, overwrite: bool = False) -> Path:
    """Export one image of a result file (the CLI's ``reconstruct -o out.npz``) as NIfTI / DICOM / TIFF.

    CT images and their std are written in Hounsfield units (the result's provenance records the measurement's
    intensity mapping, ``measurement_intensity``); the pixel size comes from it too. The provenance written with the
    image is the run's, plus ``exported_field`` and ``exported_from_file``.

    Parameters
    ----------
    result : str or Path
        The result ``.npz``.
    path : str or Path
        The image file to write (its extension picks the format, :data:`EXPORT_FORMATS`).
    field : str, optional
        Which image: one of ``mean``, ``reconstruction``, ``std``, ``lower``, ``upper``, ``samples`` (a stack).
        Default: the posterior mean of a diffusion run, the reconstruction of a classical one.
    overwrite : bool
        Replace an existing file.

    Raises
    ------
    ValueError
        An unknown field, one the result does not hold (a classical run has only ``reconstruction``), or the std of
        a one-sample run (0 everywhere).
    BundleError, FileNotFoundError
        Not a readable result file.
    FileExistsError
        ``path`` exists and ``overwrite`` is False.
    """
    format_for(path)  # the extension first: nothing is read for a name that cannot be written
    arrays, prov = read_result(result)
    if field is None:
        field = "mean" if "mean" in arrays else "reconstruction"
    if field not in RESULT_IMAGES:
        raise ValueError(f"unknown field {field!r}; choose one of {', '.join(RESULT_IMAGES)}")
    if field not in arrays:
        have = [k for k in RESULT_IMAGES if k in arrays]
        raise ValueError(f"{Path(result).name} has no {field!r} (it holds {', '.join(have)}): a classical run writes "
                         "only 'reconstruction'; 'std' needs a diffusion run with --samples ≥ 2, 'lower' and "
                         "'upper' (the 95 % interval) --samples ≥ 8, 'samples' needs --keep-samples")
    n_samples = (prov.get("settings") or {}).get("n_samples", prov.get("n_samples"))  # 2D runs; volume runs
    if field == "std" and isinstance(n_samples, int) and n_samples < 2:
        raise ValueError(f"{Path(result).name} is a run of one posterior sample: its 'std' is 0 everywhere, which "
                         "would read as certainty; rerun with --samples ≥ 2 to export a spread")
    prov = {**prov, "exported_field": field, "exported_from_file": str(result)}
    # the HU mapping and the pixel size come from the provenance (export_image)
    return export_image(path, arrays[field], prov, name=f"{Path(result).stem} {field}", overwrite=overwrite,
                        role=RESULT_IMAGES[field])


def read_exported(path: str | Path) -> tuple[np.ndarray, dict[str, Any] | None, dict[str, Any]]:
    """Read an exported image back: ``(data in napari order, provenance or None, info)``.

    ``info`` holds ``format``, ``spacing`` (per axis, napari order) and, when known, ``units`` ("HU": a rescaled CT
    DICOM, or our export of a CT image) and ``axes_ras`` (NIfTI / DICOM orientation, :func:`~.images.nifti_axes`).
    Files written by other software read too (their provenance is None).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found")
    fmt = format_for(path)
    prov, units, axes = None, None, None
    try:
        if fmt == "nifti":
            import nibabel as nib

            img = nib.load(str(path))
            data, spacing = nifti_napari_order(img)
            axes = nifti_axes(img)
            for ext in img.header.extensions:
                if ext.get_code() == 6:
                    try:
                        prov = json.loads(ext.get_content().decode("utf-8"))
                        break
                    except (UnicodeDecodeError, json.JSONDecodeError):
                        continue
        elif fmt == "dicom":
            import pydicom

            ds = pydicom.dcmread(path)
            data = ds.pixel_array.astype(np.float64) * float(getattr(ds, "RescaleSlope", 1.0)) + float(
                getattr(ds, "RescaleIntercept", 0.0)
            )
            data = data.astype(np.float32)
            axes = dicom_axes(ds)
            if str(getattr(ds, "RescaleType", "")).upper() == "HU" or is_rescaled_ct(ds):  # ours, or a scanner's CT
                units = "HU"
            ps = [float(v) for v in getattr(ds, "PixelSpacing", [1.0, 1.0])]
            spacing = ([float(getattr(ds, "SliceThickness", 1.0) or 1.0)] if data.ndim == 3 else []) + ps
            try:
                block = ds.private_block(_PRIVATE_GROUP, _TAG)
                prov = json.loads(block[0x01].value)
            except (KeyError, ValueError, json.JSONDecodeError):
                prov = None
        else:
            import tifffile

            with tifffile.TiffFile(path) as tf:
                data = tf.asarray().astype(np.float32)
                desc = tf.pages[0].description or ""
            spacing = [1.0] * data.ndim
            try:
                d = json.loads(desc)
                if isinstance(d, dict) and _TAG in d:
                    prov = d[_TAG]
                    spacing = [float(v) for v in d.get("spacing_mm", spacing)]
            except json.JSONDecodeError:
                prov = None
    except (ValueError, FileNotFoundError):
        raise
    except Exception as e:  # corrupt files surface as many exception types across the three libraries
        raise ValueError(f"cannot read {path.name} as {fmt}: {e}") from None
    units = units or (prov or {}).get("exported_units")
    return data, prov, {"format": fmt, "spacing": spacing, **({"units": units} if units else {}),
                        **({"axes_ras": axes} if axes else {})}
