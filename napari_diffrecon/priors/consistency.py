"""Consistency distillation: a few-step (1–4 network evaluations) model from a trained diffusion prior.

Song, Dhariwal, Chen & Sutskever (ICML 2023), Algorithm 2, with the improvements of Song & Dhariwal
(2024) that matter on a small budget (pseudo-Huber distance, 1/Δσ weighting). The student
``f_θ(x, σ)`` maps any point of the teacher's probability-flow ODE trajectory to its end point; its
boundary condition ``f(x, σ_min) = x`` is built into the parametrisation (``c_skip``/``c_out`` of
:class:`~napari_diffrecon.priors.prior.NetworkPrior` with ``parametrisation = "consistency"``).

One distillation step: draw a clean patch ``x0`` and an index ``n`` of the Karras grid
``σ_1 < … < σ_N``; noise ``x = x0 + σ_{n+1} z``; one Heun step of the *teacher's* ODE from
``σ_{n+1}`` to ``σ_n`` gives ``x̂``; minimise ``d(f_θ(x, σ_{n+1}), f_θ⁻(x̂, σ_n))`` where ``θ⁻`` is a
slow EMA of θ (the target network). The student starts from the teacher's weights.

Consistency *training* (Algorithm 3; ``mode="training"``) needs no teacher network: the ODE step is
replaced by the unbiased one-sample estimate ``x̂ = x0 + σ_n z`` (the same ``z``), and the student
starts from random weights. The "teacher" prior then only supplies the architecture, units and schedule.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from .card import ModelCard
from .network import build_network, count_parameters
from .prior import NetworkPrior, save_prior
from .schedules import pfgmpp_noise
from .training import (
    ImagePool,
    RunState,
    augment,
    check_optimisation,
    ema_update,
    run_steps,
    validation_loss,
    validation_noise,
)

__all__ = ["DistillConfig", "check_distill_config", "distill_consistency", "karras_grid", "consistency_card",
           "export_distill_checkpoint"]


@dataclass
class DistillConfig:
    """Settings of a consistency-distillation run (stored in the checkpoint and the card)."""

    name: str = "consistency"
    teacher: str = ""
    mode: str = "distillation"
    n_grid: int = 18
    #: Top of the distillation grid (None: the teacher schedule's σ_max). A model for hot starts only needs the low
    #: noise levels they enter at (the CT consistency hot start: t0 0.25, σ ≈ 0.17); all N grid points then lie there.
    sigma_max: float | None = None
    target_decay: float = 0.95
    ema_decay: float = 0.999
    batch_size: int = 16
    patch_size: int = 64
    lr: float = 1e-4
    steps: int = 1000
    val_every: int = 100
    val_size: int = 16
    huber_c: float = 0.00054
    seed: int = 0
    device: str = "cpu"
    grad_clip: float = 1.0
    augment: bool = True
    data: dict[str, Any] = field(default_factory=dict)
    command: str = ""


def karras_grid(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """Increasing noise levels ``σ_1 < … < σ_n`` of the Karras et al. (2022) grid (float64)."""
    i = torch.arange(n, dtype=torch.float64) / max(n - 1, 1)
    a, b = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (a + i * (b - a)) ** rho


def consistency_card(teacher: NetworkPrior, config: DistillConfig) -> ModelCard:
    """The student's card: the teacher's architecture, units and schedule, ``parametrisation="consistency"``."""
    t = teacher.card
    return ModelCard(
        name=config.name,
        modality=t.modality,
        channels=t.channels,
        resolution=t.resolution,
        architecture=dict(t.architecture),
        parametrisation="consistency",
        schedule=dict(t.schedule),
        sigma_data=t.sigma_data,
        aug_dim=t.aug_dim,
        normalisation=dict(t.normalisation),
        software_version=__version__,
        description=f"consistency model distilled from {t.name}: 1–4 network evaluations per sample",
    )


@torch.no_grad()
def _teacher_heun(teacher: NetworkPrior, x: torch.Tensor, s_hi: torch.Tensor, s_lo: torch.Tensor) -> torch.Tensor:
    """One Heun step of the teacher's probability-flow ODE ``dx/dσ = (x − D(x; σ))/σ`` from σ_hi to σ_lo."""
    shape = (-1, 1, 1, 1)
    d1 = (x - teacher.raw(x, s_hi)) / s_hi.reshape(shape)
    h = (s_lo - s_hi).reshape(shape)
    x_e = x + h * d1
    d2 = (x_e - teacher.raw(x_e, s_lo)) / s_lo.reshape(shape)
    return x + h * 0.5 * (d1 + d2)


def _pseudo_huber(diff: torch.Tensor, c: float) -> torch.Tensor:
    """``√(‖d‖² + c²) − c`` per sample (Song & Dhariwal 2024)."""
    return torch.sqrt(diff.flatten(1).pow(2).sum(1) + c**2) - c


