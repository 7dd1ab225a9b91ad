"""napari widgets (GUI only; every computation is in the core).

:func:`main_widget` builds the workbench dock widget for a viewer; :func:`open_demo` opens it on the demo's job
(``napari-diffrecon demo`` with a display);
``make_widget`` is the npe2 widget contribution (a QWidget class napari builds with ``napari_viewer``).
Qt and napari are imported only when a widget is asked for.
"""

from __future__ import annotations

from typing import Any

__all__ = ["main_widget", "make_widget", "open_demo"]


def main_widget(viewer: Any, restore_last: bool = True) -> Any:
    """The workbench dock widget for ``viewer`` (a ``QWidget``)."""
    from ._main import DiffReconWidget

    return DiffReconWidget(viewer, restore_last=restore_last)


def open_demo(viewer: Any, n_samples: int = 4, start: bool = True) -> Any:
    """The workbench on the demo's job: the bundled 23-view CT, DDS on the shipped CT prior, hot-started, ``n_samples``
    posterior samples side by side with the ground truth and the classical start; the run starts at once.

    Parameters
    ----------
    viewer : napari.Viewer
        The viewer to dock the workbench in.
    n_samples : int
        Posterior samples (one batch): their mean and per-pixel std stream in.
    start : bool
        Start the run (False: only set it up; the user presses Run).

    Returns
    -------
    QWidget
        The workbench (its ``worker`` is the run in flight).
    """
    widget = main_widget(viewer, restore_last=False)  # the demo's settings, not the last session's,
    widget.remember = False  # and the last session's stay for the next workbench
    viewer.window.add_dock_widget(widget, name="Diffusion reconstruction", area="right")
    widget.load_sample("ct_sparse23")
    widget.method_combo.setCurrentIndex(widget.method_combo.findData("dds"))
    widget.hot_start.setChecked(True)
    widget.n_samples.setValue(n_samples)
    widget.grid.setChecked(True)
    if start:
        widget.run()
    return widget


def __getattr__(name: str) -> Any:
    if name == "make_widget":
        from ._main import WorkbenchWidget

        return WorkbenchWidget
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
