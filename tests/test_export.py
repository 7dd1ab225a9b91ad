"""Export (NIfTI / DICOM / TIFF with provenance), the npe2 readers and writers, and the shipped samples."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from napari_diffrecon.io import SAMPLES, export_image, load_sample, read_exported, read_fastmri, read_measurement
from napari_diffrecon.io._napari import (
    get_image_reader,
    get_reader,
    sample_layers,
    write_dicom,
    write_nifti,
    write_tiff,
)

PROV = {"software": "napari-diffrecon", "software_version": "0.1.0", "settings": {"method": "dds", "seed": 3,
        "params": {"n_steps": 10, "gamma": "inf"}}, "prior_card": {"name": "x", "resolution": 128}, "nested": [1, 2.5]}


@pytest.mark.parametrize("ext", [".nii.gz", ".nii", ".dcm", ".tif"])
@pytest.mark.parametrize("shape,spacing", [((40, 56), (0.7, 0.5)), ((3, 24, 32), (2.0, 0.9, 0.8))])
def test_export_roundtrip(tmp_path, ext, shape, spacing):
    rng = np.random.default_rng(0)
    data = (rng.normal(size=shape) * 100 - 20).astype(np.float32)
    path = export_image(tmp_path / f"img{ext}", data, PROV, spacing=spacing)
    back, prov, info = read_exported(path)
    tol = (data.max() - data.min()) / 65535 * 0.51 if ext == ".dcm" else 1e-6
    assert back.shape == data.shape
    np.testing.assert_allclose(back, data, rtol=0, atol=tol)
    assert prov == PROV
    np.testing.assert_allclose(info["spacing"], spacing, rtol=1e-5)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_export_never_overwrites_and_is_atomic(tmp_path):
    path = tmp_path / "a.tif"
    export_image(path, np.ones((8, 8)), PROV)
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="exists"):
        export_image(path, np.zeros((8, 8)), PROV)
    assert path.read_bytes() == before
    export_image(path, np.zeros((8, 8)), PROV, overwrite=True)
    assert read_exported(path)[0].max() == 0
    with pytest.raises(ValueError, match="2D images or 3D volumes"):  # fails before anything is written
        export_image(tmp_path / "b.nii", np.zeros((2, 2, 2, 2)), PROV)
    with pytest.raises(ValueError, match=r"\.nii"):
        export_image(tmp_path / "c.png", np.zeros((8, 8)), PROV)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tif"]


def test_complex_images_export_magnitude(tmp_path):
    z = (np.arange(16, dtype=np.float32).reshape(4, 4) * np.exp(1j * 0.3)).astype(np.complex64)
    back, _, _ = read_exported(export_image(tmp_path / "z.nii", z, PROV))
    np.testing.assert_allclose(back, np.abs(z), rtol=1e-6)


def test_npe2_writers_and_image_reader(tmp_path):
    data = np.linspace(0, 1, 32 * 48, dtype=np.float32).reshape(32, 48)
    meta = {"name": "est", "scale": (0.5, 0.25), "metadata": {"provenance": PROV}}
    for writer, ext in ((write_nifti, ".nii.gz"), (write_dicom, ".dcm"), (write_tiff, ".tif")):
        (out,) = writer(str(tmp_path / f"est{ext}"), data, meta)
        reader = get_image_reader(out)
        assert reader is not None, ext
        ((back, kw, kind),) = reader(out)
        assert kind == "image" and kw["name"] == "est" and kw["metadata"]["provenance"] == PROV
        np.testing.assert_allclose(kw["scale"], (0.5, 0.25), rtol=1e-5)
        np.testing.assert_allclose(back, data, atol=1.01 / 65535)


def test_reader_for_foreign_images(tmp_path):
    import nibabel as nib
    import pydicom
    import tifffile
    from pydicom.data import get_testdata_file

    ct = get_testdata_file("CT_small.dcm")
    ((data, kw, _),) = get_image_reader(ct)(ct)
    ds = pydicom.dcmread(ct)
    assert data.shape == (128, 128) and "provenance" not in kw["metadata"]
    np.testing.assert_allclose(kw["scale"], [float(v) for v in ds.PixelSpacing])
    assert data.min() < -500  # rescaled to HU
    # a DICOM series folder (two copies of the slice at different positions)
    series = tmp_path / "series"
    series.mkdir()
    for i in range(2):
        ds.ImagePositionPatient = [0, 0, float(i)]
        ds.save_as(series / f"im{i}.dcm")
    ((vol, kw, _),) = get_image_reader(str(series))(str(series))
    assert vol.shape == (2, 128, 128) and kw["name"] == "series"
    # NIfTI volume from nibabel's test data
    anat = Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"
    if anat.exists():
        ((vol, kw, _),) = get_image_reader(str(anat))(str(anat))
        assert vol.ndim == 3 and kw["name"] == "anatomical"
    # a TIFF we did not write is left to napari's own reader
    tifffile.imwrite(tmp_path / "plain.tif", np.zeros((4, 4), np.float32))
    assert get_image_reader(str(tmp_path / "plain.tif")) is None
    assert get_image_reader(str(tmp_path / "nothing.png")) is None


def test_fastmri_style_h5(tmp_path):
    import h5py

    m = load_sample("mri_4x_8coils")
    k = m.data  # (8, 128, 128), zero outside the sampled locations
    # fastMRI masks are column masks: keep the sampled columns of a fully sampled acquisition
    from napari_diffrecon.physics import CartesianMRI

    full = CartesianMRI(np.ones((128, 128), np.float32), m.operator["coil_maps"])
    import torch

    kfull = full.forward(torch.from_numpy(m.ground_truth)).numpy()
    cols = np.zeros(128, bool)
    cols[::4] = True
    cols[56:72] = True
    path = tmp_path / "file_brain.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("kspace", data=(kfull * cols)[None].repeat(2, 0))
        f.attrs["acquisition"] = "AXT1"
    assert get_reader(str(path)) is not None
    ((gt_or_meas, kw, _),) = get_reader(str(path))(str(path))
    meas = kw["metadata"]["measurement"]
    assert meas.operator["coil_maps"].shape == (8, 128, 128)
    np.testing.assert_array_equal(meas.operator["mask"][0] > 0, cols)
    assert k.shape == meas.data.shape
    direct = read_fastmri(path, slice_index=1)
    assert direct.metadata["slice_index"] == 1 and direct.noise["model"] == "gaussian"
    with h5py.File(tmp_path / "bad.h5", "w") as f:
        f.create_dataset("kspace", data=np.ones((2, 4, 4), np.float32))
    with pytest.raises(ValueError, match="complex"):
        read_fastmri(tmp_path / "bad.h5")


@pytest.mark.parametrize("key", list(SAMPLES))
def test_samples_are_small_valid_and_ready(key):
    from napari_diffrecon.io import DATA_DIR

    path = DATA_DIR / f"{key}.npz"
    assert path.stat().st_size < 1_000_000
    m = load_sample(key)
    assert m.ground_truth is not None and tuple(m.operator["image_shape"]) == (128, 128)
    assert "source" in m.metadata and m.metadata["source"]
    layers = sample_layers(key)
    assert len(layers) == 2 and all(np.asarray(d).ndim == 2 for d, _, _ in layers)
    assert all(kw["metadata"]["measurement"] is not None for _, kw, _ in layers)
    modality = {"ct_sparse23": "ct", "mri_4x_8coils": "mri", "pet_lowcount": "pet"}[key]
    assert m.operator["modality"] == modality
    if key == "mri_4x_8coils":
        assert m.operator["coil_maps"].shape[0] == 8
        assert 1 / float(np.mean(m.operator["mask"])) == pytest.approx(4, rel=0.1)
    if key == "pet_lowcount":
        assert m.noise["model"] == "poisson"
        assert json.dumps(m.metadata)  # the derivation is recorded as plain JSON


@pytest.mark.parametrize("ext", [".dcm", ".nii.gz", ".tif"])
def test_ct_images_are_exported_in_hounsfield_units(tmp_path, ext):
    """CT is reconstructed in attenuation per pixel; a clinician's viewer expects HU: the ground truth and a result
    are written as (x − offset) / scale, a std as std / scale, a data residual as it is."""
    import pydicom

    m = load_sample("ct_sparse23")
    inten = m.metadata["intensity"]
    layers = sample_layers("ct_sparse23")
    gt_data, gt_kw, _ = next(x for x in layers if x[1]["metadata"].get("role") == "ground truth")
    hu = (np.asarray(m.ground_truth, dtype=np.float64) - inten["offset"]) / inten["scale"]
    assert hu.min() == pytest.approx(-1000, abs=1) and 0 < np.median(hu[hu > -500]) < 200  # air; soft tissue
    assert gt_kw["metadata"]["units"] == "HU"  # the viewer shows it in HU already: exported as it is, not twice
    np.testing.assert_allclose(gt_data, hu, atol=1e-3)
    out = write_dicom(str(tmp_path / f"gt{ext}"), gt_data, {"name": "gt", **gt_kw}) if ext == ".dcm" else (
        write_nifti(str(tmp_path / f"gt{ext}"), gt_data, {"name": "gt", **gt_kw}) if ext == ".nii.gz" else
        write_tiff(str(tmp_path / f"gt{ext}"), gt_data, {"name": "gt", **gt_kw}))
    data, prov, _ = read_exported(out[0])
    np.testing.assert_allclose(data, hu, atol=0.1)  # DICOM: 16 bits over the image's HU range
    assert prov["exported_units"] == "HU"
    if ext == ".dcm":
        ds = pydicom.dcmread(out[0])
        assert ds.RescaleType == "HU" and float(ds.WindowWidth) == 400
    std = np.full((8, 8), 2 * inten["scale"], dtype=np.float32)  # 2 HU
    data, prov, _ = read_exported(export_image(tmp_path / f"std{ext}", std, {}, role="std", intensity=inten))
    np.testing.assert_allclose(data, 2.0, atol=1e-3)
    res = np.full((8, 8), 0.5, dtype=np.float32)
    data, prov, _ = read_exported(export_image(tmp_path / f"res{ext}", res, {}, role="residual", intensity=inten))
    np.testing.assert_allclose(data, 0.5, atol=1e-4)
    assert "exported_units" not in (prov or {})
    data, prov, _ = read_exported(export_image(tmp_path / f"std_hu{ext}", np.full((8, 8), 2.0, np.float32), {},
                                               role="std", intensity=inten, data_units="HU"))
    np.testing.assert_allclose(data, 2.0, atol=1e-3)  # a std layer shown in HU
    assert prov["exported_units"] == "HU" and "as shown in the viewer" in prov["exported_from"]
    vol, prov, _ = read_exported(export_image(tmp_path / f"vol{ext}", np.full((2, 8, 8), -500.0, np.float32), {},
                                              role="volume_estimate", intensity=inten, data_units="HU"))
    np.testing.assert_allclose(vol, -500.0, atol=0.1)  # the volume panel's HU layers: recorded as HU too
    assert prov["exported_units"] == "HU"
    pet = np.full((8, 8), 0.5, dtype=np.float32)  # other native units: as they are
    data, _, _ = read_exported(export_image(tmp_path / f"pet{ext}", pet, {}, role="mean",
                                            intensity={"native_units": "activity", "scale": 1.0, "offset": 0.0}))
    np.testing.assert_allclose(data, 0.5, atol=1e-4)


def test_the_viewer_shows_ct_in_hounsfield_units_and_the_core_gets_image_units_back():
    """CT layers are shown in HU (what clinicians read and window in); converting back gives the core's attenuation
    per pixel exactly; MRI and PET layers keep their values; a layer claiming HU without a mapping is refused."""
    from napari_diffrecon.io._napari import core_values, shown_values
    from napari_diffrecon.io.export import image_units

    m = load_sample("ct_sparse23")
    inten = m.metadata["intensity"]
    x = np.asarray(m.ground_truth, dtype=np.float32)
    for role, expect in (("mean", (x - inten["offset"]) / inten["scale"]), ("std", x / inten["scale"])):
        hu, units = shown_values(x, role, m)
        assert units == "HU"
        np.testing.assert_allclose(hu, expect, rtol=1e-5, atol=1e-3)
        back = core_values(hu, {"diffrecon_role": role, "intensity": inten, "units": units})
        np.testing.assert_allclose(back, x, rtol=1e-5, atol=1e-7)
    res, units = shown_values(x, "residual", m)  # measurement-space and other roles: as they are
    assert units is None and res is x
    assert core_values(x, {"diffrecon_role": "mean", "intensity": inten}) is x  # no "units": image units already
    for key in ("mri_4x_8coils", "pet_lowcount"):
        other = load_sample(key)
        gt = np.abs(other.ground_truth)
        vals, units = shown_values(gt, "mean", other)
        assert units is None and vals is gt
        layers = sample_layers(key)
        kw = next(x[1] for x in layers if x[1]["metadata"].get("role") == "ground truth")
        assert "units" not in kw["metadata"]
    with pytest.raises(ValueError, match="no HU intensity mapping"):
        image_units(x, "mean", {"native_units": "activity", "scale": 1.0, "offset": 0.0}, "HU")


def test_dicom_refuses_values_it_cannot_store(tmp_path):
    """NaN / Inf made a DICOM with a NaN rescale slope and garbage pixels; it is refused with the way out, and
    nothing is written (NIfTI and TIFF store float32 NaN as they are)."""
    a = np.ones((8, 8), np.float32)
    a[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        export_image(tmp_path / "x.dcm", a, {})
    assert not (tmp_path / "x.dcm").exists()
    back, _, _ = read_exported(export_image(tmp_path / "x.nii.gz", a, {}))
    assert np.isnan(back[0, 0]) and back[1, 1] == 1.0


def test_export_image_of_a_result_takes_its_units_and_pixel_size_from_the_provenance(tmp_path):
    """export_image(path, r.mean, r.provenance) wrote attenuation values at 1 mm: a result's provenance knows both."""
    from napari_diffrecon.io import load_sample, read_exported
    from napari_diffrecon.io.export import export_image
    from napari_diffrecon.reconstruct import RunSettings, reconstruct

    r = reconstruct(load_sample("ct_sparse23"), RunSettings(method="fbp"))
    out = export_image(tmp_path / "fbp.nii.gz", r.reconstruction, r.provenance, role="mean")
    data, prov, info = read_exported(out)
    assert prov["exported_units"] == "HU" and data.min() < -500  # air in HU, not attenuation per pixel
    assert info["spacing"][-1] == pytest.approx(0.661468, rel=1e-4)


