"""One entry point for a reconstruction run, shared by the CLI and the GUI.

:class:`RunSettings` is what the widgets edit, what the CLI parses into, what a preset file
stores and what goes into every output's provenance. :func:`prepare_run` turns a measurement
and settings into a sampler generator (the GUI iterates it in a worker); :func:`reconstruct`
consumes it synchronously (CLI, tests).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .io.bundle import file_sha256
from .samplers import SAMPLERS, UNCONDITIONAL, Iterate, Problem, SamplerParams, SamplingError, get_sampler
from .samplers.base import resolution_mismatch
from .uncertainty import DEFAULT_STD_POOL, summarize

__all__ = [
    "RunSettings",
    "Result",
    "noise_floor_text",
    "default_hot_start",
    "ct_hot_start",
    "hot_start_params",
    "noise_is_assumed",
    "data_kind",
    "resolve_settings",
    "prepare_run",
    "reconstruct",
    "finish_diffusion_run",
    "intensity_mapping",
    "DIFFUSION_METHODS",
]

DIFFUSION_METHODS = tuple(SAMPLERS)


def _validate_input(measurement: Any) -> None:
    """The checks a bundle file gets (:meth:`napari_diffrecon.io.Measurement.validate`: shapes, NaN, dtype, noise,
    geometry), for a measurement built in Python too: without them NaN data gave an all-NaN FBP, all-zero data a
    residual of 1e29, a wrong shape an image of another shape."""
    validate = getattr(measurement, "validate", None)
    if callable(validate):
        validate()


def _baseline_names() -> tuple[str, ...]:
    from .baselines import BASELINES

    return tuple(BASELINES)


@dataclass
class RunSettings:
    """Everything that defines a run (JSON round-trips through :meth:`to_dict` / :meth:`from_dict`)."""

    method: str = "dds"
    prior: str | None = None
    #: None: the benchmark-tuned values for the method and the data (``samplers.defaults.recommended_params``, as the
    #: CLI and the workbench start from), filled in when the run starts (:func:`resolve_settings`)
    params: SamplerParams | None = None
    n_samples: int = 1
    seed: int = 0
    device: str = "cpu"
    hot_start: str | None = None
    baseline_params: dict[str, Any] = field(default_factory=dict)
    keep_samples: bool = False
    std_pool: float = DEFAULT_STD_POOL  # pixels: Gaussian pooling of the per-voxel variance (0 = raw per voxel)
    precision: str = "float32"  # the prior network's evaluation: float32, bfloat16 or float16 (autocast)

    def __post_init__(self) -> None:
        from .priors.prior import check_precision

        check_precision(self.precision)
        for key, lo in (("n_samples", 1), ("seed", 0)):  # whole numbers (1.5 samples, seed None failed deep inside)
            v = getattr(self, key)
            if (isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not math.isfinite(v)
                    or v != int(v) or not lo <= v < 2**31):
                raise ValueError(f"{key} must be a whole number from {lo} to 2³¹ − 1, got {v!r}")
            setattr(self, key, int(v))
        try:
            self.std_pool = float(self.std_pool)
        except (TypeError, ValueError):
            raise ValueError(f"std_pool (--std-pool) must be a number of pixels ≥ 0, got {self.std_pool!r}") from None
        if not (self.std_pool >= 0 and math.isfinite(self.std_pool)):
            raise ValueError(f"std_pool (--std-pool) must be a finite number of pixels ≥ 0 (0 = raw per-voxel std), "
                             f"got {self.std_pool}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable settings."""
        d = asdict(self)
        d["params"] = None if self.params is None else self.params.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunSettings:
        """Rebuild settings (unknown keys are an error naming them)."""
        d = dict(d)
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown run settings {sorted(unknown)}")
        p = d.pop("params", None)
        if p is None:  # the tuned values for the data, filled in when the run starts
            if "method" in d and d["method"] not in (*SAMPLERS, *_baseline_names()):
                raise ValueError(f"unknown method {d['method']!r}")
            return cls(params=None, **d)
        p = dict(p)
        bad = set(p) - set(SamplerParams.__dataclass_fields__)
        if bad:
            raise ValueError(f"unknown sampler parameters {sorted(bad)}")
        from .samplers.base import PARAM_RANGES

        for k, v in p.items():
            if v in ("inf", "Infinity"):
                p[k] = float("inf")
            elif k in PARAM_RANGES:  # numbers as numbers (a hand-edited "50" or 50.0 steps), checked below
                try:
                    if isinstance(v, bool):
                        raise TypeError
                    p[k] = float(v)
                except (TypeError, ValueError):
                    raise ValueError(f"sampler parameter {k} must be a number, got {v!r}") from None
                if PARAM_RANGES[k][3] and math.isfinite(p[k]) and p[k] == int(p[k]):
                    p[k] = int(p[k])
        params = SamplerParams(**p)
        try:
            params.check()  # a value no sampler can use (n_steps −5, γ NaN) is refused here, not clamped by a widget
        except SamplingError as e:
            raise ValueError(str(e)) from None
        if "method" in d and d["method"] not in (*SAMPLERS, *_baseline_names()):
            raise ValueError(f"unknown method {d['method']!r}")
        return cls(params=params, **d)


