"""GUI: the few-step consistency sampler is in the workbench like any sampler (run under xvfb-run)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from napari_diffrecon._widgets import _presets, main_widget  # noqa: E402

pytestmark = pytest.mark.usefixtures("gui_config_in_tmp")


def test_consistency_sampler_runs_in_the_workbench_with_the_shipped_consistency_model(make_napari_viewer, qtbot):
    from napari_diffrecon.io._napari import core_values
    from napari_diffrecon.metrics import psnr
    from napari_diffrecon.priors import default_prior_for

    viewer = make_napari_viewer()
    w = main_widget(viewer)
    viewer.window.add_dock_widget(w, name="Diffusion reconstruction")
    w.load_sample("ct_sparse23")
    w.method_combo.setCurrentIndex(w.method_combo.findData("consistency"))
    # Its own parameters: steps, data weight, CG steps (no η: the consistency map re-noises with fresh noise).
    assert not w.param_rows["gamma"].isHidden() and not w.param_rows["cg_iters"].isHidden()
    assert w.param_rows["eta"].isHidden() and w.param_rows["zeta"].isHidden()
    w.hot_start.setChecked(True)  # the tuned few-step hot start comes in
    assert w.spins["n_steps"].value() == 4 and w.spins["t0"].value() == pytest.approx(0.25)
    w.n_samples.setValue(1)
    w.compare.setChecked(False)
    worker = w.run()
    assert worker is not None
    qtbot.waitUntil(lambda: not w.running, timeout=120_000)
    prov = w.layers["estimate"].metadata["provenance"]
    assert prov["settings"]["method"] == "consistency" and prov["nfe"] == 4
    assert prov["prior"] == default_prior_for("ct", consistency=True) == "ct-phantom-128-consistency"
    gt = w.measurement.ground_truth
    assert gt is not None
    est = w.layers["estimate"]
    assert est.metadata["units"] == "HU"  # shown in Hounsfield units; the core's attenuation per pixel comes back
    x = core_values(est.data, est.metadata)
    assert psnr(x, gt) > 27.0  # FBP of this sample: 24.9 dB


def _ct_workbench_showing(make_napari_viewer, row, shown_for):
    """The workbench on the CT sample; ``row`` must be shown for the methods in ``shown_for`` only. Ends on DDS."""
    viewer = make_napari_viewer()
    w = main_widget(viewer)
    viewer.window.add_dock_widget(w, name="Diffusion reconstruction")
    w.load_sample("ct_sparse23")
    for method in ("dds", "dps", "consistency", "fbp"):
        w.method_combo.setCurrentIndex(w.method_combo.findData(method))
        assert w.param_rows[row].isHidden() is (method not in shown_for), method
    w.method_combo.setCurrentIndex(w.method_combo.findData("dds"))
    return w


def test_adaptation_options_for_dds_and_dps_reach_the_run(make_napari_viewer, qtbot):
    w = _ct_workbench_showing(make_napari_viewer, "adapt_steps", ("dds", "dps"))
    assert w.current_settings().params.extra == {}  # off by default: no adaptation keys
    w.spins["n_steps"].setValue(3)
    w.spins["adapt_steps"].setValue(1)
    w.spins["adapt_start"].setValue(0.0)
    extra = w.current_settings().params.extra
    # the rows start where DPS gained on every measured draw (lr 1e-3 every 2nd step), not at lr 3e-3 every step
    assert extra["adapt_steps"] == 1 and extra["adapt_lr"] == pytest.approx(1e-3) and extra["adapt_start"] == 0.0
    assert extra["adapt_every"] == 2 and isinstance(extra["adapt_every"], int)
    assert not w.param_rows["adapt_every"].isHidden()
    w.spins["adapt_every"].setValue(1)
    assert w.current_settings().params.extra["adapt_every"] == 1
    w.n_samples.setValue(1)
    w.compare.setChecked(False)
    assert w.run() is not None
    qtbot.waitUntil(lambda: not w.running, timeout=120_000)
    prov = w.layers["estimate"].metadata["provenance"]
    assert prov["settings"]["params"]["extra"]["adapt_steps"] == 1
    assert prov["nfe"] > 3  # the adaptation's network passes are counted
    # a preset round trip keeps the options
    w.spins["adapt_steps"].setValue(0)
    w.apply_settings(w._run_settings)
    assert w.spins["adapt_steps"].value() == 1


def test_renoise_choice_for_dds_reaches_the_run_acts_live_and_round_trips(make_napari_viewer, qtbot):
    w = _ct_workbench_showing(make_napari_viewer, "renoise", ("dds",))
    assert w.current_settings().params.renoise == "dds"  # the tuned value (samplers.defaults.RECOMMENDED)
    w.renoise_combo.setCurrentIndex(w.renoise_combo.findData("ddim"))
    assert w.current_settings().params.renoise == "ddim"
    w.spins["n_steps"].setValue(4)
    w.compare.setChecked(False)
    assert w.run() is not None
    w.renoise_combo.setCurrentIndex(w.renoise_combo.findData("dds"))  # while the run is in flight
    assert w._live_params.renoise == "dds"
    qtbot.waitUntil(lambda: not w.running, timeout=120_000)
    prov = w.layers["estimate"].metadata["provenance"]
    assert prov["settings"]["params"]["renoise"] == "dds"
    assert any(c.get("renoise") == "dds" for c in prov["live_parameter_changes"])
    settings = w.current_settings()
    settings.params.renoise = "ddim"
    w.apply_settings(settings)  # a preset round trip restores the choice
    assert w.renoise_combo.currentData() == "ddim"
    w.use_recommended()
    assert w.renoise_combo.currentData() == "dds"


def test_posterior_draw_choice_for_dds_reaches_the_run_and_acts_live(make_napari_viewer, qtbot):
    w = _ct_workbench_showing(make_napari_viewer, "posterior_draw", ("dds",))
    assert "posterior_draw" not in w.current_settings().params.extra  # the paper's mean step by default
    w.draw_combo.setCurrentIndex(w.draw_combo.findData("jacobian"))
    assert w.current_settings().params.extra["posterior_draw"] == "jacobian"
    w.spins["n_steps"].setValue(4)
    w.n_samples.setValue(2)
    w.compare.setChecked(False)
    assert w.run() is not None
    w.draw_combo.setCurrentIndex(0)  # back to the mean while the run is in flight: written into its parameters
    assert w._live_params.extra["posterior_draw"] is None
    qtbot.waitUntil(lambda: not w.running, timeout=120_000)
    prov = w.layers["estimate"].metadata["provenance"]
    assert prov["settings"]["params"]["extra"]["posterior_draw"] is None  # the value the run ended with
    assert any(c.get("posterior_draw", "") is None for c in prov["live_parameter_changes"])
    w.draw_combo.setCurrentIndex(w.draw_combo.findData("gaussian"))
    settings = w.current_settings()
    w.draw_combo.setCurrentIndex(0)
    w.apply_settings(settings)  # a preset round trip restores the choice
    assert w.draw_combo.currentData() == "gaussian"
    settings.params.extra["posterior_draw"] = True  # the core's legacy spelling of the isotropic draw
    w.draw_combo.setCurrentIndex(0)
    w.apply_settings(settings)
    assert w.draw_combo.currentData() == "gaussian"
    # PET's EM data step has no Gaussian form: the isotropic draw is not offered, the structured one takes its place
    w.load_sample("pet_lowcount")
    gauss = w.draw_combo.findData("gaussian")
    assert not w.draw_combo.model().item(gauss).isEnabled() and w.draw_combo.currentData() == "jacobian"
    w.load_sample("ct_sparse23")
    assert w.draw_combo.model().item(gauss).isEnabled()
    # the structured draw's probe needs a float32 network
    jac = w.draw_combo.findData("jacobian")
    w.precision_combo.setCurrentText("bfloat16")
    assert not w.draw_combo.model().item(jac).isEnabled() and w.draw_combo.currentData() is None
    w.precision_combo.setCurrentText("float32")
    assert w.draw_combo.model().item(jac).isEnabled()


def test_the_workbench_starts_dps_from_the_coil_aware_tuned_step(make_napari_viewer):
    """The 8-coil MRI sample gets DPS's multi-coil step (ζ 4 from noise, 2 hot-started); CT keeps its 6."""
    from napari_diffrecon.samplers.defaults import recommended_params

    viewer = make_napari_viewer()
    w = main_widget(viewer)
    viewer.window.add_dock_widget(w, name="Diffusion reconstruction")
    w.load_sample("mri_4x_8coils")
    w.method_combo.setCurrentIndex(w.method_combo.findData("dps"))
    assert w.hot_start.isChecked() and w.current_settings().params.zeta == 2.0  # hot start: the default
    w.hot_start.setChecked(False)
    assert w.current_settings().params.zeta == recommended_params("dps", "mri", coils=8).zeta == 4.0
    # Loading data of another kind brings its tuned values in without touching the method (they were stale before).
    w.load_sample("ct_sparse23")
    assert w.current_settings().params.zeta == 6.0
    w.load_sample("pet_lowcount")
    assert w.current_settings().params.zeta == 40.0
    w.spins["zeta"].setValue(25.0)  # the user's own value for this kind of data stays with the next PET scan
    w.load_sample("pet_lowcount")
    assert w.current_settings().params.zeta == 25.0


