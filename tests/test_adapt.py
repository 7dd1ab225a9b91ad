"""Test-time adaptation (LoRA on the prior's U-Net, trained on the measurement-consistency loss while sampling)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_diffrecon.priors import GaussianPrior, load_prior
from napari_diffrecon.priors.lora import LoRAConv2d, LoRALinear, add_lora, lora_copy, lora_layers, lora_parameters
from napari_diffrecon.priors.network import build_network
from napari_diffrecon.reconstruct import RunSettings, prepare_run
from napari_diffrecon.samplers import Problem, SamplerParams, SamplingError, get_sampler
from napari_diffrecon.samplers.adapt import AdaptConfig, Adapter, consistency_loss
from napari_diffrecon.samplers.base import ddim_step, run_loop
from napari_diffrecon.samplers.datastep import data_step
from napari_diffrecon.simulate import simulate_from_image


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """One torch thread: on a shared CPU, idle-spinning worker threads cost more than they give at 32²."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def mri_prior():
    return load_prior("mri-brain-128")


@pytest.fixture(scope="module")
def mri_measurement(mr_slice):
    """A real (non-brain-atlas) MR slice, 4× 4 coils at 32² (small, so the tests are quick)."""
    return simulate_from_image(mr_slice, "mri", size=32, accel=4.0, coils=4, seed=0)


def _problem(measurement, prior, params=None, method="dds"):
    problem, start, _ = prepare_run(measurement, RunSettings(method=method, params=params or SamplerParams()), prior)
    return problem, start


