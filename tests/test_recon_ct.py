"""Samplers with the shipped CT prior on a real CT slice (pydicom's CT_small.dcm, never used in training).

Sparse-view CT at 64 px with few steps, so each test takes seconds on a CPU. The prior is loaded by its
shipped name; ``NAPARI_DIFFRECON_TEST_CT_PRIOR`` may point at another prior file (e.g. a training snapshot).
A missing shipped prior is an error, not a skip: the package must ship it.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch

from napari_diffrecon.metrics import psnr
from napari_diffrecon.reconstruct import RunSettings, data_kind, prepare_run, reconstruct
from napari_diffrecon.samplers import SamplerParams
from napari_diffrecon.samplers.defaults import recommended_params

PRIOR = os.environ.get("NAPARI_DIFFRECON_TEST_CT_PRIOR", "ct-phantom-128")
SIZE, VIEWS, STEPS = 64, 12, 15


@pytest.fixture(scope="module")
def ct_prior():
    from napari_diffrecon.priors import load_prior

    try:
        return load_prior(PRIOR)
    except FileNotFoundError as e:  # loud: the shipped weights belong in napari_diffrecon/priors/weights/
        pytest.fail(f"CT prior {PRIOR!r} not available: {e}")


@pytest.fixture(scope="module")
def sparse_ct():
    """12-view CT of the real slice at 64 px (0.5% Gaussian noise, fixed seed)."""
    return _real_ct(views=VIEWS)


def _real_ct(**kw):
    import pydicom
    from pydicom.data import get_testdata_file

    from napari_diffrecon.simulate import simulate_from_image

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    px = float(ds.PixelSpacing[0]) * hu.shape[0] / SIZE
    return simulate_from_image(hu, "ct", size=SIZE, units="HU", pixel_size_mm=px, seed=0, **kw)


def _run(m, prior, method, hot_start=None, n_samples=1, seed=0, **p):
    params = SamplerParams(**{"n_steps": STEPS, **p})
    return reconstruct(m, RunSettings(method=method, params=params, hot_start=hot_start, n_samples=n_samples,
                                      seed=seed), prior=prior)


@pytest.fixture(scope="module")
def references(sparse_ct, ct_prior):
    fbp = reconstruct(sparse_ct, RunSettings(method="fbp"))
    uncond = _run(sparse_ct, ct_prior, "ddim", eta=0.85)
    return {"fbp": fbp, "fbp_psnr": psnr(fbp.reconstruction, sparse_ct.ground_truth), "uncond": uncond}


# (method, parameters, hot start): DPS needs ~1000 steps from noise, so with 10 steps it refines FBP.
CASES = {
    "dds": ({"gamma": 1.0, "cg_iters": 5, "eta": 0.85}, None),
    "song": ({"lam": 0.84, "cg_iters": 5}, None),
    "mcg": ({"zeta": 0.5, "lam": 1.0, "cg_iters": 5, "eta": 1.0}, None),
    "dps": ({"zeta": 2.0, "eta": 1.0, "n_steps": 10, "t0": 0.3}, "fbp"),
    # The consistency sampler with the diffusion prior (its control); the distilled model is tested below.
    "consistency": ({"n_steps": 4, "t0": 0.25, "gamma": 3.0, "cg_iters": 5}, "fbp"),
}


@pytest.mark.parametrize("method", list(CASES))
def test_conditional_sampler_fits_the_data_and_beats_fbp(method, sparse_ct, ct_prior, references):
    params, hot = CASES[method]
    r = _run(sparse_ct, ct_prior, method, hot_start=hot, **params)
    gt = sparse_ct.ground_truth
    # Data consistency: far below the unconditional sample's residual, and not far above the noise floor.
    assert r.residual < 0.25 * references["uncond"].residual
    assert r.residual < 0.05
    # Quality: better than filtered back-projection (the hot start of DPS).
    gain = psnr(r.reconstruction, gt) - references["fbp_psnr"]
    assert gain > 0.5, f"{method}: {gain:+.2f} dB over FBP"


def test_dds_hot_start_improves_on_its_start_image(sparse_ct, ct_prior, references):
    r = _run(sparse_ct, ct_prior, "dds", hot_start="fbp", n_steps=8, t0=0.3)
    assert psnr(r.reconstruction, sparse_ct.ground_truth) > references["fbp_psnr"] + 0.5
    assert r.provenance["nfe"] == 8 and r.provenance["hot_start_method"] == "fbp"


def test_runs_are_deterministic_and_parameters_change_runs_in_flight(sparse_ct, ct_prior):
    a = _run(sparse_ct, ct_prior, "dds", n_samples=2, seed=3, n_steps=8)
    b = _run(sparse_ct, ct_prior, "dds", n_samples=2, seed=3, n_steps=8)
    c = _run(sparse_ct, ct_prior, "dds", n_samples=2, seed=4, n_steps=8)
    np.testing.assert_array_equal(a.mean, b.mean)
    np.testing.assert_array_equal(a.std, b.std)
    assert not np.allclose(a.mean, c.mean)
    assert float(a.std.mean()) > 0  # two posterior samples in one batch differ
    # The user drops the data weight after two steps: the rest of the run follows the prior alone.
    settings = RunSettings(method="dds", params=SamplerParams(n_steps=8), n_samples=2, seed=3)
    _, start, _ = prepare_run(sparse_ct, settings, ct_prior)
    last = None
    for it in start(yield_every=1):
        if it.step == 2:
            settings.params.gamma = 0.0
        last = it
    changed = last.x0_hat.abs().mean(0).cpu().numpy()
    assert not np.allclose(changed, a.mean, atol=1e-4)
    assert float(last.data_residual.mean()) > 2 * a.residual


def test_dds_without_data_steps_is_ddim_with_the_trained_prior(sparse_ct, ct_prior):
    a = _run(sparse_ct, ct_prior, "dds", n_steps=5, cg_iters=0, seed=1)
    b = _run(sparse_ct, ct_prior, "ddim", n_steps=5, seed=1)
    np.testing.assert_allclose(a.mean, b.mean, atol=1e-6)
    a = _run(sparse_ct, ct_prior, "dds", n_steps=5, gamma=0.0, seed=1)
    np.testing.assert_allclose(a.mean, b.mean, atol=1e-6)


def test_iterates_carry_state_estimate_residual_and_timing(sparse_ct, ct_prior):
    settings = RunSettings(method="dds", params=SamplerParams(n_steps=6), seed=0)
    problem, start, _ = prepare_run(sparse_ct, settings, ct_prior)
    its = []
    gen = start()
    for it in gen:
        its.append(it)
    assert its[-1].done and its[-1].step == its[-1].n_steps == 6 and its[-1].nfe == 6
    assert all(torch.isfinite(it.x_t).all() and it.x0_hat.shape == (1, SIZE, SIZE) for it in its)
    outside = ~problem.operator.support
    # what is shown is zero outside the field of view; the noisy state inside is not
    assert all(it.x_t[:, outside].abs().max() == 0 and it.x0_hat[:, outside].abs().max() == 0 for it in its)
    assert its[0].x_t[:, ~outside].std() > 0.1 * its[0].x_t[:, ~outside].abs().mean()
    assert [it.elapsed for it in its] == sorted(it.elapsed for it in its)
    assert its[-1].data_residual.shape == (1,)


def test_shipped_consistency_model_beats_fbp_in_four_network_evaluations(sparse_ct, references):
    from napari_diffrecon.priors import default_prior_for, load_prior

    name = default_prior_for("ct", consistency=True)
    cm = load_prior(name)
    assert cm.is_consistency, f"no shipped CT consistency model ({name} is a diffusion prior)"
    r = _run(sparse_ct, cm, "consistency", hot_start="fbp", n_steps=4, t0=0.25, gamma=3.0, cg_iters=5)
    assert r.provenance["nfe"] == 4
    assert r.residual < 0.05
    assert psnr(r.reconstruction, sparse_ct.ground_truth) > references["fbp_psnr"] + 1.0


def test_bfloat16_network_gives_the_float32_reconstruction(sparse_ct, ct_prior):
    """--precision bfloat16 (autocast network, float32 data step) stays within 0.1 dB of float32 and says so."""
    full = _run(sparse_ct, ct_prior, "dds", hot_start="fbp", n_steps=8, t0=0.3)
    low = reconstruct(sparse_ct, RunSettings(method="dds", params=SamplerParams(n_steps=8, t0=0.3), hot_start="fbp",
                                             precision="bfloat16"), prior=ct_prior)
    gt = sparse_ct.ground_truth
    assert not np.array_equal(low.reconstruction, full.reconstruction)
    assert abs(psnr(low.reconstruction, gt) - psnr(full.reconstruction, gt)) < 0.1
    assert low.reconstruction.dtype == np.float32 and low.provenance["settings"]["precision"] == "bfloat16"
    # the prior is shared (GUI cache): the next run states its own precision and gets the float32 numbers back
    again = _run(sparse_ct, ct_prior, "dds", hot_start="fbp", n_steps=8, t0=0.3)
    assert np.array_equal(again.reconstruction, full.reconstruction) and ct_prior.precision == "float32"


@pytest.mark.parametrize("method", ["song", "mcg"])
def test_hard_projection_samplers_take_one_pseudo_inverse_step_on_noisy_data(method, sparse_ct, ct_prior):
    """Song / MCG on low-dose counts (60 views, 3000 photons per bin): the tuned value for noisy data, one CG step per
    pseudo-inverse, keeps the measurement noise out of the image; the noise-free value (5 steps, still the tuned one
    for the nearly noise-free sparse-view data) fits the noise and falls far below FBP."""
    modality, coils, noisy = data_kind(sparse_ct)
    assert not noisy and recommended_params(method, modality, coils=coils, noisy=noisy).cg_iters == 5
    m = _real_ct(views=60, photons=3e3)
    modality, coils, noisy = data_kind(m)  # counts: noisy whatever the floor
    assert (modality, noisy) == ("ct", True)
    tuned = recommended_params(method, modality, coils=coils, noisy=noisy, n_steps=30)
    assert tuned.cg_iters == 1
    gt = m.ground_truth
    fbp = psnr(reconstruct(m, RunSettings(method="fbp")).reconstruction, gt)
    one = reconstruct(m, RunSettings(method=method, params=tuned, seed=0), prior=ct_prior)
    five = reconstruct(m, RunSettings(method=method, params=dataclasses.replace(tuned, cg_iters=5), seed=0),
                       prior=ct_prior)
    floor = one.provenance["noise_floor"]
    assert psnr(one.reconstruction, gt) > psnr(five.reconstruction, gt) + 3.0
    assert psnr(one.reconstruction, gt) > fbp - 1.0
    assert one.residual > 0.7 * floor > five.residual  # the 5-step run reproduces the noise; the tuned one does not
    assert not any("CG steps per projection" in w for w in one.provenance["warnings"])
    assert any("--cg-iters 1" in w for w in five.provenance["warnings"])


def test_limited_angle_starts_from_tv_which_beats_the_fbp_start(ct_prior):
    """A 90° arc: the default hot start is TV (reconstruct.default_hot_start) and, with the tuned DDS-hot values, its
    posterior mean beats the one started from FBP, whose missing-wedge streaks a short reverse process keeps."""
    from napari_diffrecon.reconstruct import default_hot_start

    m = _real_ct(limited_angle=90.0)
    assert default_hot_start(m) == "tv"
    _, coils, noisy = data_kind(m)
    params = recommended_params("dds", "ct", hot_start=True, coils=coils, noisy=noisy)
    out = {}
    for hot in (None, "fbp"):  # None: the data's default start
        r = reconstruct(m, RunSettings(method="dds", params=dataclasses.replace(params), hot_start=hot or
                                       default_hot_start(m), n_samples=2, seed=0), prior=ct_prior)
        out[r.provenance["hot_start_method"]] = psnr(r.mean, m.ground_truth)
    fbp = psnr(reconstruct(m, RunSettings(method="fbp")).reconstruction, m.ground_truth)
    assert out["tv"] > out["fbp"] + 1.0 > fbp + 1.0, out


def test_provenance_names_the_prior_object_that_ran_not_another_in_the_settings(sparse_ct, ct_prior, tmp_path):
    """Rerunning a provenance record's settings must load the prior that made the result."""
    from napari_diffrecon.priors.registry import WEIGHTS_DIR

    def recorded(named):
        s = RunSettings(method="dds", params=SamplerParams(n_steps=2), prior=named)
        return reconstruct(sparse_ct, s, prior=ct_prior).provenance

    prov = recorded("mri-brain-128")  # settings name one prior, the caller passed another object
    assert prov["settings"]["prior"] == prov["prior"] == ct_prior.card.name
    card_path = str(WEIGHTS_DIR / f"{ct_prior.card.name}.json")
    assert recorded(card_path)["settings"]["prior"] == card_path  # a path to the same card is kept as given
    assert recorded(None)["settings"]["prior"] == ct_prior.card.name  # None (the default) becomes the shipped name
    # a prior loaded from a file is recorded by its path, which a rerun can load (its card name is not shipped)
    from napari_diffrecon.priors import load_prior

    copy = tmp_path / "my-ct.json"
    card_text = (WEIGHTS_DIR / f"{ct_prior.card.name}.json").read_text(encoding="utf-8")
    copy.write_text(card_text.replace('"ct-phantom-128"', '"my-ct"'), encoding="utf-8")
    (tmp_path / "my-ct.safetensors").write_bytes((WEIGHTS_DIR / f"{ct_prior.card.name}.safetensors").read_bytes())
    mine = load_prior(copy)
    s = RunSettings(method="dds", params=SamplerParams(n_steps=2), prior="ct-phantom-128")
    prov = reconstruct(sparse_ct, s, prior=mine).provenance
    assert prov["prior"] == "my-ct" and prov["settings"]["prior"] == str(copy.resolve())
    assert load_prior(prov["settings"]["prior"]).card.name == "my-ct"


