"""CT angle sets: their coverage and the hot start they call for."""

import numpy as np
import pytest


def test_angular_coverage_counts_views_and_arc_modulo_180():
    from napari_diffrecon.physics.ct import angular_coverage, limited_angle_angles, sparse_view_angles

    assert angular_coverage(sparse_view_angles(23)) == pytest.approx((23, 180.0))
    assert angular_coverage(limited_angle_angles(90.0)) == (90, 90.0)  # 0°, 1°, …, 89°: a 90° scan
    assert angular_coverage(limited_angle_angles(150.0, n_views=20)) == pytest.approx((20, 150.0))
    assert angular_coverage(np.array([30.0, 0.0, 60.0, 90.0]) + 200.0) == (4, 120.0)  # unsorted, past 180°
    assert angular_coverage(sparse_view_angles(8, arc=360.0)) == (4, 180.0)  # θ and θ + 180° are the same view
    assert angular_coverage([10.0, 190.0, 10.0]) == (1, 0.0)
    assert angular_coverage([179.99999999, 0.0, 90.0])[0] == 2  # 180° is 0°


def test_default_hot_start_is_tv_for_few_views_or_a_limited_arc():
    from napari_diffrecon.physics.ct import limited_angle_angles, sparse_view_angles
    from napari_diffrecon.reconstruct import default_hot_start

    def ct(angles):
        return {"modality": "ct", "image_shape": [64, 64], "angles_deg": angles}

    assert default_hot_start(ct(sparse_view_angles(45))) == "fbp"
    assert default_hot_start(ct(sparse_view_angles(31))) == "fbp"
    assert default_hot_start(ct(sparse_view_angles(30))) == "tv"  # "at most 30 views"
    assert default_hot_start(ct(sparse_view_angles(23))) == "tv"
    assert default_hot_start(ct(limited_angle_angles(90.0))) == "tv"
    assert default_hot_start(ct(limited_angle_angles(150.0))) == "tv"
    assert default_hot_start(ct(limited_angle_angles(159.0))) == "tv"
    assert default_hot_start(ct(limited_angle_angles(160.0))) == "fbp"  # "an arc under 160°"
    assert default_hot_start(ct(sparse_view_angles(180))) == "fbp"
    assert default_hot_start({**ct(sparse_view_angles(8)), "modality": "CT"}) == "tv"  # spelled as in a DICOM header
    assert default_hot_start({"modality": "mri"}) == "cg" and default_hot_start({"modality": "pet"}) == "tv"


def test_projector_sees_only_the_field_of_view():
    """The inscribed disc (scikit-image's circle=True convention) is all the projector sees: A = A·M exactly."""
    import torch
    from skimage.transform import radon

    from napari_diffrecon.physics import ParallelBeamCT, PETOperator
    from napari_diffrecon.physics.ct import fov_mask

    n = 32
    mask = fov_mask(n)
    yy, xx = np.mgrid[:n, :n]
    assert np.array_equal(mask, (yy - 16) ** 2 + (xx - 16) ** 2 <= 256) and mask[16, 0] and not mask[0, 0]
    op = ParallelBeamCT(n, sparse_view_angles := np.linspace(0, 180, 9, endpoint=False))
    assert torch.equal(op.support, torch.from_numpy(mask))
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, n, generator=g)
    outside_only = x.masked_fill(op.support, 0)
    assert outside_only.abs().sum() > 10  # the corners hold something …
    assert op.forward(outside_only).abs().max() == 0  # … that is not projected
    back = op.adjoint(torch.rand(op.data_shape, generator=g))
    assert back[~op.support].abs().max() == 0 and back[op.support].abs().min() > 0
    # on an image inside the disc: still scikit-image's radon
    inside = x.masked_fill(~op.support, 0)
    ref = radon(inside.double().numpy(), theta=sparse_view_angles, circle=True)
    assert np.abs(op.forward(inside).numpy() - ref).max() < 1e-4 * np.abs(ref).max()
    assert torch.equal(PETOperator(n, sparse_view_angles).support, op.support)


def test_restrict_and_fill_outside():
    import torch

    from napari_diffrecon.physics import CartesianMRI, ParallelBeamCT
    from napari_diffrecon.physics.masks import make_mask

    op = ParallelBeamCT(16, [0.0, 45.0, 90.0])
    x = torch.arange(1, 2 * 256 + 1, dtype=torch.float32).reshape(2, 16, 16)  # every value once
    r = op.restrict(x)
    assert torch.equal(r[:, op.support], x[:, op.support]) and r[:, ~op.support].abs().max() == 0
    f = op.fill_outside(r)
    assert torch.equal(f[:, op.support], x[:, op.support])  # inside untouched
    inside = np.argwhere(op.support.numpy())
    for b in range(2):
        for p in np.argwhere(~op.support.numpy()):  # each pixel outside takes the value of a nearest pixel inside
            src = np.argwhere(x[b].numpy() == float(f[b, p[0], p[1]]))[0]
            assert op.support[src[0], src[1]]
            assert np.hypot(*(src - p)) == pytest.approx(np.hypot(*(inside - p).T).min())
    mri = CartesianMRI(make_mask("random", (16, 16), 2.0, seed=0))
    z = torch.randn(16, 16, dtype=torch.complex64)
    assert mri.support is None and mri.restrict(z) is z and mri.fill_outside(z) is z


