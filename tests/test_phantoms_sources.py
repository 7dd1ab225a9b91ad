"""Training sources: procedural phantoms, the MNI152 template, complex phase, built-in pools, export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from napari_diffrecon.priors import load_prior
from napari_diffrecon.priors.phantoms import TISSUES, _scanner, anatomy, ct_phantom, pet_phantom, phantom_batch
from napari_diffrecon.priors.sources import (
    _mri_augment,
    _mri_view,
    builtin_pool,
    coarser_voxels,
    mni152_slices,
    normalisation_for,
    random_phase,
    real_ct_view,
)
from napari_diffrecon.priors.training import export_checkpoint


def test_ct_phantom_is_seeded_and_in_hounsfield_range():
    a = ct_phantom(64, np.random.default_rng(3))
    b = ct_phantom(64, np.random.default_rng(3))
    c = ct_phantom(64, np.random.default_rng(4))
    assert a.shape == (64, 64) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert -1024 <= a.min() and a.max() <= 3000


@pytest.mark.parametrize("region", ["abdomen", "thorax", "pelvis", "head"])
def test_ct_phantom_regions_hold_their_tissues(region):
    rng = np.random.default_rng(0)
    img = ct_phantom(96, rng, region=region, max_zoom=1.0)  # whole section: air outside the body
    assert img[0, 0] < -900  # corner is air
    body = img > -500
    assert 0.15 < body.mean() < 0.95
    assert (img > 600).any(), "bone (cortical) is drawn"
    soft = img[(img > -30) & (img < 120)]
    assert soft.size > 0.05 * img.size, "soft tissue is drawn"
    # texture, not flat regions: soft tissue varies by more than a few HU
    assert soft.std() > 5
    if region == "thorax":
        assert ((img > -950) & (img < -600)).mean() > 0.05, "lungs are drawn"


def test_ct_scanner_blurs_edges_more_when_zoomed_and_adds_ramp_filtered_noise():
    """A clinical CT's blur is fixed in mm, so a zoomed view shows it over more pixels; its noise is band-pass."""
    edge = np.zeros((128, 128), np.float32)
    edge[:, 64:] = 1000.0

    def width(zoom: float) -> float:  # mean number of pixels strictly between 10 % and 90 % of the step
        ws = []
        for seed in range(12):
            row = _scanner(edge, zoom, np.random.default_rng(seed))[60:68].mean(0)
            ws.append(np.sum((row > 100) & (row < 900)))
        return float(np.mean(ws))

    assert width(1.0) < 1.5  # whole-body pixels (2.3–3.5 mm) hide a 0.6–3 mm blur
    assert width(4.0) > 2 * max(width(1.0), 1.0)
    noise = np.stack([_scanner(np.zeros((128, 128), np.float32), 1.0, np.random.default_rng(s)) for s in range(12)])
    assert 0 < noise.std() < 15
    power = np.mean(np.abs(np.fft.fft2(noise)) ** 2, 0)
    f = np.hypot(*np.meshgrid(np.fft.fftfreq(128), np.fft.fftfreq(128), indexing="ij"))
    low, mid = power[(f > 0) & (f < 0.03)].mean(), power[(f > 0.1) & (f < 0.2)].mean()
    assert low < 0.4 * mid  # ramp-filtered (FBP) noise; white noise would give 1


def test_every_ct_phantom_goes_through_the_scanner_at_its_view_zoom(monkeypatch):
    import napari_diffrecon.priors.phantoms as phantoms

    zooms = []
    real = phantoms._scanner
    monkeypatch.setattr(phantoms, "_scanner",
                        lambda img, zoom, rng, **kw: zooms.append(zoom) or real(img, zoom, rng, **kw))
    rng = np.random.default_rng(5)
    for _ in range(12):
        ct_phantom(128, rng)
    assert len(zooms) == 12 and all(1.0 <= z <= 4.0 for z in zooms)  # 512-pixel canvas, 128 out: at most 4×
    assert any(z == 1.0 for z in zooms) and any(z > 1.5 for z in zooms)  # whole sections and zoomed views


