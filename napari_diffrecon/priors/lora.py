"""Low-rank adapters (LoRA, Hu et al. 2022) for the prior's U-Net: small trainable updates beside frozen weights.

A wrapped layer computes ``base(x) + (α / r) · up(down(x))`` with ``down`` a rank-``r`` layer of the base
layer's geometry (for a convolution: same kernel, stride, padding and dilation) and ``up`` a 1×1 map back to the
base layer's outputs. ``up`` starts at zero, so a freshly adapted network computes exactly what the base network
does; only the adapter weights are trainable. Used for test-time adaptation of a prior to the scan at hand
(:mod:`napari_diffrecon.samplers.adapt`).

:func:`lora_copy` never touches the module it is given: it adapts a deep copy, so a shipped prior stays as it
was for the next run.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["LoRAConv2d", "LoRALinear", "add_lora", "lora_copy", "lora_parameters", "lora_layers"]


class _LoRABase(nn.Module):
    """Shared bits of the adapters: the frozen base layer, the scale and the on/off switch."""

    base: nn.Module
    down: nn.Module
    up: nn.Module

    def __init__(self, base: nn.Module, rank: int, alpha: float | None) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be ≥ 1, got {rank}")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.rank = int(rank)
        self.scale = float(alpha if alpha is not None else rank) / self.rank
        self.enabled = True

    def _init(self, generator: torch.Generator | None) -> None:
        """Kaiming-uniform ``down`` (as ``nn.Linear``/``nn.Conv2d`` do), zero ``up``: the adapter starts at 0."""
        w = self.down.weight
        fan_in = w[0].numel()
        bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform with a = √5, the PyTorch default for these layers
        with torch.no_grad():
            w.copy_((torch.rand(w.shape, generator=generator) * 2 - 1) * bound)
            self.up.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if not self.enabled:
            return out
        return out + self.scale * self.up(self.down(x))


class LoRAConv2d(_LoRABase):
    """A frozen ``nn.Conv2d`` plus a rank-``r`` update: ``conv(x) + (α/r) · up₁ₓ₁(down_k×k(x))``.

    Parameters
    ----------
    base : nn.Conv2d
        The layer to adapt (its weights are frozen; ``groups`` must be 1).
    rank : int
        Rank ``r`` of the update.
    alpha : float, optional
        Scale numerator (default ``r``, i.e. scale 1).
    generator : torch.Generator, optional
        Seeds the random ``down`` initialisation (``up`` starts at zero).
    """

    def __init__(
        self, base: nn.Conv2d, rank: int = 4, alpha: float | None = None, generator: torch.Generator | None = None
    ) -> None:
        if base.groups != 1:
            raise ValueError("LoRAConv2d adapts ungrouped convolutions only")
        super().__init__(base, rank, alpha)
        dev, dt = base.weight.device, base.weight.dtype
        self.down = nn.Conv2d(
            base.in_channels, self.rank, base.kernel_size, stride=base.stride, padding=base.padding,
            dilation=base.dilation, padding_mode=base.padding_mode, bias=False, device=dev, dtype=dt,
        )
        self.up = nn.Conv2d(self.rank, base.out_channels, 1, bias=False, device=dev, dtype=dt)
        self._init(generator)


class LoRALinear(_LoRABase):
    """A frozen ``nn.Linear`` plus a rank-``r`` update: ``linear(x) + (α/r) · B A x``.

    Parameters
    ----------
    base : nn.Linear
        The layer to adapt (its weights are frozen).
    rank : int
        Rank ``r`` of the update.
    alpha : float, optional
        Scale numerator (default ``r``, i.e. scale 1).
    generator : torch.Generator, optional
        Seeds the random ``down`` initialisation (``up`` starts at zero).
    """

    def __init__(
        self, base: nn.Linear, rank: int = 4, alpha: float | None = None, generator: torch.Generator | None = None
    ) -> None:
        super().__init__(base, rank, alpha)
        dev, dt = base.weight.device, base.weight.dtype
        self.down = nn.Linear(base.in_features, self.rank, bias=False, device=dev, dtype=dt)
        self.up = nn.Linear(self.rank, base.out_features, bias=False, device=dev, dtype=dt)
        self._init(generator)


def add_lora(
    module: nn.Module,
    rank: int = 4,
    alpha: float | None = None,
    kinds: Iterable[str] = ("conv", "linear"),
    seed: int = 0,
) -> list[_LoRABase]:
    """Replace the conv/linear layers of ``module`` *in place* by LoRA-wrapped ones; freeze everything else.

    Parameters
    ----------
    module : nn.Module
        The network to adapt (modified in place: use :func:`lora_copy` to keep the original).
    rank : int
        Adapter rank ``r``; a layer narrower than ``r`` gets rank ``min(r, in, out)``.
    alpha : float, optional
        Scale numerator (default: the rank, scale 1).
    kinds : iterable of {"conv", "linear"}
        Which layer types to adapt.
    seed : int
        Seed of the adapters' random initialisation (deterministic for a given network and seed).

    Returns
    -------
    list
        The adapter modules, in the network's module order.
    """
    kinds = set(kinds)
    bad = kinds - {"conv", "linear"}
    if bad:
        raise ValueError(f"unknown layer kinds {sorted(bad)}; use 'conv' and/or 'linear'")
    for p in module.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(int(seed))
    targets: list[tuple[nn.Module, str, nn.Module]] = []
    for parent in module.modules():
        if isinstance(parent, _LoRABase):
            continue
        for name, child in parent.named_children():
            if isinstance(child, nn.Conv2d) and "conv" in kinds and child.groups == 1:
                targets.append((parent, name, child))
            elif isinstance(child, nn.Linear) and "linear" in kinds:
                targets.append((parent, name, child))
    out: list[_LoRABase] = []
    for parent, name, child in targets:
        if isinstance(child, nn.Conv2d):
            r = max(1, min(rank, child.in_channels, child.out_channels))
            wrapped: _LoRABase = LoRAConv2d(child, r, alpha, generator=gen)
        else:
            r = max(1, min(rank, child.in_features, child.out_features))
            wrapped = LoRALinear(child, r, alpha, generator=gen)
        setattr(parent, name, wrapped)
        out.append(wrapped)
    if not out:
        raise ValueError("no conv/linear layers to adapt in this network")
    return out


def lora_copy(
    module: nn.Module,
    rank: int = 4,
    alpha: float | None = None,
    kinds: Iterable[str] = ("conv", "linear"),
    seed: int = 0,
) -> tuple[nn.Module, list[_LoRABase]]:
    """A deep copy of ``module`` with LoRA adapters (:func:`add_lora`); ``module`` itself is left untouched.

    Parameters
    ----------
    module : nn.Module
        The network to copy and adapt (not modified).
    rank, alpha, kinds, seed
        As for :func:`add_lora`.

    Returns
    -------
    network, adapters
        The adapted copy (in eval mode) and its adapter modules.
    """
    net = copy.deepcopy(module)
    adapters = add_lora(net, rank, alpha, kinds, seed)
    net.eval()
    return net, adapters


def lora_layers(module: nn.Module) -> list[_LoRABase]:
    """The LoRA adapters inside ``module``."""
    return [m for m in module.modules() if isinstance(m, _LoRABase)]


def lora_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The trainable adapter weights of ``module`` (``down`` and ``up`` of every adapter)."""
    return [p for m in lora_layers(module) for p in (*m.down.parameters(), *m.up.parameters())]
