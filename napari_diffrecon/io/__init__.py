"""Readers and writers: measurement bundles, medical images, results, shipped samples."""

from __future__ import annotations

from .._samples import DATA_DIR, SAMPLES
from .bundle import (
    BundleError,
    Measurement,
    OutputPathError,
    check_output_path,
    read_measurement,
    write_measurement,
    write_result,
)
from .export import export_image, read_exported
from .fastmri import read_fastmri
from .images import read_image

__all__ = [
    "BundleError",
    "OutputPathError",
    "Measurement",
    "check_output_path",
    "read_measurement",
    "write_measurement",
    "write_result",
    "read_image",
    "read_fastmri",
    "export_image",
    "read_exported",
    "SAMPLES",
    "load_sample",
]



def load_sample(name: str = "ct_sparse23") -> Measurement:
    """A shipped sample bundle by name (see ``SAMPLES``)."""
    if name not in SAMPLES:
        raise FileNotFoundError(f"no sample {name!r}; shipped samples: {', '.join(SAMPLES)}")
    return read_measurement(DATA_DIR / f"{name}.npz")
