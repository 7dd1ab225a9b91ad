"""Recommended sampler parameters per modality, tuned on ``benchmarks/recon.py`` (see its README table).

Starting points were the papers' defaults (DDS: 50 DDIM steps, η 0.85, 5 CG steps; DPS: ζ 0.3–1,
ancestral steps; Song 2022: CT λ ≈ 0.84, MRI λ = 1; MCG: λ 1 → 0.6). Step counts are cut for CPUs.
"""

from __future__ import annotations

from typing import Any

from .base import SamplerParams

__all__ = ["RECOMMENDED", "NOISY_FLOOR", "recommended_params", "coil_count", "noisy_data", "tuning_keys"]

#: Data count as *noisy* when they are counts (PET, low-dose CT) or Gaussian with a noise floor (the data residual
#: the noise alone leaves, :func:`napari_diffrecon.metrics.noise_floor`) above this. Evidence:
#: `python benchmarks/mri_more.py song-noise` (benchmarks/results/song_noise.md), MRI 4× 8 coils and CT 23 views with
#: the noise scaled, Song's 5-step pseudo-inverse against 1 step: MRI floors 0.95 / 1.59 / 2.22 / 3.17 / 6.34 % →
#: 34.05 / 31.54 / 29.06 / 25.91 / 19.14 dB with 5 steps, 30.76 / 30.64 / 30.43 / 30.00 / 27.84 with 1; CT floors
#: 0.79 / 1.99 / 3.97 % → 28.08 / 23.31 / 17.93 against 26.96 / 24.68 / 21.28. 1.8 % lies inside both crossovers (MRI
#: at 1.81 %: 30.65 with 5 steps, 30.57 with 1, DDS 30.85 ahead of both). Also where song and mcg warn
#: (reconstruct._noise_notes).
NOISY_FLOOR = 0.018

