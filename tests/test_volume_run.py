"""Volume runs: study files, input checks with their fixes, slabs, streaming, provenance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_diffrecon.priors import GaussianPrior
from napari_diffrecon.volume import (
    VolumeInputError,
    VolumeMemoryError,
    VolumeParams,
    check_folder,
    check_study,
    plan_slabs,
    read_volume_study,
    reconstruct_volume,
    simulate_ct_study,
    stream_volume,
    write_volume_study,
)

torch.set_num_threads(1)


def _vol(d=6, n=32, level=1.0):
    v = np.zeros((d, n, n), np.float32)
    v[:, 8:24, 10:22] = level
    v[: d // 2, 14:18, 14:18] = 0.5 * level
    return v


def test_study_round_trip_and_validation(tmp_path):
    st = simulate_ct_study(_vol(), 8, 0.02, spacing_mm=(2.0, 1.0, 1.0), study_id="s1")
    p = write_volume_study(st, tmp_path / "s1.npz")
    back = read_volume_study(p)
    assert back.name == "s1" and back.spacing_mm == (2.0, 1.0, 1.0) and back.orientation == "axial"
    np.testing.assert_array_equal(back.data, st.data)
    np.testing.assert_array_equal(back.ground_truth, st.ground_truth)
    assert back.build_operator().data_shape == st.data.shape
    with pytest.raises(FileExistsError):
        write_volume_study(st, p)
    bad = simulate_ct_study(_vol(), 8)
    bad.data = bad.data[:, :, :5]
    write_volume_study(bad, tmp_path / "bad.npz")
    with pytest.raises(VolumeInputError, match="not \\(n_slices, \\*slice data shape\\)"):
        read_volume_study(tmp_path / "bad.npz")
    np.savez(tmp_path / "plain.npz", measurement=np.zeros((4, 4)))
    with pytest.raises(VolumeInputError, match="not a volume study"):
        read_volume_study(tmp_path / "plain.npz")


def test_spacing_and_orientation_checks_name_the_fix():
    st = simulate_ct_study(_vol(), 8, spacing_mm=None)
    with pytest.raises(VolumeInputError, match="assume_spacing"):
        check_study(st)
    assert check_study(st, assume_spacing=(1, 1, 1))["ztv_scale"] == 1.0
    st.spacing_mm = (1.0, 0.5, 1.0)
    with pytest.raises(VolumeInputError, match="square pixels"):
        check_study(st)
    st.spacing_mm = (5.0, 1.0, 1.0)
    with pytest.raises(VolumeInputError, match="ztv=0.*allow_anisotropic"):
        check_study(st, ztv=0.05)
    assert check_study(st, ztv=0.0)["ztv_scale"] == 1.0  # slice by slice: thickness does not matter
    assert check_study(st, ztv=0.05, allow_anisotropic=True)["ztv_scale"] == pytest.approx(0.2)
    st.spacing_mm = (2.0, 1.0, 1.0)
    assert check_study(st, ztv=0.05)["ztv_scale"] == pytest.approx(0.5)
    st.orientation = "coronal"
    with pytest.raises(VolumeInputError, match="coronal.*reorder the stack"):
        check_study(st)


def test_folder_checks_list_every_problem_and_mixed_kinds(tmp_path):
    write_volume_study(simulate_ct_study(_vol(), 8, study_id="a"), tmp_path / "a.npz")
    write_volume_study(simulate_ct_study(_vol(n=48), 8, study_id="b"), tmp_path / "b.npz")
    with pytest.raises(VolumeInputError, match="mixes studies.*allow_mixed"):
        check_folder(tmp_path)
    assert len(check_folder(tmp_path, allow_mixed=True)) == 2
    write_volume_study(simulate_ct_study(_vol(), 8, spacing_mm=None, study_id="c"), tmp_path / "c.npz")
    write_volume_study(simulate_ct_study(_vol(), 8, study_id="a"), tmp_path / "d.npz")
    with pytest.raises(VolumeInputError) as err:
        check_folder(tmp_path, allow_mixed=True)
    msg = str(err.value)
    assert "2 of the studies" in msg and "no voxel spacing" in msg and "also used by a.npz" in msg
    with pytest.raises(VolumeInputError, match="not a folder of studies"):
        check_folder(tmp_path / "a.npz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VolumeInputError, match="no volume studies"):
        check_folder(tmp_path / "empty")


def test_plan_slabs_cover_every_slice_once():
    for n, k, h in [(10, 4, 1), (7, 3, 0), (9, 9, 2), (5, 8, 1)]:
        slabs = plan_slabs(n, k, h)
        cover = np.zeros(n, int)
        for s in slabs:
            cover[s.core_start : s.core_stop] += 1
            assert s.stop - s.start <= max(k, 1) or len(slabs) == 1
            assert s.start <= s.core_start < s.core_stop <= s.stop
        assert (cover == 1).all()
    with pytest.raises(VolumeMemoryError, match="no core"):
        plan_slabs(10, 4, 2)


def test_slabs_without_ztv_equal_the_whole_volume_and_stream():
    st = simulate_ct_study(_vol(d=7), 8, 0.02)
    prior = GaussianPrior(0.5)
    params = VolumeParams(n_steps=5, ztv=0.0)
    whole = reconstruct_volume(st, prior, params, memory_budget="1GB")
    ups = []
    slabbed = reconstruct_volume(st, prior, params, memory_budget="1GB", slab_slices=3, callback=ups.append)
    np.testing.assert_allclose(slabbed.reconstruction, whole.reconstruction, rtol=1e-5, atol=1e-5)
    # streaming: the estimate grows slab by slab, the done mask only grows, the last update says finished
    done_counts = [int(u.done.sum()) for u in ups]
    assert done_counts == sorted(done_counts) and done_counts[-1] == 7 and ups[-1].finished
    assert sum(u.finished for u in ups) == 1 and len({u.slab for u in ups}) == 3
    prov = slabbed.provenance
    assert prov["n_slices"] == 7 and len(prov["slabs"]) == 3 and prov["params"]["ztv"] == 0.0
    assert prov["software"] == "napari-diffrecon" and prov["intensity_mapping"]["scale"] > 0
    assert slabbed.residual < 0.1


def test_stream_runs_the_focus_slab_first_and_refuses_oversized_volumes():
    st = simulate_ct_study(_vol(d=9), 8, 0.02)
    params = VolumeParams(n_steps=2, ztv=0.05)
    params.extra["focus_slice"] = 8  # the viewer's slider is on the last slice
    first = next(iter(stream_volume(st, GaussianPrior(0.5), params, memory_budget="1GB", slab_slices=5, halo=1)))
    assert first.slab.core_start <= 8 < first.slab.core_stop
    from napari_diffrecon.volume import plan_memory

    budget = int(plan_memory(st.build_operator(), GaussianPrior(0.5), "1GB").peak * 0.6)
    with pytest.raises(VolumeMemoryError, match="slab_slices="):
        next(iter(stream_volume(st, GaussianPrior(0.5), params, memory_budget=budget)))
    # "auto" picks slabs that fit the same budget
    res = reconstruct_volume(st, GaussianPrior(0.5), params, memory_budget=budget, slab_slices="auto")
    assert len(res.provenance["slabs"]) > 1
    assert all(r["memory_plan"]["peak"] <= budget for r in res.slab_info)


def test_cli_glue_selects_the_volume_path_and_checks_the_method(tmp_path):
    import argparse

    from napari_diffrecon.distributed import add_volume_arguments, run_from_args, wants_volume

    p = argparse.ArgumentParser()
    p.add_argument("bundle")
    p.add_argument("--method")
    p.add_argument("-o", "--output")
    add_volume_arguments(p)
    assert wants_volume(p.parse_args([str(tmp_path)]))  # a folder
    assert wants_volume(p.parse_args(["x.npz", "--volume"]))
    assert not wants_volume(p.parse_args(["x.npz"]))
    a = p.parse_args([str(tmp_path), "--method", "dds", "-o", str(tmp_path / "out")])
    with pytest.raises(ValueError, match="--method mbir"):
        run_from_args(a)


def test_volume_runs_evaluate_the_prior_in_float32():
    """A prior object shared with 2D runs (the GUI's cache) may carry precision "bfloat16" from one of them;
    a volume run resets it: its memory plan and README promise float32."""
    from napari_diffrecon.priors import ModelCard, NetworkPrior
    from napari_diffrecon.priors.network import build_network

    torch.manual_seed(0)
    card = ModelCard(name="tiny-vol", modality="ct", channels=1, resolution=32,
                     architecture={"type": "diffusers.UNet2DModel", "preset": "tiny"})
    prior = NetworkPrior(build_network({**card.architecture, "channels": 1}), card)
    st = simulate_ct_study(_vol(d=3), 8, 0.02)
    params = VolumeParams(n_steps=2, ztv=0.0)
    ref = reconstruct_volume(st, prior, params, memory_budget="1GB")
    prior.precision = "bfloat16"
    again = reconstruct_volume(st, prior, params, memory_budget="1GB")
    assert prior.precision == "float32"
    np.testing.assert_array_equal(again.reconstruction, ref.reconstruction)


def test_volume_defaults_are_the_modalitys_2d_dds_step_for_cli_gui_and_api(tmp_path, monkeypatch):
    from napari_diffrecon import distributed
    from napari_diffrecon.samplers.defaults import recommended_params
    from napari_diffrecon.volume import recommended_volume_params, simulate_mri_study, write_volume_study

    for modality in ("ct", "mri", "pet"):
        v, d = recommended_volume_params(modality), recommended_params("dds", modality)
        assert (v.gamma, v.eta, v.cg_iters, v.n_steps, v.renoise) == (d.gamma, d.eta, d.cg_iters, d.n_steps, "dds")
    # z-TV weights by modality, chosen on the real EPI volume (benchmarks/results/volume_quality*.json)
    assert [recommended_volume_params(m).ztv for m in ("ct", "mri", "pet", "*")] == [0.01, 0.03, 0.02, 0.01]
    assert recommended_volume_params("mri", ztv=0.0).ztv == 0.0  # a given weight wins, 0 = slice by slice
    assert recommended_volume_params("mri").gamma == 2.0 and recommended_volume_params("pet").gamma == 5.0
    assert recommended_volume_params("mri", gamma=None, n_steps=7).n_steps == 7  # unset CLI options are ignored
    # the CLI's folder path: an MRI study without --gamma gets MRI's γ; an explicit option wins (run replaced by a spy)
    vol = np.random.default_rng(0).random((3, 16, 16)).astype(np.float32)
    write_volume_study(simulate_mri_study(vol, acceleration=2.0, seed=0, study_id="s"), tmp_path / "s.npz")
    seen = []

    def spy(folder, out, prior, params, **kw):
        seen.append(params)
        raise KeyboardInterrupt  # stop before any work

    monkeypatch.setattr(distributed, "reconstruct_folder", spy)
    argv = [str(tmp_path / "s.npz"), "-o", str(tmp_path / "out"), "--prior", "mri-brain-128", "--ztv", "0.02"]
    for extra in ([], ["--gamma", "3"], ["--prior-weight", "2"], ["--renoise", "ddim"]):
        with pytest.raises(KeyboardInterrupt):
            distributed.main(argv + extra)
    for modality in ("ct", "mri", "pet"):  # per modality (mixed folders run each study with its own)
        assert seen[0][modality].to_dict() == recommended_volume_params(modality, ztv=0.02).to_dict()
        assert seen[1][modality].gamma == 3.0 and seen[1][modality].eta == seen[0][modality].eta
        assert seen[2][modality].prior_weight == 2.0 and seen[0][modality].prior_weight == 1.0
        assert seen[3][modality].renoise == "ddim" and seen[0][modality].renoise == "dds"
    with pytest.raises(KeyboardInterrupt):  # without --ztv each modality takes its own z-TV weight
        distributed.main([x for x in argv if x not in ("--ztv", "0.02")])
    assert {m: seen[4][m].ztv for m in ("ct", "mri", "pet")} == {"ct": 0.01, "mri": 0.03, "pet": 0.02}


def test_cli_folder_of_unreadable_studies_lists_every_one(tmp_path):
    from napari_diffrecon import distributed
    from napari_diffrecon.volume import VolumeInputError

    for name in ("a.npz", "b.npz"):
        (tmp_path / name).write_bytes(b"not a study")
    with pytest.raises(VolumeInputError, match=r"2 of the studies") as e:
        distributed.main([str(tmp_path), "-o", str(tmp_path / "out")])
    assert "a.npz" in str(e.value) and "b.npz" in str(e.value)


def test_cli_volume_run_over_its_memory_budget_is_an_error_not_a_traceback(tmp_path, capsys):
    """A budget the volume cannot fit, or a slab of 0 slices, ends in `error:` naming what would fit (exit 2);
    `info` summarises a volume study, and the 2D path names it as one (it said the data shape did not match)."""
    from napari_diffrecon.cli import main
    from napari_diffrecon.volume import simulate_ct_study, write_volume_study

    vol = np.zeros((4, 32, 32), np.float32)
    vol[:, 8:24, 8:24] = 0.02
    path = write_volume_study(simulate_ct_study(vol, 12, spacing_mm=(2.0, 1.0, 1.0)), tmp_path / "v.npz")
    assert main(["info", str(path)]) == 0  # a volume study is summarised as one
    assert '"volume_study": "4 slices"' in capsys.readouterr().out
    assert main(["reconstruct", str(path), "--method", "dds", "-o", str(tmp_path / "r.npz")]) == 2  # 2D path
    err = capsys.readouterr().err
    assert "is a volume study (4 slices)" in err and "--volume" in err
    # (--workers 0 used to wait forever for a worker)
    for i, extra in enumerate((["--memory-budget", "1MB"], ["--slab", "0"], ["--workers", "0"], ["--retries", "-1"],
                               ["--threads-per-worker", "0"], ["--zeta", "2"], ["--auto"], ["--keep-samples"],
                               # refused here, not by every worker in turn after a cluster started (exit 1)
                               ["--steps", "0"], ["--eta", "5"], ["--ztv", "-1"], ["--rho", "0"], ["--halo", "-1"],
                               ["--samples", "0"], ["--prior", "mri-brain-128"])):
        code = main(["reconstruct", str(path), "--volume", "--method", "mbir", "--steps", "2", *extra,
                     "-o", str(tmp_path / f"out{i}")])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error:") and "Traceback" not in err, (extra, err)
        assert not (tmp_path / f"out{i}").exists()  # a refused run leaves no output folder behind
    # a finished run: the provenance names the user's file (not the link in the output folder); other settings
    # into the same folder are refused unless --force
    run = ["reconstruct", str(path), "--volume", "--method", "mbir", "--steps", "2", "-o", str(tmp_path / "o")]
    assert main(run) == 0
    import json

    with np.load(tmp_path / "o" / "v.npz") as z:
        assert json.loads(str(z["provenance"]))["measurement_file"] == str(path.resolve())
    capsys.readouterr()
    assert main([*run, "--ztv", "0.2"]) == 2 and "pass --force" in capsys.readouterr().err
    assert main([*run, "--ztv", "0.2", "--force"]) == 0 and "recomputed (--force)" in capsys.readouterr().out


def test_an_exported_volume_result_has_the_study_s_voxel_size_and_one_sample_s_std_is_refused(tmp_path):
    """A volume result exported at 1 mm voxels whatever the study's (its provenance held no spacing), and the
    all-zero std of a one-sample volume run was exported without a word (2D runs refuse it)."""
    import nibabel as nib

    from napari_diffrecon.io import write_result
    from napari_diffrecon.io.export import export_result

    st = simulate_ct_study(_vol(d=4, n=32), n_views=30, spacing_mm=(2.5, 1.2, 1.2))
    res = reconstruct_volume(st, GaussianPrior(), VolumeParams(n_steps=2))
    assert res.provenance["spacing_mm"] == [2.5, 1.2, 1.2]
    r = write_result(tmp_path / "vol.npz", res.arrays() if "std" in res.arrays() else {**res.arrays(), "std": res.std},
                     {**res.provenance, "n_samples": 1})
    out = export_result(r, tmp_path / "vol.nii.gz")
    np.testing.assert_allclose(nib.load(out).header.get_zooms()[:3], (1.2, 1.2, 2.5), rtol=1e-5)  # (x, y, z)
    with pytest.raises(ValueError, match="one posterior sample"):
        export_result(r, tmp_path / "std.nii.gz", field="std")
