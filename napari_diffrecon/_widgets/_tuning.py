"""Auto-tune and support-map controls of the workbench (GUI only; the math is in ``tuning`` and ``support``).

"Auto-tune" runs :func:`napari_diffrecon.tuning.auto_tune` in a napari thread worker with a progress bar, shows the
score curve as text, and sets the sampler's parameter boxes to the chosen values; the choice and the curve go into the
provenance of the next run's layers. "Support map" combines the last run's posterior std, back-projected data residual
and difference from the classical baseline (:func:`napari_diffrecon.support.support_maps`) into a layer, with a
threshold overlay (a labels layer) that follows the threshold box.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
from napari.utils.notifications import show_error, show_info
from qtpy.QtGui import QFont
from qtpy.QtWidgets import QComboBox, QDoubleSpinBox, QGroupBox, QLabel, QPushButton, QVBoxLayout

from ..tuning import BALANCE_PARAM, TuneCancelledError, TuneResult, auto_tune
from ._perf import new_worker, original_error, run_progress
from ._runner import baseline_for

__all__ = ["TuningPanel", "tune_stream", "SUPPORT_NAME", "FLAG_NAME"]

SUPPORT_NAME = "support score (high = unsupported)"
FLAG_NAME = "unsupported (score > threshold)"
CRITERIA = {
    "auto": "auto (discrepancy for Gaussian noise of known σ, else splitting)",
    "split": "measurement splitting (any noise)",
    "discrepancy": "discrepancy principle (Gaussian noise)",
    "sure": "SURE (Gaussian noise, 2× runs)",
}


def tune_stream(measurement: Any, settings: Any, prior: Any, params: Any, criterion: str,
                cancel: threading.Event) -> Iterator[tuple[float, int, str]]:
    """Worker generator: runs the search in a helper thread, yields ``(done, total, message)``, returns the result."""
    q: queue.Queue = queue.Queue()
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["result"] = auto_tune(measurement, settings, prior=prior, params=params, criterion=criterion,
                                      progress=lambda d, t, msg: q.put((d, t, msg)), cancel=cancel)
        except BaseException as e:  # noqa: BLE001 - re-raised in the worker
            box["error"] = e

    th = threading.Thread(target=work, daemon=True)
    th.start()
    last = 0.0
    try:
        while th.is_alive() or not q.empty():
            try:
                item = q.get(timeout=0.1)
            except queue.Empty:
                yield (-1.0, 0, "")  # a tick: lets Stop act
                continue
            if time.perf_counter() - last >= 0.5 or item[0] >= item[1]:
                last = time.perf_counter()
                yield item
    finally:
        if th.is_alive():  # the worker was quit from outside (napari closing): stop the runs too
            cancel.set()
    if "error" in box:
        raise box["error"]
    return box["result"]


class TuningPanel(QGroupBox):
    """The "Self-tuning and support" group of the workbench."""

    def __init__(self, owner: Any) -> None:
        super().__init__("Self-tuning and support")
        self.owner = owner
        self.worker: Any = None
        self.result: TuneResult | None = None
        self.record: dict[str, Any] | None = None
        self.maps: Any = None
        self._pbar: Any = None
        self._cancel = threading.Event()
        self._measurement: Any = None  # the data the last search ran on
        lay = QVBoxLayout(self)
        self.criterion = QComboBox()
        for key, text in CRITERIA.items():
            self.criterion.addItem(text, key)
        self.tune_btn = QPushButton("Auto-tune")
        self.tune_btn.setToolTip("search the prior/likelihood balance (DDS γ, DPS ζ, Song λ) from the data alone")
        self.tune_btn.clicked.connect(self.start)
        self.stop_btn = QPushButton("Stop tuning")
        self.stop_btn.setEnabled(False)
        self.stop_btn.clicked.connect(self.stop)
        from ._main import _row

        lay.addWidget(_row("score", self.criterion))
        lay.addWidget(_row("", self.tune_btn, self.stop_btn))
        self.curve = QLabel("")
        self.curve.setFont(QFont("monospace"))
        self.curve.setWordWrap(False)
        lay.addWidget(self.curve)
        self.support_btn = QPushButton("Support map")
        self.support_btn.setToolTip("where the last run is not supported by the measurements (std, residual, "
                                    "difference from the classical baseline)")
        self.support_btn.clicked.connect(self.show_support)
        self.threshold = QDoubleSpinBox()
        self.threshold.setRange(0.0, 1000.0)
        self.threshold.setDecimals(2)
        self.threshold.setSingleStep(0.25)
        self.threshold.setValue(3.0)
        self.threshold.setToolTip("flag voxels whose score exceeds this many times the typical value (1 = typical)")
        self.threshold.valueChanged.connect(self._on_threshold)
        lay.addWidget(_row("", self.support_btn, QLabel("threshold"), self.threshold))

    # ------------------------------------------------------------------ auto-tune
    @property
    def running(self) -> bool:
        """True while a search is in flight."""
        return self.worker is not None

    def tuned_param(self, method: str) -> str:
        """The parameter searched for ``method``."""
        return BALANCE_PARAM.get(method, "gamma")

    def start(self, values: list[float] | None = None) -> Any:
        """Start the search in a thread worker (returns it, or None when refused with a notification)."""
        o = self.owner
        if o.busy:  # a 2D or volume run would share the prior
            show_info("napari-diffrecon: a run or search is in progress")
            return None
        if o.measurement is None:
            show_error("napari-diffrecon: no measurement; load a sample, open a file or use a layer first")
            return None
        settings = o.current_settings()
        if settings.method not in BALANCE_PARAM:
            show_error(f"napari-diffrecon: auto-tune works for {', '.join(BALANCE_PARAM)}; pick one of them")
            return None
        found = o.run_prior()  # the picked prior, else the data's default (not pinned); None: refused, with a notice
        if found is None:
            return None
        prior, settings.prior = found
        settings.n_samples = 1
        key = self.tuned_param(settings.method)
        params = {key: values} if values else key
        criterion = self.criterion.currentData() or "auto"
        self._cancel = threading.Event()
        self._measurement = o.measurement  # the data searched: a result for other data is not applied
        worker = new_worker(tune_stream, o.measurement, settings, prior, params, criterion, self._cancel)
        worker.yielded.connect(self._on_progress)
        worker.returned.connect(self._on_returned)
        worker.errored.connect(self._on_error)
        worker.finished.connect(self._on_finished)
        self.worker = worker
        self._pbar = run_progress(o, 100, "diffrecon auto-tune")
        self.tune_btn.setEnabled(False)
        self.stop_btn.setEnabled(True)
        o.run_btn.setEnabled(False)
        o.status.setText(f"auto-tuning {key} ({criterion})…")
        worker.start()
        return worker

    def stop(self) -> None:
        """Cancel the search: the runs stop at their next step, and the worker ends once they have.

        The worker is not quit: it ends when the search does (with :class:`TuneCancelledError`), so Run and Auto-tune
        come back only when no run of the search still uses the prior.
        """
        if self._cancel is not None:
            self._cancel.set()
        if self.worker is not None:
            self.owner.status.setText("stopping the auto-tune…")

    def _on_progress(self, item: tuple[float, int, str]) -> None:
        done, total, msg = item
        pbar = self._pbar  # napari's progress bar processes Qt events: the search may finish (and close it) meanwhile
        if total <= 0 or pbar is None:
            return
        n = int(round(100 * min(done / total, 1.0)))
        if n > pbar.n:
            pbar.update(n - pbar.n)
        if self._pbar is pbar:
            pbar.set_description(f"diffrecon auto-tune: {msg}")

    def _on_returned(self, result: TuneResult) -> None:
        o = self.owner
        if o.measurement is not self._measurement:  # other data were loaded during the search: it is not theirs
            self.result, self.record = None, None
            o.status.setText("auto-tune finished for the data loaded before; its values were not applied (run it "
                             "again for these data)")
            return
        self.result = result
        self.record = result.to_dict()
        for k, v in result.best.items():
            spin = o.spins.get(k)
            if spin is not None:
                spin.setValue(spin.maximum() if isinstance(v, float) and not math.isfinite(v) else v)
        self.curve.setText(result.curve_text())
        best = ", ".join(f"{k} = {v:g}" for k, v in result.best.items())
        o.status.setText(f"auto-tune ({result.criterion}): {best} in {result.wall_time_s:.1f} s; press Run")

    def _on_error(self, exc: Exception) -> None:
        exc = original_error(exc)
        if isinstance(exc, TuneCancelledError):
            self.owner.status.setText("auto-tune stopped")
            return
        show_error(f"napari-diffrecon: auto-tune failed: {exc}")
        self.owner.status.setText(f"auto-tune failed: {exc}")

    def _on_finished(self) -> None:
        stopping = self.owner.status.text().startswith(("auto-tuning", "stopping the auto-tune"))
        if self._cancel is not None and self._cancel.is_set() and stopping:
            self.owner.status.setText("auto-tune stopped")  # a cancelled search can end without an error
        pbar, self._pbar = self._pbar, None  # cleared first: close() may process events and re-enter
        if pbar is not None:
            pbar.close()
        self.worker = None
        idle = not self.owner.busy
        self.tune_btn.setEnabled(idle)
        self.stop_btn.setEnabled(False)
        self.owner.run_btn.setEnabled(idle)

    def provenance_for(self, settings: Any) -> dict[str, Any] | None:
        """The search record when ``settings`` still use the tuned values (else None)."""
        if self.record is None or settings is None or settings.method != self.record.get("method"):
            return None
        ran_on = self.owner._run_measurement or self.owner.measurement
        if ran_on is not self._measurement:  # a search on other data says nothing of this run
            return None
        if any(abs(float(getattr(settings.params, k)) - float(v)) > 1e-9 * max(1.0, abs(float(v)))
               for k, v in self.record["best"].items()):
            return None
        return self.record

    # ------------------------------------------------------------------ support map
    def compute_support(self) -> Any:
        """Support maps of the last run's layers (mean, std, baseline) against its measurement (never an earlier run's
        layers: after a classical run there is no posterior to map)."""
        from ..support import support_maps

        o = self.owner
        m = o._run_measurement or o.measurement
        mean = o.result_layer("mean") or o.result_layer("estimate")
        if m is None or mean is None:
            raise ValueError("run a diffusion reconstruction first (the support map needs its mean and std)")
        from ..io._napari import core_values

        x = core_values(mean.data, mean.metadata)  # the layers show CT in HU; the support map works in image units
        std = o.result_layer("std")
        base = o.result_layer("baseline")
        std_arr = core_values(std.data, std.metadata) if std is not None else None
        # The difference term wants a data-only classical image (FBP / MLEM / zero filling): a hot-started run's
        # baseline layer is its start image, which shares whatever the run inherited from it.
        cheap = baseline_for(str(m.operator.get("modality", "")))
        if base is not None and ((base.metadata.get("provenance") or {}).get("settings") or {}).get("method") == cheap:
            cl = core_values(base.data, base.metadata)
        else:
            from ..reconstruct import RunSettings, reconstruct

            cl = reconstruct(m, RunSettings(method=cheap)).reconstruction
        op = m.build_operator()
        residual_ok = not op.is_complex  # the layers hold magnitudes: no residual for complex (MRI) images
        return support_maps(
            x,
            op if residual_ok else None,
            m.to_tensor() if residual_ok else None,
            m.build_likelihood() if residual_ok else None,
            std=std_arr,
            classical=cl if cl is not None and cl.shape == x.shape else None,
            threshold=float(self.threshold.value()),
            std_pooled_px=float(getattr(o._run_settings, "std_pool", 0.0) or 0.0),
        )

    def show_support(self) -> Any:
        """Add (or refresh) the support-score layer and its threshold overlay."""
        o = self.owner
        try:
            maps = self.compute_support()
        except ValueError as e:
            show_error(f"napari-diffrecon: {e}")
            return None
        self.maps = maps
        prov = dict(o.last_provenance or {})
        prov["support_map"] = maps.summary()
        o._show("support", maps.score, name=SUPPORT_NAME, provenance=prov)
        layer = o.layers["support"]
        layer.colormap = "magma"
        layer.blending = "additive"  # glows where unsupported over the images below (an opaque map hid the anatomy)
        layer.opacity = 0.6  # at full strength the typical score's glow still washed the anatomy out
        layer.contrast_limits = (0.0, max(float(np.percentile(maps.score, 99.5)), maps.threshold * 2, 1e-12))
        self._show_flags(fresh=True)
        self._say_flagged()
        return maps

    def _say_flagged(self) -> None:
        maps = self.maps
        self.owner.status.setText(f"support map: {100 * maps.mask.mean():.1f}% of voxels above {maps.threshold:g}")

    def _show_flags(self, fresh: bool = False) -> None:
        """Show the threshold overlay of :attr:`maps`; ``fresh``: maps of the last run (the layer is named for it)."""
        o = self.owner
        maps = self.maps
        if maps is None:
            return
        flags = (maps.score > float(self.threshold.value())).astype(np.uint8)
        layer = o.layers.get("flags")
        if layer is not None and layer in o.viewer.layers:
            layer.data = flags
            if fresh:
                if layer.name == o._names.get("flags"):  # not while the user has renamed it
                    o._name("flags", layer, FLAG_NAME)
                o.track("flags", layer)
            return
        scale = o._scale(flags)
        kw = {"scale": scale} if scale is not None else {}
        o.track("flags", o.viewer.add_labels(flags, name=FLAG_NAME, opacity=0.45,
                                             metadata={"diffrecon_role": "flags"}, **kw))

    def _on_threshold(self, value: float) -> None:
        if self.maps is not None:
            self.maps.threshold = float(value)
            self.maps.mask = self.maps.score > float(value)
            self._show_flags()
            self._say_flagged()
