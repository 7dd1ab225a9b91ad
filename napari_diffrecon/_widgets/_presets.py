"""Presets (small JSON files of run settings) and the last-used settings that persist across restarts.

A preset is ``{"format": "napari-diffrecon preset", "version": 1, "settings": RunSettings.to_dict(),
"gui": {...}}``; ``gui`` holds widget-only choices (comparison baseline, grid view). The last used
settings live in ``last_settings.json`` under :func:`config_dir` — the user config directory, or
``$NAPARI_DIFFRECON_CONFIG_DIR`` when set (tests point it at a temporary folder); their ``gui`` also
holds ``data_kind``, the ``[modality, coils, noisy]`` of the data they ran on (``reconstruct.data_kind``):
the workbench keeps the restored sampler values for data of that kind (or with the same tuned values).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..reconstruct import RunSettings

__all__ = ["PRESET_FORMAT", "config_dir", "save_preset", "load_preset", "save_last", "load_last"]

PRESET_FORMAT = "napari-diffrecon preset"
ENV_CONFIG = "NAPARI_DIFFRECON_CONFIG_DIR"


def config_dir() -> Path:
    """Where the last used settings are kept (not created until something is written)."""
    env = os.environ.get(ENV_CONFIG)
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_config_dir("napari-diffrecon", appauthor=False))


def _write_json_atomic(path: Path, obj: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


#: Sampler parameters added after presets were first saved, whose tuned value depends on the data: a preset without
#: them gets the tuned value for its method and data in the workbench (a CLI replay keeps the class default, so old
#: runs reproduce).
UNSET_TUNED = ("orientations",)


def save_preset(path: str | Path, settings: RunSettings, gui: dict[str, Any] | None = None) -> Path:
    """Write settings (and widget-only choices) as a JSON preset; returns the path."""
    path = Path(path)
    if path.suffix.lower() != ".json":
        path = path.with_suffix(".json")
    _write_json_atomic(path, {"format": PRESET_FORMAT, "version": 1, "settings": settings.to_dict(),
                              "gui": dict(gui or {})})
    return path


def load_preset(path: str | Path) -> tuple[RunSettings, dict[str, Any]]:
    """Read a preset; raises ValueError naming what is wrong (not JSON, not a preset, bad settings)."""
    path = Path(path)
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read preset {path.name}: {e}") from None
    if not isinstance(d, dict) or d.get("format") != PRESET_FORMAT or "settings" not in d:
        raise ValueError(f"{path.name} is not a napari-diffrecon preset (expected format {PRESET_FORMAT!r})")
    try:
        settings = RunSettings.from_dict(d["settings"])
    except (TypeError, ValueError, OverflowError) as e:
        raise ValueError(f"preset {path.name}: {e}") from None
    gui = d.get("gui") or {}
    if not isinstance(gui, dict):
        raise ValueError(f"preset {path.name}: 'gui' must be a JSON object (the workbench's own choices), got {gui!r}")
    gui = dict(gui)
    given = d["settings"].get("params") if isinstance(d["settings"], dict) else None
    unset = [k for k in UNSET_TUNED if not isinstance(given, dict) or k not in given]
    if unset:  # a preset older than these parameters: the workbench shows their tuned values, not the class default
        gui["unset_params"] = unset
    return settings, gui


def save_last(settings: RunSettings, gui: dict[str, Any] | None = None) -> Path | None:
    """Remember the settings for the next session (failures to write are not fatal: returns None)."""
    try:
        return save_preset(config_dir() / "last_settings.json", settings, gui)
    except OSError:
        return None


def load_last() -> tuple[RunSettings, dict[str, Any]] | None:
    """The settings remembered from the last session, or None (absent or unreadable)."""
    p = config_dir() / "last_settings.json"
    if not p.exists():
        return None
    try:
        return load_preset(p)
    except (ValueError, OSError):
        return None
