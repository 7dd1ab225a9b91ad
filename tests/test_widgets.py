"""GUI tests of the workbench dock widget (napari's make_napari_viewer + qtbot; run under xvfb-run).

Priors here are tiny untrained U-Nets written by a fixture (never the shipped ones); their
``denoise`` is slowed to a realistic ~50 ms per call where a test needs several streamed updates,
because the widget shows at most 2 updates per second.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from qtpy.QtGui import QMovie  # noqa: E402
from qtpy.QtWidgets import QLabel  # noqa: E402

from napari_diffrecon._widgets import main_widget  # noqa: E402
from napari_diffrecon._widgets._main import LAYER_NAMES  # noqa: E402

N_STEPS = 10


pytestmark = pytest.mark.usefixtures("gui_config_in_tmp")


def _slow(widget, seconds: float = 0.03) -> None:
    """Slow the loaded prior's denoiser (a stand-in for a real network's cost per step)."""
    prior = widget.prior
    fast = prior.denoise

    def denoise(x, sigma):
        time.sleep(seconds)
        return fast(x, sigma)

    prior.denoise = denoise


def _widget(make_napari_viewer, qtbot, show: bool = False):
    viewer = make_napari_viewer(show=show)
    w = main_widget(viewer)
    viewer.window.add_dock_widget(w, name="Diffusion reconstruction")
    return viewer, w


def _prepare(w, sample: str, prior: Path, n_steps: int = N_STEPS, slow: float = 0.05) -> None:
    w.load_sample(sample)
    assert w.measurement is not None
    assert w.set_prior(str(prior))
    w.spins["n_steps"].setValue(n_steps)
    w.n_samples.setValue(1)
    w.seed.setValue(0)
    if slow:
        _slow(w, slow)


def _run_to_end(w, qtbot, timeout_ms: int = 60_000):
    worker = w.run()
    assert worker is not None, "the run was refused"
    qtbot.waitUntil(lambda: not w.running, timeout=timeout_ms)
    return worker


def test_dock_widget_opens(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    dock, widget = viewer.window.add_plugin_dock_widget("napari-diffrecon", "Diffusion reconstruction")
    assert widget.method_combo.count() >= 8
    assert widget.sample_combo.count() == 3
    assert not widget.running and widget.run_btn.isEnabled() and not widget.stop_btn.isEnabled()
    # parameters follow the sampler: DPS shows ζ but not CG steps; a classical method hides the weight slider
    widget.method_combo.setCurrentIndex(widget.method_combo.findData("dps"))
    assert not widget.param_rows["zeta"].isHidden() and widget.param_rows["cg_iters"].isHidden()
    from napari_diffrecon.samplers.defaults import recommended_params

    assert widget.hot_start.isChecked()  # on by default: the benchmark's best on 8 of 9 tasks, at fewer NFE
    assert widget.current_settings().params.n_steps == recommended_params("dps", hot_start=True).n_steps  # tuned
    widget.hot_start.setChecked(False)
    assert widget.current_settings().params.n_steps == recommended_params("dps").n_steps  # from noise: its own
    widget.method_combo.setCurrentIndex(widget.method_combo.findData("tv"))
    assert widget._weight_row.isHidden() and not widget.param_rows["lam_rel"].isHidden()
    # the npe2-built widget (napari hands it a public-only viewer proxy) runs a classical method end to end
    viewer.open_sample("napari-diffrecon", "ct_sparse23")
    assert widget.measurement is not None and widget.measurement.operator["modality"] == "ct"
    widget.method_combo.setCurrentIndex(widget.method_combo.findData("fbp"))
    _run_to_end(widget, qtbot)
    assert widget.layers["baseline"].name == "baseline (fbp)"
    assert widget.layers["baseline"].metadata["provenance"]["settings"]["method"] == "fbp"


@pytest.mark.parametrize("sample,modality", [("ct_sparse23", "ct"), ("mri_4x_8coils", "mri"),
                                             ("pet_lowcount", "pet")])
def test_run_on_each_sample_streams_layers(make_napari_viewer, qtbot, tiny_priors, sample, modality):
    viewer, w = _widget(make_napari_viewer, qtbot)
    _prepare(w, sample, tiny_priors[modality], slow=0.15)  # 1.5 s: the widget streams ≤ 2 updates/s
    n_before = len(viewer.layers)
    w.n_samples.setValue(2)
    updates = []
    _run_to_end(w, qtbot)
    est = w.layers["estimate"]
    est.events.data.connect(lambda e: updates.append(1))  # from here on: later runs count layer data events
    names = {layer.name for layer in viewer.layers}
    for role in ("iterate", "estimate", "mean", "std", "residual"):
        assert LAYER_NAMES[role] in names, role
    assert any(n.startswith("baseline (") for n in names)
    assert len(viewer.layers) == n_before + 6
    assert w.estimate_updates >= 3, w.estimate_updates
    prov = est.metadata["provenance"]
    assert prov["settings"]["method"] == "dds" and prov["settings"]["seed"] == 0
    assert prov["prior"] == f"tiny-{modality}" and prov["prior_card"]["modality"] == modality
    assert prov["operator"]["modality"] == modality and prov["software_version"]
    assert prov["measurement_file"].endswith(f"{sample}.npz") and prov["measurement_sha256"]
    std = w.layers["std"]
    assert std.colormap.name == "magma" and std.contrast_limits[0] == 0.0 and float(std.data.max()) > 0
    assert w.layers["mean"].data.shape == tuple(w.measurement.operator["image_shape"])
    if modality != "ct":
        return
    # a second run re-uses the same layers and streams into the estimate layer again
    _run_to_end(w, qtbot)
    assert len(viewer.layers) == n_before + 6
    assert len(updates) >= 3


@pytest.mark.parametrize("method,weight", [("dds", 0.1), ("dps", 10.0)])
def test_weight_slider_moved_mid_run_changes_result(make_napari_viewer, qtbot, tiny_priors, method, weight):
    """The prior-weight slider acts on the run in flight, for DDS (γ / w) and DPS (ζ / w; it used to do nothing)."""
    viewer, w = _widget(make_napari_viewer, qtbot)
    w.method_combo.setCurrentIndex(w.method_combo.findData(method))
    _prepare(w, "ct_sparse23", tiny_priors["ct"], n_steps=12)
    w.compare.setChecked(False)
    _run_to_end(w, qtbot)
    unmoved = np.array(w.layers["mean"].data)
    _run_to_end(w, qtbot)
    np.testing.assert_allclose(w.layers["mean"].data, unmoved, rtol=0, atol=1e-6)  # same seed, same result

    worker = w.run()
    moved = []

    def on_update(upd):
        if upd.kind == "iterate" and not moved:
            w.set_prior_weight(weight)  # the user drags the slider while the run is in flight
            moved.append(upd.step)

    worker.yielded.connect(on_update)
    qtbot.waitUntil(lambda: not w.running, timeout=60_000)
    assert moved and moved[0] < 12
    log = w.last_provenance["live_parameter_changes"]
    assert log and log[0]["prior_weight"] == pytest.approx(weight) and log[0]["after_step"] < 12
    assert w.last_provenance["settings"]["params"]["prior_weight"] == pytest.approx(weight)
    assert w.last_provenance["settings"]["method"] == method
    assert not np.allclose(w.layers["mean"].data, unmoved, atol=1e-4)
    # moving the slider with no run in flight only changes the next run's settings
    w.set_prior_weight(1.0)
    assert w.current_settings().params.prior_weight == pytest.approx(1.0)


def test_stop_ends_worker_quickly_and_keeps_layers(make_napari_viewer, qtbot, tiny_priors, notes):
    viewer, w = _widget(make_napari_viewer, qtbot)
    _prepare(w, "ct_sparse23", tiny_priors["ct"], n_steps=400, slow=0.02)
    w.compare.setChecked(False)
    worker = w.run()
    qtbot.waitUntil(lambda: "estimate" in w.layers, timeout=30_000)
    # napari's "in progress" spinner is shown but not animated during the run (its frames cost the sampler)
    spinners = [lb.movie() for lb in viewer.window._qt_window.findChildren(QLabel)
                if lb.movie() is not None and "loading" in lb.movie().fileName()]
    assert all(m.state() != QMovie.MovieState.Running for m in spinners)  # (a napari without one: nothing to do)
    t0 = time.perf_counter()
    w.stop_btn.click()
    assert w.running  # the worker ends on the event loop, which has not turned since the click
    # Run while the stopped run ends: said so (it said "already in progress (press Stop first)")
    assert w.run() is None and "the stopped run is still ending" in notes[-1], notes[-1:]
    qtbot.waitUntil(lambda: not w.running, timeout=1000)
    elapsed = time.perf_counter() - t0
    assert elapsed < 1.0, elapsed
    assert worker.abort_requested
    est = w.layers["estimate"]
    assert est in viewer.layers and np.isfinite(est.data).all()
    prov = est.metadata["provenance"]
    assert prov["status"] == "stopped" and 0 < prov["stopped_at_step"] < 400
    assert w.run_btn.isEnabled() and not w.stop_btn.isEnabled() and w._pbar is None
    # the viewer is usable: add a layer, change the estimate's display, run a classical method
    viewer.add_image(np.zeros((8, 8)), name="after stop")
    est.contrast_limits = (0.0, 1.0)
    w.method_combo.setCurrentIndex(w.method_combo.findData("fbp"))
    _run_to_end(w, qtbot)
    assert "baseline (fbp)" in [layer.name for layer in viewer.layers]
    # a rerun on the same data writes over the earlier run's layers: how to keep one is said, once a session
    told = [n for n in notes if "writes over the earlier run's result layers" in n]
    assert len(told) == 1 and "rename a result layer to keep it" in told[0]
    _run_to_end(w, qtbot)
    assert sum("writes over the earlier run's result layers" in n for n in notes) == 1


def test_worker_memory_settings_apply_once():
    import sys

    from napari_diffrecon._widgets._perf import keep_worker_memory

    first = keep_worker_memory()
    assert keep_worker_memory() is first  # idempotent: the allocator is configured once per process
    if sys.platform.startswith("linux"):
        import platform

        assert first is (platform.libc_ver()[0] == "glibc")


def test_export_and_reread_roundtrip(make_napari_viewer, qtbot, tiny_priors, tmp_path, notes):
    from napari_diffrecon.io._napari import core_values

    viewer, w = _widget(make_napari_viewer, qtbot)
    _prepare(w, "ct_sparse23", tiny_priors["ct"], n_steps=4, slow=0)
    w.compare.setChecked(False)
    _run_to_end(w, qtbot)
    mean = w.layers["mean"]
    prov = mean.metadata["provenance"]
    inten = w.measurement.metadata["intensity"]
    assert mean.metadata["units"] == "HU"  # shown in HU, exported as shown (not converted twice)
    hu = np.asarray(mean.data, dtype=np.float64)
    x = core_values(mean.data, mean.metadata)  # the core's attenuation per pixel: a CT image's range
    np.testing.assert_allclose(hu, (x - inten["offset"]) / inten["scale"], rtol=1e-5, atol=1e-2)
    assert 0 <= np.percentile(x, 50) < 2 * inten["offset"]
    for ext in (".nii.gz", ".dcm", ".tif"):
        path = tmp_path / f"mean{ext}"
        assert w.export_layer(mean, path) == path
        before = path.read_bytes()
        assert w.export_layer(mean, path) is None  # never overwrites without asking
        assert path.read_bytes() == before and any("exists" in m for m in notes)
        layers = viewer.open(str(path), plugin="napari-diffrecon")
        back = layers[0]
        tol = (hu.max() - hu.min()) / 65535 if ext == ".dcm" else 1e-6 * np.abs(hu).max()
        np.testing.assert_allclose(back.data, hu, rtol=0, atol=tol * 1.01)
        back_prov = back.metadata["provenance"]
        assert back_prov.pop("exported_units") == "HU" and "HU" in back_prov.pop("exported_from")
        assert back_prov == json.loads(json.dumps(prov))
        np.testing.assert_allclose(back.scale, mean.scale, rtol=1e-5)
    # napari's own save path goes through our npe2 writers
    out = tmp_path / "via_napari.nii"
    viewer.layers.selection.active = mean
    viewer.layers.save(str(out), selected=True, plugin="napari-diffrecon")
    back = viewer.open(str(out), plugin="napari-diffrecon")[0]
    assert back.metadata["provenance"]["settings"] == prov["settings"]


def test_bad_file_and_mismatched_prior_notify_and_leave_layers(make_napari_viewer, qtbot, tiny_priors, tmp_path,
                                                              notes):
    viewer, w = _widget(make_napari_viewer, qtbot)
    w.load_sample("mri_4x_8coils")
    before = [(layer.name, id(layer.data)) for layer in viewer.layers]
    meas = w.measurement
    bad = tmp_path / "broken.npz"
    bad.write_bytes(b"this is not a zip file")
    assert w.open_path(bad) is False
    assert any("broken.npz" in m for m in notes)
    assert [(layer.name, id(layer.data)) for layer in viewer.layers] == before and w.measurement is meas
    n = len(notes)
    assert w.open_path(tmp_path / "missing.h5") is False and len(notes) > n
    # a real (1-channel) CT prior for complex MRI data: explained, not run
    assert w.set_prior(str(tiny_priors["ct"]))
    assert "complex" in w.mismatch_label.text()
    n = len(notes)
    assert w.run() is None and not w.running
    assert len(notes) > n and "pick a MRI prior" in notes[-1]
    assert [(layer.name, id(layer.data)) for layer in viewer.layers] == before
    # a prior file that does not exist
    n = len(notes)
    assert w.set_prior(str(tmp_path / "nope.json")) is False and len(notes) > n


def test_no_prior_installed_notifies_and_classical_still_runs(make_napari_viewer, qtbot, tmp_path, monkeypatch,
                                                              notes):
    import napari_diffrecon.priors.registry as registry

    monkeypatch.setattr(registry, "WEIGHTS_DIR", tmp_path / "no-weights")
    viewer, w = _widget(make_napari_viewer, qtbot)
    w.refresh_priors()
    w.load_sample("pet_lowcount")
    assert any("no prior for PET" in m for m in notes)
    n = len(notes)
    assert w.run() is None and len(notes) > n and "classical" in notes[-1]
    w.method_combo.setCurrentIndex(w.method_combo.findData("mlem"))
    w.spins["iters"].setValue(5)
    _run_to_end(w, qtbot)
    base = w.layers["baseline"]
    assert base.name == "baseline (mlem)" and base.metadata["provenance"]["kind"] == "classical"
    assert LAYER_NAMES["residual"] in [layer.name for layer in viewer.layers]


def test_simulate_from_image_layer(make_napari_viewer, qtbot, mr_slice):
    viewer, w = _widget(make_napari_viewer, qtbot)
    viewer.add_image(mr_slice, name="mr")
    _simulate_mri_4_coils_from_selected(w)
    assert "4 coil(s)" in w.meas_label.text()


def test_use_selected_layer_takes_image_layers_only(make_napari_viewer, qtbot, mr_slice, notes):
    """Points, shapes and labels were simulated from as if their coordinates or ids were an image (a surface
    raised), and an RGB image was sliced into a 3-pixel strip: each is refused, naming the layer and what to pick."""
    viewer, w = _widget(make_napari_viewer, qtbot)
    layers = [viewer.add_points(np.random.default_rng(0).uniform(0, 60, (5, 2)), name="pts"),
              viewer.add_labels((mr_slice > mr_slice.mean()).astype(np.int32), name="lab"),
              viewer.add_image(np.stack([mr_slice] * 3, -1), name="rgb", rgb=True),
              viewer.add_image(mr_slice > mr_slice.mean(), name="mask")]
    for layer, what in zip(layers, ("Points layer", "Labels layer", "RGB(A) colour image", "boolean mask"),
                           strict=True):
        viewer.layers.selection.active = layer
        n = len(viewer.layers)
        w.use_selected_layer()
        assert w.measurement is None and len(viewer.layers) == n
        assert what in notes[-1] and repr(layer.name) in notes[-1], notes[-1]
    viewer.layers.selection.active = viewer.add_image(mr_slice, name="mr")
    _simulate_mri_4_coils_from_selected(w)


def _simulate_mri_4_coils_from_selected(w):
    """"Use selected layer" with "simulate as" MRI, 64², 4 coils: the widget's measurement is that simulation."""
    w.sim_modality.setCurrentText("mri")
    w.sim_size.setValue(64)
    w.sim_coils.setValue(4)
    w.use_selected_layer()
    assert w.measurement is not None and w.measurement.operator["modality"] == "mri"
    assert w.measurement.operator["coil_maps"].shape == (4, 64, 64)


