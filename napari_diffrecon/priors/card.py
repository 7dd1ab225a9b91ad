"""Model cards: the JSON that travels with every prior's safetensors weights.

A card says what the prior is and how it was made: architecture, resolution, channels,
intensity normalisation, modality, noise schedule and parametrisation, training data
provenance and licence, steps, final validation loss and software version. Loading validates
it before any weights are touched.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ModelCard", "CardError", "NORMALISATIONS"]

NORMALISATIONS = ("affine",)
_MODALITIES = ("ct", "mri", "pet", "generic")
_PARAMETRISATIONS = ("edm", "eps", "consistency")


class CardError(ValueError):
    """A model card is missing fields or holds invalid values."""


@dataclass
class ModelCard:
    """Everything needed to rebuild a prior and judge whether it fits a measurement.

    Attributes
    ----------
    name : str
        Registry name, e.g. ``"ct-phantom-128"``.
    modality : str
        ``"ct"``, ``"mri"``, ``"pet"`` or ``"generic"``.
    channels : int
        1 for real images, 2 for complex images as (real, imag).
    resolution : int
        The image side length the prior was trained for (patches may be smaller).
    architecture : dict
        Network config for :func:`~napari_diffrecon.priors.network.build_network`.
    parametrisation : str
        ``"edm"`` (preconditioned denoiser, Karras et al. 2022), ``"eps"`` (VP noise prediction) or
        ``"consistency"`` (a consistency model: the map to the ODE's end point, with the boundary
        condition ``f(x, σ_min) = x``; Song et al. 2023).
    aug_dim : float or None
        PFGM++ augmentation dimension D the prior was trained with (Xu et al. 2023; aligned with
        EDM by ``r = σ√D``); ``None`` for diffusion (D → ∞).
    schedule : dict
        The training noise schedule (see :func:`~napari_diffrecon.priors.schedules.get_schedule`).
    sigma_data : float
        Data standard deviation used by the EDM preconditioning (model units).
    normalisation : dict
        ``{"kind": "affine", "native_units": "HU", "offset": o, "scale": s}``: model units are
        ``(native − offset) / scale`` (e.g. a HU window mapped to [−1, 1]).
    training : dict
        Data provenance (sources, counts), licence, steps, batch size, learning rate, patch size,
        device, wall time, final validation loss, the command that produced it.
    software_version : str
        napari-diffrecon version that wrote the card.
    """

    name: str
    modality: str
    channels: int
    resolution: int
    architecture: dict[str, Any]
    parametrisation: str = "edm"
    schedule: dict[str, Any] = field(default_factory=lambda: {"name": "edm"})
    sigma_data: float = 0.5
    aug_dim: float | None = None
    normalisation: dict[str, Any] = field(
        default_factory=lambda: {"kind": "affine", "native_units": "arbitrary", "offset": 0.0, "scale": 1.0}
    )
    training: dict[str, Any] = field(default_factory=dict)
    software_version: str = ""
    description: str = ""
    format_version: int = 1

    def validate(self) -> None:
        """Raise :class:`CardError` listing every problem found."""
        problems = []
        if not self.name or not isinstance(self.name, str):
            problems.append("'name' must be a non-empty string")
        if self.modality not in _MODALITIES:
            problems.append(f"'modality' must be one of {_MODALITIES}, got {self.modality!r}")
        if self.channels not in (1, 2):
            problems.append(f"'channels' must be 1 (real) or 2 (complex as real/imag), got {self.channels!r}")
        if not isinstance(self.resolution, int) or self.resolution < 8:
            problems.append(f"'resolution' must be an integer ≥ 8, got {self.resolution!r}")
        if self.parametrisation not in _PARAMETRISATIONS:
            problems.append(f"'parametrisation' must be one of {_PARAMETRISATIONS}, got {self.parametrisation!r}")
        if not isinstance(self.architecture, dict) or "type" not in self.architecture:
            problems.append("'architecture' must be a dict with a 'type'")
        if not isinstance(self.schedule, dict) or "name" not in self.schedule:
            problems.append("'schedule' must be a dict with a 'name'")
        if self.aug_dim is not None and not (isinstance(self.aug_dim, (int, float)) and self.aug_dim > 0):
            problems.append(f"'aug_dim' (PFGM++ D) must be a positive number or null, got {self.aug_dim!r}")
        if not (isinstance(self.sigma_data, (int, float)) and self.sigma_data > 0):
            problems.append(f"'sigma_data' must be positive, got {self.sigma_data!r}")
        norm = self.normalisation if isinstance(self.normalisation, dict) else {}
        if norm.get("kind") not in NORMALISATIONS:
            problems.append(f"'normalisation.kind' must be one of {NORMALISATIONS}")
        elif not (isinstance(norm.get("scale"), (int, float)) and norm["scale"] != 0):
            problems.append("'normalisation.scale' must be a non-zero number")
        elif not isinstance(norm.get("offset"), (int, float)):
            problems.append("'normalisation.offset' must be a number")
        if self.training is not None and not isinstance(self.training, dict):
            problems.append(f"'training' must be an object (the training record) or null, got {self.training!r}")
        if problems:
            raise CardError(f"invalid model card {self.name!r}: " + "; ".join(problems))

    def to_json(self) -> str:
        """The card as pretty-printed JSON."""
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelCard:
        """Build and validate a card from a dict (unknown keys are an error)."""
        if not isinstance(d, dict):
            raise CardError("a model card must be a JSON object")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise CardError(f"unknown model card fields {unknown}; is this a napari-diffrecon card?")
        missing = [k for k in ("name", "modality", "channels", "resolution", "architecture") if k not in d]
        if missing:
            raise CardError(f"model card lacks required fields {missing}")
        card = cls(**d)
        card.validate()
        return card

    @classmethod
    def read(cls, path: str | Path) -> ModelCard:
        """Read and validate a card from a JSON file."""
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CardError(f"cannot read model card {path}: {e}") from None
        return cls.from_dict(d)

    @property
    def training_record(self) -> dict[str, Any]:
        """The card's training record (``training``), or an empty dict when the card has none or a malformed one."""
        return self.training if isinstance(self.training, dict) else {}

    def training_data(self) -> tuple[str | None, str | None, str | None]:
        """What the prior was trained on, whatever shape the card's training record has.

        Returns
        -------
        tuple of (str or None, str or None, str or None)
            The data's description (else its source name), the source's name (a ``builtin:`` source, a folder; lists
            joined by commas) and the data's licence; None where the card does not say.
        """
        tr = self.training_record
        data = tr.get("data")

        def text(v: Any) -> str | None:
            if isinstance(v, (list, tuple)):
                return ", ".join(str(x) for x in v) or None
            return str(v) if v not in (None, "") else None

        if isinstance(data, dict):
            name = text(data.get("source") or data.get("sources"))
            desc = text(data.get("description")) or name
            lic = text(data.get("licence") or data.get("license") or tr.get("licence") or tr.get("license"))
        else:
            desc = name = text(data)
            lic = text(tr.get("licence") or tr.get("license"))
        return desc, name, lic

    def summary(self) -> str:
        """One-paragraph human summary (for the GUI and ``--help`` listings)."""
        tr = self.training_record
        _, src, _ = self.training_data()
        what = "fine-tuned" if tr.get("fine_tuned_from") else "trained"
        return (
            f"{self.name}: {self.modality.upper()} prior, {self.resolution}×{self.resolution}, "
            f"{'complex' if self.channels == 2 else 'real'}, {self.parametrisation}/{self.schedule.get('name')}"
            f"{f', PFGM++ D={self.aug_dim:g}' if self.aug_dim else ''}; "
            f"{what} {tr.get('steps', '?')} steps on {src or 'unknown data'}"
            + (f"; final val loss {tr['final_val_loss']}" if "final_val_loss" in tr else "")
        )
