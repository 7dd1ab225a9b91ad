"""What every sampler shares: the problem, live parameters, iterates, and the model↔image mapping.

A sampler is a generator: ``for it in sampler(problem, params, ...)`` yields :class:`Iterate`
objects while it runs, and reads ``params`` at every step, so a parameter changed while the
run is in flight (a GUI slider) changes the rest of the run. Stopping = stop iterating.

States live in *model units* ``u`` (the prior's normalised intensities, ``(B, C, H, W)``, C = 2
for complex images) in the variance-exploding form ``u_σ = u0 + σ ε``. Data consistency works
in *image units* ``x`` (what the operator takes), ``x = a·u + b`` (complex when C = 2).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..physics.base import LinearOperator
from ..physics.likelihoods import GaussianLikelihood, Likelihood
from ..priors.prior import Prior, channels_to_complex, complex_to_channels

__all__ = [
    "Deferred",
    "Problem",
    "SamplerParams",
    "Iterate",
    "SamplingError",
    "run_loop",
    "ddim_step",
    "fresh_noise",
    "renoise_step",
    "RENOISE_MODES",
    "time_grid",
    "check_finite",
    "check_start",
    "weight_advice",
    "PARAM_RANGES",
    "ORIENTATION_ORDER",
    "orient",
    "oriented_denoise",
    "DIVERGED",
    "resolution_mismatch",
    "yield_due",
]


def resolution_mismatch(image_shape: Any, card: Any) -> str | None:
    """Why a prior's training resolution cannot serve images of ``image_shape`` (None when it can).

    The priors are fully convolutional (trained on patches), so any 2D size from 16 px to 4× the training
    resolution runs; beyond that the network sees structures at scales it never learned, and below 16 px the
    U-Net has nothing left to downsample. One rule for :class:`Problem` and :func:`reconstruct.prior_mismatch`.

    Parameters
    ----------
    image_shape : sequence of int
        The operator's image shape.
    card : ModelCard or None
        The prior's model card (None for an analytic prior: nothing to check).

    Returns
    -------
    str or None
        The message naming both sizes and what to do.
    """
    resolution = getattr(card, "resolution", None)
    if not resolution or len(image_shape) != 2:
        return None
    h, w = (int(v) for v in image_shape)
    if max(h, w) <= 4 * resolution and min(h, w) >= 16:
        return None
    name = getattr(card, "name", "this prior")
    return (f"image {h}×{w} is far from the {resolution}² training resolution of prior {name!r} (it runs from 16 px "
            f"to {4 * resolution} px): resample the measurement geometry (a fastMRI .h5: reconstruct --size "
            f"{resolution}) or pick a prior of matching resolution")


class SamplingError(RuntimeError):
    """A run that cannot go on (NaN in an iterate, a mismatched prior...), with the likely cause."""


@dataclass
class SamplerParams:
    """Live parameters: read at every step, so changing them mid-run changes the rest of the run.

    Attributes
    ----------
    n_steps : int
        Number of reverse-diffusion steps (fixed once a run starts).
    eta : float
        Re-noising stochasticity, read as ``renoise`` says. ``renoise = "ddim"``: the exact DDIM σ_t (0 deterministic,
        1 ancestral/DDPM) with ε recomputed from the data-consistent x0_hat; default 1, which beat 0.85 on every
        benchmark task (``benchmarks/recon.py``); our η = 1 matches the DDS code's η ≈ 0.45–0.8 on a 50-step grid
        (0.85 here ≈ its 0.47). ``renoise = "dds"``: the DDS code's η, the fraction ``η σ′`` of fresh noise beside
        ``√(1−η²) σ′`` of the network's ε (1 = all fresh noise).
    renoise : str
        How DDS (and the volume sampler) carries its data-consistent estimate to the next noise level
        (:func:`renoise_step`). ``"ddim"`` (the dataclass default): the exact DDIM step with ε̂ = (x_σ − x̃0)/σ
        recomputed from the corrected x̃0, so the next state keeps only ``1 − σ′²/σ²`` of the data step's correction
        (unconditional DDIM when the data step does nothing). ``"dds"`` (the tuned default for DDS,
        :data:`~napari_diffrecon.samplers.defaults.RECOMMENDED`): the DDS reference code's step
        ``x̃0 + σ′(η z + √(1−η²) ε̂_θ)`` with the *network's* ε̂_θ, which keeps the whole correction; at η = 1 it beat
        "ddim" on all nine benchmark tasks (+0.2 to +3.5 dB a sample) but its samples spread less than the posterior
        (half its variance for a Gaussian prior) unless ``extra["posterior_draw"]`` draws the data step.
    lam : float
        Song et al. (2022) λ: weight of the measurement-space projection (1 = hard).
    gamma : float
        DDS data weight, a multiplier on the Bayesian weight ``r(σ)²/σ_y²`` of ``AᴴA`` in
        ``(I + γ̃ AᴴA) x = x0_hat + γ̃ Aᴴm`` (see :func:`samplers.datastep.data_weight`); ``inf`` =
        noise-free form. Default 3 (the trained priors err more than the Gaussian error model assumes).
    zeta : float
        DPS/MCG step size ζ on the un-squared residual norm.
    cg_iters : int
        Conjugate-gradient iterations per data step (DDS, pseudo-inverse projections).
    snr : float
        Langevin corrector signal-to-noise ratio (Song et al.); 0 disables the corrector.
    t0 : float
        Hot start: fraction of the noise schedule to run (1 = from pure noise). A fraction of the run's own
        (EDM) σ-grid, not CCDF's VP time: t0 0.3 / 0.4 enter at σ ≈ 0.25–0.28 / 0.74–0.85 on the default grids (CCDF's
        t0 on its VP-linear schedule would be σ ≈ 1.2 / 2.0), so tuned values do not transfer between the two.
    prior_weight : float
        The prior's weight against the data, read live by every conditional sampler: DDS's data weight is
        ``γ / prior_weight``, Song/MCG's projection ``λ / prior_weight``, DPS/MCG's gradient step
        ``ζ / prior_weight`` (the consistency sampler's data step as DDS's).
    orientations : int
        Orientation ensemble of the posterior samples (:func:`oriented_denoise`): sample k is denoised in the k-th of
        the first ``orientations`` elements of the square's symmetry group (:data:`ORIENTATION_ORDER`: identity,
        half turn, the two diagonal reflections, then the flips and quarter turns; flips and the half turn only for
        non-square images), so the samples do not all share the network's orientation-dependent errors and their
        mean averages them out. 1 (the dataclass default) = every sample in the image's own orientation; a single
        sample is never reoriented. 2D samplers (not the volume sampler). Tuned: 8 for DDS hot starts on CT (means of 8
        +0.04 to +0.23 dB), 1 elsewhere — from noise the prior lays out the anatomy at high σ, where it is not
        symmetric (limited-angle CT −1.5 dB), and the MRI prior saw upright slices only (:mod:`.defaults`).
    """

    n_steps: int = 50
    eta: float = 1.0
    lam: float = 1.0
    gamma: float = 3.0
    zeta: float = 0.5
    cg_iters: int = 5
    snr: float = 0.0
    t0: float = 1.0
    prior_weight: float = 1.0
    orientations: int = 1
    schedule: str = "edm"
    renoise: str = "ddim"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Every parameter as JSON-serialisable values (for provenance)."""
        return {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in asdict(self).items()}

    def ranges(self) -> dict[str, tuple[float, float, bool, bool, str]]:
        """The valid range of each checked parameter (:data:`PARAM_RANGES`; subclasses add their own)."""
        return PARAM_RANGES

    def check(self) -> None:
        """Raise :class:`SamplingError` naming the first parameter outside its range (see :meth:`ranges`).

        Called when a run starts and at every step, since the parameters are live: a value that no sampler can
        use (a negative step count, γ = NaN, η = 5) stops the run with a message instead of silently running
        something else (one step, an unconditional sample, a clamped weight).
        """
        if self.renoise not in RENOISE_MODES:
            raise SamplingError(f"renoise = {self.renoise!r} is not one of {RENOISE_MODES}: how DDS re-noises its "
                                "data-consistent estimate (\"ddim\": exact DDIM; \"dds\": the DDS code's, with the "
                                "network's ε)")
        for name, (lo, hi, lo_open, integer, meaning) in self.ranges().items():
            value = getattr(self, name)
            try:
                v = float(value)
            except (TypeError, ValueError):
                raise SamplingError(f"{name} must be a number ({meaning}), got {value!r}") from None
            bad = (
                math.isnan(v)
                or (integer and (not math.isfinite(v) or v != int(v)))
                or (v <= lo if lo_open else v < lo)
                or v > hi
            )
            if bad:
                span = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
                raise SamplingError(f"{name} = {value!r} is outside {span}{' (a whole number)' if integer else ''}: "
                                    f"{meaning}")


