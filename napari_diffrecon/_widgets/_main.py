"""The workbench dock widget: measurement, prior, sampler, run/stop, results, export, presets.

GUI only: every number comes from the core (``reconstruct.prepare_run`` driven in a napari
``thread_worker`` by :func:`._runner.run_stream`, ``io``, ``simulate``, ``priors``). The worker
never touches Qt or layers; the ``yielded`` slot assigns fresh arrays to existing layers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import html
import math
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QEvent, Qt, QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QScrollArea,
    QSlider,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ..baselines import BASELINE_PARAMS as CORE_BASELINE_PARAMS
from ..baselines import BASELINES
from ..io import DATA_DIR, SAMPLES, BundleError, Measurement
from ..priors.prior import PRECISIONS
from ..reconstruct import RunSettings, default_hot_start, noise_floor_text, prior_mismatch
from ..samplers import PARAMS_READ, SAMPLERS, UNCONDITIONAL, SamplerParams
from ..samplers.defaults import RECOMMENDED
from ..uncertainty import DEFAULT_STD_POOL
from . import _presets
from ._perf import new_worker, run_progress
from ._runner import Update, baseline_for, run_stream

__all__ = ["DiffReconWidget", "WorkbenchWidget", "PARAMS_FOR", "LAYER_NAMES", "prior_mismatch"]

# Which parameters each method reads (the others' rows are hidden): one table for the workbench and the CLI. The
# workbench sets TV's weight relative to the data (lam_rel): its "lam" row is Song / MCG's λ.
PARAMS_FOR = PARAMS_READ
BASELINE_PARAMS = {k: tuple(p for p in v if p != "lam") for k, v in CORE_BASELINE_PARAMS.items()}
# Result layers windowed from 0 to their spread (io._napari.spread_limits); the window follows a run's updates.
SPREAD_WINDOW_ROLES = ("std", "residual")
LIVE = ("eta", "lam", "gamma", "zeta", "cg_iters", "snr", "orientations")  # changed mid-run: acts on the run in flight
# The SamplerParams fields shown in spin boxes (tuned values and presets fill them; t0 has its own rule).
PARAM_SPINS = ("n_steps", *LIVE)
# Test-time adaptation of the prior (samplers/adapt.py; DDS and DPS): SamplerParams.extra keys, read every step.
# The rows start at the setting that gained on every measured draw with DPS (lr 1e-3 every 2nd step from half-way;
# README "Test-time adaptation", benchmarks/results/adapt_dps_lr1e3_stage4), not the core's defaults.
ADAPT = ("adapt_steps", "adapt_lr", "adapt_every", "adapt_start")
ADAPT_START_VALUES = {"adapt_steps": 0, "adapt_lr": 1e-3, "adapt_every": 2, "adapt_start": 0.5}
# DDS's x0 step (SamplerParams.extra["posterior_draw"], samplers/datastep.py): label -> value, read every step.
DRAW_CHOICES = {"posterior mean (DDS paper)": None, "draw, structured (calibrated spread, 2 NFE/step)": "jacobian",
                "draw, isotropic (calibrated spread)": "gaussian"}
# DDS's re-noise (SamplerParams.renoise, samplers/base.py renoise_step): label -> value, read every step.
RENOISE_CHOICES = {"DDS code: network's ε, keeps the data step": "dds", "exact DDIM: ε from the corrected x̂0": "ddim"}
LAYER_NAMES = {
    "iterate": "x_t (iterate)",
    "estimate": "x̂0 (estimate)",
    "mean": "posterior mean",
    "std": "posterior std",
    "residual": "data residual |Ax̂ − m|",
    "baseline": "baseline",
}
# spin box specs: (label, kind, min, max, step, decimals, tooltip)
_SPINS: dict[str, tuple[str, str, float, float, float, int, str]] = {
    "n_steps": ("steps", "int", 1, 5000, 1, 0, "reverse-diffusion steps (fixed once a run starts)"),
    "eta": ("η", "float", 0.0, 1.0, 0.05, 2, "re-noise stochasticity, 0 deterministic: DDIM's η (1 ancestral), or "
            "with DDS's own re-noise the share of fresh noise (1 = all fresh) (acts live)"),
    "gamma": ("γ", "float", 0.0, 1e6, 0.1, 3, "DDS likelihood weight (acts live)"),
    "lam": ("λ", "float", 0.0, 1.0, 0.05, 2, "Song/MCG projection weight, 1 = hard (acts live)"),
    "zeta": ("ζ", "float", 0.0, 1000.0, 0.05, 3, "DPS/MCG step size (acts live)"),
    "cg_iters": ("CG steps", "int", 0, 200, 1, 0, "conjugate-gradient iterations per data step or pseudo-inverse "
                 "(acts live; Song/MCG take 1 on noisy data: counts, or a noise floor above 1.8 %)"),
    "snr": ("corrector SNR", "float", 0.0, 1.0, 0.01, 3, "Langevin corrector signal-to-noise, 0 = off (acts live)"),
    "t0": ("t0", "float", 0.01, 1.0, 0.05, 2, "hot start: fraction of the schedule to run"),
    "orientations": ("orientations", "int", 1, 8, 1, 0, "orientation ensemble: posterior sample k is denoised in the "
                     "k-th of this many symmetries of the square (flips, half and quarter turns) and turned back, so "
                     "the mean of the samples averages out the network's orientation-dependent errors (DDS "
                     "hot-started on CT, its default 8: +0.04 to +0.23 dB on the mean of 8; from noise it turns the "
                     "anatomy the prior draws and can cost dB). 1 = all upright; one sample is never turned "
                     "(acts live)"),
    "adapt_steps": ("adapt steps", "int", 0, 20, 1, 0, "experimental test-time adaptation of the prior to this scan "
                    "(LoRA): Adam steps per sampling step, 0 = off (acts live). Helps DPS with a prior far from the "
                    "scan (and can spoil a run); with DDS it over-fits noisy data. Each step costs one network "
                    "forward + backward pass"),
    "adapt_lr": ("adapt lr", "float", 1e-5, 0.1, 5e-4, 5, "adaptation learning rate (acts live)"),
    "adapt_every": ("adapt every", "int", 1, 20, 1, 0, "adapt at every N-th sampling step (acts live): every 2nd "
                    "step at lr 1e-3 gained on all six measured draws with DPS, every step at lr 3e-3 collapsed one"),
    "adapt_start": ("adapt from", "float", 0.0, 0.95, 0.05, 2, "fraction of the run before adaptation starts "
                    "(acts live)"),
    "iters": ("iterations", "int", 0, 5000, 1, 0, "classical method iterations; 'default' = the method's own (CG 20, "
              "TV 1000, MLEM / OSEM: until the data residual reaches the noise level; as a hot start MLEM 10, OSEM 2)"),
    "subsets": ("subsets", "int", 1, 64, 1, 0, "OSEM subsets"),
    "lam_rel": ("TV weight", "float", 0.0, 1.0, 0.0005, 4, "TV weight relative to ‖Aᴴm‖∞; 'default' = the modality's "
                "(CT 5e-4, PET 0.016, MRI 0.1 single coil / 0.016 multi-coil)"),
}
GUI_UPDATES_PER_S = 2.0  # layer updates per second while a run streams (each costs the sampler ~40 ms: _perf)
PBAR_PERIOD_S = 1.0  # progress bar and status text: each change repaints the window (costly in software GL)
_WEIGHT_RANGE = 100  # slider ticks each side of 0; weight = 10 ** (tick / _WEIGHT_RANGE)
NONE_PRIOR = "(default for the modality)"
EARLIER = "[earlier {method} run]"  # appended to a result layer's name while it holds an earlier run's result
DataKind = tuple[str, int | None, bool]  # ``reconstruct.data_kind``: modality, MRI coil count, noisy data


def _spin(kind: str, lo: float, hi: float, step: float, decimals: int) -> QSpinBox | QDoubleSpinBox:
    if kind == "int":
        w: QSpinBox | QDoubleSpinBox = QSpinBox()
        w.setRange(int(lo), int(hi))
    else:
        w = QDoubleSpinBox()
        w.setDecimals(decimals)
        w.setRange(lo, hi)
    w.setSingleStep(step)
    return w


def _file_stem(name: str) -> str:
    """A layer's name as a file name that every file system takes ("data residual |Ax̂ − m|" → "data_residual_Ax̂_−_m";
    '|', ':', '/', '*', '?', '"', '<', '>' and '\\' are not allowed on Windows)."""
    stem = re.sub(r'[\\/:*?"<>|\[\]()]+', " ", name).strip(" .")
    return re.sub(r"\s+", "_", stem) or "layer"


def _method_label(name: str) -> str:
    """A classical method's name as labels show it ("zero_filled" → "ZERO FILLED")."""
    return name.upper().replace("_", " ")


def _busy_text(owner: Any) -> str:
    """Why a run cannot start now: one in flight (press Stop), or one that was stopped and ends at its next step."""
    workers = (owner.worker, owner.tuning.worker, owner.volume.worker)
    if all(w is None or getattr(w, "abort_requested", False) for w in workers):
        return "the stopped run is still ending (at its sampler's next step); press Run again in a moment"
    return "a run or auto-tune search is already in progress (press Stop first)"


def _row(label: str, *widgets: QWidget, tooltip: str = "") -> QWidget:
    box = QWidget()
    lay = QHBoxLayout(box)
    lay.setContentsMargins(0, 0, 0, 0)
    lab = QLabel(label)
    lab.setMinimumWidth(90)
    lay.addWidget(lab)
    for w in widgets:
        lay.addWidget(w, 1)
    if tooltip:
        box.setToolTip(tooltip)
    return box


from ..io._napari import display_limits as _limits  # noqa: E402 - one display window for readers and workbench


def _devices() -> list[str]:
    import torch

    out = ["cpu"]
    if torch.cuda.is_available():
        out += [f"cuda:{i}" if torch.cuda.device_count() > 1 else "cuda" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        out.append("mps")
    return out


def _kind_text(kind: DataKind) -> str:
    """A kind of data in words: "CT", "noisy 8-coil MRI", "noisy PET"."""
    modality, coils, noisy = kind
    return f"{'noisy ' if noisy else ''}{f'{coils}-coil ' if coils is not None else ''}{modality.upper()}"


def _kind_from_json(value: Any) -> DataKind | None:
    """A data kind as stored in the last settings (``[modality, coils, noisy]``); None when absent or malformed."""
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        return None
    modality, coils, noisy = value
    if not isinstance(modality, str) or not isinstance(noisy, bool):
        return None
    if coils is not None and (isinstance(coils, bool) or not isinstance(coils, int)):
        return None
    return modality, coils, noisy


def _measurement_name(layer_name: str) -> str:
    """The measurement's name in a layer name from ``io._napari`` ("CT 23 views measurement (ct)" -> "CT 23 views";
    "… ground truth (mri simulated) ground truth" -> "… ground truth (mri simulated)")."""
    for suffix in (" measurement (", " ground truth"):
        head, sep, _ = layer_name.rpartition(suffix)
        if sep:
            return head
    return layer_name


def _grid(viewer: Any) -> Any:
    """The viewer's grid settings: ``viewer.canvas.grid`` from napari 0.9 (``viewer.grid`` is deprecated there)."""
    canvas = getattr(viewer, "canvas", None)
    return canvas.grid if hasattr(canvas, "grid") else viewer.grid


def _clip(text: str, limit: int = 60) -> str:
    """``text`` cut at the last word boundary before ``limit`` characters, with an ellipsis when cut."""
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0].rstrip(" ,;(") + "…"


