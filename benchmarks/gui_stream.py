"""Streaming overhead of the napari workbench: the same run driven through the widget vs headless.

Run under a (virtual) display, e.g.::

    xvfb-run -a python benchmarks/gui_stream.py --steps 50 --repeats 3
    xvfb-run -a python benchmarks/gui_stream.py --screenshot docs/workbench.png --prior /tmp/snap/ct-phantom-128.json

Both paths use the same measurement (the shipped CT sample), prior, settings and seed. "headless"
is :func:`napari_diffrecon.reconstruct.reconstruct`; "widget" is the dock widget's Run button in a
shown napari window (thread worker, the widget's ≤ 2 layer updates/s, progress bar), timed from Run to the
worker's ``finished`` signal. Runs alternate (headless, widget, headless, …) and the medians are
compared (and the best runs, less sensitive to other load on the machine); the CPU time of the run in the
worker thread (sampling + streaming conversions) against the headless run's CPU time, and the CPU
time of the GUI thread itself, are reported too: they do not depend on other load on the machine. The
widget's comparison baseline is switched off so both do the same work.
Without ``--prior`` the CT prior is the shipped one when installed, otherwise a tiny untrained
U-Net (the timing of the streaming machinery does not depend on the weights).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def _prior(path: str | None):
    from napari_diffrecon.priors import ModelCard, NetworkPrior, default_prior_for, load_prior
    from napari_diffrecon.priors.network import build_network
    from napari_diffrecon.priors.sources import normalisation_for

    if path:
        return load_prior(path), path
    name = default_prior_for("ct")
    if name:
        return load_prior(name), name
    torch.manual_seed(0)
    card = ModelCard(name="tiny-ct-untrained", modality="ct", channels=1, resolution=128,
                     architecture={"type": "diffusers.UNet2DModel", "preset": "tiny"},
                     normalisation=normalisation_for("ct", 1))
    return NetworkPrior(build_network({**card.architecture, "channels": 1}), card), None


def _wait(app, widget, timeout: float = 600.0) -> None:
    """Block in a Qt event loop (as napari does) until the widget's worker has finished."""
    from qtpy.QtCore import QEventLoop, QTimer

    if not widget.running:
        return
    loop = QEventLoop()
    widget.worker.finished.connect(loop.quit)
    QTimer.singleShot(int(timeout * 1000), loop.quit)
    loop.exec()
    app.processEvents()
    if widget.running:
        raise TimeoutError("the widget run did not finish")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--samples", type=int, default=1, help="posterior samples per run")
    ap.add_argument("--method", default="dds")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (both paths)")
    ap.add_argument("--prior", default=None, help="prior card path (default: shipped CT prior or a tiny one)")
    ap.add_argument("--screenshot", default=None, help="instead: save a mid-run screenshot of the window here")
    ap.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    ap.add_argument("--rate", type=float, default=None, help="the widget's layer updates per second (default: its own)")
    ap.add_argument("--trace", choices=["on", "off", "auto"], default="on",
                    help="the prior's traced inference network: on/off in both paths (default on: the same "
                         "network code headless and in the widget), auto = the package default (only off the "
                         "main thread, i.e. only in the widget)")
    a = ap.parse_args(argv)
    if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        print("gui_stream: needs a display; run it under xvfb-run -a", file=sys.stderr)
        return 2
    torch.set_num_threads(a.threads)
    os.environ.setdefault("NAPARI_DIFFRECON_CONFIG_DIR", tempfile.mkdtemp(prefix="diffrecon-bench-"))

    import napari
    from qtpy.QtWidgets import QApplication

    from napari_diffrecon._widgets import main_widget
    from napari_diffrecon.io import load_sample
    from napari_diffrecon.reconstruct import RunSettings, reconstruct
    from napari_diffrecon.samplers import SamplerParams

    prior, prior_path = _prior(a.prior)
    prior.trace = {"on": True, "off": False, "auto": None}[a.trace]
    viewer = napari.Viewer(show=True, title="napari-diffrecon workbench")
    widget = main_widget(viewer, restore_last=False)
    if a.rate:
        widget.max_rate = float(a.rate)
    viewer.window.add_dock_widget(widget, name="Diffusion reconstruction", area="right")
    app = QApplication.instance()
    widget.load_sample("ct_sparse23")
    widget.set_prior(prior_path, prior=prior)
    widget.method_combo.setCurrentIndex(widget.method_combo.findData(a.method))
    widget.hot_start.setChecked(False)  # from noise, as the headless run below (the workbench hot-starts by default)
    widget.spins["n_steps"].setValue(a.steps)
    widget.n_samples.setValue(a.samples)
    widget.seed.setValue(0)
    widget.compare.setChecked(False)

    if a.screenshot:
        return _screenshot(a, viewer, widget, app)

    m = load_sample("ct_sparse23")
    settings = RunSettings(method=a.method, params=SamplerParams(n_steps=a.steps), n_samples=a.samples, seed=0)
    head, gui, updates, gui_cpu, head_cpu, worker_cpu = [], [], [], [], [], []
    reconstruct(m, settings, prior)  # warm-up (first network call, allocations)
    widget.run()
    _wait(app, widget)
    for _ in range(a.repeats):
        c0, t0 = time.thread_time(), time.perf_counter()
        reconstruct(m, RunSettings.from_dict(settings.to_dict()), prior)
        head.append(time.perf_counter() - t0)
        head_cpu.append(time.thread_time() - c0)
        c0, t0 = time.thread_time(), time.perf_counter()
        widget.run()
        _wait(app, widget)
        gui.append(time.perf_counter() - t0)
        gui_cpu.append(time.thread_time() - c0)  # CPU the GUI (main) thread spent: redraws, slots, events
        updates.append(widget.estimate_updates)
        worker_cpu.append(widget._last_update.cpu_s)  # CPU of the run in the worker, streaming included
    h, g = statistics.median(head), statistics.median(gui)
    res = {
        "method": a.method, "n_steps": a.steps, "n_samples": a.samples, "threads": a.threads, "trace": a.trace,
        "prior": getattr(prior.card, "name", "?"), "repeats": a.repeats, "cpu_cores": os.cpu_count(),
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "headless_s": [round(v, 3) for v in head], "widget_s": [round(v, 3) for v in gui],
        "headless_median_s": round(h, 3), "widget_median_s": round(g, 3),
        "overhead_median_pct": round(100 * (g / h - 1), 1),
        "overhead_best_pct": round(100 * (min(gui) / min(head) - 1), 1),
        "headless_cpu_s": [round(v, 3) for v in head_cpu], "worker_cpu_s": [round(v, 3) for v in worker_cpu],
        "worker_cpu_overhead_pct": round(100 * (statistics.median(worker_cpu) / statistics.median(head_cpu) - 1), 1),
        "gui_thread_cpu_s": [round(v, 3) for v in gui_cpu],
        "gui_thread_cpu_pct_of_headless": round(100 * statistics.median(gui_cpu) / h, 1),
        "estimate_updates_per_run": updates,
        "updates_per_s": round(statistics.median(updates) / g, 1),
    }
    print(json.dumps(res, indent=1))
    print(f"widget vs headless: median {g:.2f} s vs {h:.2f} s → {res['overhead_median_pct']:+.1f}%; "
          f"best {min(gui):.2f} s vs {min(head):.2f} s → {res['overhead_best_pct']:+.1f}%; GUI thread CPU "
          f"{res['gui_thread_cpu_pct_of_headless']}% of the headless time; run CPU in the worker "
          f"{res['worker_cpu_overhead_pct']:+.1f}% vs headless; {res['updates_per_s']} updates/s")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    viewer.close()
    return 0


