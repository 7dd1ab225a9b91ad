"""Bundle checks: degenerate measurements, MRI k-space and mask consistency, wrong file kinds, output paths."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from napari_diffrecon.io import (
    BundleError,
    OutputPathError,
    check_output_path,
    read_measurement,
    write_measurement,
    write_result,
)
from napari_diffrecon.simulate import simulate_from_image

N = 16


def _save(path: Path, **keys) -> Path:
    """Write an .npz bundle, JSON-encoding dict values (operator, noise)."""
    np.savez(path, **{k: (np.array(json.dumps(v)) if isinstance(v, dict) else v) for k, v in keys.items()})
    return path


def _kspace(mask: np.ndarray, seed: int = 0) -> np.ndarray:
    """Random complex k-space, zero where ``mask`` is 0 (as measured data are stored)."""
    rng = np.random.default_rng(seed)
    k = rng.normal(size=(N, N)) + 1j * rng.normal(size=(N, N))
    return (k * mask).astype(np.complex64)


def _column_mask(cols: slice = slice(4, 12)) -> np.ndarray:
    mask = np.zeros((N, N), np.float32)
    mask[:, cols] = 1.0
    return mask


def _mri(path: Path, data: np.ndarray, mask: np.ndarray) -> Path:
    op = {"modality": "mri", "image_shape": [N, N], "mask": {"$array": "mask"}}
    return _save(path, measurement=data, mask=mask, operator=op, noise={"model": "gaussian", "sigma": 0.01})


def _sinogram_bundle(path: Path, modality: str, data: np.ndarray) -> Path:
    op = {"modality": modality, "image_shape": [N, N], "angles_deg": [0, 45, 90, 135]}
    noise = {"model": "poisson"} if modality == "pet" else {"model": "gaussian", "sigma": 0.01}
    return _save(path, measurement=data, operator=op, noise=noise)


@pytest.mark.parametrize("modality", ["ct", "pet", "mri"])
def test_all_zero_measurement_is_refused(tmp_path, modality):
    if modality == "mri":
        mask = _column_mask()
        ok, zero = _mri(tmp_path / "ok.npz", _kspace(mask), mask), _mri(tmp_path / "z.npz", 0 * _kspace(mask), mask)
    else:
        counts = np.random.default_rng(0).poisson(5.0, size=(N, 4)).astype(np.float32)
        ok = _sinogram_bundle(tmp_path / "ok.npz", modality, counts)
        zero = _sinogram_bundle(tmp_path / "z.npz", modality, np.zeros((N, 4), np.float32))
    read_measurement(ok)
    with pytest.raises(BundleError, match="measurement: all entries are zero"):
        read_measurement(zero)


def test_real_valued_mri_kspace_is_refused(tmp_path):
    mask = _column_mask()
    k = _kspace(mask)
    read_measurement(_mri(tmp_path / "ok.npz", k, mask))
    for name, real in (("re", k.real.copy()), ("mag", np.abs(k))):
        with pytest.raises(BundleError, match=r"k-space must be complex \(e\.g\. complex64\).*not k-space"):
            read_measurement(_mri(tmp_path / f"{name}.npz", real, mask))


def test_all_zero_mri_mask_is_refused(tmp_path):
    mask = _column_mask()
    with pytest.raises(BundleError, match="operator.mask: all zeros"):
        read_measurement(_mri(tmp_path / "m0.npz", _kspace(mask), np.zeros_like(mask)))


def test_mri_mask_that_does_not_match_the_data_is_refused(tmp_path):
    mask = _column_mask()
    k = _kspace(mask)
    # the audit's case: the mask shifted by a few columns against the data
    with pytest.raises(BundleError, match="operator.mask: does not match the data"):
        read_measurement(_mri(tmp_path / "shift.npz", k, np.roll(mask, 5, axis=-1)))
    # fully sampled k-space with a retrospective mask: the fix is named
    full = _kspace(np.ones_like(mask))
    with pytest.raises(BundleError, match="multiply the k-space by the mask"):
        read_measurement(_mri(tmp_path / "full.npz", full, mask))
    # stray samples holding well under 1 % of the energy, and a mask with extra (empty) lines, are accepted
    stray = k.copy()
    stray[0, 0] = 0.05 * np.abs(k).max()
    read_measurement(_mri(tmp_path / "stray.npz", stray, mask))
    read_measurement(_mri(tmp_path / "extra.npz", k, _column_mask(slice(2, 14))))


def test_simulated_mri_bundles_still_pass(tmp_path):
    img = np.outer(np.hanning(N), np.hanning(N))
    for coils in (1, 2):
        m = simulate_from_image(img, "mri", size=N, accel=2.0, coils=coils, seed=0)
        r = read_measurement(write_measurement(m, tmp_path / f"c{coils}.npz"))
        np.testing.assert_array_equal(r.data, m.data)


def test_npy_file_gets_a_clear_error(tmp_path):
    np.save(tmp_path / "a.npy", np.ones((N, 4), np.float32))
    with pytest.raises(BundleError, match=r"\.npy file holding one bare array.*Measurement bundles.*simulate"):
        read_measurement(tmp_path / "a.npy")


def test_non_npz_file_is_not_called_pickled(tmp_path):
    (tmp_path / "text.npz").write_text("hello world this is not a zip\n")
    with pytest.raises(BundleError, match="not an .npz archive") as e:
        read_measurement(tmp_path / "text.npz")
    assert "pickle" not in str(e.value)
    (tmp_path / "empty.npz").write_bytes(b"")
    with pytest.raises(BundleError, match="empty"):
        read_measurement(tmp_path / "empty.npz")
    # an .npz that really holds object arrays is still reported as such
    np.savez(tmp_path / "obj.npz", measurement=np.array([{"a": 1}], dtype=object), operator=np.array("{}"))
    with pytest.raises(BundleError, match="object arrays .*pickled"):
        read_measurement(tmp_path / "obj.npz")


def test_output_path_that_is_a_directory_is_refused_up_front(tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    for overwrite in (False, True):
        with pytest.raises(OutputPathError, match="is a directory.*give a file name"):
            check_output_path(out, overwrite)
    assert issubclass(OutputPathError, FileExistsError)  # the CLI reports FileExistsError as a one-line error
    with pytest.raises(OutputPathError, match="is a directory"):
        write_result(out, {"reconstruction": np.zeros((2, 2))}, {}, overwrite=True)
    (tmp_path / "f.npz").write_bytes(b"x")
    with pytest.raises(OutputPathError, match="is a file"):
        check_output_path(tmp_path / "f.npz" / "o.npz", True)
    with pytest.raises(FileExistsError, match="--force"):
        check_output_path(tmp_path / "f.npz")
    assert check_output_path(tmp_path / "f.npz", True) == tmp_path / "f.npz"
    assert check_output_path(str(tmp_path / "new" / "o.npz")) == tmp_path / "new" / "o.npz"


def test_a_pet_background_array_under_any_key_is_read_and_a_bad_one_is_named(tmp_path):
    """A background stored under another key is followed; a missing key, a wrong shape or a non-number is refused
    naming noise.background (they used to end in a TypeError traceback or a torch size message)."""
    m = simulate_from_image(np.outer(np.hanning(N), np.hanning(N)), "pet", size=N, views=8, seed=0)
    data = m.data
    op = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in m.operator.items()}
    bg = np.full(data.shape, 0.5, np.float32)
    path = _save(tmp_path / "ok.npz", measurement=data, operator=op, bgarr=bg,
                 noise={"model": "poisson", "background": {"$array": "bgarr"}})
    r = read_measurement(path)
    np.testing.assert_array_equal(r.noise["background"], bg)
    assert float(r.build_likelihood().background.mean()) == pytest.approx(0.5)
    for name, extra, noise, match in (
        ("missing", {}, {"model": "poisson", "background": {"$array": "bgarr"}}, "does not hold"),
        ("shape", {"bgarr": bg[:, :3]}, {"model": "poisson", "background": {"$array": "bgarr"}}, "does not match"),
        ("text", {}, {"model": "poisson", "background": "lots"}, "must be a number"),
    ):
        p = _save(tmp_path / f"{name}.npz", measurement=data, operator=op, noise=noise, **extra)
        with pytest.raises(BundleError, match=match):
            read_measurement(p)


def test_a_background_that_broadcasts_or_is_a_numpy_number_is_accepted(tmp_path):
    """Per-view randoms (1, views) and NumPy scalars are what the Poisson likelihood takes; the check accepts them."""
    from napari_diffrecon.io import Measurement

    m = simulate_from_image(np.outer(np.hanning(N), np.hanning(N)), "pet", size=N, views=8, seed=0)
    data = m.data
    per_view = np.full((1, data.shape[1]), 0.3, np.float32)
    for bg in (per_view, np.float32(0.3), np.int64(1)):
        Measurement(data=data, operator=m.operator, noise={"model": "poisson", "background": bg}).validate()
    with pytest.raises(BundleError, match="does not match"):
        Measurement(data=data, operator=m.operator,
                    noise={"model": "poisson", "background": np.ones((3, 3), np.float32)}).validate()


def test_sampling_masks_coil_maps_and_attenuation_that_would_give_garbage_are_refused(tmp_path):
    """A weighted (non 0 / 1) MRI mask, all-zero or unnormalised coil maps and zero PET attenuation factors used to
    run and give a garbage image (or one with a misleading warning): each is refused, naming the field and the fix."""
    from napari_diffrecon.io import Measurement
    from napari_diffrecon.physics.coils import simulate_coil_maps

    mask = _column_mask()
    for factor in (0.5, 2.0):
        with pytest.raises(BundleError, match="only 0 and 1"):
            read_measurement(_mri(tmp_path / f"w{factor}.npz", _kspace(mask), mask * factor))
    read_measurement(_mri(tmp_path / "ok.npz", _kspace(mask), mask.astype(bool)))  # a boolean mask is fine
    maps = simulate_coil_maps((N, N), 4)
    k = np.stack([_kspace(mask, seed=c) for c in range(4)])

    def mri(coil_maps):
        op = {"modality": "mri", "image_shape": [N, N], "mask": mask, "coil_maps": coil_maps}
        return Measurement(data=k, operator=op, noise={"model": "gaussian", "sigma": 0.01})

    mri(maps).validate()
    mri(0.8 * maps).validate()  # ESPIRiT-like maps a little under 1 pass
    with pytest.raises(BundleError, match="all zeros"):
        mri(0 * maps).validate()
    with pytest.raises(BundleError, match="not normalised"):
        mri(100 * maps).validate()
    m = simulate_from_image(np.outer(np.hanning(N), np.hanning(N)), "pet", size=N, views=8, seed=0)
    att = np.full(m.data.shape, 0.7, np.float32)
    Measurement(data=m.data, operator={**m.operator, "attenuation": att}, noise=m.noise).validate()
    att[3, 2] = 0.0
    with pytest.raises(BundleError, match="1 of .* factors are 0"):
        Measurement(data=m.data, operator={**m.operator, "attenuation": att}, noise=m.noise).validate()


def test_an_h5_bundle_with_a_group_for_an_array_is_refused_and_a_fastmri_file_is_read(tmp_path):
    """An HDF5 group where a dataset belongs gave a TypeError traceback; a fastMRI file given where a bundle is
    expected (the CLI) is read as its middle slice, as the workbench reads it."""
    import h5py

    path = write_measurement(simulate_from_image(np.outer(np.hanning(N), np.hanning(N)), "ct", size=N, views=8,
                                                 seed=0), tmp_path / "ct.h5")
    with h5py.File(path, "a") as f:
        del f["measurement"]
        f.create_group("measurement")
    with pytest.raises(BundleError, match="'measurement': HDF5 group"):
        read_measurement(path)
    fm = tmp_path / "file_brain.h5"
    with h5py.File(fm, "w") as f:
        f.create_group("kspace")
    with pytest.raises(BundleError, match="must be datasets"):
        read_measurement(fm)
    mask = _column_mask(slice(0, N, 2)) + _column_mask(slice(6, 10))
    kspace = np.stack([np.stack([_kspace(np.minimum(mask, 1), seed=c) for c in range(2)]) for _ in range(3)])
    fm.unlink()
    with h5py.File(fm, "w") as f:
        f.create_dataset("kspace", data=kspace)
    m = read_measurement(fm)
    assert m.operator["modality"] == "mri" and m.data.shape == (2, N, N) and m.metadata["slice_index"] == 1


def test_data_float32_cannot_square_are_refused_and_a_nan_ground_truth_or_bad_intensity_too(tmp_path):
    """A sinogram × 1e30 gave a NaN residual and a −593 dB "result"; NaN ground truths scored NaN; a zero or negative
    intensity scale / pixel size reached the exports."""
    from napari_diffrecon.io import Measurement

    m = simulate_from_image(np.outer(np.hanning(N), np.hanning(N)), "ct", size=N, views=8, seed=0)
    m.validate()
    for factor in (1e30, 1e-30):
        with pytest.raises(BundleError, match="float32 arithmetic"):
            Measurement(data=m.data * np.float32(factor), operator=m.operator, noise=m.noise).validate()
    gt = m.ground_truth.copy()
    gt[2, 3] = np.nan
    with pytest.raises(BundleError, match="ground_truth: contains NaN"):
        Measurement(data=m.data, operator=m.operator, noise=m.noise, ground_truth=gt).validate()
    for key, value in (("scale", 0.0), ("scale", "x"), ("pixel_size_mm", -1.0), ("offset", float("inf"))):
        meta = {"intensity": {**m.metadata["intensity"], key: value}}
        with pytest.raises(BundleError, match=f"metadata.intensity.{key}"):
            Measurement(data=m.data, operator=m.operator, noise=m.noise, metadata=meta).validate()


def test_a_measurement_built_in_python_gets_the_checks_and_defaults_a_file_gets():
    """An in-memory Measurement: no noise spec meant σ = 1 (18 dB instead of 29 on a 64² CT), "CT" passed validation
    but the prior check refused it, a tensor failed deep inside, and reconstruct never validated (NaN data gave an
    all-NaN FBP). RunSettings refuses 1.5 samples and a missing seed; nrmse refuses shapes that only broadcast."""
    import torch

    from napari_diffrecon.io import Measurement
    from napari_diffrecon.metrics import nrmse
    from napari_diffrecon.reconstruct import RunSettings, reconstruct

    m = simulate_from_image(np.outer(np.hanning(N), np.hanning(N)), "ct", size=N, views=8, seed=0)
    bare = Measurement(data=torch.from_numpy(m.data), operator={**m.operator, "modality": "CT"})
    assert isinstance(bare.data, np.ndarray) and bare.operator["modality"] == "ct"
    assert bare.noise["assumed"] and bare.noise["sigma"] == pytest.approx(
        0.01 * np.sqrt(np.mean(m.data.astype(np.float64) ** 2)), rel=1e-5)
    r = reconstruct(bare, RunSettings(method="fbp"))
    assert r.provenance["noise_floor_assumed"] and np.isfinite(r.reconstruction).all()
    bad = Measurement(data=np.where(np.arange(m.data.size).reshape(m.data.shape) == 3, np.nan, m.data),
                      operator=m.operator, noise=m.noise)
    for method in ("fbp", "dds"):
        with pytest.raises(BundleError, match="NaN"):
            reconstruct(bad, RunSettings(method=method))
    for kw in ({"n_samples": 1.5}, {"n_samples": True}, {"seed": None}, {"seed": -1}):
        with pytest.raises(ValueError, match="whole number"):
            RunSettings(**kw)
    with pytest.raises(ValueError, match="differs from reference shape"):
        nrmse(np.ones((4, 4)), np.ones((1, 4)))
    from napari_diffrecon.uncertainty import summarize

    with pytest.raises(ValueError, match="no samples"):
        summarize(np.zeros((0, N, N)))
    with pytest.raises(ValueError, match="real image"):
        simulate_from_image(np.ones((N, N)) * (1 + 1j), "ct", size=N)


def test_a_bundle_no_reader_would_take_is_not_written(tmp_path):
    from napari_diffrecon.io import Measurement

    m = simulate_from_image(np.outer(np.hanning(N), np.hanning(N)), "ct", size=N, views=8, seed=0)
    bad = Measurement(data=np.full_like(m.data, np.nan), operator=m.operator, noise=m.noise)
    with pytest.raises(BundleError, match="NaN"):
        write_measurement(bad, tmp_path / "bad.npz")
    assert not (tmp_path / "bad.npz").exists()
    assert read_measurement(write_measurement(m, tmp_path / "ok.npz")).data.shape == m.data.shape


def test_zero_filled_k_space_without_its_mask_is_warned_about():
    """Undersampled k-space stored zero-filled with a mask of all ones ran silently: its zeros were taken as data."""
    import dataclasses

    from napari_diffrecon.io import load_sample
    from napari_diffrecon.reconstruct import RunSettings, reconstruct

    m = load_sample("mri_4x_8coils")
    assert not any("exactly 0" in w for w in reconstruct(m, RunSettings(method="zero_filled")).provenance["warnings"])
    spec = {**m.operator, "mask": np.ones_like(np.asarray(m.operator["mask"]))}
    lost = dataclasses.replace(m, operator=spec)
    warns = reconstruct(lost, RunSettings(method="zero_filled")).provenance["warnings"]
    assert any("marks as measured are exactly 0" in w and "operator.mask" in w for w in warns), warns


def test_measurements_no_image_fits_as_stored_are_warned_about():
    """A sinogram of an image in HU (mostly negative line integrals) and k-space stored without fftshift ran to
    garbage without a word (their noise floors were assumed, so no misfit warning either)."""
    import dataclasses

    from napari_diffrecon.io import load_sample
    from napari_diffrecon.reconstruct import RunSettings, reconstruct

    ct = load_sample("ct_sparse23")
    assert not any("negative" in w for w in reconstruct(ct, RunSettings(method="fbp")).provenance["warnings"])
    inten = ct.metadata["intensity"]  # image = scale · HU + offset: the same projector applied to the HU image
    hu_sino = (np.asarray(ct.data) - inten["offset"] * _ones_projection(ct)) / inten["scale"]
    warns = reconstruct(dataclasses.replace(ct, data=hu_sino.astype(np.float32)),
                        RunSettings(method="fbp")).provenance["warnings"]
    assert any("of the sinogram's total is negative" in w and "Hounsfield" in w for w in warns), warns
    mri = load_sample("mri_4x_8coils")
    assert not any("fftshift" in w for w in reconstruct(mri, RunSettings(method="zero_filled")).provenance["warnings"])
    mask = np.fft.ifftshift(np.asarray(mri.operator["mask"]))
    unshifted = dataclasses.replace(mri, data=np.fft.ifftshift(np.asarray(mri.data), axes=(-2, -1)),
                                    operator={**mri.operator, "mask": mask})
    warns = reconstruct(unshifted, RunSettings(method="zero_filled")).provenance["warnings"]
    assert any("without fftshift" in w for w in warns), warns


def _ones_projection(m):
    """The projection of an image of ones (inside the field of view) with the measurement's own operator."""
    import torch

    op = m.build_operator("cpu")
    n = int(m.operator["image_shape"][-1])
    return op.forward(torch.ones(n, n)).numpy()