def test_use_selected_ground_truth_layer_simulates_as_asked(make_napari_viewer, qtbot, notes):
    """A sample's ground-truth layer is an image: "Use selected layer" simulates from it with the "simulate as"
    options (it re-adopted the CT sample's own measurement before); options that describe the layer's own
    measurement adopt it, with a notice; a measurement layer is adopted as it is."""
    viewer, w = _widget(make_napari_viewer, qtbot)
    w.load_sample("ct_sparse23")
    ct = w.measurement
    gt = viewer.layers["CT 23 views ground truth"]
    viewer.layers.selection.active = gt
    _simulate_mri_4_coils_from_selected(w)
    assert w.measurement is not ct
    assert w.measurement_name == "CT 23 views (mri simulated)"  # not "… ground truth (mri simulated)"
    # the options of the sample's own measurement: that one is adopted, and the user is told
    viewer.layers.selection.active = gt
    w.sim_modality.setCurrentText("ct")
    w.sim_size.setValue(128)
    w.sim_views.setValue(23)
    n = len(viewer.layers)
    w.use_selected_layer()
    assert w.measurement is ct and w.measurement_name == "CT 23 views" and len(viewer.layers) == n
    assert "using the measurement that came with 'CT 23 views ground truth'" in notes[-1]
    w.sim_views.setValue(60)  # another geometry: simulated
    w.use_selected_layer()
    assert w.measurement is not ct and len(w.measurement.operator["angles_deg"]) == 60
    # a measurement layer is the measurement, whatever the options say
    viewer.layers.selection.active = viewer.layers["CT 23 views measurement (ct)"]
    w.sim_modality.setCurrentText("pet")
    n = len(notes)
    w.use_selected_layer()
    assert w.measurement is ct and len(notes) == n