def test_the_workbench_takes_song_s_pseudo_inverse_steps_from_the_data_s_noise(make_napari_viewer):
    """Song on noisy data (the 8-coil MRI sample's floor is 13 %, PET counts) gets one CG step per pseudo-inverse;
    the nearly noise-free sparse-view CT sample (floor 0.8 %) keeps 5."""
    from napari_diffrecon.samplers.defaults import tuning_keys

    viewer = make_napari_viewer()
    w = main_widget(viewer)
    viewer.window.add_dock_widget(w, name="Diffusion reconstruction")
    w.load_sample("ct_sparse23")
    w.method_combo.setCurrentIndex(w.method_combo.findData("song"))
    assert w.current_settings().params.cg_iters == 5 and tuning_keys(*w._data_kind()) == ("ct",)
    w.load_sample("mri_4x_8coils")
    assert w.current_settings().params.cg_iters == 1
    assert tuning_keys(*w._data_kind()) == ("mri", "mri-multicoil", "noisy")
    w.load_sample("ct_sparse23")
    assert w.current_settings().params.cg_iters == 5
    w.load_sample("pet_lowcount")
    assert w.current_settings().params.cg_iters == 1


def test_the_workbench_follows_the_noise_sigma_and_keeps_values_the_data_do_not_change(make_napari_viewer):
    """Raising the sparse-view CT sample's σ five-fold (floor 0.8 % → 4 %) makes it noisy data: Song's tuned CG steps
    follow (5 → 1). The user's DDS γ stays when data whose tuned DDS values are the same are loaded (sparse and noisy
    CT), and the noise level the user typed is no longer an assumption."""
    viewer = make_napari_viewer()
    w = main_widget(viewer)
    viewer.window.add_dock_widget(w, name="Diffusion reconstruction")
    w.load_sample("ct_sparse23")
    w.method_combo.setCurrentIndex(w.method_combo.findData("song"))
    assert w.current_settings().params.cg_iters == 5
    sigma = float(w.measurement.noise["sigma"])
    w.measurement.noise = {**w.measurement.noise, "note": "default σ (assumed)"}
    w.noise_sigma.setValue(5 * sigma)
    assert w._data_kind() == ("ct", None, True) and w.current_settings().params.cg_iters == 1
    assert "note" not in w.measurement.noise and "assumed" not in w.measurement.noise
    w.noise_sigma.setValue(sigma)
    assert w.current_settings().params.cg_iters == 5
    # DDS: the same tuned values on noisy and nearly noise-free CT, so the user's γ survives the switch
    w.method_combo.setCurrentIndex(w.method_combo.findData("dds"))
    w.spins["gamma"].setValue(7.0)
    w.noise_sigma.setValue(5 * sigma)
    assert w._data_kind()[2] and w.current_settings().params.gamma == 7.0


