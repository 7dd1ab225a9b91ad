"""Scale-out on a real dask.distributed LocalCluster (2 worker processes): retries, failure reports, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

distributed = pytest.importorskip("distributed")

from napari_diffrecon.distributed import FolderReport, main, reconstruct_folder  # noqa: E402
from napari_diffrecon.priors import GaussianPrior  # noqa: E402
from napari_diffrecon.volume import (  # noqa: E402
    VolumeInputError,
    VolumeMemoryError,
    VolumeParams,
    reconstruct_volume,
    simulate_ct_study,
    write_volume_study,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def client():
    """Two single-threaded worker processes (falls back to threads where processes cannot start)."""
    try:
        cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    except Exception:  # pragma: no cover - sandboxes without process spawning
        cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None)
    with cluster, distributed.Client(cluster) as c:
        yield c


def _folder(path, names="abc", d=4, n=32):
    path.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        v = np.zeros((d, n, n), np.float32)
        v[:, 8:24, 10:22] = 1.0 + 0.2 * i
        write_volume_study(simulate_ct_study(v, 8, 0.02, study_id=name, seed=i), path / f"{name}.npz")
    return path


def test_folder_retries_reports_failures_and_resumes(tmp_path, client):
    src, out = _folder(tmp_path / "in"), tmp_path / "out"
    params = VolumeParams(n_steps=3, ztv=0.05)
    seen = []
    rep = reconstruct_folder(
        src, out, GaussianPrior(0.5), params, client=client, slab_slices=3, halo=1, retries=1,
        inject_faults={"a:0": 1, "c:1": 5}, on_chunk=lambda sid, info: seen.append((sid, info["slab"]["start"])),
    )
    assert isinstance(rep, FolderReport) and rep.n_workers == 2
    assert rep.studies["a"]["status"] == "done" and rep.studies["b"]["status"] == "done"
    assert rep.failed == ["c"] and not rep.ok
    # the flaky slab of "a" was retried and succeeded on its second attempt
    assert rep.studies["a"]["chunks"][0]["attempts"] == 2
    # the broken slab of "c" is reported with its error and attempts, never dropped
    failed = json.loads((out / "c.failed.json").read_text())
    assert failed["failed_slabs"][0]["slab"] == 1 and failed["failed_slabs"][0]["attempts"] == 2
    assert "InjectedFaultError" in failed["failed_slabs"][0]["error"] and "how_to_resume" in failed
    assert not (out / "c.npz").exists() and "c" in json.loads((out / "report.json").read_text())["failed"]
    # per-study outputs with provenance
    with np.load(out / "a.npz", allow_pickle=False) as z:
        assert z["reconstruction"].shape == (4, 32, 32)
        prov = json.loads(str(z["provenance"]))
    assert prov == json.loads((out / "a.json").read_text())
    assert prov["study"] == "a" and prov["measurement_sha256"] and prov["settings_key"]
    assert prov["params"]["ztv"] == 0.05 and prov["dask_version"] == distributed.__version__
    assert {c["worker"] for c in prov["chunks"].values()} <= set(client.nthreads())
    assert prov["data_residual"] < 0.1
    assert len([s for s in seen if s[0] == "a"]) == len(prov["slabs"])
    # a rerun skips finished studies and reuses the finished slabs of the failed one
    done_before = set(rep.studies["c"]["chunks"]) - {1}
    rep2 = reconstruct_folder(src, out, GaussianPrior(0.5), params, client=client, slab_slices=3, halo=1)
    assert rep2.studies["a"]["status"] == "skipped" and rep2.studies["b"]["status"] == "skipped"
    assert rep2.studies["c"]["status"] == "done" and rep2.ok
    assert {i for i, c in rep2.studies["c"]["chunks"].items() if c["status"] == "resumed"} == done_before
    assert (out / "c.npz").exists() and not (out / "c.failed.json").exists()
    # other settings into the same folder: refused, not overwritten
    with pytest.raises(FileExistsError, match="other settings"):
        reconstruct_folder(src, out, GaussianPrior(0.5), VolumeParams(n_steps=3, ztv=0.1), client=client)


def test_cluster_slabs_equal_in_process_volume(tmp_path, client):
    src = _folder(tmp_path / "in", names="a", d=5)
    params = VolumeParams(n_steps=3, ztv=0.0)
    reconstruct_folder(src, tmp_path / "out", GaussianPrior(0.5), params, client=client, slab_slices=2, seed=3)
    from napari_diffrecon.volume import read_volume_study

    ref = reconstruct_volume(read_volume_study(src / "a.npz"), GaussianPrior(0.5), params, seed=3,
                             memory_budget="1GB")
    with np.load(tmp_path / "out" / "a.npz", allow_pickle=False) as z:
        np.testing.assert_allclose(z["reconstruction"], ref.reconstruction, rtol=1e-5, atol=1e-5)


def test_bad_folders_are_refused_before_any_work(tmp_path, client):
    src = _folder(tmp_path / "in", names="ab")
    v = np.ones((4, 48, 48), np.float32)
    write_volume_study(simulate_ct_study(v, 8, study_id="big"), src / "big.npz")
    with pytest.raises(VolumeInputError, match="mixes studies"):
        reconstruct_folder(src, tmp_path / "out", GaussianPrior(0.5), client=client)
    (src / "big.npz").unlink()
    with pytest.raises(VolumeMemoryError, match="memory budget"):
        reconstruct_folder(src, tmp_path / "out", GaussianPrior(0.5), client=client, memory_budget="100KB")
    assert not (tmp_path / "out" / "a.npz").exists()


def test_command_line_entry_point(tmp_path, client, capsys):
    from napari_diffrecon.priors import ModelCard, NetworkPrior, save_prior
    from napari_diffrecon.priors.network import build_network

    torch.manual_seed(0)
    card = ModelCard(name="tiny-cli", modality="ct", channels=1, resolution=32,
                     architecture={"type": "diffusers.UNet2DModel", "preset": "tiny"})
    _, card_path = save_prior(NetworkPrior(build_network({**card.architecture, "channels": 1}), card),
                              tmp_path / "tiny-cli")
    src = _folder(tmp_path / "in", names="a")
    argv = [str(src / "a.npz"), "-o", str(tmp_path / "out"), "--prior", str(card_path), "--steps", "2",
            "--scheduler", client.scheduler.address, "--ztv", "0.05"]
    assert main(argv) == 0
    assert "a: done" in capsys.readouterr().out
    prov = json.loads((tmp_path / "out" / "a.json").read_text())
    assert prov["prior"] == "tiny-cli" and prov["params"]["n_steps"] == 2
    assert main(argv) == 0 and "a: skipped" in capsys.readouterr().out


def test_mixed_folder_runs_each_study_with_its_modalitys_defaults(tmp_path, client):
    from napari_diffrecon.volume import recommended_volume_params, simulate_mri_study

    src = _folder(tmp_path / "in", names="c")
    v = np.zeros((3, 32, 32), np.float32)
    v[:, 8:24, 10:22] = 1.0
    write_volume_study(simulate_mri_study(v, acceleration=2.0, seed=0, study_id="m"), src / "m.npz")
    priors = {"ct": GaussianPrior(0.5), "mri": GaussianPrior(0.5, channels=2)}
    rep = reconstruct_folder(src, tmp_path / "out", priors, client=client, allow_mixed=True)
    assert rep.ok
    for sid, modality in (("c", "ct"), ("m", "mri")):
        got = json.loads((tmp_path / "out" / f"{sid}.json").read_text())["params"]
        assert got["gamma"] == recommended_volume_params(modality).gamma  # CT 3, MRI 2
    assert recommended_volume_params("ct").gamma != recommended_volume_params("mri").gamma


def test_a_changed_input_does_not_resume_the_old_inputs_slabs(tmp_path, client):
    """A failed study rerun after its input file changed: its finished slabs belong to the old input and are
    recomputed, not stitched into the new result (the partial files were keyed by the settings only)."""
    src, out = _folder(tmp_path / "in", names="c"), tmp_path / "out"
    params = VolumeParams(n_steps=2, ztv=0.05)
    rep = reconstruct_folder(src, out, GaussianPrior(0.5), params, client=client, slab_slices=3, halo=1, retries=0,
                             inject_faults={"c:1": 5})
    assert rep.failed == ["c"] and any(c["status"] == "done" for c in rep.studies["c"]["chunks"].values())
    v = np.zeros((4, 32, 32), np.float32)
    v[:, 4:12, 4:28] = 1.5  # another object, same geometry and settings
    write_volume_study(simulate_ct_study(v, 8, 0.02, study_id="c", seed=7), src / "c.npz", overwrite=True)
    rep2 = reconstruct_folder(src, out, GaussianPrior(0.5), params, client=client, slab_slices=3, halo=1)
    assert rep2.ok and not any(c["status"] == "resumed" for c in rep2.studies["c"]["chunks"].values())