def _distill_record(
    teacher: NetworkPrior,
    config: DistillConfig,
    step: int,
    wall: float,
    history: list[dict[str, Any]],
    final: dict[str, Any],
    n_params: int,
    device: str,
) -> dict[str, Any]:
    """The card's ``training`` entry: the method, the teacher (with its own provenance) and the run."""
    method = (
        "consistency distillation (Song et al. 2023, Alg. 2): Heun teacher step, pseudo-Huber distance, "
        "1/Δσ weighting, student initialised from the teacher"
        if config.mode == "distillation"
        else "consistency training (Song et al. 2023, Alg. 3): x0 + σ_n z target, pseudo-Huber distance, 1/Δσ "
        "weighting, random initialisation (architecture, units and schedule of the template prior)"
    )
    return {
        "method": method,
        "mode": config.mode,
        ("distilled_from" if config.mode == "distillation" else "template_prior"): teacher.card.name,
        "teacher_training": teacher.card.training,
        "data": config.data or (teacher.card.training or {}).get("data", {}),
        "n_grid": config.n_grid,
        **({"grid_sigma_max": config.sigma_max} if config.sigma_max is not None else {}),
        "target_decay": config.target_decay,
        "ema_decay": config.ema_decay,
        "steps": step,
        "batch_size": config.batch_size,
        "patch_size": config.patch_size,
        "lr": config.lr,
        "device": device,
        "wall_time_s": round(wall, 1),
        "final_train_loss": round(float(history[-1]["train_loss"]), 5) if history else None,
        "final_val_psnr": {k: v for k, v in final.items() if k.startswith("psnr@")},
        "parameters": n_params,
        "command": config.command,
        "seed": config.seed,
    }


def export_distill_checkpoint(ck: dict[str, Any], out: str | Path, half: bool = False) -> tuple[Path, Path]:
    """Export the EMA student of a (possibly running) distillation checkpoint ``ck`` as a prior."""
    from .registry import load_prior

    known = set(DistillConfig.__dataclass_fields__)
    config = DistillConfig(**{k: v for k, v in ck["config"].items() if k in known})
    teacher = load_prior(config.teacher)
    card = consistency_card(teacher, config)
    net = build_network({**card.architecture, "channels": card.channels})
    net.load_state_dict(ck["ema"])
    history = json.loads(ck["history"])
    final = history[-1] if history else {}
    card.training = _distill_record(
        teacher, config, int(ck["step"]), float(ck["wall"]), history, final, count_parameters(net), config.device
    )
    return save_prior(NetworkPrior(net, card), out, half=half)


def check_distill_config(config: DistillConfig, teacher: NetworkPrior) -> float:
    """Refuse settings a distillation run cannot use, before any work (the CLI calls it before building its pool).

    Parameters
    ----------
    config : DistillConfig
        The run's settings.
    teacher : NetworkPrior
        The diffusion prior (or, for consistency training, the template prior).

    Returns
    -------
    float
        The teacher schedule's σ_min, the bottom of the distillation grid.

    Raises
    ------
    ValueError
        An unknown mode, a teacher that is not EDM-parametrised, fewer than 2 grid levels, or a grid top at or below
        σ_min; each message says which.
    """
    if config.mode not in ("distillation", "training"):
        raise ValueError(f"mode must be 'distillation' or 'training' (consistency training), got {config.mode!r}")
    check_optimisation(config)  # 0 steps wrote the teacher under the consistency model's name
    if teacher.parametrisation != "edm":
        raise ValueError(
            f"consistency distillation needs an EDM-parametrised diffusion prior as teacher; "
            f"{teacher.card.name!r} is {teacher.parametrisation!r}"
        )
    if config.n_grid < 2:
        raise ValueError(f"the distillation grid needs at least 2 noise levels, got n_grid={config.n_grid}")
    sigma_min = float(getattr(teacher.schedule, "sigma_min", 0.002))
    if config.sigma_max is not None and not sigma_min < config.sigma_max:
        raise ValueError(f"the distillation grid's sigma_max ({config.sigma_max}) must be above the schedule's "
                         f"sigma_min ({sigma_min})")
    return sigma_min