def test_presets_and_last_settings_persist(make_napari_viewer, qtbot, tmp_path, tiny_priors):
    viewer, w = _widget(make_napari_viewer, qtbot)
    w.method_combo.setCurrentIndex(w.method_combo.findData("mcg"))
    w.spins["n_steps"].setValue(37)
    w.spins["zeta"].setValue(0.25)
    w.seed.setValue(7)
    w.n_samples.setValue(4)
    w.std_pool.setValue(0.0)  # raw per-voxel std instead of the default pooling
    w.precision_combo.setCurrentText("bfloat16")
    w.set_prior_weight(2.0)
    assert w.set_prior(str(tiny_priors["ct"]))
    path = w.save_preset(tmp_path / "p.json")
    d = json.loads(path.read_text())
    assert d["settings"]["method"] == "mcg" and d["settings"]["params"]["n_steps"] == 37
    assert d["settings"]["std_pool"] == 0.0 and d["settings"]["precision"] == "bfloat16"
    w2 = main_widget(viewer, restore_last=False)
    assert w2.current_settings().precision == "float32"
    assert w2.current_settings().method != "mcg"
    assert w2.load_preset(path)
    s1, s2 = w.current_settings().to_dict(), w2.current_settings().to_dict()
    assert s2 == s1
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "something else"}')
    assert w2.load_preset(bad) is False
    assert w2.current_settings().to_dict() == s1
    # closing remembers the settings; a new widget (a napari restart) restores them
    w.close()
    assert (tmp_path / "config" / "last_settings.json").exists()
    w3 = main_widget(viewer)
    assert w3.current_settings().to_dict() == s1
    for x in (w2, w3):
        x.deleteLater()


