"""The shipped priors: present, documented, loadable by name, and behaving as denoisers on real images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_diffrecon.priors import default_prior_for, list_priors, load_prior
from napari_diffrecon.priors.registry import WEIGHTS_DIR

SHIPPED = {"ct-phantom-128": ("ct", 1), "mri-brain-128": ("mri", 2), "pet-phantom-128": ("pet", 1)}


def test_every_modality_has_a_shipped_prior_with_a_full_card():
    cards = list_priors()
    assert set(SHIPPED) <= set(cards)
    for name, (modality, channels) in SHIPPED.items():
        card = cards[name]
        assert (card.modality, card.channels) == (modality, channels)
        assert card.resolution >= 128
        tr = card.training
        assert tr["steps"] > 0 and np.isfinite(tr["final_val_loss"])
        assert tr["data"]["source"].startswith("builtin:") and tr["data"]["licence"]
        assert "napari-diffrecon train" in tr["command"]
        assert card.normalisation["native_units"] in ("HU", "magnitude", "activity")
        size = (WEIGHTS_DIR / f"{name}.safetensors").stat().st_size
        assert size < 16e6, f"{name} weights are {size / 1e6:.1f} MB: shipped priors must stay a few MB"
    assert default_prior_for("ct") == "ct-phantom-128"
    assert default_prior_for("mri", complex_=True) == "mri-brain-128"
    assert default_prior_for("pet") == "pet-phantom-128"


def _real_ct_model_units(n: int = 128) -> torch.Tensor:
    import pydicom
    from pydicom.data import get_testdata_file
    from skimage.transform import resize

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    hu = resize(hu, (n, n), anti_aliasing=True, preserve_range=True)
    return torch.tensor(hu / 1000.0, dtype=torch.float32)[None, None]


@pytest.mark.parametrize("name", list(SHIPPED))
def test_shipped_denoiser_is_identity_at_small_sigma_and_smooth_at_large_sigma(name):
    prior = load_prior(name)
    torch.manual_seed(0)
    res = prior.card.resolution
    x = torch.rand(1, prior.channels, res, res) * 2 - 1
    with torch.no_grad():
        small = prior.denoise(x, 1e-3)
        big = prior.denoise(torch.randn(2, prior.channels, res, res) * 40.0, 40.0)
    assert (small - x).abs().max() < 0.02
    # At very large σ, x0_hat ≈ E[x0]: far smoother than the input and within the data's range.
    assert big.abs().max() < 3.5
    assert big.std() < 0.6


def test_shipped_ct_prior_denoises_a_real_ct_it_never_saw():
    prior = load_prior("ct-phantom-128")
    clean = _real_ct_model_units()
    gen = torch.Generator().manual_seed(0)
    for sigma, min_gain_db in ((0.1, 5.0), (0.2, 8.0)):
        noisy = clean + sigma * torch.randn(clean.shape, generator=gen)
        with torch.no_grad():
            den = prior.denoise(noisy, sigma)
        gain = 10 * torch.log10(((noisy - clean) ** 2).mean() / ((den - clean) ** 2).mean())
        assert gain > min_gain_db, f"σ={sigma}: only {float(gain):.1f} dB better than the noisy input"


def _real_mr_unit(n: int = 128, fdg: bool = False) -> np.ndarray:
    """pydicom's MR_small (a real MR slice; evaluation material, never trained on) or an FDG-like map made from it at
    its native grid (as in benchmarks/priors.py), resized to ``n`` and scaled to its 99.5th percentile."""
    import pydicom
    from pydicom.data import get_testdata_file
    from skimage.transform import resize

    from napari_diffrecon.simulate import activity_from_anatomy

    img = pydicom.dcmread(get_testdata_file("MR_small.dcm")).pixel_array.astype(np.float64)
    if fdg:
        img = activity_from_anatomy(img, "mr")
    img = resize(img, (n, n), anti_aliasing=True, preserve_range=True)
    return np.clip(img / np.percentile(img, 99.5), 0, 1.2)


def _gain_and_tv(prior, clean: np.ndarray, sigma: float) -> tuple[float, float, float]:
    """(prior PSNR, best-of-grid TV PSNR, noisy PSNR) of denoising ``clean`` (model units, (C, H, W)) at ``sigma``."""
    from skimage.restoration import denoise_tv_chambolle

    def psnr(x: np.ndarray) -> float:
        return float(10 * np.log10((clean.max() - clean.min()) ** 2 / np.mean((x - clean) ** 2)))

    noisy = clean + sigma * np.random.default_rng(0).standard_normal(clean.shape)
    with torch.no_grad():
        den = prior.denoise(torch.tensor(noisy[None], dtype=torch.float32), sigma)[0].numpy()
    span = float(clean.max() - clean.min())
    tv = max(psnr(denoise_tv_chambolle(noisy, weight=w * span * sigma / 0.1, channel_axis=0))
             for w in (0.02, 0.04, 0.07, 0.1, 0.15, 0.2, 0.3))
    return psnr(den), tv, psnr(noisy)


def test_shipped_mri_and_pet_priors_denoise_real_images_they_never_saw():
    # The first 0.64M-parameter MRI/PET priors were below oracle TV; the shipped 5M ones are not (benchmarks/priors.py
    # has the full comparison with NLM on more images). Real MR: within 0.6 dB of the best TV weight (above it on the
    # abdominal MR, below on this one; the first prior was 1.9–2.1 dB below); an FDG-like map made from it: > 3.3 dB
    # above the best TV weight (first PET prior: +3.0, this one +3.6).
    mr = _real_mr_unit()
    mri = load_prior("mri-brain-128")
    u = mri.to_model(torch.tensor(mr, dtype=torch.float32)).numpy()
    for sigma, min_gain in ((0.1, 12.0), (0.2, 14.0)):
        p, tv, noisy = _gain_and_tv(mri, np.stack([u, np.zeros_like(u)]), sigma)
        assert p - noisy > min_gain and p > tv - 0.6, (sigma, p, tv, noisy)
    pet = load_prior("pet-phantom-128")
    fdg = _real_mr_unit(fdg=True)
    u = pet.to_model(torch.tensor(fdg, dtype=torch.float32)).numpy()[None]
    for sigma in (0.1, 0.2):
        p, tv, noisy = _gain_and_tv(pet, u, sigma)
        assert p > tv + 3.3, (sigma, p, tv, noisy)


def test_shipped_mri_consistency_model_improves_on_its_start_in_four_evaluations():
    """The shipped MRI consistency model (distilled from the shipped 5M MRI prior) on a real MR slice it never saw:
    4× single-coil k-space at 128 px, hot start from CG at t0 0.25, 4 network evaluations. Measured: 25.55 dB vs CG
    24.56 (the model it replaced, distilled from the first MRI prior: 24.29, below its start). Not asserted, and not
    met: TV at its default weight is better here, 26.62 dB (the test used to compare with a 300-iteration TV at a
    weight for CT, 25.18, and say the model beat it)."""
    from napari_diffrecon.metrics import psnr
    from napari_diffrecon.reconstruct import RunSettings, reconstruct
    from napari_diffrecon.samplers.defaults import recommended_params
    from napari_diffrecon.simulate import simulate_from_image

    name = default_prior_for("mri", complex_=True, consistency=True)
    cm = load_prior(name)
    assert cm.is_consistency and cm.card.training["parameters"] > 4e6, name  # not the first, 0.64M-parameter one
    m = simulate_from_image(_real_mr_unit(128), "mri", size=128, accel=4.0, seed=0)
    gt = np.abs(m.ground_truth)
    start = psnr(reconstruct(m, RunSettings(method="cg")).reconstruction, gt)
    params = recommended_params("consistency", "mri", hot_start=True, n_steps=4)
    r = reconstruct(m, RunSettings(method="consistency", params=params, hot_start="cg", seed=0), prior=cm)
    assert r.provenance["nfe"] == 4 and r.provenance["prior"] == name
    got = psnr(r.reconstruction, gt)
    assert got > start + 0.8, (got, start)