def test_detailed_ct_phantoms_add_rib_heads_laminae_and_muscle_striations_and_leave_the_plain_ones_alone():
    """``detail`` (builtin:ct-phantoms-detailed) adds bone beside the spine (rib heads in the thorax, laminae) and fat
    lines inside the paraspinal muscles; without it a seed gives exactly the draws the shipped CT prior trained on."""
    from napari_diffrecon.priors import phantoms

    bone = {"cortical", "marrow", "trabecular"}
    more_bone = more_fat = 0
    for seed in range(6):
        plain, _ = anatomy(256, np.random.default_rng(seed), "thorax")
        rich, _ = anatomy(256, np.random.default_rng(seed), "thorax", detail=True)
        names = np.array(list(TISSUES))
        near = (np.abs(plain.X) < 0.4) & (plain.Y > 0.2)  # the spine's neighbourhood (the spine is at the back)
        n_bone = [np.isin(names[c.label], list(bone))[near].sum() for c in (plain, rich)]
        more_bone += n_bone[1] > n_bone[0]
        muscle = near & (names[plain.label] == "muscle")  # the paraspinal muscles are drawn before the details
        more_fat += (names[rich.label] == "fat")[muscle].sum() > 0
    assert more_bone == 6 and more_fat == 6
    calls = []
    real = phantoms._spine_detail
    try:
        phantoms._spine_detail = lambda *a, **k: calls.append(1) or real(*a, **k)
        a = ct_phantom(64, np.random.default_rng(7))
        assert not calls  # off by default
        np.testing.assert_array_equal(a, ct_phantom(64, np.random.default_rng(7), detail=False))
    finally:
        phantoms._spine_detail = real


def test_streaks_are_lines_along_one_direction_of_the_stated_strength():
    from napari_diffrecon.priors.phantoms import _streaks

    for seed in range(8):
        s = _streaks(128, np.random.default_rng(seed))
        assert s.shape == (128, 128) and 5 <= s.std() <= 30.01
        gy, gx = np.gradient(s.astype(np.float64))
        j = np.array([[np.mean(gx * gx), np.mean(gx * gy)], [np.mean(gx * gy), np.mean(gy * gy)]])
        lo, hi = np.linalg.eigvalsh(j)
        assert hi > 5 * lo  # oriented: the intensity changes across the streaks, hardly along them
    white = np.random.default_rng(0).standard_normal((128, 128))
    gy, gx = np.gradient(white)
    lo, hi = np.linalg.eigvalsh(np.array([[np.mean(gx * gx), np.mean(gx * gy)], [np.mean(gx * gy), np.mean(gy * gy)]]))
    assert hi < 1.5 * lo  # the check tells them from isotropic noise


def test_anatomy_labels_are_known_tissues():
    cv, _ = anatomy(128, np.random.default_rng(1), "abdomen")
    assert set(np.unique(cv.label)) <= set(range(len(TISSUES)))


def test_pet_phantom_is_nonnegative_unit_scaled_and_smooth():
    img = pet_phantom(64, np.random.default_rng(2))
    assert img.min() >= 0 and 0.9 < np.percentile(img, 99.5) <= 1.0 + 1e-5
    # blurred by the scanner resolution: neighbouring pixels are strongly correlated
    corr = np.corrcoef(img[:, :-1].ravel(), img[:, 1:].ravel())[0, 1]
    assert corr > 0.9


def test_phantom_batch_rejects_mri():
    assert phantom_batch("ct", 2, 32, np.random.default_rng(0)).shape == (2, 32, 32)
    with pytest.raises(ValueError, match="phantoms exist for"):
        phantom_batch("mri", 1, 32, np.random.default_rng(0))


def test_mni152_slices_are_real_brain_slices():
    sl = mni152_slices(64, step=8)
    assert sl.ndim == 3 and sl.shape[1:] == (64, 64) and sl.shape[0] >= 20
    assert sl.min() >= 0 and sl.max() <= 1.0 + 1e-6
    assert all(s.std() > 0.1 for s in sl)  # none constant


def _high_freq_share(img: np.ndarray) -> float:
    f = np.abs(np.fft.fftshift(np.fft.fft2(img))) ** 2
    n = img.shape[0]
    yy, xx = np.mgrid[:n, :n] - n // 2
    return float(f[np.hypot(yy, xx) > n / 8].sum() / f.sum())


def test_coarser_voxels_removes_detail_finer_than_the_voxel_and_keeps_the_mean():
    sl = mni152_slices(128, step=16)[3]
    coarse = coarser_voxels(sl, 3.0)
    assert coarse.shape == sl.shape and coarse.dtype == np.float32
    assert abs(coarse.mean() - sl.mean()) < 0.02 * sl.mean()
    assert _high_freq_share(coarse) < 0.5 * _high_freq_share(sl)
    np.testing.assert_allclose(coarser_voxels(sl, 1.0), sl, atol=1e-5)  # factor 1: unchanged


def test_mri_augmentation_draws_coarse_acquisitions_about_as_often_as_asked(monkeypatch):
    from napari_diffrecon.priors import sources

    sl = mni152_slices(64, step=16)[3]
    factors = []
    real = sources.coarser_voxels

    def counted(img, factor, order=1, **kw):
        factors.append(factor)
        return real(img, factor, order, **kw)

    monkeypatch.setattr(sources, "coarser_voxels", counted)
    rng = np.random.default_rng(0)
    for p, n in ((0.0, 50), (0.5, 400), (1.0, 50)):
        factors.clear()
        for _ in range(n):
            _mri_augment(sl, rng, p_coarse=p)
        k = len(factors)
        assert abs(k - p * n) <= 3 * np.sqrt(n * 0.25) + 1e-9, (p, k)  # within 3 binomial standard deviations
    assert 1.0 <= min(factors) and max(factors) <= 4.0