def test_hot_start_run(make_napari_viewer, qtbot, tiny_priors):
    viewer, w = _widget(make_napari_viewer, qtbot)
    _prepare(w, "ct_sparse23", tiny_priors["ct"], n_steps=50, slow=0)
    w.compare.setChecked(False)
    w.hot_start.setChecked(False)
    w.hot_start.setChecked(True)  # the tuned hot-start values for DDS come in (samplers.defaults)
    assert not w.param_rows["t0"].isHidden()
    from napari_diffrecon.samplers.defaults import recommended_params

    tuned = recommended_params("dds", "ct", hot_start=True)
    assert tuned.t0 < 1 and w.spins["n_steps"].value() == tuned.n_steps
    assert w.spins["t0"].value() == pytest.approx(tuned.t0)
    assert w.spins["orientations"].value() == tuned.orientations == 8  # CT hot starts: the orientation ensemble
    assert not w.param_rows["orientations"].isHidden()
    w.spins["n_steps"].setValue(6)
    w.spins["t0"].setValue(0.3)
    w.spins["orientations"].setValue(4)
    _run_to_end(w, qtbot)
    prov = w.layers["estimate"].metadata["provenance"]
    assert prov["hot_start_method"] == "tv" and prov["settings"]["params"]["t0"] == pytest.approx(0.3)
    assert prov["nfe"] == 6 and prov["settings"]["params"]["orientations"] == 4
    w.hot_start.setChecked(False)  # from noise: every sample upright again
    assert w.spins["orientations"].value() == 1


