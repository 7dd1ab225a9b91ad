"""Streaming a volume reconstruction into napari (GUI only; the math is in :mod:`napari_diffrecon.volume`).

The "Volume (3D)" group of the workbench. Its input is a 3D image layer, which the core turns into a
slice-wise CT/MRI/PET study (:func:`napari_diffrecon.volume.simulate_study`), or a volume study file
(:func:`napari_diffrecon.volume.read_volume_study`). "Run volume" starts :func:`volume_stream` in a napari
thread worker. That generator (no Qt) drives :func:`napari_diffrecon.volume.stream_volume` and yields
throttled CPU copies of the whole-volume estimate; the GUI assigns each to one 3D layer, so the volume fills
in as slabs and steps complete.

- **The slider is followed.** The slice on screen is written to ``params.extra["focus_slice"]``; the core
  reads it before each slab, so the slab holding that slice runs next.
- **Live z-TV.** The z-TV weight box writes ``params.ztv``, which the sampler reads every step. Its lowest
  setting, "auto", is the modality's tuned weight (:data:`napari_diffrecon.volume.ZTV_DEFAULTS`, as on the CLI).
- **Stop** sets a cancel event that the core checks between denoiser chunks (and ends the worker). The layer
  keeps what was computed (finished slabs and the running slab's current estimate), and its provenance says
  ``status: stopped``.
- **The user's layers are never touched.** The panel only adds and updates its own layers.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from napari.utils.notifications import show_error, show_info
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QGroupBox,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
)

from ._perf import new_worker, run_progress

#: The z-TV box's lowest value, shown as "auto": the modality's tuned weight (``volume.ZTV_DEFAULTS``).
ZTV_AUTO = -0.005

__all__ = ["VolumePanel", "VolumeStreamUpdate", "volume_stream", "VOLUME_LAYER_NAMES"]

VOLUME_LAYER_NAMES = {"estimate": "volume x̂0 (estimate)", "std": "volume posterior std"}
MODALITIES = {"ct": "CT (parallel beam per slice)", "mri": "MRI (2D multi-slice)", "pet": "PET (per slice)"}
STUDY_ITEM = "study"


@dataclass
class VolumeStreamUpdate:
    """One message from the volume worker to the GUI (arrays are CPU numpy copies; magnitude for complex).

    Attributes
    ----------
    kind : str
        ``"study"`` (the study is ready: ``info``), ``"estimate"`` (a streamed estimate), ``"tick"``
        (progress only, no arrays), ``"final"`` (the finished volume with ``std``, ``residual`` and
        ``provenance``) or ``"stopped"`` (cancelled: the estimate so far, with provenance).
    estimate : np.ndarray or None
        ``(D, H, W)`` float32: finished slabs plus the running slab's current estimate.
    done : np.ndarray or None
        ``(D,)`` bool: slices whose final value is in ``estimate``.
    core : tuple of int
        Slices ``core[0]:core[1]`` are those the running slab keeps.
    step, n_steps : int
        Progress within the running slab.
    n_slices : int
        Slices in the volume.
    elapsed : float
        Seconds since the worker started.
    """

    kind: str
    estimate: np.ndarray | None = None
    done: np.ndarray | None = None
    core: tuple[int, int] = (0, 0)
    step: int = 0
    n_steps: int = 0
    n_slices: int = 0
    elapsed: float = 0.0
    std: np.ndarray | None = None
    residual: float | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        """Share of the volume reconstructed (finished slices plus the running slab's progress)."""
        if self.done is None or not self.n_slices:
            return 0.0
        a, b = self.core
        running = 0 if bool(self.done[a:b].all()) else (b - a) * self.step / max(self.n_steps, 1)
        return float(min((int(self.done.sum()) + running) / self.n_slices, 1.0))


def _mag(a: np.ndarray) -> np.ndarray:
    return (np.abs(a) if np.iscomplexobj(a) else np.asarray(a)).astype(np.float32, copy=True)


def study_info(study: Any) -> dict[str, Any]:
    """What the panel shows of a study: name, modality, shape, spacing and a display window."""
    op_shape = tuple(study.operator.get("image_shape") or ())
    info = {
        "name": study.name,
        "modality": study.modality,
        "shape": (study.n_slices, *op_shape),
        "spacing_mm": None if study.spacing_mm is None else tuple(float(v) for v in study.spacing_mm),
        "window": None,
        "intensity": (study.metadata or {}).get("intensity"),  # a CT study from a volume in HU: shown in HU
    }
    if study.ground_truth is not None:
        from ..io.export import native_units
        from ._main import _limits

        info["window"] = _limits(native_units(_mag(study.ground_truth), "volume_estimate", info["intensity"])[0])
    return info


def volume_stream(
    make_study: Callable[[], Any],
    prior: Any,
    params: Any,
    cancel: threading.Event,
    *,
    max_rate: float = 5.0,
    **stream_kw: Any,
) -> Iterator[VolumeStreamUpdate]:
    """Worker generator of a volume run: builds the study, streams it, yields :class:`VolumeStreamUpdate` s.

    Parameters
    ----------
    make_study : callable
        Returns the :class:`~napari_diffrecon.volume.VolumeStudy` (simulated or read in the worker, so
        the GUI never waits on it).
    prior : Prior or str
        The 2D prior, or a shipped prior's name / a card path to load in the worker.
    params : VolumeParams
        Live parameters (the GUI writes ``ztv`` and ``extra["focus_slice"]``).
    cancel : threading.Event
        Set by Stop; the core raises between denoiser chunks and this generator yields ``"stopped"``
        (its last message) and returns.
    max_rate : float
        Most estimate updates per second (slab completions are always sent; progress-only ticks in
        between).
    **stream_kw
        Keyword arguments of :func:`~napari_diffrecon.volume.stream_volume` (``memory_budget``,
        ``slab_slices``, ``n_samples``, ``seed``, ``device`` ...).
    """
    from ..volume import VolumeCancelled, stream_volume
    from ..volume.run import volume_provenance

    t0 = time.perf_counter()
    study = make_study()
    yield VolumeStreamUpdate("study", n_slices=study.n_slices, info=study_info(study))
    if cancel.is_set():
        yield VolumeStreamUpdate("stopped", None, np.zeros(study.n_slices, bool), n_slices=study.n_slices,
                                 provenance={"status": "stopped", "study": study.name, "slices_finished": []})
        return
    if isinstance(prior, (str, Path)):
        from ..priors import load_prior

        prior = load_prior(prior)
    box: dict[str, Any] = {}
    last = None
    n_done, t_sent = -1, -1e9
    try:
        for upd in stream_volume(study, prior, params, cancel=cancel, out=box, **stream_kw):
            last = upd
            now = time.perf_counter()
            core = (upd.slab.core_start, upd.slab.core_stop)
            k = int(upd.done.sum())
            if k != n_done or now - t_sent >= 1.0 / max_rate:  # a finished slab is always shown
                n_done, t_sent = k, now
                yield VolumeStreamUpdate("estimate", _mag(upd.estimate), upd.done.copy(), core, upd.step,
                                         upd.n_steps, study.n_slices, now - t0)
            else:
                yield VolumeStreamUpdate("tick", None, None, core, upd.step, upd.n_steps, study.n_slices, now - t0)
    except VolumeCancelled:
        est = None if last is None else _mag(last.estimate)
        done = np.zeros(study.n_slices, bool) if last is None else last.done.copy()
        prov = volume_provenance(study, params, {
            "kind": "diffusion-volume", "sampler": "mbir", "status": "stopped",
            "prior": getattr(getattr(prior, "card", None), "name", type(prior).__name__),
            "slices_finished": [int(i) for i in np.flatnonzero(done)],
            "stopped_in_slab": None if last is None else last.slab.to_dict(),
            "stopped_at_step": 0 if last is None else last.step, "frontend": "napari widget", **stream_kw,
        })
        yield VolumeStreamUpdate("stopped", est, done, (0, 0), 0 if last is None else last.step,
                                 0 if last is None else last.n_steps, study.n_slices, time.perf_counter() - t0,
                                 provenance=prov)
        return
    res = box["result"]
    res.provenance["frontend"] = "napari widget"
    yield VolumeStreamUpdate(
        "final", _mag(res.reconstruction), np.ones(study.n_slices, bool), (0, study.n_slices),
        last.n_steps if last is not None else 0, last.n_steps if last is not None else 0, study.n_slices,
        time.perf_counter() - t0, std=res.std.astype(np.float32, copy=True), residual=res.residual,
        provenance=res.provenance,
    )


def _spin(lo: float, hi: float, value: float, step: float = 1.0, decimals: int = 0) -> QSpinBox | QDoubleSpinBox:
    box: QSpinBox | QDoubleSpinBox
    if decimals == 0:
        box = QSpinBox()
        box.setRange(int(lo), int(hi))
        box.setSingleStep(int(step))
        box.setValue(int(value))
    else:
        box = QDoubleSpinBox()
        box.setDecimals(decimals)
        box.setRange(lo, hi)
        box.setSingleStep(step)
        box.setValue(value)
    return box


class VolumePanel(QGroupBox):
    """The "Volume (3D)" group of the workbench: stream a slice-wise volume reconstruction into one layer.

    Parameters
    ----------
    owner : DiffReconWidget
        The workbench (its viewer, its prior, its run state).
    """

    def __init__(self, owner: Any) -> None:
        super().__init__("Volume (3D)")
        from ._main import _row

        self.owner = owner
        self.viewer = owner.viewer
        self.worker: Any = None
        self.layers: dict[str, Any] = {}
        self.study_path: str | None = None
        self.last_provenance: dict[str, Any] | None = None
        self.estimate_updates = 0
        self.params: Any = None
        self.stopped = False
        self._live_log: list[dict[str, Any]] = []
        self._last_step, self._last_core, self._t_run = 0, (0, 0), 0.0
        self.max_rate = 5.0
        self._cancel = threading.Event()
        self._pbar: Any = None
        self._pbar_t = 0.0
        self._info: dict[str, Any] = {}
        self._ended = False
        lay = QVBoxLayout(self)

        self.source = QComboBox()
        self.source.setToolTip("a 3D image layer (simulated into a study of the chosen modality) or a study file")
        self.open_btn = QPushButton("Open study…")
        self.open_btn.setToolTip("a volume study (.npz) written by napari_diffrecon.volume.write_volume_study")
        self.open_btn.clicked.connect(self._open_dialog)
        lay.addWidget(_row("input", self.source))
        lay.addWidget(_row("", self.open_btn))
        self.modality = QComboBox()
        for key, text in MODALITIES.items():
            self.modality.addItem(text, key)
        self.modality.currentIndexChanged.connect(self._on_modality)
        self.views = _spin(4, 720, 30)
        self.accel = _spin(1.0, 16.0, 4.0, 0.5, 1)
        self.noise = _spin(0.0, 50.0, 1.0, 0.5, 2)
        self.noise.setToolTip("CT/MRI: Gaussian σ in % of the data RMS")
        self.counts = _spin(1e3, 1e9, 2e5, 1e4)  # simulate_pet_study's default
        self._sim_rows = {
            "views": _row("views", self.views, tooltip="CT/PET views over 180°"),
            "accel": _row("acceleration", self.accel, tooltip="MRI: undersampling of every slice's mask"),
            "noise": _row("noise %", self.noise),
            "counts": _row("counts / slice", self.counts,
                           tooltip="PET: expected true counts per slice (Poisson; fewer = noisier)"),
        }
        lay.addWidget(_row("simulate as", self.modality))
        for r in self._sim_rows.values():
            lay.addWidget(r)
        self.steps = _spin(1, 2000, 30)
        from ..volume import ZTV_DEFAULTS, VolumeParams

        # lowest value = "auto": the modality's tuned weight (known for a study file only once it is read)
        self.ztv = _spin(ZTV_AUTO, 10.0, ZTV_AUTO, 0.005, 3)
        self.ztv.setSpecialValueText("auto")
        self.ztv.setToolTip("weight of the TV penalty along z (0 = slice by slice; auto = the modality's tuned "
                            f"weight, {', '.join(f'{k.upper()} {v:g}' for k, v in ZTV_DEFAULTS.items())}); "
                            "acts on the run in flight")
        self._auto_ztv = VolumeParams.ztv
        self.ztv.valueChanged.connect(self._on_ztv)
        self.samples = _spin(1, 16, 1)
        self.budget = QLineEdit("")
        self.budget.setPlaceholderText("auto (70% of free memory)")
        self.budget.setToolTip("memory budget, e.g. 4GB; a volume that does not fit runs in overlapping slabs")
        self.slab = _spin(0, 10_000, 0)
        self.slab.setSpecialValueText("auto")
        self.slab.setToolTip("slices per slab (auto: the whole volume when it fits the budget, else the largest "
                             "slab that fits)")
        lay.addWidget(_row("steps", self.steps))
        lay.addWidget(_row("z-TV λ", self.ztv))
        lay.addWidget(_row("samples", self.samples))
        lay.addWidget(_row("memory", self.budget))
        lay.addWidget(_row("slab slices", self.slab))
        self.run_btn = QPushButton("Run volume")
        self.run_btn.clicked.connect(self.run)
        self.stop_btn = QPushButton("Stop volume")
        self.stop_btn.setEnabled(False)
        self.stop_btn.clicked.connect(self.stop)
        lay.addWidget(_row("", self.run_btn, self.stop_btn))
        self.status = QLabel("")
        self.status.setWordWrap(True)
        lay.addWidget(self.status)
        self.viewer.layers.events.inserted.connect(self.refresh_sources)
        self.viewer.layers.events.removed.connect(self._on_layer_removed)
        self.viewer.dims.events.current_step.connect(self._on_slider)
        self.refresh_sources()
        self._on_modality()

    # ------------------------------------------------------------------ input
    def _volume_layers(self) -> list[Any]:
        from napari.layers import Image

        def ours(ly: Any) -> bool:  # results of this panel (its layers are listed before they are stored)
            return str((ly.metadata or {}).get("diffrecon_role", "")).startswith("volume_")

        return [ly for ly in self.viewer.layers if isinstance(ly, Image) and ly.ndim == 3 and not ly.rgb
                and not ours(ly)]

    def refresh_sources(self, *_: Any) -> None:
        """List the 3D image layers (and the opened study file) as inputs; keep the current choice."""
        keep = self.source.currentText()
        self.source.blockSignals(True)
        self.source.clear()
        if self.study_path:
            self.source.addItem(f"study: {Path(self.study_path).name}", STUDY_ITEM)
        for ly in self._volume_layers():
            self.source.addItem(f"layer: {ly.name}", ly.name)
        i = self.source.findText(keep)
        if i >= 0:
            self.source.setCurrentIndex(i)
        self.source.blockSignals(False)
        self._on_modality()

    def _on_layer_removed(self, event: Any) -> None:
        for role, layer in list(self.layers.items()):
            if layer is event.value:
                del self.layers[role]
        self.refresh_sources()

    def _on_modality(self, *_: Any) -> None:
        mod = self.modality.currentData()
        from_layer = self.source.currentData() not in (None, STUDY_ITEM)
        self.modality.setEnabled(from_layer)
        self._sim_rows["views"].setVisible(from_layer and mod in ("ct", "pet"))
        self._sim_rows["accel"].setVisible(from_layer and mod == "mri")
        self._sim_rows["noise"].setVisible(from_layer and mod in ("ct", "mri"))
        self._sim_rows["counts"].setVisible(from_layer and mod == "pet")

    def open_study(self, path: str | Path) -> None:
        """Use a volume study file as the input (it is read and checked in the worker when Run is pressed)."""
        self.study_path = str(path)
        self.refresh_sources()
        self.source.setCurrentIndex(self.source.findData(STUDY_ITEM))

    def _open_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open volume study", "", "Volume studies (*.npz)")
        if path:
            self.open_study(path)

    def use_layer(self, name: str, modality: str | None = None) -> None:
        """Use the 3D image layer ``name`` as the input (simulated as ``modality`` when given)."""
        self.refresh_sources()
        i = self.source.findData(name)
        if i < 0:
            raise ValueError(f"no 3D image layer named {name!r}")
        self.source.setCurrentIndex(i)
        if modality is not None:
            self.modality.setCurrentIndex(self.modality.findData(modality))

    def _study_factory(self) -> tuple[Callable[[], Any], str, tuple[int, ...] | None] | None:
        """``(make_study, modality, shape)`` for the chosen input (shape None for a file, known once it is read);
        None (with a notification) when there is none."""
        from ..volume import read_volume_study, simulate_study

        key = self.source.currentData()
        if key is None:
            show_error("napari-diffrecon: no volume input; open a 3D image (File ▸ Open) or a volume study first")
            return None
        if key == STUDY_ITEM:
            assert self.study_path is not None
            try:
                import json

                with np.load(self.study_path, allow_pickle=False) as z:  # the modality only; all else in the worker
                    modality = str(json.loads(str(z["operator"])).get("modality", "")).lower()
            except (OSError, ValueError, KeyError) as e:
                show_error(f"napari-diffrecon: cannot read {self.study_path}: {e}")
                return None
            return partial(read_volume_study, self.study_path), modality, None
        layer = next(ly for ly in self._volume_layers() if ly.name == key)
        modality = self.modality.currentData()
        scale = tuple(float(s) for s in layer.scale)
        noise = float(self.noise.value()) / 100.0
        opts: dict[str, Any] = {"spacing_mm": scale, "study_id": layer.name}
        if modality == "ct":
            opts.update(n_views=int(self.views.value()), noise_fraction=noise)
            if str((layer.metadata or {}).get("units", "")).upper() == "HU":  # even a volume with no air in it
                opts["units"] = "HU"
        elif modality == "mri":
            opts.update(acceleration=float(self.accel.value()), noise_fraction=noise)
        else:
            opts.update(n_views=int(self.views.value()), counts_per_slice=float(self.counts.value()))
        data = np.asarray(layer.data)
        self._info = {"spacing_mm": scale, "window": tuple(float(v) for v in layer.contrast_limits)}
        return partial(simulate_study, data, modality, **opts), modality, data.shape

    def _prior_for(self, modality: str) -> Any:
        """The workbench's prior when it fits ``modality``, else the shipped default's name; None if none."""
        from ..priors import default_prior_for

        card = getattr(self.owner.prior, "card", None)
        channels = 2 if modality == "mri" else 1
        if card is not None and card.modality in (modality, "generic") and card.channels == channels:
            return self.owner.prior
        return default_prior_for(modality, modality == "mri")

    # ------------------------------------------------------------------ run / stop
    @property
    def running(self) -> bool:
        """True while a volume run is in flight."""
        return self.worker is not None

    def run(self) -> Any:
        """Start the volume run in a napari thread worker; returns it (None when refused with a notification)."""
        o = self.owner
        if o.busy:
            from ._main import _busy_text

            show_info(f"napari-diffrecon: {_busy_text(o)}")
            return None
        self._info = {}
        made = self._study_factory()
        if made is None:
            return None
        make_study, modality, shape = made
        prior = self._prior_for(modality)
        if prior is None:
            show_error(f"napari-diffrecon: no {modality.upper()} prior is installed or loaded; load one in the "
                       "Prior group (Load file…)")
            return None

        from ..volume import recommended_volume_params

        # the same defaults as the CLI: the modality's tuned 2D DDS step, coupled by z-TV
        self.params = recommended_volume_params(modality, n_steps=int(self.steps.value()))
        self._auto_ztv = self.params.ztv  # what "auto" means for this run
        self._live_log = []  # z-TV changes while the run is in flight, for its provenance
        self._last_step, self._last_core, self._t_run = 0, (0, 0), time.perf_counter()
        self._on_ztv(self.ztv.value())  # the box's weight, unless "auto"
        self._on_slider()
        device = o.device_combo.currentText()
        kw: dict[str, Any] = {"n_samples": int(self.samples.value()), "seed": int(o.seed.value()), "device": device,
                              "slab_slices": int(self.slab.value()) or "auto",
                              # one slice per network call on the CPU: Stop acts within one slice, not one step
                              "max_chunk_slices": 1 if device == "cpu" else None}
        if self.budget.text().strip():
            kw["memory_budget"] = self.budget.text().strip()
        self._cancel = threading.Event()
        self.stopped = False
        self._ended = False
        self.estimate_updates = 0
        self._pbar_t = 0.0
        if shape is not None:
            self._prepare_layer(tuple(shape))
        worker = new_worker(volume_stream, make_study, prior, self.params, self._cancel, max_rate=self.max_rate, **kw)
        worker.yielded.connect(self._on_update)
        worker.errored.connect(self._on_error)
        worker.finished.connect(self._on_finished)
        self.worker = worker
        self._pbar = run_progress(self, 100, "diffrecon volume")
        self.run_btn.setEnabled(False)
        self.stop_btn.setEnabled(True)
        o.run_btn.setEnabled(False)
        o.tuning.tune_btn.setEnabled(False)  # a search would share the prior (its precision, its device)
        self.status.setText(f"preparing the {modality.upper()} volume…")
        worker.start()
        return worker

    def stop(self) -> None:
        """Cancel the run (within one denoiser chunk); the layer keeps what was computed.

        Only the cancel event is set (no ``worker.quit()``): the core raises at its next check and the
        worker's last message is the ``"stopped"`` update with the estimate so far and its provenance.
        """
        if self.worker is not None:
            self._cancel.set()
            self.status.setText("stopping…")

    def _on_ztv(self, value: float) -> None:
        if ZTV_AUTO < value < 0:  # a typed negative weight means "auto": show it as such
            self.ztv.setValue(ZTV_AUTO)
            return
        if self.params is not None:
            ztv = self._auto_ztv if value < 0 else float(value)
            if self.running and ztv != self.params.ztv:  # acts on the run in flight: its provenance says when
                self._live_log.append({"after_step": self._last_step, "slab": list(self._last_core), "ztv": ztv,
                                       "t": round(time.perf_counter() - self._t_run, 3)})
            self.params.ztv = ztv

    def focus_slice(self) -> int | None:
        """The volume slice under the viewer's slider (in the estimate's or the input layer's voxels)."""
        layer = self.layers.get("estimate")
        if layer is None or layer not in self.viewer.layers:
            key = self.source.currentData()
            layer = next((ly for ly in self._volume_layers() if ly.name == key), None)
        if layer is None:
            return None
        z = float(layer.world_to_data(self.viewer.dims.point)[0])
        return int(np.clip(round(z), 0, layer.data.shape[0] - 1))

    def _on_slider(self, *_: Any) -> None:
        if self.params is None:
            return
        k = self.focus_slice()
        if k is not None:
            self.params.extra["focus_slice"] = k  # read by the core before each slab

    # ------------------------------------------------------------------ worker slots (main thread)
    def _on_update(self, upd: VolumeStreamUpdate) -> None:
        if upd.kind == "study":
            window = self._info.get("window") if self.source.currentData() != STUDY_ITEM else None
            self._info = {**upd.info, "window": upd.info.get("window") or window}
            sp = upd.info["spacing_mm"]
            self.status.setText(f"{upd.info['name']}: {upd.info['modality'].upper()} "
                                f"{'×'.join(map(str, upd.info['shape']))}"
                                + (f", spacing {sp[0]:g}×{sp[1]:g}×{sp[2]:g} mm" if sp else ""))
            self._prepare_layer(tuple(upd.info["shape"]))
            return
        if self._ended and upd.kind != "stopped":  # queued behind Stop: the run is over
            return
        self._last_step, self._last_core = upd.step, upd.core
        if upd.kind in ("final", "stopped") and upd.provenance is not None:
            upd.provenance["live_parameter_changes"] = list(self._live_log)  # [] when nothing changed
        running = {"status": "running", "frontend": "napari widget"}
        if upd.estimate is not None:
            prov = upd.provenance if upd.kind in ("final", "stopped") else running
            self._show("estimate", upd.estimate, prov)
            self.estimate_updates += 1
        if upd.kind == "final":
            self._ended = True
            if upd.std is not None and int(self.samples.value()) > 1:
                self._show("std", upd.std, upd.provenance)
            self.last_provenance = upd.provenance
            self.status.setText(f"done: {upd.n_slices} slices, {upd.elapsed:.1f} s, data residual "
                                f"{upd.residual:.4f}")
        elif upd.kind == "stopped":
            self._ended = True
            self.stopped = True
            self.last_provenance = upd.provenance
            layer = self.layers.get("estimate")
            if upd.estimate is None and layer is not None and layer in self.viewer.layers:
                layer.metadata = {**layer.metadata, "provenance": upd.provenance}
            n = int(upd.done.sum()) if upd.done is not None else 0
            self.status.setText(f"stopped: {n}/{upd.n_slices} slices finished; the layer keeps what was computed")
        self._progress(upd)

    def _prepare_layer(self, shape: tuple[int, ...]) -> None:
        """Create the (empty) estimate layer unless one of this shape exists: it fills in as the run streams.

        Building a new 3D layer is napari's slowest GUI step (≈ 1.4 s with software OpenGL), so it is done
        before the worker starts when the shape is known (layer input), else when the study is ready.
        """
        layer = self.layers.get("estimate")
        if layer is None or layer not in self.viewer.layers or layer.data.shape != shape:
            self._show("estimate", np.zeros(shape, np.float32), {"status": "running", "frontend": "napari widget"})

    def _progress(self, upd: VolumeStreamUpdate) -> None:
        pbar = self._pbar  # the bar processes Qt events: the run may end (and close it) meanwhile
        now = time.perf_counter()
        if pbar is None or upd.kind == "stopped" or (now - self._pbar_t < 1.0 and upd.kind != "final"):
            return
        self._pbar_t = now
        pct = int(round(100 * upd.fraction))
        n_done = int(upd.done.sum()) if upd.done is not None else 0
        text = (f"slices {upd.core[0]}–{upd.core[1] - 1}: step {upd.step}/{upd.n_steps} · "
                f"{n_done}/{upd.n_slices} slices done · {upd.elapsed:.0f} s")
        if upd.kind != "final":
            self.status.setText(text)
        if pct > pbar.n:
            pbar.update(pct - pbar.n)
        if self._pbar is pbar:
            pbar.set_description(f"diffrecon volume: {text}")

    def _show(self, role: str, data: np.ndarray, provenance: dict[str, Any]) -> None:
        """Assign a fresh array to the role's 3D layer (created the first time, with the study's spacing); a CT study
        made from a volume in HU is shown in HU, as its source layer is (``metadata["intensity"]``)."""
        from ..io.export import native_units

        inten = self._info.get("intensity")
        data, units = native_units(data, f"volume_{role}", inten)  # io.export's IMAGE_ROLES / SPREAD_ROLES
        meta: dict[str, Any] = {"provenance": provenance, "diffrecon_role": f"volume_{role}"}
        if units is not None:
            meta.update(units=units, intensity=inten)
        layer = self.layers.get(role)
        if layer is not None and (layer not in self.viewer.layers or layer.data.shape != data.shape):
            layer = None
        if layer is None:
            from ._main import _limits

            kw: dict[str, Any] = {"name": VOLUME_LAYER_NAMES[role], "metadata": meta}
            if self._info.get("spacing_mm"):
                kw["scale"] = self._info["spacing_mm"]
            if role == "std":
                kw.update(colormap="magma", contrast_limits=(0.0, max(_limits(data, 0, 99.5)[1], 1e-12)))
            else:
                kw.update(colormap="gray", contrast_limits=self._info.get("window") or _limits(data))
            self.layers[role] = self.viewer.add_image(data, **kw)
            return
        layer.data = data  # a fresh array: napari redraws the slice on screen
        if layer.metadata.get("provenance") is not provenance:
            layer.metadata = meta

    def _on_error(self, exc: Exception) -> None:
        self._ended = True
        show_error(f"napari-diffrecon: the volume run failed: {exc}")
        self.status.setText(f"failed: {exc}")

    def _on_finished(self) -> None:
        self._ended = True
        pbar, self._pbar = self._pbar, None  # cleared first: close() may process events and re-enter
        if pbar is not None:
            pbar.close()
        self.worker = None
        self.run_btn.setEnabled(True)
        self.stop_btn.setEnabled(False)
        idle = not self.owner.busy
        self.owner.run_btn.setEnabled(idle)
        self.owner.tuning.tune_btn.setEnabled(idle)