def test_multi_coil_k_space_without_coil_maps_names_what_is_missing(tmp_path):
    """It said the shapes (4, 64, 64) and (64, 64) disagree, not that the maps are missing or how to get them."""
    import dataclasses

    from napari_diffrecon.io import BundleError, load_sample, read_measurement, write_measurement

    m = load_sample("mri_4x_8coils")
    spec = {k: v for k, v in m.operator.items() if k != "coil_maps"}
    with pytest.raises(BundleError, match="no coil_maps: multi-coil data need sensitivity maps .*estimate_coil_maps"):
        read_measurement(write_measurement(dataclasses.replace(m, operator=spec), tmp_path / "nomaps.npz"))


def test_valid_noisy_sinograms_and_enhanced_dicom_orientation(tmp_path):
    """A small object in much air with heavy noise has many negative samples but a positive mean: no HU warning
    (a review found it fired there). An enhanced multi-frame DICOM keeps its orientation in a per-frame group."""
    from pydicom.data import get_testdata_file

    from napari_diffrecon.io import read_image
    from napari_diffrecon.reconstruct import RunSettings, reconstruct
    from napari_diffrecon.simulate import simulate_from_image

    yy, xx = np.mgrid[:64, :64] - 31.5
    disc = (np.hypot(yy, xx) < 6).astype(np.float32)
    m = simulate_from_image(disc, "ct", size=64, views=60, noise_sigma=0.5, seed=0)
    d = np.asarray(m.data)
    assert (-d[d < 0].sum()) / np.abs(d).sum() > 0.2 and d.mean() > 0  # the case: many negatives, mean above 0
    assert not any("negative" in w for w in reconstruct(m, RunSettings(method="fbp")).provenance["warnings"])
    info = read_image(get_testdata_file("eCT_Supplemental.dcm"))[1]
    np.testing.assert_allclose(info["axes_ras"]["x"], [1, 0, 0], atol=1e-6)  # LPS (−1, 0, 0) → RAS (1, 0, 0)
    np.testing.assert_allclose(info["axes_ras"]["y"], [0, -1, 0], atol=1e-6)  # LPS (0, 1, 0) → RAS (0, −1, 0)