def test_song_on_noisy_mri_warns_in_a_notification_and_the_provenance(make_napari_viewer, qtbot, tiny_priors, notes):
    viewer, w = _widget(make_napari_viewer, qtbot)
    _prepare(w, "mri_4x_8coils", tiny_priors["mri"], slow=0)
    w.compare.setChecked(False)
    w.method_combo.setCurrentIndex(w.method_combo.findData("song"))
    w.spins["n_steps"].setValue(4)
    _run_to_end(w, qtbot)
    prov = w.layers["estimate"].metadata["provenance"]
    assert prov["noise_floor"] > 0.01 and any("hard projection" in x for x in prov["warnings"])
    assert sum("hard projection" in m for m in notes) == 1 and "warning" in w.status.text()  # shown once
    # the worker says it before the first step (the user need not wait for the run to learn it)
    from napari_diffrecon._widgets._runner import run_stream

    kinds = [u.kind for u in run_stream(w.measurement, w._run_settings, prior=None, max_rate=1e6)]
    assert kinds[0] == "warnings" and "iterate" in kinds and kinds[-1] == "final"


def test_a_shipped_prior_of_another_modality_gives_way_a_file_prior_stays(make_napari_viewer, qtbot, tiny_priors,
                                                                         notes):
    viewer, w = _widget(make_napari_viewer, qtbot)
    w.load_sample("mri_4x_8coils")
    w.prior_combo.setCurrentIndex(w.prior_combo.findData("mri-brain-128"))  # picked (or restored from last session)
    assert w.prior_source == "mri-brain-128"
    w.load_sample("ct_sparse23")
    assert w.prior is None and w.prior_combo.currentIndex() == 0 and w.mismatch_label.text() == ""
    assert any("'mri-brain-128' is for MRI" in m for m in notes)
    # the last run's *default* prior (combo left at "default for the modality") gives way silently
    assert w.set_prior("ct-phantom-128") and w.prior_combo.currentIndex() == 0
    n = len(notes)
    w.load_sample("mri_4x_8coils")
    assert w.prior is None and w.mismatch_label.text() == "" and len(notes) == n
    # a prior the user loaded from a file is theirs: kept, with its mismatch explained
    assert w.set_prior(str(tiny_priors["ct"]))
    w.load_sample("mri_4x_8coils")
    assert w.prior is not None and "complex" in w.mismatch_label.text()


