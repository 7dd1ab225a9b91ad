"""The samplers. Each is a generator ``sampler(problem, params, n_samples, seed, x_init) -> Iterate…``.

- ``ddim`` / ``ddpm`` / ``heun`` / ``euler``: unconditional, for checking a prior.
- ``song``: Song, Shen, Xing & Ermon (ICLR 2022), λ-weighted projection onto the noised
  measurement before the predictor and the corrector; ends with Tweedie + a hard projection.
- ``mcg``: Chung et al. (NeurIPS 2022), DPS-style manifold-constrained gradient then projection.
- ``dps``: Chung et al. (ICLR 2023), gradient of the un-squared data misfit through the denoiser.
- ``dds``: Chung, Lee & Ye (ICLR 2024), CG steps on the Tweedie estimate x0_hat, then a re-noise with η: exact
  DDIM or the DDS code's with the network's ε (``params.renoise``; EM steps with a proximity term for PET counts).
- ``consistency``: few-step sampling with a consistency model, the consistency map alternated with
  the DDS data step (:mod:`.consistency`).

Hot starts (CCDF) for any of them: pass ``x_init`` and ``params.t0 < 1``. DDS and DPS can adapt the prior to
the scan while sampling (LoRA, ``params.extra["adapt_steps"]`` > 0; :mod:`.adapt`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch

from ..physics.likelihoods import PoissonLikelihood
from .adapt import adapted_problem
from .base import (
    Iterate,
    Problem,
    SamplerParams,
    SamplingError,
    ddim_step,
    fresh_noise,
    renoise_step,
    run_loop,
)
from .consistency import consistency
from .datastep import (
    data_distance,
    draw_mode,
    draw_refusal,
    linear_measurement,
    normal_norm,
    params_data_step,
    poisson_prox_em,
    prior_shrinkage,
    pseudo_inverse,
)

__all__ = ["SAMPLERS", "ddim", "ddpm", "heun", "euler", "dds", "dps", "mcg", "song", "consistency",
           "langevin_corrector"]


def _denoise(problem: Problem, u: torch.Tensor, sigma: float, params: SamplerParams) -> torch.Tensor:
    with torch.no_grad():
        return problem.denoise(u, sigma, int(params.orientations))


# -- unconditional -----------------------------------------------------------------------------
def ddim(
    problem: Problem,
    params: SamplerParams,
    n_samples: int = 1,
    seed: int = 0,
    x_init: torch.Tensor | None = None,
    **kw: Any,
) -> Iterator[Iterate]:
    """Unconditional DDIM with stochasticity ``params.eta`` (η = 1: DDPM ancestral)."""

    def step(u, s, s_next, i, ctx):
        x0 = _denoise(problem, u, s, params)
        return ddim_step(u, x0, s, s_next, float(params.eta), ctx["generator"]), x0, 1

    return run_loop(problem, params, step, n_samples, seed, x_init, weights=(), **kw)


def ddpm(
    problem: Problem,
    params: SamplerParams,
    n_samples: int = 1,
    seed: int = 0,
    x_init: torch.Tensor | None = None,
    **kw: Any,
) -> Iterator[Iterate]:
    """Unconditional ancestral sampling (DDPM = DDIM with η = 1; ``params.eta`` is ignored, not changed)."""

    def step(u, s, s_next, i, ctx):
        x0 = _denoise(problem, u, s, params)
        return ddim_step(u, x0, s, s_next, 1.0, ctx["generator"]), x0, 1

    return run_loop(problem, params, step, n_samples, seed, x_init, weights=(), **kw)


def _edm_ode(problem, params, n_samples, seed, x_init, heun: bool, **kw):
    def step(u, s, s_next, i, ctx):
        x0 = _denoise(problem, u, s, params)
        d = (u - x0) / s
        u_next = u + (s_next - s) * d
        if heun and s_next > 0:
            x0_next = _denoise(problem, u_next, s_next, params)
            d2 = (u_next - x0_next) / s_next
            return u + (s_next - s) * 0.5 * (d + d2), x0_next, 2
        return u_next, x0 if s_next > 0 else u_next, 1

    return run_loop(problem, params, step, n_samples, seed, x_init, weights=(), **kw)


def heun(
    problem: Problem,
    params: SamplerParams,
    n_samples: int = 1,
    seed: int = 0,
    x_init: torch.Tensor | None = None,
    **kw: Any,
) -> Iterator[Iterate]:
    """EDM deterministic sampler (Karras et al. 2022, Algorithm 1): Heun's 2nd-order ODE steps."""
    return _edm_ode(problem, params, n_samples, seed, x_init, True, **kw)


