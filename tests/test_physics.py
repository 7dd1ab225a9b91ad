"""Operators: adjoint identity, agreement with reference implementations, batching, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.transform import radon

from napari_diffrecon.physics import (
    CartesianMRI,
    Identity,
    Inpainting,
    OperatorShapeError,
    ParallelBeamCT,
    PETOperator,
    attenuation_factors,
    build_operator,
    limited_angle_angles,
    sparse_view_angles,
)
from napari_diffrecon.physics.base import inner


def _coil_maps(c: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w] / max(h, w)
    maps = []
    for k in range(c):
        a = 2 * np.pi * k / c
        cy, cx = 0.5 + 0.7 * np.sin(a), 0.5 + 0.7 * np.cos(a)
        mag = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.3)
        maps.append(mag * np.exp(1j * (rng.uniform(0, 2 * np.pi) + 2 * yy)))
    maps = np.stack(maps)
    return (maps / np.sqrt((np.abs(maps) ** 2).sum(0))).astype(np.complex64)


def _operators():
    rng = np.random.default_rng(1)
    yield "ct-full-32", ParallelBeamCT(32, sparse_view_angles(45))
    yield "ct-sparse-64", ParallelBeamCT(64, sparse_view_angles(23))
    yield "ct-limited-48", ParallelBeamCT(48, limited_angle_angles(90, 30))
    yield "ct-odd-33", ParallelBeamCT(33, rng.uniform(0, 180, 17))
    mask = (rng.uniform(size=(40, 48)) < 0.3).astype(np.float32)
    yield "mri-single", CartesianMRI(mask)
    yield "mri-multi", CartesianMRI(mask, _coil_maps(4, 40, 48))
    yield "mri-1d", CartesianMRI((rng.uniform(size=48) < 0.4).astype(np.float32), _coil_maps(3, 32, 48))
    mu = np.zeros((32, 32))
    mu[8:24, 8:24] = 0.05
    ang = sparse_view_angles(20)
    yield "pet", PETOperator(32, ang, attenuation_factors(mu, ang), sensitivity_scale=2.5)
    yield "identity", Identity((16, 20))
    yield "inpaint", Inpainting((rng.uniform(size=(16, 20)) < 0.5).astype(np.float32))


OPERATORS = list(_operators())


def _rand(shape, complex_: bool, gen: torch.Generator) -> torch.Tensor:
    if complex_:
        return torch.complex(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen))
    return torch.randn(shape, generator=gen)


@pytest.mark.parametrize("name,op", OPERATORS, ids=[n for n, _ in OPERATORS])
def test_adjoint_identity(name, op):
    g = torch.Generator().manual_seed(0)
    x = _rand((3, *op.image_shape), op.is_complex, g)
    y = _rand((3, *op.data_shape), op.is_complex, g)
    lhs = inner(op.forward(x), y, len(op.data_shape))
    rhs = inner(x, op.adjoint(y), len(op.image_shape))
    scale = op.forward(x).flatten(1).norm(dim=1) * y.flatten(1).norm(dim=1)
    rel = (lhs - rhs).abs() / scale
    assert rel.max() < 1e-5, f"{name}: adjoint mismatch {rel.max():.2e}"


@pytest.mark.parametrize("name,op", OPERATORS, ids=[n for n, _ in OPERATORS])
def test_batched_equals_looped_and_shapes(name, op):
    g = torch.Generator().manual_seed(2)
    x = _rand((2, 3, *op.image_shape), op.is_complex, g)
    y = op.forward(x)
    assert y.shape == (2, 3, *op.data_shape)
    for i in range(2):
        for j in range(3):
            torch.testing.assert_close(y[i, j], op.forward(x[i, j]), rtol=1e-5, atol=1e-5)
    xa = op.adjoint(y)
    assert xa.shape == x.shape
    # float32 sums in another order (matrix-matrix vs matrix-vector product): tolerance relative to the image's scale
    torch.testing.assert_close(xa[1, 2], op.adjoint(y[1, 2]), rtol=1e-5, atol=1e-5 * float(xa.abs().max()))
    torch.testing.assert_close(op.normal(x[0]), op.adjoint(op.forward(x[0])))


@pytest.mark.parametrize("n_views", [180, 23])
def test_ct_matches_skimage_radon_on_real_slice(ct_slice, n_views):
    theta = sparse_view_angles(n_views)
    ref = radon(ct_slice, theta=theta, circle=True)
    ours = ParallelBeamCT(ct_slice.shape[0], theta).forward(torch.tensor(ct_slice, dtype=torch.float32)).numpy()
    assert ours.shape == ref.shape
    rel = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
    assert rel < 0.01, f"relative L2 error vs skimage radon {rel:.3%}"


def test_ct_limited_angle_and_arbitrary_angles_match_skimage(ct_slice):
    img = ct_slice[::2, ::2].copy()
    for theta in (limited_angle_angles(90, 45), np.array([3.0, 17.5, 91.0, 133.3, 179.0])):
        ref = radon(img, theta=theta, circle=True)
        ours = ParallelBeamCT(img.shape[0], theta).forward(torch.tensor(img, dtype=torch.float32)).numpy()
        assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) < 0.01


def test_ct_autograd_uses_exact_adjoint():
    op = ParallelBeamCT(24, sparse_view_angles(10))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 24, 24, generator=g, requires_grad=True)
    w = torch.randn(2, 24, 10, generator=g)
    (op.forward(x) * w).sum().backward()
    torch.testing.assert_close(x.grad, op.adjoint(w), rtol=1e-5, atol=1e-5)


def test_ct_float64_agrees_with_float32():
    theta = sparse_view_angles(15)
    x = torch.rand(20, 20, dtype=torch.float64)
    y64 = ParallelBeamCT(20, theta, dtype=torch.float64).forward(x)
    y32 = ParallelBeamCT(20, theta).forward(x.float())
    assert y64.dtype == torch.float64
    torch.testing.assert_close(y32.double(), y64, rtol=1e-5, atol=1e-5)


def test_mri_forward_equals_numpy_fft(mr_slice):
    rng = np.random.default_rng(0)
    x = (mr_slice * np.exp(1j * rng.uniform(-0.3, 0.3, mr_slice.shape))).astype(np.complex64)
    mask = (rng.uniform(size=x.shape) < 0.4).astype(np.float32)
    maps = _coil_maps(4, *x.shape)
    ref_single = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(x), norm="ortho")) * mask
    ref_multi = np.stack([np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(x * s), norm="ortho")) * mask for s in maps])
    xt = torch.from_numpy(x)
    np.testing.assert_allclose(CartesianMRI(mask).forward(xt).numpy(), ref_single, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(CartesianMRI(mask, maps).forward(xt).numpy(), ref_multi, rtol=1e-4, atol=1e-5)


def test_mri_fully_sampled_sense_adjoint_inverts():
    """With a full mask and maps with Σ|S|² = 1, AᴴA = I."""
    maps = _coil_maps(5, 24, 32)
    op = CartesianMRI(np.ones((24, 32), np.float32), maps)
    g = torch.Generator().manual_seed(0)
    x = _rand((24, 32), True, g)
    torch.testing.assert_close(op.normal(x), x, rtol=1e-4, atol=1e-4)
    assert op.acceleration == pytest.approx(1.0)


def test_mri_real_input_is_promoted_to_complex():
    op = CartesianMRI(np.ones((8, 8), np.float32))
    y = op.forward(torch.ones(8, 8))
    assert y.is_complex()


def test_pet_attenuation_lowers_projections():
    n = 32
    ang = sparse_view_angles(12)
    x = torch.zeros(n, n)
    x[12:20, 12:20] = 1.0
    mu = np.full((n, n), 0.02)
    att = attenuation_factors(mu, ang)
    assert att.shape == (n, 12) and att.max() <= 1.0 and att.min() > 0
    y_att = PETOperator(n, ang, att).forward(x)
    y_none = PETOperator(n, ang).forward(x)
    assert (y_att <= y_none + 1e-6).all() and y_att.sum() < 0.9 * y_none.sum()
    torch.testing.assert_close(PETOperator(n, ang, sensitivity_scale=3.0).forward(x), 3.0 * y_none)


def test_spec_round_trip_rebuilds_same_operator():
    g = torch.Generator().manual_seed(5)
    for _, op in OPERATORS:
        again = build_operator(op.spec())
        x = _rand((2, *op.image_shape), op.is_complex, g)
        torch.testing.assert_close(again.forward(x), op.forward(x))


def test_shape_and_dtype_errors_are_clear():
    op = ParallelBeamCT(32, sparse_view_angles(8))
    with pytest.raises(OperatorShapeError, match=r"expects \(\.\.\., 32, 32\)"):
        op.forward(torch.zeros(30, 30))
    with pytest.raises(OperatorShapeError, match="measurement"):
        op.adjoint(torch.zeros(32, 9))
    with pytest.raises(TypeError, match="complex"):
        op.forward(torch.zeros(32, 32, dtype=torch.complex64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        op.forward(np.zeros((32, 32)))
    with pytest.raises(OperatorShapeError, match="empty"):
        op.forward(torch.zeros(0, 32, 32))
    with pytest.raises(ValueError, match="float32 or torch.float64"):
        ParallelBeamCT(32, sparse_view_angles(8), dtype=torch.float16)
    with pytest.raises(ValueError, match="float32 or torch.float64"):
        CartesianMRI(np.ones((8, 8)), _coil_maps(2, 8, 8), dtype=torch.complex64)
    with pytest.raises(ValueError, match="mask shape"):
        CartesianMRI(np.ones((8, 9)), _coil_maps(2, 8, 8))
    with pytest.raises(ValueError, match="attenuation"):
        PETOperator(16, sparse_view_angles(4), np.ones((16, 5)))
    with pytest.raises(ValueError, match="NaN"):
        ParallelBeamCT(16, [0.0, np.nan])


@pytest.mark.parametrize(
    "spec,match",
    [
        ({"modality": "xray", "image_shape": [8, 8]}, "unknown modality"),
        ({"modality": "ct", "angles_deg": [0, 90]}, "image_shape"),
        ({"modality": "ct", "image_shape": [8, 8]}, "angles_deg"),
        ({"modality": "ct", "image_shape": [8, 9], "angles_deg": [0]}, "square"),
        ({"modality": "mri", "image_shape": [8, 8]}, "mask"),
        ({"modality": "inpaint", "image_shape": [8, 8], "mask": np.ones((4, 4))}, "mask shape"),
    ],
)
def test_build_operator_errors_name_the_field(spec, match):
    with pytest.raises(ValueError, match=match):
        build_operator(spec)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(0)
    for _, op in OPERATORS:
        x = _rand((2, *op.image_shape), op.is_complex, g)
        ref = op.forward(x)
        gpu = build_operator(op.spec(), device="cuda").forward(x.cuda()).cpu()
        torch.testing.assert_close(gpu, ref, rtol=1e-4, atol=1e-4)


def test_ct_sparse_products_one_column_and_batch_agree_with_dense():
    from napari_diffrecon.physics.ct import radon_matrix, sparse_matmul

    a, at = radon_matrix(24, np.linspace(0, 180, 7, endpoint=False))
    assert a.crow_indices().dtype == torch.int32 and at.col_indices().dtype == torch.int32  # 32-bit indices
    dense = a.to_dense()
    x = torch.randn(24 * 24, 3, generator=torch.Generator().manual_seed(0))
    one = sparse_matmul(a, at, x[:, :1])  # matrix-vector path
    assert one.shape == (a.shape[0], 1)
    torch.testing.assert_close(one, dense @ x[:, :1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sparse_matmul(a, at, x), dense @ x, rtol=1e-5, atol=1e-5)
    # the gradient (DPS/MCG) goes through the stored transpose, for one column and for a batch
    for cols in (1, 3):
        xg = x[:, :cols].clone().requires_grad_(True)
        w = torch.randn(a.shape[0], cols, generator=torch.Generator().manual_seed(1))
        (sparse_matmul(a, at, xg) * w).sum().backward()
        torch.testing.assert_close(xg.grad, dense.T @ w, rtol=1e-5, atol=1e-5)


def test_ct_subset_cut_from_the_built_matrix_equals_a_fresh_build():
    from napari_diffrecon.physics import ParallelBeamCT

    op = ParallelBeamCT(20, np.linspace(0, 180, 9, endpoint=False))
    idx = np.arange(1, 9, 3)
    fresh = op.subset(idx)  # matrix not built yet: a fresh build
    assert fresh._matrices is None
    assert op.matrices[0].shape == (20 * 9, 400)  # builds the parent's matrix; the next subset is cut from it
    cut = op.subset(idx)
    assert cut._matrices is not None
    for m_cut, m_fresh in zip(cut._matrices, fresh.matrices, strict=True):
        torch.testing.assert_close(m_cut.to_dense(), m_fresh.to_dense())
    x = torch.randn(2, 20, 20, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(cut.forward(x), op.forward(x)[..., idx])