def test_a_classical_run_after_a_diffusion_run_marks_the_earlier_run_s_layers(make_napari_viewer, qtbot, tiny_priors):
    """A TV run after DDS used to replace the baseline and residual and leave the DDS mean, std and support map
    looking like its own: their names now say which run they hold, until a run writes them again. A result layer the
    user renamed is theirs: never renamed nor written to again."""
    from napari_diffrecon._widgets._tuning import FLAG_NAME, SUPPORT_NAME

    viewer, w = _widget(make_napari_viewer, qtbot)
    _prepare(w, "ct_sparse23", tiny_priors["ct"], n_steps=3, slow=0)
    w.n_samples.setValue(2)
    _run_to_end(w, qtbot)
    assert w.tuning.show_support() is not None
    iterate = w.layers["iterate"]
    iterate.name = "my DDS iterate"  # the user keeps this one
    kept = np.array(iterate.data)
    w.method_combo.setCurrentIndex(w.method_combo.findData("tv"))
    w.spins["iters"].setValue(5)
    _run_to_end(w, qtbot)
    names = {layer.name for layer in viewer.layers}
    assert {"baseline (tv)", LAYER_NAMES["residual"], "my DDS iterate"} <= names  # this run's, and the user's
    for role in ("estimate", "mean", "std"):
        assert f"{LAYER_NAMES[role]} [earlier dds run]" in names, role
        assert not w.layers[role].visible, role  # hidden: the earlier std must not cover the new baseline
    assert w.layers["residual"].visible
    assert f"{SUPPORT_NAME} [earlier dds run]" in names and f"{FLAG_NAME} [earlier dds run]" in names
    assert not any(n.startswith(LAYER_NAMES["mean"]) and "earlier" not in n for n in names)
    assert w.tuning.show_support() is None  # no posterior of the last run to map (the earlier one's is not used)
    n_layers = len(viewer.layers)
    w.method_combo.setCurrentIndex(w.method_combo.findData("dds"))
    w.compare.setChecked(False)
    _run_to_end(w, qtbot)
    names = {layer.name for layer in viewer.layers}
    for role in ("iterate", "estimate", "mean", "std", "residual"):
        assert LAYER_NAMES[role] in names, role  # written again: this run's
        assert w.layers[role].visible, role
    assert "baseline (tv) [earlier tv run]" in names  # not computed this time
    assert len(viewer.layers) == n_layers + 1  # a new iterate layer beside the user's
    assert w.layers["iterate"] is not iterate and iterate.name == "my DDS iterate"
    np.testing.assert_array_equal(iterate.data, kept)
    std = w.layers["std"]
    std.name = "my std"  # renamed while a run streams into it: the name stays, the next run leaves the layer alone
    w._show("std", np.zeros_like(std.data))
    assert std.name == "my std"
    w._mark_earlier_results()  # what the next run does first
    assert std.name == "my std" and "std" not in w.layers