def _screenshot(a: argparse.Namespace, viewer, widget, app) -> int:
    """Start a run, wait until it is about half way, then grab the whole window (widget, layers, canvas)."""
    viewer.window._qt_window.resize(1600, 1000)
    widget.compare.setChecked(True)
    widget.run()
    t0 = time.perf_counter()
    while widget.running:
        app.processEvents()
        time.sleep(0.005)
        upd = widget._last_update
        if upd is not None and upd.kind == "iterate" and upd.step >= a.steps // 2 and "std" in widget.layers:
            break
        if time.perf_counter() - t0 > 900:
            break
    for layer in list(viewer.layers):  # the grid shows the ground truth and the results, not the sinogram
        if "measurement" in layer.name:  # (the widget keeps the measurement itself)
            viewer.layers.remove(layer)
    widget.grid.setChecked(True)  # side by side, view reset to the images
    viewer.grid.shape = (2, 3)
    viewer.reset_view()
    activity = getattr(viewer.window._qt_window, "_activity_dialog", None)
    if activity is not None:  # show napari's activity panel with the run's progress bar
        activity.show()
    for _ in range(20):  # let the canvas and the progress bar redraw
        app.processEvents()
        time.sleep(0.02)
    img = viewer.screenshot(canvas_only=False, flash=False)
    out = Path(a.screenshot)
    out.parent.mkdir(parents=True, exist_ok=True)
    from skimage.io import imsave

    imsave(out, img, check_contrast=False)
    print(f"wrote {out} ({img.shape[1]}×{img.shape[0]}) at step {widget._last_update.step}/{a.steps}")
    widget.stop()
    _wait(app, widget, 30)
    viewer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