def _centred_fft2(x):
    return np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(x, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))


def test_fastmri_k_space_of_real_size_is_brought_to_the_prior_s_size_exactly(tmp_path, capsys):
    """fastMRI knee k-space is 640 × 368 (readout oversampled 2×): it was refused ("far from the training
    resolution") with no way to bring it down. `read_fastmri(size=N)` / `reconstruct --size N` keep the same field of
    view at a coarser pixel with exact operations; the result equals the k-space of the central image rows' low-pass."""
    import h5py

    from napari_diffrecon.cli import main
    from napari_diffrecon.io.fastmri import resize_kspace

    m = load_sample("mri_4x_8coils")
    img = np.abs(m.ground_truth).astype(np.float64)  # 128 × 128: the object, in a 256-row oversampled readout
    h, w, size = 256, 128, 64
    tall = np.zeros((h, w), np.complex128)
    tall[64:192] = img * np.exp(1j * 0.3)
    cols = np.zeros(w, bool)
    cols[::3] = True
    cols[56:72] = True
    k = _centred_fft2(tall) * cols
    path = tmp_path / "knee.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("kspace", data=np.stack([k, 2 * k, 3 * k]).astype(np.complex64))  # 3 slices, single coil
        f.create_dataset("mask", data=cols.astype(np.float32))
    got = read_fastmri(path, slice_index=2, size=size)
    ref = 3 * _centred_fft2(tall[64:192])[32:96, 32:96] * cols[32:96]  # the central rows' k-space, centre kept
    np.testing.assert_allclose(got.data, ref, rtol=0, atol=1e-4 * np.abs(ref).max())
    np.testing.assert_array_equal(got.operator["mask"][0] > 0, cols[32:96])
    assert got.operator["image_shape"] == [size, size] and "readout oversampling removed (256 → 128 rows)" in \
        got.metadata["resized"]
    # a short readout is padded in image space to the phase field of view (odd and even row counts: centred, row
    # h // 2 on w // 2); sizes the file cannot give are refused
    for rows in (96, 95):
        part = tall[64:192][16:16 + rows]
        out, kept, how = resize_kspace(_centred_fft2(part) * cols, cols, size)
        padded = np.zeros((w, w), np.complex128)
        padded[w // 2 - rows // 2: w // 2 - rows // 2 + rows] = part
        expect = _centred_fft2(padded)[32:96, 32:96] * cols[32:96]
        np.testing.assert_allclose(out, expect, rtol=0, atol=1e-4 * np.abs(expect).max())
        assert out.shape == (size, size) and f"padded ({rows} → 128 rows)" in how
    with pytest.raises(ValueError, match="16 … 128"):
        resize_kspace(k, cols, 200)
    # the CLI: --slice and --size for fastMRI files (a bundle refuses them)
    out_npz = tmp_path / "r.npz"
    assert main(["reconstruct", str(path), "--slice", "2", "--size", str(size), "--method", "zero_filled", "-o",
                 str(out_npz)]) == 0
    assert "k-space centre 64² of 128² kept" in capsys.readouterr().out
    with np.load(out_npz) as z:
        zf = z["reconstruction"]
    lowpass = np.abs(np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(ref), norm="ortho")))
    np.testing.assert_allclose(zf, lowpass, rtol=1e-3, atol=1e-3 * lowpass.max())
    # napari: a file beyond any prior's range (here 600 rows) opens at the prior's size, saying so
    from napari_diffrecon.io._napari import read_any

    big = np.zeros((600, 160), np.complex128)
    big[236:364, 16:144] = img
    cols2 = np.zeros(160, bool)
    cols2[::4] = True
    cols2[72:88] = True
    with h5py.File(tmp_path / "big.h5", "w") as f:
        f.create_dataset("kspace", data=(_centred_fft2(big) * cols2)[None].astype(np.complex64))
    meas = [kw["metadata"]["measurement"] for _, kw, _ in read_any(tmp_path / "big.h5")
            if "measurement" in kw.get("metadata", {})][0]
    assert meas.operator["image_shape"] == [128, 128] and "600 → 160 rows" in meas.metadata["description"]