def test_what_the_workbench_changes_itself_mid_run_waits_for_the_next_run(make_napari_viewer, qtbot, tiny_priors):
    """Tuned values refilled mid-run (another method picked, other data loaded) and a σ typed mid-run are for the next
    run: the run in flight keeps its parameters and its noise model, and its provenance says what it used (before,
    loading the PET sample mid-run set the CT run's γ to PET's 10 and logged it as the user's change, and the σ typed
    landed in the finished run's provenance). The user's own moves still act live; a stopped run names its prior."""
    viewer, w = _widget(make_napari_viewer, qtbot)
    w.method_combo.setCurrentIndex(w.method_combo.findData("dds"))
    _prepare(w, "ct_sparse23", tiny_priors["ct"], n_steps=12, slow=0.1)
    w.compare.setChecked(False)
    w.draw_combo.setCurrentIndex(w.draw_combo.findData("jacobian"))
    sigma = float(w.measurement.noise["sigma"])
    gamma = w.spins["gamma"].value()
    worker = w.run()
    acted = []

    def on_update(upd):
        if upd.kind == "iterate" and not acted:
            acted.append(upd.step)
            w.noise_sigma.setValue(5 * sigma)  # edits the measurement, for the next run
            w.method_combo.setCurrentIndex(w.method_combo.findData("mcg"))  # tuned values refilled: not live
            w.method_combo.setCurrentIndex(w.method_combo.findData("dds"))
            w.precision_combo.setCurrentText("bfloat16")  # refuses the structured draw: for the next run
            w.spins["cg_iters"].setValue(3)  # the user's own move: live

    worker.yielded.connect(on_update)
    qtbot.waitUntil(lambda: not w.running, timeout=60_000)
    prov = w.last_provenance
    assert acted and [set(c) - {"after_step", "t"} for c in prov["live_parameter_changes"]] == [{"cg_iters"}]
    assert prov["settings"]["params"]["gamma"] == pytest.approx(gamma)
    assert prov["settings"]["params"]["extra"]["posterior_draw"] == "jacobian"
    w.precision_combo.setCurrentText("float32")
    assert prov["noise"]["sigma"] == pytest.approx(sigma)  # what the run used
    assert w.measurement.noise["sigma"] == pytest.approx(5 * sigma)  # what the next run will use
    index = viewer.layers.index  # the opaque std lies under this run's images (grid off: it covered them)
    assert index(w.layers["std"]) < min(index(w.layers[r]) for r in ("iterate", "estimate", "mean"))
    # a stopped run names the prior it ran with, not the one picked during the run
    _slow(w, 0.2)
    worker = w.run()
    qtbot.waitUntil(lambda: "estimate" in w.layers and w._last_update is not None, timeout=30_000)
    w.prior_combo.setCurrentIndex(0)
    w.stop_btn.click()
    qtbot.waitUntil(lambda: not w.running, timeout=10_000)
    assert w.last_provenance["status"] == "stopped"
    assert w.last_provenance["prior"] == w._run_prior_name is not None