@dataclass
class Result:
    """A finished run: the estimate, its uncertainty and the full provenance."""

    reconstruction: np.ndarray
    provenance: dict[str, Any]
    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    lower: np.ndarray | None = None
    upper: np.ndarray | None = None
    samples: np.ndarray | None = None
    residual: float | None = None
    complex_reconstruction: np.ndarray | None = None
    residual_per_sample: np.ndarray | None = None

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays to write to an output file (skipping absent ones).

        ``residual`` is the normalised data residual of the reconstruction (a 0-d array) and ``residual_per_sample``
        each posterior sample's (diffusion runs), both in the data's own domain (:func:`metrics.data_residual`).
        """
        names = ("reconstruction", "mean", "std", "lower", "upper", "samples", "complex_reconstruction",
                 "residual_per_sample")
        out = {k: getattr(self, k) for k in names if getattr(self, k) is not None}
        if "complex_reconstruction" in out:
            out["reconstruction_complex"] = out.pop("complex_reconstruction")
        if self.residual is not None:
            out["residual"] = np.asarray(self.residual, dtype=np.float64)
        return out


def intensity_mapping(measurement: Any, prior: Any, reference: torch.Tensor | None,
                      support: torch.Tensor | None = None) -> tuple[float, float, str]:
    """``(scale, offset, how)`` with image = scale · model + offset.

    Uses the measurement's declared intensity (``metadata["intensity"]``: image = a · native + b)
    composed with the prior card's normalisation when their native units agree; otherwise maps
    the model range [−1, 1] onto the 1st–99th percentile range of a classical reconstruction,
    over its pixels inside ``support`` (the operator's field of view, a boolean mask of the image's
    trailing axes; outside it the image is 0 by construction) when one is given.
    """
    meta = getattr(measurement, "metadata", None) or {}
    inten = meta.get("intensity") if isinstance(meta, dict) else None
    card = getattr(prior, "card", None)
    if inten and card is not None:
        norm = card.normalisation
        if str(inten.get("native_units", "")).lower() == str(norm.get("native_units", "")).lower():
            a, b = float(inten["scale"]), float(inten["offset"])
            return a * norm["scale"], a * norm["offset"] + b, f"declared ({inten.get('native_units')})"
    if reference is None:
        return 1.0, 0.0, "identity"
    ref = reference.abs() if reference.is_complex() else reference
    if support is not None:
        ref = ref[..., support]
    ref = ref.flatten().float().cpu()
    ref = ref[:: -(-ref.numel() // 2**24)]  # torch.quantile takes at most 2^24 values: an even subsample of larger ones
    lo, hi = torch.quantile(ref, torch.tensor([0.01, 0.99])).tolist()
    if card is not None and getattr(prior, "channels", 1) == 2:
        # complex priors: no offset (phase); native magnitude 1 ≈ the image's bright end
        top = float(torch.quantile(ref, 0.995))
        how = "estimated from the classical reconstruction's 99.5% magnitude"
        return max(top, 1e-12) * float(card.normalisation["scale"]), 0.0, how
    if card is not None and card.modality in ("mri",):  # magnitude images: background at −1
        lo = 0.0
    half = max((hi - lo) / 2, 1e-6 * max(abs(hi), 1.0))
    return half, (hi + lo) / 2, "estimated from the classical reconstruction's 1–99% range"


def _baseline(method: str, operator, m: torch.Tensor, likelihood, params: dict[str, Any],
              info: dict[str, Any] | None = None) -> torch.Tensor:
    from .baselines import reconstruct_baseline

    return reconstruct_baseline(method, operator, m, likelihood, info=info, **params)


def _used(info: dict[str, Any]) -> dict[str, Any]:
    """What a classical method ran with, for the provenance: every parameter (defaults included) and, for EM, the
    iterations taken."""
    out = dict(info.get("params") or {})
    for k in ("iters_run", "stopped_at_noise_floor"):
        if k in info:
            out[k] = info[k]
    return out


# The classical image of a run that is not hot-started (the intensity mapping's and the support map's reference).
_REFERENCE_METHOD = {"ct": "fbp", "pet": "mlem", "mri": "cg"}
# CT's hot start is TV instead of FBP where FBP's streaks or missing wedge are more than the reverse process started
# at t0 removes: up to 30 views, or an arc under 160°. DDS-hot (tuned values), mean of 8 samples on the benchmark's real
# CT slice, TV start − FBP start (benchmarks/results/hot_start.md, since the projector ignores the pixels outside the
# field of view, 2026-12-06 late): 8 / 12 / 14 / 16 / 23 / 30 views +2.95 / +2.30 / +1.61 / +1.21 / +0.27 / +0.24 dB,
# 45 / 90 views −0.02 / −0.01; arcs 90 / 120 / 135 / 140 / 150° +4.56 / +4.36 / +4.00 / +3.61 / +1.16, 160 / 170°
# +0.00 / +0.04; low-dose CT (180 views) +0.03. Where the two tie, FBP is kept: it costs nothing, TV 1–7 s. (Before
# that change FBP led from 14 views and 150° on: the artificial edge at the disc's rim cost TV more than FBP.)
# PET starts from TV too: the 10-iteration MLEM start is noisier than TV's image, which t0 0.4 does not undo (DDS-hot
# mean of 8, TV − MLEM start: pet-low +0.71 / +0.72 dB with seeds 0 / 1, the shipped pet_lowcount sample +1.29; DPS /
# MCG / Song +0.84 / +0.26 / +0.24; measured before the field-of-view change).
# MRI stays CG: a TV start was −0.12 to +0.60 dB (docs/dev/recon.md, 2026-12-06 night).
TV_HOT_START_MAX_VIEWS = 30
TV_HOT_START_MAX_ARC = 160.0


def default_hot_start(measurement: Any) -> str:
    """The classical reconstruction a hot-started diffusion run starts from, for these data.

    MRI: CG (SENSE); PET: TV; CT: FBP, or TV when there are at most :data:`TV_HOT_START_MAX_VIEWS` views or they
    span an arc under :data:`TV_HOT_START_MAX_ARC` degrees (:func:`napari_diffrecon.physics.ct.angular_coverage`).

    Parameters
    ----------
    measurement : Measurement or dict
        The data, or its operator spec.

    Returns
    -------
    str
        A baseline name for ``RunSettings.hot_start`` / ``--hot-start``.
    """
    spec = measurement if isinstance(measurement, dict) else (getattr(measurement, "operator", None) or {})
    modality = str(spec.get("modality", "")).lower()
    if modality == "ct" and spec.get("angles_deg") is not None:
        from .physics.ct import angular_coverage

        return ct_hot_start(*angular_coverage(spec["angles_deg"]))
    if modality == "pet":
        return "tv"
    return _REFERENCE_METHOD.get(modality, "cg")


def ct_hot_start(views: int, arc: float) -> str:
    """CT's hot start for ``views`` distinct views spanning ``arc`` degrees: "tv" for at most
    :data:`TV_HOT_START_MAX_VIEWS` views or an arc under :data:`TV_HOT_START_MAX_ARC`, else "fbp"."""
    return "tv" if views <= TV_HOT_START_MAX_VIEWS or arc < TV_HOT_START_MAX_ARC else "fbp"


def resolve_settings(settings: RunSettings, measurement: Any) -> RunSettings:
    """``settings`` as they run on ``measurement``: ``hot_start="auto"`` replaced by the data's start
    (:func:`default_hot_start`), and no ``params`` (``RunSettings``' default) by the benchmark-tuned values for the
    method and these data (``samplers.defaults.recommended_params`` with :func:`data_kind`, as the CLI and the
    workbench start from; ``SamplerParams()`` are untuned generic values)."""
    if settings.hot_start == "auto":
        settings = replace(settings, hot_start=default_hot_start(measurement))
    if settings.params is None:
        from .samplers.defaults import recommended_params

        modality, coils, noisy = data_kind(measurement)
        method = settings.method if settings.method in SAMPLERS else "dds"  # a classical run reads none of them
        settings = replace(settings, params=recommended_params(method, modality, bool(settings.hot_start),
                                                               coils=coils, noisy=noisy))
    return settings


# Song 2022 and MCG end on a hard projection onto the measurements, which assumes (nearly) noise-free linear data.
# On noisy data (samplers.defaults.noisy_data: counts, or a noise floor above NOISY_FLOOR = 1.8 %) their tuned
# pseudo-inverse takes one CG step instead of 5, which keeps them near FBP / MLEM / DDS instead of 6–14 dB below, but
# DDS stays ahead (benchmarks/recon.py, docs/dev/recon.md): low-dose CT −2.5 / −2.8 dB (song / mcg), PET −1.4 / +0.4
# (against DDS from noise; DDS-hot 18.0 dB beats both), MRI 4× with 8 coils −3.5 / −3.1; with the noise scaled, MRI
# 8 coils −0.05 / −0.9 dB at floors 3 / 6 %.
HARD_PROJECTION_METHODS = ("song", "mcg")
# A finished sample whose data residual is below this fraction of the noise floor reproduces the noise.
NOISE_FIT_RATIO = 0.5
# A finished conditional sample (or a classical TV / CG / EM image) whose data residual exceeds this many times the
# noise floor, and UNDER_FIT_MIN of the measurement's norm, does not fit the measurements (tuned benchmark runs: at most
# 3.5× — DPS on CT 23 views; classical rows ≤ 1×; DPS with 10 steps instead of 100 on a 64² CT: 50×; DPS at ζ = 1e3:
# 3800×; CT_small's whole square, past the field of view, at 23 views: 13×).
UNDER_FIT_RATIO = 10.0
UNDER_FIT_MIN = 0.05


def _misfit(residual: float, floor: float | None) -> str | None:
    """How a result's data residual compares with the noise floor: "noise" (it fits the noise), "under" (it does
    not fit the measurements) or None (plausible, or no known floor)."""
    if not floor:
        return None
    if residual < NOISE_FIT_RATIO * floor:
        return "noise"
    if residual > max(UNDER_FIT_RATIO * floor, UNDER_FIT_MIN):
        return "under"
    return None


def _past_the_field_of_view(operator: Any) -> str:
    """The under-fit warning's clause for operators with a field of view (CT / PET): truncated data cannot be fitted."""
    if getattr(operator, "support", None) is None:
        return ""
    return ("; or the object extends past the scanned disc (the field of view, outside which the model — like "
            "scikit-image's radon with circle=True — holds nothing): then reconstruct on a grid as wide as the object")


