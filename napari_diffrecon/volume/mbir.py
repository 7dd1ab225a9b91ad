"""DiffusionMBIR-style volume sampler: a 2D prior on all slices at once, ADMM z-TV in the data step.

Per step (Chung et al., CVPR 2023, in the DDS form the rest of the package uses):

1. ``x0_hat`` from the 2D prior for every slice (slices are a batch, pushed through the network
   in chunks that fit the memory budget);
2. data step on the whole volume: ``min ½‖x − x0_hat‖² + (γ̃/2)‖A x − m‖² + λ‖D_z x‖₁`` by ADMM
   (:func:`~napari_diffrecon.volume.ztv.admm_ztv`: CG inner solves, soft-thresholding of
   ``D_z x``; split and dual persist across steps). ``γ̃`` is the DDS weight of
   :func:`napari_diffrecon.samplers.datastep.data_weight`; ``γ = inf`` gives DiffusionMBIR's
   noise-free form ``½‖A x − m‖²/‖AᴴA‖ + λ‖D_z x‖₁`` from ``x0_hat``. PET counts: the EM step of
   the 2D sampler, then the z-TV proximal map by the same ADMM;
3. re-noise with η, slice by slice, as ``params.renoise`` says (:func:`napari_diffrecon.samplers.base.renoise_step`:
   exact DDIM, or the DDS code's with the network's ε).

λ (``params.ztv``, in units of the prior's intensity scale) is read every step, so it is live.
Noise is drawn per slice from a generator seeded by ``(seed, global slice index)``: a slab of a
volume draws exactly the noise the whole volume would, and with λ = 0 slice ``k`` reproduces the
2D ``dds`` sampler run with seed :func:`slice_seed` ``(seed, k)``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..physics.likelihoods import PoissonLikelihood, TransmissionLikelihood
from ..priors.prior import channels_to_complex, complex_to_channels
from ..samplers.base import (
    Deferred,
    Iterate,
    Problem,
    SamplerParams,
    SamplingError,
    check_finite,
    check_start,
    renoise_step,
    time_grid,
    yield_due,
)
from ..samplers.datastep import _pwls, back_projected_data, data_weight, normal_norm, poisson_prox_em
from .operators import SliceWiseOperator
from .ztv import ZTVState, admm_ztv

__all__ = ["VolumeParams", "recommended_volume_params", "VolumeProblem", "VolumeIterate", "VolumeCancelled", "mbir",
           "slice_seed", "denoise_slices", "volume_data_step", "live", "raise_if_cancelled"]


class VolumeCancelled(Exception):  # noqa: N818 - reads as the event, like KeyboardInterrupt
    """A volume run was cancelled through its ``cancel`` event (raised between denoiser chunks or steps)."""


def raise_if_cancelled(cancel: Any) -> None:
    """Raise :class:`VolumeCancelled` when ``cancel`` (a ``threading.Event`` or None) is set."""
    if cancel is not None and cancel.is_set():
        raise VolumeCancelled("the volume run was cancelled")


@dataclass
class VolumeParams(SamplerParams):
    """:class:`~napari_diffrecon.samplers.SamplerParams` plus the z-coupling (all read every step).

    Attributes
    ----------
    ztv : float
        Weight λ of ``‖D_z x‖₁`` in units of the prior's intensity scale (0 = independent slices; default 0.01, the
        CT value; :func:`recommended_volume_params` gives each modality its own, :data:`ZTV_DEFAULTS`).
    rho : float
        ADMM penalty ρ (relative to the data step's proximal weight 1).
    admm_iters : int
        ADMM iterations per diffusion step (DiffusionMBIR: 1).
    """

    # 0.01 since DDS's re-noise keeps the data step's whole correction (2026-12-07; 0.05 before): on the real EPI volume
    # (benchmarks/volume.py quality) λ 0 / 0.003 / 0.005 / 0.01 / 0.02 / 0.05 → 30.82 / 30.93 / 31.04 / 31.17 / 31.04 /
    # 29.82 dB, mean |∂z error| 0.0207 / 0.0198 / 0.0181 / 0.0164 / 0.0164 / 0.0188.
    ztv: float = 0.01
    rho: float = 1.0
    admm_iters: int = 1

    def ranges(self) -> dict[str, tuple[float, float, bool, bool, str]]:
        """The 2D ranges (:data:`~napari_diffrecon.samplers.base.PARAM_RANGES`) and the z-coupling's: a negative or
        NaN z-TV weight used to run slice by slice and be recorded as given."""
        from ..samplers.base import PARAM_RANGES

        return {**PARAM_RANGES,
                "ztv": (0.0, 1e6, False, False, "the z-TV weight, 0 = independent slices"),
                "rho": (0.0, 1e6, True, False, "the ADMM penalty"),
                "admm_iters": (1, 10_000, False, True, "ADMM iterations per diffusion step")}


#: The z-TV weight by modality (:func:`recommended_volume_params`; the CLI, the volume panel's "auto"). Chosen on
#: nibabel's real EPI volume, slices 6–17 (``python benchmarks/volume.py quality --modality M --ztv …``), checked on
#: its slices 0–5 and 18–23 (``--first 0 --slices 6`` / ``--first 18 --slices 6``), 2026-12-07:
#: CT (30 views) λ 0 / 0.01 / 0.02 / 0.05 → 30.82 / 31.17 / 31.04 / 29.82 dB;
#: MRI (4×, one coil) λ 0 / 0.01 / 0.02 / 0.03 / 0.05 / 0.1 → 28.98 / 30.06 / 30.72 / 31.01 / 30.92 / 29.47 dB, held out
#: 28.39 / 28.96 / 29.52 and 28.70 / 29.67 / 30.54 at λ 0 / 0.01 / 0.03;
#: PET (1e5 counts per slice) λ 0 / 0.005 / 0.01 / 0.02 / 0.03 / 0.05 → 25.84 / 26.70 / 27.00 / 27.17 / 27.05 /
#: 26.65 dB, held out 25.74 / 26.47 / 26.43 and 26.56 / 27.66 / 27.85 at λ 0 / 0.01 / 0.02 (mean |∂z error| lower
#: at 0.02 than at 0.01 on all three).
ZTV_DEFAULTS: dict[str, float] = {"ct": 0.01, "mri": 0.03, "pet": 0.02}


def recommended_volume_params(modality: str = "*", **overrides: Any) -> VolumeParams:
    """The volume sampler's defaults: DDS's tuned 2D settings for ``modality``, plus the z-coupling.

    One source for the CLI, the napari volume panel and the benchmarks: each slice's data step is
    the 2D DDS step (:func:`~napari_diffrecon.samplers.defaults.recommended_params`, e.g. γ = 2 for
    MRI, 5 for PET), coupled along z by the ADMM z-TV term with the modality's weight (:data:`ZTV_DEFAULTS`).

    Parameters
    ----------
    modality : str
        "ct", "mri" or "pet" ("*": the modality-free defaults).
    **overrides
        Any :class:`VolumeParams` field; None values are ignored (unset command-line options).
    """
    from ..samplers.defaults import recommended_params

    modality = str(modality).lower()
    values = recommended_params("dds", modality).to_dict()
    values["orientations"] = 1  # an option of 2D posterior samples; here the batch is slices and it is not read
    values["ztv"] = ZTV_DEFAULTS.get(modality, VolumeParams.ztv)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return VolumeParams(**values)


def live(params: SamplerParams, name: str, default: Any) -> Any:
    """A volume parameter from :class:`VolumeParams` or from ``params.extra`` (plain SamplerParams)."""
    if hasattr(params, name):
        return getattr(params, name)
    return params.extra.get(name, default)


def slice_seed(seed: int, k: int) -> int:
    """The seed of global slice ``k``'s noise in a run with ``seed``."""
    return (int(seed) * 1_000_003 + int(k) * 7919 + 12345) % (2**63 - 1)


class VolumeProblem(Problem):
    """A :class:`~napari_diffrecon.samplers.Problem` on a volume: states are ``(B, D, C, H, W)``.

    The operator must be a :class:`~napari_diffrecon.volume.SliceWiseOperator`; the measurement
    is ``(D, *slice_data_shape)``.
    """

    def __post_init__(self) -> None:
        if not isinstance(self.operator, SliceWiseOperator):
            raise SamplingError(
                f"a volume problem needs a SliceWiseOperator (volume_ct/volume_mri/volume_pet), got "
                f"{type(self.operator).__name__}"
            )
        super().__post_init__()
        card = getattr(self.prior, "card", None)
        h, w = self.operator.base.image_shape
        res = getattr(card, "resolution", None) if card is not None else None
        if res and (max(h, w) > 4 * res or min(h, w) < 16):
            raise SamplingError(
                f"slices of {h}×{w} are far from the prior's training resolution {card.resolution}²; "
                "resample the slices or pick a prior of matching resolution"
            )

    @property
    def state_shape(self) -> tuple[int, ...]:
        """``(D, C, H, W)``: slices first, so the 2D prior sees a batch of slices."""
        d, h, w = self.operator.image_shape
        return (d, self.prior.channels, h, w)

    def to_image(self, u: torch.Tensor) -> torch.Tensor:
        """Model units ``(B, D, C, H, W)`` → image units ``(B, D, H, W)``."""
        x = channels_to_complex(u) if self.prior.channels == 2 else u[:, :, 0]
        return x * self.scale + self.offset

    def to_model(self, x: torch.Tensor) -> torch.Tensor:
        """Image units ``(B, D, H, W)`` → model units ``(B, D, C, H, W)``."""
        u = (x - self.offset) / self.scale
        if self.prior.channels == 2:
            return complex_to_channels(u)
        return (u.real if u.is_complex() else u)[:, :, None]


@dataclass
class VolumeIterate(Iterate):
    """An :class:`~napari_diffrecon.samplers.Iterate` of a volume run (``x_t``, ``x0_hat``: ``(B, D, H, W)``).

    Attributes
    ----------
    z_offset : int
        Global index of the first slice (slab runs).
    ztv : float
        The z-TV weight used at this step.
    """

    z_offset: int = 0
    ztv: float = 0.0


def denoise_slices(
    prior: Any, u: torch.Tensor, sigma: float, chunk: int | None = None, cancel: Any = None
) -> torch.Tensor:
    """The 2D prior on every slice of ``u`` ``(B, D, C, H, W)``, ``chunk`` slices per network call.

    ``cancel`` (a ``threading.Event``) is checked before every chunk: :class:`VolumeCancelled` when set.
    """
    b, d = u.shape[:2]
    flat = u.reshape(b * d, *u.shape[2:])
    step = max(int(chunk), 1) if chunk else flat.shape[0]
    out = []
    with torch.no_grad():
        for i in range(0, flat.shape[0], step):
            raise_if_cancelled(cancel)
            out.append(prior.denoise(flat[i : i + step], sigma))
    return torch.cat(out).reshape(u.shape)


def volume_data_step(
    problem: VolumeProblem, x0_hat: torch.Tensor, params: SamplerParams, sigma: float, state: ZTVState
) -> torch.Tensor:
    """The data step of :func:`mbir` on image-unit volumes ``(B, D, H, W)`` (see the module docstring)."""
    op, lik = problem.operator, problem.likelihood
    gamma = float(params.gamma) / float(params.prior_weight)
    cg_iters = int(params.cg_iters)
    lam = float(live(params, "ztv", 0.0)) * abs(problem.scale)
    rho = float(live(params, "rho", 1.0))
    n_admm = int(live(params, "admm_iters", 1))
    if isinstance(lik, PoissonLikelihood):
        x = poisson_prox_em(problem, x0_hat, gamma, cg_iters, sigma)
        if lam > 0:  # z-TV proximal map of the EM result: Q = ½‖x − x_em‖²
            x = admm_ztv(lambda v: v, x, x, lam, rho, max(cg_iters, 1), n_admm, state)
        else:
            state.reset()
        return torch.clamp(x, min=0)
    if cg_iters <= 0 or gamma <= 0:
        return torch.clamp(x0_hat, min=0) if problem.nonneg else x0_hat
    wts = _pwls(problem)[1] if isinstance(lik, TransmissionLikelihood) else None

    def a_h_w(r: torch.Tensor) -> torch.Tensor:
        return op.adjoint(r if wts is None else r * wts)

    g = data_weight(problem, gamma, sigma)
    if g == float("inf"):  # DiffusionMBIR's noise-free form, data term normalised by ‖AᴴA‖
        scale = 1.0 / normal_norm(problem)

        def normal(v: torch.Tensor) -> torch.Tensor:
            return scale * a_h_w(op.forward(v))

        rhs = (scale * back_projected_data(problem)).expand_as(x0_hat)  # Aᴴ W m: once per run
    else:

        def normal(v: torch.Tensor) -> torch.Tensor:
            return v + g * a_h_w(op.forward(v))

        rhs = x0_hat + g * back_projected_data(problem)
    x = admm_ztv(normal, rhs, x0_hat, lam, rho, cg_iters, n_admm, state)
    return torch.clamp(x, min=0) if problem.nonneg else x


def mbir(
    problem: VolumeProblem,
    params: SamplerParams,
    n_samples: int = 1,
    seed: int = 0,
    x_init: torch.Tensor | None = None,
    chunk_slices: int | None = None,
    yield_every: int | None = None,
    min_interval: float = 0.1,
    cancel: Any = None,
) -> Iterator[VolumeIterate]:
    """DiffusionMBIR-style volume sampler (a generator of :class:`VolumeIterate`).

    Parameters
    ----------
    problem : VolumeProblem
        The volume problem.
    params : VolumeParams or SamplerParams
        Live parameters (``ztv``, ``rho``, ``admm_iters`` from :class:`VolumeParams` or ``params.extra``);
        ``n_steps``, ``eta``, ``gamma``, ``cg_iters``, ``t0`` as for ``dds``.
    n_samples : int
        Posterior samples, one batch.
    seed : int
        Run seed (per-slice noise, see :func:`slice_seed`).
    x_init : torch.Tensor, optional
        Hot-start volume ``(D, H, W)`` in image units (with ``params.t0 < 1``).
    chunk_slices : int, optional
        Slices per denoiser call (from :func:`~napari_diffrecon.volume.memory.plan_memory`); all at once by default.
    yield_every : int, optional
        Yield every k steps (default about 10 updates/s); the first and last steps always yield.
    min_interval : float
        Minimum seconds between yields when ``yield_every`` is None.
    cancel : threading.Event, optional
        Checked before every denoiser chunk and every data step; when set, :class:`VolumeCancelled`
        is raised, so a run stops within one chunk instead of one whole step.
    """
    if n_samples < 1:
        raise SamplingError(f"n_samples must be ≥ 1, got {n_samples}")
    check_start(params, x_init)
    sigmas = time_grid(problem.prior, params)
    n = len(sigmas) - 1
    op = problem.operator
    d = op.n_slices
    dev = problem.device
    c, h, w = problem.state_shape[1:]
    gens = [torch.Generator().manual_seed(slice_seed(seed, op.z_offset + k)) for k in range(d)]
    # σ0·ε per slice for diffusion priors; the PFGM++ kernel's draw (per slice image) for a prior trained with finite D.
    s0 = float(sigmas[0])
    z = torch.stack([problem.prior.draw_noise((n_samples, c, h, w), s0, g) for g in gens], dim=1).to(dev)
    if x_init is not None:
        x_init = torch.as_tensor(x_init).to(dev)
        if tuple(x_init.shape) != tuple(op.image_shape):
            raise SamplingError(f"hot-start volume shape {tuple(x_init.shape)} ≠ {op.image_shape}")
        u = problem.to_model(x_init[None].expand(n_samples, -1, -1, -1)) + z
    else:
        u = z
    state = ZTVState()
    t_start = time.perf_counter()
    last_yield = -1e9
    nfe = 0
    for i in range(n):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        params.check()  # live values set mid-run
        lam_now = float(live(params, "ztv", 0.0))
        x0_net = denoise_slices(problem.prior, u, s, chunk_slices, cancel)
        nfe += 1
        raise_if_cancelled(cancel)
        with torch.no_grad():
            x_dc = volume_data_step(problem, problem.to_image(x0_net), params, s, state)
            x0 = problem.to_model(x_dc)
            eta, mode = float(params.eta), params.renoise
            u = torch.stack([renoise_step(mode, u[:, k], x0_net[:, k], x0[:, k], s, s_next, eta, gens[k])
                             for k in range(d)], dim=1)
        check_finite(
            u, x0, i, n, s,
            f"lower the z-TV weight ({lam_now}), rho ({live(params, 'rho', 1.0)}) or γ ({params.gamma})",
            problem.prior.image_range,
        )
        now = time.perf_counter()
        last = i == n - 1
        if yield_due(i, n, now, last_yield, yield_every, min_interval):
            last_yield = now
            with torch.no_grad():
                x0_img = op.restrict(problem.to_image(x0))  # zero outside the field of view (CT / PET)
                yield VolumeIterate(
                    step=i + 1,
                    n_steps=n,
                    x_t=x0_img if last else op.restrict(problem.to_image(u)),
                    x0_hat=x0_img,
                    data_residual=Deferred(problem.residual, x0_img),
                    elapsed=now - t_start,
                    nfe=nfe,
                    sigma=s_next,
                    done=last,
                    z_offset=op.z_offset,
                    ztv=lam_now,
                )
