"""Fast posterior sampling (issue 8): the PFGM++ kernel, PFGM++ training, consistency models and their sampler."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from napari_diffrecon.physics import Identity, Inpainting
from napari_diffrecon.priors import GaussianPrior, ModelCard, NetworkPrior, save_prior
from napari_diffrecon.priors.card import CardError
from napari_diffrecon.priors.consistency import DistillConfig, _teacher_heun, distill_consistency, karras_grid
from napari_diffrecon.priors.network import build_network
from napari_diffrecon.priors.schedules import pfgmpp_noise
from napari_diffrecon.priors.training import ImagePool, TrainConfig, export_checkpoint, train_prior
from napari_diffrecon.samplers import Problem, SamplerParams
from napari_diffrecon.samplers.consistency import consistency


def _card(**kw) -> ModelCard:
    d = dict(name="t", modality="ct", channels=1, resolution=32,
             architecture={"type": "diffusers.UNet2DModel", "preset": "tiny"})
    d.update(kw)
    return ModelCard(**d)


def _tiny(seed: int = 0, **kw) -> NetworkPrior:
    torch.manual_seed(seed)
    card = _card(**kw)
    return NetworkPrior(build_network({**card.architecture, "channels": card.channels}), card)


def _blob_pool(n: int = 16, size: int = 32) -> ImagePool:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    imgs = []
    for _ in range(n):
        cy, cx, r = rng.uniform(8, size - 8, 2).tolist() + [rng.uniform(3, 8)]
        imgs.append(np.where((yy - cy) ** 2 + (xx - cx) ** 2 < r**2, 0.8, -0.6))
    return ImagePool(torch.tensor(np.stack(imgs), dtype=torch.float32)[:, None])


# -- PFGM++ kernel -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("d", [8.0, 64.0, 2048.0])
def test_pfgmpp_radius_follows_its_beta_prime_law(d):
    """R² = r² β/(1−β), β ~ Beta(N/2, D/2), r = σ√D: E[R²] = σ² D N/(D − 2); heavier tails for small D."""
    n, sigma, b = 64, 0.7, 20000
    z = pfgmpp_noise((b, 1, 8, 8), sigma, d, None, torch.Generator().manual_seed(0))
    r2 = z.double().flatten(1).pow(2).sum(1)
    expected = sigma**2 * d * n / (d - 2)
    # Var of β' (a = N/2, b = D/2): a(a+b−1)/((b−2)(b−1)²), scaled by (σ²D)².
    a_, b_ = n / 2, d / 2
    sd = sigma**2 * d * math.sqrt(a_ * (a_ + b_ - 1) / ((b_ - 2) * (b_ - 1) ** 2)) / math.sqrt(b)
    assert abs(float(r2.mean()) - expected) < 5 * sd
    # Direction uniform on the sphere: the mean of the normalised perturbation is ≈ 0.
    u = z / z.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
    assert float(u.mean(0).abs().max()) < 0.03


def test_pfgmpp_tends_to_gaussian_and_patches_restrict_the_whole_image():
    g = torch.Generator().manual_seed(1)
    gauss = pfgmpp_noise((4000, 1, 8, 8), 0.5, None, None, g)
    big_d = pfgmpp_noise((4000, 1, 8, 8), 0.5, 1e7, None, g)
    small_d = pfgmpp_noise((4000, 1, 8, 8), 0.5, 8.0, None, g)
    spread = [float(x.flatten(1).norm(dim=1).std()) for x in (gauss, big_d, small_d)]
    assert abs(spread[0] - spread[1]) < 0.15 * spread[0]  # D → ∞: diffusion
    assert spread[2] > 3 * spread[0]  # small D: heavy-tailed norms
    # D = ∞ is exactly σ ε with the same random stream.
    a = pfgmpp_noise((2, 1, 4, 4), 0.3, float("inf"), None, torch.Generator().manual_seed(5))
    b = 0.3 * torch.randn((2, 1, 4, 4), generator=torch.Generator().manual_seed(5))
    assert torch.allclose(a, b)
    # A 16×16 patch of a 32×32 image: per-pixel variance σ² D/(D−2) as for the whole image (not 4× larger).
    patch = pfgmpp_noise((4000, 1, 16, 16), 1.0, 64.0, 32 * 32, g)
    assert abs(float(patch.pow(2).mean()) - 64 / 62) < 0.05
    with pytest.raises(ValueError, match="positive"):
        pfgmpp_noise((1, 1, 4, 4), 1.0, -3.0)
    with pytest.raises(ValueError, match="smaller"):
        pfgmpp_noise((1, 1, 4, 4), 1.0, 8.0, data_dim=4)


def test_pfgmpp_prior_starts_runs_from_its_kernel_and_cards_validate_d():
    prior = _tiny(aug_dim=8.0)
    assert prior.aug_dim == 8.0
    z = prior.draw_noise((3000, 1, 8, 8), 2.0, torch.Generator().manual_seed(0))
    assert float(z.flatten(1).norm(dim=1).std()) > 3 * 2.0 / math.sqrt(2)  # Gaussian: ≈ σ/√2
    assert "PFGM++ D=8" in prior.card.summary()
    with pytest.raises(CardError, match="aug_dim"):
        _card(aug_dim=-1.0).validate()
    assert ModelCard.from_dict(json.loads(_card(aug_dim=128.0).to_json())).aug_dim == 128.0


def test_pfgmpp_fine_tuning_from_a_prior(tmp_path):
    base = _tiny()
    save_prior(base, tmp_path / "base")
    cfg = TrainConfig(name="pf", arch="tiny", steps=3, batch_size=4, patch_size=16, resolution=32, val_every=3,
                      ckpt_every=3, augment=False, aug_dim=128.0, init_from=str(tmp_path / "base.json"))
    prior = train_prior(cfg, _blob_pool(), tmp_path / "run", resume=False, progress=False, log=lambda s: None)
    assert prior.aug_dim == 128.0 and prior.card.training["pfgmpp_aug_dim"] == 128.0
    assert prior.card.training["fine_tuned_from"].endswith("base.json")
    exported_w, exported_c = export_checkpoint(tmp_path / "run", tmp_path / "exp")
    assert json.loads(exported_c.read_text())["aug_dim"] == 128.0
    # Starting from a prior of another architecture is refused with the fix.
    cfg2 = TrainConfig(name="x", arch="small", steps=1, resolution=32, init_from=str(tmp_path / "base.json"))
    with pytest.raises(ValueError, match="--arch tiny"):
        train_prior(cfg2, _blob_pool(), tmp_path / "run2", resume=False, progress=False, log=lambda s: None)


# -- consistency models ------------------------------------------------------------------------------------------
def test_consistency_parametrisation_meets_its_boundary_condition():
    cm = _tiny(parametrisation="consistency")
    x = torch.randn(2, 1, 32, 32)
    assert torch.allclose(cm.denoise(x, cm.sigma_min), x, atol=1e-6)  # f(x, σ_min) = x exactly
    assert not torch.allclose(cm.denoise(x, 1.0), x, atol=1e-2)
    assert cm.is_consistency and not _tiny().is_consistency


def test_teacher_heun_step_follows_the_exact_gaussian_ode():
    """For x0 ~ N(0, σp²) the probability-flow ODE keeps x/√(σp² + σ²) constant."""
    teacher = GaussianPrior(sigma_p=0.5)
    teacher.raw = teacher.denoise  # the Heun step calls the preconditioned network output
    grid = karras_grid(18)
    x = torch.randn(4, 1, 8, 8) * math.sqrt(0.25 + float(grid[10]) ** 2)
    s_hi, s_lo = grid[10].expand(4).float(), grid[9].expand(4).float()
    x_lo = _teacher_heun(teacher, x, s_hi, s_lo)
    exact = x * math.sqrt((0.25 + float(grid[9]) ** 2) / (0.25 + float(grid[10]) ** 2))
    assert torch.allclose(x_lo, exact, rtol=2e-3, atol=1e-4)


def test_distillation_runs_records_its_teacher_and_resumes(tmp_path):
    teacher = _tiny()
    teacher.card.training = {"data": {"source": "blobs"}, "steps": 7}
    cfg = DistillConfig(name="cm", teacher="tiny-teacher", steps=2, batch_size=4, patch_size=16, val_every=2, n_grid=6)
    cm = distill_consistency(teacher, cfg, _blob_pool(), tmp_path, resume=False, progress=False, log=lambda s: None)
    assert cm.card.parametrisation == "consistency" and cm.is_consistency
    tr = cm.card.training
    assert tr["distilled_from"] == "t" and tr["teacher_training"]["steps"] == 7 and tr["steps"] == 2
    assert math.isfinite(tr["final_train_loss"])
    # The boundary condition survives training.
    x = torch.randn(1, 1, 32, 32)
    assert torch.allclose(cm.denoise(x, cm.sigma_min), x, atol=1e-6)
    logs: list[str] = []
    cfg.steps = 4
    distill_consistency(teacher, cfg, _blob_pool(), tmp_path, resume=True, progress=False, log=logs.append)
    assert any("resumed" in m and "step 2" in m for m in logs)
    with pytest.raises(ValueError, match="EDM"):
        distill_consistency(_tiny(parametrisation="consistency"), cfg, _blob_pool(), tmp_path / "x", progress=False)


def test_distillation_for_hot_starts_puts_its_whole_grid_below_sigma_max(tmp_path, monkeypatch):
    """``sigma_max`` caps the distillation grid (every level where hot starts enter); the card records it; a cap at
    or below the schedule's σ_min is refused before any work."""
    from napari_diffrecon.priors import consistency

    grids = []
    real = consistency.karras_grid
    monkeypatch.setattr(consistency, "karras_grid", lambda *a, **k: grids.append(real(*a, **k)) or grids[-1])
    cfg = DistillConfig(name="cm", teacher="t", steps=2, batch_size=4, patch_size=16, val_every=2, n_grid=6,
                        sigma_max=0.5)
    cm = distill_consistency(_tiny(), cfg, _blob_pool(), tmp_path, resume=False, progress=False, log=lambda s: None)
    assert float(grids[-1].max()) == pytest.approx(0.5) and len(grids[-1]) == 6
    assert cm.card.training["grid_sigma_max"] == 0.5
    cfg.sigma_max = None
    distill_consistency(_tiny(), cfg, _blob_pool(), tmp_path / "full", resume=False, progress=False,
                        log=lambda s: None)
    assert float(grids[-1].max()) == pytest.approx(80.0)
    with pytest.raises(ValueError, match="sigma_max"):
        distill_consistency(_tiny(), DistillConfig(sigma_max=0.001), _blob_pool(), tmp_path / "bad", progress=False)