#: :attr:`SamplerParams.renoise` values: how DDS re-noises its data-consistent estimate (:func:`renoise_step`).
RENOISE_MODES = ("ddim", "dds")

#: Valid ranges of the live parameters: name -> (low, high, low excluded, whole number, what it is).
PARAM_RANGES: dict[str, tuple[float, float, bool, bool, str]] = {
    "n_steps": (1, math.inf, False, True, "the number of reverse-diffusion steps"),
    "eta": (0.0, 1.0, False, False, "the re-noising stochasticity, 0 deterministic to 1"),
    "lam": (0.0, 1.0, False, False, "Song's projection weight, 0 none to 1 a hard projection"),
    "gamma": (0.0, math.inf, False, False, "the DDS data weight (inf = noise-free normal equations)"),
    "zeta": (0.0, 1e6, False, False, "the DPS/MCG step size"),
    "cg_iters": (0, 10_000, False, True, "conjugate-gradient iterations per data step"),
    "snr": (0.0, 1.0, False, False, "the Langevin corrector's signal-to-noise ratio "
            "(score-SDE 2021: 0.16; Song 2022: 0.246 CT, 0.517 MRI)"),
    "t0": (0.0, 1.0, True, False, "the fraction of the noise schedule to run (1 = from pure noise)"),
    "prior_weight": (0.0, 1e6, True, False, "the prior's weight against the data"),
    "orientations": (1, 8, False, True, "how many orientations of the image the posterior samples are denoised in "
                     "(1 = the image's own; up to the square's 8 symmetries)"),
}


