"""fastMRI-style HDF5 files: a ``kspace`` dataset ``(slices, [coils,] H, W)`` (centred, orthonormal FFT).

The sampling mask comes from the file's ``mask`` dataset (one value per phase-encoding column) or,
when absent, from the columns that hold non-zero data. Multi-coil sensitivities are estimated by
ESPIRiT from the fully sampled centre (:func:`napari_diffrecon.physics.coils.estimate_coil_maps`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .bundle import BundleError, Measurement, _validate

__all__ = ["is_fastmri", "read_fastmri"]


def is_fastmri(path: str | Path) -> bool:
    """True for an HDF5 file with a ``kspace`` dataset and no ``measurement`` (not one of our bundles)."""
    p = Path(path)
    if p.suffix.lower() not in (".h5", ".hdf5") or not p.is_file():
        return False
    try:
        import h5py

        with h5py.File(p, "r") as f:
            return "kspace" in f and "measurement" not in f
    except OSError:
        return False


def read_fastmri(path: str | Path, slice_index: int | None = None, noise_fraction: float = 0.01) -> Measurement:
    """Read one slice of a fastMRI-style file as a validated MRI :class:`Measurement`.

    Parameters
    ----------
    path : str or Path
        The ``.h5`` file.
    slice_index : int, optional
        Slice to read (default: the middle one).
    noise_fraction : float
        Gaussian noise σ (of each real and imaginary part, as every Gaussian likelihood here) as a fraction of
        the RMS of the sampled k-space (the files carry no noise scan); the GUI shows it as a free setting.

    Raises
    ------
    BundleError
        No ``kspace`` dataset, wrong shape or dtype, slice out of range, no fully sampled centre.
    """
    import h5py

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"fastMRI file {path} not found")
    try:
        with h5py.File(path, "r") as f:
            if "kspace" not in f:
                raise BundleError(f"{path.name}: no 'kspace' dataset; a fastMRI file holds kspace "
                                  "(slices, coils, H, W)")
            ks = f["kspace"]
            if not isinstance(ks, h5py.Dataset) or ("mask" in f and not isinstance(f["mask"], h5py.Dataset)):
                raise BundleError(f"{path.name}: 'kspace' (and 'mask', when present) must be datasets, not groups; "
                                  "a fastMRI file holds kspace (slices, coils, H, W) as a dataset")
            if ks.ndim not in (3, 4):
                raise BundleError(f"{path.name}: kspace has shape {ks.shape}; expected (slices, [coils,] H, W)")
            n = ks.shape[0]
            k = n // 2 if slice_index is None else int(slice_index)
            if not 0 <= k < n:
                raise BundleError(f"{path.name}: slice {slice_index} out of range (0–{n - 1})")
            data = np.asarray(ks[k])
            mask_ds = np.asarray(f["mask"][()]) if "mask" in f else None
            attrs = {a: (v.decode() if isinstance(v, bytes) else v) for a, v in f.attrs.items()}
    except OSError as e:
        raise BundleError(f"cannot read {path.name} as HDF5: {e}") from None
    if not np.iscomplexobj(data):
        raise BundleError(f"{path.name}: kspace must be complex, got {data.dtype}")
    data = data.astype(np.complex64)
    h, w = data.shape[-2:]
    if mask_ds is not None and mask_ds.size == w:
        cols = mask_ds.astype(bool).reshape(w)
    else:
        energy = np.abs(data).reshape(-1, h, w).sum(axis=(0, 1))
        cols = energy > 0
    if not cols.any():
        raise BundleError(f"{path.name}: the k-space slice is empty")
    mask = np.broadcast_to(cols[None, :], (h, w)).astype(np.float32)
    data = data * mask
    spec: dict[str, Any] = {"modality": "mri", "image_shape": [int(h), int(w)], "mask": mask, "coil_maps": None}
    if data.ndim == 3:
        from ..physics.coils import estimate_coil_maps

        try:
            # a narrowed ESPIRiT kernel for a narrow centre is expected here
            spec["coil_maps"] = estimate_coil_maps(data, calib_size=None, mask=mask,
                                                   warn_narrow=False).astype(np.complex64)
        except ValueError as e:
            raise BundleError(
                f"{path.name}: cannot estimate coil maps ({e}); a fully sampled centre is needed"
            ) from None
    rms = float(np.sqrt(np.mean(np.abs(data[..., cols]) ** 2)))
    noise = {"model": "gaussian", "sigma": max(noise_fraction * rms, 1e-12),
             "note": f"no noise scan in the file: σ per real and imaginary part {noise_fraction:.0%} of the sampled "
                     "k-space RMS", "assumed": True}
    meta = {"source": str(path), "format": "fastmri", "slice_index": k, "n_slices": n,
            "description": f"fastMRI-style k-space, slice {k}/{n}, {w / cols.sum():.1f}× undersampled, "
                           f"{data.shape[0] if data.ndim == 3 else 1} coil(s)",
            "acquisition": attrs.get("acquisition")}
    m = Measurement(data=data, operator=spec, noise=noise, metadata=meta, path=str(path))
    _validate(m)
    return m
