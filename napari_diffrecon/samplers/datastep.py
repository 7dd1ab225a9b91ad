"""Data-consistency steps shared by the samplers (image units): CG proximal steps, pseudo-inverse
projections, Poisson EM steps, and the likelihood "distance" that DPS/MCG differentiate.

One place for each: DDS's CG step, Song/MCG's projection and PET's EM step are all here, and the
conjugate gradient itself is the project's one CG (:func:`napari_diffrecon.baselines.cg.conjugate_gradient`).
"""

from __future__ import annotations

from typing import Any

import torch

from ..baselines.cg import conjugate_gradient
from ..baselines.em import view_subsets
from ..physics.likelihoods import PoissonLikelihood, TransmissionLikelihood
from ..physics.noise import post_log
from .base import Problem, SamplerParams, SamplingError

__all__ = [
    "normal_norm",
    "linear_measurement",
    "back_projected_data",
    "data_noise_sigma",
    "prior_error",
    "prior_shrinkage",
    "data_weight",
    "proximal_cg",
    "pseudo_inverse",
    "poisson_prox_em",
    "data_distance",
    "data_step",
    "params_data_step",
    "DRAW_MODES",
    "draw_mode",
    "draw_refusal",
]


def normal_norm(problem: Problem, n_iter: int = 20) -> float:
    """Largest eigenvalue of ``AᴴA`` (power iteration; cached on the problem)."""
    cached = getattr(problem, "_normal_norm", None)
    if cached is not None:
        return cached
    g = torch.Generator().manual_seed(0)
    op = problem.operator
    x = torch.randn(op.image_shape, generator=g).to(op.device, op.image_dtype)
    lam = 1.0
    for _ in range(n_iter):
        y = op.normal(x)
        lam = float(y.abs().pow(2).sum().sqrt())
        x = y / max(lam, 1e-30)
    problem._normal_norm = lam
    return lam


def _cached(problem: Problem, name: str, make: Any) -> Any:
    """``make()`` cached on the problem under ``name`` for its current measurement tensor: recomputed when
    ``problem.measurement`` is another tensor or was changed in place (its version counter moved)."""
    m = problem.measurement
    try:
        version = m._version
    except RuntimeError:  # an inference-mode tensor has no version counter: trust the identity alone
        version = None
    cached = getattr(problem, name, None)
    if cached is not None and cached[0] is m and cached[1] == version:
        return cached[2]
    value = make()
    setattr(problem, name, (m, version, value))
    return value


def _pwls(problem: Problem) -> tuple[torch.Tensor, torch.Tensor]:
    """Post-log sinogram and normalised statistical weights for transmission data (cached)."""

    def make() -> tuple[torch.Tensor, torch.Tensor]:
        lik = problem.likelihood
        line = post_log(problem.measurement, lik.I0, lik.background)
        w = torch.clamp(problem.measurement - lik.background, min=0.5)
        return line, w / w.mean()

    return _cached(problem, "_pwls", make)


def back_projected_data(problem: Problem) -> torch.Tensor:
    """``Aᴴ W m``: the data step's back-projected measurement (``W`` the PWLS weights for transmission counts,
    else ``I``), cached on the problem — it is the same at every step, and one adjoint of a 180-view CT or a
    multi-coil MRI operator is not free. Recomputed if ``problem.measurement`` is replaced or changed in place.
    """

    def make() -> torch.Tensor:
        if isinstance(problem.likelihood, TransmissionLikelihood):
            line, w = _pwls(problem)
            return problem.operator.adjoint(line * w)
        return problem.operator.adjoint(problem.measurement)

    return _cached(problem, "_back_projected", make)


def linear_measurement(problem: Problem) -> torch.Tensor:
    """The measurement in the operator's linear domain, what projections ``x + A⁺(m − A x)`` compare with.

    Gaussian data as they are; transmission counts as the post-log sinogram ``−log((m − b)/I0)``;
    emission counts minus their mean background (an unbiased estimate of ``A x``).
    """
    lik = problem.likelihood
    if isinstance(lik, TransmissionLikelihood):
        return _pwls(problem)[0]
    if isinstance(lik, PoissonLikelihood):
        return problem.measurement - lik.background
    return problem.measurement