#: The square's symmetries in the order the samples of an orientation ensemble take them (:func:`oriented_denoise`).
#: Element g flips the image as ``g % 4`` says (0 none, 1 along W, 2 along H, 3 both = the half turn) and, for g ≥ 4,
#: then swaps H and W. The order makes every prefix of length 1, 2 and 4 a subgroup (identity;
#: + half turn; + the two diagonal reflections), so a batch of 2 or 4 samples is as symmetric as it can be.
ORIENTATION_ORDER = (0, 3, 4, 7, 1, 2, 5, 6)
#: The same for non-square images, where swapping H and W would change the shape: the flips and the half turn.
ORIENTATION_ORDER_FLIPS = (0, 3, 1, 2)
_FLIP_DIMS = ((), (-1,), (-2,), (-2, -1))


def orient(u: torch.Tensor, g: int, inverse: bool = False) -> torch.Tensor:
    """Apply the square's symmetry ``g`` (see :data:`ORIENTATION_ORDER`) to images ``u`` (``(..., H, W)``).

    Parameters
    ----------
    u : torch.Tensor
        Images, the last two axes H and W (H = W when ``g ≥ 4``).
    g : int
        The symmetry, 0–7.
    inverse : bool
        Apply its inverse instead (undo ``orient(u, g)``).

    Returns
    -------
    torch.Tensor
        The reoriented images.
    """
    if g >= 4 and u.shape[-1] != u.shape[-2]:
        raise ValueError(f"symmetry {g} swaps H and W, which needs a square image, got {tuple(u.shape[-2:])}")
    dims = _FLIP_DIMS[g % 4]
    if g >= 4 and inverse:
        u = u.transpose(-1, -2)
    if dims:
        u = u.flip(dims)
    if g >= 4 and not inverse:
        u = u.transpose(-1, -2)
    return u