def test_exported_nifti_keeps_the_source_image_s_orientation(tmp_path):
    """Exports carried a +x +y (RAS) affine whatever the source: a LAS NIfTI came back mirrored left–right and a
    DICOM CT (LPS) rotated 180° in orientation-aware viewers. The source's axis directions now travel with the
    measurement's intensity record to the result's export."""
    import nibabel as nib
    from pydicom.data import get_testdata_file

    from napari_diffrecon.cli import main

    img = np.zeros((40, 48), np.float32)
    img[8:30, 10:20] = 1.0  # (x, y) in the file: an asymmetric block
    las = np.diag([-2.0, 2.0, 2.0, 1.0])
    nib.save(nib.Nifti1Image(img, las), tmp_path / "las.nii.gz")
    import pydicom

    for src, modality, method, codes, iop in (
            (tmp_path / "las.nii.gz", "mri", "zero_filled", ("L", "A", "S"), [1, 0, 0, 0, -1, 0]),
            (get_testdata_file("CT_small.dcm"), "ct", "fbp", ("L", "P", "S"), [1, 0, 0, 0, 1, 0])):
        b, r, out = (tmp_path / f"{modality}.{ext}" for ext in ("npz", "r.npz", "nii.gz"))
        assert main(["simulate", str(src), "--modality", modality, "--size", "32", "-o", str(b)]) == 0
        assert main(["reconstruct", str(b), "--method", method, "-o", str(r)]) == 0
        assert main(["export", str(r), "-o", str(out)]) == 0
        exported = nib.load(out)
        assert nib.aff2axcodes(exported.affine) == codes, (src, exported.affine)
        px = read_measurement(b).metadata["intensity"]["pixel_size_mm"]
        np.testing.assert_allclose(np.abs(np.diag(exported.affine)[:2]), [px, px], rtol=1e-5)
        # the voxels are stored as before (our reader round-trips them, affine or not; CT in HU: an affine map)
        back, rec = read_exported(out)[0].ravel(), np.load(r)["reconstruction"].ravel()
        assert np.corrcoef(back, rec)[0, 1] > 0.99999
        # DICOM: ImageOrientationPatient in LPS (CT_small's own [1, 0, 0, 0, 1, 0] back)
        dcm = tmp_path / f"{modality}.dcm"
        assert main(["export", str(r), "-o", str(dcm)]) == 0
        np.testing.assert_allclose([float(v) for v in pydicom.dcmread(dcm).ImageOrientationPatient], iop, atol=1e-6)
    # an image with no orientation record keeps the identity orientation
    plain = tmp_path / "plain.nii"
    export_image(plain, np.ones((8, 8), np.float32), {"kind": "test"}, spacing=[0.5, 0.5])
    assert nib.aff2axcodes(nib.load(plain).affine) == ("R", "A", "S")


