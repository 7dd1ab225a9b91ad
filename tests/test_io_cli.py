"""Bundles, image readers, simulation, masks, the CLI and the napari reader."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os

import numpy as np
import pytest
import torch
from skimage.transform import iradon, radon

from napari_diffrecon.cli import main
from napari_diffrecon.io import BundleError, load_sample, read_image, read_measurement, write_measurement
from napari_diffrecon.io._napari import get_reader, sample_ct_sparse23
from napari_diffrecon.metrics import psnr
from napari_diffrecon.physics.masks import acceleration_of, make_mask
from napari_diffrecon.priors.registry import WEIGHTS_DIR
from napari_diffrecon.simulate import simulate_from_image


def _ct23_bundle(path):
    """A 23-view, 64² CT bundle of pydicom's CT_small written by ``simulate`` at ``path`` (returned)."""
    from pydicom.data import get_testdata_file

    assert main(["simulate", get_testdata_file("CT_small.dcm"), "--modality", "ct", "--views", "23", "--size", "64",
                 "-o", str(path)]) == 0
    return path


def _minimal_bundle(path, img, theta):
    sino = radon(img, theta=theta, circle=True)
    np.savez(
        path,
        measurement=sino,
        operator=json.dumps({"modality": "ct", "image_shape": list(img.shape), "angles_deg": theta.tolist()}),
    )
    return sino


@pytest.mark.parametrize("suffix", [".npz", ".h5"])
@pytest.mark.parametrize("modality", ["ct", "mri", "pet"])
def test_bundle_round_trip(tmp_path, ct_slice, modality, suffix):
    m = simulate_from_image(ct_slice[::2, ::2], modality, size=48, views=12, coils=3, seed=1)
    path = write_measurement(m, tmp_path / f"b{suffix}")
    r = read_measurement(path)
    np.testing.assert_array_equal(r.data, m.data)
    np.testing.assert_array_equal(r.ground_truth, m.ground_truth)
    x = torch.tensor(m.ground_truth)
    torch.testing.assert_close(r.build_operator().forward(x), m.build_operator().forward(x))
    assert r.noise["model"] == m.noise["model"]
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp" + suffix)]


def test_minimal_user_bundle_from_skimage_reconstructs_like_iradon(tmp_path, ct_slice):
    theta = np.linspace(0, 180, 90, endpoint=False)
    sino = _minimal_bundle(tmp_path / "user.npz", ct_slice, theta)
    assert main(["reconstruct", str(tmp_path / "user.npz"), "--method", "fbp", "-o", str(tmp_path / "o.npz")]) == 0
    with np.load(tmp_path / "o.npz") as z:
        rec = z["reconstruction"]
        prov = json.loads(str(z["provenance"]))
    ref = iradon(sino, theta=theta, circle=True)
    assert abs(psnr(rec, ct_slice) - psnr(ref, ct_slice)) < 0.5
    assert prov["settings"]["method"] == "fbp" and len(prov["measurement_sha256"]) == 64


@pytest.mark.parametrize(
    "keys,match",
    [
        ({"operator": {"modality": "ct", "image_shape": [16, 16], "angles_deg": [0, 90]}}, "measurement"),
        ({"measurement": np.zeros((16, 3))}, "operator"),
        (
            {
                "measurement": np.zeros((16, 3)),
                "operator": {"modality": "ct", "image_shape": [16, 16], "angles_deg": [0, 90]},
            },
            "3 angles",
        ),
        (
            {
                "measurement": np.zeros((2, 16)),
                "operator": {"modality": "ct", "image_shape": [16, 16], "angles_deg": [0, 90]},
            },
            "transposed",
        ),
        (
            {
                "measurement": np.full((16, 2), np.nan),
                "operator": {"modality": "ct", "image_shape": [16, 16], "angles_deg": [0, 90]},
            },
            "NaN",
        ),
        (
            {
                "measurement": -np.ones((16, 2)),
                "noise": {"model": "poisson"},
                "operator": {"modality": "pet", "image_shape": [16, 16], "angles_deg": [0, 90]},
            },
            "negative",
        ),
        ({"measurement": np.zeros((16, 2)), "operator": {"modality": "xray", "image_shape": [16, 16]}}, "modality"),
        (
            {
                "measurement": np.zeros((8, 8), np.complex64),
                "mask": np.ones((8, 9)),
                "operator": {"modality": "mri", "image_shape": [8, 8], "mask": {"$array": "mask"}},
            },
            "mask",
        ),
    ],
)
def test_bundle_validation_names_the_field(tmp_path, keys, match):
    keys = {k: (np.array(json.dumps(v)) if isinstance(v, dict) else v) for k, v in keys.items()}
    np.savez(tmp_path / "bad.npz", **keys)
    with pytest.raises(BundleError, match=match):
        read_measurement(tmp_path / "bad.npz")


def test_untrusted_and_corrupt_files_are_refused(tmp_path):
    np.savez(tmp_path / "p.npz", measurement=np.array([{"a": 1}], dtype=object), operator=np.array("{}"))
    with pytest.raises(BundleError, match="untrusted|pickle"):
        read_measurement(tmp_path / "p.npz")
    (tmp_path / "c.npz").write_bytes(b"PK\x03\x04 definitely not a zip")
    with pytest.raises(BundleError, match="cannot read"):
        read_measurement(tmp_path / "c.npz")
    with pytest.raises(FileNotFoundError):
        read_measurement(tmp_path / "missing.npz")


def test_no_overwrite_without_force(tmp_path):
    m = load_sample()
    write_measurement(m, tmp_path / "a.npz")
    with pytest.raises(FileExistsError, match="--force"):
        write_measurement(m, tmp_path / "a.npz")
    write_measurement(m, tmp_path / "a.npz", overwrite=True)


def test_read_image_formats(tmp_path, ct_slice):
    import nibabel as nib
    import tifffile
    from pydicom.data import get_testdata_file
    from skimage.io import imsave

    img, info = read_image(get_testdata_file("CT_small.dcm"))
    assert img.shape == (128, 128) and info["units"] == "HU" and img.min() < -500
    vol = np.stack([ct_slice * k for k in range(1, 4)], -1).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "v.nii.gz")
    sl, info = read_image(tmp_path / "v.nii.gz")
    np.testing.assert_allclose(sl, vol[..., 1].T, rtol=1e-6)  # (x, y) → rows y, columns x: as io.export writes
    assert info["n_slices"] == 3
    with pytest.raises(ValueError, match="out of range"):
        read_image(tmp_path / "v.nii.gz", slice_index=5)
    tifffile.imwrite(tmp_path / "a.tif", ct_slice.astype(np.float32))
    np.testing.assert_allclose(read_image(tmp_path / "a.tif")[0], ct_slice, rtol=1e-6)
    imsave(tmp_path / "a.png", (ct_slice / ct_slice.max() * 255).astype(np.uint8))
    assert read_image(tmp_path / "a.png")[0].shape == (128, 128)
    np.save(tmp_path / "a.npy", ct_slice)
    np.testing.assert_allclose(read_image(tmp_path / "a.npy")[0], ct_slice, rtol=1e-6)
    (tmp_path / "x.dcm").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read|DICOM"):
        read_image(tmp_path / "x.dcm")
    # colour files are turned grey (a TIFF's RGB(A) samples used to be read as a volume of 3-pixel-wide slices)
    grey = (ct_slice / ct_slice.max() * 200).astype(np.uint8)
    for name, arr in (("rgb.tif", np.stack([grey] * 3, -1)), ("rgba.tif", np.stack([grey] * 3 + [grey * 0 + 255], -1)),
                      ("ga.png", np.stack([grey, grey * 0 + 255], -1))):
        (tifffile.imwrite if name.endswith(".tif") else imsave)(tmp_path / name, arr)
        img, info = read_image(tmp_path / name)
        np.testing.assert_allclose(img, grey, atol=1e-4)
        assert info["converted"] == "colour image converted to grey" and info["n_slices"] == 1
    # a multi-frame DICOM is its frames (it was called 4-dimensional), a colour DICOM grey, a mixed folder named
    import shutil

    from napari_diffrecon.io.images import read_volume

    assert read_volume(get_testdata_file("rtdose.dcm"))[0].shape == (15, 10, 10)
    assert read_image(get_testdata_file("examples_rgb_color.dcm"))[1]["converted"] == "colour image converted to grey"
    # YBR colour DICOM is turned grey from its RGB values (pydicom ≥ 3 converts), not from the raw Y, Cb, Cr samples
    from pydicom.pixels import convert_color_space, pixel_array

    ybr = get_testdata_file("SC_ybr_full_422_uncompressed.dcm")
    rgb = convert_color_space(pixel_array(ybr, as_rgb=False), "YBR_FULL", "RGB")
    np.testing.assert_allclose(read_image(ybr)[0], rgb.mean(-1), atol=1e-3)
    (tmp_path / "mixed").mkdir()
    for f in ("CT_small.dcm", "MR_small.dcm"):
        shutil.copy(get_testdata_file(f), tmp_path / "mixed" / f)
    with pytest.raises(ValueError, match=r"not one series .*CT_small.dcm.*MR_small.dcm"):
        read_image(tmp_path / "mixed")
    # an enhanced multi-frame CT: each frame's rescale and position come from its functional groups
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"  # enhanced CT
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.update({"Modality": "CT", "Rows": 8, "Columns": 8, "NumberOfFrames": 3, "SamplesPerPixel": 1,
               "PhotometricInterpretation": "MONOCHROME2", "BitsAllocated": 16, "BitsStored": 16, "HighBit": 15,
               "PixelRepresentation": 0})
    ds.PixelData = np.stack([np.full((8, 8), 1024 + 100 * k, np.uint16) for k in range(3)]).tobytes()
    shared, pvt, pm = Dataset(), Dataset(), Dataset()
    pvt.RescaleSlope, pvt.RescaleIntercept, pm.PixelSpacing = 1, -1024, [0.7, 0.7]
    shared.PixelValueTransformationSequence, shared.PixelMeasuresSequence = Sequence([pvt]), Sequence([pm])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames = []
    for z in (5.0, 1.0, 3.0):
        f, pp = Dataset(), Dataset()
        pp.ImagePositionPatient = [0, 0, z]
        f.PlanePositionSequence = Sequence([pp])
        frames.append(f)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds.save_as(tmp_path / "enhanced.dcm", enforce_file_format=True)
    vol, info = read_volume(tmp_path / "enhanced.dcm")
    np.testing.assert_array_equal(vol[:, 0, 0], [100, 200, 0])  # in HU, ordered along z
    assert info["units"] == "HU" and info["pixel_spacing_mm"] == [0.7, 0.7]
    tifffile.imwrite(tmp_path / "planar.tif", np.stack([grey] * 3), photometric="rgb", planarconfig="separate")
    np.testing.assert_allclose(read_image(tmp_path / "planar.tif")[0], grey, atol=1e-4)
    # complex images are refused (their imaginary part was dropped with a NumPy warning only)
    for name in ("c.npy", "c.tif"):
        cplx = (ct_slice * (1 + 1j)).astype(np.complex64)
        np.save(tmp_path / name, cplx) if name.endswith(".npy") else tifffile.imwrite(tmp_path / name, cplx)
        with pytest.raises(ValueError, match="complex values"):
            read_image(tmp_path / name)


