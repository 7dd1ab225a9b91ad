"""Coil maps: simulated maps are normalised; ESPIRiT recovers them from the calibration region."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.transform import resize

from napari_diffrecon.physics.coils import estimate_coil_maps, simulate_coil_maps
from napari_diffrecon.physics.masks import make_mask
from napari_diffrecon.physics.mri import centered_fft2


def test_simulated_maps_are_normalised_and_distinct():
    s = simulate_coil_maps((40, 48), 6, seed=2)
    assert s.shape == (6, 40, 48) and s.dtype == np.complex64
    np.testing.assert_allclose((np.abs(s) ** 2).sum(0), 1.0, rtol=1e-5)
    assert np.abs(s[0] - s[3]).mean() > 0.1
    assert np.array_equal(simulate_coil_maps((8, 8), 1), np.ones((1, 8, 8), np.complex64))
    assert np.array_equal(simulate_coil_maps((40, 48), 6, seed=2), s)  # reproducible under a seed
    assert not np.array_equal(simulate_coil_maps((40, 48), 6, seed=3), s)
    for bad in (dict(shape=(40.5, 48), n_coils=6), dict(shape=(40, 48), n_coils=None),
                dict(shape=(40, 48), n_coils=6, phase_scale=float("nan"))):
        with pytest.raises(ValueError):
            simulate_coil_maps(**bad)


def test_espirit_recovers_the_maps_on_a_real_mr_slice(mr_slice):
    img = resize(mr_slice, (96, 96), anti_aliasing=True)
    true = simulate_coil_maps((96, 96), 6, seed=0)
    k = centered_fft2(torch.tensor(true * img, dtype=torch.complex64)).numpy()
    mask = np.zeros((96, 96), np.float32)
    mask[:, ::3] = 1
    mask[:, 36:60] = 1  # undersampled outside a fully sampled centre
    est = estimate_coil_maps(k * mask, calib_size=24)
    obj = img > 0.1
    corr = np.abs((est.conj() * true).sum(0)) / np.sqrt((np.abs(est) ** 2).sum(0) * (np.abs(true) ** 2).sum(0) + 1e-12)
    assert corr[obj].mean() > 0.95
    combined = np.abs((est.conj() * true * img).sum(0))
    assert np.linalg.norm((combined - img)[obj]) / np.linalg.norm(img[obj]) < 0.1


def test_espirit_errors():
    with pytest.raises(ValueError, match="multi-coil"):
        estimate_coil_maps(np.zeros((32, 32)))
    k = np.zeros((4, 32, 32), np.complex64)
    with pytest.raises(ValueError, match="not fully sampled"):
        estimate_coil_maps(k, calib_size=16)
    with pytest.raises(ValueError, match="calib"):
        estimate_coil_maps(np.ones((4, 32, 32)), calib_size=4)


def test_espirit_auto_calibration_from_a_narrow_fastmri_centre(mr_slice):
    """A 4× equispaced fastMRI mask at 128 columns has a 10-column centre: the 6-wide kernel is narrowed, so the
    maps cover the object (with the 6×6 kernel only a third of the object kept maps)."""
    img = resize(mr_slice, (128, 128), anti_aliasing=True)
    obj = img > 0.1
    true = simulate_coil_maps((128, 128), 8, seed=0)
    k = centered_fft2(torch.tensor(true * img, dtype=torch.complex64)).numpy()
    mask = make_mask("equispaced", (128, 128), 4, seed=0)
    with pytest.warns(UserWarning, match="narrow"):
        est, ev = estimate_coil_maps(k * mask, calib_size=None, return_eigenvalues=True, mask=mask)
    assert (ev[obj] >= 0.95).mean() > 0.95
    np.testing.assert_allclose((np.abs(est[:, obj]) ** 2).sum(0), 1, atol=1e-4)
    corr = np.abs((est.conj() * true).sum(0)) / np.sqrt((np.abs(est) ** 2).sum(0) * (np.abs(true) ** 2).sum(0) + 1e-12)
    assert corr[obj].mean() > 0.9
    with pytest.raises(ValueError, match="mask must be"):
        estimate_coil_maps(k * mask, calib_size=None, mask=np.ones(5))
