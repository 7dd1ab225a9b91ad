"""Shared fixtures: real images that install offline with our dependencies (evaluation material only)."""

from __future__ import annotations

import numpy as np
import pytest


def _ct_slice_attenuation(n: int | None = None) -> np.ndarray:
    import pydicom
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    mu = np.clip(hu + 1000.0, 0, None) / 1000.0  # relative to water, ≥ 0
    if n is not None and n != mu.shape[0]:
        from skimage.transform import resize

        mu = resize(mu, (n, n), anti_aliasing=True)
    size = mu.shape[0]
    yy, xx = np.mgrid[:size, :size]
    c = size // 2
    mu[(yy - c) ** 2 + (xx - c) ** 2 > c**2] = 0.0
    return mu


@pytest.fixture(scope="session")
def ct_slice() -> np.ndarray:
    """A real 128×128 CT slice (pydicom's CT_small.dcm) as attenuation relative to water, zero outside the circle."""
    return _ct_slice_attenuation()


@pytest.fixture(scope="session")
def mr_slice() -> np.ndarray:
    """A real 64×64 MR slice (pydicom's MR_small.dcm), scaled to [0, 1]."""
    import pydicom
    from pydicom.data import get_testdata_file

    img = pydicom.dcmread(get_testdata_file("MR_small.dcm")).pixel_array.astype(np.float64)
    return img / img.max()


@pytest.fixture
def one_torch_thread():
    """torch on one thread for the test (timing-sensitive tests on a shared machine), restored afterwards."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def gui_config_in_tmp(tmp_path, monkeypatch, one_torch_thread):
    """GUI tests: last-used settings go to a temporary folder, never the real home; torch on one thread."""
    monkeypatch.setenv("NAPARI_DIFFRECON_CONFIG_DIR", str(tmp_path / "config"))
    yield


@pytest.fixture(scope="session")
def tiny_priors(tmp_path_factory):
    """Card paths of tiny untrained priors (never the shipped ones), 128²: CT (real), PET (real), MRI (complex)."""
    import torch

    from napari_diffrecon.priors import ModelCard, NetworkPrior, save_prior
    from napari_diffrecon.priors.network import build_network
    from napari_diffrecon.priors.sources import normalisation_for

    out = tmp_path_factory.mktemp("priors")
    paths = {}
    for modality, ch in (("ct", 1), ("mri", 2), ("pet", 1)):
        torch.manual_seed(0)
        card = ModelCard(
            name=f"tiny-{modality}", modality=modality, channels=ch, resolution=128,
            architecture={"type": "diffusers.UNet2DModel", "preset": "tiny"},
            normalisation=normalisation_for(modality, ch),
            training={"steps": 0, "data": {"sources": ["untrained test network"]}, "licence": "BSD-3-Clause"},
        )
        net = build_network({**card.architecture, "channels": ch})
        paths[modality] = save_prior(NetworkPrior(net, card), out / f"tiny-{modality}")[1]
    return paths


@pytest.fixture
def notes():
    """GUI tests: messages of the napari notifications shown during the test."""
    from napari.utils.notifications import notification_manager

    got: list[str] = []

    def _collect(event):
        n = getattr(event, "value", event)
        got.append(str(getattr(n, "message", n)))

    notification_manager.notification_ready.connect(_collect)
    yield got
    notification_manager.notification_ready.disconnect(_collect)