def oriented_denoise(
    denoise: Callable[[torch.Tensor, Any], torch.Tensor], u: torch.Tensor, sigma: Any, orientations: int = 1
) -> torch.Tensor:
    """``denoise(u, sigma)`` with batch element k seen in orientation ``k mod orientations`` and turned back.

    A trained denoiser is not exactly equivariant to flips and rotations: its errors depend on the orientation it
    sees. Posterior samples that all see the image upright share those errors, and their mean keeps them; samples
    denoised in different orientations of the square's symmetry group (:data:`ORIENTATION_ORDER`) make different
    errors, and the mean averages them. Each sample is still a sample under a prior — the prior of the turned
    image, as plausible as the upright one at the low noise levels of a hot start, where the denoiser works on local
    texture; not from pure noise, where it lays out the anatomy in the orientation it was trained on (tuned use:
    :data:`~napari_diffrecon.samplers.defaults.RECOMMENDED`). A single sample (always in the identity orientation) is
    unchanged. One network call for the whole batch.

    Parameters
    ----------
    denoise : callable
        ``denoise(u, sigma) -> x0_hat`` for a batch ``(B, C, H, W)`` (a prior's :meth:`~Prior.denoise`).
    u : torch.Tensor
        The noisy states ``(B, C, H, W)``; batch element k is posterior sample k.
    sigma : float or torch.Tensor
        The noise level (a float or a per-sample tensor, passed through).
    orientations : int
        How many of :data:`ORIENTATION_ORDER`'s symmetries to cycle through (1: plain ``denoise``); at most 4
        (:data:`ORIENTATION_ORDER_FLIPS`) for non-square images.

    Returns
    -------
    torch.Tensor
        ``x0_hat`` in the images' own orientation, shape of ``u``.
    """
    order = ORIENTATION_ORDER if u.shape[-1] == u.shape[-2] else ORIENTATION_ORDER_FLIPS
    n = min(int(orientations), len(order), u.shape[0])
    if n <= 1:
        return denoise(u, sigma)
    gs = [order[k % n] for k in range(u.shape[0])]
    x0 = denoise(torch.stack([orient(u[k], g) for k, g in enumerate(gs)]), sigma)
    return torch.stack([orient(x0[k], g, inverse=True) for k, g in enumerate(gs)])


class Deferred:
    """A value computed on first use: ``Deferred(fn, *args)`` holds ``fn(*args)`` until it is needed."""

    __slots__ = ("fn", "args")

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        self.fn, self.args = fn, args

    def __call__(self) -> Any:
        return self.fn(*self.args)


class _OnFirstRead:
    """Dataclass field descriptor: set to a value or to a :class:`Deferred`, read as the (cached) value.

    Without a default (reading it from the class raises ``AttributeError``), so the field stays required.
    """

    def __set_name__(self, owner: type, name: str) -> None:
        self._slot = "_lazy_" + name

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        if obj is None:
            raise AttributeError(self._slot)
        value = obj.__dict__[self._slot]
        if isinstance(value, Deferred):
            value = value()
            obj.__dict__[self._slot] = value
        return value

    def __set__(self, obj: Any, value: Any) -> None:
        obj.__dict__[self._slot] = value


