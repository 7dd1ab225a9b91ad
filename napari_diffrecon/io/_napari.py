"""npe2 contributions: the bundle reader and the sample data (layer data only; no math here)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .bundle import BundleError, Measurement, read_measurement

LayerData = tuple[np.ndarray, dict[str, Any], str]


def _layers(m: Measurement, name: str) -> list[LayerData]:
    data = m.data
    if np.iscomplexobj(data):  # k-space: log magnitude is what people look at
        data = np.log1p(np.abs(data))
    meta = {"measurement": m, "operator": {k: v for k, v in m.operator.items() if not isinstance(v, np.ndarray)},
            "noise": {k: v for k, v in m.noise.items() if not isinstance(v, np.ndarray)}, "source": m.path}
    modality = m.operator.get("modality")
    layers: list[LayerData] = [(data, {"name": f"{name} measurement ({modality})", "metadata": meta}, "image")]
    if m.ground_truth is not None:
        gt = np.abs(m.ground_truth) if np.iscomplexobj(m.ground_truth) else m.ground_truth
        layers.insert(0, (gt, {"name": f"{name} ground truth", "metadata": meta}, "image"))
    return layers


def get_reader(path: str | list[str]) -> Callable[[str], list[LayerData]] | None:
    """Return a reader for napari-diffrecon bundles, None for anything else (other plugins may open it)."""
    if isinstance(path, list):
        return None
    p = Path(path)
    if p.suffix not in (".npz", ".h5"):
        return None
    try:
        if p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                if not {"measurement", "operator"} <= set(z.files):
                    return None
        else:
            import h5py

            with h5py.File(p, "r") as f:
                if "measurement" not in f or ("operator" not in f and "operator" not in f.attrs):
                    return None
    except Exception:  # not ours or unreadable: let napari try other readers
        return None
    return _read


def _read(path: str) -> list[LayerData]:
    try:
        m = read_measurement(path)
    except (BundleError, FileNotFoundError) as e:
        raise ValueError(f"napari-diffrecon could not open {Path(path).name}: {e}") from None
    return _layers(m, Path(path).stem)


def sample_ct_sparse23() -> list[LayerData]:
    """Sparse-view CT (23 views) of a real CT slice: ground truth + sinogram layers."""
    from . import load_sample

    return _layers(load_sample("ct_sparse23"), "CT 23 views")