def _session(make_napari_viewer):
    """A fresh viewer and workbench (a napari restart: the last settings are restored)."""
    viewer = make_napari_viewer()
    w = main_widget(viewer)
    viewer.window.add_dock_widget(w, name="Diffusion reconstruction")
    return w


def test_restored_settings_stay_for_the_last_run_s_kind_of_data_only(make_napari_viewer, tmp_path, notes):
    """The last run's values (the user's own among them) stay for data of the kind it ran on; data of another kind
    bring in their tuned values with a notice, as within a session (restored CT γ 3 was kept for MRI and PET)."""
    import json

    from napari_diffrecon.samplers.defaults import recommended_params

    w = _session(make_napari_viewer)
    w.load_sample("ct_sparse23")
    w.spins["n_steps"].setValue(7)  # the user's own values
    w.spins["gamma"].setValue(7.0)
    w.close()  # remembers the settings and the kind of data they were for

    w = _session(make_napari_viewer)
    assert w.spins["n_steps"].value() == 7 and w.spins["gamma"].value() == 7.0
    w.load_sample("ct_sparse23")  # the same kind of data: the user's values stay, silently
    assert w.spins["n_steps"].value() == 7 and w.spins["gamma"].value() == 7.0
    assert not any("last session" in m for m in notes)
    w.load_sample("mri_4x_8coils")  # another kind: its tuned values, and the user is told
    tuned = recommended_params("dds", "mri", hot_start=True, coils=8, noisy=True)
    assert w.spins["gamma"].value() == tuned.gamma == 2.0 and w.spins["n_steps"].value() == tuned.n_steps
    assert sum("last session's dds values were for CT data" in m for m in notes) == 1
    assert "noisy 8-coil MRI" in notes[-1]
    w.load_sample("pet_lowcount")  # from here on as within a session (no further notice)
    assert w.spins["gamma"].value() == 5.0
    w.load_sample("ct_sparse23")
    assert w.spins["gamma"].value() == 3.0
    assert sum("last session" in m for m in notes) == 1

    # The restart straight into data of another kind (the reported case: MRI, then PET kept CT's γ 3).
    w.spins["n_steps"].setValue(2)
    w.close()
    last = json.loads((tmp_path / "config" / "last_settings.json").read_text())
    assert last["gui"]["data_kind"] == ["ct", None, False]
    w = _session(make_napari_viewer)
    w.load_sample("mri_4x_8coils")
    assert w.spins["gamma"].value() == 2.0 and w.spins["n_steps"].value() == tuned.n_steps == 30  # MRI hot start
    w.load_sample("pet_lowcount")
    assert w.spins["gamma"].value() == 5.0

    # A settings file without the data kind (an older version's): the values stay for the first data, then follow.
    from napari_diffrecon._widgets import _presets

    w.spins["gamma"].setValue(4.0)
    _presets.save_last(w.current_settings(), w.gui_state())
    w = _session(make_napari_viewer)
    w.load_sample("mri_4x_8coils")
    assert w.spins["gamma"].value() == 4.0
    w.load_sample("pet_lowcount")
    assert w.spins["gamma"].value() == 5.0 and "were for noisy 8-coil MRI data" in notes[-1]
    # a preset the user loads is theirs for any data
    path = w.save_preset(tmp_path / "mine.json")
    w.load_sample("ct_sparse23")
    assert w.load_preset(path) and w.spins["gamma"].value() == 5.0
    w.load_sample("mri_4x_8coils")
    assert w.spins["gamma"].value() == 5.0


def test_orientation_row_shows_for_the_conditional_samplers_and_an_older_last_session_gets_the_tuned_value(
        make_napari_viewer, tmp_path):
    """The orientation ensemble's row is shown for the conditional samplers only (a hidden value never reaches a run);
    last settings saved before the row existed come back with the tuned value (8 for DDS hot starts on CT), not the
    class default 1, while a value the user saved stays."""
    import json

    w = _ct_workbench_showing(make_napari_viewer, "orientations", {"dds", "dps", "consistency"})
    w.method_combo.setCurrentIndex(w.method_combo.findData("ddim"))
    w.spins["orientations"].setValue(8)
    assert w.param_rows["orientations"].isHidden() and w.current_settings().params.orientations == 1
    w.method_combo.setCurrentIndex(w.method_combo.findData("dds"))
    w.hot_start.setChecked(True)
    assert w.spins["orientations"].value() == 8
    w.spins["orientations"].setValue(2)  # the user's own value
    w.close()
    last = tmp_path / "config" / "last_settings.json"
    d = json.loads(last.read_text())
    assert d["settings"]["params"]["orientations"] == 2
    assert _session(make_napari_viewer).spins["orientations"].value() == 2
    del d["settings"]["params"]["orientations"]  # as an older version wrote it
    last.write_text(json.dumps(d))
    w = _session(make_napari_viewer)
    assert w.hot_start.isChecked() and w.spins["orientations"].value() == 8


def test_grid_view_fits_the_tiles_again_when_layers_are_added(make_napari_viewer):
    """With "side by side" on (restored from the last session), loaded data are shown whole, not cropped."""
    w = _session(make_napari_viewer)
    w.grid.setChecked(True)
    w.load_sample("mri_4x_8coils")
    w.load_sample("ct_sparse23")
    viewer = w.viewer
    camera = getattr(viewer, "scene", viewer).camera  # viewer.camera before napari 0.9

    def view():
        return (camera.zoom, *camera.center)

    seen = view()
    viewer.reset_view()
    assert seen == pytest.approx(view())