def test_coarse_mri_draws_are_the_same_draws_with_coarser_voxels_and_no_sharper():
    sl = mni152_slices(64, step=16)[3]
    lost = []
    for seed in range(30):  # the coarse step comes last: same seed, same contrast/bias/inversion, then coarser
        fine = _mri_augment(sl, np.random.default_rng(seed), p_coarse=0.0)
        coarse = _mri_augment(sl, np.random.default_rng(seed), p_coarse=1.0)
        assert np.corrcoef(fine.ravel(), coarse.ravel())[0, 1] > 0.8
        assert _high_freq_share(coarse) <= 1.02 * _high_freq_share(fine)
        lost.append(_high_freq_share(coarse) / _high_freq_share(fine))
    assert np.median(lost) < 0.5  # factors are log-uniform in 1-4: most draws lose most of the fine detail


def test_mri_views_zoom_into_the_head_or_show_the_whole_slice():
    base = mni152_slices(128, step=16)[3]
    whole = _mri_view(base, 64, np.random.default_rng(0), p_zoom=0.0)
    from skimage.transform import resize

    np.testing.assert_allclose(whole, resize(base, (64, 64), order=1, anti_aliasing=True, preserve_range=True),
                               atol=1e-5)
    zoomed = [_mri_view(base, 64, np.random.default_rng(s), p_zoom=1.0, max_zoom=3.0) for s in range(20)]
    assert all(z.shape == (64, 64) and z.dtype == np.float32 for z in zoomed)
    # magnified anatomy: less of the energy at high spatial frequency than in the whole-slice view
    assert np.median([_high_freq_share(z) for z in zoomed]) < _high_freq_share(whole)
    # centred on the head: most of each view is tissue, not the background around the head
    assert np.median([(z > 0.1).mean() for z in zoomed]) > (whole > 0.1).mean()
    assert len({float(z.sum()) for z in zoomed}) == 20  # different crops


def test_mri_draws_with_a_cut_field_of_view_are_zero_outside_it_and_noise_is_on_the_coarse_grid():
    sl = mni152_slices(64, step=16)[3]
    cut = 0
    for seed in range(20):
        plain = _mri_augment(sl, np.random.default_rng(seed), p_coarse=0.0)
        fov = _mri_augment(sl, np.random.default_rng(seed), p_coarse=0.0, p_fov=1.0)
        inside = fov > 0
        ratio = np.median(fov[inside] / np.maximum(plain[inside], 1e-6))
        np.testing.assert_allclose(fov[inside], plain[inside] * ratio, rtol=1e-4, atol=1e-5)  # same draw, rescaled
        rows, cols = (fov == 0).all(axis=1), (fov == 0).all(axis=0)
        cut += int(rows[0] or rows[-1] or cols[0] or cols[-1]) * int(((fov == 0) & (plain > 0.1)).any())
    assert cut >= 18  # an edge band is zeroed through tissue (bands are at least 3 % of the side)
    for seed in range(12):  # with the coarse step too: the cut's padding stays zero and the draw is the same draw
        plain = _mri_augment(sl, np.random.default_rng(seed), p_coarse=1.0)
        both = _mri_augment(sl, np.random.default_rng(seed), p_coarse=1.0, p_fov=1.0)
        zero_rows, zero_cols = (both == 0).all(axis=1), (both == 0).all(axis=0)
        assert zero_rows[0] or zero_rows[-1] or zero_cols[0] or zero_cols[-1]
        inside = (both > 0.05) & (plain > 0.05)
        ratio = both[inside] / plain[inside]
        assert np.median(np.abs(ratio / np.median(ratio) - 1)) < 1e-3  # a different factor or order would not match
        noisy = _mri_augment(sl, np.random.default_rng(seed), p_coarse=1.0, p_fov=1.0, p_noise=1.0)
        pad_rows, pad_cols = zero_rows & ~(plain == 0).all(axis=1), zero_cols & ~(plain == 0).all(axis=0)
        assert pad_rows.any() or pad_cols.any()
        assert (noisy[pad_rows] == 0).all() and (noisy[:, pad_cols] == 0).all()  # no noise in the padding

    def neighbour_corr(diff, where):
        pairs = np.stack([diff[:, :-1][where[:, :-1]], diff[:, 1:][where[:, :-1]]])
        return np.corrcoef(pairs)[0, 1]

    corr = {0.0: [], 1.0: []}
    for seed in range(16):
        for p_coarse in corr:
            clean = _mri_augment(sl, np.random.default_rng(seed), p_coarse=p_coarse)
            noisy = _mri_augment(sl, np.random.default_rng(seed), p_coarse=p_coarse, p_noise=1.0)
            diff, tissue = noisy - clean, clean > 0.3
            assert 0.002 < diff[tissue].std() < 0.1  # 0.5-5 % of the 99.5th percentile
            corr[p_coarse].append(neighbour_corr(diff, tissue))
    # thermal noise is acquired on the coarse grid: neighbouring pixels' noise is correlated once resampled
    assert np.median(corr[1.0]) > 0.3 and max(np.abs(corr[0.0])) < 0.2