def noise_is_assumed(noise: dict[str, Any] | None) -> bool:
    """True when the measurement's noise level is a reader's default, not a property of the data."""
    noise = noise or {}
    note = str(noise.get("note", ""))
    return bool(noise.get("assumed")) or note.startswith("default") or note.startswith("no noise scan")


def noise_floor_text(provenance: dict[str, Any] | None, fmt: str = ".4g") -> str:
    """`` (noise floor 0.0123)`` (``, assumed`` when the noise level is a reader's default) for a status line that
    shows a data residual; empty when the provenance has no floor."""
    prov = provenance or {}
    floor = prov.get("noise_floor")
    if not floor:
        return ""
    return f" (noise floor {floor:{fmt}}{', assumed' if prov.get('noise_floor_assumed') else ''})"


def check_device(device: str | torch.device) -> torch.device:
    """The torch device named by ``device``, or a ValueError saying why this machine cannot run on it.

    Raises
    ------
    ValueError
        An unknown device name, CUDA without a CUDA build of PyTorch or without a GPU, a CUDA index beyond the
        GPUs present, or MPS where Metal is not available.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {device!r} ({e}); use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this PyTorch has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"device {device!r} is not available: {why} (torch {torch.__version__}); use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} is not available: {torch.cuda.device_count()} CUDA GPU(s) here")
    if dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError(f"device {device!r} is not available: no Apple Metal (MPS) backend here; use cpu")
    return dev


def prior_mismatch(card: Any, measurement: Any) -> str | None:
    """Why a prior cannot serve a measurement (None when it fits): modality, complex/real, resolution.

    One rule for the CLI (:func:`prepare_run` refuses the run) and the workbench (which greys the run out and
    says why). ``measurement`` is a :class:`~napari_diffrecon.io.Measurement`; ``card`` a prior's model card
    (None for an analytic prior: nothing to check).
    """
    if card is None or measurement is None:
        return None
    return (modality_mismatch(card, str(measurement.operator.get("modality", "")))
            or resolution_mismatch(measurement.operator.get("image_shape") or [], card))


def modality_mismatch(card: Any, modality: str) -> str | None:
    """Why a prior cannot serve data of ``modality`` (None when it can): complex/real, then the modality it was
    trained on. :func:`prior_mismatch`'s first two checks, also what a volume run checks before it starts."""
    complex_ = modality == "mri"
    if card.channels != (2 if complex_ else 1):
        kind = "complex (2-channel)" if complex_ else "real (1-channel)"
        return (f"prior {card.name!r} is {'complex' if card.channels == 2 else 'real'} but {modality.upper()} "
                f"needs a {kind} prior: pick a {modality.upper()} prior or load one from file")
    if card.modality not in (modality, "generic"):
        return (f"prior {card.name!r} was trained on {card.modality.upper()} images, the measurement is "
                f"{modality.upper()}: pick a {modality.upper()} prior or load one from file")
    return None