def test_the_prior_card_shows_the_default_prior_a_run_will_use(make_napari_viewer):
    """With "(default for the modality)" the card is that of the prior a run will load for the data (it was blank)."""
    from napari_diffrecon._widgets._main import NONE_PRIOR
    from napari_diffrecon.priors import default_prior_for

    w = _session(make_napari_viewer)
    assert w.prior_combo.currentText() == NONE_PRIOR and w.prior is None
    assert "load data to see which" in w.card_label.text()
    w.load_sample("ct_sparse23")
    assert w.prior is None and w.card_label.text().startswith(f"default for CT: <b>{default_prior_for('ct')}</b>")
    w.method_combo.setCurrentIndex(w.method_combo.findData("consistency"))  # its default is a consistency model
    assert f"<b>{default_prior_for('ct', consistency=True)}</b>" in w.card_label.text()
    w.method_combo.setCurrentIndex(w.method_combo.findData("dds"))
    w.load_sample("mri_4x_8coils")
    assert w.card_label.text().startswith(f"default for MRI: <b>{default_prior_for('mri', True)}</b>")
    w.prior_combo.setCurrentIndex(w.prior_combo.findData("pet-phantom-128"))  # a chosen prior: its own card
    assert w.card_label.text().startswith("<b>pet-phantom-128</b>")
    w.prior_combo.setCurrentIndex(0)
    assert w.card_label.text().startswith(f"default for MRI: <b>{default_prior_for('mri', True)}</b>")


def test_the_prior_card_is_short_and_its_tooltip_holds_the_whole_card():
    """Every shipped card fits in a few lines of the dock (the CT card's licence alone is ~600 characters and pushed
    the sampler's settings out of sight); nothing is lost: the tooltip has the data description and full licence."""
    from napari_diffrecon._widgets._main import card_text, card_tooltip
    from napari_diffrecon.priors import list_priors

    cards = list_priors()
    assert "ct-phantom-128" in cards
    for name, card in cards.items():
        text, tip = card_text(card), card_tooltip(card)
        assert text.startswith(f"<b>{name}</b>") and len(text) < 260, text
        data = card.training.get("data", {})
        assert str(data.get("licence") or card.training.get("licence")) in tip
        if isinstance(data, dict) and data.get("description"):
            assert data["description"] in tip
        assert "unknown data" not in card.summary()  # cards name their source as "source"
    ct = card_text(cards["ct-phantom-128"])
    assert "fine-tuned" in ct and "builtin:ct-phantoms-real-chest" in ct and "hover for the full card" in ct


def test_an_export_over_an_existing_file_says_what_to_do_in_the_gui(make_napari_viewer, tmp_path, notes):
    """The message names the GUI's ways out, not the command line's "--force"."""
    w = _session(make_napari_viewer)
    w.load_sample("ct_sparse23")
    gt = w.viewer.layers["CT 23 views ground truth"]
    path = tmp_path / "gt.nii.gz"
    assert w.export_layer(gt, path) == path
    assert w.export_layer(gt, path) is None
    assert "--force" not in notes[-1] and "gt.nii.gz already exists" in notes[-1]
    assert "choose another file name" in notes[-1] and "confirm replacing it" in notes[-1]
    folder = tmp_path / "folder.nii.gz"
    folder.mkdir()
    assert w.export_layer(gt, folder) is None and "is a directory" in notes[-1]  # the core's words say what to do


def _footprint(layer):
    """The world rectangle a 2D image layer covers (napari centres pixel i at translate + i * scale)."""
    n = np.asarray(layer.data.shape, dtype=float)
    return np.stack([layer.translate - 0.5 * layer.scale, layer.translate + (n - 0.5) * layer.scale])


def test_measurement_space_layers_lie_under_the_images_with_their_footprint(make_napari_viewer, qtbot):
    """The sinogram / k-space and data-residual layers (scale 1) covered the mm-scaled images and stretched beyond
    them: they lie under the images now, with the images' field of view (a grid tile of the same size)."""
    w = _session(make_napari_viewer)
    viewer = w.viewer
    for sample in ("ct_sparse23", "mri_4x_8coils"):
        viewer.layers.clear()
        w.load_sample(sample)
        gt, meas = (next(ly for ly in viewer.layers if ly.metadata.get("role") == r)
                    for r in ("ground truth", "measurement"))
        assert viewer.layers.index(gt) > viewer.layers.index(meas)  # the image on top
        assert viewer.layers.selection.active is meas  # "Use selected layer" adopts the measurement, as before
        np.testing.assert_allclose(_footprint(meas), _footprint(gt))
    viewer.layers.clear()
    w.load_sample("ct_sparse23")
    w.method_combo.setCurrentIndex(w.method_combo.findData("fbp"))
    assert w.run() is not None
    qtbot.waitUntil(lambda: not w.running, timeout=60_000)
    residual, baseline = w.layers["residual"], w.layers["baseline"]
    assert viewer.layers.index(residual) == 0 and viewer.layers.index(baseline) == len(viewer.layers) - 1
    assert residual.data.shape != baseline.data.shape
    np.testing.assert_allclose(_footprint(residual), _footprint(baseline))


def test_ct_layers_are_shown_in_hounsfield_units_and_simulated_from_as_such(make_napari_viewer):
    """The CT ground truth is shown in HU with a window in HU; simulating from it again (other views) reads it as HU
    at its pixel size: the new ground truth is the old one, not a re-normalised [0, 1] image mapped to air..bone."""
    w = _session(make_napari_viewer)
    w.load_sample("ct_sparse23")
    m = w.measurement
    inten = m.metadata["intensity"]
    gt = w.viewer.layers["CT 23 views ground truth"]
    assert gt.metadata["units"] == "HU" and "Hounsfield units" in w.meas_label.text()
    np.testing.assert_allclose(gt.data, (m.ground_truth - inten["offset"]) / inten["scale"], rtol=1e-5, atol=1e-2)
    w.viewer.layers.selection.active = gt
    w.sim_modality.setCurrentText("ct")
    w.sim_views.setValue(60)
    w.use_selected_layer()
    again = w.measurement
    assert again is not m and len(again.operator["angles_deg"]) == 60
    assert again.metadata["options"]["units"] == "HU"
    np.testing.assert_allclose(again.ground_truth, m.ground_truth, rtol=0, atol=1e-3 * float(m.ground_truth.max()))