def test_random_phase_is_smooth():
    ph = random_phase((64, 64), np.random.default_rng(0))
    assert np.abs(np.diff(ph, axis=0)).max() < 0.5


@pytest.mark.parametrize("source,channels", [("ct-phantoms", 1), ("ct-phantoms-detailed", 1), ("pet-phantoms", 1),
                                            ("mni152", 2), ("mni152-views", 2)])
def test_builtin_pools_give_model_units_and_refresh(source, channels):
    pool, info = builtin_pool(source, 64, channels=channels, seed=0, pool_size=6, refresh_every=2, refresh_count=2)
    assert pool.images.shape == (6, channels, 64, 64)
    assert info["source"] == f"builtin:{source}" and "licence" in info
    before = pool.images.clone()
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        patch = pool.batch(4, 32, gen)
    assert patch.shape == (4, channels, 32, 32)
    changed = (pool.images != before).flatten(1).any(1).sum()
    assert changed == 2, "a refresh replaces refresh_count images"
    if source.startswith("ct-phantoms"):  # HU/1000: air at −1
        assert pool.images.min() < -0.9
    if channels == 2:
        mag = pool.images.pow(2).sum(1).sqrt()
        assert mag.max() <= 1.25 and pool.images[:, 1].abs().max() > 0.05  # phase puts signal in the imaginary part


def test_real_ct_views_have_the_drawn_pixel_size_stay_inside_the_slice_and_avoid_air():
    spacing = 0.5  # mm
    yy, xx = np.mgrid[0:400, 0:400].astype(np.float64)
    plane = (0.6 * xx + 0.8 * yy) * spacing  # a tilted plane: 1 "HU" per mm along its gradient
    rng = np.random.default_rng(0)
    gy, gx = np.mgrid[0:32, 0:32].astype(np.float64)
    design = np.stack([gy.ravel(), gx.ravel(), np.ones(32 * 32)], 1)
    for lo, hi in ((1.0, 1.0), (0.5, 1.5), (2.0, 6.0)):
        for _ in range(8):
            v = real_ct_view(plane, spacing, 32, rng, pixel_mm=(lo, hi), max_air=1.0)
            assert v.shape == (32, 32) and v.dtype == np.float32
            # inside the slice the view of a plane is exactly a plane (an edge clamped by mode="nearest" is not)
            coef, res, *_ = np.linalg.lstsq(design, v.ravel().astype(np.float64), rcond=None)
            assert np.sqrt(res[0] / v.size) < 1e-3 * np.abs(v).max()
            assert lo - 1e-3 <= np.hypot(coef[0], coef[1]) <= hi + 1e-3  # mm per output pixel: the drawn size
    # a slice that is mostly air: views are redrawn until at most max_air of them is air
    air = np.full((400, 400), -1024.0, np.float32)
    air[:, 250:] = 40.0
    fractions = [(real_ct_view(air, 1.0, 32, rng, pixel_mm=(1.0, 1.0), max_air=0.5) < -900).mean() for _ in range(10)]
    assert max(fractions) <= 0.5
    # asking for coarser pixels than the slice holds gives the whole slice, at any size (no rounding past its edge)
    for size in (32, 64, 128):
        whole = real_ct_view(plane, spacing, size, rng, pixel_mm=(50.0, 50.0), max_air=1.0)
        coef, *_ = np.linalg.lstsq(np.stack([*np.mgrid[0:size, 0:size].reshape(2, -1), np.ones(size * size)], 1),
                                   whole.ravel().astype(np.float64), rcond=None)
        assert np.hypot(coef[0], coef[1]) == pytest.approx(399 * spacing / size, rel=1e-3)


def test_real_ct_source_reads_no_evaluation_slice():
    from napari_diffrecon.priors.sources import REAL_CT_FILES

    evaluation = ("CT_small", "J2K_pixelrep_mismatch", "693_")  # pydicom's test CTs, the benchmark's slices
    assert not [f for f in REAL_CT_FILES if any(f.startswith(e) for e in evaluation)]