def euler(
    problem: Problem,
    params: SamplerParams,
    n_samples: int = 1,
    seed: int = 0,
    x_init: torch.Tensor | None = None,
    **kw: Any,
) -> Iterator[Iterate]:
    """Probability-flow ODE with Euler steps."""
    return _edm_ode(problem, params, n_samples, seed, x_init, False, **kw)


# -- DDS ---------------------------------------------------------------------------------------
#: The Jacobian draw's per-sample RMS is capped at this multiple of the Gaussian model's error r(σ) (see below).
JACOBIAN_DRAW_CAP = 1.5


def _jacobian_draw(problem: Problem, params: SamplerParams, u: torch.Tensor, x0: torch.Tensor, sigma: float,
                   gen: torch.Generator, eps: float = 0.05) -> torch.Tensor:
    """A structured (heuristic) draw of x0 | x_σ: ``x0_hat + σ J ξ / √a``, one more network evaluation.

    ``J ξ`` is a finite-difference probe of the denoiser's Jacobian and ``a`` the Gaussian model's scalar gain
    (:func:`.datastep.prior_shrinkage`). Its covariance is ``σ² J² / a``: Tweedie's ``Cov(x0 | x_σ) = σ² J``
    exactly when ``J = a I`` (a Gaussian prior: the tests), otherwise larger where ``J > a`` (edges the denoiser
    passes through) and smaller where ``J < a``. At high σ a trained network's J is far from that (not even
    positive: the raw draw was ~90× the real x0_hat error at σ = 80 on the CT prior), so each sample's draw is
    capped at :data:`JACOBIAN_DRAW_CAP` × ``r(σ)``, the Gaussian model's expected error (in model units ``σ√a``);
    an isotropic Gaussian draw exceeds that cap with negligible probability. The probe needs the network in
    float32: the difference of two reduced-precision evaluations is mostly rounding.
    """
    refusal = draw_refusal("jacobian", counts=False, precision=getattr(problem.prior, "precision", "float32"))
    if refusal:
        raise SamplingError(refusal)
    a = prior_shrinkage(problem, sigma)
    xi = fresh_noise(u, gen)
    probe = _denoise(problem, u + eps * sigma * xi, sigma, params)
    delta = (probe - x0) / (eps * a**0.5)
    rms = delta.pow(2).mean(dim=tuple(range(1, delta.ndim)), keepdim=True).sqrt()
    cap = JACOBIAN_DRAW_CAP * sigma * a**0.5
    return x0 + delta * torch.clamp(cap / torch.clamp(rms, min=1e-30), max=1.0)


def dds(
    problem: Problem,
    params: SamplerParams,
    n_samples: int = 1,
    seed: int = 0,
    x_init: torch.Tensor | None = None,
    **kw: Any,
) -> Iterator[Iterate]:
    """Decomposed diffusion sampling: x0_hat → ``cg_iters`` data steps (weight γ) → re-noise (``params.renoise``).

    With ``cg_iters = 0`` (or γ = 0) and ``renoise = "ddim"`` this is exactly unconditional DDIM (with
    ``extra["posterior_draw"] = "jacobian"`` the prior's part is still drawn). With ``params.extra["adapt_steps"]``
    > 0 the denoiser is adapted to the measurement first (:func:`.adapt.adapted_problem`).
    ``extra["posterior_draw"]``: see :func:`.datastep.params_data_step`; the yielded x0_hat (and its residual) are
    then the draws'. ``renoise = "dds"`` re-noises with the network's ε̂ of x0_hat before any draw or data step.
    """

    def step(u, s, s_next, i, ctx):
        def dc(x_img, generator=ctx["generator"]):
            return params_data_step(problem, params, x_img, s, generator=generator)

        # adaptation fits the prior to the data step's *mean* (a deterministic target), never to a draw
        prob, k = adapted_problem(problem, params, ctx, u, s, i, refine=lambda x_img: dc(x_img, None))
        x0 = x0_net = _denoise(prob, u, s, params)
        if draw_mode(params.extra.get("posterior_draw")) == "jacobian":
            x0, k = _jacobian_draw(prob, params, u, x0, s, ctx["generator"]), k + 1
        x0_dc = problem.to_model(dc(problem.to_image(x0)))
        u_next = renoise_step(params.renoise, u, x0_net, x0_dc, s, s_next, float(params.eta), ctx["generator"])
        return u_next, x0_dc, 1 + k

    return run_loop(problem, params, step, n_samples, seed, x_init, weights=("gamma",), **kw)


