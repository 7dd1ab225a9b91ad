"""Build the shipped sample bundles in napari_diffrecon/data/ from real images that install offline.

Run:  python sample_data/make_samples.py

Source: pydicom's bundled test image CT_small.dcm (a real 128×128 CT slice; pydicom is MIT-licensed).
It is evaluation material: never used to train a prior.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file

from napari_diffrecon.io import write_measurement
from napari_diffrecon.simulate import simulate_from_image

OUT = Path(__file__).resolve().parent.parent / "napari_diffrecon" / "data"


def main() -> None:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    hu = ds.pixel_array.astype(float) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    px = float(ds.PixelSpacing[0])
    m = simulate_from_image(hu, "ct", size=128, views=23, units="HU", pixel_size_mm=px, seed=0,
                            source="pydicom test file CT_small.dcm (MIT licence)")
    m.metadata["description"] = "Sparse-view CT (23 views), real CT slice, 0.5% Gaussian noise"
    print(write_measurement(m, OUT / "ct_sparse23.npz", overwrite=True))


if __name__ == "__main__":
    main()