def test_simulation_is_deterministic_and_matches_the_forward_model(ct_slice):
    a = simulate_from_image(ct_slice, "pet", size=64, views=30, seed=3)
    b = simulate_from_image(ct_slice, "pet", size=64, views=30, seed=3)
    np.testing.assert_array_equal(a.data, b.data)
    op = a.build_operator()
    mean = op.forward(torch.tensor(a.ground_truth)).numpy() + a.noise["background"]
    assert abs(a.data.sum() / mean.sum() - 1) < 0.02  # Poisson counts are unbiased
    ld = simulate_from_image(ct_slice, "ct", size=64, views=30, photons=1e4, seed=0)
    assert ld.noise["model"] == "transmission" and ld.data.min() >= 0
    mri = simulate_from_image(ct_slice, "mri", size=64, accel=4, coils=4, seed=0)
    assert mri.data.shape == (4, 64, 64) and np.iscomplexobj(mri.data)


@pytest.mark.parametrize("kind", ["random", "equispaced"])
@pytest.mark.parametrize("acc", [4, 8])
def test_masks_hit_the_acceleration_with_a_full_centre(kind, acc):
    m = make_mask(kind, (64, 128), acc, seed=1)
    if kind == "equispaced":  # exact by construction
        assert abs(acceleration_of(m) - acc) / acc < 0.05
    else:  # random: one draw varies a lot (8× on 128 columns: 5.8×–16×); the mean over seeds is on target
        mean_fraction = np.mean([make_mask(kind, (64, 128), acc, seed=s)[0].mean() for s in range(20)])
        assert abs(1 / mean_fraction - acc) / acc < 0.1
    assert np.all(m == m[0:1])  # whole columns
    assert m[:, 62:66].all()
    assert np.array_equal(m, make_mask(kind, (64, 128), acc, seed=1))
    if kind == "random":
        assert not np.array_equal(m, make_mask(kind, (64, 128), acc, seed=2))
    for bad in (0.5, True, "4", float("nan")):
        with pytest.raises(ValueError, match="acceleration"):
            make_mask(kind, (64, 128), bad)
    for cf in (1.5, -0.1, "a"):
        with pytest.raises(ValueError, match="center_fraction"):
            make_mask(kind, (64, 128), acc, center_fraction=cf)
    with pytest.raises(ValueError, match="alone exceeds"):  # a centre larger than the sampling budget
        make_mask(kind, (64, 128), acc, center_fraction=0.5)


def test_cli_simulate_reconstruct_and_errors(tmp_path, capsys):
    from pydicom.data import get_testdata_file

    b = tmp_path / "b.npz"
    assert (
        main(
            [
                "simulate",
                get_testdata_file("CT_small.dcm"),
                "--modality",
                "ct",
                "--views",
                "23",
                "--size",
                "64",
                "-o",
                str(b),
            ]
        )
        == 0
    )
    assert main(["simulate", get_testdata_file("CT_small.dcm"), "--modality", "ct", "-o", str(b)]) == 2
    assert "--force" in capsys.readouterr().err
    out = tmp_path / "tv.npz"
    assert main(["reconstruct", str(b), "--method", "tv", "--iters", "50", "-o", str(out)]) == 0
    assert "PSNR" in capsys.readouterr().out
    with np.load(out) as z:
        assert z["reconstruction"].shape == (64, 64) and z["reconstruction"].dtype == np.float32
        assert json.loads(str(z["provenance"]))["settings"]["baseline_params"]["iters"] == 50
    (tmp_path / "bad.npz").write_bytes(b"nonsense")
    assert main(["reconstruct", str(tmp_path / "bad.npz"), "--method", "fbp", "-o", str(tmp_path / "x.npz")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err
    assert main(["reconstruct", str(b), "--method", "mlem", "-o", str(tmp_path / "y.npz")]) == 2
    assert main(["reconstruct", str(b), "--method", "magic", "-o", str(tmp_path / "y.npz")]) == 2
    capsys.readouterr()
    assert main(["reconstruct", str(b), "--method", "dds", "--subsets", "4", "-o", str(tmp_path / "z.npz")]) == 2
    assert "--subsets applies to PET data" in capsys.readouterr().err  # CT: no EM data step reads it
    from napari_diffrecon.io import DATA_DIR

    pet = str(DATA_DIR / "pet_lowcount.npz")
    assert main(["reconstruct", pet, "--method", "dds", "--subsets", "0", "-o", str(tmp_path / "z.npz")]) == 2
    assert "--subsets must be ≥ 1" in capsys.readouterr().err and not (tmp_path / "z.npz").exists()
    assert main(["reconstruct", str(b), "--method", "dds", "--std-pool", "-1", "-o", str(tmp_path / "z.npz")]) == 2
    assert "(--std-pool) must be" in capsys.readouterr().err and not (tmp_path / "z.npz").exists()


def test_demo_headless_writes_png_and_npz(tmp_path, capsys):
    assert main(["demo", "--headless", "-o", str(tmp_path)]) == 0
    assert (tmp_path / "demo_comparison.png").stat().st_size > 1000
    with np.load(tmp_path / "demo_reconstruction.npz") as z:
        assert psnr(z["reconstruction_tv"], z["ground_truth"]) > psnr(z["reconstruction_fbp"], z["ground_truth"])
        # the diffusion run is a posterior mean with its per-pixel std: spread inside the scanned disc, 0 outside
        assert psnr(z["reconstruction_dds"], z["ground_truth"]) > psnr(z["reconstruction_fbp"], z["ground_truth"])
        std = z["std_dds"]
        assert std.shape == z["ground_truth"].shape and std[64, 64] > 0 and std[0, 0] == 0
        dds_mean = z["reconstruction_dds"]
    # the DDS run is also written as a result file, which `export` takes (the comparison file is refused, naming it)
    nii = tmp_path / "dds_mean.nii.gz"
    assert main(["export", str(tmp_path / "demo_reconstruction.npz"), "-o", str(nii)]) == 2 and not nii.exists()
    assert "export the DDS run's result" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "demo_dds.npz"), "-o", str(nii)]) == 0
    import nibabel as nib

    hu = np.asarray(nib.load(nii).dataobj, dtype=np.float64)
    assert hu.size == dds_mean.size and np.corrcoef(hu.T.ravel(), dds_mean.ravel())[0, 1] > 0.999  # (x, y) order
    assert hu.min() < -500 and hu.max() > 500  # Hounsfield units: air and bone, not the model's attenuation


def test_napari_reader_and_sample(tmp_path):
    np.save(tmp_path / "foreign.npy", np.zeros(3))
    np.savez(tmp_path / "foreign.npz", a=np.zeros(3))
    assert get_reader(str(tmp_path / "foreign.npz")) is None
    assert get_reader(str(tmp_path / "foreign.npy")) is None
    write_measurement(load_sample(), tmp_path / "s.npz")
    layers = get_reader(str(tmp_path / "s.npz"))(str(tmp_path / "s.npz"))
    assert [layer[2] for layer in layers] == ["image", "image"]
    assert layers[1][1]["metadata"]["operator"]["modality"] == "ct"
    assert len(sample_ct_sparse23()) == 2


@pytest.mark.parametrize("acc", [4, 8])
def test_poisson_disc_mask_is_variable_density_with_min_distance(acc):
    from napari_diffrecon.physics.masks import poisson_disc_mask_2d

    m = poisson_disc_mask_2d((96, 96), acc, calib=12, seed=0)
    assert abs(acceleration_of(m) - acc) / acc <= 0.06
    assert m[42:54, 42:54].all()
    yy, xx = np.mgrid[:96, :96]
    r = np.hypot(yy - 48, xx - 48)
    inner, outer = m[(r > 8) & (r < 25)].mean(), m[r > 40].mean()
    assert inner > 1.5 * outer  # density falls outward
    pts = np.argwhere((m > 0) & (r > 30))  # outside the calibration box no two samples touch
    d = np.hypot(*(pts[:, None, :] - pts[None, :, :]).transpose(2, 0, 1))
    np.fill_diagonal(d, np.inf)
    assert d.min() >= 2.0
    assert not np.array_equal(m, poisson_disc_mask_2d((96, 96), acc, calib=12, seed=1))
    with pytest.raises(ValueError, match="max_iter"):
        poisson_disc_mask_2d((96, 96), acc, max_iter=0)


def test_reconstruct_auto_tunes_and_records_the_search(tmp_path):
    b = _ct23_bundle(tmp_path / "b.npz")
    out = tmp_path / "out.npz"
    rc = main(["reconstruct", str(b), "--method", "dds", "--steps", "4", "--auto", "--auto-params", "gamma=0.3,3",
               "-o", str(out)])
    assert rc == 0
    with np.load(out) as z:
        prov = json.loads(str(z["provenance"]))
    assert prov["auto_tune"]["best"]["gamma"] in (0.3, 3.0)
    assert main(["reconstruct", str(b), "--method", "fbp", "--auto", "-o", str(tmp_path / "x.npz")]) == 2


def test_run_settings_refuse_a_bad_std_pool():
    from napari_diffrecon.reconstruct import RunSettings

    assert RunSettings().std_pool == 1.0 and RunSettings.from_dict({"method": "dds"}).std_pool == 1.0
    assert RunSettings.from_dict(RunSettings(std_pool=0).to_dict()).std_pool == 0.0
    for bad in (-1, float("nan"), None, "wide"):
        with pytest.raises(ValueError, match="std_pool"):
            RunSettings.from_dict({"method": "dds", "std_pool": bad})