def _prior_notes(method: str, prior: Any) -> list[str]:
    """Warnings about the prior a run will use: the few-step consistency sampler on a diffusion prior."""
    if method != "consistency" or getattr(prior, "is_consistency", True):
        return []
    card = getattr(prior, "card", None)
    name = card.name if card is not None else type(prior).__name__
    return [f"the consistency sampler runs on {name!r}, a diffusion prior, not a consistency model (none ships for "
            "this modality, or another prior was chosen): each jump is the denoiser's estimate, which blurs at 1–4 "
            "steps; use dds, or distil a consistency model (napari-diffrecon distill)"]


def _noise_notes(method: str, likelihood: Any, floor: float | None, assumed: bool,
                 cg_iters: int | None = None) -> list[str]:
    """Warnings known before a run: an unconditional sampler; a hard-projection sampler on noisy or count data."""
    from .physics.likelihoods import PoissonLikelihood, TransmissionLikelihood
    from .samplers.defaults import NOISY_FLOOR, noisy_data

    if method in UNCONDITIONAL:
        return [f"{method} is an unconditional sampler: it draws images from the prior and ignores the measurement "
                "(it is for checking a prior); to reconstruct use dds, dps, mcg, song or consistency"]
    if method not in HARD_PROJECTION_METHODS or not noisy_data(likelihood, floor, assumed):
        return []
    head = f"{method} ends on a hard projection onto the measurements, which assumes nearly noise-free linear data"
    steps = ("" if cg_iters is None or cg_iters <= 1 else
             f"; with {cg_iters} CG steps per projection it also puts the noise back into the image (the tuned value "
             "for noisy data is 1: CG steps 1, --cg-iters 1)")
    if isinstance(likelihood, (PoissonLikelihood, TransmissionLikelihood)):
        return [f"{head}; on count data song and mcg were up to 2.8 dB below dds in our benchmark (low-dose CT; on "
                f"PET song −1.4 dB, mcg level with dds from noise and below its hot start){steps}: use dds (or dps)"]
    behind = ("song fell behind dds in our benchmark, by more the noisier the data (MRI 4× with 8 coils: −0.05 dB "
              "at 0.03, −0.9 at 0.06, −3.5 at 0.12)" if method == "song" else
              "mcg fell behind dds in our benchmark (MRI 4× with 8 coils at 0.12: −3.1 dB; song, measured at more "
              "noise levels, by more the noisier the data)")
    return [f"{head}; this measurement's noise alone leaves a data residual of {floor:.3g}, and above "
            f"{NOISY_FLOOR:g} {behind}{steps}: use dds (or dps)"]


def _orientation_notes(settings: RunSettings) -> list[str]:
    """A warning when the orientation ensemble runs from pure noise, where it was measured to cost dB (it is tuned
    for hot starts: :attr:`SamplerParams.orientations`)."""
    p = settings.params
    if settings.method in UNCONDITIONAL or settings.n_samples < 2 or int(p.orientations) < 2 or float(p.t0) < 1:
        return []
    return [f"orientations = {int(p.orientations)} from pure noise: each turned sample lays out the anatomy the prior "
            "learned upright in a turned orientation where the data leave it open (means of 8 on our CT benchmark: "
            "−1.5 dB at a 90° arc, −0.04 to +0.4 elsewhere); the ensemble is tuned for hot starts — use a hot "
            "start, or orientations 1"]


