"""Hallucination guard: support maps flag what the measurements do not constrain or contradict."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_diffrecon.baselines import reconstruct_baseline
from napari_diffrecon.io import Measurement
from napari_diffrecon.physics import build_likelihood, build_operator
from napari_diffrecon.priors.prior import GaussianPrior
from napari_diffrecon.reconstruct import RunSettings, reconstruct
from napari_diffrecon.samplers import SamplerParams
from napari_diffrecon.support import classical_difference, posterior_std, residual_backprojection, support_maps

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # timing-sensitive batched runs


def _disk(n, cy, cx, r):
    yy, xx = np.mgrid[:n, :n]
    return ((yy - cy) ** 2 + (xx - cx) ** 2 <= r**2).astype(np.float32)


def test_inpainting_hole_is_flagged_measured_region_is_not():
    rng = np.random.default_rng(0)
    n, sig = 32, 0.05
    x = rng.normal(0, 0.5, (n, n)).astype(np.float32)
    mask = np.ones((n, n))
    mask[8:20, 8:20] = 0
    y = ((x + rng.normal(0, sig, (n, n))) * mask).astype(np.float32)
    spec = {"modality": "inpaint", "image_shape": [n, n], "mask": mask}
    meas = Measurement(y, spec, {"model": "gaussian", "sigma": sig})
    st = RunSettings(method="dds", params=SamplerParams(n_steps=20, cg_iters=5), n_samples=4, keep_samples=True)
    r = reconstruct(meas, st, prior=GaussianPrior(0.5))
    op, lik = meas.build_operator(), meas.build_likelihood()
    cl = reconstruct_baseline("cg", op, meas.to_tensor(), lik)
    s = support_maps(r.reconstruction, op, meas.to_tensor(), lik, samples=r.samples, classical=cl)
    hole = mask == 0
    inner = np.zeros_like(hole)
    inner[10:18, 10:18] = True
    assert s.mask[inner].mean() == 1.0
    far = np.ones_like(hole)
    far[5:23, 5:23] = False  # away from the hole's smoothed edge
    assert s.mask[far].mean() < 0.05
    assert s.score[hole].mean() > 4 * s.score[far].mean()
    assert s.summary()["weights"] == {"std": 1.0, "residual": 1.0, "difference": 0.25}


def test_residual_map_flags_structure_the_ct_data_contradict():
    n = 32
    x = 0.5 * _disk(n, 16, 16, 12)
    spec = {"modality": "ct", "image_shape": [n, n], "angles_deg": np.linspace(0, 180, 24, endpoint=False)}
    op = build_operator(spec)
    m = op.forward(torch.from_numpy(x))
    lesion = _disk(n, 12, 20, 2)
    fake = x + 0.5 * lesion  # a lesion the measured object does not have
    res = residual_backprojection(op, fake, m, build_likelihood({"model": "gaussian", "sigma": 0.01}))
    assert res[lesion > 0].mean() > 3 * res[(lesion == 0) & (_disk(n, 16, 16, 12) > 0)].mean()
    assert np.abs(residual_backprojection(op, x, m)).max() < 1e-4  # the truth is fully supported


def test_poisson_residual_map_and_shapes():
    n = 24
    x = 5 * _disk(n, 12, 12, 9)
    spec = {"modality": "pet", "image_shape": [n, n], "angles_deg": np.linspace(0, 180, 20, endpoint=False)}
    op = build_operator(spec)
    lik = build_likelihood({"model": "poisson", "background": 0.5})
    m = op.forward(torch.from_numpy(x)) + 0.5
    lesion = _disk(n, 8, 14, 2)
    res = residual_backprojection(op, x + 5 * lesion, m, lik)
    assert res.shape == (n, n) and np.isfinite(res).all()
    assert res[lesion > 0].mean() > 3 * res[(lesion == 0) & (x > 0)].mean()


def test_component_maps_and_errors():
    s = np.stack([np.zeros((4, 4)), np.ones((4, 4))])
    np.testing.assert_allclose(posterior_std(s), np.sqrt(0.5))
    assert posterior_std(s[:1]).max() == 0
    assert classical_difference(np.ones((4, 4)) * 1j, np.zeros((4, 4))).max() == 1
    with pytest.raises(ValueError, match="shape"):
        classical_difference(np.ones((4, 4)), np.ones((3, 3)))
    with pytest.raises(ValueError, match="at least one"):
        support_maps(np.ones((4, 4)))


def test_support_map_from_a_pooled_std_is_not_smoothed_twice():
    # A run's std layer is pooled over RunSettings.std_pool px; given that width, the support map smooths it only by
    # the rest and flags about the same voxels as from the raw samples (the calibration of its threshold).
    from napari_diffrecon.uncertainty import summarize

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:48, :48]
    spread = 0.02 + 0.3 * (((yy - 20) ** 2 + (xx - 30) ** 2) < 36)
    samples = 1.0 + spread * rng.standard_normal((8, 48, 48))
    x = samples.mean(0)
    ref = support_maps(x, samples=samples)
    pooled = summarize(samples, std_pool=1.0)["std"]
    told = support_maps(x, std=pooled, std_pooled_px=1.0)
    twice = support_maps(x, std=pooled)
    err_told = np.abs(told.score - ref.score).mean()
    assert err_told < 0.85 * np.abs(twice.score - ref.score).mean()
    assert (told.mask != ref.mask).mean() < 0.02
