"""Test-time adaptation of the prior to the scan at hand (steerable conditional diffusion, Barbano et al. 2023).

A prior trained on one anatomy or contrast is steered towards the measured object while sampling: low-rank
adapters (:mod:`napari_diffrecon.priors.lora`) on the U-Net's conv/linear layers, base weights frozen, take a
few Adam steps on the measurement-consistency loss of the Tweedie estimate at the current state,

    L(θ) = deviance(m | A R(x0_hat(x_t; θ))) / N     (Gaussian: ‖A R(x0_hat) − m‖² / (σ² N)),

then the sampler's own step (DDS data step, DPS gradient) uses the adapted denoiser. ``R`` is the identity
(``adapt_target = "x0_hat"``) or, for DDS, its own data step differentiated through (``"data_step"``, what the
SCD authors' code does: the loss scores the image DDS will actually keep). The adapters persist
through the run (each step starts from the previous step's adapters, one Adam state per run) and are shared by
all posterior samples of the batch. The shipped prior is never modified: the adapters live on a deep copy made
when adaptation first runs, kept in the run's context and dropped with it.

Off by default. Switched on through ``SamplerParams.extra`` (read every step, like every live parameter):

``adapt_steps`` (int, 0 = off)
    Adam steps per adapted sampling step.
``adapt_lr`` (float, default 1e-3)
    Adam learning rate.
``lora_rank`` (int, default 4)
    Adapter rank (fixed once the adapters exist).
``adapt_every`` (int, default 1)
    Adapt at every k-th sampling step.
``adapt_start`` (float in [0, 1), default 0)
    Fraction of the run before adaptation starts (late steps are where x0_hat carries detail).
``adapt_target`` ("data_step" or "x0_hat", default "data_step")
    What the loss scores: the sampler's data-consistent estimate when it has a data step (DDS), else x0_hat.
``adapt_floor`` (float ≥ 0, default 0 = off)
    Discrepancy guard: a sampling step's Adam steps stop once the loss is at or below this value (1 = the noise
    level of Gaussian data: fitting further fits the noise).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .base import Problem, SamplerParams, SamplingError

__all__ = ["ADAPT_DEFAULTS", "AdaptConfig", "Adapter", "consistency_loss", "adapted_problem"]

ADAPT_DEFAULTS: dict[str, Any] = {
    "adapt_steps": 0,
    "adapt_lr": 1e-3,
    "lora_rank": 4,
    "adapt_every": 1,
    "adapt_start": 0.0,
    "adapt_target": "data_step",
    "adapt_floor": 0.0,
}
TARGETS = ("data_step", "x0_hat")


@dataclass(frozen=True)
class AdaptConfig:
    """The adaptation settings of one sampling step, read from ``SamplerParams.extra``.

    Attributes
    ----------
    steps : int
        Adam steps per adapted sampling step (0 = no adaptation).
    lr : float
        Adam learning rate.
    rank : int
        LoRA rank.
    every : int
        Adapt at every ``every``-th sampling step.
    start : float
        Fraction of the run before adaptation starts.
    target : str
        "data_step" (score the sampler's data-consistent estimate, when it has one) or "x0_hat".
    floor : float
        Stop a step's adaptation once the loss is ≤ ``floor`` (0 = never).
    """

    steps: int = 0
    lr: float = 1e-3
    rank: int = 4
    every: int = 1
    start: float = 0.0
    target: str = "data_step"
    floor: float = 0.0

    @classmethod
    def from_params(cls, params: SamplerParams) -> AdaptConfig:
        """Read and check ``params.extra`` (unset keys take :data:`ADAPT_DEFAULTS`).

        Raises
        ------
        SamplingError
            For a value out of range (negative steps, rank < 1, lr ≤ 0, every < 1, start outside [0, 1),
            unknown target, negative floor).
        """
        extra = {**ADAPT_DEFAULTS, **{k: v for k, v in (params.extra or {}).items() if k in ADAPT_DEFAULTS}}
        try:
            cfg = cls(
                steps=int(extra["adapt_steps"]),
                lr=float(extra["adapt_lr"]),
                rank=int(extra["lora_rank"]),
                every=int(extra["adapt_every"]),
                start=float(extra["adapt_start"]),
                target=str(extra["adapt_target"]),
                floor=float(extra["adapt_floor"]),
            )
        except (TypeError, ValueError) as e:
            raise SamplingError(f"bad adaptation setting in params.extra: {e}") from None
        if cfg.steps < 0:
            raise SamplingError(f"adapt_steps must be ≥ 0 (0 = off), got {cfg.steps}")
        if cfg.steps and not (math.isfinite(cfg.lr) and cfg.lr > 0):
            raise SamplingError(f"adapt_lr must be a positive number, got {cfg.lr}")
        if cfg.rank < 1:
            raise SamplingError(f"lora_rank must be ≥ 1, got {cfg.rank}")
        if cfg.every < 1:
            raise SamplingError(f"adapt_every must be ≥ 1, got {cfg.every}")
        if not 0 <= cfg.start < 1:
            raise SamplingError(f"adapt_start must be in [0, 1), got {cfg.start}")
        if not (math.isfinite(cfg.floor) and cfg.floor >= 0):
            raise SamplingError(f"adapt_floor must be a number ≥ 0 (0 = off), got {cfg.floor}")
        if cfg.target not in TARGETS:
            raise SamplingError(f"adapt_target must be one of {', '.join(TARGETS)}, got {cfg.target!r}")
        return cfg

    def due(self, i: int, n: int) -> bool:
        """Whether sampling step ``i`` of ``n`` adapts."""
        first = int(math.floor(self.start * n))
        return self.steps > 0 and i >= first and (i - first) % self.every == 0


def consistency_loss(problem: Problem, x0_model: torch.Tensor) -> torch.Tensor:
    """Per-sample measurement-consistency loss of Tweedie estimates ``x0_model`` (model units), differentiable.

    The likelihood's deviance per datum (:func:`napari_diffrecon.tuning.holdout_deviance`): Gaussian
    ``‖A x − m‖² / (σ² N)`` (≈ 1 at the noise level), emission/transmission counts
    ``2 Σ [m log(m/ȳ) − (m − ȳ)] / N``.
    """
    from ..tuning import holdout_deviance

    return holdout_deviance(problem.operator, problem.to_image(x0_model), problem.measurement, problem.likelihood)


@dataclass
class Adapter:
    """LoRA adapters on a private copy of the problem's prior, and the Adam state that trains them.

    Parameters
    ----------
    base_problem : Problem
        The run's problem; its prior must be a network prior (it has a ``network``). It is not modified:
        :attr:`problem` is a shallow copy whose prior is the adapted copy.
    rank : int
        LoRA rank.
    lr : float
        Initial Adam learning rate (changed live by :meth:`step`).
    seed : int
        Seed of the adapters' initialisation.

    Attributes
    ----------
    problem : Problem
        The problem to sample with: same measurement, operator and caches, adapted prior.
    parameters : list of torch.nn.Parameter
        The adapter weights (the only trainable ones of the copy).
    optimizer : torch.optim.Adam
        Their optimiser, kept for the whole run.
    losses : list of float
        The consistency loss before every Adam step so far (batch mean).
    n_adapted : int
        Sampling steps that adapted.
    """

    base_problem: Problem
    rank: int = 4
    lr: float = 1e-3
    seed: int = 0
    problem: Problem = field(init=False)
    parameters: list[torch.nn.Parameter] = field(init=False, repr=False)
    optimizer: torch.optim.Optimizer = field(init=False, repr=False)
    losses: list[float] = field(default_factory=list, init=False, repr=False)
    n_adapted: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        from ..priors.lora import lora_copy, lora_parameters

        prior = self.base_problem.prior
        net = getattr(prior, "network", None)
        if not isinstance(net, torch.nn.Module):
            raise SamplingError(
                f"test-time adaptation needs a network prior, not {type(prior).__name__}; set adapt_steps to 0"
            )
        adapted_net, _ = lora_copy(net, self.rank, seed=self.seed)
        adapted_prior = copy.copy(prior)  # shares the card/schedule; its network is the adapted copy
        precision = getattr(prior, "precision", None)  # this run's (a NetworkPrior's precision is per thread)
        adapted_prior.network = adapted_net
        if precision is not None:
            adapted_prior.precision = precision
        self.problem = copy.copy(self.base_problem)
        self.problem.prior = adapted_prior
        self.parameters = lora_parameters(adapted_net)
        self.optimizer = torch.optim.Adam(self.parameters, lr=float(self.lr))

    def loss(
        self, u: torch.Tensor, sigma: float, refine: Callable[[torch.Tensor], torch.Tensor] | None = None,
        orientations: int = 1,
    ) -> torch.Tensor:
        """Batch-mean consistency loss of the adapted denoiser's estimate at state ``u`` (differentiable).

        ``refine`` (image units → image units, differentiable) is applied to the estimate first (DDS's data step).
        ``orientations``: each sample is denoised in the orientation it is sampled in (:func:`.base.oriented_denoise`),
        so the adapters learn from the views they are then used on.
        """
        x0 = self.problem.denoise(u, sigma, orientations)
        if refine is not None:
            x0 = self.problem.to_model(refine(self.problem.to_image(x0)))
        return consistency_loss(self.problem, x0).mean()

    def step(
        self,
        u: torch.Tensor,
        sigma: float,
        n_steps: int,
        lr: float | None = None,
        refine: Callable[[torch.Tensor], torch.Tensor] | None = None,
        floor: float = 0.0,
        orientations: int = 1,
    ) -> list[float]:
        """Up to ``n_steps`` Adam steps on the consistency loss at state ``u`` (noise level σ); returns the losses.

        Each loss is measured before its step (so the returned list shows the descent). ``refine`` as for
        :meth:`loss`, and ``orientations``. Stops without stepping once the loss is ≤ ``floor`` (the last loss is then
        that one).
        """
        if lr is not None:
            for g in self.optimizer.param_groups:
                g["lr"] = float(lr)
        u = u.detach()
        out: list[float] = []
        with torch.enable_grad():
            for _ in range(int(n_steps)):
                self.optimizer.zero_grad(set_to_none=True)
                loss = self.loss(u, sigma, refine, orientations)
                if not torch.isfinite(loss):
                    raise SamplingError(
                        f"the adaptation loss became {float(loss)} at σ = {sigma:.3g}; lower adapt_lr ({lr})"
                    )
                out.append(float(loss.detach()))
                if out[-1] <= floor:
                    break
                loss.backward()
                self.optimizer.step()
        self.losses.extend(out)
        self.n_adapted += 1
        return out


def adapted_problem(
    problem: Problem,
    params: SamplerParams,
    ctx: dict[str, Any],
    u: torch.Tensor,
    sigma: float,
    i: int,
    refine: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[Problem, int]:
    """The samplers' hook: adapt the prior for step ``i`` when due; return the problem to use and extra NFE.

    ``refine`` is the sampler's data step (image units, differentiable), scored by the loss when
    ``adapt_target`` is "data_step"; samplers without one (DPS) pass None and x0_hat is scored.

    With adaptation off (``adapt_steps`` 0 and never on in this run) this returns ``(problem, 0)`` untouched.
    The adapter is created on the first adapted step and kept in ``ctx["adapter"]`` for the rest of the run
    (setting ``adapt_steps`` back to 0 mid-run keeps the adapted prior and stops training it).
    """
    cfg = AdaptConfig.from_params(params)
    adapter: Adapter | None = ctx.get("adapter")
    n = len(ctx["sigmas"]) - 1
    if not cfg.due(i, n):
        return (adapter.problem if adapter is not None else problem), 0
    if adapter is None:
        adapter = Adapter(problem, rank=cfg.rank, lr=cfg.lr)
        ctx["adapter"] = adapter
    losses = adapter.step(u, sigma, cfg.steps, cfg.lr, refine if cfg.target == "data_step" else None, cfg.floor,
                          int(params.orientations))
    return adapter.problem, len(losses)  # forward passes made (fewer than adapt_steps when the floor stopped it)