def _count_notes(data: Any, likelihood: Any) -> list[str]:
    """A warning when count data (Poisson / transmission) are not whole numbers: precorrected sinograms (randoms or
    scatter subtracted, normalised) are not Poisson, and the noise floor, MLEM's stopping rule and the EM data steps
    assume they are."""
    from .physics.likelihoods import PoissonLikelihood, TransmissionLikelihood

    if not isinstance(likelihood, (PoissonLikelihood, TransmissionLikelihood)):
        return []
    d = np.asarray(data, dtype=np.float64)
    off = float(np.abs(d - np.round(d)).max()) if d.size else 0.0
    if off <= 1e-3:
        return []
    return [f"the measurement's counts are not whole numbers (up to {off:.3g} off): {likelihood.name} noise is "
            "assumed for raw counts; precorrected data (randoms / scatter subtracted, normalised) make the noise "
            "floor, MLEM / OSEM's stop at the noise level and the EM data steps unreliable — give the raw counts "
            "with the correction as the background, or a Gaussian noise model"]


#: Share of the k-space samples a mask marks as measured that may be exactly 0 before a run warns (an acquisition has
#: few: zero-padded readout edges; zero-filled k-space stored with a mask of all ones has 1 − 1/R of them, ≥ 50 %).
ZERO_SAMPLES_WARN = 0.4


def _mask_notes(measurement: Any) -> list[str]:
    """A warning when many k-space samples the MRI mask marks as measured are exactly 0: undersampled k-space stored
    zero-filled with a mask of all ones (not its sampling mask), whose zeros a run takes as data."""
    spec = getattr(measurement, "operator", None) or {}
    if str(spec.get("modality")) != "mri":
        return []
    data = np.asarray(measurement.data)
    mask = spec.get("mask")
    mask = np.ones(data.shape[-2:], bool) if mask is None else np.asarray(mask) > 0
    measured = np.broadcast_to(mask, data.shape)
    n = int(measured.sum())
    zero = float((data[measured] == 0).sum()) / n if n else 0.0
    if zero <= ZERO_SAMPLES_WARN:
        return []
    return [f"{zero:.0%} of the k-space samples the mask marks as measured are exactly 0: undersampled k-space stored "
            "zero-filled with a mask of all ones? Those zeros are taken as measurements of 0 (the result tends to "
            "the zero-filled image); store operator.mask (1 where k-space was acquired)"]


#: Share of a post-log CT sinogram's total |value| that may be negative before a run warns: line integrals of
#: attenuation are ≥ 0, so only noise dips below 0 (a few % of the total near the object's edges); a sinogram of an
#: image in HU (air −1000) is mostly negative.
NEGATIVE_SINOGRAM_WARN = 0.2


def _sinogram_notes(measurement: Any) -> list[str]:
    """A warning when a Gaussian (post-log) CT sinogram is largely negative: projections of an image in HU, not of
    attenuation, which no attenuation image fits."""
    spec = getattr(measurement, "operator", None) or {}
    noise = getattr(measurement, "noise", None) or {}
    if str(spec.get("modality")) != "ct" or str(noise.get("model", "gaussian")) != "gaussian":
        return []
    d = np.asarray(measurement.data, dtype=np.float64)
    total = float(np.abs(d).sum())
    negative = float(-d[d < 0].sum()) / total if total > 0 else 0.0
    if negative <= NEGATIVE_SINOGRAM_WARN or float(d.mean()) >= 0:  # noise is zero-mean: valid data average above
        return []  # 0 however noisy (a small object in much air, σ 0.5: 23 % negative, mean > 0)
    return [f"{negative:.0%} of the sinogram's total is negative, but line integrals of attenuation are ≥ 0 (only "
            "noise dips below 0): projections of an image in Hounsfield units? Project attenuation, μ = μ_water · (1 + "
            "HU / 1000) per pixel (`napari-diffrecon simulate` does), or check the log / blank-scan normalisation"]