def data_noise_sigma(problem: Problem) -> float:
    """Standard deviation of the data noise in the domain of the CG data step.

    Gaussian: the likelihood's σ. Transmission counts: the post-log PWLS form weighs bin ``i`` by
    ``c_i / mean(c)``, so the effective σ is ``1/√mean(c)`` (post-log variance ≈ 1/counts).
    """
    lik = problem.likelihood
    if isinstance(lik, TransmissionLikelihood):
        counts = torch.clamp(problem.measurement - lik.background, min=0.5)
        return float(counts.mean()) ** -0.5
    return float(getattr(lik, "sigma", 1.0))


def prior_error(problem: Problem, sigma: float) -> float:
    """Expected error of the Tweedie estimate at noise level σ, in image units.

    ``σ σ_d / √(σ² + σ_d²)`` (the MMSE error of a Gaussian prior with the network's σ_data),
    times the image scale: ≈ σ at low noise, ≈ σ_d at high noise.
    """
    sd = _sigma_data(problem)
    return abs(problem.scale) * sigma * sd / (sigma**2 + sd**2) ** 0.5


def _sigma_data(problem: Problem) -> float:
    """The Gaussian error model's σ_d: the network's σ_data, or a Gaussian prior's σp (model units)."""
    return float(getattr(problem.prior, "sigma_data", None) or getattr(problem.prior, "sigma_p", 0.5))


def prior_shrinkage(problem: Problem, sigma: float) -> float:
    """``σ_d² / (σ_d² + σ²)``: the Gaussian error model's denoiser gain ∂x0_hat/∂x_σ (its Jacobian, a scalar)."""
    sd = _sigma_data(problem)
    return sd**2 / (sd**2 + sigma**2)


def data_weight(problem: Problem, gamma: float, sigma: float) -> float:
    """The DDS weight ``γ̃ = γ · r(σ)² / σ_y²`` of ``AᴴA`` in ``(I + γ̃ AᴴA) x = x0_hat + γ̃ Aᴴm``.

    ``γ = 1`` is the Bayesian weighting of a Gaussian proximal step: the prior's uncertainty
    about x0_hat (:func:`prior_error`) against the data noise (:func:`data_noise_sigma`), so the
    data dominate early (large σ) and the prior late (small σ) without per-task tuning.
    """
    if gamma == float("inf"):
        return gamma
    return float(gamma) * prior_error(problem, sigma) ** 2 / max(data_noise_sigma(problem), 1e-30) ** 2