def card_text(card: Any) -> str:
    """The model card in two lines of rich text for the widget's label.

    Parameters
    ----------
    card : ModelCard
        The prior's card.

    Returns
    -------
    str
        Name, modality, size, what it was trained (or fine-tuned) on, the validation loss and the licence's first
        clause, HTML-escaped (a card is user data). Long sources and licences are cut; the whole card is in
        :func:`card_tooltip`, so it never pushes the sampler's settings out of sight.
    """
    tr = card.training_record
    desc, name, lic = card.training_data()
    loss = tr.get("final_val_loss")
    what = "fine-tuned" if tr.get("fine_tuned_from") else "trained"
    data = _clip(name or desc or "unknown data")
    lic = lic or "?"
    short_lic = _clip(lic.split(";")[0].strip())
    more = " (hover for the full card)" if short_lic != lic or (desc and desc != data) else ""
    e = html.escape
    return (
        f"<b>{e(str(card.name))}</b>: {e(card.modality.upper())}, {card.resolution}×{card.resolution}, "
        f"{'complex' if card.channels == 2 else 'real'}; {what} {e(str(tr.get('steps', '?')))} steps on {e(data)}"
        + (f"; val loss {loss:.3g}" if isinstance(loss, (int, float)) else "")
        + f"; licence {e(short_lic)}{more}"
    )


def card_tooltip(card: Any) -> str:
    """The whole card as plain text for the label's tooltip.

    Parameters
    ----------
    card : ModelCard
        The prior's card.

    Returns
    -------
    str
        The summary line, the card's description, the training data's description, the fine-tune and weight-averaging
        record and the full licence, in paragraphs.
    """
    tr = card.training_record
    desc, _, lic = card.training_data()
    parts = [card.summary()]
    if getattr(card, "description", ""):
        parts.append(str(card.description))
    if desc:
        parts.append(f"Training data: {desc}")
    if tr.get("fine_tuned_from"):
        parts.append(f"Fine-tuned from: {tr['fine_tuned_from']}")
    if isinstance(tr.get("weight_average"), dict):
        parts.append(f"Weights averaged with: {tr['weight_average'].get('with', '?')}")
    parts.append(f"Licence: {lic or '?'}")
    return "\n\n".join(parts)