def distill_consistency(
    teacher: NetworkPrior,
    config: DistillConfig,
    pool: ImagePool,
    out_dir: str | Path,
    resume: bool = True,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> NetworkPrior:
    """Distil ``teacher`` into a consistency model; export its EMA weights with a card.

    Parameters
    ----------
    teacher : NetworkPrior
        A trained diffusion (EDM/PFGM++) prior; its weights initialise the student.
    config : DistillConfig
        The run's settings.
    pool : ImagePool
        Training images in the teacher's model units.
    out_dir : str or Path
        Holds ``checkpoint.pt`` (resumable), ``history.json`` and ``<name>.safetensors`` + ``.json``.
    resume : bool
        Continue from ``checkpoint.pt`` when it exists.
    progress : bool
        Show a tqdm bar.

    Returns
    -------
    NetworkPrior
        The distilled consistency model (EMA weights), ``parametrisation == "consistency"``.
    """
    sigma_min = check_distill_config(config, teacher)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(config.device)
    torch.manual_seed(config.seed)
    teacher.to(device)
    teacher.network.requires_grad_(False).eval()
    card = consistency_card(teacher, config)
    net = build_network({**card.architecture, "channels": card.channels}).to(device)
    if config.mode == "distillation":
        net.load_state_dict(teacher.network.state_dict())
    target = copy.deepcopy(net).requires_grad_(False)
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=config.lr)
    student, target_prior, ema_prior = NetworkPrior(net, card), NetworkPrior(target, card), NetworkPrior(ema, card)
    sched = teacher.schedule
    grid = karras_grid(
        config.n_grid,
        sigma_min,
        float(config.sigma_max if config.sigma_max is not None else getattr(sched, "sigma_max_", 80.0)),
        float(getattr(sched, "rho", 7.0)),
    ).to(device, torch.float32)
    gen = torch.Generator().manual_seed(config.seed)
    state = RunState(out / "checkpoint.pt", {"net": net, "target": target, "ema": ema}, opt, gen, asdict(config))

    def same_teacher(saved: dict[str, Any]) -> None:
        if saved.get("teacher") != config.teacher:
            raise ValueError(f"{state.path} distils {saved.get('teacher')!r}, not {config.teacher!r}")

    if resume and state.load(same_teacher):
        log(f"resumed from {state.path} at step {state.step}")

    n_full = card.channels * card.resolution**2
    vgen = torch.Generator().manual_seed(12345)
    val = pool.batch(config.val_size, config.patch_size, vgen).to(device)
    val_noise = validation_noise(val, card.aug_dim, n_full, vgen).to(device)
    huber_c = config.huber_c * math.sqrt(card.channels * config.patch_size**2)
    log(
        f"{'distilling ' + teacher.card.name + ' into' if config.mode == 'distillation' else 'training'} "
        f"consistency model {config.name}: {count_parameters(net) / 1e6:.2f}M "
        f"parameters, grid N={config.n_grid}, target EMA μ={config.target_decay}, patches {config.patch_size}², "
        f"batch {config.batch_size}, device {device}, steps {state.step}→{config.steps}"
    )
    net.train()

    def one_step() -> torch.Tensor:
        x0 = pool.batch(config.batch_size, config.patch_size, gen)
        if config.augment:
            x0 = augment(x0, gen)
        x0 = x0.to(device)
        idx = torch.randint(0, config.n_grid - 1, (x0.shape[0],), generator=gen).to(device)
        s_lo, s_hi = grid[idx], grid[idx + 1]
        z = pfgmpp_noise(tuple(x0.shape), 1.0, card.aug_dim, n_full, gen).to(device)
        x_hi = x0 + s_hi.reshape(-1, 1, 1, 1) * z
        if config.mode == "distillation":
            x_lo = _teacher_heun(teacher, x_hi, s_hi, s_lo)
        else:  # consistency training: the one-sample estimate of the ODE step
            x_lo = x0 + s_lo.reshape(-1, 1, 1, 1) * z
        with torch.no_grad():
            y_target = target_prior.raw(x_lo, s_lo)
        weight = 1.0 / (s_hi - s_lo)
        loss = (weight * _pseudo_huber(student.raw(x_hi, s_hi) - y_target, huber_c)).mean() / weight.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), config.grad_clip)
        opt.step()
        ema_update(target, net, config.target_decay, state.step, warmup=False)
        ema_update(ema, net, config.ema_decay, state.step)
        return loss

    def describe(k: int, loss: float, v: dict[str, float]) -> str:
        psnrs = ", ".join(f"{key[5:]}: {v[key]:.2f}" for key in v if key.startswith("psnr@"))
        return f"step {k}: consistency loss {loss:.4f}; one-step PSNR {psnrs}"

    run_steps(
        state, one_step, config.steps, config.val_every, config.val_every,
        validate=lambda: validation_loss(ema_prior, val, val_noise), describe=describe,
        name=config.name, progress=progress, log=log,
    )
    final = state.history[-1] if state.history else validation_loss(ema_prior, val, val_noise)
    card.training = _distill_record(
        teacher, config, state.step, state.wall, state.history, final, count_parameters(net), str(device)
    )
    ema_prior.card = card
    save_prior(ema_prior, out / config.name)
    log(f"wrote {out / config.name}.safetensors and .json")
    return ema_prior
