"""The shipped sample measurements: where they are and what each is (light: the CLI's --help lists them without
importing the readers; :func:`napari_diffrecon.io.load_sample` reads them)."""

from __future__ import annotations

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
SAMPLES = {
    "ct_sparse23": "Sparse-view CT (23 views)",
    "mri_4x_8coils": "Accelerated MRI (4×, 8 coils)",
    "pet_lowcount": "Low-count PET",
}