def test_real_ct_source_pool_when_pydicom_data_is_installed():
    pytest.importorskip("data_store", reason="pydicom-data (the train extra) is not installed")
    pytest.importorskip("gdcm", reason="python-gdcm (the train extra) is not installed")
    pool, info = builtin_pool("ct-phantoms-real", 64, seed=0, pool_size=12)
    assert pool.images.shape == (12, 1, 64, 64) and info["n_real_slices"] == 2
    assert "MIT" in info["licence"] and pool.images.min() >= -1.03 and pool.images.max() <= 3.01


def _fake_sdist(tmp_path, volumes):
    """A tarball laid out like pyradiomics' sdist, holding ``volumes`` ((x, y, z) arrays, spacing) as NRRD."""
    import hashlib
    import tarfile

    nrrd = pytest.importorskip("nrrd")
    from napari_diffrecon.priors.sources import CHEST_CT_MEMBERS

    tar_path = tmp_path / "pyradiomics-3.1.0.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        for member, (vol, spacing) in zip(CHEST_CT_MEMBERS, volumes, strict=True):
            f = tmp_path / member.rsplit("/", 1)[1]
            nrrd.write(str(f), vol, {"space": "left-posterior-superior", "encoding": "gzip",
                                     "space directions": np.diag([spacing, spacing, 5.0])})
            tar.add(f, arcname=member)
    return tar_path, hashlib.sha256(tar_path.read_bytes()).hexdigest()


def test_chest_ct_slices_reads_both_volumes_upright_with_their_spacing(tmp_path):
    from napari_diffrecon.priors.sources import chest_ct_slices

    x, y, z = np.meshgrid(np.arange(6), np.arange(5), np.arange(3), indexing="ij")
    vol1 = (100 * x + 10 * y + z).astype(np.int16)  # NRRD order (x, y, z)
    vol1[0, 0, 0] = 4000  # above the clip
    vol2 = np.full((4, 4, 2), -2000, np.int16)  # below it
    tar_path, digest = _fake_sdist(tmp_path, [(vol1, 0.57), (vol2, 0.63)])
    vols = chest_ct_slices(tar_path, sha256=digest)
    assert [len(v) for v in vols] == [3, 2]
    for k, (sl, spacing) in enumerate(vols[0]):
        assert sl.shape == (5, 6) and sl.dtype == np.float32 and spacing == pytest.approx(0.57)
        expect = (100 * np.arange(6)[None, :] + 10 * np.arange(5)[:, None] + k).astype(np.float32)  # rows = y
        if k == 0:
            expect[0, 0] = 3000.0
        np.testing.assert_array_equal(sl, expect)
    assert vols[1][0][1] == pytest.approx(0.63) and float(vols[1][1][0].max()) == -1024.0


def test_chest_ct_slices_refuses_no_file_a_missing_file_and_another_file(tmp_path, monkeypatch):
    from napari_diffrecon.priors.sources import PYRADIOMICS_ENV, chest_ct_slices

    monkeypatch.delenv(PYRADIOMICS_ENV, raising=False)
    with pytest.raises(RuntimeError, match="curl -LO https://files.pythonhosted.org.*" + PYRADIOMICS_ENV):
        chest_ct_slices()
    with pytest.raises(RuntimeError, match="no such file"):
        chest_ct_slices(tmp_path / "pyradiomics-3.1.0.tar.gz")
    other = tmp_path / "other.tar.gz"
    other.write_bytes(b"not the sdist")
    monkeypatch.setenv(PYRADIOMICS_ENV, str(other))
    with pytest.raises(RuntimeError, match="SHA-256 .* not that of pyradiomics-3.1.0.tar.gz"):
        chest_ct_slices()


def test_chest_source_draws_the_four_real_groups_equally(monkeypatch):
    import napari_diffrecon.priors.sources as src

    flat = [(np.full((300, 300), hu, np.float32), 0.5) for hu in (100.0, 200.0)]  # "spine", "abdomen"
    chest = [[(np.full((300, 300), hu, np.float32), 0.6) for _ in range(n)] for hu, n in ((300.0, 40), (400.0, 5))]
    monkeypatch.setattr(src, "real_ct_slices", lambda: flat)
    monkeypatch.setattr(src, "chest_ct_slices", lambda: chest)
    pool, info = src.builtin_pool("ct-phantoms-real-chest", 32, seed=0, pool_size=400)
    assert info["n_real_slices"] == 47 and info["pyradiomics_sdist_sha256"] == src.PYRADIOMICS_SDIST_SHA256
    means = pool.images.flatten(1).mean(1) * 1000  # HU of each image (the real views are constant)
    counts = [int((means.sub(hu).abs() < 1e-2).sum()) for hu in (100.0, 200.0, 300.0, 400.0)]
    real = sum(counts)
    assert 0.3 * 400 <= real <= 0.5 * 400  # REAL_CT_FRACTION of the draws
    assert all(0.15 * real <= c <= 0.35 * real for c in counts), counts  # each group a quarter, not per slice
    pool2, info2 = src.builtin_pool("ct-phantoms-real", 32, seed=0, pool_size=100)
    assert info2["n_real_slices"] == 2 and "pyradiomics_sdist_sha256" not in info2


