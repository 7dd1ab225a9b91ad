"""Test-time adaptation through the CLI and with auto-tuning (issue 6)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from napari_diffrecon.cli import main

SAMPLE = Path(__file__).parents[1] / "napari_diffrecon" / "data" / "ct_sparse23.npz"


def test_reconstruct_passes_adaptation_options_into_the_run_and_provenance(tmp_path):
    out = tmp_path / "o.npz"
    argv = ["reconstruct", str(SAMPLE), "--method", "dds", "--steps", "3", "--adapt-steps", "1", "--adapt-lr", "3e-3",
            "--adapt-target", "x0_hat", "-o", str(out)]
    assert main(argv) == 0
    with np.load(out) as d:
        prov = json.loads(str(d["provenance"]))
    extra = prov["settings"]["params"]["extra"]
    assert extra == {"adapt_steps": 1, "adapt_lr": 0.003, "adapt_target": "x0_hat"}
    assert prov["nfe"] > 3  # the adaptation's forward passes are counted
    # Without the flags: no adaptation keys at all (presets stay clean).
    assert main(["reconstruct", str(SAMPLE), "--method", "dds", "--steps", "3", "-o", str(tmp_path / "p.npz")]) == 0
    with np.load(tmp_path / "p.npz") as d:
        assert json.loads(str(d["provenance"]))["settings"]["params"]["extra"] == {}


def test_auto_tune_searches_without_adaptation_and_keeps_it_for_the_final_run():
    from napari_diffrecon.io import load_sample
    from napari_diffrecon.reconstruct import RunSettings
    from napari_diffrecon.samplers.defaults import recommended_params
    from napari_diffrecon.tuning import auto_tune

    m = load_sample("ct_sparse23")
    params = recommended_params("dds", "ct", n_steps=2)
    params.extra.update(adapt_steps=1, adapt_lr=1e-3)
    settings = RunSettings(method="dds", params=params)
    res = auto_tune(m, settings, params={"gamma": [1.0, 3.0]})
    assert res.details["adaptation_off_during_search"] is True
    assert settings.params.extra["adapt_steps"] == 1  # the caller's settings are not changed