def test_a_damaged_preset_changes_nothing_and_a_damaged_last_session_does_not_block_the_dock(make_napari_viewer,
                                                                                           qtbot, tmp_path):
    """Wrongly typed values in a preset or in last_settings.json raised TypeError from a spin box (the dock could not
    open again until the file was deleted); numbers written as 50.0 or "50" are read as numbers."""
    from napari_diffrecon._widgets import _presets

    viewer, w = _widget(make_napari_viewer, qtbot)
    good = w.save_preset(tmp_path / "good.json")
    d = json.loads(good.read_text())
    d["settings"]["params"]["n_steps"] = 37.0
    d["settings"]["params"]["gamma"] = "2.5"
    (tmp_path / "typed.json").write_text(json.dumps(d))
    assert w.load_preset(tmp_path / "typed.json")
    assert w.spins["n_steps"].value() == 37 and w.spins["gamma"].value() == pytest.approx(2.5)
    before = w.current_settings().to_dict()
    for name, edit in (("steps", lambda s: s["settings"]["params"].update(n_steps="many")),
                       ("negative", lambda s: s["settings"]["params"].update(n_steps=-5)),
                       ("nan", lambda s: s["settings"]["params"].update(gamma=float("nan"))),
                       ("samples", lambda s: s["settings"].update(n_samples=None)),
                       ("method", lambda s: s["settings"].update(method="bogus")),
                       ("gui", lambda s: s.update(gui=[1]))):
        bad = json.loads(good.read_text())
        edit(bad)
        (tmp_path / f"{name}.json").write_text(json.dumps(bad))
        assert w.load_preset(tmp_path / f"{name}.json") is False, name
        assert w.current_settings().to_dict() == before, name
    # values from_dict passes but the boxes cannot hold: the widgets are restored as they were (all or nothing)
    w.method_combo.setCurrentIndex(w.method_combo.findData("dds"))
    w.spins["gamma"].setValue(7.0)
    before = w.current_settings().to_dict()
    for name, edit in (("lam", lambda s: s["settings"].update(method="tv", baseline_params={"lam_rel": "abc"})),
                       ("huge", lambda s: s["settings"].update(method="tv", seed=2**40)),
                       ("range", lambda s: s["settings"]["params"].update(n_steps=10**12))):
        bad = json.loads(good.read_text())
        edit(bad)
        (tmp_path / f"{name}.json").write_text(json.dumps(bad))
        assert w.load_preset(tmp_path / f"{name}.json") is False, name
        assert w.current_settings().to_dict() == before, name
    (tmp_path / "config").mkdir(exist_ok=True)
    (_presets.config_dir() / "last_settings.json").write_text((tmp_path / "huge.json").read_text())
    main_widget(viewer).deleteLater()  # opens
    (_presets.config_dir() / "last_settings.json").write_text((tmp_path / "steps.json").read_text())
    w2 = main_widget(viewer)  # opens, with its defaults
    assert w2.method_combo.currentData()
    w2.deleteLater()


def test_use_selected_layer_simulates_the_slice_on_screen(make_napari_viewer, qtbot, notes):
    """With a second volume of finer z spacing open, "Use selected layer" simulated slice 0 while slice 10 was shown
    (it took the world grid's step as the layer's index, modulo its depth); a rolled view simulated a slice of
    another plane. Now the layer's own index of the slice shown, and a refusal when no slice of it is shown."""
    viewer, w = _widget(make_napari_viewer, qtbot)
    yy, xx = np.mgrid[:64, :64] - 31.5
    vol = np.stack([(np.hypot(yy, xx) < 4 + k).astype(np.float32) for k in range(20)])  # slice k: radius 4 + k
    layer = viewer.add_image(vol, name="discs")
    viewer.add_image(np.zeros((40, 64, 64), np.float32), name="finer z", scale=(0.5, 1, 1))
    viewer.dims.set_point(0, 10)
    viewer.layers.selection.active = layer
    w.sim_modality.setCurrentText("mri")
    w.sim_size.setValue(64)
    w.sim_coils.setValue(1)
    w.use_selected_layer()
    gt = np.abs(w.measurement.ground_truth)
    radius = np.sqrt((gt > 0.5 * gt.max()).sum() / np.pi)
    assert abs(radius - 14) < 1.0, radius  # slice 10 (radius 14), not slice 0 (radius 4)
    viewer.dims.order = (1, 0, 2)  # a rolled view shows no slice of the layer's first axis
    viewer.layers.selection.active = layer
    before = w.measurement
    w.use_selected_layer()
    assert w.measurement is before and "does not show one of its slices" in notes[-1]
