"""GUI tests of the Auto-tune button and the support-map layer (run under xvfb-run, tiny untrained priors)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from napari_diffrecon._widgets import main_widget  # noqa: E402
from napari_diffrecon._widgets._tuning import FLAG_NAME, SUPPORT_NAME  # noqa: E402
from napari_diffrecon.priors import ModelCard, NetworkPrior, save_prior  # noqa: E402
from napari_diffrecon.priors.network import build_network  # noqa: E402
from napari_diffrecon.priors.sources import normalisation_for  # noqa: E402

pytestmark = pytest.mark.usefixtures("gui_config_in_tmp")


@pytest.fixture(scope="module")
def tiny_ct(tmp_path_factory) -> Path:
    import torch

    torch.manual_seed(0)
    card = ModelCard(
        name="tiny-ct", modality="ct", channels=1, resolution=128,
        architecture={"type": "diffusers.UNet2DModel", "preset": "tiny"},
        normalisation=normalisation_for("ct", 1),
        training={"steps": 0, "data": {"sources": ["untrained test network"]}, "licence": "BSD-3-Clause"},
    )
    net = build_network({**card.architecture, "channels": 1})
    return save_prior(NetworkPrior(net, card), tmp_path_factory.mktemp("p") / "tiny-ct")[1]


def _widget(make_napari_viewer, tiny_ct, n_steps=3):
    viewer = make_napari_viewer()
    w = main_widget(viewer)
    viewer.window.add_dock_widget(w, name="Diffusion reconstruction")
    w.load_sample("ct_sparse23")
    assert w.set_prior(str(tiny_ct))
    w.method_combo.setCurrentIndex(w.method_combo.findData("dds"))
    w.spins["n_steps"].setValue(n_steps)
    w.n_samples.setValue(2)
    w.seed.setValue(0)
    return viewer, w


def test_auto_tune_sets_gamma_shows_curve_and_goes_into_provenance(make_napari_viewer, qtbot, tiny_ct):
    viewer, w = _widget(make_napari_viewer, tiny_ct)
    w.spins["gamma"].setValue(7.0)
    worker = w.tuning.start(values=[0.3, 3.0])
    assert worker is not None and w.tuning.running and not w.run_btn.isEnabled()
    assert w.run() is None  # no run while the search is in flight
    qtbot.waitUntil(lambda: not w.tuning.running, timeout=60_000)
    res = w.tuning.result
    assert res is not None and res.best["gamma"] in (0.3, 3.0) and len(res.scores) == 2
    assert w.spins["gamma"].value() == pytest.approx(res.best["gamma"])
    assert "gamma" in w.tuning.curve.text() and "←" in w.tuning.curve.text()
    assert w.run_btn.isEnabled()
    w.run()
    qtbot.waitUntil(lambda: not w.running, timeout=60_000)
    prov = w.layers["mean"].metadata["provenance"]
    assert prov["auto_tune"]["best"] == res.best and prov["auto_tune"]["scores"] == res.scores
    # a hand-changed value is no longer the tuned one: no auto_tune record in the next run
    w.spins["gamma"].setValue(res.best["gamma"] * 2)
    assert w.tuning.provenance_for(w.current_settings()) is None


def test_support_map_layer_and_threshold_overlay(make_napari_viewer, qtbot, tiny_ct):
    viewer, w = _widget(make_napari_viewer, tiny_ct)
    assert w.tuning.show_support() is None  # nothing to map before a run (notified)
    w.run()
    qtbot.waitUntil(lambda: not w.running, timeout=60_000)
    maps = w.tuning.show_support()
    assert maps is not None
    names = [layer.name for layer in viewer.layers]
    assert SUPPORT_NAME in names and FLAG_NAME in names
    score = w.layers["support"].data
    assert score.shape == (128, 128) and np.isfinite(score).all() and score.max() > 0
    assert w.layers["support"].metadata["provenance"]["support_map"]["threshold"] == pytest.approx(3.0)
    flags = w.layers["flags"]
    w.tuning.threshold.setValue(float(np.percentile(score, 50)))
    assert 0.4 < flags.data.mean() < 0.6
    assert w.status.text().startswith(f"support map: {100 * flags.data.mean():.1f}% of voxels above")  # follows
    w.tuning.threshold.setValue(float(score.max()) + 1)
    assert flags.data.max() == 0 and "0.0% of voxels" in w.status.text()
    assert w.layers["support"].blending == "additive" and w.layers["support"].opacity < 1  # over the images


def test_stop_tuning_ends_the_search(make_napari_viewer, qtbot, tiny_ct):
    viewer, w = _widget(make_napari_viewer, tiny_ct, n_steps=40)
    fast = w.prior.denoise

    def slow(x, s):
        time.sleep(0.05)
        return fast(x, s)

    w.prior.denoise = slow
    import threading

    before = set(threading.enumerate())
    w.tuning.start(values=[0.3, 1.0, 3.0])
    qtbot.wait(500)
    t = time.perf_counter()
    w.tuning.stop()
    qtbot.waitUntil(lambda: not w.tuning.running, timeout=20_000)
    assert time.perf_counter() - t < 15 and w.tuning.result is None
    assert w.tuning.tune_btn.isEnabled() and w.run_btn.isEnabled()
    # the worker ends only once the search's own threads have: a run started now shares the prior with nothing
    assert not [th for th in set(threading.enumerate()) - before if th.name.endswith("(work)")]


def test_support_map_of_a_hot_started_run_compares_with_a_data_only_image(make_napari_viewer, qtbot, tiny_ct,
                                                                          monkeypatch):
    """The baseline layer beside a hot-started run is its start image (TV here); the support map's difference term
    still uses FBP, which carries nothing the run inherited from its start."""
    import napari_diffrecon.support as support_mod

    viewer, w = _widget(make_napari_viewer, tiny_ct)
    w.hot_start.setChecked(True)
    w.spins["n_steps"].setValue(2)
    w.run()
    qtbot.waitUntil(lambda: not w.running, timeout=60_000)
    assert w.layers["baseline"].metadata["provenance"]["settings"]["method"] == "tv"
    seen = {}
    real = support_mod.support_maps
    monkeypatch.setattr(support_mod, "support_maps", lambda *a, **k: seen.update(k) or real(*a, **k))
    assert w.tuning.show_support() is not None
    from napari_diffrecon.reconstruct import RunSettings, reconstruct

    fbp = reconstruct(w.measurement, RunSettings(method="fbp")).reconstruction
    np.testing.assert_allclose(seen["classical"], fbp, rtol=1e-5, atol=1e-6)


def test_a_run_that_fails_in_the_sampler_ends_with_its_message_and_gives_run_back(make_napari_viewer, qtbot,
                                                                                   tiny_ct):
    """The sampler stops a diverging run with a SamplingError (a RuntimeError); superqt's generator worker takes any
    RuntimeError for a deleted worker and ended silently, so the workbench stayed "running" with Run greyed out."""
    import torch

    notes = []
    viewer, w = _widget(make_napari_viewer, tiny_ct)
    import napari_diffrecon._widgets._main as main_mod

    real = main_mod.show_error
    main_mod.show_error = lambda msg: notes.append(msg) or real(msg)
    try:
        w.prior.denoise = lambda x, s: torch.full_like(x, float("nan"))
        assert w.run() is not None
        qtbot.waitUntil(lambda: not w.running, timeout=30_000)
    finally:
        main_mod.show_error = real
    assert w.run_btn.isEnabled() and w.status.text().startswith("failed: NaN/Inf appeared at step 1")
    assert any("the run failed: NaN/Inf" in n for n in notes)