def test_the_distill_command_refuses_bad_settings_before_building_its_pool(tmp_path, monkeypatch, capsys):
    """`distill --sigma-max` at or below σ_min is refused in one line before the (minute-long) pool is built; nothing
    is written."""
    from napari_diffrecon import cli

    def no_pool(*_a, **_k):
        raise AssertionError("the training pool was built before the settings were checked")

    monkeypatch.setattr(cli, "_training_pool", no_pool)
    out = tmp_path / "run"
    assert cli.main(["distill", "ct-phantom-128", "builtin:ct-phantoms", "--sigma-max", "0.001", "-o", str(out)]) == 2
    assert "sigma_max (0.001) must be above the schedule's sigma_min" in capsys.readouterr().err
    assert not out.exists()
    # 0 steps wrote the teacher under the consistency model's name
    assert cli.main(["distill", "ct-phantom-128", "builtin:ct-phantoms", "--steps", "0", "-o", str(out)]) == 2
    assert "steps must be" in capsys.readouterr().err and not out.exists()


def test_consistency_training_from_scratch_needs_no_teacher_network(tmp_path):
    template = _tiny()
    cfg = DistillConfig(name="ct", teacher="t", mode="training", steps=2, batch_size=4, patch_size=16, val_every=2,
                        n_grid=6)
    cm = distill_consistency(template, cfg, _blob_pool(), tmp_path, resume=False, progress=False, log=lambda s: None)
    tr = cm.card.training
    assert tr["mode"] == "training" and tr["template_prior"] == "t" and "distilled_from" not in tr
    # Randomly initialised, not the template's weights.
    x = torch.randn(1, 1, 32, 32)
    assert not torch.allclose(cm.denoise(x, 1.0), template.denoise(x, 1.0), atol=1e-3)
    assert torch.allclose(cm.denoise(x, cm.sigma_min), x, atol=1e-6)
    with pytest.raises(ValueError, match="mode"):
        distill_consistency(template, DistillConfig(mode="bogus"), _blob_pool(), tmp_path / "y", progress=False)