# method -> modality ("*" = any) -> parameter overrides of SamplerParams' defaults.
# Tuned on benchmarks/recon.py's tasks (ground truth known; see /work/notes/recon.md for the grids).
RECOMMENDED: dict[str, dict[str, dict[str, Any]]] = {
    # DDS re-noise (2026-12-07, SamplerParams.renoise): the DDS code's step x̃0 + σ′(η z + √(1−η²) ε̂_θ) with the
    # network's ε̂_θ, at η = 1 (all fresh noise), beat the exact DDIM step with ε̂ recomputed from x̃0 (which keeps only
    # 1 − σ′²/σ² of the data step's correction in the next state) on all nine benchmark tasks. One sample, DDS from
    # noise | hot-started: CT 23 / 8 views, 90° arc, low dose +1.30 | +0.59, +3.14 | +0.44, +0.98 | +0.20, +0.78 |
    # +0.73 dB; MRI 4×, 4× 8 coils, 8×, 8× 8 coils +1.99 | +1.67, +2.06 | +1.48, +3.54 | +1.99, +2.80 | +1.99; PET
    # +0.92 | +0.31. The DDS code's η 0.85 was below 1 on every CT task (−0.3 to −1.0 dB); MRI (2026-12-07 scratch
    # runs, mean of 4) η 0.5 / 0.7 / 0.85 / 0.95 / 1: 21.80 / 23.38 / 24.20 / 24.51 / 24.56 dB. The cost: at η = 1 each
    # step keeps only the data step's *mean* of x0 | x_σ, m, so the samples spread less than the posterior (half its
    # variance with the Gaussian prior's exact denoiser: tests/test_samplers.py) and the 95 % intervals hold the truth
    # less often (CT 47–58 % against 61–68 %, MRI ~67 % against 78–89 %); ρ(std, error) is unchanged or higher.
    # Before the re-noise choice, with the exact DDIM step: η = 1 beat 0.85 (+0.3–0.7 dB, CT/MRI/PET; that η is the
    # exact DDIM σ_t's: DDIM 0.85 ≈ the DDS code's 0.47, DDIM 1 ≈ its 0.45–0.8); γ = 3 × the Bayesian
    # weight beat 1
    # (+0.3 dB CT, +1.6 dB PET, ±0 MRI): the trained priors err more than the Gaussian-MMSE error model says.
    # PET (EM data step, exact DDIM re-noise): γ 10 > 3 > 1 (17.1 / 16.5 / 14.9 dB from noise; 17.9 / 17.7
    # hot-started); 5 EM iterations per step beat 1–3 (−0.2 to −0.6 dB).
    # MRI with the exact DDIM re-noise (2026-11-25): γ = 1 (the Bayesian weight) instead of 3 — PSNR within ±0.35 dB
    # on the four MRI tasks (4× +0.05, 4× 8 coils +0.35, 8× −0.07, 8× 8 coils −0.12), SSIM higher on all four,
    # residuals at the noise floor instead of below it, and an informative posterior std: Spearman ρ(std, error) 0.42
    # vs 0.34 on MRI 4× (benchmarks/results/uq_selfcheck.md, recon_mri_gamma1.md).
    # MRI with the DDS re-noise (2026-12-07): γ 1 / 2 / 3 / 4 → DDS-hot means of 8 on MRI 4×, 4× 8 coils, 8×, 8× 8
    # coils 24.69 / 24.96 / 25.02 / 25.02, 29.69 / 30.06 / 30.06 / 29.93, 19.99 / 20.05 / 20.07 / 20.07, 26.67 / 27.07 /
    # 27.19 / 27.21 dB; SSIM best at 2; ρ(std, error) falls with γ (4×: 0.491 / 0.472 / 0.456 / 0.445; 4× 8 coils
    # 0.410 / 0.392 / 0.383 / 0.369); residuals 97 % (γ 2) and 96 % (γ 3) of the noise floor. γ 2: most of the gain,
    # the best SSIM, the residual at the floor. DDS from noise γ 2 against 1: 24.90 / 29.84 against 24.64 / 29.49 (4×,
    # 4× 8 coils). t0 0.5 instead of 0.4 with γ 2: 24.90 / 29.92 / 20.93 / 26.88 — +0.88 on 8× single coil only.
    # PET with the DDS re-noise (2026-12-07): γ 2 / 3 / 5 / 10 / 20 → DDS-hot mean of 8 20.19 / 20.41 / 20.50 / 20.23 /
    # 19.48 dB (ρ 0.330 / 0.327 / 0.324 / 0.336 / 0.372); DDS from noise γ 3 / 5 / 10 → 19.29 / 19.41 / 19.24.
    "dds": {"*": {"n_steps": 50, "eta": 1.0, "cg_iters": 5, "gamma": 3.0, "renoise": "dds"}, "pet": {"gamma": 5.0},
            "mri": {"gamma": 2.0}},
    # CT hot start: entering later and with fewer steps (t0 0.3, 10 steps) beat t0 0.4 with 20 steps on every CT task
    # for single samples (+1.6 / +1.4 / +0.5 / +0.9 dB on 23 views / 8 views / limited angle / low dose) and for the
    # mean of 8 on 23 views and low dose (+1.2, +0.9; −0.2 and −0.4 on 8 views and limited angle), at half the cost.
    # MRI hot start (exact DDIM re-noise, 2026-11-25; γ 2 since 2026-12-07, as from noise): γ = 1 as from noise, and
    # t0 0.4 (the "*" value) instead of 0.3 — single samples +0.52 / +1.10 / +0.29 / +0.66 dB on MRI 4× / 4× 8 coils /
    # 8× / 8× 8 coils, level with or above DDS from noise at 40 % of its network evaluations (t0 0.3 / 0.5 / 0.6 with
    # γ 1 were lower on three of the four; 2026-11-25 grid in docs/dev/recon.md).
    # MRI hot start with the DDS re-noise and γ 2 (2026-12-07): 20 / 30 / 40 / 50 steps from t0 0.4 → means of 8 on
    # MRI 4×, 4× 8 coils, 8×, 8× 8 coils 24.96 / 25.26 / 25.38 / 25.38, 30.06 / 30.22 / 30.18 / 30.05, 20.05 / 20.51 /
    # 20.53 / 20.47, 27.07 / 27.33 / 27.43 / 27.46 dB; ρ ≥ 0.4 on all four only at 30 (0.482 / 0.413 / 0.482 / 0.464).
    # 30 steps: most of the gain at 60 % of DDS-from-noise's network evaluations. CG steps 3 / 10 and the DDS code's
    # η 0.95 were level or lower.
    # CT hot start, orientation ensemble (2026-12-07, sixth session; SamplerParams.orientations, samples denoised in
    # the square's 8 symmetries): means of 8, orientations 1 → 8, ct-23 / ct-8 / ct-la90 / ct-lowdose 36.11 → 36.34,
    # 31.76 → 31.91, 28.90 → 28.94, 37.91 → 37.99 dB (ct-23 seeds 1 / 2: +0.21 / +0.25; ct-8 +0.08 / +0.18); the first
    # sample is the same, the others' average ±0.07. A network that saw every symmetry at every step (8× the
    # evaluations) gave ct-23 36.34 too: the ensemble takes all of it at no cost. ρ(std, error) −0.02 / −0.01 / +0.01
    # / −0.01. Not elsewhere: DDS from noise generates the anatomy's layout at high σ, where the prior is not
    # symmetric — ct-la90 28.18 → 26.64, ct-8 single samples −0.54 (ct-23 +0.39, low dose +0.10); hot-started
    # single-coil MRI 4× 25.26 → 25.08 (its prior trained on upright MNI152 slices, phase and all), 8 coils +0.15, PET
    # +0.04 (/work/runs/s19 scratch runs; docs/dev/recon.md).
    "dds-hot": {"*": {"n_steps": 20, "t0": 0.4, "eta": 1.0, "cg_iters": 5, "gamma": 3.0},
                "ct": {"n_steps": 10, "t0": 0.3, "orientations": 8}, "mri": {"gamma": 2.0, "n_steps": 30},
                "pet": {"gamma": 5.0}},
    # DPS: 100 ancestral steps (the paper's 1000 are ~10 min per image on one CPU core). With 100 steps
    # the best ζ depends on the operator: CT 23 views 6 > 3 > 1; MRI 4× 1 > 3. PET (2026-12-03; ζ had been left at
    # MRI's 1): 1 / 3 / 10 / 20 / 40 / 70 → 11.42 / 13.77 / 15.80 / 16.98 / 17.89 / 17.88 dB from noise, residual
    # 0.44 → 0.371 (floor 0.375); hot start 2 / 6 / 20 / 40 → 17.36 / 17.53 / 17.82 / 17.79. The DPS step follows
    # the un-squared residual's direction, which on low-count PET is mostly Poisson noise (floor 37 %), so it
    # needs a far larger ζ to pull as hard as on CT or MRI.
    # Multi-coil MRI from noise (2026-12-03): ζ 1 / 2 / 4 / 8 → 4× 8 coils 23.18 / 25.13 / 26.02 / 25.30, 8× 8 coils
    # 19.44 / 21.73 / 22.83 / 22.47 dB; single coil keeps 1 (0.5 / 2: 18.66 / 20.78 against 21.52 on MRI 4×). Low-dose
    # CT keeps CT's 6 (3 / 12: 26.54 / 25.17 against 27.78).
    "dps": {"*": {"n_steps": 100, "eta": 1.0, "zeta": 1.0}, "ct": {"zeta": 6.0}, "pet": {"zeta": 40.0},
            "mri-multicoil": {"zeta": 4.0}},
    # Single-coil MRI ("mri-1coil", refining "mri"): ζ 2 fits the k-space noise (residual 0.0097 against a floor of
    # 0.145 on MRI 4×) — ζ 0.5 / 1 / 2: 4× 21.99 / 21.90 / 20.06, 8× 17.22 / 17.14 / 16.49 dB — while 8 coils want 2
    # (4× 25.14 / 26.18 / 26.91 and 26.45 at 4; 8× 21.82 / 22.44 / 23.00 and 23.06 at 4). Low-dose CT: ζ 6 30.19 vs 3
    # 30.02, within a seed's spread: kept.
    "dps-hot": {"*": {"n_steps": 30, "t0": 0.3, "eta": 1.0, "zeta": 2.0}, "ct": {"zeta": 3.0}, "pet": {"zeta": 20.0},
                "mri-1coil": {"zeta": 0.5}},
    # MCG: ζ 0.5 and 2 within 0.05 dB on CT; λ 1 → 0.6 as in the paper's CT setting.
    # Song / MCG on noisy data ("noisy", see NOISY_FLOOR): one CG step per pseudo-inverse instead of 5. The projections
    # (and the final hard one) with a converged pseudo-inverse put the measurement noise back into the image at every
    # step; one step (a Landweber-like partial projection, early stopping as regularisation) fits the data to about
    # the noise floor. Song / MCG with 5 → 1 steps: low-dose CT 22.71 / 23.77 → 28.61 / 28.32 dB (2 steps: 28.96 /
    # 28.49 but residuals below the floor and SSIM 0.72 / 0.69 against 0.81), PET 6.86 / 7.71 → 16.14 / 14.81,
    # MRI 4× 8 coils 12.67 / 14.82 → 23.55 / 23.97; one step costs less (Song's low-dose CT overhead 31–35 → 14 %).
    # Nearly noise-free data keep 5 (CT 23 views: 28.08 with 5, 26.96 with 1). Single-coil MRI: one step is exact.
    # MCG's ζ on PET (2026-12-06, noisy-data CG step): 1 / 4 / 10 / 40 / 70 / 120 / 200 → 14.81 / 14.71 / 15.27 /
    # 16.94 / 17.70 / 17.88 / 16.86 dB (seed 1: 40 → 17.00, 120 → 18.01): like DPS, the PET step follows a mostly
    # Poisson-noise direction and needs a far larger ζ. CT 23 / 8 views, limited angle with ζ 4: −0.09 / +0.21 / −0.39
    # dB (kept 1); low-dose CT +1.0 and 8-coil MRI ±0 with ζ 4 (kept 1: one value per modality for CT).
    # Since the projector ignores the pixels outside the field of view (2026-12-06, later), PET's ζ 10 / 20 / 40 / 70 /
    # 120 → 16.97 / 17.58 / 17.98 / 18.07 / 17.11 dB (120 overshoots; hot-started at 64², 15 steps: 16.5 dB against the
    # MLEM start's 17.9, 60 → 19.1–19.6).
    "mcg": {"*": {"n_steps": 50, "eta": 1.0, "zeta": 1.0, "lam": 1.0, "cg_iters": 5}, "pet": {"zeta": 70.0},
            "noisy": {"cg_iters": 1}},
    "song": {"*": {"n_steps": 50, "lam": 1.0, "snr": 0.0, "cg_iters": 5}, "ct": {"lam": 0.84},
             "noisy": {"cg_iters": 1}},
    # Consistency models: 1–4 network evaluations (Song et al. 2023 use 1–2; the data step needs a few).
    # MRI: γ = 1 here too (4 samples, 4 NFE, MRI 4× | 4× 8 coils: from noise 18.74 → 19.04 | 21.26 → 22.22 dB).
    "consistency": {"*": {"n_steps": 4, "cg_iters": 5, "gamma": 3.0}, "pet": {"gamma": 10.0}, "mri": {"gamma": 1.0}},
    # Hot start (CT 23 views, 2 samples, CM | teacher): t0 0.25 > 0.35 > 0.5 (30.1|30.8, 28.3|29.3, 26.4|27.9 dB at
    # 4 NFE); γ 3 ≥ 10 (±0.1 dB). MRI (4 samples, MRI 4× | 4× 8 coils): γ 1 and t0 0.3 (σ 0.32) 21.52 | 25.61 dB
    # against γ 3, t0 0.25 21.11 | 22.35; at t0 0.25 (σ 0.17) and below the data steps fit the k-space noise
    # (t0 0.15: 20.76 | 15.14), t0 0.4 / 0.5: 20.98 | 25.08, 20.08 | 24.13.
    "consistency-hot": {"*": {"n_steps": 4, "t0": 0.25, "cg_iters": 5, "gamma": 3.0}, "pet": {"gamma": 10.0},
                        "mri": {"gamma": 1.0, "t0": 0.3}},
}