class DiffReconWidget(QWidget):
    """The napari-diffrecon workbench (one dock widget).

    Parameters
    ----------
    viewer : napari.Viewer
        The viewer whose layers the widget reads and writes.
    restore_last : bool
        Restore the last used settings (from :func:`._presets.config_dir`).
    """

    def __init__(self, viewer: Any, restore_last: bool = True) -> None:
        super().__init__()
        self.setObjectName("Diffusion reconstruction")  # the dock's title when added without a name
        self.viewer = viewer
        self.measurement: Measurement | None = None
        self.measurement_name: str = ""
        self.prior: Any = None  # the prior picked in the box or loaded from a file (None: the data's default)
        self.prior_source: str | None = None
        self._spread_window: dict[str, tuple[float, float]] = {}  # the window the dock last gave a std / residual
        self._default_priors: dict[str, Any] = {}  # shipped defaults loaded for runs, by name (never "picked")
        self.worker: Any = None
        self.layers: dict[str, Any] = {}
        self._names: dict[str, str] = {}  # the name the workbench last gave each result layer (else: the user's)
        self._written_by: dict[str, str] = {}  # the method of the run whose result each layer holds
        self._written_on: dict[str, Any] = {}  # the measurement that run reconstructed
        self._stale: set[str] = set()  # roles whose layer still holds an earlier run's result
        self._told_rewrite = False  # the notice that a rerun writes over the earlier run's layers: once a session
        self.last_provenance: dict[str, Any] | None = None
        self.estimate_updates = 0
        self._live_params: SamplerParams | None = None
        self._live_log: list[dict[str, Any]] = []
        self._run_settings: RunSettings | None = None
        self._run_measurement: Measurement | None = None
        self._run_data: Measurement | None = None  # the run's own copy (its noise model as the run used it)
        self._run_prior_name: str | None = None
        self._quiet_depth = 0  # > 0 inside _not_live(): widget changes made by the workbench itself
        self._last_update: Update | None = None
        self._pbar: Any = None
        self._fresh: set[str] = set()
        self._window: tuple[float, float] | None = None
        self._t_run = 0.0
        self._ended = False
        self._pbar_t = 0.0
        self._warned: set[str] = set()  # warnings of the current run already shown
        self._running_prov: dict[str, Any] = {}
        self._status_pending = ""
        self._applying = True  # no recommended values while the widgets are built / settings restored
        # the tuned values on show (``SamplerParams.to_dict()``), "preset" for a preset's (kept for any data), or
        # "restored" for the last run's settings when the kind of data they ran on is not known (an older file)
        self._tuned_for: dict[str, Any] | str | None = None
        # the kind of data the restored last-run values were for, while they are on show (for the notice when data of
        # another kind bring in their tuned values)
        self._restored_kind: DataKind | None = None
        self.max_rate = GUI_UPDATES_PER_S
        #: Save the settings of each run and on close for the next session (:func:`._presets.save_last`); the demo's
        #: workbench does not, so that it never replaces the user's own last settings.
        self.remember = True
        self._build()
        self._connect_viewer()
        self._applying = False
        self.use_recommended()
        if restore_last:
            self._restore_last()
        self._on_method_changed()

    # ------------------------------------------------------------------ construction
    def _build(self) -> None:
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        outer.addWidget(scroll)
        body = QWidget()
        scroll.setWidget(body)
        lay = QVBoxLayout(body)

        # Measurement
        g = QGroupBox("Measurement")
        gl = QVBoxLayout(g)
        self.sample_combo = QComboBox()
        for key, title in SAMPLES.items():
            self.sample_combo.addItem(title, key)
        self.load_sample_btn = QPushButton("Load sample")
        self.load_sample_btn.clicked.connect(lambda: self.load_sample(self.sample_combo.currentData()))
        gl.addWidget(_row("sample", self.sample_combo, self.load_sample_btn))
        self.open_btn = QPushButton("Open file…")
        self.open_btn.setToolTip("bundle (.npz/.h5), fastMRI-style .h5 (kspace), or a DICOM/NIfTI/TIFF image "
                                 "to simulate")
        self.open_btn.clicked.connect(self._open_dialog)
        self.layer_btn = QPushButton("Use selected layer")
        self.layer_btn.setToolTip("a measurement layer, or an image layer to simulate from with the options below")
        self.layer_btn.clicked.connect(self.use_selected_layer)
        gl.addWidget(_row("from", self.open_btn, self.layer_btn))
        self.sim_modality = QComboBox()
        self.sim_modality.addItems(["ct", "mri", "pet"])
        self.sim_modality.setToolTip("how a measurement is simulated from an image (an image layer with \"Use selected "
                                     "layer\", or an image file): loaded measurements keep their own geometry, "
                                     "shown below")
        self.sim_views = _spin("int", 4, 1000, 1, 0)
        self.sim_views.setValue(60)
        self.sim_accel = _spin("float", 1.0, 32.0, 0.5, 1)
        self.sim_accel.setValue(4.0)
        self.sim_coils = _spin("int", 1, 32, 1, 0)
        self.sim_coils.setValue(8)
        self.sim_counts = _spin("float", 1e3, 1e9, 1e4, 0)
        self.sim_counts.setValue(1e5)
        self.sim_size = _spin("int", 16, 512, 16, 0)
        self.sim_size.setValue(128)
        self.sim_modality.currentTextChanged.connect(self._on_sim_modality)
        self._sim_rows = {
            "views": _row("  views", self.sim_views, tooltip="CT/PET: evenly spaced views over 180°"),
            "accel": _row("  acceleration", self.sim_accel, tooltip="MRI undersampling factor"),
            "coils": _row("  coils", self.sim_coils, tooltip="MRI receive coils"),
            "counts": _row("  true counts", self.sim_counts, tooltip="PET expected total counts"),
        }
        gl.addWidget(_row("simulate as", self.sim_modality, QLabel("size"), self.sim_size))
        for r in self._sim_rows.values():
            gl.addWidget(r)
        self.meas_label = QLabel("no measurement: load a sample or open a file")
        self.meas_label.setWordWrap(True)
        gl.addWidget(self.meas_label)
        self.noise_sigma = _spin("float", 0.0, 1e9, 0.001, 6)
        self.noise_sigma.setKeyboardTracking(False)  # taken on Enter / leaving the box: "0.02" passes through "0"
        self.noise_sigma.setToolTip("Gaussian noise σ of the measurement (free: change it if you know better)")
        self.noise_sigma.valueChanged.connect(self._on_noise_sigma)
        self._noise_row = _row("noise σ", self.noise_sigma)
        gl.addWidget(self._noise_row)
        lay.addWidget(g)
        self._on_sim_modality(self.sim_modality.currentText())

        # Prior
        g = QGroupBox("Prior")
        gl = QVBoxLayout(g)
        self.prior_combo = QComboBox()
        self.prior_file_btn = QPushButton("Load file…")
        self.prior_file_btn.clicked.connect(self._prior_dialog)
        gl.addWidget(_row("prior", self.prior_combo, self.prior_file_btn))
        self.card_label = QLabel("")
        self.card_label.setWordWrap(True)
        gl.addWidget(self.card_label)
        self.mismatch_label = QLabel("")
        self.mismatch_label.setWordWrap(True)
        self.mismatch_label.setStyleSheet("color: #e07050")
        gl.addWidget(self.mismatch_label)
        self.refresh_priors()
        self.prior_combo.currentIndexChanged.connect(self._on_prior_combo)
        lay.addWidget(g)

        # Sampler
        g = QGroupBox("Sampler")
        gl = QVBoxLayout(g)
        self.method_combo = QComboBox()
        for name in SAMPLERS:
            self.method_combo.addItem(f"{name} (unconditional)" if name in UNCONDITIONAL else name, name)
        for name, (mods, _desc) in BASELINES.items():
            self.method_combo.addItem(f"{name} (classical: {', '.join(mods)})", name)
        self.method_combo.setCurrentIndex(self.method_combo.findData("dds"))
        self.method_combo.currentIndexChanged.connect(self._follow_method_with_hot_start)
        self.method_combo.currentIndexChanged.connect(self._on_method_changed)
        self.method_combo.currentIndexChanged.connect(self.use_recommended)
        gl.addWidget(_row("method", self.method_combo))
        defaults = SamplerParams()
        self.spins: dict[str, QSpinBox | QDoubleSpinBox] = {}
        self.param_rows: dict[str, QWidget] = {}
        for key, (label, kind, lo, hi, step, dec, tip) in _SPINS.items():
            w = _spin(kind, lo, hi, step, dec)
            if hasattr(defaults, key):
                w.setValue(getattr(defaults, key))
            w.valueChanged.connect(lambda _v, k=key: self._on_live_param(k))
            self.spins[key] = w
            self.param_rows[key] = _row(label, w, tooltip=tip)
        self.spins["iters"].setSpecialValueText("default")  # 0: the method's default (baselines.BASELINE_DEFAULTS)
        self.spins["iters"].setValue(0)
        self.spins["subsets"].setValue(6)
        self.spins["lam_rel"].setSpecialValueText("default")  # 0: the modality's (baselines.TV_DEFAULT_WEIGHT)
        self.spins["lam_rel"].setValue(0.0)
        self.filter_combo = QComboBox()
        self.filter_combo.addItems(["default", "ramp", "shepp-logan", "cosine", "hamming", "hann"])
        self.filter_combo.setToolTip("FBP filter; 'default': ramp for CT, Hann for PET (few counts)")
        self.param_rows["filter"] = _row("FBP filter", self.filter_combo)
        self.draw_combo = self._live_choice(
            "posterior_draw", "x0 step", DRAW_CHOICES, "DDS: take the posterior mean of x0 at each data step (the "
            "paper), or a draw from it: the posterior std then matches the error better (exact for a Gaussian prior; "
            "on real scans wider intervals that hold the truth more often, slightly lower PSNR of the mean; the "
            "structured draw costs a second network evaluation per step). Acts live")
        self.renoise_combo = self._live_choice(
            "renoise", "re-noise", RENOISE_CHOICES, "DDS: how the data-consistent x̂0 is carried to the next noise "
            "level. 'DDS code' (tuned default): fresh noise and the network's ε, so the whole data correction stays "
            "in the iterate (+0.2 to +3.5 dB over exact DDIM on the benchmark, narrower spread: pick the structured "
            "x0 draw when the std matters); 'exact DDIM': ε recomputed from the corrected x̂0 (keeps only part of the "
            "correction). Acts live")
        self.hot_start = QCheckBox("hot start from the classical reconstruction")
        # On by default for the samplers with a tuned hot start (samplers.defaults: DDS, DPS, consistency): DDS's is
        # the benchmark's best on 8 of its 9 tasks (means of 8; every CT task and PET one sample at a time too) at
        # 10-30 network evaluations instead of 50 (README, Targets). Off for the others (Song, MCG: tuned from noise;
        # the unconditional samplers ignore the data). Until the user ticks or unticks it (or settings are restored),
        # the box follows the method.
        self.hot_start.setChecked(True)
        self._hot_start_chosen = False
        self.hot_start.clicked.connect(self._on_hot_start_clicked)
        self.hot_start.toggled.connect(self._on_method_changed)
        self.hot_start.toggled.connect(self.use_recommended)
        # Which classical image a hot start starts from: "auto" is the data's (reconstruct.default_hot_start); the
        # classical methods of the data's modality may be picked instead. Their parameter rows show beneath it.
        self.start_combo = QComboBox()
        self._fill_start_choices("")
        self.start_combo.currentIndexChanged.connect(self._on_method_changed)
        self.param_rows["start"] = _row(
            "start from", self.start_combo, tooltip="the classical reconstruction the reverse diffusion starts from "
            "at t0; 'auto': the data's (TV for CT with ≤ 30 views or an arc under 160° and for PET, FBP for other CT, "
            "CG for MRI). Its parameters are the rows below ('default': the method's own)")
        for key in ("n_steps", "eta", "renoise", "gamma", "lam", "zeta", "cg_iters", "snr", "posterior_draw",
                    "orientations", *ADAPT):
            gl.addWidget(self.param_rows[key])
        for key, v in ADAPT_START_VALUES.items():
            self.spins[key].setValue(v)
        gl.addWidget(self.hot_start)
        gl.addWidget(self.param_rows["start"])
        gl.addWidget(self.param_rows["t0"])
        self.spins["t0"].setValue(0.3)
        for key in ("iters", "subsets", "lam_rel", "filter"):
            gl.addWidget(self.param_rows[key])
        self.weight_slider = QSlider(Qt.Orientation.Horizontal)
        self.weight_slider.setRange(-_WEIGHT_RANGE, _WEIGHT_RANGE)
        self.weight_slider.setValue(0)
        self.weight_slider.setToolTip("prior / likelihood weight (×0.1 … ×10); acts on the run in flight")
        self.weight_label = QLabel("1.00")
        self.weight_slider.valueChanged.connect(self._on_weight)
        self._weight_row = _row("prior weight", self.weight_slider, self.weight_label)
        gl.addWidget(self._weight_row)
        self.n_samples = _spin("int", 1, 256, 1, 0)
        self.n_samples.setValue(4)  # uncertainty (mean, std) needs several posterior samples
        self.seed = _spin("int", 0, 2**31 - 1, 1, 0)
        self.device_combo = QComboBox()
        self.device_combo.addItems(_devices())
        self.std_pool = _spin("float", 0.0, 5.0, 0.5, 1)
        self.std_pool.setValue(DEFAULT_STD_POOL)
        self.std_pool.setSuffix(" px")
        self.std_pool.setToolTip("the std layer pools the samples' variance over a Gaussian of this width: a steadier "
                                 "uncertainty map from few samples (0 = raw per-voxel std)")
        self._samples_row = _row("posterior samples", self.n_samples, QLabel("std pooling"), self.std_pool)
        gl.addWidget(self._samples_row)
        self.precision_combo = QComboBox()
        self.precision_combo.addItems(list(PRECISIONS))
        self.precision_combo.setToolTip("arithmetic of the prior network (2D runs; the data step stays float32): "
                                        "bfloat16 takes 1.4–1.6× less CPU time for DDS from noise, up to 1.5× for "
                                        "hot starts, on CPUs with AVX512-BF16/AMX at ≤ 0.01 dB; float16 is for GPUs")
        gl.addWidget(_row("seed", self.seed, QLabel("device"), self.device_combo))
        gl.addWidget(_row("network in", self.precision_combo))
        self.precision_combo.currentTextChanged.connect(lambda _t: self._offer_draws())
        self.compare = QCheckBox("also compute the classical baseline")
        self.compare.setChecked(True)
        gl.addWidget(self.compare)
        lay.addWidget(g)

        # Run
        g = QGroupBox("Run")
        gl = QVBoxLayout(g)
        self.run_btn = QPushButton("Run")
        self.run_btn.clicked.connect(self.run)
        self.stop_btn = QPushButton("Stop")
        self.stop_btn.setEnabled(False)
        self.stop_btn.clicked.connect(self.stop)
        gl.addWidget(_row("", self.run_btn, self.stop_btn))
        self.status = QLabel("idle")
        self.status.setWordWrap(True)
        gl.addWidget(self.status)
        self.grid = QCheckBox("side by side (grid view)")
        self.grid.toggled.connect(self._on_grid)
        gl.addWidget(self.grid)
        outer.addWidget(g)  # pinned below the scrolling settings: Run, Stop and the status stay in view

        # Self-tuning (auto-tune) and the support map
        from ._tuning import TuningPanel

        self.tuning = TuningPanel(self)
        lay.addWidget(self.tuning)

        # Volumes: a 3D layer or a study file, streamed into one 3D layer
        from ._volume import VolumePanel

        self.volume = VolumePanel(self)
        lay.addWidget(self.volume)

        # Export & presets
        g = QGroupBox("Export and presets")
        gl = QVBoxLayout(g)
        self.export_btn = QPushButton("Export selected layer…")
        self.export_btn.setToolTip("NIfTI, DICOM secondary capture or TIFF, with the provenance")
        self.export_btn.clicked.connect(self._export_dialog)
        gl.addWidget(self.export_btn)
        self.save_preset_btn = QPushButton("Save preset…")
        self.save_preset_btn.clicked.connect(self._save_preset_dialog)
        self.load_preset_btn = QPushButton("Load preset…")
        self.load_preset_btn.clicked.connect(self._load_preset_dialog)
        gl.addWidget(_row("", self.save_preset_btn, self.load_preset_btn))
        lay.addWidget(g)
        lay.addStretch(1)
        self.setMinimumWidth(max(360, body.minimumSizeHint().width() + 24))

    def _connect_viewer(self) -> None:
        self.viewer.layers.events.inserted.connect(self._on_layer_inserted)
        self.viewer.layers.events.removed.connect(self._on_layer_removed)

    # ------------------------------------------------------------------ measurement
    def _on_sim_modality(self, modality: str) -> None:
        vis = {"views": modality in ("ct", "pet"), "accel": modality == "mri", "coils": modality == "mri",
               "counts": modality == "pet"}
        for k, r in self._sim_rows.items():
            r.setVisible(vis[k])

    def _on_layer_inserted(self, event: Any) -> None:
        layer = event.value
        m = (layer.metadata or {}).get("measurement") if hasattr(layer, "metadata") else None
        if isinstance(m, Measurement) and m is not self.measurement:
            self.set_measurement(m, name=_measurement_name(layer.name))
            self._name_the_sample(m)
            # new data from File ▸ Open / Open Sample: napari fits the view only to an empty viewer's first layer
            # (an MRI in pixels after a CT in mm opened zoomed in); fitted once napari has added all its layers
            QTimer.singleShot(0, self._fit_view)
        if _grid(self.viewer).enabled:  # a new tile: fit the grid again (napari leaves the camera where it was)
            self.viewer.reset_view()

    def _fit_view(self) -> None:
        with contextlib.suppress(RuntimeError):  # the viewer closed in between
            self.viewer.reset_view()

    def _name_the_sample(self, m: Measurement) -> None:
        """The sample box names the shipped sample just opened, however it was opened."""
        path = Path(m.path) if m.path else None
        if path is not None and path.parent.resolve() == Path(DATA_DIR).resolve():
            idx = self.sample_combo.findData(path.stem)
            if idx >= 0:
                self.sample_combo.setCurrentIndex(idx)

    def _on_layer_removed(self, event: Any) -> None:
        for role, layer in list(self.layers.items()):
            if layer is event.value:
                self._release(role)

    def set_measurement(self, m: Measurement, name: str = "") -> None:
        """Make ``m`` the measurement to reconstruct (shows its operator and geometry)."""
        from ..io._napari import shown_values

        self.measurement = m
        self.measurement_name = name or Path(m.path or "measurement").stem
        spec = m.operator
        modality = str(spec.get("modality", "?"))
        geo = []
        if "angles_deg" in spec:
            from ..physics.ct import angular_coverage

            arc = angular_coverage(spec["angles_deg"])[1]
            geo.append(f"{len(spec['angles_deg'])} views" + (f" over a {arc:.0f}° arc" if arc < 179.5 else ""))
        if modality == "mri":
            mask = spec.get("mask")
            if mask is not None:
                geo.append(f"{1 / max(float(np.mean(mask)), 1e-9):.1f}× undersampled")
            maps = spec.get("coil_maps")
            geo.append(f"{maps.shape[0] if maps is not None else 1} coil(s)")
        noise = m.noise or {}
        nm = noise.get("model", "gaussian")
        desc = m.metadata.get("description", "") if isinstance(m.metadata, dict) else ""
        self.meas_label.setText(
            f"<b>{html.escape(self.measurement_name)}</b>: {html.escape(modality.upper())}, "
            f"image {tuple(spec.get('image_shape', ()))}, "
            f"data {tuple(np.shape(m.data))}; {', '.join(geo)}; noise {nm}"
            + (f"<br>{html.escape(str(desc))}" if desc else "")
            + ("<br>images are shown in Hounsfield units (HU)" if shown_values(0.0, "mean", m)[1] == "HU" else "")
        )
        gaussian = str(nm).lower() == "gaussian"
        self._noise_row.setVisible(gaussian)
        if gaussian:
            self.noise_sigma.blockSignals(True)
            self.noise_sigma.setValue(float(noise.get("sigma", 0.0)))
            self.noise_sigma.blockSignals(False)
        self._select_method_for_modality(modality)
        hot = default_hot_start(m)
        self._fill_start_choices(modality, hot)
        self._on_method_changed()  # the check box names the start
        self.hot_start.setToolTip(
            "start the reverse diffusion at t0 from a classical image (10–20 network evaluations instead of 50); "
            f"for these data {_method_label(hot)} unless another is picked below"
            + ("; TV rather than FBP because these data have few views or a limited arc (its streaks or missing "
               "wedge are more than a short reverse process removes)" if hot == "tv" and modality == "ct" else "")
            + ("; TV rather than MLEM: its smoother image gave 0.7–1.3 dB better results on our PET benchmarks"
               if hot == "tv" and modality == "pet" else ""))
        # Values tuned for another kind of data (a CT ζ of 6 on PET, whose tuned ζ is 40) are replaced by this data's;
        # values the user set or a preset restored for data whose tuned values are the same are kept.
        self._follow_the_data()
        self._offer_draws()
        self._leave_a_shipped_prior_of_another_modality(modality)
        self._show_card()
        self._check_prior()
        if self.prior is None and self._default_prior_name() is None:
            show_warning(f"napari-diffrecon: no prior for {modality.upper()} is installed; load a prior file "
                         f"(Prior ▸ Load file…) or run a classical method ({', '.join(self._classical_for())})")

    def _offer_draws(self) -> None:
        """Offer only the x0 draws that can run: PET's EM data step has no Gaussian form (no isotropic draw), and the
        structured draw's finite-difference probe needs the network in float32 (none with bfloat16/float16)."""
        from ..samplers.datastep import draw_refusal

        pet = self.measurement is not None and str(self.measurement.operator.get("modality")) == "pet"
        precision = self.precision_combo.currentText()
        allowed = {v: draw_refusal(v, counts=pet, precision=precision) is None for v in DRAW_CHOICES.values()}
        for value, ok in allowed.items():
            self.draw_combo.model().item(self.draw_combo.findData(value)).setEnabled(ok)
        if not allowed[self.draw_combo.currentData()]:
            with self._not_live():  # for the next run (new data, another precision), not the one in flight
                self.draw_combo.setCurrentIndex(self.draw_combo.findData("jacobian" if allowed["jacobian"] else None))

    def _leave_a_shipped_prior_of_another_modality(self, modality: str) -> None:
        """A *shipped* prior picked for another modality (e.g. last session's MRI prior, then a CT scan is loaded)
        gives way to the modality's default, with a notice; a prior loaded from a file is kept (its mismatch shown)."""
        card = getattr(self.prior, "card", None)
        idx = self.prior_combo.findData(self.prior_source) if self.prior_source else -1
        if card is None or idx < 0 or card.modality in (modality, "generic"):
            return
        picked = self.prior_combo.currentIndex() != 0  # chosen by the user, not the last run's default
        self.prior_combo.blockSignals(True)
        self.prior_combo.setCurrentIndex(0)  # NONE_PRIOR: the modality's default is used at run time
        self.prior_combo.blockSignals(False)
        self.prior, self.prior_source = None, None
        self._show_card()
        if picked and self._default_prior_name() is not None:
            show_info(f"napari-diffrecon: prior {card.name!r} is for {card.modality.upper()}; using the default "
                      f"{modality.upper()} prior for this measurement")

    def _select_method_for_modality(self, modality: str) -> None:
        method = self.method_combo.currentData()
        if method in BASELINES and modality not in BASELINES[method][0]:
            self.method_combo.setCurrentIndex(self.method_combo.findData(baseline_for(modality)))

    def _fill_start_choices(self, modality: str, auto: str | None = None) -> None:
        """The hot start's choices for data of ``modality``: "auto" (the data's start, ``auto``) and its classical
        methods; a method still offered stays picked."""
        keep = self.start_combo.currentData()
        self.start_combo.blockSignals(True)
        self.start_combo.clear()
        self.start_combo.addItem(f"auto ({_method_label(auto)})" if auto else "auto", "auto")
        for name, (mods, _desc) in BASELINES.items():
            if modality in mods or not modality:  # no data yet: every method (a preset's start can be shown)
                self.start_combo.addItem(name, name)
        self.start_combo.setCurrentIndex(max(self.start_combo.findData(keep), 0))
        self.start_combo.blockSignals(False)

    def _chosen_start(self) -> str | None:
        """The classical method the start box names ("auto": the data's; None: "auto" without data)."""
        choice = self.start_combo.currentData() or "auto"
        if choice != "auto":
            return choice
        return default_hot_start(self.measurement) if self.measurement is not None else None

    def _start_method(self) -> str | None:
        """The classical method a hot-started run of the current settings starts from (None: not hot-started)."""
        method = self.method_combo.currentData() or "dds"
        if method not in SAMPLERS or not self.hot_start.isChecked():
            return None
        return self._chosen_start()

    def _classical_for(self) -> list[str]:
        modality = str(self.measurement.operator.get("modality")) if self.measurement else ""
        return [k for k, (mods, _) in BASELINES.items() if modality in mods]

    def _on_noise_sigma(self, value: float) -> None:
        if self.measurement is not None and str(self.measurement.noise.get("model", "gaussian")) == "gaussian":
            if value <= 0:  # a Gaussian likelihood needs σ > 0: the box goes back to the σ the next run uses
                self.noise_sigma.blockSignals(True)
                self.noise_sigma.setValue(float(self.measurement.noise.get("sigma", 0.0)))
                self.noise_sigma.blockSignals(False)
                show_info("napari-diffrecon: the noise σ must be above 0 (a Gaussian likelihood has no σ of 0); "
                          "for nearly noise-free data type a small σ, e.g. 1e-4 of the data's scale")
            else:
                # the user's σ is a statement about the data, no longer a reader's assumption
                noise = {k: v for k, v in self.measurement.noise.items() if k not in ("assumed", "note")}
                self.measurement.noise = {**noise, "sigma": float(value), "model": "gaussian"}
                self._kind_cache = None  # the noise floor, hence "noisy data", may have changed
                if not self.running:  # the spin boxes act live: a σ typed during a run must not retune it
                    self._follow_the_data()

    def _add_layer_data(self, layer_data: list[tuple[Any, dict[str, Any], str]]) -> None:
        """Add the layers; the measurement layer (under the ground truth) is the selected one, for "Use selected
        layer". The view is fitted to the layers: data of another pixel size (a CT in mm after an MRI in pixels)
        opened zoomed in or out, since napari fits the view only to the first layer of an empty viewer."""
        measurement = None
        for data, kwargs, kind in layer_data:
            layer = getattr(self.viewer, f"add_{kind}")(data, **kwargs)
            if (kwargs.get("metadata") or {}).get("role") == "measurement":
                measurement = layer
        if measurement is not None:
            self.viewer.layers.selection.active = measurement
        if layer_data:
            self.viewer.reset_view()

    def load_sample(self, key: str) -> None:
        """Open a shipped sample (adds ground-truth and measurement layers; ready to Run)."""
        from ..io._napari import sample_layers

        try:
            self._add_layer_data(sample_layers(key))
        except Exception as e:  # noqa: BLE001 - anything wrong with a sample is reported, not raised
            show_error(f"napari-diffrecon: cannot load sample {key!r}: {e}")
            return

    def open_path(self, path: str | Path) -> bool:
        """Open a measurement file, or an image to simulate from with the widget's options.

        Returns True on success; on failure shows a napari notification and changes nothing.
        """
        from ..io._napari import read_any

        path = Path(path)
        try:
            layers = read_any(path, simulate=self.simulate_options())
        except (BundleError, ValueError, FileNotFoundError, OSError, KeyError) as e:
            show_error(f"napari-diffrecon could not open {path.name}: {e}")
            return False
        self._add_layer_data(layers)
        return True

    def _open_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Open measurement or image", "",
            "Measurements and images (*.npz *.h5 *.dcm *.nii *.nii.gz *.tif *.tiff *.png *.npy);;All files (*)",
        )
        if path:
            self.open_path(path)

    def simulate_options(self) -> dict[str, Any]:
        """The simulation options the widget shows (for images without a measurement)."""
        modality = self.sim_modality.currentText()
        opts: dict[str, Any] = {"modality": modality, "size": self.sim_size.value()}
        if modality in ("ct", "pet"):
            opts["views"] = self.sim_views.value()
        if modality == "mri":
            opts["accel"] = self.sim_accel.value()
            opts["coils"] = self.sim_coils.value()
        if modality == "pet":
            opts["counts"] = self.sim_counts.value()
        return opts

    def use_selected_layer(self) -> None:
        """Adopt the selected layer's measurement, or simulate one from the selected 2D image layer.

        A measurement layer's measurement is adopted. A ground-truth layer is an image: it is simulated from with the
        "simulate as" options, unless they describe the measurement it came with (:meth:`_simulated_as`), which is
        then adopted, with a notice.
        """
        layer = self.viewer.layers.selection.active
        if layer is None:
            show_warning("napari-diffrecon: select an image layer first")
            return
        meta = layer.metadata or {}
        m = meta.get("measurement")
        if isinstance(m, Measurement):
            if meta.get("role") != "ground truth":
                self.set_measurement(m, _measurement_name(layer.name))
                return
            if self._simulated_as(m):
                self.set_measurement(m, _measurement_name(layer.name))
                show_info(f"napari-diffrecon: using the measurement that came with {layer.name!r} (the \"simulate "
                          "as\" options describe it); change them to simulate another from the image")
                return
        from napari.layers import Image

        kind = layer.__class__.__name__  # the layer's class, also through napari's PublicOnlyProxy
        if not isinstance(layer, Image):  # points, shapes, labels, surfaces...: coordinates or ids are not an image
            show_error(f"napari-diffrecon: layer {layer.name!r} is a {kind} layer; pick an image layer (a measurement "
                       "layer, or an image to simulate one from)")
            return
        if getattr(layer, "rgb", False):
            show_error(f"napari-diffrecon: layer {layer.name!r} is an RGB(A) colour image; convert it to one grey "
                       "channel first (e.g. a new layer with layer.data[..., :3].mean(-1))")
            return
        data = np.asarray(layer.data)
        if data.dtype == bool:
            show_error(f"napari-diffrecon: layer {layer.name!r} is a boolean mask, not an image of intensities")
            return
        if data.ndim == 3:  # the slice on screen, in the layer's own index (other layers' z grids differ)
            dims = self.viewer.dims
            if dims.ndisplay != 2 or list(dims.displayed) != [dims.ndim - 2, dims.ndim - 1]:
                show_error(f"napari-diffrecon: layer {layer.name!r} is a volume and the view does not show one of its "
                           "slices (3D view, or rolled / transposed axes); return to the 2D view of its slices "
                           "(View ▸ Axes ▸ Reset, 2D) and pick the slice with the slider")
                return
            k = int(np.round(np.asarray(layer.world_to_data(dims.point))[0]))
            if not 0 <= k < data.shape[0]:
                show_error(f"napari-diffrecon: the slider is outside layer {layer.name!r}'s slices (0–"
                           f"{data.shape[0] - 1}); move it onto the layer")
                return
            data = data[k]
        if data.ndim != 2 or not np.issubdtype(data.dtype, np.number):
            show_error(f"napari-diffrecon: layer {layer.name!r} is not a 2D image; pick a single-slice image layer")
            return
        from ..io._napari import simulated_layers

        opts = self.simulate_options()
        if str(meta.get("units", "")).upper() == "HU":  # a CT image shown in HU (even one with no air in it)
            opts["units"] = "HU"
        from ..io._napari import layer_axes

        axes = layer_axes(meta)
        if axes:  # its orientation, for NIfTI / DICOM exports of what is simulated from it
            opts["axes_ras"] = axes
        scale = [float(v) for v in np.asarray(layer.scale)[-2:]]
        if any(v != 1.0 for v in scale):  # a layer with a pixel size (mm): CT / PET attenuation per pixel follows it
            opts["pixel_spacing_mm"] = scale
        source = re.sub(r" \((ct|mri|pet) simulated\)$", "", _measurement_name(layer.name)) or layer.name
        try:
            self._add_layer_data(simulated_layers(data, source, **opts))
        except ValueError as e:
            show_error(f"napari-diffrecon: cannot simulate from {layer.name!r}: {e}")
            return
        said = []
        if tuple(data.shape) != (opts["size"], opts["size"]):
            said.append(f"resampled from {data.shape[0]}×{data.shape[1]} to {opts['size']}² (the \"simulate as\" "
                        "size), keeping its aspect ratio")
        if "pixel_spacing_mm" not in opts and opts["modality"] in ("ct", "pet"):
            said.append("it has no pixel size, so a 350 mm field of view was assumed (set the layer's scale in mm "
                        "to give one)")
        if said:
            show_info(f"napari-diffrecon: {layer.name!r} " + "; ".join(said))

    def _simulated_as(self, m: Measurement) -> bool:
        """Whether the "simulate as" options (:meth:`simulate_options`) describe ``m``: its modality and size, the
        views (CT, PET), the acceleration and coils (MRI), and the true counts (PET, when recorded)."""
        from ..physics.masks import acceleration_of

        opts = self.simulate_options()
        spec = m.operator or {}
        made = m.metadata.get("options") if isinstance(m.metadata, dict) else None
        made = made if isinstance(made, dict) else {}
        shape = tuple(spec.get("image_shape", ()))
        if str(spec.get("modality")) != opts["modality"] or shape != (opts["size"], opts["size"]):
            return False
        if "views" in opts and len(spec.get("angles_deg", ())) != opts["views"]:
            return False
        if "coils" in opts:
            maps, mask = spec.get("coil_maps"), spec.get("mask")
            accel = made.get("accel") or (acceleration_of(np.asarray(mask)) if mask is not None else 1.0)
            coils = int(np.shape(maps)[0]) if maps is not None else 1
            if coils != opts["coils"] or not math.isclose(float(accel), opts["accel"], rel_tol=0.05):
                return False
        counts = made.get("counts")
        return "counts" not in opts or counts is None or math.isclose(float(counts), opts["counts"], rel_tol=1e-6)

    # ------------------------------------------------------------------ prior
    def _default_prior_name(self) -> str | None:
        from ..priors import default_prior_for

        if self.measurement is None:
            return None
        modality = str(self.measurement.operator.get("modality"))
        few_step = self.method_combo.currentData() == "consistency"  # a distilled consistency model when shipped
        return default_prior_for(modality, modality == "mri", consistency=few_step)

    def refresh_priors(self) -> None:
        """Fill the prior dropdown with the shipped priors."""
        from ..priors import list_priors

        self.prior_combo.blockSignals(True)
        self.prior_combo.clear()
        self.prior_combo.addItem(NONE_PRIOR, None)
        for name, card in list_priors().items():
            self.prior_combo.addItem(f"{name} ({card.modality.upper()}, {card.resolution}²)", name)
        self.prior_combo.blockSignals(False)

    def _on_prior_combo(self) -> None:
        name = self.prior_combo.currentData()
        if name is None:
            self.prior, self.prior_source = None, None
            self._show_card()
            self._check_prior()
            return
        self.set_prior(name)

    def _show_card(self) -> None:
        """Show the card of the prior a run will use: the loaded one, else the modality's default for the data (or a
        line saying how it is chosen while no data are loaded)."""
        card = getattr(self.prior, "card", None)
        prefix = ""
        if card is None:
            name = self._default_prior_name()
            if name is not None:
                from ..priors import list_priors

                card = list_priors().get(name)
                modality = str(self.measurement.operator.get("modality")).upper() if self.measurement else ""
                prefix = f"default for {modality}: "
        if card is not None:
            self.card_label.setText(prefix + card_text(card))
            self.card_label.setToolTip(  # as rich text, escaped: Qt guesses the format of a tooltip from "<"
                "<p>" + html.escape(card_tooltip(card)).replace("\n\n", "</p><p>") + "</p>")
            return
        # no default installed for the data: the mismatch line below says so
        self.card_label.setText("" if self.measurement is not None else
                                "a run uses the shipped prior for the modality of the data (load data to see which)")
        self.card_label.setToolTip("")

    def _prior_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Load prior card", "",
                                              "Prior cards (*.json);;Weights (*.safetensors)")
        if path:
            self.set_prior(path)

    def set_prior(self, name_or_path: str | Path | None, prior: Any = None) -> bool:
        """Load a prior by name or path (or use an already-loaded one); show its card and any mismatch."""
        from ..priors import CardError, load_prior

        if prior is None and name_or_path is None:
            self.prior, self.prior_source = None, None
            self._show_card()
            self._check_prior()
            return True
        try:
            prior = prior if prior is not None else load_prior(name_or_path)
        except (FileNotFoundError, CardError, ValueError, OSError) as e:
            show_error(f"napari-diffrecon: cannot load prior {name_or_path}: {e}")
            return False
        self.prior = prior
        self.prior_source = str(name_or_path) if name_or_path is not None else getattr(prior.card, "name", None)
        self._show_card()
        self._check_prior()
        return True

    def run_prior(self) -> tuple[Any, str | None] | None:
        """The prior a diffusion run (or an auto-tune search) uses and its source: the one picked in the prior box,
        else the default for the data and the method (the consistency sampler's is a consistency model), loaded once
        and *not* pinned — the box stays on "default", so a run of another method, or the next session, gets that
        method's own default. None, with an error notice, when there is none or the prior does not fit the data."""
        from ..priors import CardError, load_prior

        prior, source = self.prior, self.prior_source
        if prior is None:
            source = self._default_prior_name()
            if source is None:
                modality = str(self.measurement.operator.get("modality")).upper() if self.measurement else "these data"
                show_error(f"napari-diffrecon: no prior for {modality} is installed; load a prior file "
                           f"(Prior ▸ Load file…) or pick a classical method ({', '.join(self._classical_for())})")
                return None
            if source not in self._default_priors:
                try:
                    self._default_priors[source] = load_prior(source)
                except (FileNotFoundError, CardError, ValueError, OSError) as e:
                    show_error(f"napari-diffrecon: cannot load prior {source}: {e}")
                    return None
            prior = self._default_priors[source]
        msg = self._check_prior(prior)
        if msg:
            show_error(f"napari-diffrecon: {msg}")
            return None
        return prior, source

    def _check_prior(self, prior: Any = None) -> str | None:
        """Show (and return) why the prior — ``prior``, else the one picked — does not fit the loaded data."""
        card = getattr(prior if prior is not None else self.prior, "card", None)
        msg = prior_mismatch(card, self.measurement) if self.measurement is not None else None
        if msg is None and self.prior is None and self.measurement is not None and self._default_prior_name() is None:
            mod = str(self.measurement.operator.get("modality")).upper()
            self.mismatch_label.setText(f"no {mod} prior installed: load a prior file, or use a classical method")
        else:
            self.mismatch_label.setText(msg or "")
        return msg

    # ------------------------------------------------------------------ sampler settings
    def _on_hot_start_clicked(self, *_: Any) -> None:
        self._hot_start_chosen = True  # the user's choice: kept across methods from now on

    def _follow_method_with_hot_start(self, *_: Any) -> None:
        """A newly picked sampler hot-starts when it has tuned hot-start values, until the user has set the box."""
        method = self.method_combo.currentData() or "dds"
        if method in SAMPLERS and not self._hot_start_chosen:
            self.hot_start.setChecked(f"{method}-hot" in RECOMMENDED)

    def _on_method_changed(self, *_: Any) -> None:
        method = self.method_combo.currentData() or "dds"
        diffusion = method in SAMPLERS
        show = set(PARAMS_FOR.get(method, ())) if diffusion else set(BASELINE_PARAMS.get(method, ()))
        if diffusion and self.hot_start.isChecked():
            show |= {"t0", "start", *BASELINE_PARAMS.get(self._start_method() or "", ())}
        for key, row in self.param_rows.items():
            row.setVisible(key in show)
        start = self._chosen_start()
        if start:
            self.hot_start.setText(f"hot start from the classical reconstruction ({_method_label(start)})")
        for w in (self.hot_start, self._weight_row, self._samples_row, self.compare):
            w.setVisible(diffusion)
        self._show_card()  # the consistency sampler's default prior is a consistency model

    def _data_kind(self) -> DataKind:
        """What the tuned values depend on besides the method (``reconstruct.data_kind``: modality, MRI coil count,
        noisy data), worked out once per measurement."""
        from ..io.bundle import BundleError
        from ..reconstruct import data_kind
        from ..samplers.defaults import coil_count

        m = self.measurement
        if m is None:
            return "*", None, False
        cached = getattr(self, "_kind_cache", None)
        if cached is None or cached[0] is not m:
            try:
                kind = data_kind(m)
            except (BundleError, ValueError):  # a noise spec the core refuses with its own message at run time
                spec = m.operator or {}
                kind = (str(spec.get("modality", "*")), coil_count(spec), False)
            self._kind_cache = cached = (m, kind)
        return cached[1]

    def _recommended(self, kind: DataKind | None = None, *, method: str | None = None,
                     hot_start: bool | None = None) -> Any:
        """The tuned :class:`SamplerParams` for the chosen method, hot start and data (None for a classical method).

        Parameters
        ----------
        kind : tuple, optional
            ``(modality, coils, noisy)`` of the data to tune for; default the measurement's (:meth:`_data_kind`).
        method : str, optional
            The sampler; default the one picked.
        hot_start : bool, optional
            Whether the run hot-starts; default the box's state.

        Returns
        -------
        SamplerParams or None
            The tuned values; None for a classical method.
        """
        method = method or self.method_combo.currentData() or "dds"
        if method not in SAMPLERS:
            return None
        from ..samplers.defaults import recommended_params

        modality, coils, noisy = kind if kind is not None else self._data_kind()
        hot = self.hot_start.isChecked() if hot_start is None else hot_start
        return recommended_params(method, modality, hot_start=hot, coils=coils, noisy=noisy)

    def _follow_the_data(self) -> None:
        """Show the tuned values when the data's differ from those on show; keep a preset's and the user's otherwise
        (data of another kind whose tuned values for this method are the same, e.g. DDS on low-dose and sparse CT).

        The last run's restored values count as tuned for the kind of data that run was on: kept for data of that
        kind, replaced (with a notice) by another kind's tuned values.
        """
        if self._tuned_for == "preset":
            return
        p = self._recommended()
        if p is None:
            return
        if self._tuned_for == "restored":  # the last run's data kind is not known: taken to be the first data's
            self._tuned_for, self._restored_kind = p.to_dict(), self._data_kind()
        elif p.to_dict() != self._tuned_for:
            old = self._restored_kind
            self.use_recommended()
            if old is not None and old[0] != "*":
                show_info(f"napari-diffrecon: the last session's {self.method_combo.currentData()} values were for "
                          f"{_kind_text(old)} data; using the tuned values for {_kind_text(self._data_kind())} data")

    def use_recommended(self, *_: Any) -> None:
        """Fill the sampler's parameters with the tuned values for the method and modality (``samplers.defaults``).

        Called when the user picks a method or toggles hot start, and when data whose tuned values differ are loaded
        (another modality, MRI coil count, noisy or not) or the noise σ is changed across that line; a preset's
        values are not changed then, nor the last run's restored ones while the data are of that run's kind.
        """
        if self._applying:
            return
        p = self._recommended()
        if p is None:
            return
        prev = self._tuned_for
        before = {key: self.spins[key].value() for key in PARAM_SPINS}
        self._tuned_for, self._restored_kind = p.to_dict(), None
        with self._not_live():  # tuned values for the next run, not moves of the one in flight
            for key in PARAM_SPINS:
                v = getattr(p, key)
                self.spins[key].setValue(self.spins[key].maximum() if isinstance(v, float) and not math.isfinite(v)
                                         else v)
            if p.t0 < 1:
                self.spins["t0"].setValue(p.t0)
            self.renoise_combo.setCurrentIndex(max(self.renoise_combo.findData(p.renoise), 0))
        self._say_replaced(prev, before)

    def _say_replaced(self, prev: Any, before: dict[str, float]) -> None:
        """A notice naming the values the user had typed (not the dock's earlier tuned ones) that the tuned values
        just replaced: toggling the hot start, say, turned a typed 7 steps into 100 without a word."""
        if not isinstance(prev, dict):
            return

        def shown(key: str, v: Any) -> float:  # as the box shows it (rounded to its decimals, inf at its maximum)
            v, box = float(v), self.spins[key]
            places = box.decimals() if hasattr(box, "decimals") else 0
            return box.maximum() if not math.isfinite(v) else round(v, places)

        typed = [key for key in PARAM_SPINS if key in prev and not self.param_rows[key].isHidden()
                 and not math.isclose(before[key], shown(key, prev[key]), rel_tol=1e-6, abs_tol=1e-9)
                 and not math.isclose(before[key], self.spins[key].value(), rel_tol=1e-6, abs_tol=1e-9)]
        if typed:
            show_info("napari-diffrecon: the tuned values for this choice replaced yours: " + ", ".join(
                f"{key} {before[key]:g} → {self.spins[key].value():g}" for key in typed))

    def _on_weight(self, tick: int) -> None:
        w = self.prior_weight()
        self.weight_label.setText(f"{w:.2f}")
        self._apply_live("prior_weight", w)

    def prior_weight(self) -> float:
        """The slider's prior/likelihood weight (×0.1 … ×10, 1 in the middle)."""
        return float(10 ** (self.weight_slider.value() / _WEIGHT_RANGE))

    def set_prior_weight(self, w: float) -> None:
        """Move the weight slider to (the tick nearest) ``w``."""
        self.weight_slider.setValue(int(round(math.log10(max(float(w), 1e-6)) * _WEIGHT_RANGE)))

    def _on_live_param(self, key: str) -> None:
        if key in LIVE or key in ADAPT:
            v = self.spins[key].value()
            self._apply_live(key, int(v) if _SPINS[key][1] == "int" else float(v))

    def _live_choice(self, key: str, label: str, choices: dict[str, Any], tooltip: str) -> QComboBox:
        """A combo box of ``choices`` (label -> value) in a parameter row ``key`` whose pick acts on a run in flight."""
        combo = QComboBox()
        for text, value in choices.items():
            combo.addItem(text, value)
        combo.currentIndexChanged.connect(lambda _i: self._apply_live(key, combo.currentData()))
        self.param_rows[key] = _row(label, combo, tooltip=tooltip)
        return combo

    def _apply_live(self, key: str, value: Any) -> None:
        """Write a parameter into the run in flight (the sampler reads it at its next step)."""
        p = self._live_params
        if p is None or self.worker is None or self._quiet_depth:
            return
        if key in ADAPT or key == "posterior_draw":
            p.extra[key] = value
        else:
            setattr(p, key, value)
        step = self._last_update.step if self._last_update is not None else 0
        self._live_log.append({"after_step": step, key: value, "t": round(time.perf_counter() - self._t_run, 3)})

    def current_settings(self) -> RunSettings:
        """A fresh snapshot of the settings the widgets show (what a run will use)."""
        method = self.method_combo.currentData() or "dds"
        params = SamplerParams(
            n_steps=int(self.spins["n_steps"].value()),
            eta=float(self.spins["eta"].value()),
            lam=float(self.spins["lam"].value()),
            gamma=float(self.spins["gamma"].value()),
            zeta=float(self.spins["zeta"].value()),
            cg_iters=int(self.spins["cg_iters"].value()),
            snr=float(self.spins["snr"].value()),
            t0=float(self.spins["t0"].value()) if self.hot_start.isChecked() else 1.0,
            prior_weight=self.prior_weight(),
            # only where the method shows the row (the unconditional samplers read it too, hidden)
            orientations=int(self.spins["orientations"].value()) if "orientations" in PARAMS_FOR.get(method, ()) else 1,
        )
        if method == "dds" and self.draw_combo.currentData():
            params.extra["posterior_draw"] = self.draw_combo.currentData()
        if method == "dds":
            params.renoise = self.renoise_combo.currentData()
        if method in ("dds", "dps") and int(self.spins["adapt_steps"].value()) > 0:
            params.extra.update({k: (int if _SPINS[k][1] == "int" else float)(self.spins[k].value()) for k in ADAPT})
        baseline_params: dict[str, Any] = {}
        hot = self._start_method() if method in SAMPLERS else None
        classical = method if method in BASELINES else hot  # whose parameters the classical rows hold
        if classical:
            for key in BASELINE_PARAMS.get(classical, ()):
                if key == "filter":
                    if self.filter_combo.currentText() != "default":  # else the modality's (baselines.FBP_...)
                        baseline_params["filter"] = self.filter_combo.currentText()
                else:
                    v = self.spins[key].value()
                    if key in ("iters", "lam_rel") and v == 0:  # "default": the method's own (EM: the noise level)
                        continue
                    baseline_params[key] = int(v) if key in ("iters", "subsets") else float(v)
        return RunSettings(
            method=method,
            prior=self.prior_source,
            params=params,
            n_samples=int(self.n_samples.value()) if method in SAMPLERS else 1,
            seed=int(self.seed.value()),
            device=self.device_combo.currentText(),
            hot_start=hot,
            baseline_params=baseline_params,
            std_pool=float(self.std_pool.value()),
            precision=self.precision_combo.currentText(),
        )

    def gui_state(self) -> dict[str, Any]:
        """Widget-only choices stored beside the settings in a preset."""
        return {"compare": self.compare.isChecked(), "grid": self.grid.isChecked(),
                "hot_start": self.hot_start.isChecked(), "start": self.start_combo.currentData() or "auto"}

    def apply_settings(self, settings: RunSettings, gui: dict[str, Any] | None = None, quiet: bool = False) -> None:
        """Show ``settings`` in the widgets (a preset or the last used settings); all or nothing.

        Raises
        ------
        ValueError
            A value the widgets cannot show (the widgets are left as they were).
        """
        before = (self.current_settings(), self.gui_state(), self._tuned_for, self._restored_kind)
        self._tuned_for, self._restored_kind = "preset", None  # the user's values: a new measurement keeps them
        self._applying = True
        try:
            with self._not_live():
                self._apply_settings(settings, gui, quiet)
        except Exception as e:  # noqa: BLE001 - any value a spin box or combo refuses (type, range, overflow)
            with self._not_live():
                self._apply_settings(before[0], before[1], True)  # the widgets' own values: they fit
            self._tuned_for, self._restored_kind = before[2], before[3]
            raise ValueError(f"these settings cannot be shown ({type(e).__name__}: {e}); nothing was changed") from None
        finally:
            self._applying = False

    @staticmethod
    def _set_checked(box: Any, value: Any, name: str) -> None:
        """Set a spin box to ``value``, refusing what it cannot hold (Qt would clamp it, or overflow)."""
        v = float(value)
        if not (box.minimum() <= v <= box.maximum()):
            raise ValueError(f"{name} = {value!r} is outside this box's range {box.minimum():g}–{box.maximum():g}")
        box.setValue(int(round(v)) if isinstance(box, QSpinBox) else v)

    @contextlib.contextmanager
    def _not_live(self) -> Iterator[None]:
        """Widget changes made by the workbench itself (tuned values for new data or a new method, a preset) are for
        the next run: inside this block they do not reach the run in flight, as the user's own changes do."""
        depth = self._quiet_depth
        self._quiet_depth = depth + 1
        try:
            yield
        finally:
            self._quiet_depth = depth

    def _apply_settings(self, settings: RunSettings, gui: dict[str, Any] | None, quiet: bool) -> None:
        idx = self.method_combo.findData(settings.method)
        if idx < 0:
            raise ValueError(f"unknown method {settings.method!r}")
        self.method_combo.setCurrentIndex(idx)
        p = settings.params
        if p is None:  # a preset without sampler values: the tuned ones for the method, its hot start and the data
            p = self._recommended(method=settings.method if settings.method in SAMPLERS else "dds",
                                  hot_start=bool(settings.hot_start))
        for key in PARAM_SPINS:
            v = getattr(p, key)
            if isinstance(v, float) and not math.isfinite(v):
                v = self.spins[key].maximum()
            self._set_checked(self.spins[key], v, key)
        if p.t0 < 1:
            self.spins["t0"].setValue(p.t0)
        for key in ADAPT:
            self.spins[key].setValue((p.extra or {}).get(key, ADAPT_START_VALUES[key]))
        from ..samplers.datastep import draw_mode

        self.draw_combo.setCurrentIndex(max(self.draw_combo.findData(draw_mode((p.extra or {}).get("posterior_draw"))),
                                            0))
        self.renoise_combo.setCurrentIndex(max(self.renoise_combo.findData(p.renoise), 0))
        self._hot_start_chosen = True  # restored / loaded settings say whether to hot-start
        self.hot_start.setChecked(bool(settings.hot_start) or bool((gui or {}).get("hot_start")))
        # The start: the widget's own choice when the preset stored it ("auto" re-derives the data's), else the
        # settings' (a CLI run's provenance names the start it used).
        # Presets saved by the workbench before the start box existed stored the data's start then (the box was
        # "auto" in effect): they stay "auto".
        start = (gui or {}).get("start") or ("auto" if "hot_start" in (gui or {}) else settings.hot_start) or "auto"
        self.start_combo.setCurrentIndex(max(self.start_combo.findData(start), 0))
        self.set_prior_weight(p.prior_weight)
        self._set_checked(self.n_samples, settings.n_samples, "n_samples")
        self._set_checked(self.std_pool, settings.std_pool, "std_pool")
        self._set_checked(self.seed, settings.seed, "seed")
        if self.device_combo.findText(settings.device) >= 0:
            self.device_combo.setCurrentText(settings.device)
        elif not quiet:
            show_warning(f"napari-diffrecon: the preset's device {settings.device!r} is not available here; keeping "
                         f"{self.device_combo.currentText()}")
        self.precision_combo.setCurrentText(settings.precision)
        self.spins["iters"].setValue(0)  # the method's default unless the settings give a count
        self.spins["lam_rel"].setValue(0.0)
        self.filter_combo.setCurrentText("default")
        for key, v in (settings.baseline_params or {}).items():
            if key == "iters" and not isinstance(v, int):
                continue
            if key == "filter":
                self.filter_combo.setCurrentText(str(v))
            elif key in self.spins:
                self._set_checked(self.spins[key], v, key)
        if settings.prior:
            idx = self.prior_combo.findData(settings.prior)
            if idx >= 0:
                self.prior_combo.setCurrentIndex(idx)
            elif Path(settings.prior).suffix in (".json", ".safetensors") and Path(settings.prior).exists():
                self.set_prior(settings.prior)
            elif not quiet:
                show_warning(f"napari-diffrecon: the preset's prior {settings.prior!r} is not available here")
        gui = gui or {}
        if gui.get("unset_params"):  # saved before these parameters existed: their tuned values for this method
            tuned = self._recommended(_kind_from_json(gui.get("data_kind")))
            for key in gui["unset_params"]:
                if tuned is not None and key in self.spins and hasattr(tuned, key):
                    self.spins[key].setValue(getattr(tuned, key))
        if "compare" in gui:
            self.compare.setChecked(bool(gui["compare"]))
        if "grid" in gui:
            self.grid.setChecked(bool(gui["grid"]))
        self._on_method_changed()

    def _restore_last(self) -> None:
        """Show the last run's settings (:func:`._presets.load_last`).

        Its sampler values, the user's own among them, count as tuned for the kind of data that run was on (stored
        beside them by :meth:`_last_state`): data of that kind, or of a kind with the same tuned values, keep them;
        data of another kind bring in their tuned values, as within a session.
        """
        last = _presets.load_last()
        if last is None:
            return
        settings, gui = last
        try:
            self.apply_settings(settings, gui, quiet=True)
        except ValueError as e:  # a damaged file must not keep the dock from opening
            show_warning(f"napari-diffrecon: the last session's settings were not restored: {e}")
            return
        kind = _kind_from_json(gui.get("data_kind"))
        if kind is None:
            self._tuned_for = "restored"
        else:
            p = self._recommended(kind)
            self._tuned_for, self._restored_kind = (p.to_dict() if p is not None else None), kind

    def _last_state(self) -> dict[str, Any]:
        """:meth:`gui_state` plus ``"data_kind"``: the kind of data the sampler values on show are for (the
        measurement's, else the restored settings'), which the next session's :meth:`_restore_last` reads."""
        kind: DataKind | None
        if self.measurement is not None:
            kind = self._data_kind()
        elif self._restored_kind is not None:
            kind = self._restored_kind
        else:  # no data: tuned for none ("*"), unless a preset's values or an unknown kind's are on show
            kind = None if self._tuned_for in ("preset", "restored") else self._data_kind()
        return {**self.gui_state(), **({"data_kind": list(kind)} if kind is not None else {})}

    def save_preset(self, path: str | Path) -> Path:
        """Save the current settings as a JSON preset."""
        return _presets.save_preset(path, self.current_settings(), self.gui_state())

    def load_preset(self, path: str | Path) -> bool:
        """Load a JSON preset into the widgets (a bad file gives a notification, changes nothing)."""
        try:
            settings, gui = _presets.load_preset(path)
        except (ValueError, OSError) as e:
            show_error(f"napari-diffrecon: {e}")
            return False
        try:
            self.apply_settings(settings, gui)
        except ValueError as e:
            show_error(f"napari-diffrecon: preset {Path(path).name}: {e}")
            return False
        if self.running:  # the boxes now show the preset; typing in them acts live, loading does not
            show_info(f"napari-diffrecon: preset {Path(path).name} is for the next run; the run in flight keeps its "
                      "own values")
        return True

    def _save_preset_dialog(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Save preset", "diffrecon-preset.json", "Presets (*.json)")
        if path:
            show_info(f"napari-diffrecon: preset saved to {self.save_preset(path)}")

    def _load_preset_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Load preset", "", "Presets (*.json)")
        if path:
            self.load_preset(path)

    # ------------------------------------------------------------------ run / stop
    @property
    def running(self) -> bool:
        """True while a run is in flight."""
        return self.worker is not None

    @property
    def busy(self) -> bool:
        """True while a 2D run, an auto-tune search or a volume run is in flight: they share the prior, so only one
        of them runs at a time (each refuses to start while this is True)."""
        return self.running or self.tuning.running or self.volume.running

    def run(self) -> Any:
        """Start a run in a napari thread worker; returns the worker (None when refused with a notification)."""
        if self.busy:
            show_info(f"napari-diffrecon: {_busy_text(self)}")
            return None
        if self.measurement is None:
            show_error("napari-diffrecon: no measurement; load a sample, open a file or use a layer first")
            return None
        settings = self.current_settings()
        diffusion = settings.method in SAMPLERS
        modality = str(self.measurement.operator.get("modality"))
        if not diffusion and modality not in BASELINES[settings.method][0]:
            show_error(f"napari-diffrecon: {settings.method} applies to {', '.join(BASELINES[settings.method][0])} "
                       f"data, not {modality.upper()}; pick one of {', '.join(self._classical_for())}")
            return None
        prior = None
        if diffusion:
            found = self.run_prior()
            if found is None:
                return None
            prior, settings.prior = found
        if self.remember:  # the prior box's choice ("default": None), not the default this run resolved to
            _presets.save_last(dataclasses.replace(settings, prior=self.prior_source), self._last_state())
        self._run_settings = settings
        self._run_measurement = self.measurement  # which data the run's layers belong to (compared by identity)
        # the run's own copy of the noise model: the σ box edits the measurement, for the next run, not this one
        self._run_data = dataclasses.replace(self.measurement, noise=dict(self.measurement.noise or {}))
        self._run_prior_name = getattr(getattr(prior, "card", None), "name", None) if diffusion else None
        self._live_params = settings.params
        self._live_log = []
        self._last_update = None
        self.estimate_updates = 0
        self._fresh = set(LAYER_NAMES)
        self._mark_earlier_results()
        self._window = None
        self._t_run = time.perf_counter()
        self._ended = False
        self._warned = set()
        self._pbar_t = 0.0
        self._running_prov = {"status": "running", "settings": settings.to_dict()}
        baseline = baseline_for(modality) if diffusion and self.compare.isChecked() else None
        worker = new_worker(
            run_stream, self._run_data, settings, prior, baseline, max_rate=self.max_rate, live_log=self._live_log
        )
        worker.yielded.connect(self._on_update)
        worker.errored.connect(self._on_error)
        worker.aborted.connect(self._on_aborted)
        worker.finished.connect(self._on_finished)
        self.worker = worker
        self._pbar = run_progress(self, settings.params.n_steps if diffusion else 0, f"diffrecon {settings.method}")
        self.run_btn.setEnabled(False)
        self.stop_btn.setEnabled(diffusion)  # a classical method runs to its end (seconds): there is no step to stop at
        self.status.setText(f"running {settings.method}…")
        worker.start()
        return worker

    def _mark_earlier_results(self) -> None:
        """At the start of a run: the result layers still hold the earlier run's results, and their names say so
        (``EARLIER``) and they are hidden until this run writes them (:meth:`_show`), so that a classical run after a
        diffusion run never leaves the earlier posterior std or support map looking like, or covering, the new result.

        A result layer the user renamed is theirs from then on: left as it is and no longer written to (a run makes
        a new layer for its role). Layers the user created are never touched.
        """
        for role, layer in list(self.layers.items()):
            if layer not in self.viewer.layers or layer.name != self._names.get(role):
                self._release(role)
                continue
            # another measurement's result (CT's, now PET's run) is not written over: this run makes its own layer,
            # placed for its own data
            other = self._written_on.get(role) is not self._run_measurement
            if role not in self._stale:  # not yet named for the run it came from
                self._stale.add(role)
                method = self._written_by.get(role)
                if method:
                    self._name(role, layer, f"{layer.name} {EARLIER.format(method=method)}")
                # hidden, not removed: the new run's results are what shows (an earlier std would cover a new
                # baseline); the earlier run's stay one click away for comparison
                layer.visible = False
            elif other:
                layer.visible = False
            if other:
                self._release(role)
        if not self._told_rewrite and any(r in self._stale for r in ("mean", "estimate", "baseline")):
            self._told_rewrite = True  # the same data's rerun writes over them: how to keep one, said once
            show_info("napari-diffrecon: this run writes over the earlier run's result layers (hidden and marked "
                      f"{EARLIER.format(method='…')} until it does); rename a result layer to keep it — a renamed "
                      "layer is never written to")

    def _release(self, role: str) -> None:
        """Stop tracking the role's layer (it stays in the viewer)."""
        self.layers.pop(role, None)
        self._names.pop(role, None)
        self._written_by.pop(role, None)
        self._written_on.pop(role, None)
        self._stale.discard(role)

    def _name(self, role: str, layer: Any, name: str) -> None:
        """Give a result layer its name, remembering it as read back (napari makes names unique)."""
        if layer.name != name:
            layer.name = name
        self._names[role] = layer.name

    def track(self, role: str, layer: Any) -> None:
        """Track ``layer`` as the role's result layer, written by the run of :attr:`_run_settings`.

        Parameters
        ----------
        role : str
            The result's role (a key of ``LAYER_NAMES``, "support" or "flags").
        layer : napari.layers.Layer
            The layer; a new one has the name the workbench gave it (a tracked one keeps the name on record, so that
            a name the user gives it mid-run stays theirs).
        """
        if self.layers.get(role) is not layer:
            self.layers[role] = layer
            self._names[role] = layer.name
        self._written_by[role] = self._run_settings.method if self._run_settings is not None else "?"
        self._written_on[role] = self._run_measurement
        if role in self._stale:  # an earlier run's layer, hidden when this run began, now holds this run's result
            self._stale.discard(role)
            layer.visible = True

    def result_layer(self, role: str) -> Any:
        """The role's layer when it is in the viewer and holds the last run's result (not an earlier run's).

        Parameters
        ----------
        role : str
            The result's role.

        Returns
        -------
        napari.layers.Layer or None
            The layer, or None.
        """
        layer = self.layers.get(role)
        if layer is None or layer not in self.viewer.layers or role in self._stale:
            return None
        return layer

    def stop(self) -> None:
        """Cancel the run in flight (it ends at the sampler's next step; what was computed stays). A classical
        method is not interrupted: it finishes and is shown as it is."""
        if self.worker is not None and self._run_settings is not None and self._run_settings.method in BASELINES:
            self.status.setText(f"{self._run_settings.method} is a classical method: it finishes in seconds")
            return
        if self.worker is not None:
            self.worker.quit()
            self.status.setText("stopping…")

    # ------------------------------------------------------------------ worker slots (main thread)
    def _on_update(self, upd: Update) -> None:
        if self._ended:  # an update queued behind Stop: the run is over
            return
        self._last_update = upd
        if upd.kind == "final" and upd.baseline_method is None:
            record = self.tuning.provenance_for(self._run_settings)
            if record is not None:  # the run uses the auto-tuned values: the search goes into its provenance
                upd.provenance["auto_tune"] = record
        if upd.kind != "tick":
            self._apply_update(upd)
        # The progress bar last: napari may process events while it redraws (re-entrancy). napari's bar
        # repaints the window on every change, so it is updated at most PBAR_PERIOD_S apart.
        pbar = self._pbar
        now = time.perf_counter()
        if pbar is not None and upd.n_steps and (now - self._pbar_t >= PBAR_PERIOD_S or upd.kind == "final"):
            self._pbar_t = now
            if self._status_pending and upd.kind != "final":
                self.status.setText(self._status_pending)
                self._status_pending = ""
            if pbar.total != upd.n_steps:
                pbar.total = upd.n_steps
            eta = upd.elapsed / max(upd.step, 1) * (upd.n_steps - upd.step)
            pbar.set_description(f"diffrecon: step {upd.step}/{upd.n_steps}, NFE {upd.nfe}, ETA {eta:.1f} s")
            if upd.step > pbar.n:
                pbar.update(upd.step - pbar.n)

    def _warn_once(self, warnings: list[str]) -> None:
        """A notification for each of this run's warnings not shown yet."""
        for w in warnings:
            if w not in self._warned:
                self._warned.add(w)
                show_warning(f"napari-diffrecon: {w}")

    def _apply_update(self, upd: Update) -> None:
        if upd.kind == "warnings":  # before the first step
            self._warn_once(upd.provenance.get("warnings", []))
            return
        if upd.kind == "baseline":
            self._show("baseline", upd.baseline, name=f"baseline ({upd.baseline_method})",
                       provenance=upd.provenance)
            return
        running = self._running_prov
        if upd.kind == "final" and upd.baseline_method is not None:  # a classical run: the baseline layer
            self._show("baseline", upd.x0_hat, name=f"baseline ({upd.baseline_method})", provenance=upd.provenance)
            if upd.residual_map is not None:
                self._show("residual", upd.residual_map, provenance=upd.provenance)
            self.last_provenance = upd.provenance
            used = (upd.provenance or {}).get("baseline_params_used") or {}
            ran = ""
            if "iters_run" in used:  # EM: how many iterations, and whether it stopped at the noise level
                ran = (f", stopped at the noise level after {used['iters_run']} iterations"
                       if used.get("stopped_at_noise_floor") else f", {used['iters_run']} iterations")
            warnings = list((upd.provenance or {}).get("warnings") or [])
            self.status.setText(f"{upd.baseline_method}: data residual {upd.residual:.4f}"
                                f"{noise_floor_text(upd.provenance, '.4f')}{ran} ({upd.elapsed:.2f} s)"
                                + (f" — {len(warnings)} warning(s), see the notifications" if warnings else ""))
            self._warn_once(warnings)
            return
        prov = upd.provenance if upd.kind == "final" else running
        if upd.x_t is not None:
            self._show("iterate", upd.x_t, provenance=prov)
        if upd.x0_hat is not None:
            self._show("estimate", upd.x0_hat, provenance=prov)
            self.estimate_updates += 1
        if upd.mean is not None:
            self._show("mean", upd.mean, provenance=prov)
        if upd.std is not None:
            self._show("std", upd.std, provenance=prov)
        if upd.residual_map is not None:
            self._show("residual", upd.residual_map, provenance=prov)
        if upd.kind == "final":
            self.last_provenance = upd.provenance
            one = self._run_settings is not None and self._run_settings.n_samples < 2
            warnings = list((upd.provenance or {}).get("warnings") or [])
            self.status.setText(
                f"done: {upd.n_steps} steps, NFE {upd.nfe}, {upd.elapsed:.1f} s, data residual {upd.residual:.4f}"
                + noise_floor_text(upd.provenance, ".4f")
                + (" (one posterior sample: the std is 0; ask for ≥ 2 samples)" if one else "")
                + (f" — {len(warnings)} warning(s), see the notifications and the provenance" if warnings else "")
            )
            self._warn_once(warnings)  # the ones known before the run were shown then
        else:  # shown with the progress bar, at most once per PBAR_PERIOD_S (each change repaints the window)
            self._status_pending = (f"step {upd.step}/{upd.n_steps} · NFE {upd.nfe} · σ {upd.sigma:.3g} · "
                                    f"residual {upd.residual:.4f} · {upd.elapsed:.1f} s")

    def _show(self, role: str, data: np.ndarray, name: str | None = None,
              provenance: dict[str, Any] | None = None) -> None:
        """Assign a fresh array to the role's layer (creating it the first time); keep its display settings."""
        from ..io._napari import shown_values

        m = self._run_measurement or self.measurement
        data, units = shown_values(data, role, m)  # CT images and their std in HU, as clinicians read them
        meta: dict[str, Any] = {"provenance": provenance or {}, "diffrecon_role": role}
        inten = (m.metadata or {}).get("intensity") if m is not None else None
        if isinstance(inten, dict):  # how the values map to the core's image units (io.export.image_units)
            meta["intensity"] = inten
        if units is not None:
            meta["units"] = units
        layer = self.layers.get(role)
        if layer is not None and layer not in self.viewer.layers:
            layer = None
        place = self._placement(data, role)
        own = name or LAYER_NAMES[role]
        if layer is None:
            kwargs: dict[str, Any] = {"name": own, "metadata": meta, **place}
            kwargs.update(self._display(role, data))
            layer = self.viewer.add_image(data, **kwargs)
            if role == "residual":  # data space, with the image's footprint: under the images, seen in grid view
                self.viewer.layers.move(self.viewer.layers.index(layer), 0)
            elif role == "std":  # under this run's images: with the grid off, the opaque std must not cover them
                below = [self.viewer.layers.index(self.layers[r]) for r in ("iterate", "estimate", "mean")
                         if r in self.layers and self.layers[r] in self.viewer.layers]
                if below:
                    self.viewer.layers.move(self.viewer.layers.index(layer), min(below))
            self.track(role, layer)
            self._fresh.discard(role)
            if role in SPREAD_WINDOW_ROLES:
                self._spread_window[role] = tuple(layer.contrast_limits)
            return
        layer.data = data  # a fresh array: napari redraws
        if layer.metadata.get("provenance") is not meta["provenance"]:  # metadata events only when it changes
            layer.metadata = meta
        if layer.name == self._names.get(role):  # not while the user has renamed it
            self._name(role, layer, own)
        self.track(role, layer)
        if role in self._fresh:  # first update of a new run: new contrast window
            self._fresh.discard(role)
            for k, v in self._display(role, data).items():
                setattr(layer, k, v)
            for k, v in place.items():
                if len(v) == data.ndim:
                    setattr(layer, k, v)
        elif (role in SPREAD_WINDOW_ROLES
              and np.allclose(layer.contrast_limits, self._spread_window.get(role, (np.nan,) * 2))):
            # a std / residual changes its scale as the run goes (the samples converge): its window follows it
            # unless the user has set one
            layer.contrast_limits = self._display(role, data)["contrast_limits"]
        if role in SPREAD_WINDOW_ROLES:
            self._spread_window[role] = tuple(layer.contrast_limits)

    def _placement(self, data: np.ndarray, role: str) -> dict[str, tuple[float, ...]]:
        """Layer keywords that place a result: the pixel size (mm) of an image-shaped array as its scale; for the
        data residual (measurement space), the image's footprint (``io._napari.measurement_placement``)."""
        m = self._run_measurement
        if role == "residual":
            from ..io._napari import measurement_placement

            return measurement_placement(m, tuple(data.shape)) if m is not None else {}
        scale = self._scale(data)
        return {"scale": scale} if scale is not None else {}

    def _scale(self, data: np.ndarray) -> tuple[float, ...] | None:
        m = self._run_measurement
        if m is None or data.ndim != 2 or tuple(data.shape) != tuple(m.operator.get("image_shape", ())):
            return None
        px = (m.metadata.get("intensity") or {}).get("pixel_size_mm") if isinstance(m.metadata, dict) else None
        return (float(px), float(px)) if px else (1.0, 1.0)  # explicit: a reused layer must not keep another's size

    def _display(self, role: str, data: np.ndarray) -> dict[str, Any]:
        from ..io._napari import spread_limits

        if role == "std":
            return {"colormap": "magma", "contrast_limits": spread_limits(data)}
        if role == "residual":
            return {"colormap": "viridis", "contrast_limits": spread_limits(data)}
        if role in ("iterate", "estimate", "mean", "baseline"):
            if self._window is None:
                ref = self._reference_image()
                self._window = _limits(ref if ref is not None else data)
            return {"colormap": "gray", "contrast_limits": self._window}
        return {}

    def _reference_image(self) -> np.ndarray | None:
        m = self._run_measurement
        if m is not None and m.ground_truth is not None:
            from ..io._napari import shown_values

            return shown_values(np.abs(m.ground_truth), "ground truth", m)[0]  # in the units the layers show
        base = self.result_layer("baseline")  # this run's (an earlier run's may be of other data)
        return np.asarray(base.data) if base is not None else None

    def _on_error(self, exc: Exception) -> None:
        self._ended = True
        show_error(f"napari-diffrecon: the run failed: {exc}")
        self.status.setText(f"failed: {exc}")
        self._close_pbar()

    def _on_aborted(self) -> None:
        from ..reconstruct import provenance

        self._ended = True
        upd = self._last_update
        extra = {"kind": "diffusion", "status": "stopped", "stopped_at_step": upd.step if upd else 0,
                 "nfe": upd.nfe if upd else 0, "live_parameter_changes": list(self._live_log),
                 "prior": self._run_prior_name, "frontend": "napari widget"}  # the run's, not the box's now
        prov = provenance(self._run_data, self._run_settings, extra)
        for role, layer in self.layers.items():  # the layers this run wrote (not an earlier run's, nor its baseline)
            if role in LAYER_NAMES and role not in self._fresh and role != "baseline" and layer in self.viewer.layers:
                layer.metadata = {**layer.metadata, "provenance": prov}
        self.last_provenance = prov
        self.status.setText(f"stopped at step {extra['stopped_at_step']}; the layers keep what was computed")

    def _on_finished(self) -> None:
        self._ended = True
        self._close_pbar()
        self.worker = None
        self._live_params = None
        self.run_btn.setEnabled(True)
        self.stop_btn.setEnabled(False)

    def _close_pbar(self) -> None:
        pbar, self._pbar = self._pbar, None  # cleared first: close() may process events and re-enter
        if pbar is not None:
            pbar.close()

    def _on_grid(self, on: bool) -> None:
        _grid(self.viewer).enabled = bool(on)
        self.viewer.reset_view()

    # ------------------------------------------------------------------ export
    def export_layer(self, layer: Any, path: str | Path, overwrite: bool = False) -> Path | None:
        """Write an image layer (NIfTI / DICOM / TIFF by extension) with its provenance; None on failure."""
        from ..io._napari import layer_axes, layer_units
        from ..io.bundle import OutputPathError
        from ..io.export import export_image

        role, intensity, units = layer_units(layer.metadata)
        try:
            return export_image(path, np.asarray(layer.data), self._layer_provenance(layer),
                                spacing=tuple(float(s) for s in layer.scale), name=layer.name, overwrite=overwrite,
                                role=role, intensity=intensity, data_units=units, axes_ras=layer_axes(layer.metadata))
        except OutputPathError as e:  # a folder, or a path inside a file: its message says what to do
            show_error(f"napari-diffrecon: export failed: {e}")
        except FileExistsError:  # the core's words are the command line's ("pass --force to overwrite it")
            show_error(f"napari-diffrecon: export failed: {Path(path).name} already exists in {Path(path).parent}; "
                       "choose another file name, or pick this one again in the export dialog and confirm replacing it")
        except (ValueError, OSError) as e:
            show_error(f"napari-diffrecon: export failed: {e}")
        return None

    def _layer_provenance(self, layer: Any) -> dict[str, Any]:
        meta = layer.metadata or {}
        prov = meta.get("provenance")
        if isinstance(prov, dict) and prov:
            return prov
        return {"software": "napari-diffrecon", "layer": layer.name, "source": str(meta.get("source"))}

    def _export_dialog(self) -> None:
        layer = self.viewer.layers.selection.active
        from napari.layers import Image

        if not isinstance(layer, Image):
            show_warning("napari-diffrecon: select an image layer to export")
            return
        path, _ = QFileDialog.getSaveFileName(  # the dialog asks before replacing a file
            self, "Export layer", f"{_file_stem(layer.name)}.nii.gz",
            "NIfTI (*.nii.gz *.nii);;DICOM secondary capture (*.dcm);;TIFF (*.tif *.tiff)",
        )
        if path:
            out = self.export_layer(layer, path, overwrite=True)
            if out is not None:
                show_info(f"napari-diffrecon: wrote {out}")

    def _closing(self) -> None:
        """Stop a run in flight (a classical one too: nothing is shown after the dock closes) and remember the
        settings."""
        if self.worker is not None:
            self.worker.quit()
        self.volume.stop()
        self.tuning.stop()  # a search in flight too: it reported to a dock that is gone
        if self.remember:
            _presets.save_last(self.current_settings(), self._last_state())

    def closeEvent(self, event: Any) -> None:  # noqa: N802 - Qt API
        """The dock's window closes (the viewer quits): see :meth:`_closing`."""
        self._closing()
        super().closeEvent(event)

    def event(self, event: Any) -> bool:
        """The dock's close button (napari's ``remove_dock_widget``) only takes the widget out of its dock — no
        ``closeEvent`` comes — so losing the dock it was in counts as closing: a run in flight stops there."""
        if event.type() == QEvent.Type.ParentChange:
            if self.parent() is not None:
                self._docked = True
            elif getattr(self, "_docked", False):
                self._docked = False
                self._closing()
        return super().event(event)


class WorkbenchWidget(DiffReconWidget):
    """The npe2 widget contribution: napari builds it with its viewer."""

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__(napari_viewer)