def _inpainting_problem(prior):
    gt = torch.zeros(32, 32)
    gt[8:24, 8:24] = 0.6
    keep = torch.rand(32, 32, generator=torch.Generator().manual_seed(0)) < 0.5
    op = Inpainting(keep)
    return Problem(operator=op, measurement=op.forward(gt), prior=prior), keep, gt


def test_consistency_sampler_keeps_the_data_is_deterministic_and_counts_nfe():
    prior = GaussianPrior(sigma_p=0.5)
    problem, keep, gt = _inpainting_problem(prior)
    params = SamplerParams(n_steps=3, gamma=float("inf"), cg_iters=5)
    its = list(consistency(problem, params, n_samples=2, seed=4))
    last = its[-1]
    assert last.done and last.nfe == 3
    x = last.x0_hat
    assert torch.allclose(x[:, keep], gt[keep].expand(2, -1), atol=1e-4)  # measured pixels kept (noise-free data)
    # Unmeasured pixels: the Gaussian prior's mean (0) up to the sampling spread.
    assert float(x[:, ~keep].mean().abs()) < 0.1
    again = list(consistency(problem, params, n_samples=2, seed=4))[-1].x0_hat
    assert torch.equal(x, again)


def test_consistency_is_a_registered_sampler_with_a_consistency_default_prior():
    from napari_diffrecon.priors import default_prior_for, list_priors
    from napari_diffrecon.samplers import SAMPLERS
    from napari_diffrecon.samplers.defaults import recommended_params

    assert "consistency" in SAMPLERS
    assert recommended_params("consistency", "ct").n_steps <= 4
    shipped = list_priors()
    name = default_prior_for("ct", consistency=True)
    assert name is not None and shipped[name].parametrisation == "consistency"  # the shipped CT consistency model
    assert shipped[default_prior_for("ct")].parametrisation == "edm"


def test_identity_problem_with_pfgmpp_prior_samples_finite():
    prior = GaussianPrior(sigma_p=0.5)
    prior.aug_dim = 64.0
    op = Identity((16, 16))
    problem = Problem(operator=op, measurement=torch.zeros(16, 16), prior=prior)
    last = list(consistency(problem, SamplerParams(n_steps=2, gamma=1.0, cg_iters=3), seed=1))[-1]
    assert torch.isfinite(last.x0_hat).all()