@dataclass
class Iterate:
    """One streamed state of a run (tensors detached, on the run's device).

    Attributes
    ----------
    step, n_steps : int
        Progress.
    x_t : torch.Tensor
        The current noisy state in image units, ``(B, *image_shape)`` (both zero outside the operator's field of
        view, where nothing is measured; the sampler's own state keeps the prior's values there).
    x0_hat : torch.Tensor
        The current estimate of the clean image (after the data step), image units.
    data_residual : torch.Tensor
        ``‖A x0_hat − m‖ / ‖m‖`` per sample, shape ``(B,)``. Computed on first read (one forward product):
        a headless run that reads only the final iterate's does not pay for it at every step.
    elapsed : float
        Seconds since the run started.
    nfe : int
        Network evaluations so far.
    sigma : float
        Noise level of ``x_t``.
    done : bool
        True for the final iterate (``x0_hat`` is the sample).
    """

    step: int
    n_steps: int
    x_t: torch.Tensor
    x0_hat: torch.Tensor
    data_residual: torch.Tensor = _OnFirstRead()  # type: ignore[assignment]  # a Tensor or a Deferred one
    elapsed: float
    nfe: int
    sigma: float
    done: bool = False


@dataclass
class Problem:
    """An inverse problem ready to sample: measurement, operator, likelihood, prior, units.

    Parameters
    ----------
    operator : LinearOperator
        Forward model ``A`` (on the run's device).
    measurement : torch.Tensor
        ``m``, shape ``operator.data_shape`` (no batch axis).
    prior : Prior
        The denoiser (on the run's device).
    likelihood : Likelihood, optional
        Noise model (default Gaussian with σ = 1).
    scale, offset : float
        Image units from model units: ``x = scale · u + offset``.
    nonneg : bool
        Keep images non-negative in the data step (PET).
    """

    operator: LinearOperator
    measurement: torch.Tensor
    prior: Prior
    likelihood: Likelihood = field(default_factory=lambda: GaussianLikelihood(1.0))
    scale: float = 1.0
    offset: float = 0.0
    nonneg: bool = False

    def __post_init__(self) -> None:
        op = self.operator
        if tuple(self.measurement.shape) != tuple(op.data_shape):
            raise SamplingError(
                f"measurement shape {tuple(self.measurement.shape)} does not match the operator's {op.data_shape}"
            )
        if self.measurement.is_complex() and not op.is_complex:
            raise SamplingError("complex measurement for a real operator")
        want = 2 if op.is_complex else 1
        if self.prior.channels != want:
            kind = "complex (2-channel)" if want == 2 else "real (1-channel)"
            raise SamplingError(
                f"the {op.modality} operator needs a {kind} prior but this prior has {self.prior.channels} channel(s); "
                "pick a prior trained for this modality"
            )
        why = resolution_mismatch(op.image_shape, getattr(self.prior, "card", None))
        if why:
            raise SamplingError(why)
        if not torch.isfinite(
            torch.view_as_real(self.measurement) if self.measurement.is_complex() else self.measurement
        ).all():
            raise SamplingError("measurement contains NaN or Inf")
        self.measurement = self.measurement.to(op.device)

    @property
    def device(self) -> torch.device:
        """The run's device (the operator's)."""
        return self.operator.device

    @property
    def state_shape(self) -> tuple[int, ...]:
        """Shape of one model-unit state ``(C, H, W)``."""
        return (self.prior.channels, *self.operator.image_shape)

    def to_image(self, u: torch.Tensor) -> torch.Tensor:
        """Model units ``(B, C, H, W)`` → image units ``(B, H, W)`` (complex when C = 2)."""
        x = channels_to_complex(u) if self.prior.channels == 2 else u[:, 0]
        return x * self.scale + self.offset

    def to_model(self, x: torch.Tensor) -> torch.Tensor:
        """Image units ``(B, H, W)`` → model units ``(B, C, H, W)``."""
        u = (x - self.offset) / self.scale
        return complex_to_channels(u) if self.prior.channels == 2 else u.real[:, None] if u.is_complex() else u[:, None]

    def denoise(self, u: torch.Tensor, sigma: Any, orientations: int = 1) -> torch.Tensor:
        """The prior's ``x0_hat`` of states ``u`` (model units), sample k in orientation k (:func:`oriented_denoise`).

        Differentiable (DPS/MCG take its gradient); the samplers pass ``params.orientations``, read live.
        """
        return oriented_denoise(self.prior.denoise, u, sigma, orientations)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised data residual per sample for images ``x`` (image units), in the data's domain.

        ``‖A x − m‖ / ‖m‖`` for Gaussian data; expected counts (with background) for Poisson data;
        the post-log sinogram for transmission counts (see :func:`napari_diffrecon.metrics.data_residual`).
        """
        from ..metrics import data_residual

        with torch.no_grad():
            return data_residual(self.operator, x, self.measurement, self.likelihood).reshape(-1)


def time_grid(prior: Prior, params: SamplerParams) -> torch.Tensor:
    """Noise levels for a run: the schedule's grid, cut at ``t0`` for hot starts (ends with 0)."""
    from ..priors.schedules import get_schedule

    sched = get_schedule(params.schedule) if params.schedule else prior.schedule
    params.check()
    n = int(params.n_steps)
    t0 = float(params.t0)
    if t0 >= 1:
        return sched.sigmas(n)
    # Hot start: the same step density as a full run, entered at fraction t0 of its steps (the last n of
    # N = round(n / t0)), so one grid step later in time than CCDF's t0·T; the tuned t0 values assume this grid.
    full = sched.sigmas(max(int(round(n / t0)), n + 1))
    return full[len(full) - 1 - n :]


