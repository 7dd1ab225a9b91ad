"""napari widgets (GUI only; every computation is in the core).

:func:`main_widget` builds the workbench dock widget for a viewer (used by ``napari-diffrecon demo``);
``make_widget`` is the npe2 widget contribution (a QWidget class napari builds with ``napari_viewer``).
Qt and napari are imported only when a widget is asked for.
"""

from __future__ import annotations

from typing import Any

__all__ = ["main_widget", "make_widget"]


def main_widget(viewer: Any, restore_last: bool = True) -> Any:
    """The workbench dock widget for ``viewer`` (a ``QWidget``)."""
    from ._main import DiffReconWidget

    return DiffReconWidget(viewer, restore_last=restore_last)


def __getattr__(name: str) -> Any:
    if name == "make_widget":
        from ._main import WorkbenchWidget

        return WorkbenchWidget
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