# -- DPS / MCG ---------------------------------------------------------------------------------
def _guided_step(problem: Problem, params: SamplerParams, u, s, s_next, gen, project: bool, lam_factor: float = 1.0):
    """Shared DPS/MCG step: ancestral/DDIM step, minus ζ · ∇_u (data misfit through the denoiser)."""
    u_req = u.detach().requires_grad_(True)
    with torch.enable_grad():
        x0 = problem.denoise(u_req, s, int(params.orientations))
        dist = data_distance(problem, problem.to_image(x0))
        (grad,) = torch.autograd.grad(dist.sum(), u_req)  # per-sample: the sum never mixes samples
    x0 = x0.detach()
    u_next = ddim_step(u, x0, s, s_next, float(params.eta), gen)
    if s_next > 0:
        # The VP-coordinate DPS step −ζ∇_{x_t}‖·‖ written for u_σ = x_t/√ᾱ: divide by √(ᾱ_t ᾱ_{t−1}).
        # ζ is made dimensionless by the operator norm and the image scale.
        # A larger prior weight takes a smaller data step: ζ / prior_weight (as DDS's γ and Song's λ).
        norm = math.sqrt(normal_norm(problem)) * abs(problem.scale)
        vp = math.sqrt((1 + s**2) * (1 + s_next**2))
        u_next = u_next - float(params.zeta) / float(params.prior_weight) * vp / norm * grad
    if project and s_next > 0:
        u_next = _project(problem, params, u_next, s_next, gen, lam_factor)
    return u_next, x0


def _project(
    problem: Problem,
    params: SamplerParams,
    u: torch.Tensor,
    sigma: float,
    gen: torch.Generator,
    lam_factor: float = 1.0,
) -> torch.Tensor:
    """Song-style projection: ``x ← x + λ A⁺(ŷ_σ − A x)`` with ŷ_σ the measurement noised to level σ."""
    lam = float(params.lam) * lam_factor / float(params.prior_weight)
    if lam <= 0:
        return u
    lam = min(lam, 1.0)
    op = problem.operator
    with torch.no_grad():
        x = problem.to_image(u)
        noise_img = problem.to_image(fresh_noise(u, gen)) - problem.offset  # σ=1 image-unit noise
        # ŷ_σ − A x with ŷ_σ = m + σ A ξ, as one product: m − A(x − σ ξ)
        residual = linear_measurement(problem) - op.forward(x - sigma * noise_img)
        x = x + lam * pseudo_inverse(problem, residual, int(params.cg_iters))
        return problem.to_model(x)


def dps(
    problem: Problem,
    params: SamplerParams,
    n_samples: int = 1,
    seed: int = 0,
    x_init: torch.Tensor | None = None,
    **kw: Any,
) -> Iterator[Iterate]:
    """Diffusion posterior sampling (Chung et al. 2023): step ζ on ‖m − A x0_hat(x_t)‖ (Gaussian) or
    √deviance (Poisson/transmission), gradient through the network each step (2× cost per NFE).
    With ``params.extra["adapt_steps"]`` > 0 the denoiser is adapted to the measurement first (:mod:`.adapt`)."""

    def step(u, s, s_next, i, ctx):
        prob, k = adapted_problem(problem, params, ctx, u, s, i)
        u_next, x0 = _guided_step(prob, params, u, s, s_next, ctx["generator"], project=False)
        return u_next, x0, 1 + k

    return run_loop(problem, params, step, n_samples, seed, x_init, weights=("zeta",), **kw)


def mcg(
    problem: Problem,
    params: SamplerParams,
    n_samples: int = 1,
    seed: int = 0,
    x_init: torch.Tensor | None = None,
    **kw: Any,
) -> Iterator[Iterate]:
    """Manifold-constrained gradient (Chung et al. 2022): the DPS gradient step, then a λ-projection
    onto the noised measurement set (λ decreasing linearly from ``lam`` to 0.6·``lam``, as in their CT setting)."""

    def step(u, s, s_next, i, ctx):
        n = len(ctx["sigmas"]) - 1
        decay = 1.0 - 0.4 * i / max(n - 1, 1)  # λ_i = λ·(1 → 0.6), read live each step
        u_next, x0 = _guided_step(problem, params, u, s, s_next, ctx["generator"], project=True, lam_factor=decay)
        if s_next == 0:
            u_next = _final_projection(problem, params, x0)
        return u_next, (u_next if s_next == 0 else x0), 1

    return run_loop(problem, params, step, n_samples, seed, x_init, weights=("zeta", "lam"), **kw)


