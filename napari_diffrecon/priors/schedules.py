"""Noise schedules: VP (linear and cosine β), VE, and EDM (Karras σ grid, ρ = 7).

Every schedule is expressed through the noise level σ of the *variance-exploding* form
``x_σ = x0 + σ ε``. A VP state ``x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε`` is the same thing scaled:
``x_t = s(σ) · x_σ`` with ``σ = √((1−ᾱ)/ᾱ)`` and ``s = √ᾱ = 1/√(1+σ²)``. So one denoiser
``D(x_σ; σ)`` serves every sampler, whatever schedule the prior was trained with.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

__all__ = [
    "Schedule",
    "EDMSchedule",
    "VPSchedule",
    "VESchedule",
    "get_schedule",
    "vp_scale",
    "sigma_to_alpha_bar",
    "alpha_bar_to_sigma",
    "pfgmpp_noise",
]


def sigma_to_alpha_bar(sigma: torch.Tensor | float) -> torch.Tensor:
    """ᾱ of the VP process with the same signal-to-noise ratio as VE noise level σ."""
    s = torch.as_tensor(sigma, dtype=torch.float64)
    return 1.0 / (1.0 + s**2)


def alpha_bar_to_sigma(alpha_bar: torch.Tensor | float) -> torch.Tensor:
    """VE noise level σ = √((1−ᾱ)/ᾱ)."""
    a = torch.as_tensor(alpha_bar, dtype=torch.float64)
    return torch.sqrt((1.0 - a) / a)


def vp_scale(sigma: torch.Tensor | float) -> torch.Tensor:
    """Scale √ᾱ = 1/√(1+σ²) that maps a VE state to the VP state."""
    return torch.sqrt(sigma_to_alpha_bar(sigma))


@dataclass
class Schedule:
    """Base class: the noise levels used for sampling and the training noise distribution."""

    name: str = "base"

    def sigmas(self, n_steps: int) -> torch.Tensor:
        """Decreasing noise levels ``σ_0 > … > σ_{n−1}`` followed by a final 0 (length n+1, float64)."""
        raise NotImplementedError

    def sample_training_sigma(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Noise levels drawn from the training distribution (float32, shape (n,))."""
        raise NotImplementedError

    @property
    def sigma_max(self) -> float:
        """Largest noise level of the schedule."""
        return float(self.sigmas(2)[0])

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable parameters (stored in the model card)."""
        return asdict(self)


@dataclass
class EDMSchedule(Schedule):
    """Karras et al. (2022): σ_i = (σmax^{1/ρ} + i/(N−1)(σmin^{1/ρ} − σmax^{1/ρ}))^ρ.

    Training draws ln σ ~ N(P_mean, P_std).
    """

    name: str = "edm"
    sigma_min: float = 0.002
    sigma_max_: float = 80.0
    rho: float = 7.0
    p_mean: float = -1.2
    p_std: float = 1.2

    def sigmas(self, n_steps: int) -> torch.Tensor:
        n = max(int(n_steps), 1)
        i = torch.arange(n, dtype=torch.float64)
        if n == 1:
            s = torch.tensor([self.sigma_max_], dtype=torch.float64)
        else:
            a, b = self.sigma_max_ ** (1 / self.rho), self.sigma_min ** (1 / self.rho)
            s = (a + i / (n - 1) * (b - a)) ** self.rho
        return torch.cat([s, torch.zeros(1, dtype=torch.float64)])

    def sample_training_sigma(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.exp(self.p_mean + self.p_std * torch.randn(n, generator=generator))

    @property
    def sigma_max(self) -> float:
        return float(self.sigma_max_)


@dataclass
class VPSchedule(Schedule):
    """DDPM / VP-SDE with a linear (β from β_min to β_max over T steps) or cosine (Nichol & Dhariwal) ᾱ."""

    name: str = "vp"
    kind: str = "linear"
    n_train: int = 1000
    beta_min: float = 1e-4
    beta_max: float = 0.02
    cosine_s: float = 0.008

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "cosine"):
            raise ValueError(f"VP schedule kind must be 'linear' or 'cosine', got {self.kind!r}")

    def alpha_bars(self) -> torch.Tensor:
        """ᾱ_t for t = 1..T (float64, decreasing)."""
        t = self.n_train
        if self.kind == "linear":
            betas = torch.linspace(self.beta_min, self.beta_max, t, dtype=torch.float64)
            return torch.cumprod(1.0 - betas, 0)
        steps = torch.arange(t + 1, dtype=torch.float64) / t
        f = torch.cos((steps + self.cosine_s) / (1 + self.cosine_s) * math.pi / 2) ** 2
        ab = f / f[0]
        betas = torch.clamp(1 - ab[1:] / ab[:-1], max=0.999)
        return torch.cumprod(1.0 - betas, 0)

    def timesteps(self, n_steps: int) -> torch.Tensor:
        """Evenly spaced training indices from T−1 down to 0 (DDIM's "uniform" spacing)."""
        n = max(int(n_steps), 1)
        return torch.linspace(self.n_train - 1, 0, n, dtype=torch.float64).round().long()

    def sigmas(self, n_steps: int) -> torch.Tensor:
        ab = self.alpha_bars()[self.timesteps(n_steps)]
        return torch.cat([alpha_bar_to_sigma(ab), torch.zeros(1, dtype=torch.float64)])

    def sample_training_sigma(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        idx = torch.randint(0, self.n_train, (n,), generator=generator)
        return alpha_bar_to_sigma(self.alpha_bars()[idx]).float()


@dataclass
class VESchedule(Schedule):
    """Song et al. (2021) VE-SDE: geometric σ from σ_max to σ_min; log-uniform σ in training."""

    name: str = "ve"
    sigma_min: float = 0.01
    sigma_max_: float = 50.0

    def sigmas(self, n_steps: int) -> torch.Tensor:
        n = max(int(n_steps), 1)
        s = torch.exp(torch.linspace(math.log(self.sigma_max_), math.log(self.sigma_min), n, dtype=torch.float64))
        return torch.cat([s, torch.zeros(1, dtype=torch.float64)])

    def sample_training_sigma(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        u = torch.rand(n, generator=generator)
        return torch.exp(math.log(self.sigma_min) + u * (math.log(self.sigma_max_) - math.log(self.sigma_min)))

    @property
    def sigma_max(self) -> float:
        return float(self.sigma_max_)


def pfgmpp_noise(
    shape: tuple[int, ...],
    sigma: torch.Tensor | float,
    aug_dim: float | None,
    data_dim: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Perturbation of the PFGM++ kernel (Xu et al. 2023) aligned with EDM noise level σ.

    PFGM++ perturbs an N-dimensional image with ``R·u``: ``u`` uniform on the unit sphere and
    ``R = r·√(β/(1−β))``, ``β ~ Beta(N/2, D/2)``, where the augmentation dimension D sets how
    heavy-tailed the perturbation's norm is. With the alignment ``r = σ√D`` the EDM denoiser,
    schedules and ODE solvers are reused unchanged; ``D → ∞`` gives Gaussian noise ``σ ε``.

    Parameters
    ----------
    shape : tuple of int
        ``(B, C, H, W)``.
    sigma : float or tensor
        EDM noise level(s), scalar or ``(B,)``.
    aug_dim : float or None
        D; ``None`` or ``inf`` = diffusion (Gaussian).
    data_dim : int, optional
        N, the dimension of a *whole* image the prior is applied to. When it exceeds
        ``C·H·W`` (training on patches), the patch gets the restriction of a whole-image
        perturbation: ``ε · R/√N``. Default ``C·H·W`` (exact sphere normalisation).
    generator : torch.Generator, optional
        Source of randomness (CPU), for determinism.

    Returns
    -------
    torch.Tensor
        float32 perturbation of ``shape`` (on the CPU).
    """
    b = shape[0]
    eps = torch.randn(shape, generator=generator)
    sig = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).expand(b).reshape(b, *([1] * (len(shape) - 1)))
    if aug_dim is None or not math.isfinite(float(aug_dim)):
        return (sig * eps).float()
    d = float(aug_dim)
    if d <= 0:
        raise ValueError(f"PFGM++ augmentation dimension D must be positive, got {aug_dim}")
    local = math.prod(shape[1:])
    n = int(data_dim) if data_dim else local
    if n < local:
        raise ValueError(f"data_dim {n} is smaller than one image's {local} values")
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    rng = np.random.default_rng(seed)
    g1, g2 = rng.standard_gamma(n / 2.0, size=b), rng.standard_gamma(d / 2.0, size=b)
    radius = sig.reshape(-1) * math.sqrt(d) * torch.as_tensor(np.sqrt(g1 / g2))
    if n == local:
        norm = eps.flatten(1).norm(dim=1).double()
    else:
        norm = torch.full((b,), math.sqrt(n), dtype=torch.float64)
    return (eps * (radius / norm).reshape(b, *([1] * (len(shape) - 1)))).float()


_SCHEDULES = {"edm": EDMSchedule, "vp": VPSchedule, "ve": VESchedule}


def get_schedule(spec: str | dict[str, Any] | Schedule) -> Schedule:
    """Build a schedule from a name ("edm", "vp", "vp-cosine", "ve") or a card dict."""
    if isinstance(spec, Schedule):
        return spec
    if isinstance(spec, str):
        if spec == "vp-cosine":
            return VPSchedule(kind="cosine")
        if spec == "vp-linear":
            return VPSchedule(kind="linear")
        spec = {"name": spec}
    d = dict(spec)
    name = str(d.pop("name", "edm")).lower()
    if name not in _SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; use one of {sorted(_SCHEDULES)} or 'vp-cosine'")
    try:
        return _SCHEDULES[name](**d)
    except TypeError as e:
        raise ValueError(f"bad parameters for the {name} schedule: {e}") from None
