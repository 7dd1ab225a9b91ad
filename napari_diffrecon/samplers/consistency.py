"""Few-step posterior sampling with a consistency model: the consistency map alternated with data steps.

The "hijacking" scheme used for posterior sampling with (Poisson-flow) consistency models (Hein et
al.; also Song et al. 2023's zero-shot inverse problems): at each of a handful of noise levels
``σ_0 > … > σ_{n−1}`` the consistency model jumps to the end of the ODE trajectory,
``x̂ = f_θ(u, σ_i)`` (one network evaluation), the data step pulls ``x̂`` towards the measurements
(the DDS step: CG on the proximal problem for Gaussian/transmission data, EM with a proximity term
for emission counts), and the result is re-noised to the next level with fresh noise,
``u ← x̃ + √(σ_{i+1}² − σ_min²) z``. One to four network evaluations in all; a hot start from a
classical reconstruction (``x_init``, ``t0``) is Hein et al.'s injection of the measured image at a
chosen noise index.

It runs with any prior. With a diffusion prior (not distilled) it is a few-step DDS with fresh
re-noising, the control that shows what the distillation adds.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch

from .base import Iterate, Problem, SamplerParams, run_loop, time_grid
from .datastep import params_data_step

__all__ = ["consistency", "consistency_grid"]


def consistency_grid(problem: Problem, params: SamplerParams) -> torch.Tensor:
    """The ``n_steps`` noise levels of a consistency run, then 0.

    The run enters at ``σ_start`` = the schedule's noise level at fraction ``t0`` of its full grid
    (``σ_max`` for ``t0 = 1``; hot starts inject the classical image there, whatever the step count, as
    Hein et al. inject the measured image at a fixed noise index) and visits a Karras grid (ρ = 7) from
    ``σ_start`` to ``σ_min`` with ``n_steps + 1`` levels, without the last (a jump from σ_min does nothing).
    Two steps from noise visit 80 and ≈ 2.5, close to the 80 → 0.66 of Song et al. (2023).
    """
    from dataclasses import replace

    from ..priors.schedules import EDMSchedule

    params.check()
    n = int(params.n_steps)
    fine = time_grid(problem.prior, replace(params, n_steps=1000, t0=1.0))[:-1]
    t0 = float(params.t0)
    start = float(fine[int(round((1.0 - t0) * (len(fine) - 1)))])
    sigma_min = float(fine[-1])
    grid = EDMSchedule(sigma_min=sigma_min, sigma_max_=start).sigmas(n + 1)
    return torch.cat([grid[:n], grid[-1:]])


def consistency(
    problem: Problem,
    params: SamplerParams,
    n_samples: int = 1,
    seed: int = 0,
    x_init: torch.Tensor | None = None,
    **kw: Any,
) -> Iterator[Iterate]:
    """Consistency-model posterior sampling in ``params.n_steps`` network evaluations (1–4 typical).

    Noise levels from :func:`consistency_grid`. Per step: ``x̂ = f(u, σ_i)``; ``cg_iters`` data steps with
    weight ``γ`` (``gamma / prior_weight``,
    live); re-noise to ``σ_{i+1}`` with fresh noise (the prior's kernel). The last step returns the
    data-consistent ``x̂``. ``params.t0 < 1`` with ``x_init`` starts from a classical image.
    """
    prior = problem.prior
    sigma_min = float(getattr(prior, "sigma_min", 0.002))

    def step(u, s, s_next, i, ctx):
        with torch.no_grad():
            x0 = problem.denoise(u, s, int(params.orientations))
        x0_dc = problem.to_model(params_data_step(problem, params, problem.to_image(x0), s))
        if s_next <= 0:
            return x0_dc, x0_dc, 1
        level = math.sqrt(max(s_next**2 - sigma_min**2, 0.0))
        z = prior.draw_noise(tuple(u.shape), level, ctx["generator"]).to(u.device, u.dtype)
        return x0_dc + z, x0_dc, 1

    return run_loop(problem, params, step, n_samples, seed, x_init, sigmas=consistency_grid(problem, params),
                    weights=("gamma",), **kw)
