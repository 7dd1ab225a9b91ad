"""Shipped priors (package data under ``priors/weights/``), loaded by name or from a path."""

from __future__ import annotations

from pathlib import Path

import torch

from .card import ModelCard
from .prior import NetworkPrior, load_prior_file

__all__ = ["WEIGHTS_DIR", "list_priors", "load_prior", "prior_path", "default_prior_for"]

WEIGHTS_DIR = Path(__file__).parent / "weights"


def list_priors() -> dict[str, ModelCard]:
    """Cards of the shipped priors, by name (only those whose weights are present)."""
    out = {}
    for card_path in sorted(WEIGHTS_DIR.glob("*.json")):
        if card_path.with_suffix(".safetensors").exists():
            card = ModelCard.read(card_path)
            out[card.name] = card
    return out


def prior_path(name_or_path: str | Path) -> Path:
    """The card (or weights) path a prior name or path stands for: a path as given, a shipped name in the package.

    Raises
    ------
    FileNotFoundError
        With the list of shipped priors when the name is unknown.
    """
    p = Path(name_or_path)
    if p.suffix in (".json", ".safetensors") or p.exists():
        return p
    shipped = list_priors()
    if str(name_or_path) not in shipped:
        names = ", ".join(shipped) or "none installed"
        raise FileNotFoundError(f"no prior named {name_or_path!r}; shipped priors: {names}; or pass a .json path")
    return WEIGHTS_DIR / f"{name_or_path}.json"


def load_prior(name_or_path: str | Path, device: str | torch.device = "cpu") -> NetworkPrior:
    """Load a shipped prior by name, or any prior from its ``.json``/``.safetensors`` path.

    Raises
    ------
    FileNotFoundError
        With the list of shipped priors when the name is unknown.
    """
    path = prior_path(name_or_path)
    prior = load_prior_file(path, device)
    shipped = path != Path(name_or_path)  # a name, not a path
    # where it came from: provenance records it, a rerun loads it again
    prior.source = str(name_or_path) if shipped else str(path.resolve())
    return prior


def default_prior_for(modality: str, complex_: bool = False, consistency: bool = False) -> str | None:
    """Name of the shipped prior to use for a modality (None when there is none).

    Diffusion priors (trained with the diffusion kernel) are preferred; ``consistency=True`` asks
    for a shipped consistency model of the modality first (for the few-step ``consistency`` sampler).
    """
    want = 2 if complex_ else 1
    ranked = []
    for name, card in list_priors().items():
        if card.modality == modality and card.channels == want:
            is_cm = card.parametrisation == "consistency"
            ranked.append((is_cm != consistency, card.aug_dim is not None, name))
    return min(ranked)[2] if ranked else None
