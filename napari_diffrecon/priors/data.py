"""Training images from a folder: DICOM series, NIfTI volumes, TIFF/PNG/NPY images.

Volumes are sliced, empty space cropped, intensities normalised per modality, images resized to
the model resolution. Errors name the offending file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from skimage.transform import resize

from ..io.images import read_volume

__all__ = ["NORMALISATION", "load_training_images", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".dcm", ".nii", ".nii.gz", ".tif", ".tiff", ".png", ".jpg", ".jpeg", ".npy")

# Model units = (native − offset) / scale.
NORMALISATION: dict[str, dict[str, Any]] = {
    "ct": {"kind": "affine", "native_units": "HU", "offset": 0.0, "scale": 1000.0},
    "mri": {"kind": "affine", "native_units": "magnitude", "offset": 0.5, "scale": 0.5},
    "pet": {"kind": "affine", "native_units": "activity", "offset": 0.5, "scale": 0.5},
    "generic": {"kind": "affine", "native_units": "unit", "offset": 0.5, "scale": 0.5},
}


def _files(folder: Path) -> list[Path]:
    out = []
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES):
            out.append(p)
    return out


def _crop(img: np.ndarray, background: float) -> np.ndarray:
    fg = img > background
    if not fg.any():
        return img
    ys, xs = np.where(fg)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    side = max(y1 - y0, x1 - x0)
    cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
    pad = np.pad(img, side, constant_values=background)
    return pad[
        cy + side - side // 2 : cy + side - side // 2 + side, cx + side - side // 2 : cx + side - side // 2 + side
    ]


def load_training_images(folder: str | Path, modality: str, resolution: int, min_std: float = 1e-3) -> torch.Tensor:
    """Read every image/slice under ``folder`` into model units, ``(N, 1, resolution, resolution)``.

    Parameters
    ----------
    folder : str or Path
        Folder (searched recursively); DICOM files of one series are read as slices.
    modality : {"ct", "mri", "pet", "generic"}
        Chooses the intensity normalisation (:data:`NORMALISATION`): CT expects HU (DICOM);
        other modalities are scaled per image to [0, 1] (0.5–99.5 percentiles).
    resolution : int
        Output side length.
    min_std : float
        Slices whose normalised standard deviation is below this are skipped as constant.

    Raises
    ------
    ValueError
        Empty folder, unreadable file (named), mixed/invalid content, or no usable slice.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"training data folder {folder} does not exist or is not a folder")
    if modality not in NORMALISATION:
        raise ValueError(f"unknown modality {modality!r}; use one of {', '.join(NORMALISATION)}")
    files = _files(folder)
    if not files:
        raise ValueError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    norm = NORMALISATION[modality]
    out, skipped = [], 0
    for f in files:
        try:
            vol, info = read_volume(f)
        except (ValueError, FileNotFoundError) as e:
            raise ValueError(f"cannot use training file {f}: {e}") from None
        if modality == "ct" and info.get("units") != "HU":
            raise ValueError(f"{f}: CT priors train on Hounsfield units (DICOM CT); this file has {info.get('units')}")
        for sl in vol:
            if modality == "ct":
                img = np.clip(sl, -1000.0, 3000.0)
                img = _crop(img, -900.0)
            else:
                lo, hi = np.percentile(sl, [0.5, 99.5])
                if hi - lo <= 0:
                    skipped += 1
                    continue
                img = _crop(np.clip((sl - lo) / (hi - lo), 0, 1), 0.05)
            img = resize(img, (resolution, resolution), anti_aliasing=True, preserve_range=True)
            u = (img - norm["offset"]) / norm["scale"]
            if u.std() < min_std:
                skipped += 1
                continue
            out.append(u.astype(np.float32))
    if not out:
        raise ValueError(f"no usable slices in {folder} ({skipped} constant slices skipped)")
    return torch.from_numpy(np.stack(out))[:, None]