def test_a_ct_dicom_opened_as_an_image_layer_keeps_its_hounsfield_units(tmp_path):
    """pydicom's CT_small opened with the image reader had no units: exported as DICOM with RescaleType US and no
    window, and not taken as HU by "Use selected layer"."""
    import pydicom
    from pydicom.data import get_testdata_file

    from napari_diffrecon.io._napari import get_image_reader, layer_units

    src = get_testdata_file("CT_small.dcm")
    ((data, kw, _),) = get_image_reader(src)(src)
    assert kw["metadata"]["units"] == "HU" and data.min() < -500
    role, intensity, units = layer_units(kw["metadata"])
    out = export_image(tmp_path / "ct.dcm", data, kw["metadata"].get("provenance"), spacing=kw["scale"],
                       role=role, intensity=intensity, data_units=units)
    ds = pydicom.dcmread(out)
    assert ds.RescaleType == "HU" and "WindowCenter" in ds
    np.testing.assert_allclose(read_exported(out)[0], data, atol=0.05)
    # and back: our own export of it reads as HU again
    assert get_image_reader(str(out))(str(out))[0][1]["metadata"]["units"] == "HU"


def test_layers_keep_the_orientation_record_for_their_exports(tmp_path):
    """napari's File ▸ Open (the image reader) and the simulated layers of a bundle dropped the orientation record,
    so their exports (and simulations from them) came out +x +y where the CLI kept the source's."""
    import nibabel as nib

    from napari_diffrecon.io._napari import get_image_reader, layer_axes, read_any
    from napari_diffrecon.io._napari import write_nifti as npe2_write_nifti

    img = np.zeros((24, 32), np.float32)
    img[4:12, 6:20] = 1.0
    nib.save(nib.Nifti1Image(img, np.diag([-1.5, 1.5, 3.0, 1.0])), tmp_path / "las.nii.gz")
    ((data, kw, _),) = get_image_reader(str(tmp_path / "las.nii.gz"))(str(tmp_path / "las.nii.gz"))
    assert layer_axes(kw["metadata"])["x"] == [-1.0, 0.0, 0.0]
    npe2_write_nifti(str(tmp_path / "layer.nii"), data, {**kw, "name": "las"})
    assert nib.aff2axcodes(nib.load(tmp_path / "layer.nii").affine) == ("L", "A", "S")
    # the workbench's "open anything": the simulated ground truth carries its measurement's record
    layers = read_any(tmp_path / "las.nii.gz", simulate={"modality": "mri", "size": 32})
    assert all(layer_axes(k["metadata"]) == layer_axes(kw["metadata"]) for _, k, _ in layers)
