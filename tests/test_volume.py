"""Volumes: slice-wise operators, the ADMM z-TV data step, the DiffusionMBIR-style sampler, memory plans."""

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
    sparse_view_angles,
)
from napari_diffrecon.priors import GaussianPrior, ModelCard, NetworkPrior
from napari_diffrecon.priors.network import build_network
from napari_diffrecon.samplers import Problem, SamplerParams, SamplingError, get_sampler
from napari_diffrecon.volume import (
    SliceWiseOperator,
    VolumeMemoryError,
    VolumeParams,
    VolumeProblem,
    ZTVState,
    admm_ztv,
    dz,
    dz_adjoint,
    mbir,
    parse_bytes,
    plan_memory,
    slice_seed,
    soft_threshold,
    volume_ct,
    volume_mri,
    volume_pet,
    ztv_objective,
)

torch.set_num_threads(1)
D, N = 6, 32


def _rand(shape, complex_=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    if complex_:
        return torch.complex(torch.randn(shape, generator=g), torch.randn(shape, generator=g))
    return torch.randn(shape, generator=g)


def _operators():
    angles = sparse_view_angles(12)
    rng = np.random.default_rng(0)
    masks = (rng.random((D, N, N)) < 0.4).astype(np.float32)
    maps = rng.standard_normal((3, N, N)) + 1j * rng.standard_normal((3, N, N))
    att = np.exp(-rng.random((D, N, 12)))
    return {
        "ct": (volume_ct(D, N, angles), lambda k: ParallelBeamCT(N, angles)),
        "mri": (volume_mri(masks), lambda k: CartesianMRI(masks[k])),
        "mri-coils": (volume_mri(masks, maps), lambda k: CartesianMRI(masks[k], maps)),
        "pet": (volume_pet(D, N, angles, att, 2.0), lambda k: PETOperator(N, angles, att[k], 2.0)),
        "ct-chunked": (volume_ct(D, N, angles, max_batch=4), lambda k: ParallelBeamCT(N, angles)),
    }


@pytest.mark.parametrize("name", ["ct", "mri", "mri-coils", "pet", "ct-chunked"])
def test_volume_operator_adjoint_and_per_slice_equality(name):
    op, slice_op = _operators()[name]
    x = _rand((2, *op.image_shape), op.is_complex, 1)
    y = _rand((2, *op.data_shape), op.is_complex, 2)
    lhs = (op.forward(x).conj() * y).sum() if op.is_complex else (op.forward(x) * y).sum()
    rhs = (x.conj() * op.adjoint(y)).sum() if op.is_complex else (x * op.adjoint(y)).sum()
    assert abs(complex(lhs) - complex(rhs)) <= 1e-4 * abs(complex(lhs))
    ax = op.forward(x)
    for k in range(D):
        ref = slice_op(k)
        torch.testing.assert_close(ax[:, k], ref.forward(x[:, k]), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(op.adjoint(y)[:, k], ref.adjoint(y[:, k]), rtol=1e-4, atol=1e-4)


def test_volume_operator_slab_and_bad_weights():
    op = _operators()["pet"][0]
    x = _rand(op.image_shape)
    torch.testing.assert_close(op.slab(2, 5).forward(x[2:5]), op.forward(x)[2:5])
    assert op.slab(2, 5).z_offset == 2
    with pytest.raises(ValueError, match="one entry per slice"):
        SliceWiseOperator(ParallelBeamCT(N, [0, 90]), D, np.ones((D + 1, N, 2)))
    with pytest.raises(ValueError, match="do not broadcast"):
        SliceWiseOperator(ParallelBeamCT(N, [0, 90]), D, np.ones((D, N, 3)))
    with pytest.raises(ValueError, match="slab"):
        op.slab(4, 9)


def test_dz_adjoint_and_soft_threshold():
    x = _rand((2, D, 5, 4), seed=3)
    g = _rand((2, D - 1, 5, 4), seed=4)
    torch.testing.assert_close((dz(x) * g).sum(), (x * dz_adjoint(g)).sum())
    v = torch.tensor([-3.0, -0.5, 0.2, 2.0])
    torch.testing.assert_close(soft_threshold(v, 1.0), torch.tensor([-2.0, 0.0, 0.0, 1.0]))
    c = torch.tensor([3 + 4j, 0.3j])
    torch.testing.assert_close(soft_threshold(c, 1.0), torch.tensor([2.4 + 3.2j, 0j]))


def _ct_quadratic(g=5.0, seed=0):
    """Q(x) = ½‖x − x_ref‖² + g/2 ‖A x − m‖² on a sparse-view CT volume whose truth is constant in z."""
    op = volume_ct(D, N, sparse_view_angles(8))
    truth = torch.zeros(D, N, N)
    truth[:, 10:22, 8:24] = 1.0
    m = op.forward(truth) + 0.05 * _rand(op.data_shape, seed=seed)
    x_ref = truth + 0.3 * _rand(truth.shape, seed=seed + 1)
    scale = 1.0 / 200.0  # ≈ 1/‖AᵀA‖ keeps the system well conditioned

    def normal(v):
        return v + g * scale * op.normal(v)

    rhs = x_ref + g * scale * op.adjoint(m)
    return op, truth, normal, rhs, x_ref


def test_admm_ztv_objective_decreases_and_beats_independent_slices():
    op, truth, normal, rhs, x_ref = _ct_quadratic()
    lam = 0.05
    state = ZTVState()
    x = x_ref.clone()
    objs = [float(ztv_objective(normal, rhs, x, lam))]
    for _ in range(40):
        x = admm_ztv(normal, rhs, x, lam, rho=1.0, cg_iters=5, n_iter=1, state=state)
        objs.append(float(ztv_objective(normal, rhs, x, lam)))
    assert objs[-1] < objs[0]
    assert objs[-1] <= min(objs) + 1e-3 * abs(objs[0])  # converged, not oscillating away
    # The independent-slice minimiser of Q has a larger z-TV objective than the ADMM solution.
    x_ind = admm_ztv(normal, rhs, x_ref, 0.0, cg_iters=60)
    assert float(ztv_objective(normal, rhs, x_ind, lam)) > objs[-1]
    # ...and the z-coupled solution is closer to the (z-constant) truth and smoother along z.
    assert float(dz(x).abs().mean()) < float(dz(x_ind).abs().mean())
    assert float((x - truth).norm()) < float((x_ind - truth).norm())


def test_admm_with_zero_weight_is_independent_per_slice_cg():
    op, truth, normal, rhs, x_ref = _ct_quadratic()
    out = admm_ztv(normal, rhs, x_ref, 0.0, cg_iters=5)
    from napari_diffrecon.baselines.cg import conjugate_gradient

    base = op.base

    def normal2d(v):
        return v + 5.0 / 200.0 * base.normal(v)

    for k in (0, 3, D - 1):  # each slice alone through the project's CG gives the same slice
        sk = conjugate_gradient(normal2d, rhs[k], x0=x_ref[k], n_iter=5, n_core_dims=2)
        torch.testing.assert_close(out[k], sk, rtol=1e-4, atol=1e-5)


# -- the sampler -----------------------------------------------------------------------------------
def _tiny_prior(seed=0) -> NetworkPrior:
    torch.manual_seed(seed)
    card = ModelCard(
        name="tiny-vol", modality="ct", channels=1, resolution=N,
        architecture={"type": "diffusers.UNet2DModel", "preset": "tiny"},
    )
    return NetworkPrior(build_network({**card.architecture, "channels": 1}), card)


def _ct_volume_problem(prior, sigma_y=0.05, n_slices=D, angles=8):
    op = volume_ct(n_slices, N, sparse_view_angles(angles))
    truth = torch.zeros(n_slices, N, N)
    truth[:, 10:22, 8:24] = 0.8
    truth[: n_slices // 2, 14:18, 12:16] = 0.3
    m = op.forward(truth) + sigma_y * _rand(op.data_shape, seed=7)
    return VolumeProblem(op, m, prior, GaussianLikelihood(sigma_y)), truth


def test_mbir_gaussian_prior_yields_iterates_and_fits_data():
    problem, truth = _ct_volume_problem(GaussianPrior(sigma_p=0.5))
    params = VolumeParams(n_steps=8, eta=0.85, cg_iters=5, ztv=0.05)
    its = list(mbir(problem, params, seed=1, yield_every=1))
    assert len(its) == 8 and its[-1].done and not its[0].done
    assert its[-1].x0_hat.shape == (1, D, N, N) and its[-1].x_t.shape == (1, D, N, N)
    res = float(its[-1].data_residual[0])
    floor = float(problem.residual(truth[None])[0])  # the noise floor
    assert res < 3 * floor  # a regularised fit: near the noise floor, not at it
    # Without the data step (the prior alone) the residual is far larger.
    uncond = list(mbir(problem, VolumeParams(n_steps=8, cg_iters=0, ztv=0.0), seed=1))[-1]
    assert float(uncond.data_residual[0]) > 5 * res
    assert its[-1].nfe == 8 and its[-1].ztv == pytest.approx(0.05)


def test_mbir_ztv_weight_is_live():
    problem, _ = _ct_volume_problem(GaussianPrior(sigma_p=0.5))
    params = VolumeParams(n_steps=6, ztv=0.0)
    seen = []
    for it in mbir(problem, params, seed=0, yield_every=1):
        seen.append(it.ztv)
        if it.step == 2:
            params.ztv = 0.2  # a slider moved mid-run
    assert seen[:2] == [0.0, 0.0] and all(v == pytest.approx(0.2) for v in seen[2:])


@pytest.mark.parametrize("renoise", ["ddim", "dds"])
def test_mbir_without_ztv_equals_2d_dds_per_slice(renoise):
    prior = GaussianPrior(sigma_p=0.5)
    problem, _ = _ct_volume_problem(prior, n_slices=3)
    params = VolumeParams(n_steps=5, eta=0.85, cg_iters=4, ztv=0.0, renoise=renoise)
    vol = list(mbir(problem, params, n_samples=2, seed=4))[-1].x0_hat
    dds = get_sampler("dds")
    for k in range(3):
        p2 = Problem(problem.operator.base, problem.measurement[k], prior, problem.likelihood)
        p2d = SamplerParams(n_steps=5, eta=0.85, cg_iters=4, renoise=renoise)
        sl = list(dds(p2, p2d, n_samples=2, seed=slice_seed(4, k)))
        torch.testing.assert_close(vol[:, k], sl[-1].x0_hat, rtol=1e-4, atol=1e-4)


def test_mbir_ztv_improves_z_consistency_on_z_constant_truth():
    problem, truth = _ct_volume_problem(GaussianPrior(sigma_p=0.5), sigma_y=0.3, angles=6)
    out = {}
    for lam in (0.0, 0.1):
        x = list(mbir(problem, VolumeParams(n_steps=10, cg_iters=5, ztv=lam), seed=2))[-1].x0_hat[0]
        out[lam] = (float(dz(x - truth).abs().mean()), float((x - truth).norm()))
    assert out[0.1][0] < out[0.0][0]
    assert out[0.1][1] < out[0.0][1]


def test_mbir_pet_and_complex_mri_run():
    angles = sparse_view_angles(8)
    op = volume_pet(4, N, angles, sensitivity_scale=5.0)
    truth = torch.zeros(4, N, N)
    truth[:, 8:24, 8:24] = 1.0
    m = torch.poisson(op.forward(truth) + 1.0, generator=torch.Generator().manual_seed(0))
    pet = VolumeProblem(op, m, GaussianPrior(0.5, mean=0.5), PoissonLikelihood(1.0), nonneg=True)
    its = list(mbir(pet, VolumeParams(n_steps=4, cg_iters=3, ztv=0.05), seed=0))
    assert its[-1].x0_hat.min() >= 0 and torch.isfinite(its[-1].x0_hat).all()
    mri_op = volume_mri(np.ones((N, N)) * (np.arange(N)[None, :] % 2 == 0), n_slices=4)
    xm = torch.complex(truth, 0.2 * truth)
    mri = VolumeProblem(mri_op, mri_op.forward(xm), GaussianPrior(0.5, channels=2), GaussianLikelihood(0.01))
    last = list(mbir(mri, VolumeParams(n_steps=4, cg_iters=3, ztv=0.05), seed=0))[-1]
    assert last.x0_hat.is_complex() and float(last.data_residual[0]) < 0.5


def test_volume_problem_refuses_2d_operators():
    with pytest.raises(SamplingError, match="SliceWiseOperator"):
        VolumeProblem(ParallelBeamCT(N, [0, 90]), torch.zeros(N, 2), GaussianPrior())


# -- memory ----------------------------------------------------------------------------------------
def test_chunked_denoiser_equals_unchunked_and_respects_plan():
    prior = _tiny_prior()
    problem, _ = _ct_volume_problem(prior, n_slices=D)
    params = VolumeParams(n_steps=3, cg_iters=3, ztv=0.05)
    calls = []
    orig = prior.denoise

    def spy(x, s):
        calls.append(x.shape[0])
        return orig(x, s)

    plan = plan_memory(problem.operator, prior, budget="1GB", n_samples=2)
    # a budget that leaves room for exactly 4 slices per chunk
    small = plan_memory(problem.operator, prior, budget=plan.fixed + 4 * plan.per_slice + 10, n_samples=2)
    assert small.chunk_slices == 4 and small.peak <= small.budget
    full = list(mbir(problem, params, n_samples=2, seed=3))[-1].x0_hat
    prior.denoise = spy
    try:
        chunked = list(mbir(problem, params, n_samples=2, seed=3, chunk_slices=small.chunk_slices))[-1].x0_hat
    finally:
        prior.denoise = orig
    assert max(calls) <= 4 and len(calls) == 3 * 3  # 12 slices (2 samples × 6) in chunks of 4, 3 steps
    torch.testing.assert_close(chunked, full, rtol=1e-4, atol=1e-4)


def test_memory_plan_refuses_too_large_volume_with_way_forward():
    prior = _tiny_prior()
    op = volume_ct(512, N, sparse_view_angles(8))
    plan = plan_memory(op, prior, budget="2GB")
    assert plan.chunk_slices >= 1 and plan.peak <= plan.budget
    with pytest.raises(VolumeMemoryError, match=r"slab_slices=(\d+)") as err:
        plan_memory(op, prior, budget=int(plan.fixed * 0.5))
    # the slab size it names does fit the same budget
    k = int(__import__("re").search(r"slab_slices=(\d+)", str(err.value)).group(1))
    assert 2 <= k < 512
    assert plan_memory(op.slab(0, k), prior, budget=int(plan.fixed * 0.5)).peak <= int(plan.fixed * 0.5)
    with pytest.raises(VolumeMemoryError, match="raise the budget"):
        plan_memory(op, prior, budget="4MB")
    assert parse_bytes("1.5 GiB") == int(1.5 * 1024**3) and parse_bytes(2048) == 2048
    with pytest.raises(ValueError, match="memory budget"):
        parse_bytes("lots")


@pytest.mark.parametrize("field,value", [("ztv", -1.0), ("ztv", float("nan")), ("rho", 0.0), ("admm_iters", 0),
                                         ("admm_iters", 1.5)])
def test_bad_z_coupling_is_refused_not_run_as_something_else(field, value):
    """A negative or NaN z-TV weight ran slice by slice and was recorded as given; now refused, also mid-run."""
    from napari_diffrecon.samplers.base import SamplingError

    problem, _ = _ct_volume_problem(GaussianPrior(sigma_p=0.5))
    with pytest.raises(SamplingError, match=field):
        next(iter(mbir(problem, VolumeParams(n_steps=3, **{field: value}), seed=0)))
    params = VolumeParams(n_steps=4)
    with pytest.raises(SamplingError, match=field):
        for it in mbir(problem, params, seed=0, yield_every=1):
            if it.step == 1:
                setattr(params, field, value)  # set live from the GUI