# -- Song et al. 2022 --------------------------------------------------------------------------
def _final_projection(problem: Problem, params: SamplerParams, x0: torch.Tensor) -> torch.Tensor:
    """Tweedie estimate followed by a hard (λ = 1) projection onto the measurements (noise-free).

    For emission counts a least-squares projection onto Poisson data amplifies the count noise
    without bound, so the Poisson analogue is used: ``cg_iters`` ML-EM iterations started at the
    Tweedie estimate (non-negative, monotone in the likelihood).
    """
    op = problem.operator
    with torch.no_grad():
        x = problem.to_image(x0)
        if isinstance(problem.likelihood, PoissonLikelihood):
            return problem.to_model(poisson_prox_em(problem, x, float("inf"), int(params.cg_iters)))
        x = x + pseudo_inverse(problem, linear_measurement(problem) - op.forward(x), int(params.cg_iters))
        return problem.to_model(x)


def langevin_corrector(u: torch.Tensor, score: torch.Tensor, z: torch.Tensor, snr: float) -> torch.Tensor:
    """One Langevin corrector step ``u + ε·score + √(2ε)·z`` with Song et al.'s step ``ε = 2 (snr ‖z‖/‖score‖)²``.

    The norms are taken per sample: the reference code averages them over the batch, which makes one posterior
    sample's step size depend on the others (and on how many were asked for).

    Parameters
    ----------
    u : torch.Tensor
        The iterates, ``(B, ...)``.
    score : torch.Tensor
        ∇ log p(u) at the current noise level, same shape.
    z : torch.Tensor
        Standard normal noise, same shape.
    snr : float
        The corrector's signal-to-noise ratio.

    Returns
    -------
    torch.Tensor
        The corrected iterates.
    """
    shape = (-1,) + (1,) * (u.ndim - 1)
    g_norm = score.flatten(1).norm(dim=1).reshape(shape)
    z_norm = z.flatten(1).norm(dim=1).reshape(shape)
    eps = 2 * (snr * z_norm / torch.clamp(g_norm, min=1e-12)) ** 2
    return u + eps * score + torch.sqrt(2 * eps) * z


def song(
    problem: Problem,
    params: SamplerParams,
    n_samples: int = 1,
    seed: int = 0,
    x_init: torch.Tensor | None = None,
    **kw: Any,
) -> Iterator[Iterate]:
    """Score-SDE predictor–corrector with λ-weighted data consistency (Song et al. 2022).

    Per step: project (λ) → ancestral predictor → project (λ) → Langevin corrector with
    signal-to-noise ``snr`` (skipped when ``snr = 0``). The last step returns Tweedie's estimate
    followed by a hard projection (λ = 1). The predictor uses the exact ancestral variance, so the
    sampler stays correct with tens of steps (Euler–Maruyama over-noises there). The score-SDE
    reference code runs the corrector *before* the predictor at each level; here it follows it, so
    the run has one corrector step at the last level instead of one at σ_max (the same count; no
    difference at the tuned ``snr = 0``).
    """

    def step(u, s, s_next, i, ctx):
        gen = ctx["generator"]
        u = _project(problem, params, u, s, gen)
        x0 = _denoise(problem, u, s, params)
        nfe = 1
        if s_next == 0:
            x_final = _final_projection(problem, params, x0)
            return x_final, x_final, nfe
        # Ancestral-sampling predictor (Song et al. 2021): mean u + (σ² − σ'²)·score, variance
        # σ'²(σ² − σ'²)/σ². Their reverse-diffusion (Euler–Maruyama) predictor adds σ² − σ'² instead,
        # which is the same with ~1000 steps but leaves excess noise in the sample with tens of steps.
        u = ddim_step(u, x0, s, s_next, 1.0, gen)
        u = _project(problem, params, u, s_next, gen)
        snr = float(params.snr)
        if snr > 0:
            x0c = _denoise(problem, u, s_next, params)
            nfe += 1
            u = langevin_corrector(u, (x0c - u) / s_next**2, fresh_noise(u, gen), snr)
        return u, x0, nfe

    return run_loop(problem, params, step, n_samples, seed, x_init, weights=("lam", "snr"), **kw)


SAMPLERS = {
    "ddim": ddim,
    "ddpm": ddpm,
    "heun": heun,
    "euler": euler,
    "dds": dds,
    "dps": dps,
    "mcg": mcg,
    "song": song,
    "consistency": consistency,
}
UNCONDITIONAL = ("ddim", "ddpm", "heun", "euler")


def get_sampler(name: str):
    """The sampler generator function for ``name``."""
    try:
        return SAMPLERS[name.lower()]
    except KeyError:
        raise SamplingError(f"unknown sampler {name!r}; use one of {', '.join(SAMPLERS)}") from None