def test_classical_iterations_default_to_each_method_s_own(make_napari_viewer):
    """One iterations box serves CG, TV, MLEM and OSEM, whose defaults differ 20 / 300 / noise level: at 'default'
    the run takes the method's own (TV got 50 iterations, OSEM 50 passes); a typed count is passed as it is."""
    from napari_diffrecon.reconstruct import RunSettings

    w = _session(make_napari_viewer)
    w.load_sample("pet_lowcount")
    w.use_selected_layer()
    assert w.spins["iters"].value() == 0 and w.spins["iters"].text() == "default"
    for method in ("mlem", "osem", "tv", "cg"):
        w.method_combo.setCurrentIndex(w.method_combo.findData(method))
        assert "iters" not in w.current_settings().baseline_params, method
    w.method_combo.setCurrentIndex(w.method_combo.findData("mlem"))
    w.spins["iters"].setValue(7)
    assert w.current_settings().baseline_params == {"iters": 7}
    w.apply_settings(RunSettings(method="mlem"))
    assert w.spins["iters"].value() == 0
    w.apply_settings(RunSettings(method="tv", baseline_params={"iters": 120, "lam_rel": 0.01}))
    assert w.spins["iters"].value() == 120


def test_a_new_measurement_gets_its_own_result_layers_and_windows_match(make_napari_viewer, qtbot):
    """CT then PET in one viewer: the PET run makes its own layers at PET's scale (the CT baseline layer used to be
    overwritten and kept CT's 0.66 mm pixels, so the PET result covered two thirds of its ground truth); the CT ones
    stay, named for their run and hidden. The ground truth is windowed as the results are; EM says when it stopped."""
    from napari_diffrecon.io._napari import display_limits

    w = _session(make_napari_viewer)
    w.load_sample("ct_sparse23")
    gt = w.viewer.layers["CT 23 views ground truth"]
    assert tuple(gt.contrast_limits) == pytest.approx(display_limits(gt.data))
    w.method_combo.setCurrentIndex(w.method_combo.findData("fbp"))
    w.run()
    qtbot.waitUntil(lambda: not w.running, timeout=60_000)
    ct_base = w.layers["baseline"]
    assert tuple(ct_base.scale) != (1.0, 1.0)
    w.load_sample("pet_lowcount")
    w.use_selected_layer()
    w.method_combo.setCurrentIndex(w.method_combo.findData("mlem"))
    w.run()
    qtbot.waitUntil(lambda: not w.running, timeout=60_000)
    pet_base = w.layers["baseline"]
    pet_gt = next(ly for ly in w.viewer.layers if ly.name.startswith("PET") and ly.name.endswith("ground truth"))
    assert pet_base is not ct_base and tuple(pet_base.scale) == tuple(pet_gt.scale) == (1.0, 1.0)
    assert ct_base in w.viewer.layers and not ct_base.visible and "[earlier fbp run]" in ct_base.name
    assert "stopped at the noise level after" in w.status.text()


def _hot_started_dds_on_the_23_view_sample(make_napari_viewer):
    viewer = make_napari_viewer()
    w = main_widget(viewer)
    viewer.window.add_dock_widget(w, name="Diffusion reconstruction")
    w.load_sample("ct_sparse23")
    w.method_combo.setCurrentIndex(w.method_combo.findData("dds"))
    w.hot_start.setChecked(True)
    return w


def test_the_workbench_hot_starts_limited_angle_ct_from_tv_and_says_so(make_napari_viewer):
    """The hot start's classical image follows the data (reconstruct.default_hot_start): TV for the 23-view sample and
    a 90° arc, FBP for 60 views over 180°, named on the check box and recorded in the settings a run gets."""
    from napari_diffrecon.simulate import simulate_from_image

    w = _hot_started_dds_on_the_23_view_sample(make_napari_viewer)
    assert "(TV)" in w.hot_start.text() and w.current_settings().hot_start == "tv"
    assert "few views" in w.hot_start.toolTip()
    yy, xx = np.mgrid[:48, :48]
    img = 0.2 + ((yy - 24) ** 2 + (xx - 20) ** 2 < 100) + 0.5 * (np.abs(yy - 30) < 4)
    w.set_measurement(simulate_from_image(img, "ct", size=48, views=60, seed=0), name="views60")
    assert "(FBP)" in w.hot_start.text() and w.current_settings().hot_start == "fbp"
    w.set_measurement(simulate_from_image(img, "ct", size=48, limited_angle=90.0, seed=0), name="arc90")
    assert "(TV)" in w.hot_start.text() and "limited arc" in w.hot_start.toolTip()
    assert "90 views over a 90° arc" in w.meas_label.text()
    assert w.current_settings().hot_start == "tv"
    w.load_sample("pet_lowcount")  # PET starts from TV as well
    assert "(TV)" in w.hot_start.text() and "MLEM" in w.hot_start.toolTip()
    assert w.current_settings().hot_start == "tv"