def coil_count(operator_spec: Any) -> int | None:
    """The number of receive coils of an MRI measurement (1 without coil maps).

    Parameters
    ----------
    operator_spec : dict
        A measurement's operator spec (``Measurement.operator``); ``coil_maps`` may be an array, a tensor or a list.

    Returns
    -------
    int or None
        The coil count for MRI, None for other modalities (or no spec).
    """
    if not isinstance(operator_spec, dict) or operator_spec.get("modality") != "mri":
        return None
    maps = operator_spec.get("coil_maps")
    return 1 if maps is None else int(getattr(maps, "shape", [len(maps)])[0])


def noisy_data(likelihood: Any, floor: float | None, assumed: bool = False) -> bool:
    """Whether a measurement counts as noisy for the tuned values (and for song / mcg's warning).

    Parameters
    ----------
    likelihood : Likelihood
        The measurement's noise model: counts (Poisson, transmission) are noisy.
    floor : float or None
        Its noise floor (:func:`napari_diffrecon.metrics.noise_floor`); Gaussian data above :data:`NOISY_FLOOR` are.
    assumed : bool
        The noise level is a reader's default, not a property of the data: then Gaussian data are not called noisy.

    Returns
    -------
    bool
    """
    from ..physics.likelihoods import PoissonLikelihood, TransmissionLikelihood

    if isinstance(likelihood, (PoissonLikelihood, TransmissionLikelihood)):
        return True
    return floor is not None and not assumed and floor > NOISY_FLOOR