def test_std_pool_is_refused_for_volume_runs(tmp_path, capsys):
    # volumes report the raw per-voxel std: the flag would be silently ignored, so it is an error naming the fix
    out = tmp_path / "vol"
    assert main(["reconstruct", str(tmp_path), "--volume", "--method", "mbir", "--std-pool", "2", "-o", str(out)]) == 2
    assert "--std-pool applies to 2D runs" in capsys.readouterr().err and not out.exists()
    # so is a hot start (the volume sampler starts from noise)
    assert main(["reconstruct", str(tmp_path), "--volume", "--method", "mbir", "--hot-start", "auto", "-o",
                 str(out)]) == 2
    assert "--hot-start applies to 2D runs" in capsys.readouterr().err and not out.exists()
    # and the orientation ensemble (2D posterior samples; the volume sampler's batch is slices)
    assert main(["reconstruct", str(tmp_path), "--volume", "--method", "mbir", "--orientations", "8", "-o",
                 str(out)]) == 2
    assert "--orientations applies to 2D runs" in capsys.readouterr().err and not out.exists()
    # a 3D image is not a volume study: how to make one is said (it named an internal '.input' folder)
    np.save(tmp_path / "vol.npy", np.zeros((4, 16, 16), np.float32))
    assert main(["reconstruct", str(tmp_path / "vol.npy"), "--volume", "--method", "mbir", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "vol.npy is not a volume study" in err and "simulate_study" in err and ".input" not in err
    assert not out.exists()
    # and measurement splitting's hold-out share (volume runs do not self-tune)
    assert main(["reconstruct", str(tmp_path), "--volume", "--method", "mbir", "--holdout", "0.3", "-o",
                 str(out)]) == 2
    assert "--holdout applies to 2D runs" in capsys.readouterr().err and not out.exists()


def test_precision_is_checked_and_refused_for_volume_runs(tmp_path, capsys):

    from napari_diffrecon.cli import _parser, _settings_from_args, main
    from napari_diffrecon.reconstruct import RunSettings

    assert RunSettings().precision == "float32"
    a = _parser().parse_args(["reconstruct", "b.npz", "--method", "dds", "--precision", "bfloat16", "-o", "o.npz"])
    assert isinstance(a, argparse.Namespace) and _settings_from_args(a, "ct").precision == "bfloat16"
    assert RunSettings.from_dict(RunSettings(precision="bfloat16").to_dict()).precision == "bfloat16"
    with pytest.raises(ValueError, match="unknown network precision 'fp8'"):
        RunSettings.from_dict({"method": "dds", "precision": "fp8"})
    out = tmp_path / "vol"
    assert main(["reconstruct", str(tmp_path), "--volume", "--method", "mbir", "--precision", "bfloat16",
                 "-o", str(out)]) == 2
    assert "--precision applies to 2D runs" in capsys.readouterr().err and not out.exists()


def test_cli_warns_before_the_run_when_the_sampler_does_not_suit_the_noise(tmp_path, capsys):
    from pydicom.data import get_testdata_file

    b = tmp_path / "lowdose.npz"
    assert main(["simulate", get_testdata_file("CT_small.dcm"), "--modality", "ct", "--views", "60", "--photons",
                 "1e4", "-o", str(b)]) == 0
    capsys.readouterr()
    both = io.StringIO()  # warnings go to stderr, the result line to stdout: one stream shows their order
    with contextlib.redirect_stdout(both), contextlib.redirect_stderr(both):
        assert main(["reconstruct", str(b), "--method", "song", "--steps", "2", "-o", str(tmp_path / "s.npz")]) == 0
    assert "warning:" not in capsys.readouterr().out
    lines = both.getvalue().splitlines()
    warned = [i for i, line in enumerate(lines) if line.startswith("warning:") and "hard projection" in line]
    done = [i for i, line in enumerate(lines) if line.startswith("song:")]
    assert len(warned) == 1 and done and warned[0] < done[0]  # once, and before the run's result line
    assert "noise floor" in lines[done[0]]
    with np.load(tmp_path / "s.npz") as z:
        prov = json.loads(str(z["provenance"]))
    assert any("hard projection" in w for w in prov["warnings"]) and prov["noise_floor"] > 0
    # counts are noisy data: the tuned pseudo-inverse takes one CG step; a user's 5 steps run, with a word on it
    assert prov["settings"]["params"]["cg_iters"] == 1 and not any("--cg-iters 1" in w for w in prov["warnings"])
    assert main(["reconstruct", str(b), "--method", "song", "--steps", "2", "--cg-iters", "5",
                 "-o", str(tmp_path / "s5.npz")]) == 0
    assert "--cg-iters 1" in capsys.readouterr().err
    with np.load(tmp_path / "s5.npz") as z:
        assert json.loads(str(z["provenance"]))["settings"]["params"]["cg_iters"] == 5


def test_cli_posterior_draw_reaches_the_sampler_and_the_provenance(tmp_path, capsys):
    b = _ct23_bundle(tmp_path / "ct.npz")
    runs = {}
    for draw in (None, "jacobian"):
        out = tmp_path / f"{draw}.npz"
        extra = ["--posterior-draw", draw] if draw else []
        assert main(["reconstruct", str(b), "--method", "dds", "--steps", "3", "--samples", "2", *extra,
                     "-o", str(out)]) == 0
        with np.load(out) as z:
            runs[draw] = (json.loads(str(z["provenance"])), z["mean"].copy())
    prov, _ = runs["jacobian"]
    assert prov["settings"]["params"]["extra"]["posterior_draw"] == "jacobian"
    assert "posterior_draw" not in runs[None][0]["settings"]["params"]["extra"]
    assert prov["nfe"] == 2 * runs[None][0]["nfe"] == 6  # the Jacobian probe: one more evaluation per step
    capsys.readouterr()
    assert main(["reconstruct", str(b), "--method", "dps", "--posterior-draw", "gaussian",
                 "-o", str(tmp_path / "d.npz")]) == 2
    assert "DDS option" in capsys.readouterr().err and not (tmp_path / "d.npz").exists()
    assert main(["reconstruct", str(b), "--method", "dds", "--posterior-draw", "jacobian", "--precision", "bfloat16",
                 "-o", str(tmp_path / "d.npz")]) == 2
    assert "float32" in capsys.readouterr().err and not (tmp_path / "d.npz").exists()


def test_cli_renoise_reaches_the_sampler_and_the_provenance(tmp_path, capsys):
    """DDS's tuned re-noise is the DDS code's; ``--renoise ddim`` runs the exact DDIM step instead (another result),
    both recorded; a method without that step refuses the option."""
    b = _ct23_bundle(tmp_path / "ct.npz")
    runs = {}
    for mode in (None, "ddim"):
        out = tmp_path / f"{mode}.npz"
        assert main(["reconstruct", str(b), "--method", "dds", "--steps", "3", *(["--renoise", mode] if mode else []),
                     "-o", str(out)]) == 0
        with np.load(out) as z:
            runs[mode] = (json.loads(str(z["provenance"]))["settings"]["params"]["renoise"], z["mean"].copy())
    assert runs[None][0] == "dds" and runs["ddim"][0] == "ddim"
    assert np.abs(runs[None][1] - runs["ddim"][1]).max() > 1e-4
    capsys.readouterr()
    assert main(["reconstruct", str(b), "--method", "dps", "--renoise", "ddim", "-o", str(tmp_path / "d.npz")]) == 2
    assert "DDS option" in capsys.readouterr().err and not (tmp_path / "d.npz").exists()


def test_cli_refuses_runs_that_cannot_be_what_was_asked(tmp_path, capsys):
    """t0 without a start image, a step count below 1, a prior of another modality, a device this machine lacks:
    each is refused before any work, with what to change; nothing is written."""
    b = _ct23_bundle(tmp_path / "ct.npz")
    out = tmp_path / "o.npz"
    cases = [
        (["--method", "dds", "--steps", "3", "--t0", "0.3"], "needs a start image"),
        (["--method", "dds", "--steps", "0"], "n_steps = 0 is outside"),
        (["--method", "dds", "--steps", "2", "--gamma", "nan"], "gamma = nan is outside"),
        (["--method", "dds", "--steps", "2", "--prior", "pet-phantom-128"], "trained on PET images"),
        # options the run would have ignored without a word
        (["--method", "fbp", "--prior", "mri-brain-128"], "--prior applies to the diffusion samplers"),
        (["--method", "tv", "--steps", "5", "--samples", "4", "--hot-start", "fbp"],
         "--steps, --hot-start, --samples apply to the diffusion samplers"),
        (["--method", "dds", "--steps", "2", "--auto-params", "gamma=1,3"], "add --auto"),
        (["--method", "tv", "--orientations", "2"], "--orientations applies to the diffusion samplers"),
        # another method's flags (each ran as if absent)
        (["--method", "dds", "--steps", "2", "--zeta", "2"], "--zeta applies to other samplers; --method dds reads"),
        (["--method", "dps", "--steps", "2", "--gamma", "2"], "--gamma applies to other samplers"),
        (["--method", "ddim", "--steps", "2", "--gamma", "3"], "--gamma applies to other samplers"),
        (["--method", "song", "--steps", "2", "--gamma", "2"], "--gamma applies to other samplers"),
        (["--method", "dds", "--steps", "2", "--filter", "hann"], "--filter applies to a hot start from FBP"),
        (["--method", "dds", "--steps", "2", "--hot-start", "tv", "--filter", "hann"], "this run starts from TV"),
        (["--method", "dds", "--steps", "2", "--lam-rel", "0.1"], "--lam-rel applies to a hot start from TV"),
        (["--method", "dds", "--steps", "2", "--iters", "5"], "--iters applies to a hot start"),
        (["--method", "dds", "--steps", "2", "--adapt-lr", "0.01"], "it is off without --adapt-steps"),
        (["--method", "dds", "--steps", "2", "--holdout", "0.3"], "add --auto"),
        (["--method", "fbp", "--lam-rel", "0.1"], "--method fbp reads --filter"),
        (["--method", "fbp", "--iters", "5"], "--method fbp reads --filter"),
        (["--method", "tv", "--filter", "hann"], "--method tv reads --iters, --lam, --lam-rel"),
        (["--method", "ddim", "--auto"], "--method ddim has none to tune"),
        (["--method", "fbp", "--threads", "0"], "--threads must be a whole number ≥ 1"),
        (["--method", "mcg", "--steps", "2", "--adapt-lr", "0.01"], "it is off without --adapt-steps"),
        (["--method", "dds", "--steps", "2", "--auto", "--holdout", "0.3"], "--auto picks the discrepancy principle"),
        (["--method", "fbp", "--holdout", "0.3"], "--holdout applies to the diffusion samplers"),
        (["--method", "fbp", "--holdout", "0"], "--holdout applies to the diffusion samplers"),  # 0 is given too
    ]
    for extra, message in cases:
        capsys.readouterr()
        assert main(["reconstruct", str(b), *extra, "-o", str(out)]) == 2, extra
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and not out.exists(), (extra, err)
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            main(["reconstruct", str(b), "--method", "fbp", "--device", "cuda", "-o", str(out)])
        assert "device 'cuda' is not available" in capsys.readouterr().err and not out.exists()


def test_cli_warns_when_the_samples_ignore_or_do_not_fit_the_measurement(tmp_path, capsys):
    from pydicom.data import get_testdata_file

    b = _ct23_bundle(tmp_path / "ct.npz")
    capsys.readouterr()
    assert main(["reconstruct", str(b), "--method", "ddim", "--steps", "3", "-o", str(tmp_path / "u.npz")]) == 0
    assert "warning: ddim is an unconditional sampler" in capsys.readouterr().err
    # DPS with far too few steps for its step size leaves a residual many times the noise floor.
    assert main(["reconstruct", str(b), "--method", "dps", "--steps", "4", "-o", str(tmp_path / "d.npz")]) == 0
    assert "do not fit the measurements" in capsys.readouterr().err
    # A well-posed DDS hot start fits the data to the floor: no warning.
    assert main(["reconstruct", str(b), "--method", "dds", "--hot-start", "fbp", "-o", str(tmp_path / "h.npz")]) == 0
    assert "warning" not in capsys.readouterr().err
    with np.load(tmp_path / "d.npz") as z:
        assert any("do not fit" in w for w in json.loads(str(z["provenance"]))["warnings"])
    # No PET consistency model ships: the consistency sampler says it runs on the diffusion prior.
    pet = tmp_path / "pet.npz"
    assert main(["simulate", get_testdata_file("CT_small.dcm"), "--modality", "pet", "--size", "64",
                 "-o", str(pet)]) == 0
    capsys.readouterr()
    assert main(["reconstruct", str(pet), "--method", "consistency", "--hot-start", "mlem", "-o",
                 str(tmp_path / "c.npz")]) == 0
    assert "'pet-phantom-128', a diffusion prior, not a consistency model" in capsys.readouterr().err
    assert main(["reconstruct", str(b), "--method", "consistency", "--hot-start", "fbp", "-o",
                 str(tmp_path / "c2.npz")]) == 0
    assert "not a consistency model" not in capsys.readouterr().err  # CT ships one


def test_the_demo_never_overwrites_earlier_results(tmp_path):
    from napari_diffrecon.cli import DEMO_FILES, _free_demo_folder

    out = tmp_path / "diffrecon-demo"
    assert _free_demo_folder(out, force=False) == out  # nothing there yet
    out.mkdir()
    (out / DEMO_FILES[1]).write_bytes(b"earlier")
    second = _free_demo_folder(out, force=False)
    assert second == tmp_path / "diffrecon-demo-2"
    second.mkdir()
    (second / DEMO_FILES[0]).write_bytes(b"earlier")
    assert _free_demo_folder(out, force=False) == tmp_path / "diffrecon-demo-3"
    assert _free_demo_folder(out, force=True) == out


def test_an_image_size_the_unet_cannot_halve_three_times_still_reconstructs(tmp_path, capsys):
    """60² is not a multiple of the shipped U-Net's 8: the network pads and crops, the run beats FBP."""
    from pydicom.data import get_testdata_file

    b = tmp_path / "ct60.npz"
    assert main(["simulate", get_testdata_file("CT_small.dcm"), "--modality", "ct", "--views", "23", "--size", "60",
                 "-o", str(b)]) == 0
    assert main(["reconstruct", str(b), "--method", "fbp", "-o", str(tmp_path / "f.npz")]) == 0
    assert main(["reconstruct", str(b), "--method", "dds", "--hot-start", "fbp", "-o", str(tmp_path / "d.npz")]) == 0
    with np.load(tmp_path / "f.npz") as f, np.load(tmp_path / "d.npz") as d, np.load(b) as m:
        gt = m["ground_truth"]
        assert d["reconstruction"].shape == gt.shape == (60, 60)
        assert psnr(d["reconstruction"], gt) > psnr(f["reconstruction"], gt) + 1


def test_cli_sampler_flags_and_the_arrays_a_run_writes(tmp_path, capsys):
    """--prior PATH, --prior-weight, --keep-samples and the residual arrays; --lam is the sampler's λ, not the TV
    hot start's weight (it used to reach both)."""
    from pathlib import Path

    import napari_diffrecon

    b = _ct23_bundle(tmp_path / "ct.npz")
    card = Path(napari_diffrecon.__file__).parent / "priors" / "weights" / "ct-phantom-128.json"
    out = tmp_path / "song.npz"
    assert main(["reconstruct", str(b), "--method", "song", "--prior", str(card), "--hot-start", "tv", "--t0", "0.3",
                 "--steps", "3", "--lam", "0.5", "--prior-weight", "2", "--samples", "2", "--keep-samples",
                 "--orientations", "2", "-o", str(out)]) == 0
    with np.load(out) as z:
        prov = json.loads(str(z["provenance"]))
        assert z["samples"].shape == (2, 64, 64) and z["mean"].shape == (64, 64)
        assert z["residual"].shape == () and float(z["residual"]) == pytest.approx(prov["data_residual_of_mean"])
        np.testing.assert_allclose(z["residual_per_sample"], prov["data_residual_per_sample"])
        np.testing.assert_allclose(z["mean"], z["samples"].mean(0), rtol=1e-5, atol=1e-5)
    params = prov["settings"]["params"]
    assert params["lam"] == 0.5 and params["prior_weight"] == 2.0 and params["orientations"] == 2
    assert "lam" not in prov["settings"]["baseline_params"]  # Song's λ: the TV hot start keeps its own weight
    dds = tmp_path / "dds.npz"  # DDS has no λ: --lam stays the TV hot start's weight
    assert main(["reconstruct", str(b), "--method", "dds", "--hot-start", "tv", "--t0", "0.3", "--steps", "2",
                 "--lam", "0.002", "-o", str(dds)]) == 0
    with np.load(dds) as z:
        dds_prov = json.loads(str(z["provenance"]))
        assert dds_prov["settings"]["baseline_params"]["lam"] == 0.002
        assert dds_prov["settings"]["params"]["orientations"] == 8  # a CT hot start's tuned orientation ensemble
    capsys.readouterr()
    assert main(["reconstruct", str(b), "--method", "dds", "--steps", "2", "--orientations", "9",
                 "-o", str(tmp_path / "bad.npz")]) == 2
    assert "orientations = 9 is outside [1, 8]" in capsys.readouterr().err
    assert not (tmp_path / "bad.npz").exists()
    assert prov["prior"] == "ct-phantom-128"
    # Without --keep-samples there are no samples; a classical run writes its residual too.
    tv = tmp_path / "tv.npz"
    assert main(["reconstruct", str(b), "--method", "tv", "--lam", "0.01", "-o", str(tv)]) == 0
    with np.load(tv) as z:
        assert "samples" not in z and z["residual"].shape == () and np.isfinite(z["residual"])
        assert "lam" in json.loads(str(z["provenance"]))["settings"]["baseline_params"]


def test_a_prior_far_from_the_image_size_is_refused_with_both_sizes(tmp_path, capsys):
    """Below 16 px or beyond 4× the prior's training size the run stops before it starts (CLI, core, workbench)."""
    from types import SimpleNamespace

    from pydicom.data import get_testdata_file

    from napari_diffrecon.physics import Identity
    from napari_diffrecon.priors import load_prior
    from napari_diffrecon.reconstruct import prior_mismatch
    from napari_diffrecon.samplers import Problem, SamplingError

    b = tmp_path / "big.npz"
    assert main(["simulate", get_testdata_file("MR_small.dcm"), "--modality", "mri", "--size", "520",
                 "-o", str(b)]) == 0
    out = tmp_path / "r.npz"
    assert main(["reconstruct", str(b), "--method", "dds", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "520×520" in err and "128² training resolution" in err and not out.exists()
    with pytest.raises(SamplingError, match="8×8 is far from the 128²"):  # too small for the U-Net's levels
        Problem(Identity((8, 8)), torch.zeros(8, 8), load_prior("ct-phantom-128"))
    prior = load_prior("ct-phantom-128")
    with pytest.raises(SamplingError, match="600×600 is far from the 128² training resolution of prior 'ct-phantom"):
        Problem(Identity((600, 600)), torch.zeros(600, 600), prior)
    Problem(Identity((512, 256)), torch.zeros(512, 256), prior)  # up to 4× runs
    big = SimpleNamespace(operator={"modality": "ct", "image_shape": [513, 513]})
    assert "513×513" in prior_mismatch(prior.card, big)


def test_single_coil_mri_gets_its_own_dps_step(tmp_path):
    """DPS's hot-start step tuned with 8 coils fits single-coil k-space noise: one coil gets ζ 0.5 (CLI and core)."""
    from pydicom.data import get_testdata_file

    from napari_diffrecon.samplers.defaults import coil_count, recommended_params

    assert recommended_params("dps", "mri", hot_start=True, coils=1).zeta == 0.5
    assert recommended_params("dps", "mri", hot_start=True, coils=8).zeta == 2.0
    assert recommended_params("dps", "mri", hot_start=True).zeta == 2.0  # coils unknown
    assert [recommended_params("dps", "mri", coils=c).zeta for c in (None, 1, 8)] == [1.0, 1.0, 4.0]  # from noise
    assert recommended_params("dds", "mri", hot_start=True, coils=1) == recommended_params("dds", "mri", True)
    assert coil_count({"modality": "ct"}) is None
    for coils, zeta in ((1, 0.5), (4, 2.0)):  # hot-started; from noise: 1 and 4 (checked below)
        b = tmp_path / f"mri{coils}.npz"
        assert main(["simulate", get_testdata_file("MR_small.dcm"), "--modality", "mri", "--coils", str(coils),
                     "--size", "32", "-o", str(b)]) == 0
        assert coil_count(read_measurement(b).operator) == coils
        out = tmp_path / f"r{coils}.npz"
        assert main(["reconstruct", str(b), "--method", "dps", "--hot-start", "cg", "--steps", "2",
                     "-o", str(out)]) == 0
        with np.load(out) as z:
            assert json.loads(str(z["provenance"]))["settings"]["params"]["zeta"] == zeta
        cold = tmp_path / f"c{coils}.npz"
        assert main(["reconstruct", str(b), "--method", "dps", "--steps", "2", "-o", str(cold)]) == 0
        with np.load(cold) as z:
            assert json.loads(str(z["provenance"]))["settings"]["params"]["zeta"] == (1.0 if coils == 1 else 4.0)


def test_simulate_takes_the_images_own_pixel_spacing(tmp_path, ct_slice):
    from pydicom.data import get_testdata_file

    # CT_small: 128 pixels of 0.66 mm; the pixel size after resizing sets the attenuation per pixel (and so how
    # starved low-dose CT is): it was 350 mm / size whatever the image said (a 4x too thick body)
    b = tmp_path / "b.npz"
    assert main(["simulate", get_testdata_file("CT_small.dcm"), "--modality", "ct", "--size", "64", "-o", str(b)]) == 0
    px = read_measurement(b).metadata["intensity"]["pixel_size_mm"]
    assert px == pytest.approx(0.661468 * 128 / 64, rel=1e-4)
    thick = simulate_from_image(ct_slice, "ct", size=64, units="HU", views=12)
    thin = simulate_from_image(ct_slice, "ct", size=64, units="HU", views=12, pixel_spacing_mm=[0.5, 0.5])
    assert thick.metadata["intensity"]["pixel_size_mm"] == pytest.approx(350 / 64)
    assert thin.metadata["intensity"]["pixel_size_mm"] == pytest.approx(0.5 * ct_slice.shape[0] / 64)
    # the line integrals scale with the pixel size: same image, same geometry
    ratio = float(np.abs(thick.ground_truth).sum() / np.abs(thin.ground_truth).sum())
    assert ratio == pytest.approx((350 / 64) / (0.5 * ct_slice.shape[0] / 64), rel=1e-3)
    pet = simulate_from_image(ct_slice, "pet", size=48, views=12, pixel_spacing_mm=0.5)
    assert pet.metadata["intensity"]["pixel_size_mm"] == pytest.approx(0.5 * ct_slice.shape[0] / 48)
    with pytest.raises(ValueError, match="pixel spacing"):
        simulate_from_image(ct_slice, "ct", size=48, pixel_spacing_mm=[0.0, 1.0])


@pytest.mark.parametrize(
    "option,value,match",
    [("views", 0, "views"), ("coils", 0, "coils"), ("coils", -2, "coils"), ("accel", 0, "accel"),
     ("counts", 0, "counts"), ("counts", -1, "counts"), ("photons", float("nan"), "photons"),
     ("noise_sigma", -0.1, "noise_sigma"), ("noise_sigma", 0.0, "above 0"), ("views", 100000, "sample it fully")],
)
def test_simulate_refuses_zero_or_negative_options(ct_slice, option, value, match):
    # they used to fall back to the defaults silently (0 views → 180, 0 counts → 2e5, 0 coils → 1)
    modality = {"coils": "mri", "accel": "mri", "counts": "pet"}.get(option, "ct")
    with pytest.raises(ValueError, match=match):
        simulate_from_image(ct_slice, modality, size=32, **{option: value})


def test_outputs_are_refused_under_a_name_of_another_format(tmp_path, capsys):
    from pydicom.data import get_testdata_file

    from napari_diffrecon.io import OutputPathError, write_result

    ct = get_testdata_file("CT_small.dcm")
    sim = ["simulate", ct, "--modality", "ct", "--size", "32", "--views", "8", "-o"]
    assert main([*sim, str(tmp_path / "s.nii")]) == 2
    assert ".npz" in capsys.readouterr().err and not (tmp_path / "s.nii").exists()
    b = tmp_path / "b.npz"
    assert main([*sim, str(b)]) == 0
    for name in ("r.nii.gz", "r.tif", "r.h5"):
        assert main(["reconstruct", str(b), "--method", "fbp", "-o", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and "r.npz" in err and not (tmp_path / name).exists()
    with pytest.raises(OutputPathError, match=".npz"):
        write_result(tmp_path / "x.dcm", {"mean": np.zeros((2, 2))}, {})
    before = b.read_bytes()  # --force replaces earlier results, never the input measurement
    assert main(["reconstruct", str(b), "--method", "fbp", "--force", "-o", str(b)]) == 2
    assert "is the input measurement" in capsys.readouterr().err and b.read_bytes() == before
    # volume runs write a folder: a file name is refused instead of becoming a folder called vol.npz
    assert main(["reconstruct", str(b), "--volume", "-o", str(tmp_path / "vol.npz")]) == 2
    assert "folder" in capsys.readouterr().err and not (tmp_path / "vol.npz").exists()


def test_classical_parameters_are_range_checked(tmp_path, capsys):
    from pydicom.data import get_testdata_file

    b, p = tmp_path / "ct.npz", tmp_path / "pet.npz"
    ct = get_testdata_file("CT_small.dcm")
    assert main(["simulate", ct, "--modality", "ct", "--size", "32", "--views", "8", "-o", str(b)]) == 0
    assert main(["simulate", ct, "--modality", "pet", "--size", "32", "--views", "12", "-o", str(p)]) == 0
    for bundle, args, match in [
        (b, ["--method", "tv", "--lam", "nan"], "lam must be"),
        (b, ["--method", "tv", "--iters", "0"], "iters must be"),
        (b, ["--method", "cg", "--iters", "-1"], "iters must be"),
        (p, ["--method", "mlem", "--iters", "0"], "iters must be"),
        (p, ["--method", "osem", "--subsets", "100"], "at most 12"),
    ]:
        capsys.readouterr()
        assert main(["reconstruct", str(bundle), *args, "-o", str(tmp_path / "o.npz")]) == 2, args
        assert match in capsys.readouterr().err and not (tmp_path / "o.npz").exists()
    # --lam with a sampler that has no λ is the TV hot start's weight, not Song's projection weight (≤ 1)
    assert main(["reconstruct", str(b), "--method", "dds", "--hot-start", "tv", "--lam", "2", "--steps", "2",
                 "-o", str(tmp_path / "d.npz")]) == 0
    out = capsys.readouterr().out
    assert "step 2/2" in out  # progress lines while the sampler runs
    with np.load(tmp_path / "d.npz") as z:
        assert json.loads(str(z["provenance"]))["settings"]["baseline_params"]["lam"] == 2.0


def test_auto_tune_says_when_it_chose_the_end_of_its_grid():
    from napari_diffrecon.tuning import TuneResult

    grid = [{"gamma": g} for g in (0.1, 1.0, 10.0)]
    top = TuneResult(best={"gamma": 10.0}, grid=grid, scores=[3.0, 2.0, 1.0], criterion="split", method="dds")
    assert "highest" in top.edge_note() and "highest" in top.curve_text() and top.to_dict()["edge_note"]
    inside = TuneResult(best={"gamma": 1.0}, grid=grid, scores=[3.0, 1.0, 2.0], criterion="split", method="dds")
    assert inside.edge_note() is None and "note" not in inside.curve_text()
    two = TuneResult(best={"gamma": 1.0}, grid=grid[:2], scores=[1.0, 2.0], criterion="split", method="dds")
    assert two.edge_note() is None  # two points are no curve


def test_a_result_file_is_exported_in_hounsfield_units_and_opens_in_napari(tmp_path, capsys):
    """The CLI's result .npz (image units: attenuation per pixel) → `export` writes CT in HU with the pixel size and
    the run's provenance; napari's reader opens it as the workbench shows it (HU, std in magma, bounds hidden);
    wrong fields, measurement bundles and existing files are refused with what to do."""

    from napari_diffrecon.io import read_exported
    from napari_diffrecon.io._napari import core_values, read_any

    b = _ct23_bundle(tmp_path / "ct.npz")
    inten = read_measurement(b).metadata["intensity"]
    out = tmp_path / "dds.npz"
    assert main(["reconstruct", str(b), "--method", "dds", "--hot-start", "fbp", "--t0", "0.3", "--steps", "2",
                 "--samples", "2", "--keep-samples", "-o", str(out)]) == 0
    with np.load(out) as z:
        mean, std, samples = z["mean"], z["std"], z["samples"]
        assert json.loads(str(z["provenance"]))["measurement_intensity"] == inten
    capsys.readouterr()
    assert main(["export", str(out), "-o", str(tmp_path / "mean.nii.gz")]) == 0  # default: the mean
    assert "wrote" in capsys.readouterr().out
    data, prov, info = read_exported(tmp_path / "mean.nii.gz")
    np.testing.assert_allclose(data, (mean - inten["offset"]) / inten["scale"], rtol=1e-5, atol=1e-2)
    assert prov["exported_units"] == "HU" and prov["exported_field"] == "mean" and prov["settings"]["method"] == "dds"
    np.testing.assert_allclose(info["spacing"], [inten["pixel_size_mm"]] * 2, rtol=1e-5)
    assert main(["export", str(out), "--field", "std", "-o", str(tmp_path / "std.tif")]) == 0
    np.testing.assert_allclose(read_exported(tmp_path / "std.tif")[0], std / inten["scale"], rtol=1e-5, atol=1e-3)
    assert main(["export", str(out), "--field", "samples", "-o", str(tmp_path / "s.nii")]) == 0
    assert read_exported(tmp_path / "s.nii")[0].shape == samples.shape
    # refusals: an existing file, a field a classical run does not have, a measurement bundle, a file of another kind
    assert main(["export", str(out), "-o", str(tmp_path / "mean.nii.gz")]) == 2
    assert "pass --force to overwrite it" in capsys.readouterr().err
    tv = tmp_path / "tv.npz"
    assert main(["reconstruct", str(b), "--method", "tv", "-o", str(tv)]) == 0
    assert main(["export", str(tv), "-o", str(tmp_path / "tv.dcm")]) == 0  # default: the reconstruction
    capsys.readouterr()
    assert main(["export", str(tv), "--field", "std", "-o", str(tmp_path / "tv_std.dcm")]) == 2
    assert "has no 'std'" in capsys.readouterr().err and not (tmp_path / "tv_std.dcm").exists()
    assert main(["export", str(b), "-o", str(tmp_path / "b.nii")]) == 2
    assert "is a measurement bundle" in capsys.readouterr().err
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    assert main(["export", str(tmp_path / "other.npz"), "-o", str(tmp_path / "o.nii")]) == 2
    assert "not a napari-diffrecon result" in capsys.readouterr().err
    assert main(["export", str(out), "-o", str(tmp_path / "mean.png")]) == 2
    assert "cannot export to mean.png" in capsys.readouterr().err
    # one posterior sample: its std is 0 everywhere, which would read as certainty
    one = tmp_path / "one.npz"
    assert main(["reconstruct", str(b), "--method", "dds", "--steps", "2", "-o", str(one)]) == 0
    assert main(["export", str(one), "--field", "std", "-o", str(tmp_path / "one_std.nii")]) == 2
    assert "--samples ≥ 2" in capsys.readouterr().err and not (tmp_path / "one_std.nii").exists()
    # an MRI result (it holds 'reconstruction_complex') is a result, not the demo's comparison file
    from napari_diffrecon.io import DATA_DIR

    mri = tmp_path / "mri_cg.npz"
    assert main(["reconstruct", str(DATA_DIR / "mri_4x_8coils.npz"), "--method", "cg", "-o", str(mri)]) == 0
    with np.load(mri) as z:
        assert "reconstruction_complex" in z.files
        magnitude = z["reconstruction"]
    assert main(["export", str(mri), "-o", str(tmp_path / "mri.nii.gz")]) == 0
    np.testing.assert_allclose(read_exported(tmp_path / "mri.nii.gz")[0], magnitude, rtol=1e-5, atol=1e-6)
    capsys.readouterr()
    assert main(["info", str(out)]) == 0  # a result is summarised (it said it lacked a 'measurement' array)
    summary = json.loads(capsys.readouterr().out)
    assert summary["method"] == "dds" and summary["result"]["mean"].startswith("(64, 64)")
    assert summary["measurement_intensity"] == inten
    # napari: the result opens as the workbench shows a run
    reader = get_reader(str(out))
    assert reader is not None
    layers = {kw["metadata"]["result_field"]: (d, kw) for d, kw, _ in reader(str(out))}
    assert set(layers) == {"mean", "std", "samples"}  # the reconstruction is the mean: not twice
    d, kw = layers["mean"]
    assert kw["metadata"]["units"] == "HU" and kw["visible"] and kw["scale"] == (inten["pixel_size_mm"],) * 2
    np.testing.assert_allclose(core_values(d, kw["metadata"]), mean, rtol=1e-5, atol=1e-6)
    assert layers["std"][1]["colormap"] == "magma" and not layers["samples"][1]["visible"]
    from napari_diffrecon.io._napari import write_nifti  # saved again from napari: HU as shown, not converted twice

    again = write_nifti(str(tmp_path / "again.nii"), d, {"name": "again", **kw})[0]
    np.testing.assert_allclose(read_exported(again)[0], d, rtol=1e-6, atol=1e-3)
    assert [kw["metadata"]["result_field"] for _, kw, _ in read_any(tv)] == ["reconstruction"]


def test_a_nifti_in_comes_out_the_same_way_round(tmp_path):
    """One NIfTI convention everywhere: read_image (simulate, the workbench's Open), napari's reader and the
    export agree, so simulate → reconstruct → export writes the hot block where it was (it came out transposed),
    with the pixel sizes on their own axes."""
    import nibabel as nib

    from napari_diffrecon.io._napari import read_image_layers

    vol = np.zeros((96, 80, 3), np.float32)  # (x, y, z), anisotropic pixels 0.8 × 1.2 mm
    vol[20:36, 55:76, :] = 1000.0
    vol[40:60, 10:20, :] = 300.0
    nib.save(nib.Nifti1Image(vol, np.diag([0.8, 1.2, 3.0, 1.0])), tmp_path / "a.nii.gz")
    sl, info = read_image(tmp_path / "a.nii.gz")
    layer = read_image_layers(tmp_path / "a.nii.gz")[0]
    np.testing.assert_array_equal(layer[0][1], sl)
    assert info["pixel_spacing_mm"] == pytest.approx([1.2, 0.8]) and layer[1]["scale"][-2:] == pytest.approx((1.2, 0.8))
    b = tmp_path / "a.npz"
    assert main(["simulate", str(tmp_path / "a.nii.gz"), "--modality", "pet", "--size", "64", "-o", str(b)]) == 0
    out = tmp_path / "r.npz"
    assert main(["reconstruct", str(b), "--method", "mlem", "--iters", "20", "-o", str(out)]) == 0
    assert main(["export", str(out), "-o", str(tmp_path / "r.nii.gz")]) == 0
    back = nib.load(tmp_path / "r.nii.gz").get_fdata()  # (x, y) as the input's
    assert read_measurement(b).metadata["options"]["padded_to_square"]  # 96 × 0.8 mm by 80 × 1.2 mm: y is longer
    # the 96 mm of y fill the 64 pixels (1.5 mm); the 76.8 mm of x are padded by (64 − 51) / 2 pixels each side
    px, pad = 96.0 / 64, (64 - round(96 * 0.8 / 1.5)) // 2
    hot = np.unravel_index(np.argmax(back), back.shape)
    assert pad + 20 * 0.8 / px - 1 <= hot[0] <= pad + 36 * 0.8 / px, hot
    assert 55 * 1.2 / px - 1 <= hot[1] <= 76 * 1.2 / px, hot
    mask = back > 0.5 * back.max()  # the hot block keeps its shape in mm: 16 × 0.8 by 21 × 1.2 mm
    rows, cols = np.nonzero(mask)
    assert abs((np.ptp(rows) + 1) * px - 16 * 0.8) <= 2 * px and abs((np.ptp(cols) + 1) * px - 21 * 1.2) <= 2 * px


def test_simulate_refuses_what_it_would_ignore_and_simulates_pet_from_ct_as_uptake(tmp_path, capsys):
    """Flags of another modality (--photons with PET) are refused at the command line and not recorded by the
    library; a constant image is refused (it wrote an all-zero bundle nothing could read); PET from a CT (HU) is an
    FDG-like uptake of its tissues, not its HU (bone was the hottest)."""
    from pydicom.data import get_testdata_file

    from napari_diffrecon.simulate import activity_from_anatomy

    ct = get_testdata_file("CT_small.dcm")
    out = tmp_path / "p.npz"
    for flags, name in ((["--photons", "1e4"], "photons"), (["--accel", "8"], "accel"), (["--counts", "1e5"], None)):
        modality = "ct" if name is None else "pet"  # counts are PET's own
        assert main(["simulate", ct, "--modality", modality, "--size", "32", *flags, "-o", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"{modality.upper()} does not use {name or 'counts'}" in err and not out.exists()
    m = simulate_from_image(read_image(ct)[0], "pet", size=32, photons=1e4, accel=8.0, seed=0)
    opts = m.metadata["options"]
    assert opts["photons"] is None and opts["accel"] is None and opts["mask_kind"] is None  # ignored, not recorded
    with pytest.raises(ValueError, match="constant"):
        simulate_from_image(np.full((32, 32), 7.0), "pet", size=32)
    img, info = read_image(ct)
    pet = simulate_from_image(img, "pet", size=64, units="HU", pixel_spacing_mm=info["pixel_spacing_mm"], seed=0)
    assert "FDG-like" in pet.metadata["options"]["activity"]
    from skimage.transform import resize

    expect = activity_from_anatomy(resize(img, (64, 64), anti_aliasing=True, preserve_range=True), "ct")
    bone = resize(img, (64, 64), preserve_range=True) > 400
    gt = pet.ground_truth
    inside = np.hypot(*(np.mgrid[:64, :64] - 31.5)) < 31  # the scanner's field of view
    assert np.corrcoef(gt[inside], expect[inside])[0, 1] > 0.99
    assert gt[bone].mean() < np.percentile(gt[gt > 0], 90)  # bone is not the hottest tissue


def test_a_hu_image_is_padded_with_air_not_its_darkest_tissue():
    """A cropped HU image with no air in it (soft tissue from −100 HU), not square: the padding is −1000 HU (zero
    attenuation), not −100 HU tissue that would be forward-projected."""
    img = np.full((40, 80), 40.0)
    img[:, :10] = -100.0
    m = simulate_from_image(img, "ct", size=32, units="HU", views=8)
    assert m.metadata["options"]["padded_to_square"]
    gt = np.asarray(m.ground_truth)
    assert float(gt[0].max()) == 0.0 and float(gt[16].max()) > 0  # top rows: padding = air; middle: tissue


def test_hot_start_auto_takes_the_data_s_classical_start(tmp_path, capsys):
    """--hot-start auto: TV for a limited arc, FBP for 60 views (reconstruct.default_hot_start), recorded."""
    from pydicom.data import get_testdata_file

    for flags, want in ((["--limited-angle", "90"], "tv"), (["--views", "60"], "fbp")):
        b = tmp_path / f"{want}.npz"
        assert main(["simulate", get_testdata_file("CT_small.dcm"), "--modality", "ct", *flags, "--size", "32",
                     "-o", str(b)]) == 0
        out = tmp_path / f"r_{want}.npz"
        assert main(["reconstruct", str(b), "--method", "dds", "--hot-start", "auto", "--steps", "2", "-o",
                     str(out)]) == 0
        assert f"hot start: {want}" in capsys.readouterr().out
        with np.load(out) as z:
            prov = json.loads(str(z["provenance"]))
        assert prov["hot_start_method"] == prov["settings"]["hot_start"] == want
        assert prov["settings"]["params"]["t0"] < 1  # the tuned hot-start values, not the run-from-noise ones


def test_ctrl_c_ends_a_command_with_a_line_not_a_traceback(monkeypatch, capsys):

    import napari_diffrecon.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    class Parser:
        def parse_args(self, argv):
            return argparse.Namespace(func=interrupted)

    monkeypatch.setattr(cli, "_parser", Parser)
    assert cli.main([]) == 130
    assert capsys.readouterr().err.strip() == "interrupted"


def test_nifti_series_keep_their_frames_in_the_viewer_and_give_the_first_to_a_reconstruction(tmp_path):
    """One NIfTI reading (io.images.nifti_napari_order) for both readers: (x, y, z[, t]) → napari's (t, z, y, x);
    read_volume keeps a series' first frame, read_exported (napari's reader) every frame; 2D stays 2D."""
    import nibabel as nib

    from napari_diffrecon.io import read_exported
    from napari_diffrecon.io.images import read_volume

    for shape in ((6, 5), (6, 5, 4), (6, 5, 4, 3)):
        a = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
        path = tmp_path / f"x{len(shape)}.nii"
        nib.save(nib.Nifti1Image(a, np.diag([1.5, 2.0, 3.0, 1.0])), str(path))
        vol, info = read_volume(path)
        data, _, einfo = read_exported(path)
        np.testing.assert_array_equal(data, a.T)
        assert einfo["spacing"] == [1.0, 3.0, 2.0, 1.5][4 - len(shape):]
        first = a if a.ndim < 4 else a[..., 0]
        np.testing.assert_array_equal(vol, first.T if first.ndim == 3 else first.T[None])
        assert info["pixel_spacing_mm"] == [2.0, 1.5]


def test_hot_start_auto_through_the_python_api_is_resolved_and_recorded():
    from napari_diffrecon.reconstruct import RunSettings, reconstruct
    from napari_diffrecon.samplers.defaults import recommended_params
    from napari_diffrecon.simulate import simulate_from_image

    yy, xx = np.mgrid[:32, :32]
    m = simulate_from_image(((yy - 16) ** 2 + (xx - 14) ** 2 < 80) + 0.3, "ct", size=32, limited_angle=90.0, seed=0)
    r = reconstruct(m, RunSettings(method="dds", params=recommended_params("dds", "ct", hot_start=True, n_steps=2),
                                   hot_start="auto"))
    assert r.provenance["hot_start_method"] == r.provenance["settings"]["hot_start"] == "tv"


def test_cli_reconstruct_with_a_constant_ground_truth_says_there_is_no_psnr(tmp_path, capsys):
    """PSNR has no data range against a constant reference: the CLI says so instead of printing a made-up number."""
    m = load_sample("ct_sparse23")
    m.ground_truth = np.zeros_like(m.ground_truth)
    b = tmp_path / "flat_truth.npz"
    write_measurement(m, b)
    assert main(["reconstruct", str(b), "--method", "fbp", "-o", str(tmp_path / "fbp.npz")]) == 0
    assert "no PSNR/SSIM (the ground truth is constant)" in capsys.readouterr().out
    m.ground_truth = np.abs(load_sample("ct_sparse23").ground_truth) > 0.02  # a binary phantom: scored, no traceback
    write_measurement(m, tmp_path / "binary_truth.npz")
    assert main(["reconstruct", str(tmp_path / "binary_truth.npz"), "--method", "fbp",
                 "-o", str(tmp_path / "fbp_binary.npz")]) == 0
    assert "PSNR" in capsys.readouterr().out


def test_cli_priors_lists_the_shipped_priors_and_shows_one_card_in_full(tmp_path, capsys):
    """`priors` names every shipped prior with its modality default; `priors NAME` prints its whole card (training
    data, licence, the command that made it); an unknown name or a file that is not a card is refused with a reason."""
    from napari_diffrecon.priors import default_prior_for, list_priors

    assert main(["priors"]) == 0
    out = capsys.readouterr().out
    for name in list_priors():
        assert name in out
    assert f"{default_prior_for('ct')}  [default for CT (every other sampler)]" in out
    assert "unknown data" not in out
    assert main(["priors", "ct-phantom-128"]) == 0
    card = json.loads(capsys.readouterr().out)
    assert card["prior"] == "ct-phantom-128" and card["modality"] == "ct"
    assert card["licence"] and card["training_data"] and card["training_command"].startswith("napari-diffrecon train")
    assert main(["priors", "no-such-prior"]) == 2
    assert "shipped priors: " in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text('{"x": 1}')
    assert main(["priors", str(bad)]) == 2
    assert "is this a napari-diffrecon card" in capsys.readouterr().err
    assert main(["priors", str(tmp_path)]) == 2  # a folder: said so, no traceback
    assert "not a shipped prior's name nor a .json model card" in capsys.readouterr().err
    shipped = json.loads((WEIGHTS_DIR / "pet-phantom-128.json").read_text())
    odd = tmp_path / "odd.json"  # a user's card with a string training record
    odd.write_text(json.dumps({**shipped, "training": "trained by hand"}))
    assert main(["priors", str(odd)]) == 2
    assert "'training' must be an object" in capsys.readouterr().err
    sparse = tmp_path / "sparse.json"  # a user's card with little in it: nulls, not a crash
    sparse.write_text(json.dumps({**shipped, "training": {"data": {"sources": ["a", "b"]}, "weight_average": "x"}}))
    assert main(["priors", str(sparse)]) == 0
    card = json.loads(capsys.readouterr().out)
    assert card["training_source"] == "a, b" and card["licence"] is None and card["weights_averaged_with"] is None


def test_flags_a_run_reads_are_taken(tmp_path):
    """The other side of the refusals: each method's own flags and a hot start's parameters pass the check."""

    from napari_diffrecon.cli import _refuse_flags_the_method_ignores

    def args(**kw):
        base = dict(method="dds", hot_start=None, holdout=None, auto=None, adapt_steps=None, steps=None, eta=None,
                    gamma=None, zeta=None, cg_iters=None, snr=None, orientations=None, filter=None, iters=None,
                    lam=None, lam_rel=None, subsets=None, adapt_lr=None, lora_rank=None, adapt_every=None,
                    adapt_start=None, adapt_target=None, adapt_floor=None)
        return argparse.Namespace(**{**base, **kw})

    for kw, modality in ((dict(gamma=2, cg_iters=3, eta=0.5), "ct"), (dict(method="dps", zeta=1), "ct"),
                         (dict(method="song", lam=0.5, snr=0.1), "ct"), (dict(hot_start="tv", lam_rel=0.1), "ct"),
                         (dict(hot_start="fbp", filter="hann"), "ct"), (dict(subsets=4), "pet"),
                         (dict(adapt_steps=2, adapt_lr=1e-3), "ct"), (dict(auto="split", holdout=0.3), "ct"),
                         (dict(method="tv", lam_rel=0.1, iters=50), "ct"), (dict(method="osem", subsets=4), "pet")):
        _refuse_flags_the_method_ignores(args(**kw), argparse.Namespace(operator={"modality": modality}))  # no error


def test_exported_prior_weights_are_readable_by_others(tmp_path):
    """safetensors writes 0600: a prior exported to share was readable by its owner only."""
    import os
    import stat

    from napari_diffrecon.priors import load_prior
    from napari_diffrecon.priors.prior import save_prior

    old = os.umask(0o022)
    try:
        w, c = save_prior(load_prior("pet-phantom-128"), tmp_path / "p", half=True)
    finally:
        os.umask(old)
    assert stat.S_IMODE(w.stat().st_mode) == 0o644 == stat.S_IMODE(c.stat().st_mode)


def test_auto_discrepancy_on_counts_is_refused_before_the_search():
    """It ran most of the search, then said the discrepancy principle needs Gaussian noise."""
    from napari_diffrecon.io import load_sample
    from napari_diffrecon.reconstruct import RunSettings
    from napari_diffrecon.tuning import auto_tune

    calls = []
    with pytest.raises(ValueError, match="needs Gaussian noise of known σ"):
        auto_tune(load_sample("pet_lowcount"), RunSettings(method="dds"), criterion="discrepancy",
                  progress=lambda *a: calls.append(a))
    assert calls == []


def test_a_colour_npy_is_refused_with_how_to_make_it_grey(tmp_path, capsys):
    """(64, 64, 3) read as 64 slices of 64×3: the middle 'slice', a 64×3 strip, was padded into an image."""
    p = tmp_path / "rgb.npy"
    np.save(p, np.random.default_rng(0).random((64, 64, 3)).astype(np.float32))
    assert main(["simulate", str(p), "--modality", "ct", "-o", str(tmp_path / "s.npz")]) == 2
    err = capsys.readouterr().err
    assert "64×3 pixels" in err and "arr.mean(-1)" in err and not (tmp_path / "s.npz").exists()


def test_python_runs_start_from_the_tuned_values_like_the_cli():
    """RunSettings(method="dds") ran with SamplerParams()'s generic values (exact DDIM re-noise, one orientation),
    not the benchmark-tuned ones the CLI and the workbench start from."""
    from napari_diffrecon.io import load_sample
    from napari_diffrecon.reconstruct import RunSettings, data_kind, reconstruct, resolve_settings
    from napari_diffrecon.samplers import SamplerParams
    from napari_diffrecon.samplers.defaults import recommended_params

    m = load_sample("ct_sparse23")
    modality, coils, noisy = data_kind(m)
    tuned = recommended_params("dds", modality, True, coils=coils, noisy=noisy)
    s = resolve_settings(RunSettings(method="dds", hot_start="auto"), m)
    assert s.hot_start == "tv" and s.params == tuned and s.params != SamplerParams()
    explicit = SamplerParams(n_steps=3)
    assert resolve_settings(RunSettings(params=explicit), m).params is explicit  # the live object, kept
    assert RunSettings.from_dict(RunSettings().to_dict()).params is None
    res = reconstruct(m, RunSettings(method="dds", hot_start="auto"))
    assert res.provenance["settings"]["params"] == tuned.to_dict()


def test_exporting_ct_without_an_intensity_mapping_says_it_is_not_in_hu(tmp_path, capsys):
    """A bundle made with numpy alone (README) declares no HU mapping: its export held attenuation values, silently."""
    from skimage.transform import radon

    image = np.zeros((32, 32))
    image[10:22, 12:20] = 0.02
    theta = np.linspace(0, 180, 24, endpoint=False)
    np.savez(tmp_path / "mine.npz", measurement=radon(image, theta=theta, circle=True),
             operator=json.dumps({"modality": "ct", "image_shape": [32, 32], "angles_deg": theta.tolist()}))
    assert main(["reconstruct", str(tmp_path / "mine.npz"), "--method", "fbp", "-o", str(tmp_path / "r.npz")]) == 0
    capsys.readouterr()
    assert main(["export", str(tmp_path / "r.npz"), "-o", str(tmp_path / "r.nii.gz")]) == 0
    assert "not Hounsfield units" in capsys.readouterr().out
    from napari_diffrecon.io import DATA_DIR

    sample = str(DATA_DIR / "ct_sparse23.npz")
    assert main(["reconstruct", sample, "--method", "fbp", "-o", str(tmp_path / "s.npz")]) == 0
    capsys.readouterr()
    assert main(["export", str(tmp_path / "s.npz"), "-o", str(tmp_path / "s.nii.gz")]) == 0
    assert "Hounsfield" not in capsys.readouterr().out  # the sample maps to HU


def test_holdout_goes_with_auto_when_auto_splits_and_subsets_with_the_em_data_step(tmp_path, capsys):
    """A plain --auto that picks splitting (counts) takes --holdout; --subsets is PET's (OSEM or DDS's EM step)."""
    from napari_diffrecon.cli import _refuse_flags_the_method_ignores
    from napari_diffrecon.io import load_sample

    pet, ct = load_sample("pet_lowcount"), load_sample("ct_sparse23")
    base = dict(hot_start=None, adapt_steps=None, steps=None, eta=None, gamma=None, zeta=None, cg_iters=None,
                snr=None, orientations=None, filter=None, iters=None, lam=None, lam_rel=None, subsets=None,
                adapt_lr=None, lora_rank=None, adapt_every=None, adapt_start=None, adapt_target=None, adapt_floor=None)
    ns = lambda **kw: argparse.Namespace(**{**base, **kw})  # noqa: E731
    _refuse_flags_the_method_ignores(ns(method="dds", auto="auto", holdout=0.3), pet)  # auto splits counts
    _refuse_flags_the_method_ignores(ns(method="dds", auto=None, holdout=None, subsets=4), pet)
    with pytest.raises(ValueError, match="--subsets applies to a hot start from OSEM"):  # DPS has no EM data step
        _refuse_flags_the_method_ignores(ns(method="dps", auto=None, holdout=None, subsets=4), pet)
    with pytest.raises(ValueError, match="--subsets applies to PET data"):
        _refuse_flags_the_method_ignores(ns(method="dds", auto=None, holdout=None, subsets=4), ct)


def test_the_help_names_the_shipped_samples(capsys):
    """A new user had no pointer to the sample measurements."""
    from napari_diffrecon.io import DATA_DIR, SAMPLES

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(str(DATA_DIR / f"{key}.npz") in out and (DATA_DIR / f"{key}.npz").exists() for key in SAMPLES)


def test_info_describes_the_demo_s_comparison_file(tmp_path, capsys):
    """`info` on the demo's output said it lacks the 'measurement' array."""
    p = tmp_path / "demo_reconstruction.npz"
    np.savez(p, ground_truth=np.zeros((8, 8), np.float32), reconstruction_fbp=np.zeros((8, 8), np.float32),
             reconstruction_dds=np.zeros((8, 8), np.float32), provenance=np.array("{}"))
    assert main(["info", str(p)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["demo_comparison"]) == {"ground_truth", "reconstruction_fbp", "reconstruction_dds"}


def test_a_ct_image_in_hu_reads_as_hu_from_every_format_and_other_units_are_said_to_be_assumed(tmp_path, capsys):
    """NIfTI / TIFF / .npy declare no intensity units; their readers said 'arbitrary', which turned off the
    below −500 → HU rule, so a CT in HU was stretched between its percentiles (0 HU became +120) and PET skipped the
    tissue-uptake model. An image in other units gets an assumed mapping, now said and recorded."""
    import nibabel as nib
    import tifffile
    from pydicom.data import get_testdata_file

    dcm = get_testdata_file("CT_small.dcm")
    hu = read_image(dcm)[0].astype(np.int16)
    assert hu.min() < -500
    nib.save(nib.Nifti1Image(hu.T.copy(), np.eye(4)), tmp_path / "ct_hu.nii.gz")  # (x, y): the readers' order
    np.save(tmp_path / "ct_hu.npy", hu)
    tifffile.imwrite(tmp_path / "ct_hu.tif", hu)
    args = ["--modality", "ct", "--views", "23", "--size", "64"]
    assert main(["simulate", dcm, *args, "-o", str(tmp_path / "dcm.npz")]) == 0
    ref = read_measurement(tmp_path / "dcm.npz")
    for name in ("ct_hu.nii.gz", "ct_hu.npy", "ct_hu.tif"):
        out = tmp_path / f"{name.split('.')[0]}_{name.split('.')[-1]}.npz"
        capsys.readouterr()
        assert main(["simulate", str(tmp_path / name), *args, "-o", str(out)]) == 0, name
        assert "note:" not in capsys.readouterr().out, name
        m = read_measurement(out)
        assert m.metadata["options"]["units"] == "HU" and "assumed" not in m.metadata["intensity"], name
        # the same attenuation image as the DICOM's up to the pixel size: the ground truths agree in shape
        assert np.corrcoef(m.ground_truth.ravel(), ref.ground_truth.ravel())[0, 1] > 0.99, name
    # an image in other units: the mapping to air … bone is assumed, said on the command line and recorded
    tifffile.imwrite(tmp_path / "u16.tif", ((hu - hu.min()) * 10).astype(np.uint16))
    capsys.readouterr()
    assert main(["simulate", str(tmp_path / "u16.tif"), *args, "-o", str(tmp_path / "u16.npz")]) == 0
    assert "note: the image declared no Hounsfield units" in capsys.readouterr().out
    m = read_measurement(tmp_path / "u16.npz")
    assert m.metadata["options"]["units"] == "arbitrary" and "mapping's, not a scanner's" in m.metadata["intensity"][
        "assumed"]
    # a volume: which slice was used is said and recorded
    np.save(tmp_path / "vol.npy", np.stack([hu, hu, hu]))
    capsys.readouterr()
    assert main(["simulate", str(tmp_path / "vol.npy"), *args, "-o", str(tmp_path / "vol.npz")]) == 0
    assert "slice 1 of 0–2 (--slice picks another)" in capsys.readouterr().out
    assert read_measurement(tmp_path / "vol.npz").metadata["source"].endswith("(slice 1 of 0–2)")


def test_an_unwritable_output_folder_is_refused_before_the_run_and_a_failed_write_is_one_line(tmp_path, capsys,
                                                                                              monkeypatch):
    """A read-only output folder gave a traceback after the whole run (nothing checked it first); a disk that
    fills up during the write gave a traceback too."""
    from pathlib import Path

    import napari_diffrecon.io.bundle as bundle_mod

    b = _ct23_bundle(tmp_path / "ct.npz")
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(bundle_mod.os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    ran = []
    monkeypatch.setattr("napari_diffrecon.reconstruct.reconstruct", lambda *a, **k: ran.append(1))
    capsys.readouterr()
    assert main(["reconstruct", str(b), "--method", "fbp", "-o", str(locked / "sub" / "r.npz")]) == 2
    err = capsys.readouterr().err
    assert f"cannot write into {locked}" in err and "Traceback" not in err and not ran
    monkeypatch.undo()

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device", str(tmp_path / "r.npz"))

    monkeypatch.setattr("napari_diffrecon.io.write_result", full_disk)
    assert main(["reconstruct", str(b), "--method", "fbp", "-o", str(tmp_path / "r.npz")]) == 1
    err = capsys.readouterr().err
    assert err.strip() == f"error: No space left on device: {tmp_path / 'r.npz'}"


def test_python_warnings_print_as_one_line_each(tmp_path, capsys):
    """Angles in radians gave Python's warning with its source line, once per operator built. The command does
    that; `main` from Python leaves the warning machinery alone (pytest.warns still sees them)."""
    import dataclasses
    import warnings

    from napari_diffrecon.cli import console_main

    m = load_sample("ct_sparse23")
    op = {**m.operator, "angles_deg": [float(a) for a in np.deg2rad(np.asarray(m.operator["angles_deg"], float))]}
    b = write_measurement(dataclasses.replace(m, operator=op), tmp_path / "radians.npz")
    capsys.readouterr()
    handler = warnings.showwarning
    assert console_main(["reconstruct", str(b), "--method", "fbp", "-o", str(tmp_path / "r.npz")]) == 0
    err = capsys.readouterr().err
    assert err.count("warning: angles_deg spans less than 2π: are these radians?") == 1, err
    assert "UserWarning" not in err and "return ParallelBeamCT" not in err, err
    assert warnings.showwarning is handler  # put back
    with pytest.warns(UserWarning, match="radians"):
        assert main(["reconstruct", str(b), "--method", "fbp", "-o", str(tmp_path / "r2.npz")]) == 0


def test_tiff_pixel_spacing_is_read_in_metric_units_only(tmp_path):
    """TIFF resolution tags were ignored (a 350 mm field of view was assumed); an inch unit is an editor's dpi."""
    import tifffile

    img = np.random.default_rng(0).uniform(0, 1, (40, 50)).astype(np.float32)
    tifffile.imwrite(tmp_path / "mm.tif", img, resolution=(1 / 0.5, 1 / 0.8), resolutionunit="MILLIMETER")
    tifffile.imwrite(tmp_path / "cm.tif", img, resolution=(20.0, 10.0), resolutionunit="CENTIMETER")  # px per cm
    tifffile.imwrite(tmp_path / "ij.tif", img, imagej=True, resolution=(1 / 0.25, 1 / 0.25), metadata={"unit": "mm"})
    tifffile.imwrite(tmp_path / "dpi.tif", img, resolution=(72.0, 72.0), resolutionunit="INCH")
    tifffile.imwrite(tmp_path / "dpcm.tif", img, resolution=(72 / 2.54, 72 / 2.54), resolutionunit="CENTIMETER")
    assert "pixel_spacing_mm" not in read_image(tmp_path / "dpcm.tif")[1]  # an editor's 72 dpi, in cm
    assert read_image(tmp_path / "mm.tif")[1]["pixel_spacing_mm"] == pytest.approx([0.8, 0.5])  # (row, column)
    assert read_image(tmp_path / "cm.tif")[1]["pixel_spacing_mm"] == pytest.approx([1.0, 0.5])
    assert read_image(tmp_path / "ij.tif")[1]["pixel_spacing_mm"] == pytest.approx([0.25, 0.25])
    assert "pixel_spacing_mm" not in read_image(tmp_path / "dpi.tif")[1]
    # this package's own TIFF export reads back at its pixel size
    from napari_diffrecon.io import export_image

    export_image(tmp_path / "ours.tif", img, {"kind": "test"}, spacing=[0.7, 0.6])
    assert read_image(tmp_path / "ours.tif")[1]["pixel_spacing_mm"] == pytest.approx([0.7, 0.6])


def test_a_folder_that_writing_creates_is_named(tmp_path, capsys):
    """Missing output folders were created without a word (a typo made a stray tree)."""
    b = _ct23_bundle(tmp_path / "ct.npz")
    capsys.readouterr()
    out = tmp_path / "new" / "deeper" / "r.npz"
    assert main(["reconstruct", str(b), "--method", "fbp", "-o", str(out)]) == 0
    assert f"wrote {out} (created the folder {tmp_path / 'new'})" in capsys.readouterr().out
    assert main(["reconstruct", str(b), "--method", "fbp", "-o", str(out.with_name("again.npz"))]) == 0
    assert "created the folder" not in capsys.readouterr().out  # it exists now


def test_simulate_volume_makes_a_study_from_a_3d_image(tmp_path, capsys):
    """A user's 3D image could become a volume study only from Python (simulate_study); `simulate --volume` makes
    one from the command line: every slice resized as a 2D simulation is, the slice spacing kept, HU recognised."""
    import nibabel as nib

    from napari_diffrecon.volume import read_volume_study

    rng = np.random.default_rng(0)
    hu = np.full((40, 30, 4), -1000.0, np.float32)  # (x, y, z): a body of soft tissue in air, 4 slices
    hu[8:32, 5:25] = rng.normal(40, 20, (24, 20, 4))
    nib.save(nib.Nifti1Image(hu, np.diag([0.8, 0.8, 3.0, 1.0])), tmp_path / "vol.nii.gz")
    out = tmp_path / "study.npz"
    assert main(["simulate", str(tmp_path / "vol.nii.gz"), "--volume", "--modality", "ct", "--views", "23",
                 "--size", "32", "-o", str(out)]) == 0
    said = capsys.readouterr().out
    assert "CT volume study, 4 slices of 32²" in said and "--volume --method mbir" in said
    assert "note:" not in said  # HU: no assumed mapping
    st = read_volume_study(out)
    assert st.n_slices == 4 and st.modality == "ct" and st.ground_truth.shape == (4, 32, 32)
    assert st.metadata["intensity"]["axes_ras"]["x"] == [1.0, 0.0, 0.0]  # the orientation travels to its results
    np.testing.assert_allclose(st.spacing_mm, (3.0, 40 * 0.8 / 32, 40 * 0.8 / 32), rtol=1e-5)
    assert main(["simulate", str(tmp_path / "vol.nii.gz"), "--volume", "--modality", "mri", "--coils", "4",
                 "--size", "32", "-o", str(tmp_path / "mri.npz")]) == 0
    assert read_volume_study(tmp_path / "mri.npz").modality == "mri"
    # refused: a 2D-only option, a single slice
    assert main(["simulate", str(tmp_path / "vol.nii.gz"), "--volume", "--modality", "ct", "--photons", "1e4",
                 "-o", str(tmp_path / "x.npz")]) == 2
    assert "--photons applies to 2D simulations" in capsys.readouterr().err
    np.save(tmp_path / "one.npy", hu[..., 0].T)
    assert main(["simulate", str(tmp_path / "one.npy"), "--volume", "--modality", "ct", "-o",
                 str(tmp_path / "y.npz")]) == 2
    assert "a volume study needs several" in capsys.readouterr().err and not (tmp_path / "y.npz").exists()