def test_the_hot_start_can_be_picked_with_its_parameters_and_a_preset_keeps_them(make_napari_viewer, tmp_path):
    """Besides "auto" (the data's start), the hot start may be any classical method of the data's modality; its
    parameter rows show beneath it and reach the run's settings (a preset's hot-start parameters are no longer
    shown and then dropped); a preset keeps "auto" as "auto" and a picked start as picked."""
    w = _hot_started_dds_on_the_23_view_sample(make_napari_viewer)
    offered = [w.start_combo.itemData(i) for i in range(w.start_combo.count())]
    assert offered == ["auto", "fbp", "cg", "tv"] and w.start_combo.currentText() == "auto (TV)"
    assert not w.param_rows["start"].isHidden() and not w.param_rows["lam_rel"].isHidden()
    w.spins["lam_rel"].setValue(0.001)
    s = w.current_settings()
    assert s.hot_start == "tv" and s.baseline_params == {"lam_rel": 0.001}
    w.start_combo.setCurrentIndex(w.start_combo.findData("fbp"))
    assert w.param_rows["lam_rel"].isHidden() and not w.param_rows["filter"].isHidden()
    assert "(FBP)" in w.hot_start.text()
    w.filter_combo.setCurrentText("hann")
    s = w.current_settings()
    assert s.hot_start == "fbp" and s.baseline_params == {"filter": "hann"}
    path = w.save_preset(tmp_path / "fbp_start.json")
    w.start_combo.setCurrentIndex(0)
    w.filter_combo.setCurrentText("default")
    w.hot_start.setChecked(False)
    assert w.param_rows["start"].isHidden() and w.param_rows["filter"].isHidden()
    assert w.current_settings().hot_start is None and w.current_settings().baseline_params == {}
    assert w.load_preset(path)
    s = w.current_settings()
    assert s.hot_start == "fbp" and s.baseline_params == {"filter": "hann"}
    # "auto" stays "auto": another measurement gets its own start
    w.start_combo.setCurrentIndex(0)
    path = w.save_preset(tmp_path / "auto_start.json")
    w.load_sample("pet_lowcount")
    assert [w.start_combo.itemData(i) for i in range(w.start_combo.count())] == ["auto", "fbp", "cg", "tv", "mlem",
                                                                                  "osem"]
    w.start_combo.setCurrentIndex(w.start_combo.findData("mlem"))
    assert w.load_preset(path) and w.start_combo.currentData() == "auto" and w.current_settings().hot_start == "tv"


def test_a_hot_started_run_shows_its_start_image_as_the_baseline_and_computes_it_once(tiny_priors, monkeypatch):
    """With a hot start the classical layer beside the run is the image the run starts from (TV for the 23-view
    sample, not FBP), computed once: the run's result is the one it gets without the side-by-side baseline."""
    import napari_diffrecon.reconstruct as rec
    from napari_diffrecon._widgets._runner import run_stream
    from napari_diffrecon.io import load_sample
    from napari_diffrecon.priors import load_prior
    from napari_diffrecon.samplers.defaults import recommended_params

    m = load_sample("ct_sparse23")
    prior = load_prior(str(tiny_priors["ct"]))
    settings = rec.RunSettings(method="dds", params=recommended_params("dds", "ct", hot_start=True, n_steps=2),
                               hot_start="auto", seed=0)
    calls = []
    real = rec._baseline
    monkeypatch.setattr(rec, "_baseline", lambda method, *a, **k: calls.append(method) or real(method, *a, **k))
    ups = list(run_stream(m, settings, prior=prior, baseline="fbp", max_rate=1e6))
    base = next(u for u in ups if u.kind == "baseline")
    final = next(u for u in ups if u.kind == "final")
    assert base.baseline_method == "tv" and calls == ["tv"]  # shown, and not computed again for the start
    assert final.provenance["hot_start_method"] == "tv"
    assert final.provenance["reference_params_used"] == base.provenance["baseline_params_used"]
    calls.clear()
    alone = [u for u in run_stream(m, settings, prior=prior, baseline=None, max_rate=1e6) if u.kind == "final"][0]
    assert calls == ["tv"]
    np.testing.assert_array_equal(alone.mean, final.mean)
    # a run from noise keeps the cheap baseline
    cold = rec.RunSettings(method="dds", params=recommended_params("dds", "ct", n_steps=2), seed=0)
    base = next(u for u in run_stream(m, cold, prior=prior, baseline="fbp", max_rate=1e6) if u.kind == "baseline")
    assert base.baseline_method == "fbp"


def test_an_auto_tune_result_for_data_loaded_before_is_not_applied(make_napari_viewer):
    """A search that finishes after other data were loaded wrote its values (CT's γ over MRI's tuned one) and its
    record reached the next run's provenance: it is dropped, and the status says why."""
    viewer = make_napari_viewer()
    w = main_widget(viewer)
    viewer.window.add_dock_widget(w, name="Diffusion reconstruction")
    w.load_sample("ct_sparse23")
    w.tuning._measurement = w.measurement  # the search started on the CT data
    w.load_sample("mri_4x_8coils")
    gamma = w.spins["gamma"].value()
    w.tuning._on_returned(object())  # (a result for the CT data; not looked at)
    assert w.spins["gamma"].value() == gamma and w.tuning.record is None
    assert "not applied" in w.status.text()


def test_a_traced_run_in_a_workbench_worker_shows_no_torch_notices():
    """superqt runs a worker inside catch_warnings() with filterwarnings("always") in front and shows every warning as
    a napari notification: tracing the network (in worker threads) must not flood them with torch's TracerWarnings
    and deprecation notices, nor may a RuntimeError escape as anything but WorkerRuntimeError."""
    import warnings

    import torch

    from napari_diffrecon._widgets._perf import WorkerRuntimeError, _carry_runtime_errors, original_error
    from napari_diffrecon.priors import ModelCard, NetworkPrior
    from napari_diffrecon.priors.network import build_network

    card = ModelCard(name="tiny-notices", modality="ct", channels=1, resolution=32,
                     architecture={"type": "diffusers.UNet2DModel", "preset": "tiny"})
    prior = NetworkPrior(build_network({**card.architecture, "channels": 1}), card)
    prior.trace = True

    def work():
        with torch.no_grad():
            prior.denoise(torch.randn(1, 1, 32, 32), 0.5)
        yield 1
        raise RuntimeError("stopped at step 2")

    gen = _carry_runtime_errors(work)()
    with warnings.catch_warnings(record=True) as seen:
        warnings.filterwarnings("always")
        assert next(gen) == 1
        with pytest.raises(WorkerRuntimeError, match="stopped at step 2") as err:
            next(gen)
    assert prior._traced is not None, "the network was traced"
    noisy = [w for w in seen if issubclass(w.category, torch.jit.TracerWarning) or "jit.trace" in str(w.message)]
    assert not noisy, [str(w.message)[:80] for w in noisy]
    assert isinstance(original_error(err.value), RuntimeError)