def test_cta_ct_slices_reads_nifti_members_upright(tmp_path):
    import gzip
    import hashlib
    import tarfile

    import nibabel as nib

    from napari_diffrecon.priors.sources import CTA_MEMBERS, cta_ct_slices

    x, y, z = np.meshgrid(np.arange(6), np.arange(5), np.arange(3), indexing="ij")
    vols = [(100 * x + 10 * y + z).astype(np.int16), np.full((4, 4, 2), 5000, np.int16)]
    tar_path = tmp_path / "totalsegmentator-2.18.0.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        for member, vol in zip(CTA_MEMBERS, vols, strict=True):
            f = tmp_path / "v.nii.gz"
            img = nib.Nifti1Image(vol, np.diag([-1.5, -1.5, 3.0, 1.0]))  # L, P, S axes, as the real files
            f.write_bytes(gzip.compress(img.to_bytes()))
            tar.add(f, arcname=member)
    out = cta_ct_slices(tar_path, sha256=hashlib.sha256(tar_path.read_bytes()).hexdigest())
    assert [len(v) for v in out] == [3, 2]
    for k, (sl, spacing) in enumerate(out[0]):
        assert spacing == pytest.approx(1.5) and sl.dtype == np.float32
        expect = (100 * np.arange(6)[None, :] + 10 * np.arange(5)[:, None] + k).astype(np.float32)  # rows = y (P)
        np.testing.assert_array_equal(sl, expect)
    assert float(out[1][0][0].max()) == 3000.0


def test_more_source_adds_the_cta_groups_and_never_views_them_finer_than_stored(monkeypatch):
    import napari_diffrecon.priors.sources as src

    yy, xx = np.mgrid[0:300, 0:300].astype(np.float32)
    flat = [(np.full((300, 300), 100.0, np.float32), 0.5), (np.full((300, 300), 200.0, np.float32), 0.8)]
    monkeypatch.setattr(src, "real_ct_slices", lambda: flat)
    monkeypatch.setattr(src, "chest_ct_slices", lambda: [[(np.full((300, 300), 300.0, np.float32), 0.6)]])
    plane = 0.6 * xx + 0.8 * yy  # 1 "HU" per input pixel along its gradient: a view's slope is its pixel / 1.5 mm
    monkeypatch.setattr(src, "cta_ct_slices", lambda: [[(plane + 1000.0, 1.5)], [(plane + 1000.0, 1.5)]])
    pool, info = src.builtin_pool("ct-phantoms-real-more", 32, seed=0, pool_size=300)
    assert info["n_real_slices"] == 5 and info["totalsegmentator_sdist_sha256"] == src.TOTALSEG_SDIST_SHA256
    imgs = pool.images[:, 0].numpy().astype(np.float64) * 1000
    planes = [im for im in imgs if im.min() > 990]  # the stand-in CTA views (every other draw is below 400 HU)
    assert len(planes) > 20
    grads = []
    for im in planes:
        gy = np.polyfit(np.arange(32), im.mean(axis=1), 1)[0]
        gx = np.polyfit(np.arange(32), im.mean(axis=0), 1)[0]
        grads.append(np.hypot(gy, gx))
    assert min(grads) >= 1.0 - 1e-3  # at least one stored pixel (1.5 mm) per view pixel: never finer than stored
    assert max(grads) <= 2.2 / 1.5 + 1e-3


def test_chest_source_on_the_real_sdist_when_it_is_given():
    import os

    from napari_diffrecon.priors.sources import PYRADIOMICS_ENV, chest_ct_slices

    if not os.environ.get(PYRADIOMICS_ENV):
        pytest.skip(f"{PYRADIOMICS_ENV} is not set (the pyradiomics sdist is a training-only download)")
    pytest.importorskip("nrrd")
    vols = chest_ct_slices()
    assert [len(v) for v in vols] == [48, 61]
    sl, spacing = vols[0][24]
    assert sl.shape == (512, 512) and spacing == pytest.approx(0.5703125)
    assert -1024.0 <= sl.min() < -900 and np.median(sl[200:300, 200:300]) > -300  # air, and soft tissue mid-chest
    # upright: the back (the spine, bone > 300 HU) is in the lower half of the image
    bone = np.argwhere(sl > 300)
    assert bone[:, 0].mean() > 256


def test_normalisation_for_complex_has_no_offset():
    assert normalisation_for("mri", 2)["offset"] == 0.0
    assert normalisation_for("ct", 1)["native_units"] == "HU"


