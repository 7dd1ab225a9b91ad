"""Measurement bundles (``.npz`` / ``.h5``): measurements + JSON operator spec + noise model.

Keys (see README "Measurement bundles"): ``measurement`` (array), ``operator`` (JSON string;
array-valued fields stored as their own keys and referenced as ``{"$array": "mask"}``),
``noise`` (JSON, optional), ``ground_truth`` (optional), ``metadata`` (JSON, optional),
``format_version``. Reading validates everything and never unpickles.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__

__all__ = [
    "file_sha256",
    "BundleError",
    "OutputPathError",
    "Measurement",
    "check_output_path",
    "read_measurement",
    "write_measurement",
    "write_result",
    "read_result",
    "result_units",
    "is_result_file",
    "RESULT_IMAGES",
    "VOLUME_STUDY_FORMAT",
    "VolumeStudyFileError",
    "atomic_write",
    "json_field",
    "load_keys",
    "resolve_arrays",
    "split_arrays",
]


def file_sha256(path: str | Path | None) -> str | None:
    """SHA-256 of a file, read in 1 MiB blocks (None when there is no file)."""
    if not path or not Path(path).exists():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


ARRAY_FIELDS = ("mask", "coil_maps", "attenuation", "background")
COUNT_MODELS = ("poisson", "transmission")
# Share of the k-space energy allowed where the MRI mask is 0. Data are stored on the full grid with zeros where
# nothing was sampled (and simulated noise is added only where sampled), so this share is exactly 0 for consistent
# bundles; 1 % leaves room for rounding and stray samples while catching a mask that belongs to other data.
MASK_MISMATCH_FRACTION = 0.01
BUNDLE_HELP = (
    "a measurement bundle is an .npz holding the 'measurement' array together with 'operator', its JSON operator "
    "spec (modality, image_shape, geometry); see README \"Measurement bundles\", or make one from an image with "
    "'napari-diffrecon simulate'"
)


class BundleError(ValueError):
    """A bundle file is unreadable or inconsistent; the message names the field and the fix."""


class OutputPathError(FileExistsError):
    """An output path that cannot be written: a directory, or inside a file (``--force`` cannot help).

    A :class:`FileExistsError` so that callers handling "output exists" report it the same way.
    """


def default_noise(data: Any) -> dict[str, Any]:
    """The noise model assumed for data that declare none: Gaussian, σ = 1 % of the measurement's RMS, marked
    ``assumed`` (runs then say their noise floor is an assumption and skip the warnings that need a known one)."""
    data = np.asarray(data)
    rms = float(np.sqrt(np.mean(np.abs(data) ** 2))) if data.size and np.issubdtype(data.dtype, np.number) else 1.0
    return {"model": "gaussian", "sigma": max(0.01 * rms, 1e-8) if math.isfinite(rms) else 1.0,
            "note": "default: 1% of the measurement RMS", "assumed": True}


@dataclass
class Measurement:
    """Measured data with everything needed to rebuild its forward model and noise model."""

    data: np.ndarray
    operator: dict[str, Any]
    noise: dict[str, Any] = field(default_factory=dict)
    ground_truth: np.ndarray | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    path: str | None = None

    def __post_init__(self) -> None:
        # Arrays as arrays (a torch tensor or a list gave AttributeError deep inside), the modality in lower case (as
        # every reader writes it: "CT" passed validation but the prior check refused it), and without a noise spec the
        # readers' assumed default instead of the likelihood's σ = 1.
        if not isinstance(self.data, np.ndarray):
            self.data = np.asarray(self.data.detach().cpu() if isinstance(self.data, torch.Tensor) else self.data)
        if isinstance(self.operator, dict) and isinstance(self.operator.get("modality"), str):
            if self.operator["modality"] != self.operator["modality"].lower():
                self.operator = {**self.operator, "modality": self.operator["modality"].lower()}
        if not self.noise:
            self.noise = default_noise(self.data)

    def build_operator(self, device: str | torch.device = "cpu"):
        """The forward model on ``device``."""
        from ..physics import build_operator

        try:
            return build_operator(self.operator, device=device)
        except ValueError as e:
            raise BundleError(f"operator: {e}") from None

    def build_likelihood(self, device: str | torch.device = "cpu"):
        """The noise model on ``device``."""
        from ..physics import build_likelihood

        try:
            return build_likelihood(self.noise, device=device)
        except ValueError as e:
            raise BundleError(f"noise: {e}") from None

    def to_tensor(self, device: str | torch.device = "cpu") -> torch.Tensor:
        """The measurement as a tensor (complex64 or float32)."""
        d = self.data.astype(np.complex64 if np.iscomplexobj(self.data) else np.float32)
        return torch.from_numpy(d).to(device)

    def validate(self) -> None:
        """Check shapes, finiteness, counts and geometry against the operator; raise BundleError."""
        _validate(self)


def _validate(m: Measurement) -> None:
    spec = m.operator
    if not isinstance(spec, dict) or "modality" not in spec:
        raise BundleError("operator: must be a JSON object with a 'modality' (ct, mri, pet, denoise, inpaint)")
    data = m.data
    if data.dtype == object:
        raise BundleError("measurement: object arrays are refused (untrusted file)")
    if not np.issubdtype(data.dtype, np.number):
        raise BundleError(f"measurement: must be numeric, got dtype {data.dtype}")
    if not np.all(np.isfinite(data)):
        raise BundleError("measurement: contains NaN or Inf; remove or replace those entries")
    top = float(np.abs(data).max()) if data.size else 0.0
    if top > MAX_DATA_MAGNITUDE or 0 < top < 1 / MAX_DATA_MAGNITUDE:
        raise BundleError(
            f"measurement: values reach {top:.3g}, where float32 arithmetic (sums of squares in the data residual "
            f"and the solvers) {'overflows' if top > 1 else 'underflows to 0'}; rescale the data by a constant "
            f"(between 1e{-np.log10(MAX_DATA_MAGNITUDE):.0f} and 1e{np.log10(MAX_DATA_MAGNITUDE):.0f}) and give the "
            "noise σ in the same units (counts for PET and low-dose CT are never this far off: check the units)"
        )
    modality = str(spec.get("modality")).lower()
    if np.iscomplexobj(data) and modality != "mri":
        raise BundleError(f"measurement: complex data for the real {modality} modality; store the real sinogram")
    if modality == "mri" and not np.iscomplexobj(data):
        raise BundleError(
            f"measurement: MRI k-space must be complex (e.g. complex64), got {data.dtype}; a magnitude or the real "
            "part is not k-space: store the complex samples as acquired (zeros where nothing was sampled)"
        )
    op = m.build_operator("cpu")
    if modality in ("ct", "pet") and data.ndim == 2 and data.shape != tuple(op.data_shape):
        n, na = op.data_shape
        if data.shape == (na, n):
            raise BundleError(
                f"measurement: shape {data.shape} is transposed; store the sinogram as (n_det, n_angles) = {(n, na)} "
                "as scikit-image's radon returns it"
            )
        if data.shape[0] == n:
            raise BundleError(
                f"measurement: has {data.shape[1]} angles but operator.angles_deg lists {na}; make them agree"
            )
    if (modality == "mri" and data.ndim == 3 and len(op.data_shape) == 2
            and tuple(data.shape[-2:]) == tuple(op.data_shape)):
        raise BundleError(
            f"measurement: {data.shape[0]} coils of k-space, but the operator has no coil_maps: multi-coil data need "
            "sensitivity maps (coils, H, W) in operator.coil_maps — estimate them from the fully sampled centre with "
            "napari_diffrecon.physics.coils.estimate_coil_maps(kspace, mask=mask) (ESPIRiT), or store the data as a "
            "fastMRI-style .h5 ('kspace', 'mask'), which is read with estimated maps"
        )
    if tuple(data.shape) != tuple(op.data_shape):
        raise BundleError(f"measurement: shape {data.shape} does not match the operator's data shape {op.data_shape}")
    if modality == "mri":
        _check_mri_mask(data, op.mask.detach().cpu().numpy())
        if getattr(op, "coil_maps", None) is not None:
            _check_coil_maps(op.coil_maps.detach().cpu().numpy())
    if modality == "pet" and getattr(op, "attenuation", None) is not None:
        att = op.attenuation.detach().cpu().numpy()
        if not np.all(att > 0):
            raise BundleError(
                f"operator.attenuation: {int((att <= 0).sum())} of {att.size} factors are 0; attenuation factors are "
                "exp(−∫μ) along each line of response, in (0, 1] (1 where nothing attenuates), never 0 — store the "
                "factors (napari_diffrecon.physics.pet.attenuation_factors turns a μ-map into them), not the μ-map "
                "or a mask"
            )
    if not np.any(data):
        raise BundleError(
            "measurement: all entries are zero, so there is nothing to reconstruct from; store the measured data "
            "(check that the right array was saved, not an empty buffer)"
        )
    model = str((m.noise or {}).get("model", "gaussian")).lower()
    bg = (m.noise or {}).get("background")
    if isinstance(bg, np.ndarray) and bg.ndim:
        try:
            fits = np.broadcast_shapes(bg.shape, data.shape) == tuple(data.shape)
        except ValueError:
            fits = False
        if not fits:
            raise BundleError(f"noise.background: shape {bg.shape} does not match the measurement's {data.shape}; "
                              "give one expected background count per measured bin, one per view (1, views), or a "
                              "single number")
    if bg is not None and not isinstance(bg, (int, float, np.number, np.ndarray)):
        raise BundleError(f"noise.background: must be a number or an array reference {{\"$array\": key}}, got {bg!r}")
    if model in COUNT_MODELS and np.any(data < 0):
        raise BundleError(
            f"measurement: negative entries (min {data.min():.3g}) but the {model} noise model needs raw counts ≥ 0"
        )
    m.build_likelihood("cpu")
    if m.ground_truth is not None and tuple(m.ground_truth.shape) != tuple(op.image_shape):
        raise BundleError(f"ground_truth: shape {m.ground_truth.shape} does not match image_shape {op.image_shape}")
    if m.ground_truth is not None and not np.all(np.isfinite(m.ground_truth)):
        raise BundleError("ground_truth: contains NaN or Inf, so no score (PSNR, SSIM) can be computed against it; "
                          "replace those pixels or drop the ground truth")
    _check_intensity((m.metadata or {}).get("intensity") if isinstance(m.metadata, dict) else None)


def _check_intensity(inten: Any) -> None:
    """Refuse an intensity mapping (``metadata.intensity``) that exports would use wrongly or drop silently:
    image = scale · native + offset needs a finite, positive scale and a finite offset; pixel sizes are positive."""
    if inten is None:
        return
    if not isinstance(inten, dict):
        raise BundleError(f"metadata.intensity: must be a JSON object (native_units, scale, offset), got {inten!r}")
    for key, positive in (("scale", True), ("offset", False), ("pixel_size_mm", True)):
        if key not in inten or inten[key] is None:
            continue
        try:
            v = float(inten[key])
        except (TypeError, ValueError):
            v = float("nan")
        if not np.isfinite(v) or (positive and v <= 0):
            raise BundleError(f"metadata.intensity.{key}: must be a finite number{' above 0' if positive else ''}, "
                              f"got {inten[key]!r} (image = scale · native + offset; pixel_size_mm in mm)")


# Largest |measurement| float32 arithmetic handles (its squares summed over ~10⁶ entries stay below 3.4e38), and its
# inverse the smallest largest value (squares of 1e-15 still above float32's smallest normal 1.2e-38 when summed):
# real sinograms, counts and k-space lie many decades inside (fastMRI k-space ≈ 1e-5, PET counts ≤ 1e7).
MAX_DATA_MAGNITUDE = 1e15

# The root-sum-of-squares of normalised coil maps is 1 inside the object (ESPIRiT, sigpy, our simulation) and 0
# outside; maps whose largest RSS is outside this range are raw coil images or scaled, not sensitivities.
COIL_RSS_RANGE = (0.5, 2.0)


def _check_coil_maps(maps: np.ndarray) -> None:
    """Refuse all-zero coil maps and maps that are not normalised (``Σ_c |S_c|² ≈ 1`` inside the object)."""
    rss = np.sqrt((np.abs(maps) ** 2).sum(0))
    top = float(rss.max())
    if top == 0:
        raise BundleError("operator.coil_maps: all zeros, so every coil sees nothing; store the coil sensitivities "
                          "(or omit coil_maps for single-coil data)")
    lo, hi = COIL_RSS_RANGE
    if not lo <= top <= hi:
        raise BundleError(
            f"operator.coil_maps: not normalised: the root-sum-of-squares over coils reaches {top:.3g}, where "
            f"sensitivities give 1 inside the object; divide the maps by their root-sum-of-squares "
            "(maps / np.sqrt((abs(maps)**2).sum(0)), 0 where that is 0), or estimate them "
            "(napari_diffrecon.physics.coils.estimate_coil_maps)"
        )


def _check_mri_mask(data: np.ndarray, mask: np.ndarray) -> None:
    """Refuse a mask that is not 0 / 1, an all-zero mask, and one that leaves more than
    ``MASK_MISMATCH_FRACTION`` of the energy outside it."""
    if not np.isin(mask, (0, 1)).all():
        vals = np.unique(mask)
        raise BundleError(
            f"operator.mask: must hold only 0 and 1 (1 where k-space was acquired), got {vals.size} distinct values "
            f"from {vals.min():.3g} to {vals.max():.3g}; a weighted or density-compensation mask is not a sampling "
            "mask — store (mask > 0) and keep weights out of the data"
        )
    outside = mask == 0
    if outside.all():
        raise BundleError(
            "operator.mask: all zeros, so nothing is sampled; the mask is 1 where k-space was acquired "
            "(e.g. the measured phase-encoding lines)"
        )
    energy = np.abs(data) ** 2
    total = float(energy.sum(dtype=np.float64))
    if total == 0.0:
        return  # all-zero data: refused by the caller with its own message
    frac = float(energy[..., outside].sum(dtype=np.float64)) / total
    if frac > MASK_MISMATCH_FRACTION:
        raise BundleError(
            f"operator.mask: does not match the data: {frac:.1%} of the k-space energy lies where the mask is 0 "
            f"(more than {MASK_MISMATCH_FRACTION:.0%}), and those samples would be ignored; store the mask the data "
            "were acquired with (same orientation and centring as the k-space), or, to undersample fully sampled "
            "k-space retrospectively, multiply the k-space by the mask"
        )


def json_field(raw: Any, name: str) -> Any:
    """Decode a JSON field stored in an ``.npz``/``.h5`` file (a 0-d string array, bytes or str).

    Parameters
    ----------
    raw : np.ndarray, bytes, str or None
        The stored value.
    name : str
        The field's name, for messages.

    Returns
    -------
    Any
        The decoded value (None when ``raw`` is None).

    Raises
    ------
    BundleError
        For object arrays (never unpickled) and invalid JSON.
    """
    if raw is None:
        return None
    if isinstance(raw, np.ndarray):
        if raw.dtype == object:
            raise BundleError(f"{name}: object arrays are refused (untrusted file)")
        raw = raw.item() if raw.shape == () else raw.tobytes()
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8")
    try:
        return json.loads(raw)
    except (TypeError, json.JSONDecodeError) as e:
        raise BundleError(f"{name}: not valid JSON ({e}); store json.dumps(...) of a dict") from None


def resolve_arrays(spec: dict[str, Any], arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """Replace ``{"$array": key}`` references in an operator spec by the file's arrays.

    Parameters
    ----------
    spec : dict
        The operator spec as stored (JSON with array references).
    arrays : dict of np.ndarray
        The file's arrays by key.

    Returns
    -------
    dict
        A copy of ``spec`` with the arrays in place (arrays stored under a field's own name without a
        reference are filled in too, except ``background``, which belongs to the noise model).

    Raises
    ------
    BundleError
        When a reference names an array the file lacks.
    """
    out = dict(spec)
    for k, v in spec.items():
        if isinstance(v, dict) and "$array" in v:
            key = v["$array"]
            if key not in arrays:
                raise BundleError(f"operator.{k}: refers to array key {key!r} which is not in the file")
            out[k] = arrays[key]
    for k in ARRAY_FIELDS:  # arrays stored under their own names without a reference
        if out.get(k) is None and k in arrays and k != "background":
            out[k] = arrays[k]
    return out


def load_keys(path: Path) -> dict[str, Any]:
    """Every key of an ``.npz`` (never unpickled) or ``.h5`` file, with the HDF5 attributes as extra keys.

    Parameters
    ----------
    path : Path
        The file.

    Returns
    -------
    dict
        Key → array (or attribute value).

    Raises
    ------
    BundleError
        When the file cannot be read (corrupt, pickled objects, wrong format).
    """
    if path.suffix in (".h5", ".hdf5"):
        import h5py

        try:
            with h5py.File(path, "r") as f:
                groups = [k for k in f.keys() if not isinstance(f[k], h5py.Dataset)]
                if groups:
                    raise BundleError(
                        f"{path.name}: {', '.join(repr(k) for k in groups)}: HDF5 group(s), not datasets; a "
                        "bundle's .h5 holds its arrays and JSON strings as top-level datasets "
                        "(napari_diffrecon.io.write_measurement writes one)"
                    )
                out = {k: f[k][()] for k in f.keys()}
                for k, v in f.attrs.items():
                    out.setdefault(k, v)
            return out
        except OSError as e:
            raise BundleError(f"cannot read {path.name} as HDF5: {e}") from None
    _check_npz_signature(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except ValueError as e:
        if "pickle" in str(e).lower():  # only an .npz reaches np.load: this is an object array inside it
            raise BundleError(
                f"{path.name}: holds object arrays (pickled Python objects); refused (untrusted file): "
                "store plain numeric arrays and JSON strings"
            ) from None
        raise BundleError(f"cannot read {path.name}: {e}") from None
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise BundleError(f"cannot read {path.name} as a .npz bundle (corrupt or not a bundle): {e}") from None


def _check_npz_signature(path: Path) -> None:
    """Refuse, by its first bytes, a file that is not an .npz (zip) archive, before ``np.load`` guesses."""
    if path.is_dir():
        raise BundleError(f"{path} is a directory; pass the bundle file itself (.npz or .h5)")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise BundleError(f"cannot read {path.name}: {e}") from None
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):  # a zip archive (the latter: an empty one)
        return
    if not head:
        raise BundleError(f"{path.name}: the file is empty (0 bytes); {BUNDLE_HELP}")
    if head.startswith(b"\x93NUMPY"):
        raise BundleError(
            f"{path.name}: a .npy file holding one bare array, not a measurement bundle; {BUNDLE_HELP}"
        )
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        raise BundleError(f"{path.name}: an HDF5 file with the suffix {path.suffix!r}; rename it to .h5")
    raise BundleError(
        f"cannot read {path.name}: not an .npz archive (no zip header: text or another format); {BUNDLE_HELP}"
    )


def read_measurement(path: str | Path) -> Measurement:
    """Read and validate a bundle (``.npz`` or ``.h5``).

    A fastMRI-style ``.h5`` (a ``kspace`` dataset and no ``measurement``) is read as its middle slice by
    :func:`napari_diffrecon.io.fastmri.read_fastmri` (noise σ assumed: 1 % of the sampled k-space's RMS).

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    BundleError
        Anything wrong with its content; the message names the field and the fix.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"measurement file {path} not found")
    from .fastmri import is_fastmri, read_fastmri

    if is_fastmri(path):  # a fastMRI file (kspace, no measurement): its middle slice, as the workbench reads it
        return read_fastmri(path)
    keys = load_keys(path)
    if str(np.asarray(keys.get("format", ""))) == VOLUME_STUDY_FORMAT:
        shape = np.shape(keys.get("measurement"))
        raise VolumeStudyFileError(
            f"{path.name} is a volume study ({shape[0] if shape else '?'} slices), not a 2D measurement: reconstruct "
            f"it with --volume (napari-diffrecon reconstruct {path.name} --volume --method mbir -o FOLDER)"
        )
    if "measurement" not in keys:
        raise BundleError(f"{path.name}: lacks the 'measurement' array (keys found: {sorted(keys)})")
    if "operator" not in keys:
        raise BundleError(f"{path.name}: lacks 'operator', the JSON operator spec (modality, image_shape, geometry)")
    arrays = {k: np.asarray(v) for k, v in keys.items() if k in ARRAY_FIELDS}
    for k, v in arrays.items():
        if v.dtype == object:
            raise BundleError(f"{k}: object arrays are refused (untrusted file)")
    spec = json_field(keys["operator"], "operator")
    if not isinstance(spec, dict):
        raise BundleError("operator: must be a JSON object")
    spec = resolve_arrays(spec, arrays)
    noise = json_field(keys.get("noise"), "noise") or {}
    ref = noise.get("background")
    if isinstance(ref, dict):  # {"$array": key}: the array under that key (any name)
        key = ref.get("$array")
        if not isinstance(key, str) or key not in keys:
            raise BundleError(
                f"noise.background: refers to the array {key!r}, which {path.name} does not hold (keys: "
                f"{sorted(keys)}); store the expected randoms + scatter counts under that key, or give the background "
                "as a number"
            )
        bg = np.asarray(keys[key])
        if not np.issubdtype(bg.dtype, np.number) or np.iscomplexobj(bg):
            raise BundleError(f"noise.background: the array {key!r} must hold real numbers, got dtype {bg.dtype}")
        noise["background"] = bg
    data = np.asarray(keys["measurement"])
    if not noise:
        noise = default_noise(data)
    gt = keys.get("ground_truth")
    meta = json_field(keys.get("metadata"), "metadata") or {}
    m = Measurement(
        data=data,
        operator=spec,
        noise=noise,
        ground_truth=None if gt is None else np.asarray(gt),
        metadata=meta,
        path=str(path),
    )
    _validate(m)
    return m


