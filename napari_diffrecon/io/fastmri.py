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

__all__ = ["is_fastmri", "read_fastmri", "resize_kspace"]


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


def _centred_fft_rows(x: np.ndarray, inverse: bool) -> np.ndarray:
    """The package's centred orthonormal FFT (``fftshift(fft(ifftshift(x)))``) along the rows (axis −2) only."""
    f = np.fft.ifft if inverse else np.fft.fft
    return np.fft.fftshift(f(np.fft.ifftshift(x, axes=-2), axis=-2, norm="ortho"), axes=-2)


def _centre(n: int, m: int) -> slice:
    """The ``m`` central indices of ``n`` in the centred convention (index n // 2 is the centre, kept at m // 2)."""
    return slice(n // 2 - m // 2, n // 2 - m // 2 + m)


def resize_kspace(data: np.ndarray, cols: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, str]:
    """Bring Cartesian k-space ``(..., H, W)`` (phase encoding along the columns) to a ``size × size`` image.

    Exact operations only: the readout (rows, fully sampled) is brought to the phase-encoding field of view — its
    oversampling removed (H > W: the central W image rows, as fastMRI's 640 × 368 knee data are cropped) or the rows
    zero-padded in image space (H < W) — then the k-space centre ``size × size`` is kept: the same field of view at
    ``W / size`` times the pixel size (a low-pass of the image; the mask's central columns come with it, so the
    acceleration of the kept part is usually lower than the file's).

    Parameters
    ----------
    data : numpy.ndarray
        k-space ``(..., H, W)`` (coils first when several), centred convention.
    cols : numpy.ndarray
        The sampled phase-encoding columns (W booleans).
    size : int
        The image side wanted (≥ 16, ≤ W).

    Returns
    -------
    data, cols, how
        The resized k-space, its sampled columns and a sentence saying what was done.
    """
    h, w = data.shape[-2:]
    if not 16 <= size <= w:
        why = ("a larger image needs data the file does not hold" if size > w
               else "smaller images are below what the priors run on")
        raise BundleError(f"size {size}: the k-space centre can be cropped to 16 … {w} (its {w} phase-encoding "
                          f"columns); {why}")
    img_rows = _centred_fft_rows(data, inverse=True)  # (x, k_y): the readout in image space
    if h > w:
        img_rows, said = img_rows[..., _centre(h, w), :], f"readout oversampling removed ({h} → {w} rows)"
    elif h < w:
        before = w // 2 - h // 2  # the centred convention: row h // 2 lands on w // 2
        pad = [(0, 0)] * (img_rows.ndim - 2) + [(before, w - h - before), (0, 0)]
        img_rows, said = np.pad(img_rows, pad), f"readout field of view padded ({h} → {w} rows)"
    else:
        said = ""
    square = _centred_fft_rows(img_rows, inverse=False)
    out = np.ascontiguousarray(square[..., _centre(w, size), _centre(w, size)]).astype(np.complex64)
    how = (f"{said + '; ' if said else ''}k-space centre {size}² of {w}² kept (the same field of view at "
           f"{w / size:.2f}× the file's pixel size)")
    return out, cols[_centre(w, size)], how


def read_fastmri(path: str | Path, slice_index: int | None = None, noise_fraction: float = 0.01,
                 size: int | None = None) -> Measurement:
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
    size : int, optional
        Bring the slice to a ``size × size`` image (:func:`resize_kspace`: readout oversampling removed, k-space
        centre kept), e.g. a prior's resolution for a file's 640 × 368 k-space. Default: as stored.

    Raises
    ------
    BundleError
        No ``kspace`` dataset, wrong shape or dtype, slice out of range, no fully sampled centre, a size the file
        cannot give.
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
    resized = None
    if size is not None:
        data, cols, resized = resize_kspace(data * cols, cols, int(size))
        h, w = data.shape[-2:]
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
    if resized:
        meta["resized"] = resized
        meta["description"] += f"; {resized}"
    m = Measurement(data=data, operator=spec, noise=noise, metadata=meta, path=str(path))
    _validate(m)
    return m