def test_train_cli_on_builtin_source_then_export_a_running_checkpoint(tmp_path):
    from napari_diffrecon.cli import main

    out = tmp_path / "run"
    argv = ["train", "builtin:ct-phantoms", "--modality", "ct", "--name", "ctp", "--resolution", "48", "--patch",
            "32", "--arch", "tiny", "--batch", "4", "--steps", "4", "--val-every", "2", "--pool", "6",
            "--no-progress", "-o", str(out)]
    assert main(argv) == 0
    prior = load_prior(out / "ctp.json")
    card = json.loads((out / "ctp.json").read_text())
    assert card["training"]["data"]["source"] == "builtin:ct-phantoms"
    assert card["normalisation"]["native_units"] == "HU" and card["training"]["steps"] == 4
    # export from the checkpoint gives the same EMA weights as the finished run
    w, c = export_checkpoint(out, tmp_path / "exported")
    again = load_prior(c)
    x = torch.randn(1, 1, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(prior.denoise(x, 0.3), again.denoise(x, 0.3))


def test_export_prior_cli_writes_half_weights_and_never_overwrites(tmp_path):
    from napari_diffrecon.cli import main

    out = tmp_path / "run"
    assert main(["train", "builtin:ct-phantoms", "--modality", "ct", "--resolution", "32", "--patch", "32",
                 "--arch", "tiny", "--batch", "2", "--steps", "2", "--val-every", "2", "--pool", "3", "--no-progress",
                 "-o", str(out)]) == 0
    assert main(["export-prior", str(out), "-o", str(tmp_path / "shipped"), "--half"]) == 0
    assert load_prior(tmp_path / "shipped.json").card.training["steps"] == 2
    assert main(["export-prior", str(out), "-o", str(tmp_path / "shipped")]) == 2  # exists: needs --force


def test_export_prior_averages_a_run_with_another_prior_and_records_it(tmp_path):
    from napari_diffrecon.cli import main

    base = ["--modality", "ct", "--resolution", "32", "--patch", "32", "--arch", "tiny", "--batch", "2", "--steps",
            "2", "--val-every", "2", "--pool", "3", "--no-progress"]
    assert main(["train", "builtin:ct-phantoms", *base, "--seed", "0", "-o", str(tmp_path / "a")]) == 0
    assert main(["train", "builtin:ct-phantoms", *base, "--seed", "1", "-o", str(tmp_path / "b")]) == 0
    a, b = load_prior(tmp_path / "a" / "my-prior.json"), load_prior(tmp_path / "b" / "my-prior.json")
    assert main(["export-prior", str(tmp_path / "b"), "-o", str(tmp_path / "soup"), "--average-with",
                 str(tmp_path / "a" / "my-prior.json"), "--average-weight", "0.25"]) == 0
    soup = load_prior(tmp_path / "soup.json")
    sa, sb, ss = a.network.state_dict(), b.network.state_dict(), soup.network.state_dict()
    k = "unet.conv_in.weight"
    assert not torch.allclose(sa[k], sb[k])
    for name in sa:
        torch.testing.assert_close(ss[name], 0.25 * sb[name] + 0.75 * sa[name])
    record = soup.card.training["weight_average"]
    assert record["weight_of_this_run"] == 0.25 and record["with_training"]["seed"] == 0
    assert soup.card.training["seed"] == 1  # the run's own record
    assert len(record["with_weights_sha256"]) == 64 and record["with"].endswith("my-prior.json")
    # float16 output of a float16 prior (as shipped) holds the same average to float16 precision
    assert main(["export-prior", str(tmp_path / "a"), "-o", str(tmp_path / "a16"), "--half"]) == 0
    assert main(["export-prior", str(tmp_path / "b"), "-o", str(tmp_path / "soup16"), "--half", "--average-with",
                 str(tmp_path / "a16.json")]) == 0
    s16 = load_prior(tmp_path / "soup16.json").network.state_dict()
    torch.testing.assert_close(s16[k], 0.5 * sb[k] + 0.5 * sa[k], atol=2e-3, rtol=2e-3)
    # refused, nothing written: a share outside (0, 1], a share without a prior, another architecture, another
    # kind of model (a consistency model's card), and averaging with the very file the export overwrites
    card = json.loads((tmp_path / "a16.json").read_text())
    (tmp_path / "cm.safetensors").write_bytes((tmp_path / "a16.safetensors").read_bytes())
    (tmp_path / "cm.json").write_text(json.dumps({**card, "parametrisation": "consistency"}))
    for extra in (["--average-with", str(tmp_path / "a" / "my-prior.json"), "--average-weight", "1.5"],
                  ["--average-weight", "0.3"], ["--average-with", "ct-phantom-128"],
                  ["--average-with", str(tmp_path / "cm.json")]):
        assert main(["export-prior", str(tmp_path / "b"), "-o", str(tmp_path / "bad"), *extra]) == 2, extra
        assert not (tmp_path / "bad.json").exists() and not (tmp_path / "bad.safetensors").exists()
    before = (tmp_path / "a16.safetensors").read_bytes()
    assert main(["export-prior", str(tmp_path / "b"), "-o", str(tmp_path / "a16"), "--force", "--average-with",
                 str(tmp_path / "a16.json")]) == 2
    assert (tmp_path / "a16.safetensors").read_bytes() == before


def test_train_cli_rejects_mismatched_builtin_source(tmp_path):
    from napari_diffrecon.cli import main

    assert main(["train", "builtin:mni152", "--modality", "ct", "-o", str(tmp_path / "x")]) == 2
    assert main(["train", "builtin:mni152-views", "--modality", "pet", "-o", str(tmp_path / "z")]) == 2
    assert main(["train", "builtin:ct-phantoms", "--modality", "ct", "--complex", "-o", str(tmp_path / "y")]) == 2


def test_train_and_distill_help_name_every_builtin_source(capsys):
    from napari_diffrecon.cli import main
    from napari_diffrecon.priors.sources import BUILTIN_SOURCES

    for cmd in ("train", "distill"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        text = " ".join(capsys.readouterr().out.split()).replace("- ", "-")  # argparse wraps lines at hyphens
        missing = [name for name in BUILTIN_SOURCES if f"builtin:{name}" not in text]
        assert not missing, f"{cmd} --help does not name {missing}"


def test_export_checkpoint_needs_a_run_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint.pt"):
        export_checkpoint(tmp_path)


def test_activity_from_anatomy_refuses_bad_images_with_the_reason():
    from napari_diffrecon.simulate import activity_from_anatomy

    with pytest.raises(ValueError, match="finite 2D"):
        activity_from_anatomy(np.full((8, 8), np.nan), "ct")
    with pytest.raises(ValueError, match="finite 2D"):
        activity_from_anatomy(np.zeros((2, 8, 8)), "ct")
    with pytest.raises(ValueError, match="no visible head"):
        activity_from_anatomy(np.zeros((16, 16)), "mr")
    with pytest.raises(ValueError, match="kind must be"):
        activity_from_anatomy(np.zeros((8, 8)), "pet")
    hu = np.full((32, 32), -1000.0)
    hu[8:24, 8:24] = 40.0  # soft tissue in air
    act = activity_from_anatomy(hu, "ct")
    assert act[16, 16] > 0.9 and act[0, 0] < 1e-3


def test_train_cli_names_unknown_sources_and_missing_runs(tmp_path, capsys):
    from napari_diffrecon.cli import main

    assert main(["train", "builtin:foo", "--modality", "ct", "-o", str(tmp_path / "r")]) == 2
    assert "unknown built-in source 'foo'" in capsys.readouterr().err
    assert main(["export-prior", str(tmp_path), "-o", str(tmp_path / "p")]) == 2
    assert "checkpoint.pt not found" in capsys.readouterr().err


def test_cta_source_on_the_real_sdist_when_it_is_given():
    import os

    from napari_diffrecon.priors.sources import TOTALSEG_ENV, cta_ct_slices

    if not os.environ.get(TOTALSEG_ENV):
        pytest.skip(f"{TOTALSEG_ENV} is not set (the TotalSegmentator sdist is a training-only download)")
    vols = cta_ct_slices()
    assert [len(v) for v in vols] == [191, 112]
    assert [v[0][0].shape for v in vols] == [(167, 233), (102, 122)] and vols[0][0][1] == pytest.approx(1.5)
    sl = vols[0][40][0]  # at the liver's dome: air outside, soft tissue inside, the spine low in the midline
    assert sl.min() < -900 and np.median(sl[60:110, 90:140]) > -300
    assert np.argwhere(sl[:, 90:140] > 400)[:, 0].mean() > 0.6 * sl.shape[0]  # rows: posterior down


def test_train_cli_checks_its_settings_before_building_the_pool(tmp_path, monkeypatch, capsys):
    """0 steps wrote an untrained prior; an unknown --init was refused only after the pool was built (minutes),
    leaving an empty output folder."""
    from napari_diffrecon import cli

    def no_pool(*_a, **_k):
        raise AssertionError("the training pool was built before the settings were checked")

    monkeypatch.setattr(cli, "_training_pool", no_pool)
    base = ["train", "builtin:ct-phantoms", "--modality", "ct"]
    for extra, said in ((["--steps", "0"], "steps must be"), (["--init", "nope"], "no prior named 'nope'"),
                        (["--init", str(tmp_path / "missing.json")], "no such prior card"),
                        (["--batch", "0"], "batch size must be")):
        out = tmp_path / "run"
        assert cli.main([*base, *extra, "-o", str(out)]) == 2
        assert said in capsys.readouterr().err and not out.exists(), extra