#: The ``format`` entry of a volume study file (:mod:`napari_diffrecon.volume.study`): a stack of 2D measurements.
VOLUME_STUDY_FORMAT = "napari-diffrecon volume"


class VolumeStudyFileError(BundleError):
    """A volume study was given where a 2D measurement bundle is read (reconstruct it with ``--volume``)."""


#: What :func:`write_measurement` and :func:`write_result` write (their output names must end so).
MEASUREMENT_SUFFIXES = (".npz", ".h5", ".hdf5")
RESULT_SUFFIXES = (".npz",)


def check_output_path(path: str | Path, overwrite: bool = False, suffixes: tuple[str, ...] | None = None) -> Path:
    """Check, before any work, that a file can be written at ``path``.

    Parameters
    ----------
    path : str or Path
        The output file.
    overwrite : bool
        Whether an existing file may be replaced (``--force``).
    suffixes : tuple of str, optional
        The file types the writer produces (e.g. ``(".npz",)``): another ending is refused, so that a bundle is
        never written under a ``.nii.gz`` or ``.tif`` name that other programs would then fail to read.

    Returns
    -------
    Path
        ``path`` as a :class:`~pathlib.Path`.

    Raises
    ------
    OutputPathError
        When ``path`` is a directory, lies inside something that is a file (whatever ``overwrite`` says), would be
        created in a folder this process cannot write, or does not end in one of ``suffixes``.
    FileExistsError
        When a file exists at ``path`` and ``overwrite`` is False.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(
            f"{path} is a directory, not an output file; give a file name, e.g. {path / 'result.npz'}"
        )
    if suffixes and path.suffix.lower() not in suffixes:
        stem = path.name[: -len("".join(path.suffixes))] if path.suffixes else path.name
        raise OutputPathError(
            f"{path.name}: this writes a {' / '.join(suffixes)} file, so the name must end in it (e.g. "
            f"{path.with_name(stem + suffixes[0])}); NIfTI, DICOM and TIFF images of a result are exported by "
            "`napari-diffrecon export RESULT.npz -o IMAGE.nii.gz`, from the workbench (Export selected layer…) "
            "or with napari_diffrecon.io.export_image"
        )
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputPathError(f"{parent} is a file, so {path} cannot be created inside it; choose another path")
            if not os.access(parent, os.W_OK | os.X_OK):  # read-only or no permission: found before the work
                raise OutputPathError(f"cannot write into {parent} (read-only, or no permission); choose another "
                                      "output path")
            break
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; choose another name or pass --force to overwrite it "
                              "(overwrite=True from Python)")
    return path


def usual_permissions(path: str | Path) -> None:
    """Give a file written by a library that creates it owner-only (``tempfile.mkstemp``, safetensors' ``save_file``)
    the permissions a new file gets under the user's umask (usually 0644), so others can read a shared result or
    prior."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def atomic_write(path: Path, writer: Callable[[str], None], overwrite: bool) -> None:
    """Write ``path`` atomically: ``writer(tmp)`` fills a temporary file beside it, which is renamed over it.

    Parameters
    ----------
    path : Path
        The destination (its folder is created).
    writer : callable
        Writes the content to the temporary path it is given.
    overwrite : bool
        Replace an existing file (else :class:`FileExistsError`).

    Raises
    ------
    FileExistsError
        When ``path`` exists and ``overwrite`` is False, or is a directory (:class:`OutputPathError`, see
        :func:`check_output_path`); nothing is written.
    """
    path = check_output_path(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + path.suffix)
    os.close(fd)
    try:
        writer(tmp)
        usual_permissions(tmp)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def split_arrays(spec: dict[str, Any], noise: dict[str, Any]) -> tuple[dict, dict, dict[str, np.ndarray]]:
    """Split an operator spec and noise model into JSON-ready dicts and the arrays they refer to.

    Parameters
    ----------
    spec : dict
        Operator spec (arrays or tensors for masks, coil maps, attenuation ...; None values are dropped).
    noise : dict
        Noise model (an array ``background`` is split off too).

    Returns
    -------
    spec, noise : dict
        With ``{"$array": key}`` references in place of the arrays.
    arrays : dict of np.ndarray
        The arrays by key (the inverse is :func:`resolve_arrays`).
    """
    arrays: dict[str, np.ndarray] = {}
    s = {}
    for k, v in spec.items():
        if isinstance(v, (np.ndarray, torch.Tensor)):
            arrays[k] = np.asarray(v.cpu() if isinstance(v, torch.Tensor) else v)
            s[k] = {"$array": k}
        elif v is not None:
            s[k] = v
    n = dict(noise)
    if isinstance(n.get("background"), (np.ndarray, torch.Tensor)):
        arrays["background"] = np.asarray(n["background"])
        n["background"] = {"$array": "background"}
    return s, n, arrays


def write_measurement(m: Measurement, path: str | Path, overwrite: bool = False) -> Path:
    """Write a bundle (``.npz``, or ``.h5`` / ``.hdf5``) atomically (temp file + rename); refuses to overwrite
    unless ``overwrite``, and refuses other file endings. A measurement the readers would refuse
    (:meth:`Measurement.validate`) is not written: the :class:`BundleError` says why."""
    path = check_output_path(path, overwrite, MEASUREMENT_SUFFIXES)
    m.validate()
    spec, noise, arrays = split_arrays(m.operator, m.noise)
    meta = {"software_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **(m.metadata or {})}
    keys: dict[str, Any] = {
        "measurement": np.asarray(m.data),
        "operator": np.array(json.dumps(spec)),
        "noise": np.array(json.dumps(noise)),
        "metadata": np.array(json.dumps(meta, default=str)),
        "format_version": np.array(1),
        **arrays,
    }
    if m.ground_truth is not None:
        keys["ground_truth"] = np.asarray(m.ground_truth)
    if path.suffix in (".h5", ".hdf5"):
        import h5py

        def writer(tmp: str) -> None:
            with h5py.File(tmp, "w") as f:
                for k, v in keys.items():
                    if v.dtype.kind == "U":
                        f.attrs[k] = str(v)
                    else:
                        f.create_dataset(k, data=v)
    else:

        def writer(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, **keys)

    atomic_write(path, writer, overwrite)
    return path


def write_result(
    path: str | Path, arrays: dict[str, np.ndarray], provenance: dict[str, Any], overwrite: bool = False
) -> Path:
    """Write reconstruction arrays + a ``provenance`` JSON string to ``.npz``, atomically, no silent overwrite
    (another file ending is refused)."""
    path = check_output_path(path, overwrite, RESULT_SUFFIXES)
    keys = {k: np.asarray(v) for k, v in arrays.items()}
    keys["provenance"] = np.array(json.dumps(provenance, default=str))

    def writer(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **keys)

    atomic_write(path, writer, overwrite)
    return path


#: The image arrays of a result file and what each shows (the roles of :mod:`napari_diffrecon.io.export`).
RESULT_IMAGES = {"mean": "mean", "reconstruction": "estimate", "std": "std", "lower": "lower", "upper": "upper",
                 "samples": "sample"}


def result_units(provenance: dict[str, Any], ndim: int) -> tuple[dict[str, Any] | None, tuple[float, ...] | None]:
    """``(intensity, spacing)`` of a result's image with ``ndim`` axes: the measurement's intensity mapping that the
    provenance records (None without one) and the pixel spacing in mm it gives (a stack's first axis 1; a volume
    result's own voxel size, ``spacing_mm``)."""
    inten = provenance.get("measurement_intensity")
    inten = inten if isinstance(inten, dict) else None
    px = (inten or {}).get("pixel_size_mm")
    spacing = (((1.0,) if ndim == 3 else ()) + (float(px), float(px))) if px else None
    voxels = provenance.get("spacing_mm")  # a volume result's (dz, dy, dx)
    if ndim == 3 and isinstance(voxels, list) and len(voxels) == 3:
        try:
            spacing = tuple(float(v) for v in voxels)
        except (TypeError, ValueError):
            pass
    return inten, spacing


def is_result_file(path: str | Path) -> bool:
    """Whether ``path`` is a result ``.npz`` (``reconstruction`` and ``provenance``, no ``measurement``), read
    without unpickling; False for anything else, unreadable files included."""
    p = Path(path)
    if p.suffix.lower() not in RESULT_SUFFIXES or not p.is_file():
        return False
    try:
        with np.load(p, allow_pickle=False) as z:
            return {"reconstruction", "provenance"} <= set(z.files) and "measurement" not in z.files
    except Exception:  # not an archive, corrupt: not a result
        return False


def read_result(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read a result file written by :func:`write_result` (the CLI's ``reconstruct -o out.npz``).

    Returns
    -------
    tuple
        ``(arrays, provenance)``: the numeric arrays (``mean``, ``std``, ``reconstruction``, ``samples``, ...) in the
        core's image units, and the provenance record (``measurement_intensity`` says how those map to native units,
        e.g. HU for CT).

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    BundleError
        Not a result file (a measurement bundle, another archive), or a corrupt one; the message says which.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"result file {path} not found")
    if path.suffix.lower() not in RESULT_SUFFIXES:
        raise BundleError(f"{path.name}: results are .npz files written by 'napari-diffrecon reconstruct -o'")
    keys = load_keys(path)
    if "measurement" in keys and "operator" in keys:
        raise BundleError(f"{path.name} is a measurement bundle, not a result: reconstruct it first "
                          "(napari-diffrecon reconstruct BUNDLE -o result.npz)")
    if "provenance" not in keys or "reconstruction" not in keys:
        raise BundleError(f"{path.name}: not a napari-diffrecon result (it needs 'reconstruction' and 'provenance'; "
                          f"keys found: {sorted(keys)})")
    prov = json_field(keys["provenance"], "provenance")
    if not isinstance(prov, dict):
        raise BundleError(f"{path.name}: 'provenance' must be a JSON object")
    arrays = {k: np.asarray(v) for k, v in keys.items() if k != "provenance"}
    for k, v in arrays.items():
        if not (np.issubdtype(v.dtype, np.number) or v.dtype == bool):
            raise BundleError(f"{path.name}: '{k}' is not numeric (dtype {v.dtype})")
    shape = arrays["reconstruction"].shape
    for k in RESULT_IMAGES:
        if k in arrays and arrays[k].shape[-2:] != shape[-2:]:
            raise BundleError(f"{path.name}: '{k}' has shape {arrays[k].shape}, the reconstruction {shape}")
    return arrays, prov