def test_the_gui_demo_runs_the_headless_demo_s_job_in_the_workbench(make_napari_viewer, qtbot):
    """`napari-diffrecon demo` with a display: the workbench opens on the 23-view CT sample with the demo's DDS run
    (shipped CT prior, TV hot start, 4 posterior samples, the orientation ensemble) already streaming, whatever the
    last session left; it ends with the mean and std beside the ground truth and the start image."""
    from napari_diffrecon._widgets import open_demo
    from napari_diffrecon.metrics import psnr
    from napari_diffrecon.samplers.defaults import recommended_params

    w = _session(make_napari_viewer)  # a last session with other settings
    w.method_combo.setCurrentIndex(w.method_combo.findData("dps"))
    w.n_samples.setValue(1)
    w.precision_combo.setCurrentText("bfloat16")
    w.close()
    last = _presets.config_dir() / "last_settings.json"
    before = last.read_text()
    viewer = make_napari_viewer()
    demo = open_demo(viewer, n_samples=2, start=False)
    assert demo.current_settings().precision == "float32"
    s = demo.current_settings()
    tuned = recommended_params("dds", "ct", hot_start=True)
    assert s.method == "dds" and s.hot_start == "tv" and s.n_samples == 2 and s.prior is None  # the shipped prior
    assert s.params.n_steps == tuned.n_steps and s.params.orientations == tuned.orientations == 8
    assert demo.grid.isChecked() and demo.measurement.operator["modality"] == "ct"
    demo.spins["n_steps"].setValue(2)  # a short run for the test
    demo.run()
    qtbot.waitUntil(lambda: not demo.running, timeout=120_000)
    prov = demo.layers["mean"].metadata["provenance"]
    assert prov["hot_start_method"] == "tv" and prov["prior"] == "ct-phantom-128"
    gt = demo.measurement.ground_truth
    from napari_diffrecon.io._napari import core_values

    def values(role):
        layer = demo.layers[role]
        return core_values(np.asarray(layer.data), layer.metadata)

    assert psnr(values("mean"), gt) > psnr(values("baseline"), gt) - 1.0  # 2 steps from TV: not worse
    demo.close()
    assert last.read_text() == before  # the user's last settings stay for their next workbench


def test_loaded_data_are_framed_whatever_was_on_show(make_napari_viewer):
    """A sample of another pixel size (MRI in pixels after CT in mm) opened beside the first is in view; it opened
    1.5× zoomed in (napari fits the view only to the first layer of an empty viewer)."""
    w = _session(make_napari_viewer)
    viewer = w.viewer
    w.load_sample("ct_sparse23")
    w.load_sample("mri_4x_8coils")
    seen = (viewer.camera.zoom, *viewer.camera.center)
    viewer.reset_view()
    assert seen == pytest.approx((viewer.camera.zoom, *viewer.camera.center))


def test_the_hot_start_box_follows_the_method_until_the_user_sets_it(make_napari_viewer):
    """Ticked for samplers with a tuned hot start (DDS, DPS, consistency), unticked for Song / MCG (tuned from noise)
    and the unconditional samplers; once the user clicks it, their choice stays across methods."""
    w = _session(make_napari_viewer)
    w.load_sample("ct_sparse23")
    pick = lambda m: w.method_combo.setCurrentIndex(w.method_combo.findData(m))  # noqa: E731
    for method, hot in (("dds", True), ("song", False), ("ddim", False), ("dps", True), ("mcg", False),
                        ("consistency", True)):
        pick(method)
        assert w.hot_start.isChecked() is hot, method
        assert (w.current_settings().hot_start is not None) is hot
    pick("dds")
    w.hot_start.click()  # the user's choice: from noise
    assert not w.hot_start.isChecked()
    pick("dps")
    assert not w.hot_start.isChecked() and w.current_settings().hot_start is None


def test_a_card_is_shown_as_text_not_markup():
    """A card is user data: '<' and '&' in its name or source are shown, not read as HTML (the rest of the line
    vanished)."""
    from napari_diffrecon._widgets._main import card_text
    from napari_diffrecon.priors import ModelCard, list_priors

    d = list_priors()["pet-phantom-128"].__dict__.copy()
    d["name"], d["training"] = "x<y & z", {**d["training"], "data": {"source": "scans <2019 & later",
                                                                      "licence": "CC-BY <4.0>"}}
    text = card_text(ModelCard(**d))
    assert "x&lt;y &amp; z" in text and "scans &lt;2019 &amp; later" in text and "CC-BY &lt;4.0&gt;" in text
    assert text.count("<") == text.count("</b>") * 2  # the only markup is the name's bold


def _run_and_wait(w, qtbot):
    assert w.run() is not None
    qtbot.waitUntil(lambda: not w.running, timeout=120_000)
    return w.last_provenance


def test_each_method_runs_on_its_own_default_prior_and_the_box_stays_on_default(make_napari_viewer, qtbot):
    """With the prior box on "(default for the modality)", every run takes its method's own default: the first run
    used to pin its default, so a consistency run after a DDS run ran on the diffusion prior (with a warning that no
    consistency model ships), and a DDS run after a consistency run ran on the consistency model, silently."""
    from napari_diffrecon._widgets._main import NONE_PRIOR
    from napari_diffrecon.priors import default_prior_for

    w = _session(make_napari_viewer)
    w.load_sample("ct_sparse23")
    w.compare.setChecked(False)
    for method in ("dds", "consistency", "dds"):
        w.method_combo.setCurrentIndex(w.method_combo.findData(method))
        w.spins["n_steps"].setValue(2)
        w.n_samples.setValue(1)
        prov = _run_and_wait(w, qtbot)
        assert prov["prior"] == default_prior_for("ct", consistency=method == "consistency"), method
        assert w.prior is None and w.prior_combo.currentText() == NONE_PRIOR
        assert w.current_settings().prior is None  # the saved settings keep "default", not the run's prior
        assert _presets.load_last()[0].prior is None  # and so does the next session's start (the run saves it)
        assert w.card_label.text().startswith("default for CT: ")


