"""A volume reconstruction streaming into the napari workbench: screenshot and GUI timings.

Run under a virtual display (CPU, a few minutes)::

    xvfb-run -a -s "-screen 0 1920x1200x24" python benchmarks/volume_stream.py \\
        --screenshot docs/volume_stream.png --out volume_stream.json

The input is the same real volume as ``benchmarks/volume.py quality`` (nibabel's example4d EPI brain, 12 axial
slices padded to 128², 2.2 × 2 × 2 mm), opened as a 3D image layer. The workbench's "Volume (3D)" group
simulates a 30-view CT study of it and streams the DiffusionMBIR-style reconstruction (shipped
``ct-phantom-128`` prior, z-TV 0.05) in slabs of ``--slab`` slices into one 3D layer, with the viewer's slider
on slice ``--focus`` (that slab runs first). Side by side (grid): the input volume and the estimate.

Measured (written as JSON with ``--out``): time to the layer's first update, updates per second, the
longest event-loop stall after the estimate layer exists (a 20 ms heartbeat timer), the wall time, and the
Stop latency (Stop is pressed once the screenshot is taken; ``--no-stop`` runs to the end instead).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _wait(app, cond, timeout: float) -> bool:
    t0 = time.perf_counter()
    while not cond():
        app.processEvents()
        time.sleep(0.01)
        if time.perf_counter() - t0 > timeout:
            return False
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prior", default="ct-phantom-128")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--slab", type=int, default=6)
    p.add_argument("--focus", type=int, default=7)
    p.add_argument("--ztv", type=float, default=0.05)
    p.add_argument("--screenshot", default=None, help="PNG of the window mid-run (second slab half done)")
    p.add_argument("--no-stop", action="store_true", help="run to the end instead of pressing Stop")
    p.add_argument("--timeout", type=float, default=1500.0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import napari
    import torch
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication, QScrollArea

    sys.path.insert(0, str(Path(__file__).parent))
    from volume import real_volume

    from napari_diffrecon._widgets import main_widget
    from napari_diffrecon._widgets._volume import VOLUME_LAYER_NAMES

    torch.set_num_threads(1)
    vol, spacing = real_volume(6, 12)
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1880, 1120)
    w = main_widget(viewer, restore_last=False)
    viewer.window.add_dock_widget(w, name="Diffusion reconstruction")
    app = QApplication.instance()
    src = viewer.add_image(vol, name="example4d (real EPI volume)", scale=spacing, colormap="gray",
                           contrast_limits=(0.0, 1.1))
    assert w.set_prior(args.prior)
    panel = w.volume
    panel.use_layer(src.name, "ct")
    panel.views.setValue(30)
    panel.noise.setValue(1.0)
    panel.steps.setValue(args.steps)
    panel.ztv.setValue(args.ztv)
    panel.slab.setValue(args.slab)
    viewer.dims.set_point(0, float(src.data_to_world((args.focus, 0, 0))[0]))
    scroll = w.findChild(QScrollArea)
    scroll.ensureWidgetVisible(panel)
    app.processEvents()

    seen: list = []
    t_layer: list[float] = []
    gaps: list[float] = []
    last = [time.perf_counter()]

    def beat() -> None:
        now = time.perf_counter()
        if VOLUME_LAYER_NAMES["estimate"] in viewer.layers:
            if not t_layer:
                t_layer.append(now)
            else:
                gaps.append(now - last[0])
        last[0] = now

    timer = QTimer()
    timer.timeout.connect(beat)
    timer.start(20)
    t0 = time.perf_counter()
    worker = panel.run()
    assert worker is not None
    worker.yielded.connect(lambda u: seen.append((time.perf_counter() - t0, u.kind, int(u.done.sum())
                                                  if u.done is not None else 0, u.step, u.core)))
    grid = getattr(getattr(viewer, "canvas", None), "grid", None) or viewer.grid  # napari ≥ 0.9: canvas.grid
    grid.enabled = True
    viewer.reset_view()

    def second_slab_half_done() -> bool:
        ups = [s for s in seen if s[1] == "estimate"]
        second = bool(ups) and ups[-1][4] != ups[0][4] and ups[-1][2] >= 1
        return second and ups[-1][3] >= args.steps // 2 or not panel.running

    ok = _wait(app, second_slab_half_done, args.timeout)
    shot_at = time.perf_counter() - t0
    if args.screenshot:
        scroll.ensureWidgetVisible(panel)
        _wait(app, lambda: False, 0.5)  # let the last update draw
        viewer.screenshot(args.screenshot, canvas_only=False)
        print(f"screenshot {args.screenshot} at {shot_at:.1f} s", flush=True)
    stop_latency = None
    if not args.no_stop and panel.running:
        t_stop = time.perf_counter()
        panel.stop()
        _wait(app, lambda: not panel.running, 60)
        stop_latency = time.perf_counter() - t_stop
    else:
        _wait(app, lambda: not panel.running, args.timeout)
    timer.stop()
    wall = time.perf_counter() - t0
    est = [s for s in seen if s[1] == "estimate"]
    out = {
        "command": " ".join(["python", "benchmarks/volume_stream.py", *(argv if argv is not None else sys.argv[1:])]),
        "volume": {"source": "nibabel tests/data/example4d.nii.gz frame 0, slices 6-17", "shape": list(vol.shape),
                   "spacing_mm": list(spacing)},
        "prior": args.prior, "steps": args.steps, "slab": args.slab, "ztv": args.ztv, "focus": args.focus,
        "reached_screenshot_point": ok, "screenshot_at_s": shot_at,
        "first_estimate_update_s": est[0][0] if est else None,
        "estimate_updates": len(est), "updates_per_s": len(est) / max((est[-1][0] - est[0][0]), 1e-9) if est else 0,
        "slab_order": [list(s[4]) for i, s in enumerate(seen) if s[1] == "estimate" and
                       (i == 0 or seen[i - 1][4] != s[4])],
        "max_event_loop_gap_s": max(gaps) if gaps else None,
        "gaps_over_0.5s": sum(g > 0.5 for g in gaps),
        "estimate_layer_created_s": (t_layer[0] - t0) if t_layer else None,
        "stop_latency_s": stop_latency, "wall_s": wall, "status": panel.status.text(),
        "provenance_status": (panel.last_provenance or {}).get("status", "finished"),
    }
    text = json.dumps(out, indent=1, default=str)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    viewer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
