"""Volume studies for MRI (2D multi-slice) and PET (per slice), cancelling a volume run, the one slab planner."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from napari_diffrecon.physics import CartesianMRI, PETOperator, sparse_view_angles
from napari_diffrecon.physics.coils import simulate_coil_maps
from napari_diffrecon.priors import GaussianPrior
from napari_diffrecon.volume import (
    VolumeCancelled,
    VolumeMemoryError,
    VolumeParams,
    VolumeProblem,
    check_study,
    mbir,
    plan_memory,
    read_volume_study,
    reconstruct_volume,
    simulate_ct_study,
    simulate_mri_study,
    simulate_pet_study,
    simulate_study,
    stream_volume,
    volume_ct,
    write_volume_study,
)
from napari_diffrecon.volume.memory import DEFAULT_HALO, plan_volume_slabs

torch.set_num_threads(1)


def _vol(d=4, n=32):
    """A blocky volume whose body changes with z (so per-slice attenuation differs)."""
    v = np.zeros((d, n, n), np.float32)
    for k in range(d):
        v[k, 6 + k : 26 - k, 8:24] = 1.0
        v[k, 12:18, 12:18] = 0.4 + 0.1 * k
    return v


def test_mri_study_is_2d_multislice_with_a_mask_per_slice(tmp_path):
    vol = _vol()
    st = simulate_mri_study(vol, acceleration=4, n_coils=4, noise_fraction=0.02, spacing_mm=(2.0, 1.0, 1.0),
                            study_id="mri4")
    assert st.modality == "mri" and st.data.shape == (4, 4, 32, 32) and st.data.dtype == np.complex64
    assert st.data_weights.shape == (4, 32, 32)
    masks = st.data_weights
    assert all(not np.array_equal(masks[0], masks[k]) for k in range(1, 4)), "every slice has its own mask"
    assert all(abs(m.mean() - 0.25) < 0.1 for m in masks)  # 4× each
    # slice k is the 2D Cartesian MRI of its own mask: noise only where k-space was sampled, σ as promised
    maps = simulate_coil_maps((32, 32), 4, seed=0)
    gt = st.ground_truth
    assert np.iscomplexobj(gt) and np.allclose(np.abs(gt), vol, atol=1e-6)  # a smooth phase on the magnitude
    sigma = st.noise["sigma"]
    for k in range(4):
        clean = CartesianMRI(masks[k], maps).forward(torch.from_numpy(gt[k])).numpy()
        resid = st.data[k] - clean
        assert np.all(resid[:, masks[k] == 0] == 0)
        r = resid[:, masks[k] != 0]
        assert abs(np.sqrt(np.mean(np.abs(r) ** 2) / 2) - sigma) < 0.2 * sigma
    back = read_volume_study(write_volume_study(st, tmp_path / "mri4.npz"))
    assert back.modality == "mri" and check_study(back, ztv=0.05)["z_ratio"] == 2.0
    np.testing.assert_array_equal(back.data_weights, masks)
    np.testing.assert_array_equal(back.build_operator().forward(torch.from_numpy(gt)).numpy(),
                                  st.build_operator().forward(torch.from_numpy(gt)).numpy())


def test_mri_volume_study_reconstructs_and_fits_its_data():
    vol = _vol()
    st = simulate_mri_study(vol, acceleration=3, noise_fraction=0.01)
    res = reconstruct_volume(st, GaussianPrior(0.5, channels=2), VolumeParams(n_steps=8, cg_iters=5, ztv=0.02),
                             memory_budget="1GB")
    x = res.reconstruction
    assert np.iscomplexobj(x) and x.shape == vol.shape and np.isfinite(x).all()
    floor = 0.01 * np.sqrt(2)  # ‖noise‖/‖m‖: complex σ = 1% of the sampled k-space RMS
    assert res.residual < 3 * floor, "each slice's data, under its own mask, are fitted to the noise level"
    assert np.corrcoef(np.abs(x).ravel(), vol.ravel())[0, 1] > 0.9


def test_pet_study_is_per_slice_with_its_own_attenuation(tmp_path):
    vol = _vol(d=5)
    st = simulate_pet_study(vol, n_views=24, counts_per_slice=5e4, spacing_mm=(1.5, 2.0, 2.0), study_id="pet5")
    assert st.modality == "pet" and st.data.shape == (5, 32, 24) and st.noise["model"] == "poisson"
    att = st.data_weights
    assert att.shape == (5, 32, 24) and np.all((att > 0) & (att <= 1))
    assert not np.allclose(att[0], att[4]), "slices with other bodies are attenuated differently"
    assert np.all(st.data >= 0) and np.all(st.data == np.round(st.data))  # counts
    # slice k is the 2D PET operator with its own attenuation; the expected true counts are as asked
    angles = sparse_view_angles(24)
    scale = st.operator["sensitivity_scale"]
    means = np.stack([PETOperator(32, angles, att[k], scale).forward(torch.from_numpy(vol[k])).numpy()
                      for k in range(5)])
    assert means.sum() == pytest.approx(5 * 5e4, rel=1e-3)
    expected = means + st.noise["background"]
    assert abs(st.data.sum() / expected.sum() - 1) < 0.01  # Poisson around the right mean
    # attenuation is water at 511 keV times the pixel size (dx = 2 mm): a thicker body attenuates more
    assert att.min() < np.exp(-0.0096 * 2.0 * 10)
    back = read_volume_study(write_volume_study(st, tmp_path / "pet5.npz"))
    np.testing.assert_array_equal(back.data_weights, att)
    res = reconstruct_volume(back, GaussianPrior(0.5, mean=0.5), VolumeParams(n_steps=4, cg_iters=3, ztv=0.05),
                             memory_budget="1GB")
    assert res.reconstruction.min() >= 0 and np.isfinite(res.reconstruction).all()
    assert res.provenance["study"] == "pet5"


def test_simulate_study_dispatches_and_refuses_bad_volumes():
    vol = _vol()
    assert simulate_study(vol, "CT", n_views=8).modality == "ct"
    assert simulate_study(vol, "mri", acceleration=2).modality == "mri"
    assert simulate_study(vol, "pet", n_views=8).modality == "pet"
    with pytest.raises(ValueError, match="unknown modality"):
        simulate_study(vol, "ultrasound")
    for modality, opts in (("ct", {"n_views": 8}), ("mri", {}), ("pet", {"n_views": 8})):
        with pytest.raises(ValueError, match="square slices"):
            simulate_study(vol[:, :, :30], modality, **opts)
    assert simulate_study(vol, "ct", n_views=8, study_id="c").metadata == {
        "simulated": {"modality": "ct", "n_views": 8, "arc": 180.0, "noise_fraction": 0.01, "seed": 0, "units": "auto"},
        "study_id": "c"}
    with pytest.raises(ValueError, match="≥ 0"):
        simulate_pet_study(vol - 0.5)
    with pytest.raises(ValueError, match="NaN"):
        simulate_pet_study(np.where(vol > 0.9, np.nan, vol))


class _CountingPrior(GaussianPrior):
    """Sets ``event`` at its ``at``-th denoiser call (a Stop pressed while the network runs)."""

    def __init__(self, event: threading.Event, at: int) -> None:
        super().__init__(0.5)
        self.event, self.at, self.calls, self.batches = event, at, 0, []

    def denoise(self, x, sigma):
        self.calls += 1
        self.batches.append(int(x.shape[0]))
        if self.calls == self.at:
            self.event.set()
        return super().denoise(x, sigma)


def test_cancel_stops_within_one_denoiser_chunk():
    st = simulate_ct_study(_vol(d=6), 8, 0.02)
    op = st.build_operator()
    cancel = threading.Event()
    prior = _CountingPrior(cancel, at=2)
    problem = VolumeProblem(op, st.to_tensor(), prior, st.build_likelihood())
    with pytest.raises(VolumeCancelled):
        for _ in mbir(problem, VolumeParams(n_steps=5), chunk_slices=2, cancel=cancel):
            pass
    assert prior.calls == 2, "the step's remaining chunks were not run"
    # through stream_volume: the updates before the Stop keep the estimate computed so far
    cancel = threading.Event()
    ups = []
    with pytest.raises(VolumeCancelled):
        for upd in stream_volume(st, GaussianPrior(0.5), VolumeParams(n_steps=50), memory_budget="1GB",
                                 cancel=cancel):
            ups.append(upd.estimate.copy())
            cancel.set()  # Stop pressed at the first update (the first step always yields)
    assert len(ups) == 1 and np.abs(ups[-1]).max() > 0
    # one slice per network call (what the GUI asks for on the CPU) gives the same volume
    params = VolumeParams(n_steps=4)
    spy = _CountingPrior(threading.Event(), at=0)
    one = reconstruct_volume(st, spy, params, memory_budget="1GB", max_chunk_slices=1)
    assert max(spy.batches) == 1 and len(spy.batches) > 6
    whole = reconstruct_volume(st, _CountingPrior(threading.Event(), at=0), params, memory_budget="1GB")
    # equal up to float32 summation order (one slice takes the CT matrix-vector path, a chunk the matrix product)
    np.testing.assert_allclose(one.reconstruction, whole.reconstruction, rtol=1e-4, atol=1e-5)


def test_one_slab_planner_for_runs_and_workers():
    from napari_diffrecon.priors import ModelCard, NetworkPrior
    from napari_diffrecon.priors.network import build_network

    torch.manual_seed(0)
    card = ModelCard(name="tiny", modality="ct", channels=1, resolution=32,
                     architecture={"type": "diffusers.UNet2DModel", "preset": "tiny"})
    prior = NetworkPrior(build_network({**card.architecture, "channels": 1}), card)
    op = volume_ct(400, 32, sparse_view_angles(8))
    whole = plan_memory(op, prior, "2GB")
    slabs, halo, plan = plan_volume_slabs(op, prior, "2GB", ztv=0.05)
    assert len(slabs) == 1 and halo == DEFAULT_HALO and plan == whole
    small = int(whole.fixed * 0.5)
    with pytest.raises(VolumeMemoryError, match="slab_slices="):
        plan_volume_slabs(op, prior, small)
    slabs, halo, plan = plan_volume_slabs(op, prior, small, slab_slices="auto", ztv=0.05)
    size = max(s.stop - s.start for s in slabs)
    assert len(slabs) > 1 and plan is None and halo == min(DEFAULT_HALO, (size - 1) // 4)
    assert all(plan_memory(op.slab(s.start, s.stop), prior, small).peak <= small for s in slabs)
    cover = np.zeros(400, int)
    for s in slabs:
        cover[s.core_start : s.core_stop] += 1
    assert (cover == 1).all()
    # explicit slabs: the default halo keeps half of each slab as core; an explicit halo is kept; no z-TV, no halo
    assert plan_volume_slabs(op, prior, "2GB", slab_slices=5, ztv=0.05)[1] == 1
    assert plan_volume_slabs(op, prior, "2GB", slab_slices=12, halo=3, ztv=0.05)[1] == 3
    assert plan_volume_slabs(op, prior, "2GB", slab_slices=12)[1] == 0
    # an explicit slab that does not fit is refused, unless the budget is unknown (an existing cluster)
    with pytest.raises(VolumeMemoryError):
        plan_volume_slabs(op, prior, "4MB", slab_slices=300)
    assert len(plan_volume_slabs(op, prior, "4MB", slab_slices=300, check=False)[0]) == 2


def test_the_denoiser_memory_probe_counts_only_its_own_call_on_a_shared_network():
    """The probe hooks every module of the (possibly shared) network for one call; another thread's call on the same
    network meanwhile (a run on the same prior) must not be counted too (it shrank the planned chunks)."""
    import threading

    import torch

    from napari_diffrecon.priors import ModelCard, NetworkPrior
    from napari_diffrecon.priors.network import build_network
    from napari_diffrecon.volume.memory import denoiser_bytes_per_slice

    torch.manual_seed(0)
    card = ModelCard(name="tiny-mem", modality="ct", channels=1, resolution=32,
                     architecture={"type": "diffusers.UNet2DModel", "preset": "tiny"})
    prior = NetworkPrior(build_network({**card.architecture, "channels": 1}), card)
    alone = denoiser_bytes_per_slice(prior, 1, (32, 32))
    denoise = prior.denoise

    def busy_denoise(x, sigma):  # another run calls the network (a 4-image batch) while the probe's hooks are on
        other = threading.Thread(target=lambda: denoise(torch.zeros(4, 1, 32, 32), 1.0))
        other.start()
        other.join()
        return denoise(x, sigma)

    prior.denoise = busy_denoise
    with torch.no_grad():
        assert denoiser_bytes_per_slice(prior, 1, (32, 32)) == alone