def _kspace_notes(measurement: Any) -> list[str]:
    """A warning when MRI k-space looks stored in another FFT convention: its largest sample (the DC term of an image)
    far from the array's centre, as ``np.fft.fft2`` without ``fftshift`` leaves it (the centred convention:
    :mod:`napari_diffrecon.physics.mri`)."""
    spec = getattr(measurement, "operator", None) or {}
    if str(spec.get("modality")) != "mri":
        return []
    data = np.abs(np.asarray(measurement.data))
    energy = (data**2).reshape(-1, *data.shape[-2:]).sum(0)  # coils summed
    h, w = energy.shape
    r, c = np.unravel_index(int(np.argmax(energy)), energy.shape)
    if abs(r - h // 2) <= h // 4 and abs(c - w // 2) <= w // 4:
        return []
    return [f"the largest k-space sample is at row {r}, column {c}, far from the centre ({h // 2}, {w // 2}) where an "
            "image's DC term lies in the centred convention this package uses, k = fftshift(fft2(ifftshift(x))) "
            "(orthonormal): k-space stored without fftshift (np.fft.fft2's order)? Shift it with np.fft.fftshift "
            "over the last two axes (the mask too)"]


def _data_notes(measurement: Any) -> list[str]:
    """Warnings on measurements that no image of the modality's model fits as stored (see each check)."""
    return _mask_notes(measurement) + _kspace_notes(measurement) + _sinogram_notes(measurement)


def data_kind(measurement: Any) -> tuple[str, int | None, bool]:
    """What the tuned sampler values depend on besides the method: ``(modality, coils, noisy)``.

    The arguments of :func:`napari_diffrecon.samplers.defaults.recommended_params` after the method and the hot start
    (the CLI, the workbench and the benchmark all take them from here). ``coils``: MRI receive coils, else None;
    ``noisy``: counts, or a noise floor above 1.8 % (:func:`napari_diffrecon.samplers.defaults.noisy_data`).

    Parameters
    ----------
    measurement : Measurement
        The data (its operator and noise specs and the measured array; no operator is built).

    Returns
    -------
    tuple
        ``(modality, coils, noisy)``.
    """
    from .metrics import noise_floor
    from .samplers.defaults import coil_count, noisy_data

    spec = getattr(measurement, "operator", None) or {}
    modality = str(spec.get("modality", "*"))
    noisy = False
    if getattr(measurement, "data", None) is not None:
        likelihood = measurement.build_likelihood("cpu")
        # counts are noisy whatever their floor (and the transmission floor's bootstrap is the costly one)
        floor = None if noisy_data(likelihood, None) else noise_floor(None, measurement.to_tensor(), likelihood)
        noisy = noisy_data(likelihood, floor, noise_is_assumed(measurement.noise))
    return modality, coil_count(spec), noisy


# A hot start wants a low-noise start image: a fixed 10 MLEM iterations (benchmarks/recon.py, PET 1e5 counts: 16.1 dB
# at 10 iterations, 9 dB at 40), the count the DDS-hot defaults were tuned with (the classical MLEM's own default now
# stops at the noise level, which takes about as many on these data).
HOT_START_DEFAULTS: dict[str, dict[str, Any]] = {"mlem": {"iters": 10}, "osem": {"iters": 2}}


def hot_start_params(method: str, settings: RunSettings) -> dict[str, Any]:
    """The classical method's parameters for a start image: :data:`HOT_START_DEFAULTS` under the run's own
    ``baseline_params``."""
    return {**HOT_START_DEFAULTS.get(method, {}), **dict(settings.baseline_params)}


def prepare_run(
    measurement: Any, settings: RunSettings, prior: Any = None,
    start_image: tuple[torch.Tensor, dict[str, Any]] | None = None,
) -> tuple[Problem, Callable[[], Iterator[Iterate]], dict[str, Any]]:
    """Build the problem and a zero-argument function that starts the sampler generator.

    Parameters
    ----------
    measurement : Measurement
        From :func:`napari_diffrecon.io.read_measurement` (or built in memory).
    settings : RunSettings
        A snapshot of the run's settings (the live ``settings.params`` object is what the
        sampler reads every step).
    prior : Prior, optional
        Already-loaded prior; otherwise loaded from ``settings.prior`` (name or path) or the
        default shipped prior of the modality.
    start_image : (torch.Tensor, dict), optional
        The hot start's classical image, already computed with :func:`hot_start_params` (e.g. to show it beside the
        run), and the parameters it used (its result's ``baseline_params_used``): not computed again.

    Returns
    -------
    problem, start, info
        ``start()`` returns the generator of iterates (``start(yield_every=1)`` yields every step);
        ``info`` holds provenance pieces.
    """
    from .priors import default_prior_for, load_prior

    _validate_input(measurement)
    device = check_device(settings.device)
    operator = measurement.build_operator(device)
    likelihood = measurement.build_likelihood(device)
    m = measurement.to_tensor(device)
    modality = operator.modality
    if isinstance(prior, (str, Path)):  # a shipped name or a card path, as settings.prior takes
        prior = load_prior(str(prior), device)
    if prior is None:
        name = settings.prior or default_prior_for(
            modality, operator.is_complex, consistency=settings.method == "consistency"
        )
        if name is None:
            raise SamplingError(
                f"no shipped prior for {modality} ({'complex' if operator.is_complex else 'real'} images); "
                "pass --prior PATH to a trained prior (napari-diffrecon train ...)"
            )
        prior = load_prior(name, device)
    else:
        prior = prior.to(device)
    if hasattr(prior, "network"):  # every run states its own precision (a cached prior keeps no earlier run's)
        prior.precision = settings.precision
    card = getattr(prior, "card", None)
    why = prior_mismatch(card, measurement) if hasattr(measurement, "operator") else None
    if why:
        raise SamplingError(why)
    settings = resolve_settings(settings, measurement)
    # without a hot start the classical image is only a reference (intensity mapping, support map): the modality's
    # cheap one, whatever default_hot_start would pick
    hs_method = settings.hot_start or _REFERENCE_METHOD.get(modality)
    reference = None
    hs_used: dict[str, Any] = {}
    if hs_method and start_image is not None and settings.hot_start:
        if tuple(start_image[0].shape) != tuple(operator.image_shape):
            raise SamplingError(f"start image of shape {tuple(start_image[0].shape)} for an operator of image shape "
                                f"{operator.image_shape}")
        reference = start_image[0].to(device=device, dtype=operator.image_dtype)
        hs_used = dict(start_image[1])
    elif hs_method:
        ran: dict[str, Any] = {}
        reference = _baseline(hs_method, operator, m, likelihood, hot_start_params(hs_method, settings), ran)
        hs_used = _used(ran)
    from .metrics import noise_floor

    floor = noise_floor(operator, m, likelihood)
    assumed = noise_is_assumed(getattr(measurement, "noise", None))
    scale, offset, how = intensity_mapping(measurement, prior, reference, support=operator.support)
    problem = Problem(operator, m, prior, likelihood, scale=scale, offset=offset, nonneg=modality == "pet")
    sampler = get_sampler(settings.method)
    # the start image continues past the field of view (CT / PET), where the classical image is zero: no edge there
    x_init = operator.fill_outside(reference) if settings.hot_start else None
    if settings.hot_start and settings.params.t0 >= 1:
        raise SamplingError("a hot start needs --t0 below 1 (e.g. 0.3): the fraction of the schedule to run")

    def start(**kw: Any) -> Iterator[Iterate]:
        """The sampler's generator; ``kw`` goes to the sampler (e.g. ``yield_every=1``, ``min_interval``)."""
        return sampler(problem, settings.params, n_samples=settings.n_samples, seed=settings.seed, x_init=x_init, **kw)

    info = {
        "prior": card.name if card is not None else type(prior).__name__,
        "prior_source": getattr(prior, "source", None),  # shipped name or card path (load_prior), None when unknown
        "prior_card": json.loads(card.to_json()) if card is not None else None,
        "intensity_mapping": {"scale": scale, "offset": offset, "how": how},
        "hot_start_method": settings.hot_start,
        "reference_method": hs_method,
        "reference_params_used": hs_used,  # the classical image the hot start / intensity mapping came from
        "noise_floor": floor,
        "noise_floor_assumed": assumed,
        "conditional": settings.method not in UNCONDITIONAL,
        "warnings": _noise_notes(settings.method, likelihood, floor, assumed, int(settings.params.cg_iters))
        + _prior_notes(settings.method, prior) + _count_notes(measurement.data, likelihood)
        + _data_notes(measurement) + _orientation_notes(settings),
    }
    return problem, start, info


def provenance(measurement: Any, settings: RunSettings, extra: dict[str, Any]) -> dict[str, Any]:
    """The provenance record: input file and hash, operator summary, every setting, versions."""
    spec = getattr(measurement, "operator", {}) or {}
    op_summary = {k: v for k, v in spec.items() if not isinstance(v, (np.ndarray, torch.Tensor))}
    if "angles_deg" in op_summary:
        op_summary["n_angles"] = len(op_summary["angles_deg"])
    path = getattr(measurement, "path", None)
    rec = {
        "software": "napari-diffrecon",
        "software_version": __version__,
        "torch_version": torch.__version__,
        "measurement_file": str(path) if path else None,
        "measurement_sha256": file_sha256(path),
        "operator": op_summary,
        "noise": {k: v for k, v in (getattr(measurement, "noise", {}) or {}).items() if not isinstance(v, np.ndarray)},
        "settings": settings.to_dict(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    meta = getattr(measurement, "metadata", None)
    inten = meta.get("intensity") if isinstance(meta, dict) else None
    if isinstance(inten, dict):  # how the images' values map to native units (CT: HU), for exports of the result
        rec["measurement_intensity"] = inten
    if extra.get("prior_card") is not None and not _names_prior(rec["settings"].get("prior"), extra):
        # the prior that ran is not the one the settings name (a prior object was passed, or None = the default):
        # record where it came from, so that rerunning these settings loads it
        rec["settings"]["prior"] = extra.get("prior_source") or extra.get("prior")
    rec.update(extra)
    return json.loads(json.dumps(rec, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def _names_prior(named: str | None, extra: dict[str, Any]) -> bool:
    """Whether ``settings.prior`` (a shipped name or a card path) designates the prior that ran."""
    if not named:
        return False
    used, source = extra.get("prior"), extra.get("prior_source")
    if named in (used, source) or (source is not None and str(Path(named).resolve()) == source):
        return True
    return _card_name(named) == used


def _card_name(name_or_path: str) -> str | None:
    """The name on a prior card (``settings.prior`` may be a ``.json`` / ``.safetensors`` path), or None when it is
    not a path to a readable card."""
    from .priors import CardError, ModelCard

    path = Path(name_or_path)
    if path.suffix not in (".json", ".safetensors"):
        return None
    try:
        return ModelCard.read(path.with_suffix(".json")).name
    except (OSError, CardError):
        return None


def finish_diffusion_run(
    problem: Problem, last: Iterate, info: dict[str, Any], t_start: float, std_pool: float = DEFAULT_STD_POOL
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, Any]]:
    """The samples (CPU), their summary and the provenance record of a finished diffusion run.

    Shared by :func:`reconstruct` and the GUI's worker; ``std_pool`` is passed to
    :func:`~napari_diffrecon.uncertainty.summarize`.

    Raises
    ------
    SamplingError
        When a sample's final data residual is not finite.
    """
    samples = last.x0_hat.detach().cpu()
    summary = summarize(samples, std_pool=std_pool, nonneg=bool(getattr(problem, "nonneg", False)))
    res_mean = float(problem.residual(samples.mean(0, keepdim=True).to(problem.device))[0])
    extra = {
        "kind": "diffusion",
        **info,
        "nfe": last.nfe,
        "wall_time_s": time.perf_counter() - t_start,
        "data_residual_per_sample": [float(v) for v in last.data_residual.cpu()],
        "data_residual_of_mean": res_mean,
        "interval": (f"{summary['interval_method']}: holds one more posterior draw with probability 0.95"
                     if "interval_method" in summary else None),
    }
    if not all(math.isfinite(v) for v in extra["data_residual_per_sample"]):
        raise SamplingError("the run finished with a non-finite data residual")
    floor = info.get("noise_floor")
    low, high = min(extra["data_residual_per_sample"]), max(extra["data_residual_per_sample"])
    known = floor and not info.get("noise_floor_assumed")
    if known and _misfit(low, floor) == "noise":
        extra["warnings"] = [*info.get("warnings", []), (
            f"the data residual ({low:.3g}) is below half the noise floor ({floor:.3g}, what the measurement noise "
            "alone leaves): the samples fit the noise, and the image may carry it amplified; lower the data weight "
            "(gamma for dds, zeta for dps and mcg, lam for song and mcg)")]
    if known and info.get("conditional", True) and _misfit(high, floor) == "under":
        extra["warnings"] = [*extra.get("warnings", info.get("warnings", [])), (
            f"a sample's data residual ({high:.3g}) is {high / floor:.0f}× the noise floor ({floor:.3g}): the samples "
            "do not fit the measurements; run more steps, raise the data weight (gamma for dds, zeta for dps) or, "
            "if the residual grew during the run, lower a step size that is too large"
            + _past_the_field_of_view(problem.operator))]
    return samples, summary, extra


def reconstruct(
    measurement: Any,
    settings: RunSettings,
    prior: Any = None,
    callback: Callable[[Iterate], Any] | None = None,
    notify: Callable[[str], Any] | None = None,
) -> Result:
    """Run a reconstruction to the end (CLI and tests); the GUI drives :func:`prepare_run` itself.

    ``settings.method`` may be a diffusion sampler (``dds``, ``dps``, ...) or a classical
    baseline (``fbp``, ``cg``, ``tv``, ``mlem``, ...). ``notify`` receives each warning known before
    the first step (all of them are in the result's ``provenance["warnings"]`` as well).
    """
    t0 = time.perf_counter()
    if settings.method not in SAMPLERS:
        from .baselines import BASELINES

        _validate_input(measurement)
        if settings.method not in BASELINES:
            raise ValueError(
                f"unknown method {settings.method!r}; diffusion samplers: {', '.join(SAMPLERS)}; "
                f"classical: {', '.join(BASELINES)}"
            )
        device = check_device(settings.device)
        op = measurement.build_operator(device)
        m_t, lik = measurement.to_tensor(device), measurement.build_likelihood(device)
        ran: dict[str, Any] = {}
        x = _baseline(settings.method, op, m_t, lik, dict(settings.baseline_params), ran)
        from .metrics import data_residual, noise_floor

        res = float(data_residual(op, x, m_t, lik))
        floor, assumed = noise_floor(op, m_t, lik), noise_is_assumed(measurement.noise)
        warns = _count_notes(measurement.data, lik) + _data_notes(measurement)
        misfit = None if assumed else _misfit(res, floor)
        if misfit == "noise" and settings.method == "zero_filled":  # it fits the sampled k-space by construction
            misfit = None
        if misfit == "noise":
            warns.append(f"the data residual ({res:.3g}) is below half the noise floor ({floor:.3g}, what the "
                         f"measurement noise alone leaves): {settings.method} fits the noise, and the image carries it "
                         "amplified; " + ("it has no iterations to stop early: use " if settings.method == "fbp"
                                          else "use fewer iterations or ")
                         + "a regularised method (tv, mlem / osem with their default stop, or a diffusion sampler)")
        if misfit == "under" and settings.method not in ("fbp", "zero_filled"):
            warns.append(f"the data residual ({res:.3g}) is {res / floor:.0f}× the noise floor ({floor:.3g}): "
                         f"{settings.method} does not fit the measurements; lower its regularisation (lam_rel, damp) "
                         "or raise its iterations, check the noise level and the geometry"
                         + _past_the_field_of_view(op))
        xc = x.detach().cpu()
        prov = provenance(
            measurement,
            settings,
            {"kind": "classical", "wall_time_s": time.perf_counter() - t0, "data_residual": res,
             "baseline_params_used": _used(ran), "warnings": warns,
             "noise_floor": floor, "noise_floor_assumed": assumed},
        )
        prov["settings"].pop("params", None)  # the diffusion samplers' parameters: not used by a classical method
        return Result(
            reconstruction=(xc.abs() if xc.is_complex() else xc).numpy().astype(np.float32),
            complex_reconstruction=xc.numpy().astype(np.complex64) if xc.is_complex() else None,
            provenance=prov,
            residual=res,
        )
    settings = resolve_settings(settings, measurement)  # the provenance records the start used, not "auto"
    problem, start, info = prepare_run(measurement, settings, prior)
    if notify is not None:
        for w in info.get("warnings", []):
            notify(w)
    last = None
    n_yields = 0
    for it in start():
        n_yields += 1
        last = it
        if callback is not None:
            callback(it)
    assert last is not None and last.done
    samples, summary, extra = finish_diffusion_run(problem, last, info, t0, settings.std_pool)
    res_mean = extra["data_residual_of_mean"]
    mean = summary["mean"].numpy().astype(np.float32)
    prov = provenance(measurement, settings, extra)
    cplx = samples.mean(0).numpy().astype(np.complex64) if samples.is_complex() else None
    return Result(
        reconstruction=mean,
        mean=mean,
        std=summary["std"].numpy().astype(np.float32),
        lower=summary.get("lower").numpy().astype(np.float32) if "lower" in summary else None,
        upper=summary.get("upper").numpy().astype(np.float32) if "upper" in summary else None,
        samples=(samples.abs() if samples.is_complex() else samples).numpy().astype(np.float32)
        if settings.keep_samples
        else None,
        residual=res_mean,
        complex_reconstruction=cplx,
        residual_per_sample=np.asarray(extra["data_residual_per_sample"], dtype=np.float64),
        provenance=prov,
    )