def _state_dict_copy(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _run(problem, method, params, seed=0, n_samples=1):
    its = list(get_sampler(method)(problem, params, n_samples=n_samples, seed=seed, yield_every=1))
    assert its[-1].done
    return its[-1]


def _noisy_truth(problem, measurement, sigma, seed=0):
    x = torch.as_tensor(measurement.ground_truth)[None]
    u = problem.to_model(x.to(torch.complex64) if problem.operator.is_complex else x.float())
    return u + sigma * torch.randn(u.shape, generator=torch.Generator().manual_seed(seed))


# -- the LoRA module ---------------------------------------------------------------------------------------
def test_lora_at_init_leaves_the_network_output_unchanged_and_wraps_every_conv_and_linear():
    torch.manual_seed(0)
    net = build_network({"preset": "tiny", "channels": 2})
    n_conv = sum(isinstance(m, torch.nn.Conv2d) for m in net.modules())
    n_lin = sum(isinstance(m, torch.nn.Linear) for m in net.modules())
    before = _state_dict_copy(net)
    x, lab = torch.randn(2, 2, 32, 32), torch.tensor([10.0, 300.0])
    with torch.no_grad():
        ref = net(x, lab)
    adapted, adapters = lora_copy(net, rank=4, seed=1)
    assert sum(isinstance(a, LoRAConv2d) for a in adapters) == n_conv > 5
    assert sum(isinstance(a, LoRALinear) for a in adapters) == n_lin > 0
    with torch.no_grad():
        assert torch.equal(adapted(x, lab), ref)
    # Only the adapters train, and they are small next to the network.
    trainable = [p for p in adapted.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in lora_parameters(adapted)}
    assert 0 < sum(p.numel() for p in trainable) < 0.15 * sum(p.numel() for p in net.parameters())  # 9.5 % at r 4
    # The original is untouched: same weights, still trainable, no adapters inside.
    assert not lora_layers(net) and all(p.requires_grad for p in net.parameters())
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    # The adapters are live: a non-zero update changes the output (so the equality above can fail).
    with torch.no_grad():
        adapters[0].up.weight.fill_(0.01)
        assert not torch.allclose(adapted(x, lab), ref)
        adapters[0].enabled = False
        assert torch.equal(adapted(x, lab), ref)


def test_add_lora_checks_its_arguments_and_is_deterministic():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    with pytest.raises(ValueError, match="kinds"):
        add_lora(net, kinds=("attention",))
    with pytest.raises(ValueError, match="no conv/linear"):
        add_lora(torch.nn.Sequential(torch.nn.ReLU()))
    a, _ = lora_copy(net, rank=16, seed=3)
    b, _ = lora_copy(net, rank=16, seed=3)
    c, _ = lora_copy(net, rank=16, seed=4)
    assert a[0].rank == 3  # capped by the layer's width
    assert torch.equal(a[0].down.weight, b[0].down.weight) and not torch.equal(a[0].down.weight, c[0].down.weight)


# -- the adaptation step --------------------------------------------------------------------------------------
def test_adaptation_steps_decrease_the_consistency_loss_and_leave_the_base_weights_alone(mri_prior, mri_measurement):
    problem, _ = _problem(mri_measurement, mri_prior)
    before = _state_dict_copy(mri_prior.network)
    sigma = 0.3
    u = _noisy_truth(problem, mri_measurement, sigma)
    with torch.no_grad():
        base_loss = float(consistency_loss(problem, mri_prior.denoise(u, sigma)).mean())
    adapter = Adapter(problem, rank=4, lr=3e-3)
    losses = adapter.step(u, sigma, 12)
    with torch.no_grad():
        after = float(adapter.loss(u, sigma))
    assert losses[0] == pytest.approx(base_loss, rel=1e-5)  # LoRA starts as a no-op
    assert after < 0.7 * losses[0], (losses, after)
    # The base weights neither moved nor got gradients; the run's problem still has the shipped prior.
    assert all(torch.equal(v, mri_prior.network.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in mri_prior.network.parameters())
    assert problem.prior is mri_prior and adapter.problem.prior is not mri_prior
    assert adapter.problem.measurement is problem.measurement
    with torch.no_grad():
        assert float(consistency_loss(problem, mri_prior.denoise(u, sigma)).mean()) == pytest.approx(base_loss)


def test_adaptation_decreases_the_poisson_deviance_for_pet_counts(ct_slice):
    prior = load_prior("pet-phantom-128")
    m = simulate_from_image(ct_slice, "pet", size=32, counts=3e4, seed=0)
    problem, _ = _problem(m, prior)
    sigma = 2.0  # the prior's x0_hat at σ 2 is 0.2 above the floor (0.11 at σ 1, now that the FOV's outside is unseen)
    u = _noisy_truth(problem, m, sigma)
    with torch.no_grad():  # the deviance of the true image: the noise floor (≈ 1 per datum)
        floor = float(consistency_loss(problem, _noisy_truth(problem, m, 0.0)).mean())
    adapter = Adapter(problem, rank=4, lr=3e-3)
    losses = adapter.step(u, sigma, 12)
    with torch.no_grad():
        after = float(adapter.loss(u, sigma))
    assert 0.5 < floor < 1.5 and losses[0] > floor + 0.1
    assert after - floor < 0.5 * (losses[0] - floor), (losses, after, floor)


def test_adapt_config_reads_params_extra_and_refuses_bad_values():
    cfg = AdaptConfig.from_params(SamplerParams(extra={"adapt_steps": 1, "adapt_every": 2, "adapt_start": 0.5}))
    assert [i for i in range(10) if cfg.due(i, 10)] == [5, 7, 9]
    assert not any(AdaptConfig.from_params(SamplerParams()).due(i, 10) for i in range(10))
    for bad in ({"adapt_steps": -1}, {"lora_rank": 0}, {"adapt_steps": 1, "adapt_lr": 0.0},
                {"adapt_every": 0}, {"adapt_start": 1.0}, {"adapt_steps": "many"}, {"adapt_target": "x"},
                {"adapt_floor": -1.0}):
        with pytest.raises(SamplingError):
            AdaptConfig.from_params(SamplerParams(extra=bad))


def test_the_discrepancy_floor_stops_adaptation_at_the_noise_level(mri_prior, mri_measurement):
    """With the floor above the loss, no Adam step is taken: the adapters stay zero and each adapted step costs
    one forward pass; with the floor at 0 they train."""
    problem, _ = _problem(mri_measurement, mri_prior)
    u = _noisy_truth(problem, mri_measurement, 0.3)
    adapter = Adapter(problem, rank=2, lr=1e-2)
    first = adapter.step(u, 0.3, 1)[0]
    stopped = adapter.step(u, 0.3, 5, floor=10 * first)
    assert len(stopped) == 1
    layers = lora_layers(adapter.problem.prior.network)
    ups = [a.up.weight.detach().clone() for a in layers]
    adapter.step(u, 0.3, 3, floor=10 * first)
    assert all(torch.equal(a.up.weight, w) for a, w in zip(layers, ups, strict=True))
    assert len(adapter.step(u, 0.3, 3, floor=0.0)) == 3
    high = SamplerParams(n_steps=4, cg_iters=2, extra={"adapt_steps": 3, "adapt_floor": 1e12})
    assert _run(problem, "dds", high).nfe == 4 + 4  # one loss evaluation per step, no training


def test_adaptation_needs_a_network_prior():
    from napari_diffrecon.physics import GaussianLikelihood, Identity

    prob = Problem(Identity((16, 16)), torch.zeros(16, 16), GaussianPrior(1.0), GaussianLikelihood(0.1))
    with pytest.raises(SamplingError, match="network prior"):
        _run(prob, "dds", SamplerParams(n_steps=3, extra={"adapt_steps": 1}))


# -- in the samplers ----------------------------------------------------------------------------------------
def _reference_dds(problem, params, n_samples, seed):
    """DDS as it was before adaptation existed (the step of samplers/methods.py at 16a39f7)."""

    def step(u, s, s_next, i, ctx):
        with torch.no_grad():
            x0 = problem.prior.denoise(u, s)
        x_dc = data_step(problem, problem.to_image(x0), float(params.gamma) / float(params.prior_weight),
                         int(params.cg_iters), s)
        x0_dc = problem.to_model(x_dc)
        return ddim_step(u, x0_dc, s, s_next, float(params.eta), ctx["generator"]), x0_dc, 1

    its = list(run_loop(problem, params, step, n_samples, seed, yield_every=1))
    return its[-1]


@pytest.mark.parametrize("extra", [{}, {"adapt_steps": 0, "adapt_lr": 1.0, "lora_rank": 8}])
def test_dds_with_adaptation_off_is_the_plain_dds(mri_prior, mri_measurement, extra):
    params = SamplerParams(n_steps=6, eta=0.85, gamma=3.0, cg_iters=3, extra=extra)
    problem, _ = _problem(mri_measurement, mri_prior, params)
    ref = _reference_dds(problem, params, 2, 4)
    got = _run(problem, "dds", params, seed=4, n_samples=2)
    assert torch.equal(got.x0_hat, ref.x0_hat) and got.nfe == ref.nfe == 6


def test_adapted_dds_is_deterministic_counts_its_cost_and_restores_the_prior(mri_prior, mri_measurement):
    before = _state_dict_copy(mri_prior.network)
    plain = SamplerParams(n_steps=6, cg_iters=3)
    adapt = SamplerParams(n_steps=6, cg_iters=3, extra={"adapt_steps": 2, "adapt_lr": 1e-2, "adapt_start": 0.5})
    problem, _ = _problem(mri_measurement, mri_prior, plain)
    x_plain = _run(problem, "dds", plain, seed=1)
    a = _run(problem, "dds", adapt, seed=1)
    b = _run(problem, "dds", adapt, seed=1)
    c = _run(problem, "dds", adapt, seed=2)
    assert torch.equal(a.x0_hat, b.x0_hat)
    assert not torch.equal(a.x0_hat, c.x0_hat)
    assert not torch.allclose(a.x0_hat, x_plain.x0_hat)  # the adapters changed the run
    assert a.nfe == 6 + 2 * 3  # steps 3, 4, 5 adapt with 2 Adam steps each
    # The shipped prior is as it was: same weights, no adapters, and a plain run repeats exactly.
    assert all(torch.equal(v, mri_prior.network.state_dict()[k]) for k, v in before.items())
    assert not lora_layers(mri_prior.network) and problem.prior is mri_prior
    assert torch.equal(_run(problem, "dds", plain, seed=1).x0_hat, x_plain.x0_hat)


def test_adapted_dds_fits_the_data_better_than_the_plain_one(mri_prior, mri_measurement):
    """The adapted prior's run ends closer to the measurements (the loss it trains on) — averaged over samples."""
    plain = SamplerParams(n_steps=8, cg_iters=0)  # no data steps: only the adapters pull towards the data
    adapt = SamplerParams(n_steps=8, cg_iters=0, extra={"adapt_steps": 3, "adapt_lr": 1e-2})
    problem, _ = _problem(mri_measurement, mri_prior, plain)
    r_plain = _run(problem, "dds", plain, seed=0, n_samples=2).data_residual.mean()
    r_adapt = _run(problem, "dds", adapt, seed=0, n_samples=2).data_residual.mean()
    assert float(r_adapt) < 0.8 * float(r_plain), (float(r_adapt), float(r_plain))


def test_dps_with_adaptation_off_is_unchanged_and_on_is_deterministic(mri_prior, mri_measurement):
    from napari_diffrecon.samplers.methods import _guided_step

    params = SamplerParams(n_steps=5, eta=1.0, zeta=1.0)
    problem, _ = _problem(mri_measurement, mri_prior, params, method="dps")

    def ref_step(u, s, s_next, i, ctx):
        u_next, x0 = _guided_step(problem, params, u, s, s_next, ctx["generator"], project=False)
        return u_next, x0, 1

    ref = list(run_loop(problem, params, ref_step, 1, 3, yield_every=1))[-1]
    assert torch.equal(_run(problem, "dps", params, seed=3).x0_hat, ref.x0_hat)
    on = SamplerParams(n_steps=5, eta=1.0, zeta=1.0, extra={"adapt_steps": 1, "adapt_lr": 1e-2})
    a, b = _run(problem, "dps", on, seed=3), _run(problem, "dps", on, seed=3)
    assert torch.equal(a.x0_hat, b.x0_hat) and not torch.allclose(a.x0_hat, ref.x0_hat)
    assert a.nfe == 5 + 5 and problem.prior is mri_prior and not lora_layers(mri_prior.network)


def test_adaptation_is_recorded_in_the_settings_round_trip():
    """The options ride in ``params.extra``, so presets and provenance keep them without new fields."""
    s = RunSettings(method="dds", params=SamplerParams(extra={"adapt_steps": 2, "adapt_lr": 3e-4, "lora_rank": 8}))
    back = RunSettings.from_dict(s.to_dict())
    assert back.params.extra == {"adapt_steps": 2, "adapt_lr": 3e-4, "lora_rank": 8}
    assert np.isclose(AdaptConfig.from_params(back.params).lr, 3e-4)