def test_closing_the_dock_stops_the_run_in_flight(make_napari_viewer, qtbot):
    """The dock's close button only takes the widget out of its dock (napari's remove_dock_widget: no closeEvent);
    the run went on to its last step, writing layers for a dock that was gone."""
    w = _session(make_napari_viewer)
    w.load_sample("ct_sparse23")
    w.hot_start.click()  # from noise: 50 steps, far longer than the test waits
    w.n_samples.setValue(1)
    w.compare.setChecked(False)
    assert w.run() is not None
    qtbot.waitUntil(lambda: w.estimate_updates >= 1, timeout=60_000)
    w.viewer.window.remove_dock_widget(w)
    qtbot.waitUntil(lambda: not w.running, timeout=30_000)
    prov = w.last_provenance
    assert prov["status"] == "stopped" and prov["stopped_at_step"] < 50


def test_a_noise_sigma_of_zero_is_refused_and_the_box_shows_the_sigma_in_use(make_napari_viewer, notes):
    """σ 0 was shown in the box but silently ignored (a Gaussian likelihood needs σ > 0)."""
    w = _session(make_napari_viewer)
    w.load_sample("ct_sparse23")
    sigma = w.measurement.noise["sigma"]
    w.noise_sigma.setValue(0.0)
    assert w.noise_sigma.value() == pytest.approx(sigma, abs=1e-6) and w.measurement.noise["sigma"] == sigma
    assert any("must be above 0" in n for n in notes)
    w.noise_sigma.setValue(0.02)
    assert w.measurement.noise["sigma"] == 0.02


def test_open_sample_from_the_file_menu_frames_the_data_and_names_the_sample(make_napari_viewer, qtbot):
    """File ▸ Open Sample (napari adds the layers, not the dock): the view is fitted to the new data and the dock's
    sample box names it (an MRI after a CT stayed 1.5× zoomed in and the box still said CT)."""
    w = _session(make_napari_viewer)
    viewer = w.viewer
    viewer.open_sample("napari-diffrecon", "ct_sparse23")
    viewer.open_sample("napari-diffrecon", "mri_4x_8coils")
    qtbot.wait(50)  # the fit waits for napari to add all the sample's layers
    assert w.sample_combo.currentData() == "mri_4x_8coils"
    assert str(w.measurement.operator["modality"]) == "mri"
    camera = getattr(viewer, "scene", viewer).camera  # viewer.camera before napari 0.9
    seen = (camera.zoom, *camera.center)
    viewer.reset_view()
    assert seen == pytest.approx((camera.zoom, *camera.center))


def test_the_std_window_follows_the_run_until_the_user_sets_one(make_napari_viewer):
    """The std's contrast window was taken from a run's first update only: later, larger spreads saturated."""
    w = _session(make_napari_viewer)
    w.load_sample("ct_sparse23")
    w._run_measurement = w.measurement
    w._fresh = {"std"}
    w._show("std", np.full((128, 128), 1e-4) + np.eye(128) * 1e-4)
    first = tuple(w.layers["std"].contrast_limits)
    w._show("std", np.full((128, 128), 1e-3) + np.eye(128) * 1e-3)
    second = tuple(w.layers["std"].contrast_limits)
    assert second[1] > 5 * first[1]
    w.layers["std"].contrast_limits = (0.0, 0.123)  # the user's window stays
    w._show("std", np.full((128, 128), 1e-2))
    assert tuple(w.layers["std"].contrast_limits) == pytest.approx((0.0, 0.123))


def test_a_layer_name_becomes_a_file_name_any_system_takes():
    from napari_diffrecon._widgets._main import _file_stem

    assert _file_stem("data residual |Ax̂ − m|") == "data_residual_Ax̂_−_m"
    assert _file_stem("posterior mean [earlier dds run]") == "posterior_mean_earlier_dds_run"
    assert _file_stem('a/b\\c:d*e?"f"<g>') == "a_b_c_d_e_f_g"
    assert _file_stem("...") == "layer"


def test_a_preset_without_sampler_values_takes_the_tuned_ones_for_its_own_hot_start(make_napari_viewer):
    """The tuned values were looked up with the box's hot start, before the preset's was applied."""
    from napari_diffrecon.reconstruct import RunSettings, data_kind
    from napari_diffrecon.samplers.defaults import recommended_params

    w = _session(make_napari_viewer)
    w.load_sample("ct_sparse23")
    modality, coils, noisy = data_kind(w.measurement)
    for box, hot in ((False, "auto"), (True, None)):
        w.hot_start.setChecked(box)
        w.apply_settings(RunSettings(method="dds", hot_start=hot))
        tuned = recommended_params("dds", modality, hot is not None, coils=coils, noisy=noisy)
        assert w.spins["n_steps"].value() == tuned.n_steps and w.spins["orientations"].value() == tuned.orientations


def test_closing_the_dock_stops_an_auto_tune_search(make_napari_viewer, qtbot):
    w = _session(make_napari_viewer)
    w.load_sample("ct_sparse23")
    w.spins["n_steps"].setValue(4)
    assert w.tuning.start() is not None
    w.viewer.window.remove_dock_widget(w)
    qtbot.waitUntil(lambda: not w.tuning.running, timeout=60_000)
    assert w.tuning._cancel.is_set()


def test_values_the_user_typed_are_named_when_the_tuned_ones_replace_them(make_napari_viewer, notes):
    """Unticking the hot start turned a typed 7 DPS steps into 100 without a word."""
    w = _session(make_napari_viewer)
    w.load_sample("ct_sparse23")
    w.method_combo.setCurrentIndex(w.method_combo.findData("dps"))
    n = len(notes)
    w.hot_start.setChecked(False)  # the dock's own tuned values replaced: nothing to say
    assert not any("replaced yours" in m for m in notes[n:])
    w.hot_start.setChecked(True)
    w.spins["n_steps"].setValue(7)
    w.hot_start.setChecked(False)
    said = [m for m in notes[n:] if "replaced yours" in m]
    assert len(said) == 1 and f"n_steps 7 → {w.spins['n_steps'].value():g}" in said[0], said
