"""npe2 contributions: readers, writers and sample data (layer data only; no math here).

Readers: our measurement bundles (``.npz`` / ``.h5``) and fastMRI-style ``.h5`` k-space open as
ground-truth + measurement layers whose metadata carries the :class:`Measurement` (the workbench
picks it up, ready to Run) and what the layer shows (``role``: "measurement" or "ground truth"); the
measurement layer lies under the ground truth with the image's field of view (:func:`measurement_placement`);
NIfTI volumes, DICOM files and series folders, and TIFFs we exported open as image layers with
their pixel spacing as scale and the provenance in their metadata.
Writers: image layers to NIfTI, DICOM secondary capture and TIFF with provenance (napari's save
dialog asks before replacing a file; the writers themselves are atomic).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .bundle import BundleError, Measurement, is_result_file, read_measurement

LayerData = tuple[np.ndarray, dict[str, Any], str]


def _json_safe(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in (d or {}).items() if not isinstance(v, np.ndarray)}


def _pixel_scale(m: Measurement) -> tuple[float, float] | None:
    inten = m.metadata.get("intensity") if isinstance(m.metadata, dict) else None
    px = (inten or {}).get("pixel_size_mm")
    return (float(px), float(px)) if px else None


def measurement_placement(m: Measurement, shape: tuple[int, ...]) -> dict[str, tuple[float, float]]:
    """Scale and translation that give a 2D array in measurement space (the data, a residual ``|Ax − m|``) the
    image's footprint: it then lies under the image layers, not across and beyond them at scale 1, and takes a grid
    tile of their size (the axes of a sinogram or k-space are not millimetres; only the footprint matches).

    Parameters
    ----------
    m : Measurement
        The measurement (its ``image_shape`` and pixel size, when recorded).
    shape : tuple of int
        The shape of the measurement-space array.

    Returns
    -------
    dict
        ``{"scale": (row, column), "translate": (row, column)}`` as napari layer keywords; empty when ``shape`` or
        the image shape is not 2D.
    """
    image = tuple(int(n) for n in (m.operator or {}).get("image_shape", ()))
    if len(shape) != 2 or len(image) != 2 or min(shape) < 1:
        return {}
    px = _pixel_scale(m) or (1.0, 1.0)
    scale = tuple(n * p / k for n, p, k in zip(image, px, shape, strict=True))
    # napari centres pixel i at i * scale: the first pixel's outer edge sits where the image's does
    translate = tuple(0.5 * (s - p) for s, p in zip(scale, px, strict=True))
    return {"scale": (scale[0], scale[1]), "translate": (translate[0], translate[1])}


def display_limits(a: Any, lo: float = 1.0, hi: float = 99.5) -> tuple[float, float]:
    """Display window from percentiles (never empty): what the workbench and the readers give image layers, so that a
    ground truth and the reconstructions beside it are windowed alike (napari's own default is min..max)."""
    a = np.asarray(a)
    if a.size == 0 or not np.isfinite(a).any():
        return 0.0, 1.0
    v0, v1 = (float(v) for v in np.nanpercentile(a, [lo, hi]))
    if not v1 > v0:
        v1 = v0 + max(abs(v0), 1.0) * 1e-3
    return v0, v1


def spread_limits(a: Any) -> tuple[float, float]:
    """Display window of a spread (std) or residual: from 0 to its 99.5th percentile (a small spread is not black)."""
    return 0.0, max(display_limits(a, 0, 99.5)[1], 1e-12)


def shown_values(data: Any, role: str, m: Measurement | None) -> tuple[np.ndarray, str | None]:
    """An image-space array as the viewer shows it: CT images and their std in Hounsfield units (the units a
    clinician reads and windows in; :func:`napari_diffrecon.io.export.native_units`), anything else as it is.

    Parameters
    ----------
    data : array_like
        Values in image units (CT: attenuation per pixel).
    role : str
        What the array is ("ground truth", "mean", "std", "residual", ...).
    m : Measurement or None
        The measurement it belongs to (its ``metadata["intensity"]`` declares the units).

    Returns
    -------
    tuple
        ``(values, units)``: units "HU" when converted (record it in the layer's metadata as ``units``), else None.
    """
    from .export import native_units

    inten = m.metadata.get("intensity") if m is not None and isinstance(m.metadata, dict) else None
    return native_units(data, role, inten)


def _layers(m: Measurement, name: str) -> list[LayerData]:
    """The measurement layer, and the ground truth (when known) above it: the image is what is seen first."""
    data = m.data
    if np.iscomplexobj(data):  # k-space: log magnitude (coils combined by root-sum-of-squares) is what people view
        mag = np.abs(data)
        if mag.ndim == 3:
            mag = np.sqrt((mag**2).sum(0))
        data = np.log1p(mag / max(float(mag.max()), 1e-30) * 1e4).astype(np.float32)
    meta = {"measurement": m, "operator": _json_safe(m.operator), "noise": _json_safe(m.noise), "source": m.path,
            "description": (m.metadata or {}).get("description")}
    modality = m.operator.get("modality")
    kw_m: dict[str, Any] = {"name": f"{name} measurement ({modality})", "metadata": {**meta, "role": "measurement"},
                            **measurement_placement(m, np.shape(data))}
    layers: list[LayerData] = [(data, kw_m, "image")]
    if m.ground_truth is not None:
        gt = np.abs(m.ground_truth) if np.iscomplexobj(m.ground_truth) else m.ground_truth
        gt_meta: dict[str, Any] = {**meta, "role": "ground truth"}
        gt, units = shown_values(gt, "ground truth", m)
        if units is not None:
            gt_meta["units"] = units
        kw: dict[str, Any] = {"name": f"{name} ground truth", "metadata": gt_meta,
                              "contrast_limits": display_limits(gt)}  # the workbench windows its results alike
        scale = _pixel_scale(m)
        if scale is not None:
            kw["scale"] = scale
        layers.append((np.asarray(gt), kw, "image"))
    return layers


def _is_bundle(p: Path) -> bool:
    try:
        if p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                return {"measurement", "operator"} <= set(z.files)
        import h5py

        with h5py.File(p, "r") as f:
            return "measurement" in f and ("operator" in f or "operator" in f.attrs)
    except Exception:  # not ours or unreadable: let napari try other readers
        return False


#: How a result file's images are shown: (field, label, shown at first).
_RESULT_LAYERS = (("mean", "posterior mean", True), ("reconstruction", "reconstruction", True),
                  ("std", "posterior std", True), ("lower", "95% lower", False), ("upper", "95% upper", False),
                  ("samples", "samples", False))


def result_layers(path: str | Path) -> list[LayerData]:
    """Layers for a result file (the CLI's ``reconstruct -o out.npz``): the mean (or a classical run's
    reconstruction), the std, and hidden the 95 % bounds and samples; CT in Hounsfield units as the workbench shows
    it, with the run's provenance in each layer's metadata (so "Export selected layer" writes it again).

    Raises
    ------
    BundleError, FileNotFoundError
        Not a readable result file.
    """
    from .bundle import RESULT_IMAGES, read_result, result_units
    from .export import native_units

    p = Path(path)
    arrays, prov = read_result(p)
    layers: list[LayerData] = []
    window: tuple[float, float] | None = None
    for field, label, visible in _RESULT_LAYERS:
        if field not in arrays or (field == "reconstruction" and "mean" in arrays):  # a diffusion run's = its mean
            continue
        role = RESULT_IMAGES[field]
        a = arrays[field]
        inten, spacing = result_units(prov, a.ndim)
        data, units = native_units(np.abs(a) if np.iscomplexobj(a) else a, role, inten)
        meta: dict[str, Any] = {"provenance": prov, "diffrecon_role": role, "source": str(p), "result_field": field}
        if inten is not None:
            meta["intensity"] = inten
        if units is not None:
            meta["units"] = units
        kw: dict[str, Any] = {"name": f"{p.stem} {label}", "metadata": meta, "visible": visible}
        if spacing is not None:
            kw["scale"] = spacing
        if role == "std":
            kw.update(colormap="magma", contrast_limits=spread_limits(data))
        else:  # one window for the images of a run (the mean's), as the workbench shows them
            window = window or display_limits(data)
            kw["contrast_limits"] = window
        layers.append((data, kw, "image"))
    return layers


def _read_result(path: str) -> list[LayerData]:
    try:
        return result_layers(path)
    except (BundleError, FileNotFoundError) as e:
        raise ValueError(f"napari-diffrecon could not open {Path(path).name}: {e}") from None


def get_reader(path: str | list[str]) -> Callable[[str], list[LayerData]] | None:
    """Reader for napari-diffrecon bundles, result files and fastMRI-style k-space; None for anything else."""
    if isinstance(path, list):
        return None
    p = Path(path)
    if p.suffix not in (".npz", ".h5"):
        return None
    if _is_bundle(p):
        return _read
    if is_result_file(p):
        return _read_result
    from .fastmri import is_fastmri

    return _read_fastmri if is_fastmri(p) else None


def _read(path: str) -> list[LayerData]:
    try:
        m = read_measurement(path)
    except (BundleError, FileNotFoundError) as e:
        raise ValueError(f"napari-diffrecon could not open {Path(path).name}: {e}") from None
    return _layers(m, Path(path).stem)


def _read_fastmri(path: str) -> list[LayerData]:
    from .fastmri import read_fastmri

    try:
        m = read_fastmri(path)
    except (BundleError, FileNotFoundError) as e:
        raise ValueError(f"napari-diffrecon could not open {Path(path).name}: {e}") from None
    return _layers(m, Path(path).stem)


# -- images: NIfTI, DICOM (files and series folders), our TIFFs ---------------------------------
def _looks_dicom(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _ours_tiff(p: Path) -> bool:
    try:
        import tifffile

        with tifffile.TiffFile(p) as tf:
            return '"napari-diffrecon"' in (tf.pages[0].description or "")
    except Exception:  # not a TIFF we wrote: napari's own reader takes it
        return False


def get_image_reader(path: str | list[str]) -> Callable[[str], list[LayerData]] | None:
    """Reader for NIfTI, DICOM files/series folders and TIFFs carrying our provenance."""
    if isinstance(path, list):
        return None
    p = Path(path)
    name = p.name.lower()
    if p.is_dir():
        files = [f for f in sorted(p.iterdir())[:50] if f.is_file()]
        return _read_image if any(f.suffix.lower() == ".dcm" or _looks_dicom(f) for f in files) else None
    if name.endswith((".nii", ".nii.gz")):
        return _read_image
    if name.endswith((".dcm", ".dicom")) or (not p.suffix and _looks_dicom(p)):
        return _read_image
    if name.endswith((".tif", ".tiff")) and _ours_tiff(p):
        return _read_image
    return None


def _stem(p: Path) -> str:
    n = p.name
    for ext in (".nii.gz", ".nii", ".dcm", ".dicom", ".tiff", ".tif"):
        if n.lower().endswith(ext):
            return n[: -len(ext)]
    return n


def read_image_layers(path: str | Path) -> list[LayerData]:
    """An image layer for a NIfTI / DICOM / TIFF file or DICOM series folder (provenance in metadata)."""
    from .export import read_exported
    from .images import read_volume

    p = Path(path)
    if p.is_dir():
        vol, info = read_volume(p)
        data, prov = (vol[0] if vol.shape[0] == 1 else vol), None
        sp = info.get("pixel_spacing_mm") or [1.0, 1.0]
        spacing = ([1.0] if data.ndim == 3 else []) + [float(v) for v in sp]
        fmt = "dicom series"
    else:
        data, prov, info = read_exported(p)
        spacing, fmt = info["spacing"], info["format"]
    meta: dict[str, Any] = {"source": str(p), "format": fmt}
    if prov is not None:
        meta["provenance"] = prov
    if info.get("units") == "HU":  # a CT in Hounsfield units: exported as HU, simulated from as HU
        meta["units"] = "HU"
    if info.get("axes_ras"):  # its orientation: exports of it and of what is simulated from it keep it
        meta["axes_ras"] = info["axes_ras"]
    spacing = [s if s > 0 else 1.0 for s in spacing][-data.ndim:]
    return [(data, {"name": _stem(p), "metadata": meta, "scale": tuple(spacing)}, "image")]


def _read_image(path: str) -> list[LayerData]:
    try:
        return read_image_layers(path)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise ValueError(f"napari-diffrecon could not open {Path(path).name}: {e}") from None


# -- the widget's "open anything" ----------------------------------------------------------------
def simulated_layers(image: np.ndarray, name: str, modality: str = "ct", source: str | None = None,
                     **options: Any) -> list[LayerData]:
    """Simulate a measurement from a 2D image (``simulate_from_image`` options) and return its layers."""
    from ..simulate import simulate_from_image

    m = simulate_from_image(np.asarray(image, dtype=np.float64), modality, source=source or name, **options)
    return _layers(m, f"{name} ({modality} simulated)")


def read_any(path: str | Path, simulate: dict[str, Any] | None = None) -> list[LayerData]:
    """Layers for a bundle, a fastMRI file, or an image to simulate from (``simulate`` options).

    Raises
    ------
    BundleError, ValueError, FileNotFoundError
        With a message naming the problem (the widget shows it as a notification).
    """
    from .fastmri import is_fastmri, read_fastmri
    from .images import read_image

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} not found")
    if p.suffix in (".npz", ".h5", ".hdf5") and not p.is_dir():
        if p.suffix != ".npz" and is_fastmri(p):
            import h5py

            with h5py.File(p, "r") as f:  # the shape first: coil maps are estimated once, at the size read
                h, w = (f["kspace"].shape[-2:] if isinstance(f["kspace"], h5py.Dataset) and f["kspace"].ndim >= 3
                        else (0, 0))
            size = int((simulate or {}).get("size") or FASTMRI_SIZE)
            # e.g. 640 × 368 knee k-space, beyond any prior's range: the same field of view at the prior's size
            # (said in its description), or at the phase encodes' width when that is smaller
            resize = min(size, w) if max(h, w) > 4 * size else None
            return _layers(read_fastmri(p, size=resize), p.stem)
        if is_result_file(p):  # a result to look at (and export, or simulate from)
            return result_layers(p)
        return _layers(read_measurement(p), p.stem)
    opts = dict(simulate or {"modality": "ct"})
    img, info = read_image(p)
    if info.get("units") == "HU":
        opts.setdefault("units", "HU")
    if info.get("pixel_spacing_mm"):  # the attenuation per pixel (CT, PET) follows the image's own pixel size
        opts.setdefault("pixel_spacing_mm", info["pixel_spacing_mm"])
    if info.get("axes_ras"):  # its orientation, for NIfTI exports of what is made from it
        opts.setdefault("axes_ras", info["axes_ras"])
    return simulated_layers(img, _stem(p), source=str(p), **opts)


#: The image side a fastMRI file's k-space is brought to when it is too large for a prior to run on (more than 4×
#: it): the shipped priors' resolution (the dock passes its "simulate as" size instead).
FASTMRI_SIZE = 128


# -- samples -----------------------------------------------------------------------------------
_SAMPLE_LABELS = {"ct_sparse23": "CT 23 views", "mri_4x_8coils": "MRI 4x 8 coils", "pet_lowcount": "PET low count"}


def sample_layers(key: str) -> list[LayerData]:
    """Layers of the shipped sample ``key`` (see ``napari_diffrecon.io.SAMPLES``)."""
    from . import load_sample

    return _layers(load_sample(key), _SAMPLE_LABELS.get(key, key))


def sample_ct_sparse23() -> list[LayerData]:
    """Sparse-view CT (23 views) of a real CT slice: ground truth + sinogram layers."""
    return sample_layers("ct_sparse23")


def sample_mri_4x_8coils() -> list[LayerData]:
    """Accelerated MRI (4×, 8 coils) of a real MR slice: ground truth + k-space layers."""
    return sample_layers("mri_4x_8coils")


def sample_pet_lowcount() -> list[LayerData]:
    """Low-count PET from an FDG-like activity map derived from a real CT slice."""
    return sample_layers("pet_lowcount")


# -- writers -----------------------------------------------------------------------------------
def layer_units(metadata: dict[str, Any] | None) -> tuple[str | None, dict[str, Any] | None, str | None]:
    """``(role, intensity, units)`` of a layer for :func:`napari_diffrecon.io.export.export_image`: what it shows (a
    workbench result's ``diffrecon_role``, or a bundle layer's ``role``), its measurement's declared intensity (CT:
    image = scale · HU + offset) and the units its values are in ("HU" when the viewer shows them so, else None),
    so that CT images are exported in Hounsfield units, converted once."""
    md = metadata or {}
    role = md.get("diffrecon_role") or md.get("role")
    intensity = md.get("intensity")
    m = md.get("measurement")
    if intensity is None and isinstance(m, Measurement) and isinstance(m.metadata, dict):
        intensity = m.metadata.get("intensity")
    units = md.get("units")
    return ((str(role) if role else None), (intensity if isinstance(intensity, dict) else None),
            (str(units) if units else None))


def layer_axes(metadata: dict[str, Any] | None) -> dict[str, Any] | None:
    """A layer's orientation record (``axes_ras``: an opened NIfTI / DICOM's own, or its measurement's, which the
    intensity record carries), for exports and simulations from it; None when it has none."""
    md = metadata or {}
    if isinstance(md.get("axes_ras"), dict):
        return md["axes_ras"]
    _, intensity, _ = layer_units(md)
    axes = (intensity or {}).get("axes_ras")
    return axes if isinstance(axes, dict) else None


def core_values(data: Any, metadata: dict[str, Any] | None) -> np.ndarray:
    """A layer's values in the core's image units (CT: attenuation per pixel), whatever units the viewer shows them
    in (:func:`layer_units`; the inverse of :func:`shown_values`)."""
    from .export import image_units

    role, intensity, units = layer_units(metadata)
    return image_units(data, role, intensity, units)


def _write(fmt_path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    from .export import export_image

    md = meta.get("metadata") or {}
    prov = md.get("provenance") if isinstance(md.get("provenance"), dict) else None
    if prov is None:
        prov = {"software": "napari-diffrecon", "layer": meta.get("name"), "source": str(md.get("source"))}
    role, intensity, units = layer_units(md)
    out = export_image(fmt_path, data, prov, spacing=meta.get("scale"), name=str(meta.get("name", "")),
                       overwrite=True,  # napari's save dialog has already asked before replacing a file
                       role=role, intensity=intensity, data_units=units, axes_ras=layer_axes(md))
    return [str(out)]


def write_nifti(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """npe2 writer: an image layer to NIfTI with its provenance."""
    return _write(path, data, meta)


def write_dicom(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """npe2 writer: an image layer to a DICOM secondary capture with its provenance."""
    return _write(path, data, meta)


def write_tiff(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """npe2 writer: an image layer to a float32 TIFF with its provenance."""
    return _write(path, data, meta)
