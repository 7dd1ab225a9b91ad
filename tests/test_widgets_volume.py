"""GUI tests of streaming a volume into napari (the workbench's "Volume (3D)" group; run under xvfb-run).

Tiny volumes (8 slices of 32²), a tiny untrained U-Net prior written by a fixture (never the shipped
ones) whose ``denoise`` is slowed to stand in for a real network's cost, and few steps.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from napari_diffrecon._widgets import main_widget  # noqa: E402
from napari_diffrecon._widgets._volume import VOLUME_LAYER_NAMES  # noqa: E402

pytestmark = pytest.mark.usefixtures("gui_config_in_tmp")


def _volume(ct_slice, d: int = 8, n: int = 32) -> np.ndarray:
    """A stack of the real CT slice (pydicom's CT_small), resized to n², its contrast varying with z."""
    from skimage.transform import resize

    base = resize(ct_slice, (n, n), anti_aliasing=True).astype(np.float32)
    return np.stack([base * (0.8 + 0.05 * k) for k in range(d)]).astype(np.float32)


def _slow(prior, seconds: float) -> None:
    fast = prior.denoise

    def denoise(x, sigma):
        time.sleep(seconds)
        return fast(x, sigma)

    prior.denoise = denoise


def _setup(make_napari_viewer, prior: Path, ct_slice, steps: int, slab: int, slow: float = 0.03):
    viewer = make_napari_viewer()
    w = main_widget(viewer)
    viewer.window.add_dock_widget(w, name="Diffusion reconstruction")
    vol = _volume(ct_slice)
    user = viewer.add_image(vol, name="phantom", scale=(2.0, 1.0, 1.0))
    other = viewer.add_image(vol[0] * 2, name="a 2D layer of mine")
    assert w.set_prior(str(prior))
    _slow(w.prior, slow)
    p = w.volume
    p.use_layer("phantom", "ct")
    p.views.setValue(12)
    p.steps.setValue(steps)
    p.ztv.setValue(0.0)  # no halo: slabs of `slab` slices, exactly the core
    p.slab.setValue(slab)
    w.seed.setValue(0)
    return viewer, w, p, user, other, vol


def _slider_to(viewer, layer, k: int) -> None:
    """Move the viewer's z slider to slice k of ``layer``."""
    viewer.dims.set_point(0, float(layer.data_to_world((k, 0, 0))[0]))


def test_volume_streams_slab_by_slab_following_the_slider(make_napari_viewer, qtbot, tiny_priors, ct_slice):
    from qtpy.QtCore import QTimer

    viewer, w, p, user, other, vol = _setup(make_napari_viewer, tiny_priors["ct"], ct_slice, steps=4, slab=2)
    layers_before = [(ly.name, ly) for ly in viewer.layers]
    _slider_to(viewer, user, 3)
    # The first slab's second step waits until the GUI has moved the slider (no race with a busy GUI thread)
    gate, calls, fast = threading.Event(), [], w.prior.denoise

    def gated(x, sigma):
        if x.shape[0] == 2:  # a slab's slices (the memory plan probes with one blank slice)
            calls.append(1)
            if len(calls) == 2:
                assert gate.wait(60), "the GUI never handled the first streamed estimate"
        return fast(x, sigma)

    w.prior.denoise = gated
    order: list[tuple[int, int]] = []
    seen: list = []

    def on_update(upd):
        seen.append(upd)
        if upd.kind == "estimate" and len(order) == 0 and not upd.done.any() and not moved:
            moved.append(upd.core)
            _slider_to(viewer, user, 7)  # mid-slab: the next slab must be the one holding slice 7
            gate.set()
        if upd.done is not None:
            for a in range(0, 8, 2):
                if upd.done[a] and (a, a + 2) not in order:
                    order.append((a, a + 2))

    moved: list = []
    gaps, last = [], [time.perf_counter()]

    def beat():  # event-loop heartbeat, counted once the volume layer exists (napari builds a new 3D layer
        now = time.perf_counter()  # once, in the GUI thread: ≈ 1.4 s here with software OpenGL)
        if VOLUME_LAYER_NAMES["estimate"] in viewer.layers and created:
            gaps.append(now - last[0])
        created.append(1) if VOLUME_LAYER_NAMES["estimate"] in viewer.layers else None
        last[0] = now

    created: list = []

    timer = QTimer()
    timer.timeout.connect(beat)
    timer.start(20)
    worker = p.run()
    assert worker is not None and p.running and not w.run_btn.isEnabled() and not p.run_btn.isEnabled()
    assert w.run() is None  # the 2D run is refused while the volume runs
    assert w.tuning.start() is None and not w.tuning.tune_btn.isEnabled()  # so is a search (it would share the prior)
    worker.yielded.connect(on_update)
    qtbot.waitUntil(lambda: not p.running, timeout=120_000)
    timer.stop()
    assert w.tuning.tune_btn.isEnabled() and w.run_btn.isEnabled()

    assert moved == [(2, 4)], "the first slab holds the slice under the slider (3)"
    assert order == [(2, 4), (6, 8), (4, 6), (0, 2)], f"slab order {order} does not follow the slider"
    est = p.layers["estimate"]
    assert est.name == VOLUME_LAYER_NAMES["estimate"] and est.data.shape == vol.shape
    assert tuple(est.scale) == (2.0, 1.0, 1.0)  # the study's spacing
    assert np.isfinite(est.data).all() and np.abs(est.data).max() > 0
    streamed = [u for u in seen if u.kind == "estimate"]
    assert p.estimate_updates >= 5 and any(0 < u.done.sum() < 8 for u in streamed)  # it fills in as slabs finish
    prov = est.metadata["provenance"]
    assert prov["sampler"] == "mbir" and prov["frontend"] == "napari widget" and prov["study"] == "phantom"
    assert [s["core_start"] for s in prov["slabs"]] == [0, 2, 4, 6] and prov["params"]["n_steps"] == 4
    assert "Stop" not in p.status.text() and p.status.text().startswith("done")
    # the user's layers are all still there, untouched; the GUI thread never stalled
    assert [(ly.name, ly) for ly in viewer.layers][: len(layers_before)] == layers_before
    np.testing.assert_array_equal(user.data, vol)
    assert max(gaps) < 1.0, f"the event loop stalled for {max(gaps):.2f} s"
    assert w.run_btn.isEnabled() and p.run_btn.isEnabled() and not p.stop_btn.isEnabled()
    assert [p.source.itemText(i) for i in range(p.source.count())] == ["layer: phantom"]  # results are no input


def test_stop_keeps_what_was_computed_and_a_second_run_reuses_the_layer(make_napari_viewer, qtbot, tiny_priors,
                                                                        ct_slice):
    viewer, w, p, user, other, vol = _setup(make_napari_viewer, tiny_priors["ct"], ct_slice, steps=300, slab=4,
                                            slow=0.05)
    p.ztv.setValue(0.05)  # live: read every step; the run below changes it mid-run
    p.slab.setValue(0)  # auto: the whole volume fits, one slab
    _slider_to(viewer, user, 0)
    seen: list = []
    worker = p.run()
    worker.yielded.connect(seen.append)
    qtbot.waitUntil(lambda: sum(u.kind == "estimate" for u in seen) >= 2, timeout=60_000)
    p.ztv.setValue(0.2)
    assert p.params.ztv == pytest.approx(0.2)
    from napari_diffrecon.volume import ZTV_DEFAULTS

    p.ztv.setValue(-0.003)  # a typed negative weight is "auto" mid-run: back to the modality's tuned weight
    assert p.ztv.value() == p.ztv.minimum() and p.ztv.text() == "auto" and p.params.ztv == ZTV_DEFAULTS["ct"]
    p.ztv.setValue(0.2)
    t0 = time.perf_counter()
    p.stop()
    qtbot.waitUntil(lambda: not p.running, timeout=10_000)
    latency = time.perf_counter() - t0
    assert latency < 1.0, f"Stop took {latency:.2f} s"
    last = seen[-1]
    assert last.kind == "stopped" and 0 < last.step < 300
    est = p.layers["estimate"]
    np.testing.assert_array_equal(est.data, last.estimate)  # what was computed is kept
    prov = est.metadata["provenance"]
    assert prov["status"] == "stopped" and prov["stopped_at_step"] == last.step and prov["slices_finished"] == []
    assert prov["params"]["ztv"] == pytest.approx(0.2)  # the live change is in the record
    # ... and when it came (the record held only the final weight: the first steps' 0.05 was lost)
    changes = prov["live_parameter_changes"]
    assert [c["ztv"] for c in changes] == pytest.approx([0.2, ZTV_DEFAULTS["ct"], 0.2])
    assert all(c["after_step"] >= 1 for c in changes)
    assert p.stopped and "stopped" in p.status.text() and p._pbar is None
    # the viewer stays usable and the user's layers are intact
    assert user in viewer.layers and other in viewer.layers
    np.testing.assert_array_equal(user.data, vol)
    viewer.add_points(np.zeros((1, 3)))
    viewer.dims.ndisplay = 3
    viewer.dims.ndisplay = 2
    # a second (short) run writes into the same layer and finishes
    p.steps.setValue(2)
    events: list = []
    est.events.data.connect(lambda e: events.append(1))
    assert p.run() is not None
    qtbot.waitUntil(lambda: not p.running, timeout=60_000)
    assert p.layers["estimate"] is est and len(events) >= 1
    assert est.metadata["provenance"]["params"]["n_steps"] == 2 and "status" not in est.metadata["provenance"]
    assert len([ly for ly in viewer.layers if ly.name.startswith("volume")]) == 1


def test_mri_volume_from_a_layer_streams_magnitudes(make_napari_viewer, qtbot, tiny_priors, ct_slice):
    viewer = make_napari_viewer()
    w = main_widget(viewer)
    viewer.window.add_dock_widget(w, name="Diffusion reconstruction")
    vol = _volume(ct_slice, d=4)
    viewer.add_image(vol, name="brain")
    assert w.set_prior(str(tiny_priors["mri"]))  # complex (2-channel): used for MRI volumes
    p = w.volume
    p.use_layer("brain", "mri")
    assert p._sim_rows["accel"].isVisibleTo(p) and not p._sim_rows["views"].isVisibleTo(p)
    p.accel.setValue(2.0)
    p.steps.setValue(3)
    assert p.run() is not None
    qtbot.waitUntil(lambda: not p.running, timeout=120_000)
    est = p.layers["estimate"]
    assert est.data.dtype == np.float32 and est.data.shape == vol.shape and (est.data >= 0).all()  # magnitudes
    prov = est.metadata["provenance"]
    assert prov["slice_operator"]["modality"] == "mri" and prov["prior"] == "tiny-mri"
    # the same defaults as the CLI: MRI's tuned 2D DDS step (γ = 2), coupled along z
    from napari_diffrecon.volume import recommended_volume_params

    assert p.ztv.text() == "auto"  # the box's default: MRI's own z-TV weight, as on the CLI
    expected = recommended_volume_params("mri", n_steps=3).to_dict()
    got = p.params.to_dict()
    assert got.pop("extra").keys() <= {"focus_slice"}  # the slider's live slice, nothing else
    assert got == {k: v for k, v in expected.items() if k != "extra"} and p.params.gamma == 2.0
    assert p.params.ztv == 0.03 == prov["params"]["ztv"]


def test_volume_study_file_pet_and_bad_inputs(make_napari_viewer, qtbot, tiny_priors, ct_slice, tmp_path, notes):
    from napari_diffrecon.volume import simulate_pet_study, write_volume_study

    viewer = make_napari_viewer()
    w = main_widget(viewer)
    viewer.window.add_dock_widget(w, name="Diffusion reconstruction")
    p = w.volume
    assert p.run() is None and any("no volume input" in n for n in notes)  # nothing to reconstruct yet
    act = np.clip(_volume(ct_slice, d=4), 0, None)
    path = write_volume_study(simulate_pet_study(act, n_views=24, spacing_mm=(1.5, 1.0, 1.0), study_id="pet4"),
                              tmp_path / "pet4.npz")
    p.open_study(path)
    assert p.source.currentText() == "study: pet4.npz" and not p.modality.isEnabled()
    assert w.set_prior(str(tiny_priors["pet"]))
    p.steps.setValue(3)
    assert p.run() is not None
    qtbot.waitUntil(lambda: not p.running, timeout=60_000)
    est = p.layers["estimate"]
    assert est.data.shape == act.shape and (est.data >= 0).all() and tuple(est.scale) == (1.5, 1.0, 1.0)
    assert est.metadata["provenance"]["measurement_file"] == str(path)
    # a corrupt study: a notification from the worker, no new layer, the estimate layer kept as it was
    bad = tmp_path / "bad.npz"
    np.savez(bad, measurement=np.zeros((2, 3)), operator=np.array('{"modality": "pet"}'))
    n_layers, kept = len(viewer.layers), est.data.copy()
    p.open_study(bad)
    assert p.run() is not None
    qtbot.waitUntil(lambda: not p.running, timeout=60_000)
    assert any("volume run failed" in n and "not a volume study" in n for n in notes)
    assert len(viewer.layers) == n_layers and p.layers["estimate"] is est
    np.testing.assert_array_equal(est.data, kept)


def test_a_ct_volume_in_hounsfield_units_is_simulated_as_attenuation_and_shown_in_hu(make_napari_viewer, qtbot,
                                                                                     tiny_priors, ct_slice):
    """A CT volume layer in HU (a DICOM series) used to be forward-projected as attenuation (negative where air):
    it is converted to attenuation relative to water, and the results come back in HU like the source layer."""
    from napari_diffrecon.volume import simulate_ct_study

    hu = (_volume(ct_slice, d=4) - 1.0) * 1000.0  # relative attenuation → HU: air −1000
    st = simulate_ct_study(hu, 12)
    assert st.metadata["intensity"] == {"native_units": "HU", "scale": 1e-3, "offset": 1.0}
    np.testing.assert_allclose(st.ground_truth, np.clip(1 + hu / 1000, 0, None), rtol=1e-5, atol=1e-6)
    assert "intensity" not in simulate_ct_study(_volume(ct_slice, d=4), 12).metadata  # attenuation: as it is
    viewer = make_napari_viewer()
    w = main_widget(viewer)
    viewer.window.add_dock_widget(w, name="Diffusion reconstruction")
    viewer.add_image(hu, name="series in HU")
    assert w.set_prior(str(tiny_priors["ct"]))
    p = w.volume
    p.use_layer("series in HU", "ct")
    p.views.setValue(12)
    p.steps.setValue(3)
    assert p.run() is not None
    qtbot.waitUntil(lambda: not p.running, timeout=120_000)
    est = p.layers["estimate"]
    assert est.metadata["units"] == "HU" and float(np.median(est.data[:, :4, :4])) < -500  # air stays air, in HU
    assert est.metadata["provenance"]["measurement_intensity"]["native_units"] == "HU"


def test_a_pet_volume_is_simulated_at_the_count_level_the_user_sets(make_napari_viewer, ct_slice):
    """The Volume group had no count row for PET: every PET volume was simulated at 2e5 counts per slice."""
    viewer = make_napari_viewer()
    w = main_widget(viewer)
    viewer.window.add_dock_widget(w, name="Diffusion reconstruction")
    viewer.add_image(np.clip(_volume(ct_slice, d=3), 0, None), name="uptake")
    p = w.volume
    p.use_layer("uptake", "pet")
    assert p._sim_rows["counts"].isVisibleTo(p) and not p._sim_rows["noise"].isVisibleTo(p)
    p.counts.setValue(20_000)
    make, modality, _ = p._study_factory()
    assert modality == "pet" and make.keywords["counts_per_slice"] == 20_000
    study = make()
    assert study.modality == "pet" and np.all(study.data >= 0)
    p.use_layer("uptake", "ct")
    assert not p._sim_rows["counts"].isVisibleTo(p)