def _gauss(shape: tuple[int, ...], like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Standard normal noise shaped ``shape`` with ``like``'s dtype and device; complex: N(0, 1) per part."""
    if like.is_complex():
        parts = torch.randn((*shape, 2), generator=generator, dtype=like.real.dtype)
        return torch.view_as_complex(parts).to(like.device)
    return torch.randn(shape, generator=generator, dtype=like.dtype).to(like.device)


def proximal_cg(
    problem: Problem,
    x0_hat: torch.Tensor,
    gamma: float,
    n_iter: int,
    sigma: float = 1.0,
    generator: torch.Generator | None = None,
    draw_prior: bool = True,
) -> torch.Tensor:
    """DDS data step: ``M`` CG iterations on ``(I + γ̃ AᴴWA) x = x0_hat + γ̃ AᴴW m``, started at x0_hat.

    ``γ̃ = γ r(σ)²/σ_y²`` (:func:`data_weight`); ``γ = inf`` solves the noise-free normal equations
    ``AᴴA x = Aᴴm`` from x0_hat (M iterations of early-stopped CG, as in the DDS paper).
    For transmission counts the data term is the penalised-weighted-least-squares form on the
    post-log sinogram with weights ∝ counts.

    With a ``generator`` (finite γ) the step returns a *draw* from that Gaussian instead of its mean
    (perturb-then-optimise): the same system with ``x0_hat + r ξ₁`` and ``m + σ_y/√(γ w) ξ₂`` on the right,
    ``ξ`` standard normal per sample, solves to ``N(mean, (I/r² + γ AᴴWA/σ_y²)⁻¹)`` — the posterior of x0 given
    x_t and m under the Gaussian error model. Fed to the DDIM/DDPM bridge in place of the mean, this samples
    ``p(x_σ' | x_σ, m)`` exactly for an isotropic Gaussian prior whose σ is the one :func:`prior_error` uses, with
    a converged CG, at any step size, from pure noise (a hot start is not a draw of x_σ | m). The mean alone loses
    the variance of x0 | x_σ, m at every step: 20 % of the posterior variance with 50 steps
    (``benchmarks/exactness.py``).
    ``draw_prior=False`` perturbs only ``m`` (x0_hat is already a draw: the ``"jacobian"`` mode of
    :func:`params_data_step`).
    """
    if n_iter <= 0 or gamma <= 0:
        return x0_hat
    op = problem.operator
    if isinstance(problem.likelihood, TransmissionLikelihood):
        m, w = _pwls(problem)
    else:
        m, w = problem.measurement, None

    def a_h_w(r: torch.Tensor) -> torch.Tensor:
        return op.adjoint(r if w is None else r * w)

    g = data_weight(problem, gamma, sigma)
    a_h_w_m = back_projected_data(problem)
    if generator is not None and g != float("inf") and g > 0:
        batch = tuple(x0_hat.shape[: x0_hat.ndim - len(op.image_shape)])
        if draw_prior:
            x0_hat = x0_hat + prior_error(problem, sigma) * _gauss(tuple(x0_hat.shape), x0_hat, generator)
        scale = data_noise_sigma(problem) / float(gamma) ** 0.5
        noise = scale * _gauss(batch + tuple(m.shape), m, generator)
        a_h_w_m = a_h_w_m + op.adjoint(noise if w is None else noise * torch.sqrt(w))  # Aᴴ W (m + noise/√w)
    if g == float("inf"):
        return conjugate_gradient(
            lambda v: a_h_w(op.forward(v)),
            a_h_w_m.expand_as(x0_hat),
            x0=x0_hat,
            n_iter=n_iter,
            n_core_dims=len(op.image_shape),
        )
    if g > 1:  # the same system divided by γ̃ (CG's iterates and its relative stop do not change): float32 holds it
        # for any finite γ (γ = 1e20 overflowed in γ̃ Aᴴm and the run ignored the data), tending to γ = inf's
        return conjugate_gradient(lambda v: v / g + a_h_w(op.forward(v)), x0_hat / g + a_h_w_m, x0=x0_hat,
                                  n_iter=n_iter, n_core_dims=len(op.image_shape))
    rhs = x0_hat + g * a_h_w_m
    return conjugate_gradient(
        lambda v: v + g * a_h_w(op.forward(v)), rhs, x0=x0_hat, n_iter=n_iter, n_core_dims=len(op.image_shape)
    )


def pseudo_inverse(problem: Problem, r: torch.Tensor, n_iter: int) -> torch.Tensor:
    """``A⁺ r`` by CG on ``AᴴA δ = Aᴴ r`` from 0 (exact in one step for single-coil MRI and inpainting)."""
    op = problem.operator
    return conjugate_gradient(
        op.normal, op.adjoint(r), x0=None, n_iter=max(int(n_iter), 1), n_core_dims=len(op.image_shape)
    )


def _em_subsets(problem: Problem, n_subsets: int) -> list[tuple[Any, Any, torch.Tensor, torch.Tensor]] | None:
    """Interleaved view subsets ``(operator_j, likelihood_j, m_j, Aⱼᵀ1)`` of a CT/PET problem, cached on it."""
    op = problem.operator
    if n_subsets <= 1 or not hasattr(op, "subset"):
        return None
    n_subsets = min(int(n_subsets), int(op.data_shape[-1]))
    cache = problem.__dict__.setdefault("_em_subset_cache", {})
    if n_subsets not in cache:
        cache[n_subsets] = [(op_j, problem.likelihood.subset(idx), problem.measurement[..., idx], sens_j)
                            for idx, op_j, sens_j in view_subsets(op, n_subsets)]
    return cache[n_subsets]


def poisson_prox_em(
    problem: Problem, x0_hat: torch.Tensor, gamma: float, n_iter: int, sigma: float = 1.0, subsets: int = 1
) -> torch.Tensor:
    """PET data step: EM iterations for ``max L(m|x) − β/2 ‖x − x0_hat‖²``, x ≥ 0 (De Pierro's closed form).

    Each iteration solves per pixel ``β x² + (s − β x0_hat) x − s x_em = 0`` (positive root), with
    ``s = Aᵀ1`` and ``x_em`` the MLEM update: monotone in the penalised likelihood and never
    negative. ``β = 1 / (γ r(σ)²)`` with ``r(σ)`` the Tweedie estimate's expected error
    (:func:`prior_error`), so γ = 1 is the Bayesian weighting, as for the CG step.

    ``subsets = S > 1`` (operators with view subsets: CT/PET) makes the ``n_iter`` iterations ordered-subsets
    ones (OS-De Pierro): iteration ``k`` uses the views ``k mod S`` (interleaved), its EM update and
    ``s ≈ S·Aⱼᵀ1`` — each costs 1/S of a full iteration, so ``n_iter = S`` costs one forward and one adjoint
    instead of ``n_iter``, for about the same progress early on (the OSEM speed-up); not monotone.
    """
    if n_iter <= 0 or gamma <= 0:
        return torch.clamp(x0_hat, min=0)
    op, lik = problem.operator, problem.likelihood
    sens = getattr(problem, "_sens", None)
    if sens is None:
        sens = op.adjoint(torch.ones(op.data_shape, device=op.device, dtype=op.dtype))
        problem._sens = sens
    beta = 1.0 / (gamma * max(prior_error(problem, sigma), 1e-30) ** 2) if gamma != float("inf") else 0.0
    prior_img = torch.clamp(x0_hat, min=0)  # the start, and the optimum where no view sees a pixel
    x = prior_img + 1e-6 * abs(problem.scale)
    parts = _em_subsets(problem, subsets)
    for k in range(int(n_iter)):
        if parts is None:
            s, ybar = sens, lik.mean(op.forward(x))
            x_em = x * op.adjoint(problem.measurement / ybar) / torch.clamp(s, min=1e-12)
        else:
            op_j, lik_j, m_j, s_j = parts[k % len(parts)]
            x_em = x * op_j.adjoint(m_j / lik_j.mean(op_j.forward(x))) / torch.clamp(s_j, min=1e-12)
            s = len(parts) * s_j
        if beta == 0:
            x = x_em
            continue
        b = s - beta * x0_hat  # centred on x0_hat itself (not its clamp): the root stays ≥ 0 for any b
        x_new = (-b + torch.sqrt(b**2 + 4 * beta * s * x_em)) / (2 * beta)
        # unseen pixels: the prior's value (exact EM: never seen) or the last iterate (a subset that misses them)
        x = torch.where(s > 0, x_new, prior_img if parts is None else x)
    return x


def data_distance(problem: Problem, x: torch.Tensor) -> torch.Tensor:
    """Per-sample data misfit that DPS/MCG differentiate (the *un-squared* norm, as in DPS's code).

    Gaussian: ``‖A x − m‖``. Poisson and transmission counts: the deviance
    ``D = 2 Σ [m log(m/ȳ) − (m − ȳ)]`` rescaled so its gradient with respect to ``A x`` has the
    size of the Gaussian one (about 1): ``√(c̄ D)`` for emission counts and ``√(D / c̄)`` for
    transmission counts, ``c̄`` the mean measured count. Without it ζ would need retuning by
    ``√c̄`` (~100× for low-dose CT). The likelihood's input is clamped ≥ 0 for PET (clamp the input
    of the likelihood, never the iterate).
    """
    op, lik, m = problem.operator, problem.likelihood, problem.measurement
    if isinstance(lik, PoissonLikelihood):
        x = torch.clamp(x, min=0)
    ax = op.forward(x)
    n_core = len(op.data_shape)
    if isinstance(lik, (PoissonLikelihood, TransmissionLikelihood)):
        ybar = lik.mean(ax)
        mlogm = torch.where(m > 0, m * torch.log(torch.clamp(m, min=1e-12) / ybar), torch.zeros_like(m))
        dev = 2 * (mlogm - (m - ybar))
        c_mean = max(float(m.mean()), 1e-6)
        factor = c_mean if isinstance(lik, PoissonLikelihood) else 1.0 / c_mean
        return torch.sqrt(torch.clamp(factor * dev.sum(dim=tuple(range(dev.ndim - n_core, dev.ndim))), min=1e-12))
    r = ax - m
    r2 = r.real**2 + r.imag**2 if r.is_complex() else r**2
    return torch.sqrt(r2.sum(dim=tuple(range(r2.ndim - n_core, r2.ndim))) + 1e-20)


def data_step(
    problem: Problem,
    x0_hat: torch.Tensor,
    gamma: float,
    n_iter: int,
    sigma: float = 1.0,
    em_subsets: int = 1,
    generator: torch.Generator | None = None,
    draw_prior: bool = True,
) -> torch.Tensor:
    """The modality's data step on a Tweedie estimate at noise level σ: EM for Poisson counts, CG otherwise.

    ``em_subsets`` > 1 makes the EM iterations ordered-subsets ones (:func:`poisson_prox_em`). A ``generator``
    makes the CG step a posterior draw (:func:`proximal_cg`); the EM step has no Gaussian form and ignores it.
    """
    if isinstance(problem.likelihood, PoissonLikelihood):
        return poisson_prox_em(problem, x0_hat, gamma, n_iter, sigma, subsets=em_subsets)
    x = proximal_cg(problem, x0_hat, gamma, n_iter, sigma, generator=generator, draw_prior=draw_prior)
    return torch.clamp(x, min=0) if problem.nonneg else x


#: Values of ``params.extra["posterior_draw"]`` (see :func:`params_data_step`).
DRAW_MODES: tuple = (None, False, True, 0, 1, "gaussian", "jacobian")


def draw_mode(value: Any) -> str | None:
    """``extra["posterior_draw"]`` as ``None``, ``"gaussian"`` or ``"jacobian"`` (``True``/``1`` → gaussian)."""
    if value not in DRAW_MODES:
        raise SamplingError(f"posterior_draw must be one of {DRAW_MODES}, got {value!r}")
    if value in ("gaussian", "jacobian"):
        return value
    return "gaussian" if value else None


def draw_refusal(value: Any, counts: bool, precision: str = "float32") -> str | None:
    """Why the x0 draw ``value`` cannot run (``None`` when it can): the one statement of these rules, for the core,
    the CLI and the GUI.

    ``counts``: the data step is PET's EM step (Poisson counts), which has no Gaussian form to draw from.
    ``precision``: the network's; the structured draw's finite-difference probe needs float32.
    """
    mode = draw_mode(value)
    if mode == "gaussian" and counts:
        return ("the isotropic posterior draw ('gaussian') needs a Gaussian data step; PET's EM step has none: "
                "use posterior_draw='jacobian' (the prior's part of the draw) or no draw")
    if mode == "jacobian" and precision != "float32":
        return (f"the structured posterior draw ('jacobian') needs the network in float32 (its finite-difference "
                f"probe is below {precision}'s rounding): run the network in float32, or use "
                "posterior_draw='gaussian'")
    return None


def params_data_step(
    problem: Problem,
    params: SamplerParams,
    x0_hat: torch.Tensor,
    sigma: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """:func:`data_step` with the run's live parameters: weight ``γ / prior_weight``, ``cg_iters`` iterations.

    The one place where the samplers that take the DDS data step (``dds``, ``consistency``) read γ, the
    prior/likelihood weight, the iteration count and ``extra["em_subsets"]`` (ordered subsets of the PET EM
    step, default 1 = exact EM) and ``extra["posterior_draw"]``, so the GUI's sliders mean the same in each.

    ``posterior_draw`` (needs the run's ``generator``; ``"gaussian"`` is refused for PET's EM step, whose
    ``"jacobian"`` draw is the prior's part only):
    ``None``/``False`` the DDS paper's step (the posterior mean); ``"gaussian"`` (or ``True``) a draw from the
    Gaussian posterior of x0 with the isotropic error model (:func:`proximal_cg`); ``"jacobian"`` the same with the
    prior's part drawn by the sampler from a probe of the denoiser's Jacobian (structured; one more network
    evaluation per step) — here only ``m`` is perturbed.
    """
    n_iter = int(params.cg_iters)
    # Ordered subsets for the PET EM step: opt-in (CLI ``--subsets 5``); on pet-low, S = 5 with 5 iterations ran
    # DDS 17–20 % faster for −0.13 dB (benchmarks/pet_subsets.py), so the exact EM stays the default.
    subsets = int(params.extra.get("em_subsets", 1))
    mode = draw_mode(params.extra.get("posterior_draw"))
    refusal = draw_refusal(mode, counts=isinstance(problem.likelihood, PoissonLikelihood))
    if refusal:
        raise SamplingError(refusal)
    draw = generator if mode else None
    return data_step(problem, x0_hat, float(params.gamma) / float(params.prior_weight), n_iter, sigma,
                     em_subsets=subsets, generator=draw, draw_prior=mode != "jacobian")