def test_orientation_ensemble_lifts_the_mean_of_samples_on_the_real_slice(ct_prior):
    """The bundled 23-view sample (the demo's) at 128², DDS hot started as tuned, four samples: denoised in four
    orientations (identity, half turn, the two diagonal reflections) their mean is better than four upright samples'
    (the shipped CT prior is not exactly equivariant and its orientation-dependent errors average out), while the
    first sample, always upright, is the same. benchmarks/recon.py measures it at 8 samples on every task."""
    from napari_diffrecon.io import load_sample
    from napari_diffrecon.reconstruct import default_hot_start

    m = load_sample("ct_sparse23")
    kind = data_kind(m)
    out = {}
    for o in (1, 4):
        params = recommended_params("dds", "ct", hot_start=True, coils=kind[1], noisy=kind[2], orientations=o)
        out[o] = reconstruct(m, RunSettings(method="dds", params=params, n_samples=4, seed=0, keep_samples=True,
                                            hot_start=default_hot_start(m)), prior=ct_prior)
    gt = m.ground_truth
    np.testing.assert_allclose(out[4].samples[0], out[1].samples[0], atol=1e-5)
    gain = psnr(out[4].mean, gt) - psnr(out[1].mean, gt)
    assert gain > 0.1, f"{gain:+.2f} dB"
    assert out[4].provenance["settings"]["params"]["orientations"] == 4