def test_classical_images_are_zero_outside_the_field_of_view_and_a_hot_start_continues_past_it(monkeypatch):
    """TV / CG / MLEM leave free values outside the disc (the projector does not see them): every classical result is
    zeroed there, and the image a diffusion run starts from is the classical one continued past the rim."""
    import torch

    import napari_diffrecon.reconstruct as rec
    from napari_diffrecon.baselines import reconstruct_baseline
    from napari_diffrecon.physics import ParallelBeamCT, PETOperator
    from napari_diffrecon.physics.ct import sparse_view_angles
    from napari_diffrecon.simulate import simulate_from_image

    yy, xx = np.mgrid[:32, :32]
    img = 0.2 + ((yy - 16) ** 2 + (xx - 14) ** 2 < 120) + 0.5 * (np.abs(yy - 20) < 3)
    op = ParallelBeamCT(32, sparse_view_angles(12))
    m = op.forward(torch.as_tensor(op.restrict(torch.as_tensor(img, dtype=torch.float32))))
    for method, params in (("tv", {"iters": 200}), ("cg", {}), ("fbp", {})):
        x = reconstruct_baseline(method, op, m, **params)
        assert x[~op.support].abs().max() == 0 and x[op.support].abs().max() > 0.5, method
    pet = PETOperator(32, sparse_view_angles(12))
    x = reconstruct_baseline("mlem", pet, pet.forward(torch.as_tensor(img, dtype=torch.float32) * 50).round(),
                             iters=5)
    assert x[~pet.support].abs().max() == 0

    seen = {}

    def fake_sampler(problem, params, n_samples=1, seed=0, x_init=None, **kw):
        seen["x_init"], seen["op"] = x_init, problem.operator
        return iter(())

    monkeypatch.setattr(rec, "get_sampler", lambda name: fake_sampler)
    meas = simulate_from_image(img, "ct", size=32, views=12, seed=0)
    _, start, _ = rec.prepare_run(meas, rec.RunSettings(method="dds", hot_start="tv",
                                                        params=rec.SamplerParams(n_steps=2, t0=0.3)))
    list(start())
    x0, op = seen["x_init"], seen["op"]
    classical = torch.as_tensor(rec.reconstruct(meas, rec.RunSettings(method="tv")).reconstruction)
    assert classical[~op.support].abs().max() == 0
    # continued past the rim (each pixel outside = the nearest one inside): no edge to zero for the prior
    torch.testing.assert_close(x0, op.fill_outside(classical), rtol=1e-5, atol=1e-6)
    assert not torch.equal(x0, classical)
    with pytest.raises(rec.SamplingError, match="start image of shape"):  # a start image of other data: refused
        settings = rec.RunSettings(method="dds", hot_start="tv", params=rec.SamplerParams(n_steps=2, t0=0.3))
        rec.prepare_run(meas, settings, start_image=(classical.T.reshape(-1), {}))


def test_data_of_an_object_past_the_field_of_view_are_flagged():
    """Projections of an object that fills the square (truncated by the disc) cannot be fitted by the model: the
    classical run's residual stays far above the noise floor and the warning names the field of view; the same data
    of the object inside the disc fit."""
    import warnings

    import torch
    from skimage.transform import radon

    from napari_diffrecon.io.bundle import Measurement
    from napari_diffrecon.physics.ct import fov_mask, sparse_view_angles
    from napari_diffrecon.reconstruct import RunSettings, reconstruct

    yy, xx = np.mgrid[:32, :32]
    img = 1.0 + 0.5 * ((yy - 14) ** 2 + (xx - 18) ** 2 < 40)  # tissue everywhere, into the corners
    theta = sparse_view_angles(30)
    out = {}
    for name, x in (("past", img), ("inside", img * fov_mask(32))):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scikit-image: "image must be zero outside the reconstruction circle"
            sino = radon(x, theta=theta, circle=True)
        sigma = 0.002 * float(np.sqrt(np.mean(sino**2)))
        sino = sino + sigma * np.random.default_rng(0).standard_normal(sino.shape)
        m = Measurement(data=sino.astype(np.float32), noise={"model": "gaussian", "sigma": sigma},
                        operator={"modality": "ct", "image_shape": [32, 32], "angles_deg": theta.tolist()})
        out[name] = reconstruct(m, RunSettings(method="tv", baseline_params={"iters": 300}))
    assert any("past the scanned disc" in w for w in out["past"].provenance["warnings"])
    assert not any("does not fit" in w for w in out["inside"].provenance["warnings"])
    assert out["past"].residual > 10 * out["inside"].residual
    assert torch.as_tensor(out["past"].reconstruction)[~torch.from_numpy(fov_mask(32))].abs().max() == 0


def test_runs_starting_together_build_one_system_matrix_and_leave_the_warning_filters_alone(monkeypatch):
    """A batched search starts several runs at once on one geometry: the matrix is built once, the others wait for it.
    torch's sparse-CSR notices are filtered by message, not by warnings.catch_warnings() around the build: that saves
    and restores the process-wide filter list and, from threads at once, left "ignore UserWarning" behind."""
    import threading
    import warnings

    import napari_diffrecon.physics.ct as ct

    built = []
    real = ct._build_matrix
    monkeypatch.setattr(ct, "_build_matrix", lambda *a: built.append(a[0]) or real(*a))
    before = list(warnings.filters)
    for trial in range(3):
        angles = np.linspace(0, 180, 7 + trial, endpoint=False) + 0.123  # a geometry no other test has cached
        barrier = threading.Barrier(4)
        out = []

        def run(angles=angles, barrier=barrier, out=out):
            barrier.wait()
            out.append(ct.radon_matrix(24, angles)[0])

        threads = [threading.Thread(target=run) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(out) == 4 and all(a is out[0] for a in out)
    assert len(built) == 3  # once per geometry
    assert warnings.filters == before
    with pytest.warns(UserWarning, match="still shown"):
        warnings.warn("still shown", UserWarning, stacklevel=1)