def fresh_noise(u: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Standard normal noise shaped and typed like ``u`` (on its device), drawn from ``generator`` on the CPU.

    Gaussian for every prior: with a PFGM++ prior of finite D the start state and the consistency sampler draw from
    the prior's own kernel (``prior.draw_noise``), but the fresh share of a stochastic (η > 0) DDIM / DDS re-noise
    is this Gaussian, an approximation of that kernel (η 1 against 0 measured no difference on MRI 4×,
    docs/dev/fast.md); the deterministic steps are exact under the r = σ√D alignment.
    """
    return torch.randn(u.shape, generator=generator, dtype=u.dtype).to(u.device)


def ddim_step(
    u: torch.Tensor, x0: torch.Tensor, sigma: float, sigma_next: float, eta: float, generator: torch.Generator
) -> torch.Tensor:
    """Generalised DDIM update in variance-exploding coordinates.

    ``u' = x0 + √(σ'² − s²) ε̂ + s z`` with ``ε̂ = (u − x0)/σ`` and ``s = η σ' √(1 − σ'²/σ²)`` —
    the exact DDIM σ_t of Song et al. (2021) rewritten for ``u_σ = x0 + σ ε``; η = 1 is the
    DDPM ancestral step, η = 0 the deterministic DDIM/probability-flow step.
    """
    if sigma_next <= 0:
        return x0
    eps = (u - x0) / sigma
    s = eta * sigma_next * math.sqrt(max(0.0, 1.0 - sigma_next**2 / sigma**2))
    z = fresh_noise(u, generator) if s > 0 else 0.0
    return x0 + math.sqrt(max(sigma_next**2 - s**2, 0.0)) * eps + s * z


def renoise_step(
    mode: str, u: torch.Tensor, x0_net: torch.Tensor, x0_dc: torch.Tensor, sigma: float, sigma_next: float,
    eta: float, generator: torch.Generator,
) -> torch.Tensor:
    """Carry a data-consistent estimate ``x0_dc`` from noise level ``sigma`` to ``sigma_next``.

    Parameters
    ----------
    mode : {"ddim", "dds"}
        ``"ddim"``: :func:`ddim_step` on ``x0_dc`` (ε̂ recomputed from it). ``"dds"``: the DDS reference code's
        update ``x0_dc + σ′(η z + √(1−η²) ε̂_θ)`` with the network's ``ε̂_θ = (u − x0_net)/σ`` (Chung, Lee & Ye 2024,
        their reference code), which keeps the data step's whole correction in the next state.
    u : torch.Tensor
        The current state x_σ (model units).
    x0_net : torch.Tensor
        The denoiser's estimate from ``u`` (before the data step).
    x0_dc : torch.Tensor
        The data-consistent estimate after the data step.
    sigma, sigma_next : float
        The current and the next noise level (``sigma_next = 0`` returns ``x0_dc``).
    eta : float
        In [0, 1]; its meaning depends on ``mode`` (see :class:`SamplerParams`).
    generator : torch.Generator
        Draws the fresh noise.

    Returns
    -------
    torch.Tensor
        The next state.
    """
    if mode == "ddim":
        return ddim_step(u, x0_dc, sigma, sigma_next, eta, generator)
    if mode != "dds":
        raise SamplingError(f"renoise must be one of {RENOISE_MODES}, got {mode!r}")
    if sigma_next <= 0:
        return x0_dc
    eps = (u - x0_net) / sigma
    z = fresh_noise(u, generator) if eta > 0 else 0.0
    return x0_dc + sigma_next * (eta * z + math.sqrt(max(0.0, 1.0 - eta**2)) * eps)


#: An estimate x0_hat beyond this many times the prior's :attr:`~napari_diffrecon.priors.Prior.image_range`
#: (trained priors: images within about [−1, 1] in model units) has diverged: a step size or weight far too
#: large (DPS at ζ = 1e3 reaches ~24 within 5 steps on a 64² CT, ζ = 1e12 ~1e9; tuned benchmark runs stay below 3).
DIVERGED = 100.0


def check_finite(
    u: torch.Tensor, x0: torch.Tensor, i: int, n: int, sigma: float, advice: str, image_range: float = 1.0
) -> None:
    """Stop a run whose state or estimate holds NaN/Inf or whose estimate has diverged (``|x0_hat|`` above
    :data:`DIVERGED` × ``image_range`` model units), naming the step, σ and what to change (``advice``)."""
    if not torch.isfinite(u).all() or not torch.isfinite(x0).all():
        raise SamplingError(f"NaN/Inf appeared at step {i + 1}/{n} (σ = {sigma:.3g}); {advice}")
    top = float(x0.detach().abs().max()) if x0.numel() else 0.0
    if top > DIVERGED * image_range:
        raise SamplingError(
            f"the estimate diverged at step {i + 1}/{n} (σ = {sigma:.3g}): |x0_hat| reached {top:.3g} in the "
            f"prior's units, where its images reach about {image_range:.3g}; {advice}"
        )


def check_start(params: SamplerParams, x_init: Any) -> None:
    """Refuse ``t0 < 1`` without a start image: it would enter the schedule part-way from noise around zero."""
    if x_init is None and float(params.t0) < 1:
        raise SamplingError(
            f"t0 = {params.t0} starts the reverse diffusion part-way, which needs a start image (a hot start: the "
            "CLI's --hot-start auto|fbp|cg|mlem|tv, the workbench's hot start); from pure noise use t0 = 1"
        )


def weight_advice(params: SamplerParams, names: tuple[str, ...]) -> str:
    """What to lower after a failed step: the live weights ``names`` the sampler uses, with their values."""
    symbols = {"zeta": "ζ", "lam": "λ", "gamma": "γ", "snr": "snr", "eta": "η", "prior_weight": "prior weight"}
    if not names:
        return "the prior network itself produced it (check the prior and the image size)"
    shown = ", ".join(f"{symbols.get(k, k)} = {getattr(params, k)}" for k in names)
    return f"the likely cause is a step size or weight too large for this problem ({shown}): lower it"


def yield_due(
    i: int, n: int, now: float, last_yield: float, yield_every: int | None, min_interval: float
) -> bool:
    """Whether step ``i`` of ``n`` yields: every ``yield_every`` steps, else ``min_interval`` s apart; first/last."""
    due = (i + 1) % yield_every == 0 if yield_every else now - last_yield >= min_interval
    return due or i == n - 1 or i == 0


def run_loop(
    problem: Problem,
    params: SamplerParams,
    step_fn: Callable[[torch.Tensor, float, float, int, dict[str, Any]], tuple[torch.Tensor, torch.Tensor, int]],
    n_samples: int = 1,
    seed: int = 0,
    x_init: torch.Tensor | None = None,
    yield_every: int | None = None,
    min_interval: float = 0.1,
    sigmas: torch.Tensor | None = None,
    weights: tuple[str, ...] = ("zeta", "lam", "gamma"),
) -> Iterator[Iterate]:
    """Drive a reverse diffusion: draw the start state, call ``step_fn`` per step, yield iterates.

    Parameters
    ----------
    problem : Problem
        What to reconstruct.
    params : SamplerParams
        Live parameters (read each step by ``step_fn``).
    step_fn : callable
        ``step_fn(u, sigma, sigma_next, i, ctx) -> (u_next, x0_hat_model, nfe)`` — one step of
        the sampler in model units; ``ctx`` holds the generator and per-run state.
    n_samples : int
        Posterior samples, run as one batch.
    seed : int
        Seed of the run's noise (drawn on the CPU, so runs agree across devices up to float error).
    x_init : torch.Tensor, optional
        Hot-start image in image units (``image_shape``); the run starts at ``σ(t0)`` from it.
    yield_every : int, optional
        Yield every k steps (default: about 10 updates/s, at least the first and last step).
    min_interval : float
        Minimum seconds between yielded iterates when ``yield_every`` is None.
    sigmas : torch.Tensor, optional
        The decreasing noise levels to visit, ending with 0 (default :func:`time_grid`).
    weights : tuple of str
        The live parameters that weigh the data against the prior in this sampler, named in the message when
        a step diverges (:func:`weight_advice`).
    """
    params.check()
    if n_samples < 1:
        raise SamplingError(f"n_samples must be ≥ 1, got {n_samples}")
    check_start(params, x_init)
    if sigmas is None:
        sigmas = time_grid(problem.prior, params)
    n = len(sigmas) - 1
    gen = torch.Generator().manual_seed(int(seed))
    dev = problem.device
    shape = (n_samples, *problem.state_shape)
    # σ0·ε for diffusion priors; the PFGM++ kernel's heavy-tailed draw for a prior trained with finite D.
    z = problem.prior.draw_noise(shape, float(sigmas[0]), gen).to(dev)
    if x_init is not None:
        x_init = x_init.to(dev)
        if tuple(x_init.shape[-len(problem.operator.image_shape) :]) != tuple(problem.operator.image_shape):
            raise SamplingError(f"hot-start image shape {tuple(x_init.shape)} ≠ {problem.operator.image_shape}")
        u = problem.to_model(x_init.reshape(1, *problem.operator.image_shape).expand(n_samples, -1, -1))
        u = u + z
    else:
        u = z
    ctx: dict[str, Any] = {"generator": gen, "sigmas": sigmas}
    t_start = time.perf_counter()
    last_yield = -1e9
    nfe = 0
    x0_model = u
    for i in range(n):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        params.check()  # live: a value set mid-run is checked before the step that would use it
        u, x0_model, k = step_fn(u, s, s_next, i, ctx)
        nfe += k
        check_finite(u, x0_model, i, n, s, weight_advice(params, weights), problem.prior.image_range)
        now = time.perf_counter()
        last = i == n - 1
        if yield_due(i, n, now, last_yield, yield_every, min_interval):
            last_yield = now
            with torch.no_grad():
                # zero outside the field of view (CT / PET: not measured; the state keeps the prior's values there)
                x0_img = problem.operator.restrict(problem.to_image(x0_model.detach()))
                if last and problem.nonneg:  # the result, not the iterate: activity cannot be negative (PET)
                    x0_img = x0_img.clamp(min=0)
                yield Iterate(
                    step=i + 1,
                    n_steps=n,
                    x_t=problem.operator.restrict(problem.to_image(u.detach())) if not last else x0_img,
                    x0_hat=x0_img,
                    data_residual=Deferred(problem.residual, x0_img),
                    elapsed=now - t_start,
                    nfe=nfe,
                    sigma=s_next,
                    done=last,
                )
