"""Build the shipped sample bundles in napari_diffrecon/data/ from real images that install offline.

Run:  python sample_data/make_samples.py [ct_sparse23] [mri_4x_8coils] [pet_lowcount]   (default: MRI and PET)

Sources (evaluation material only: never used to train a prior):

- ``ct_sparse23``: pydicom's bundled test image CT_small.dcm (a real 128×128 CT slice; pydicom is
  MIT-licensed), 23 parallel-beam views, 0.5% Gaussian noise.
- ``mri_4x_8coils``: pydicom's MR_small.dcm (a real 64×64 MR slice, MIT), resized to 128×128 with a
  smooth random phase, 8 simulated coils, 4× variable-density random Cartesian mask, Gaussian noise.
- ``pet_lowcount``: an FDG-like activity map derived from CT_small.dcm (tissue classes by HU, below),
  blurred to PET resolution, 180 views with attenuation, 10⁵ expected true counts, 20% randoms/scatter
  background, Poisson noise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import torch
from pydicom.data import get_testdata_file
from scipy.ndimage import gaussian_filter

from napari_diffrecon.io import write_measurement
from napari_diffrecon.physics import CartesianMRI, simulate_measurement
from napari_diffrecon.simulate import simulate_from_image

OUT = Path(__file__).resolve().parent.parent / "napari_diffrecon" / "data"


def _ct_hu() -> tuple[np.ndarray, float]:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    hu = ds.pixel_array.astype(float) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    return hu, float(ds.PixelSpacing[0])


def fdg_like_activity(hu: np.ndarray, fwhm_px: float = 2.0) -> np.ndarray:
    """An FDG-like relative activity map from a CT slice in HU (documented derivation, not physiology).

    Classes by HU with typical relative FDG uptake (SUV-like, soft tissue = 1): air/lung (< −300) 0,
    fat (−300…−30) 0.3, soft tissue/muscle (−30…80) 1.0, contrast-enhanced blood/organ (80…200) 1.6,
    cancellous bone / marrow (200…500) 1.2, cortical bone (> 500) 0.3; then a Gaussian blur of
    ``fwhm_px`` pixels (scanner resolution).
    """
    act = np.zeros_like(hu, dtype=float)
    act[(hu >= -300) & (hu < -30)] = 0.3
    act[(hu >= -30) & (hu < 80)] = 1.0
    act[(hu >= 80) & (hu < 200)] = 1.6
    act[(hu >= 200) & (hu < 500)] = 1.2
    act[hu >= 500] = 0.3
    return gaussian_filter(act, fwhm_px / 2.355)


def _round_mantissa(a: np.ndarray, bits: int = 8) -> np.ndarray:
    """Keep ``bits`` mantissa bits of float32 values (relative error < 2^-bits): smooth maps then compress."""
    f = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    drop = 23 - bits
    f = ((f + (1 << (drop - 1))) >> drop) << drop
    return f.view(np.float32)


def main(names: list[str] | None = None) -> None:
    names = names or ["mri_4x_8coils", "pet_lowcount"]  # ct_sparse23 is rebuilt only when named
    hu, px = _ct_hu()
    if "ct_sparse23" in names:
        _ct(hu, px)
    if "mri_4x_8coils" in names:
        _mri()
    if "pet_lowcount" in names:
        _pet(hu)
    for f in sorted(OUT.glob("*.npz")):
        print(f"{f.name}: {f.stat().st_size / 1e3:.0f} kB")


def _ct(hu: np.ndarray, px: float) -> None:
    m = simulate_from_image(hu, "ct", size=128, views=23, units="HU", pixel_size_mm=px, seed=0,
                            source="pydicom test file CT_small.dcm (MIT licence)")
    m.metadata["description"] = "Sparse-view CT (23 views), real CT slice, 0.5% Gaussian noise"
    print(write_measurement(m, OUT / "ct_sparse23.npz", overwrite=True))


def _mri() -> None:
    mr = pydicom.dcmread(get_testdata_file("MR_small.dcm")).pixel_array.astype(float)
    m = simulate_from_image(mr, "mri", size=128, accel=4, coils=8, mask_kind="random", seed=0,
                            source="pydicom test file MR_small.dcm (MIT licence)")
    m.metadata["description"] = "Accelerated MRI (4×, 8 coils), real MR slice with smooth phase, 0.2% noise"
    # Coil maps kept to 8 mantissa bits (relative error < 0.4%, far below what ESPIRiT recovers) so the
    # bundle stays small; the k-space is re-simulated with exactly these maps and the same noise.
    maps = m.operator["coil_maps"].astype(np.complex64)
    maps = (_round_mantissa(maps.real) + 1j * _round_mantissa(maps.imag)).astype(np.complex64)
    op = CartesianMRI(m.operator["mask"], maps)
    y = simulate_measurement(op, torch.from_numpy(m.ground_truth.astype(np.complex64)), m.noise, seed=0)
    m.data = y.numpy().astype(np.complex64)
    m.operator = op.spec()
    print(write_measurement(m, OUT / "mri_4x_8coils.npz", overwrite=True))


def _pet(hu: np.ndarray) -> None:
    act = fdg_like_activity(hu)
    m = simulate_from_image(act, "pet", size=128, views=180, counts=1e5, seed=0,
                            source="FDG-like activity map derived from pydicom's CT_small.dcm (MIT licence)")
    m.metadata["description"] = "Low-count PET (1e5 true counts), FDG-like map from a real CT slice"
    m.metadata["derivation"] = fdg_like_activity.__doc__.split("\n\n")[0] + " See sample_data/make_samples.py."
    print(write_measurement(m, OUT / "pet_lowcount.npz", overwrite=True))


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
