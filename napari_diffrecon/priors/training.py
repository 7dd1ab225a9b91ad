"""Training a diffusion prior (denoising score matching) with EMA, validation, checkpoint/resume.

The loop is the review's Algorithm 1 in its EDM form (Karras et al. 2022): draw a noise level σ
from the schedule's training distribution, noise the image ``x_σ = x0 + σ z``, predict x0 (or the
noise, for VP ε-prediction), minimise the weighted squared error with Adam. Patches of
``patch_size`` are cut from larger images, so a fully convolutional U-Net trained on 64² patches
applies to whole 128²–256² images (patch diffusion).
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from .. import __version__
from .card import ModelCard
from .network import build_network, count_parameters
from .prior import NetworkPrior, save_prior
from .schedules import VPSchedule, get_schedule, pfgmpp_noise

__all__ = [
    "TrainConfig",
    "ImagePool",
    "train_prior",
    "augment",
    "VAL_SIGMAS",
    "export_checkpoint",
    "ema_update",
    "init_from_prior",
    "RunState",
    "run_steps",
    "validation_noise",
]

VAL_SIGMAS = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


@dataclass
class TrainConfig:
    """Everything that defines a training run (stored in the checkpoint and the model card)."""

    name: str = "prior"
    modality: str = "generic"
    channels: int = 1
    resolution: int = 128
    patch_size: int = 64
    arch: str = "small"
    parametrisation: str = "edm"
    schedule: str = "edm"
    sigma_data: float = 0.5
    aug_dim: float | None = None
    init_from: str = ""
    batch_size: int = 16
    lr: float = 2e-4
    lr_schedule: str = "constant"
    steps: int = 10_000
    ema_decay: float = 0.999
    val_every: int = 250
    ckpt_every: int = 250
    val_size: int = 16
    seed: int = 0
    device: str = "cpu"
    amp: bool = False
    augment: bool = True
    grad_clip: float = 1.0
    normalisation: dict[str, Any] = field(
        default_factory=lambda: {"kind": "affine", "native_units": "arbitrary", "offset": 0.0, "scale": 1.0}
    )
    data: dict[str, Any] = field(default_factory=dict)
    command: str = ""


class ImagePool:
    """A pool of training images (model units, ``(N, C, H, W)``) from which random patches are cut.

    Parameters
    ----------
    images : torch.Tensor
        Images already normalised to model units.
    refill : callable, optional
        ``refill(n, rng) -> Tensor`` giving fresh images; when given, a quarter of the pool is
        replaced every ``refresh_every`` draws (on-the-fly phantoms).
    refresh_count : int, optional
        How many images each refresh replaces (default: a quarter of the pool).
    """

    def __init__(
        self,
        images: torch.Tensor,
        refill: Callable[[int, np.random.Generator], torch.Tensor] | None = None,
        refresh_every: int = 50,
        seed: int = 0,
        refresh_count: int | None = None,
    ) -> None:
        if images.ndim != 4 or images.shape[0] == 0:
            raise ValueError(f"training images must be a non-empty (N, C, H, W) tensor, got {tuple(images.shape)}")
        if not torch.isfinite(images).all():
            raise ValueError("training images contain NaN or Inf")
        self.images = images.float()
        self.refill = refill
        self.refresh_every = refresh_every
        self.refresh_count = refresh_count
        self.rng = np.random.default_rng(seed)
        self._draws = 0

    def batch(self, n: int, patch: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` random patches of side ``patch`` (whole images when ``patch`` ≥ their size)."""
        self._draws += 1
        if self.refill is not None and self._draws % self.refresh_every == 0:
            k = self.refresh_count or max(1, self.images.shape[0] // 4)
            k = min(k, self.images.shape[0])
            idx = self.rng.choice(self.images.shape[0], size=k, replace=False)
            self.images[torch.as_tensor(idx)] = self.refill(k, self.rng).float()
        n_img, _, h, w = self.images.shape
        idx = torch.randint(0, n_img, (n,), generator=generator)
        if patch >= min(h, w):
            return self.images[idx].clone()
        ys = torch.randint(0, h - patch + 1, (n,), generator=generator)
        xs = torch.randint(0, w - patch + 1, (n,), generator=generator)
        crops = [self.images[i, :, y : y + patch, x : x + patch] for i, y, x in zip(idx, ys, xs, strict=True)]
        return torch.stack(crops)


def augment(
    x: torch.Tensor, generator: torch.Generator, max_rot_deg: float = 10.0, max_scale: float = 0.1
) -> torch.Tensor:
    """Random flips, small rotations and scalings (bilinear, reflection padding), per image."""
    n = x.shape[0]
    flip = torch.rand(n, generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    ang = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(max_rot_deg)
    sc = 1 + (torch.rand(n, generator=generator) * 2 - 1) * max_scale
    cos, sin = torch.cos(ang) / sc, torch.sin(ang) / sc
    theta = torch.stack([torch.stack([cos, -sin, torch.zeros(n)], 1), torch.stack([sin, cos, torch.zeros(n)], 1)], 1)
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _loss(prior: NetworkPrior, x0: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Per-image weighted denoising loss (EDM weighting, or ε-MSE for VP ε-prediction)."""
    s = sigma.reshape(-1, 1, 1, 1)
    x_t = x0 + s * noise
    x0_hat = prior.raw(x_t, sigma)
    if prior.parametrisation == "eps":
        eps_hat = (x_t - x0_hat) / s
        return ((eps_hat - noise) ** 2).flatten(1).mean(1)
    sd = prior.sigma_data
    weight = (s**2 + sd**2) / (s * sd) ** 2
    return (weight * (x0_hat - x0) ** 2).flatten(1).mean(1)


@torch.no_grad()
def validation_loss(prior: NetworkPrior, val: torch.Tensor, val_noise: torch.Tensor) -> dict[str, float]:
    """Loss and denoising PSNR at fixed noise levels on a fixed batch (deterministic)."""
    out = {}
    losses = []
    for i, s in enumerate(VAL_SIGMAS):
        sigma = torch.full((val.shape[0],), s, device=val.device)
        losses.append(float(_loss(prior, val, sigma, val_noise[i]).mean()))
        x0_hat = prior.raw(val + s * val_noise[i], sigma)
        mse = float(((x0_hat - val) ** 2).mean())
        out[f"psnr@{s}"] = round(10 * math.log10(4.0 / max(mse, 1e-12)), 3)  # peak-to-peak 2 in model units
    out["loss"] = float(np.mean(losses))
    return out


def _base_card(config: TrainConfig, schedule: Any) -> ModelCard:
    return ModelCard(
        name=config.name,
        modality=config.modality,
        channels=config.channels,
        resolution=config.resolution,
        architecture={"type": "diffusers.UNet2DModel", "preset": config.arch},
        parametrisation=config.parametrisation,
        schedule=schedule.to_dict(),
        sigma_data=config.sigma_data,
        aug_dim=config.aug_dim,
        normalisation=dict(config.normalisation),
        software_version=__version__,
    )


def _training_record(
    config: TrainConfig, step: int, wall: float, final: dict[str, Any], n_params: int, device: str
) -> dict[str, Any]:
    return {
        "data": config.data,
        "steps": step,
        "batch_size": config.batch_size,
        "patch_size": config.patch_size,
        "lr": config.lr,
        **({"lr_schedule": config.lr_schedule} if config.lr_schedule != "constant" else {}),
        "ema_decay": config.ema_decay,
        "device": device,
        "wall_time_s": round(wall, 1),
        "final_val_loss": round(float(final["loss"]), 5),
        "final_val_psnr": {k: v for k, v in final.items() if k.startswith("psnr@")},
        "parameters": n_params,
        "command": config.command,
        "seed": config.seed,
        **({"pfgmpp_aug_dim": config.aug_dim} if config.aug_dim else {}),
        **({"fine_tuned_from": config.init_from} if config.init_from else {}),
    }


def export_checkpoint(run_dir: str | Path, out: str | Path | None = None, half: bool = False,
                      average_with: str | Path | None = None, average_weight: float = 0.5) -> tuple[Path, Path]:
    """Export the EMA weights of a (possibly still running) training run as a prior.

    Parameters
    ----------
    run_dir : str or Path
        A ``train`` output folder holding ``checkpoint.pt``.
    out : str or Path, optional
        Output stem (default ``run_dir/<name>``); ``.safetensors`` and ``.json`` are written.
    half : bool
        Store the weights as float16 (shipped priors).
    average_with : str or Path, optional
        A prior (shipped name or card path) of the same architecture and units, typically the one the run was
        fine-tuned from: the exported weights are ``average_weight · run + (1 − average_weight) · that prior``
        (a weight average of two fine-tunes of one network, "model soup"). The card records it under
        ``training.weight_average`` with the other prior's training record.
    average_weight : float
        The run's share in ``(0, 1]``.

    Returns
    -------
    tuple of Path
        The weights and card paths.

    Raises
    ------
    FileNotFoundError
        When ``run_dir`` holds no checkpoint.
    ValueError
        For a share outside (0, 1], a prior of another kind to average with, averaging a consistency-distillation
        run, or averaging with the very files the export would overwrite.
    """
    run_dir = Path(run_dir)
    if average_with is not None and not 0.0 < average_weight <= 1.0:
        raise ValueError(f"the run's share in the average (--average-weight) must be in (0, 1], got {average_weight}")
    ck_path = run_dir / "checkpoint.pt"
    if not ck_path.exists():
        raise FileNotFoundError(f"{ck_path} not found: is {run_dir} a training output folder?")
    ck = torch.load(ck_path, map_location="cpu", weights_only=True)
    if "target" in ck:  # a consistency-distillation run
        from .consistency import export_distill_checkpoint

        if average_with is not None:
            raise ValueError("weight averaging is for diffusion priors, not a consistency-distillation run")
        cfg_name = ck["config"].get("name", "consistency")
        return export_distill_checkpoint(ck, out if out is not None else run_dir / cfg_name, half=half)
    known = set(TrainConfig.__dataclass_fields__)
    config = TrainConfig(**{k: v for k, v in ck["config"].items() if k in known})
    schedule = get_schedule(
        "vp-linear" if config.parametrisation == "eps" and config.schedule == "edm" else config.schedule
    )
    card = _base_card(config, schedule)
    net = build_network({**card.architecture, "channels": config.channels})
    net.load_state_dict(ck["ema"])
    history = json.loads(ck["history"])
    final = history[-1] if history else {"loss": float("nan")}
    n_params = count_parameters(net)
    card.training = _training_record(config, int(ck["step"]), float(ck["wall"]), final, n_params, config.device)
    stem = Path(out) if out is not None else run_dir / config.name
    if average_with is not None:
        other, weights, digest = _average_into(net, config, card, average_with, average_weight)
        if stem.with_suffix(".safetensors").resolve() == weights.resolve():
            raise ValueError(f"--average-with {str(average_with)!r} is the prior this export would overwrite: copy it "
                             "elsewhere first and average with the copy (a rerun would otherwise average with the "
                             "result)")
        card.training["weight_average"] = {"with": other.source, "with_weights_sha256": digest,
                                           "weight_of_this_run": float(average_weight),
                                           "with_training": other.card.training}
    return save_prior(NetworkPrior(net, card), stem, half=half)


def _average_into(
    net: torch.nn.Module, config: TrainConfig, card: ModelCard, other: str | Path, weight: float
) -> tuple[NetworkPrior, Path, str]:
    """``net ← weight · net + (1 − weight) · other`` in place.

    ``other`` must be the same kind of model as the run's ``card`` (architecture, channels, units, parametrisation,
    noise schedule, PFGM++ dimension): averaging a diffusion prior with a consistency model, say, is refused.
    Returns the other prior, its weights file and that file's SHA-256 (the card records both).
    """
    from ..io.bundle import file_sha256
    from .registry import load_prior, prior_path

    src = load_prior(other)
    what = f"average with {str(other)!r}"
    _check_compatible(src, config, what)
    for name in ("parametrisation", "schedule", "aug_dim", "sigma_data"):
        if getattr(src.card, name) != getattr(card, name):
            raise ValueError(f"cannot {what}: its {name} is {getattr(src.card, name)!r}, this run's "
                             f"{getattr(card, name)!r} (only two fine-tunes of one kind of model average)")
    weights = prior_path(other).with_suffix(".safetensors")
    digest = file_sha256(weights)  # the weights exist: load_prior read them
    theirs = src.network.state_dict()
    mine = net.state_dict()
    if set(theirs) != set(mine) or any(theirs[k].shape != mine[k].shape for k in mine):
        raise ValueError(f"cannot average with {str(other)!r}: its network's layers differ from this run's")
    with torch.no_grad():
        for k, v in mine.items():
            if v.is_floating_point():
                v.mul_(weight).add_(theirs[k].to(v.dtype), alpha=1.0 - weight)
    return src, weights, digest


def _check_compatible(src: NetworkPrior, config: TrainConfig, what: str, hint: bool = False) -> None:
    """Refuse a prior of another architecture, channel count or intensity normalisation than ``config``'s.

    ``hint`` adds the ``train`` flags that would match it (for ``--init``).
    """
    card = src.card
    if card.architecture.get("preset") != config.arch or card.channels != config.channels:
        advice = (f"; pass --arch {card.architecture.get('preset')} (and --complex for a 2-channel prior)"
                  if hint else "")
        raise ValueError(
            f"cannot {what}: it is a {card.architecture.get('preset')!r} U-Net with "
            f"{card.channels} channel(s), this run is {config.arch!r} with {config.channels}{advice}"
        )
    if any(card.normalisation.get(k) != config.normalisation.get(k) for k in ("offset", "scale")):
        raise ValueError(
            f"cannot {what}: its intensity normalisation {card.normalisation} differs "
            f"from this run's {config.normalisation} (pick the prior of the same modality)"
        )


def ema_update(ema: torch.nn.Module, net: torch.nn.Module, decay: float, step: int, warmup: bool = True) -> None:
    """EMA of ``net``'s weights into ``ema``; with ``warmup`` the decay is ``min(decay, (1+step)/(10+step))``."""
    with torch.no_grad():
        d = min(decay, (1 + step) / (10 + step)) if warmup else decay
        for pe, p in zip(ema.parameters(), net.parameters(), strict=True):
            pe.lerp_(p, 1 - d)
        for be, b in zip(ema.buffers(), net.buffers(), strict=True):
            be.copy_(b)


def init_from_prior(net: torch.nn.Module, config: TrainConfig, device: torch.device) -> NetworkPrior:
    """Copy the weights of the prior ``config.init_from`` (a shipped name or a path) into ``net``.

    The prior must have the same architecture, channels and intensity normalisation (fine-tuning,
    e.g. to a PFGM++ kernel or a consistency model, keeps the units of the data).
    """
    from .registry import load_prior

    src = load_prior(config.init_from, device)
    _check_compatible(src, config, f"start from {config.init_from!r}", hint=True)
    net.load_state_dict(src.network.state_dict())
    return src


def _atomic_save(obj: dict[str, Any], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class RunState:
    """A resumable optimisation run's modules, optimiser, random state and history, saved to one checkpoint.

    Parameters
    ----------
    path : Path
        ``checkpoint.pt`` (written atomically; ``history.json`` beside it).
    modules : dict of str to torch.nn.Module
        What is saved and restored by name (``net``, ``ema``, and e.g. a consistency ``target``).
    opt : torch.optim.Optimizer
        Its state travels with the checkpoint.
    generator : torch.Generator
        The run's random stream (restored on resume, so a resumed run draws what an unbroken one would).
    config : dict
        The run's settings, stored for ``export-prior`` and resume checks.
    """

    def __init__(
        self,
        path: Path,
        modules: dict[str, torch.nn.Module],
        opt: torch.optim.Optimizer,
        generator: torch.Generator,
        config: dict[str, Any],
    ) -> None:
        self.path, self.modules, self.opt, self.generator, self.config = path, modules, opt, generator, config
        self.step, self.history, self.wall = 0, [], 0.0

    def load(self, check: Callable[[dict[str, Any]], None] | None = None) -> bool:
        """Restore from ``path`` when it exists (``check(saved_config)`` may refuse it); True when resumed."""
        if not self.path.exists():
            return False
        ck = torch.load(self.path, map_location="cpu", weights_only=True)
        if check is not None:
            check(ck["config"])
        for name, module in self.modules.items():
            module.load_state_dict(ck[name])
        self.opt.load_state_dict(ck["opt"])
        self.generator.set_state(ck["generator"])
        self.step, self.history, self.wall = int(ck["step"]), json.loads(ck["history"]), float(ck["wall"])
        return True

    def save(self) -> None:
        """Write the checkpoint atomically and the history as JSON."""
        _atomic_save(
            {
                **{name: m.state_dict() for name, m in self.modules.items()},
                "opt": self.opt.state_dict(),
                "generator": self.generator.get_state(),
                "step": self.step,
                "history": json.dumps(self.history),
                "wall": self.wall,
                "config": self.config,
            },
            self.path,
        )
        (self.path.parent / "history.json").write_text(json.dumps(self.history, indent=1))


def run_steps(
    state: RunState,
    step_fn: Callable[[], torch.Tensor],
    total: int,
    val_every: int,
    ckpt_every: int,
    validate: Callable[[], dict[str, float]],
    describe: Callable[[int, float, dict[str, float]], str],
    name: str,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> None:
    """The loop shared by training and distillation: steps, timing, validation, checkpoints, progress, Ctrl-C.

    ``step_fn()`` makes one optimiser step and returns its loss; every ``val_every`` steps ``validate()``
    is recorded in the history (``describe(step, loss, validation)`` is logged without a progress bar);
    every ``ckpt_every`` steps, at the end and on KeyboardInterrupt the state is saved (a killed run
    loses at most one interval). A non-finite loss stops the run with advice.
    """
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=state.step, desc=name, unit="step", dynamic_ncols=True)
    t_last = time.perf_counter()
    try:
        while state.step < total:
            loss_val = float(step_fn().detach())
            state.step += 1
            now = time.perf_counter()
            state.wall += now - t_last
            t_last = now
            if not math.isfinite(loss_val):
                raise FloatingPointError(f"training loss became {loss_val} at step {state.step}: lower --lr")
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_val:.4f}")
            if state.step % val_every == 0 or state.step == total:
                v = validate()
                state.history.append({"step": state.step, "train_loss": loss_val, "wall_s": round(state.wall, 1), **v})
                if bar is None:
                    log(describe(state.step, loss_val, v))
            if state.step % ckpt_every == 0 or state.step == total:
                state.save()
    except KeyboardInterrupt:
        state.save()
        log(f"interrupted: checkpoint written at step {state.step}; run again to resume")
        raise
    finally:
        if bar is not None:
            bar.close()


LR_SCHEDULES = ("constant", "cosine")


def learning_rate(config: TrainConfig, step: int) -> float:
    """The learning rate of optimiser step ``step`` (0-based) of a run of ``config.steps`` steps.

    ``"constant"``: ``config.lr`` throughout. ``"cosine"``: annealed from ``config.lr`` at step 0 to 0 at the last step,
    ``lr · ½(1 + cos(π · step / steps))`` — the schedule of a fine-tune that should end settled (the shipped priors
    trained at a constant rate; their EMA of the last ~1000 steps is what they ship).
    """
    if config.lr_schedule == "constant":
        return float(config.lr)
    if config.lr_schedule == "cosine":
        return float(config.lr) * 0.5 * (1.0 + math.cos(math.pi * min(max(step, 0), config.steps) / config.steps))
    raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {config.lr_schedule!r}")


def validation_noise(
    val: torch.Tensor, aug_dim: float | None, data_dim: int, generator: torch.Generator
) -> torch.Tensor:
    """Fixed unit-σ noise for :func:`validation_loss`, one draw per level of VAL_SIGMAS, from the training kernel."""
    if aug_dim:
        return torch.stack([pfgmpp_noise(tuple(val.shape), 1.0, aug_dim, data_dim, generator) for _ in VAL_SIGMAS])
    return torch.randn((len(VAL_SIGMAS), *val.shape), generator=generator)


def check_optimisation(config: Any) -> None:
    """Refuse a step count or batch size below 1 and a learning rate that is not a positive number (a training or
    distillation config: ``steps``, ``batch_size``, ``lr``); each message names the setting."""
    from .._checks import check_number

    check_number("steps", config.steps, 1, integer=True)
    check_number("batch size", config.batch_size, 1, integer=True)
    check_number("learning rate", config.lr, 0.0, above=True)


def check_train_config(config: TrainConfig) -> None:
    """Refuse settings a training run cannot use, before any work (the CLI calls it before building its pool).

    Parameters
    ----------
    config : TrainConfig
        The run's settings.

    Raises
    ------
    ValueError
        A step count, batch size, patch size or validation interval below 1, a learning rate that is not a positive
        number, or an ``init_from`` prior that does not exist; each message says which.
    FileNotFoundError
        ``init_from`` names no shipped prior and no card file (with the list of shipped priors).
    """
    from .._checks import check_number
    from .registry import prior_path

    check_optimisation(config)  # 0 steps wrote an untrained prior
    check_number("patch size", config.patch_size, 8, integer=True)
    check_number("validation interval", config.val_every, 1, integer=True)
    if config.init_from and not prior_path(config.init_from).exists():  # an unknown name raises in prior_path
        raise FileNotFoundError(f"--init {config.init_from}: no such prior card")  # stops here, before the pool


def train_prior(
    config: TrainConfig,
    pool: ImagePool,
    out_dir: str | Path,
    resume: bool = True,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> NetworkPrior:
    """Train (or resume training) a prior and export its EMA weights with a model card.

    Parameters
    ----------
    config : TrainConfig
        The run's settings.
    pool : ImagePool
        Training images in model units.
    out_dir : str or Path
        Holds ``checkpoint.pt`` (resumable, loaded with ``weights_only=True``), ``history.json``
        and the exported ``<name>.safetensors`` + ``<name>.json``.
    resume : bool
        Continue from ``checkpoint.pt`` when it exists (a killed run loses at most one
        checkpoint interval).
    progress : bool
        Show a tqdm bar with loss and ETA.

    Returns
    -------
    NetworkPrior
        The EMA prior.
    """
    check_train_config(config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(config.device)
    torch.manual_seed(config.seed)
    schedule = get_schedule(
        "vp-linear" if config.parametrisation == "eps" and config.schedule == "edm" else config.schedule
    )
    if config.parametrisation == "eps" and not isinstance(schedule, VPSchedule):
        raise ValueError("ε-prediction training needs a VP schedule ('vp', 'vp-linear' or 'vp-cosine')")
    arch = {"type": "diffusers.UNet2DModel", "preset": config.arch}
    card = _base_card(config, schedule)
    net = build_network({**arch, "channels": config.channels}).to(device)
    if config.init_from:
        init_from_prior(net, config, device)
    ema = copy.deepcopy(net).requires_grad_(False)
    learning_rate(config, 0)  # an unknown schedule stops here, before any work
    opt = torch.optim.Adam(net.parameters(), lr=config.lr)
    prior = NetworkPrior(net, card)
    ema_prior = NetworkPrior(ema, card)
    gen = torch.Generator().manual_seed(config.seed)
    state = RunState(out / "checkpoint.pt", {"net": net, "ema": ema}, opt, gen, asdict(config))

    def same_network(saved: dict[str, Any]) -> None:
        if saved["arch"] != config.arch or saved["channels"] != config.channels:
            raise ValueError(
                f"{state.path} was written for arch={saved['arch']!r}, channels={saved['channels']}; "
                "use another output folder or the same settings"
            )

    if resume and state.load(same_network):
        log(f"resumed from {state.path} at step {state.step}")

    vgen = torch.Generator().manual_seed(12345)
    val = pool.batch(config.val_size, config.patch_size, vgen).to(device)
    n_full = config.channels * config.resolution**2
    val_noise = validation_noise(val, config.aug_dim, n_full, vgen).to(device)  # on the kernel the prior learns
    log(
        f"training {config.name}: {count_parameters(net) / 1e6:.2f}M parameters, {config.arch} U-Net, "
        f"{config.parametrisation}/{schedule.name}{f', PFGM++ D={config.aug_dim:g}' if config.aug_dim else ''}"
        f"{f', from {config.init_from}' if config.init_from else ''}, "
        f"patches {config.patch_size}², batch {config.batch_size}, "
        f"device {device}, steps {state.step}→{config.steps}"
    )

    use_amp = bool(config.amp)
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp and amp_dtype == torch.float16)
    net.train()

    def one_step() -> torch.Tensor:
        x0 = pool.batch(config.batch_size, config.patch_size, gen)
        if config.augment:
            x0 = augment(x0, gen)
        x0 = x0.to(device)
        sigma = schedule.sample_training_sigma(x0.shape[0], gen).to(device, torch.float32)
        if config.aug_dim:  # PFGM++ kernel at r = σ√D (unit σ here; _loss scales by σ)
            noise = pfgmpp_noise(tuple(x0.shape), 1.0, config.aug_dim, n_full, gen).to(device)
        else:
            noise = torch.randn(x0.shape, generator=gen).to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
            loss = _loss(prior, x0, sigma, noise).mean()
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(net.parameters(), config.grad_clip)
        for group in opt.param_groups:  # the step's rate (a resumed run continues the schedule where it stopped)
            group["lr"] = learning_rate(config, state.step)
        scaler.step(opt)
        scaler.update()
        ema_update(ema, net, config.ema_decay, state.step)
        return loss

    run_steps(
        state, one_step, config.steps, config.val_every, config.ckpt_every,
        validate=lambda: validation_loss(ema_prior, val, val_noise),
        describe=lambda k, loss, v: f"step {k}: train {loss:.4f} val {v['loss']:.4f}",
        name=config.name, progress=progress, log=log,
    )
    final = state.history[-1] if state.history else validation_loss(ema_prior, val, val_noise)
    card.training = _training_record(config, state.step, state.wall, final, count_parameters(net), str(device))
    ema_prior.card = card
    save_prior(ema_prior, out / config.name)
    log(f"wrote {out / config.name}.safetensors and .json")
    return ema_prior
