"""GUI: the few-step consistency sampler is in the workbench like any sampler (run under xvfb-run)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from napari_diffrecon._widgets import main_widget  # noqa: E402

pytestmark = pytest.mark.usefixtures("gui_config_in_tmp")


def test_consistency_sampler_runs_in_the_workbench_with_the_shipped_consistency_model(make_napari_viewer, qtbot):
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
    x = np.asarray(w.layers["estimate"].data)
    assert psnr(x, gt) > 27.0  # FBP of this sample: 24.9 dB
