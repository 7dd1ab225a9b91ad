"""Readers and writers: measurement bundles, medical images, results, shipped samples."""

from __future__ import annotations

from pathlib import Path

from .bundle import BundleError, Measurement, read_measurement, write_measurement, write_result
from .images import read_image

__all__ = [
    "BundleError",
    "Measurement",
    "read_measurement",
    "write_measurement",
    "write_result",
    "read_image",
    "SAMPLES",
    "load_sample",
]

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
SAMPLES = {"ct_sparse23": "Sparse-view CT (23 views)"}


def load_sample(name: str = "ct_sparse23") -> Measurement:
    """A shipped sample bundle by name (see ``SAMPLES``)."""
    if name not in SAMPLES:
        raise FileNotFoundError(f"no sample {name!r}; shipped samples: {', '.join(SAMPLES)}")
    return read_measurement(DATA_DIR / f"{name}.npz")