def tuning_keys(modality: str, coils: int | None = None, noisy: bool = False) -> tuple[str, ...]:
    """The keys of :data:`RECOMMENDED`'s per-data entries that apply, in the order they refine each other.

    Parameters
    ----------
    modality : str
        The operator's modality ("*" when unknown).
    coils : int, optional
        MRI receive coils (:func:`coil_count`); None when not known.
    noisy : bool
        The data are noisy (:func:`noisy_data`).

    Returns
    -------
    tuple of str
        ``(modality,)``, plus ``"mri-1coil"`` or ``"mri-multicoil"`` for MRI with a known coil count, plus
        ``"noisy"`` for noisy data.
    """
    keys: tuple[str, ...] = (modality,)
    if modality == "mri" and coils is not None:
        keys += ("mri-1coil" if coils <= 1 else "mri-multicoil",)
    return keys + (("noisy",) if noisy else ())


def recommended_params(method: str, modality: str = "*", hot_start: bool = False, *, coils: int | None = None,
                       noisy: bool = False, **overrides: Any) -> SamplerParams:
    """Tuned :class:`SamplerParams` for ``method`` on ``modality`` ("ct", "mri", "pet").

    Parameters
    ----------
    method : str
        A sampler name; unknown ones (e.g. unconditional samplers) get the plain defaults.
    modality : str
        The operator's modality.
    hot_start : bool
        Use the hot-start (CCDF) setting: fewer steps entered at ``t0`` from a classical image.
    coils : int, optional
        MRI receive coils (:func:`coil_count`): one coil applies the ``"mri-1coil"`` refinements (the data can be
        fitted exactly, so a weight tuned with 8 coils fits the noise), several the ``"mri-multicoil"`` ones.
        None: not known (``"mri"`` only).
    noisy : bool
        Noisy data (:func:`noisy_data`: counts, or a noise floor above :data:`NOISY_FLOOR`) apply the ``"noisy"``
        refinements.
    **overrides
        Any :class:`SamplerParams` field, applied last.

    Returns
    -------
    SamplerParams
        The tuned values (a new object: the caller may change it).
    """
    key = f"{method}-hot" if hot_start and f"{method}-hot" in RECOMMENDED else method
    kinds = tuning_keys(modality, coils, noisy)
    values: dict[str, Any] = {}
    if key != method:  # a hot-start entry refines the method's own
        values.update(RECOMMENDED.get(method, {}).get("*", {}))
        for kind in kinds:
            values.update(RECOMMENDED.get(method, {}).get(kind, {}))
    table = RECOMMENDED.get(key, {})
    values.update(table.get("*", {}))
    for kind in kinds:
        values.update(table.get(kind, {}))
    if hot_start and "t0" not in values:
        values["t0"] = 0.4
    values.update(overrides)
    return SamplerParams(**values)
