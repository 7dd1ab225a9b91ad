"""Score/denoiser networks: diffusers' ``UNet2DModel`` configured for 1- or 2-channel medical images.

Fully convolutional by default (no attention), so a network trained on 64² patches applies to
whole 128²–256² images (patch diffusion). The noise level enters through the U-Net's sinusoidal
timestep embedding.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["ARCH_PRESETS", "build_network", "count_parameters"]

ARCH_PRESETS: dict[str, dict[str, Any]] = {
    # ~0.6M parameters: for tests and quick CPU trials.
    "tiny": {
        "block_out_channels": [16, 32, 64],
        "down_block_types": ["DownBlock2D", "DownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "UpBlock2D", "UpBlock2D"],
        "layers_per_block": 1,
        "norm_num_groups": 8,
    },
    # ~5M parameters: shipped priors trained on CPU.
    "small": {
        "block_out_channels": [32, 64, 96, 128],
        "down_block_types": ["DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"],
        "layers_per_block": 2,
        "norm_num_groups": 16,
    },
    # ~20M parameters: for GPU training.
    "base": {
        "block_out_channels": [64, 128, 192, 256],
        "down_block_types": ["DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"],
        "layers_per_block": 2,
        "norm_num_groups": 32,
    },
}


def build_network(config: dict[str, Any]) -> torch.nn.Module:
    """Build the U-Net from a JSON config (as stored in a model card).

    Parameters
    ----------
    config : dict
        ``{"type": "diffusers.UNet2DModel", "preset": "small", "channels": 1, ...}``; keys other
        than ``type``, ``preset`` and ``channels`` are passed to ``UNet2DModel`` and override
        the preset.

    Returns
    -------
    torch.nn.Module
        A module called as ``net(x, noise_label)`` returning a tensor shaped like ``x``.
    """
    cfg = dict(config)
    kind = cfg.pop("type", "diffusers.UNet2DModel")
    if kind != "diffusers.UNet2DModel":
        raise ValueError(f"unknown network type {kind!r}; this version builds 'diffusers.UNet2DModel'")
    preset = cfg.pop("preset", None)
    channels = int(cfg.pop("channels", 1))
    kwargs: dict[str, Any] = dict(ARCH_PRESETS[preset]) if preset else {}
    if preset and preset not in ARCH_PRESETS:
        raise ValueError(f"unknown architecture preset {preset!r}; use one of {sorted(ARCH_PRESETS)}")
    kwargs.update(cfg)
    for key in ("block_out_channels", "down_block_types", "up_block_types"):
        if key in kwargs:
            kwargs[key] = tuple(kwargs[key])
    from diffusers import UNet2DModel  # heavy import: only when a network is built

    unet = UNet2DModel(in_channels=channels, out_channels=channels, **kwargs)
    return _UNetWrapper(unet)


class _UNetWrapper(torch.nn.Module):
    """Calls the diffusers U-Net as ``net(x, noise_label) -> tensor``."""

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet

    @property
    def size_multiple(self) -> int:
        """Image height and width must be multiples of this (2 per down-sampling level of the U-Net)."""
        return 2 ** max(len(self.unet.config.down_block_types) - 1, 0)

    def forward(self, x: torch.Tensor, noise_label: torch.Tensor) -> torch.Tensor:
        return self.unet(x, noise_label.reshape(-1).to(x.dtype).expand(x.shape[0])).sample


def count_parameters(net: torch.nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad)
