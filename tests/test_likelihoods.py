"""Likelihoods: exact gradients, per-item sums, finiteness; noise simulation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_diffrecon.physics import (
    CartesianMRI,
    GaussianLikelihood,
    ParallelBeamCT,
    PETOperator,
    PoissonLikelihood,
    TransmissionLikelihood,
    build_likelihood,
    post_log,
    simulate_measurement,
    sparse_view_angles,
)


def _autograd_grad(lik, op, x, m):
    x = x.clone().requires_grad_(True)
    lik.nll(op, x, m).sum().backward()
    return x.grad


def test_gaussian_gradient_matches_autograd_real_and_complex():
    g = torch.Generator().manual_seed(0)
    ct = ParallelBeamCT(16, sparse_view_angles(9))
    x = torch.rand(2, 16, 16, generator=g)
    m = ct.forward(torch.rand(2, 16, 16, generator=g))
    lik = GaussianLikelihood(0.3)
    torch.testing.assert_close(lik.grad(ct, x, m), _autograd_grad(lik, ct, x, m), rtol=1e-4, atol=1e-4)
    mri = CartesianMRI((torch.rand(12, 12, generator=g) < 0.5).float())
    xc = torch.complex(torch.randn(2, 12, 12, generator=g), torch.randn(2, 12, 12, generator=g))
    mc = mri.forward(torch.complex(torch.randn(2, 12, 12, generator=g), torch.randn(2, 12, 12, generator=g)))
    # For complex x, autograd returns the conjugate Wirtinger gradient × 2 convention: dL/dRe + i dL/dIm.
    torch.testing.assert_close(lik.grad(mri, xc, mc), _autograd_grad(lik, mri, xc, mc), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("lik", [PoissonLikelihood(background=0.5), TransmissionLikelihood(I0=200.0, background=1.0)])
def test_count_likelihood_gradients_match_autograd(lik):
    g = torch.Generator().manual_seed(1)
    op = PETOperator(16, sparse_view_angles(8), sensitivity_scale=0.5)
    x = 0.1 + torch.rand(3, 16, 16, generator=g) * 0.2
    m = torch.poisson(lik.mean(op.forward(x)), generator=g)
    torch.testing.assert_close(lik.grad(op, x, m), _autograd_grad(lik, op, x, m), rtol=1e-3, atol=1e-3)


def test_nll_is_per_item_and_never_mixes_the_batch():
    g = torch.Generator().manual_seed(2)
    op = PETOperator(16, sparse_view_angles(8))
    lik = PoissonLikelihood(background=0.1)
    x = torch.rand(4, 16, 16, generator=g)
    m = torch.poisson(op.forward(x) + 0.1, generator=g)
    batched = lik.nll(op, x, m)
    assert batched.shape == (4,)
    looped = torch.stack([lik.nll(op, x[i], m[i]) for i in range(4)])
    torch.testing.assert_close(batched, looped)
    # Changing item 0 leaves the others' values alone.
    x2 = x.clone()
    x2[0] *= 3
    torch.testing.assert_close(lik.nll(op, x2, m)[1:], batched[1:])


def test_poisson_stays_finite_where_projection_is_zero():
    op = PETOperator(16, sparse_view_angles(6))
    lik = PoissonLikelihood(background=0.0)
    x = torch.zeros(16, 16)
    m = torch.zeros(16, 6)
    m[3, 2] = 4.0  # counts where the model predicts none
    assert torch.isfinite(lik.nll(op, x, m)).all()
    assert torch.isfinite(lik.grad(op, x, m)).all()


def test_poisson_nll_is_minimised_at_the_truth():
    g = torch.Generator().manual_seed(3)
    op = PETOperator(24, sparse_view_angles(16), sensitivity_scale=50.0)
    x = torch.rand(24, 24, generator=g)
    lik = PoissonLikelihood(background=2.0)
    m = simulate_measurement(op, x, {"model": "poisson", "background": 2.0}, seed=0)
    base = lik.nll(op, x, m)
    for s in (0.8, 1.25):
        assert lik.nll(op, x * s, m) > base


def test_simulation_is_deterministic_and_has_the_right_statistics():
    op = ParallelBeamCT(32, sparse_view_angles(20))
    x = torch.zeros(32, 32)
    x[10:22, 10:22] = 0.02
    noise = {"model": "transmission", "I0": 1e4}
    a = simulate_measurement(op, x, noise, seed=7)
    b = simulate_measurement(op, x, noise, seed=7)
    c = simulate_measurement(op, x, noise, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a >= 0).all() and torch.equal(a, a.round())
    line = post_log(a, 1e4)
    ax = op.forward(x)
    assert (line - ax).abs().mean() < 0.02  # post-log ≈ line integrals at high dose
    gauss = simulate_measurement(op, x, {"model": "gaussian", "sigma": 0.1}, seed=0)
    assert abs(float((gauss - ax).std()) - 0.1) < 0.01


def test_complex_gaussian_noise_only_on_sampled_kspace():
    mask = np.zeros((16, 16), np.float32)
    mask[:, ::2] = 1
    op = CartesianMRI(mask)
    m = simulate_measurement(op, torch.zeros(16, 16, dtype=torch.complex64), {"model": "gaussian", "sigma": 1.0}, 0)
    assert m.is_complex()
    assert (m[:, 1::2] == 0).all() and (m[:, ::2].abs() > 0).all()


def test_bad_noise_and_counts_errors():
    with pytest.raises(ValueError, match="sigma"):
        GaussianLikelihood(0.0)
    with pytest.raises(ValueError, match="I0"):
        build_likelihood({"model": "transmission"})
    with pytest.raises(ValueError, match="unknown noise model"):
        build_likelihood({"model": "rician"})
    with pytest.raises(ValueError, match="negative"):
        post_log(torch.tensor([3.0, -1.0]), 10.0)
    with pytest.raises(ValueError, match="background"):
        PoissonLikelihood(background=-1.0)
    op = PETOperator(8, sparse_view_angles(4))
    with pytest.raises(ValueError, match="negative activity"):
        simulate_measurement(op, -torch.ones(8, 8), {"model": "poisson"}, 0)
