"""Command line: ``napari-diffrecon {simulate,reconstruct,demo,info}``."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__

__all__ = ["main"]


def _methods() -> list[str]:
    from .baselines import BASELINES
    from .samplers import SAMPLERS

    return [*BASELINES, *SAMPLERS]


def _simulate_volume(a: argparse.Namespace) -> int:
    """``simulate --volume``: a volume study of every slice of a 3D image (:func:`volume.simulate_study`), each slice
    resized to ``--size`` as a 2D simulation would be (aspect ratio in mm kept, padded), CT not in HU mapped to HU as
    in 2D (said)."""
    from .io import check_output_path
    from .io.images import read_volume
    from .simulate import (
        ASSUMED_HU,
        _pixel_size,
        _to_square,
        check_options_apply,
        hu_image,
        is_hounsfield,
        pet_activity,
    )
    from .volume import simulate_study, write_volume_study

    _refuse_ignored(_given(a, {"slice": "--slice"}), "2D simulations", "a volume study takes every slice")
    _refuse_ignored(_given(a, {"photons": "--photons", "noise_sigma": "--noise-sigma"}), "2D simulations",
                    "a volume study's noise is 1 % of its data RMS (CT, MRI) or its PET counts per slice (--counts)")
    out = check_output_path(a.output, a.force, (".npz",))
    created = _new_folder(out)
    check_options_apply(a.modality, views=a.views, limited_angle=a.limited_angle, photons=None, accel=a.accel,
                        coils=a.coils, counts=a.counts, noise_sigma=None)
    if a.size < 16:
        raise ValueError(f"--size must be ≥ 16, got {a.size}")
    vol, info = read_volume(a.image)
    if vol.shape[0] < 2:
        raise ValueError(f"{Path(a.image).name} holds one slice; a volume study needs several (drop --volume for a "
                         "2D bundle)")
    if not np.all(np.isfinite(vol)):
        raise ValueError(f"{Path(a.image).name}: the volume contains NaN or Inf; replace them (e.g. np.nan_to_num) "
                         "first")
    sp = info.get("pixel_spacing_mm")
    is_hu = is_hounsfield(vol, info.get("units", "auto"))
    if a.modality == "ct" and not is_hu:  # as a 2D simulation (one mapping for the whole volume), said
        vol, is_hu = hu_image(vol, False), True
        print(f"note: {ASSUMED_HU}")
    fill = -1000.0 if (a.modality == "ct" and is_hu) else float(vol.min())
    slices = np.stack([_to_square(sl, a.size, sp, fill=fill)[0] for sl in vol]).astype(np.float32)
    px = _pixel_size(vol.shape[1:], a.size, None, sp)
    assumed = [what for what, known in (("a 350 mm field of view", sp), ("1 mm between slices",
                                                                         info.get("slice_spacing_mm"))) if not known]
    if assumed:  # .npy / plain TIFF stacks carry no voxel size
        print(f"note: {Path(a.image).name} declares no voxel size: {' and '.join(assumed)} assumed")
    opts: dict[str, Any] = {"spacing_mm": (float(info.get("slice_spacing_mm") or 1.0), px, px), "seed": a.seed,
                            "study_id": Path(out).stem}
    if a.modality == "ct":
        opts.update(n_views=a.views or (a.limited_angle and int(a.limited_angle)) or 180,
                    arc=float(a.limited_angle or 180.0), units="HU")
    elif a.modality == "mri":
        opts.update(acceleration=float(a.accel or 4.0), n_coils=int(a.coils or 1), mask_kind=a.mask)
    else:
        opts.update(n_views=a.views or 180, counts_per_slice=float(a.counts or 2e5))
        # as in 2D: a CT's tissues as uptake, slice by slice; other images' normalised intensity, over the volume
        slices = (np.stack([pet_activity(sl, True) for sl in slices]) if is_hu
                  else pet_activity(slices, False)).astype(np.float32)
    st = simulate_study(slices, a.modality, **opts)
    if info.get("axes_ras"):  # the source's orientation travels with the units record to the results' exports
        units = {"ct": "HU", "mri": "magnitude", "pet": "activity"}[a.modality]
        base = st.metadata.get("intensity") or {"native_units": units, "scale": 1.0, "offset": 0.0}
        st.metadata["intensity"] = {**base, "axes_ras": info["axes_ras"]}
    write_volume_study(st, out, overwrite=a.force)
    print(f"wrote {out}{created}: {a.modality.upper()} volume study, {slices.shape[0]} slices of {a.size}², "
          f"{px:.3g} mm pixels; reconstruct it with: napari-diffrecon reconstruct {out} --volume --method mbir "
          "-o FOLDER")
    return 0


def _cmd_simulate(a: argparse.Namespace) -> int:
    from .io import check_output_path, read_image, write_measurement
    from .io.bundle import MEASUREMENT_SUFFIXES
    from .simulate import check_options_apply, simulate_from_image

    if a.volume:
        return _simulate_volume(a)

    out = check_output_path(a.output, a.force, MEASUREMENT_SUFFIXES)
    created = _new_folder(out)
    check_options_apply(a.modality, views=a.views, limited_angle=a.limited_angle, photons=a.photons, accel=a.accel,
                        coils=a.coils, counts=a.counts, noise_sigma=a.noise_sigma)
    img, info = read_image(a.image, a.slice)
    if info.get("converted"):
        print(f"{Path(a.image).name}: {info['converted']}")
    source = str(a.image)
    if info.get("n_slices", 1) > 1:  # which slice of a volume: said and recorded (--slice picks another)
        source += f" (slice {info['slice_index']} of 0–{info['n_slices'] - 1})"
        print(f"{Path(a.image).name}: slice {info['slice_index']} of 0–{info['n_slices'] - 1} (--slice picks another)")
    m = simulate_from_image(
        img,
        a.modality,
        size=a.size,
        views=a.views,
        limited_angle=a.limited_angle,
        photons=a.photons,
        accel=a.accel,
        coils=a.coils,
        mask_kind=a.mask,
        counts=a.counts,
        noise_sigma=a.noise_sigma,
        units=info.get("units", "auto"),
        pixel_spacing_mm=info.get("pixel_spacing_mm"),
        seed=a.seed,
        source=source,
        axes_ras=info.get("axes_ras"),
    )
    write_measurement(m, out, overwrite=a.force)
    print(f"wrote {out}{created}: {m.metadata.get('description')}, measurement {m.data.shape} {m.data.dtype}")
    assumed = (m.metadata.get("intensity") or {}).get("assumed")
    if assumed:
        print(f"note: {assumed}")
    return 0


def _settings_from_args(a: argparse.Namespace, modality: str = "*", coils: int | None = None, noisy: bool = False):
    from .reconstruct import DIFFUSION_METHODS, RunSettings
    from .samplers.defaults import recommended_params

    # the benchmark-tuned values for this method and the data's kind (reconstruct.data_kind); explicit flags override
    params = recommended_params(a.method, modality, hot_start=bool(a.hot_start), coils=coils, noisy=noisy)
    for name, attr in (
        ("n_steps", "steps"),
        ("eta", "eta"),
        ("gamma", "gamma"),
        ("zeta", "zeta"),
        ("cg_iters", "cg_iters"),
        ("t0", "t0"),
        ("snr", "snr"),
        ("prior_weight", "prior_weight"),
        ("orientations", "orientations"),
    ):
        v = getattr(a, attr)
        if v is not None:
            setattr(params, name, v)
    if a.lam is not None and a.method in ("song", "mcg"):  # elsewhere --lam is the TV weight (below)
        params.lam = a.lam
    # Test-time adaptation (LoRA on the prior, samplers/adapt.py): only the keys given on the command line.
    from .samplers.adapt import ADAPT_DEFAULTS

    for key in ADAPT_DEFAULTS:  # the --adapt-* / --lora-rank options have these names as dests
        v = getattr(a, key, None)
        if v is not None:
            params.extra[key] = v
    if getattr(a, "posterior_draw", None):
        if a.method not in ("dds",):
            raise ValueError(f"--posterior-draw is a DDS option; --method {a.method} does not take it")
        from .samplers.datastep import draw_refusal

        refusal = draw_refusal(a.posterior_draw, counts=modality == "pet",
                               precision=getattr(a, "precision", "float32"))
        if refusal:
            raise ValueError(f"--posterior-draw {a.posterior_draw}: {refusal}")
        params.extra["posterior_draw"] = a.posterior_draw
    if getattr(a, "renoise", None):
        if a.method not in ("dds",):
            raise ValueError(f"--renoise is a DDS option; --method {a.method} does not take it")
        params.renoise = a.renoise
    if getattr(a, "subsets", None) is not None:  # PET: ordered subsets in the samplers' EM data step too
        if a.subsets < 1:
            raise ValueError(f"--subsets must be ≥ 1 (1 = no subsets), got {a.subsets}")
        params.extra["em_subsets"] = int(a.subsets)
    baseline = {}
    # With a diffusion sampler the baseline is the hot start: --iters and --filter describe it; --subsets belongs to
    # the sampler's EM data step, and --lam to Song/MCG's projection where they run (for the other samplers, which
    # have no λ, it stays the TV hot start's weight).
    if a.method in DIFFUSION_METHODS:
        keys = ("iters", "filter", "lam_rel") + (() if a.method in ("song", "mcg") else ("lam",))
    else:
        keys = ("iters", "lam", "lam_rel", "filter", "subsets")
    for key in keys:
        v = getattr(a, key)
        if v is not None:
            baseline[key] = v
    return RunSettings(
        method=a.method,
        prior=a.prior,
        params=params,
        n_samples=a.samples,
        seed=a.seed,
        device=a.device,
        hot_start=a.hot_start,
        baseline_params=baseline,
        keep_samples=a.keep_samples,
        precision=getattr(a, "precision", "float32"),
        std_pool=_std_pool(getattr(a, "std_pool", None)),  # RunSettings checks the value
    )


# Options of the diffusion samplers (dest → flag): a classical method ignored them silently.
SAMPLER_FLAGS = {"prior": "--prior", "steps": "--steps", "eta": "--eta", "gamma": "--gamma", "zeta": "--zeta",
                 "cg_iters": "--cg-iters", "snr": "--snr", "prior_weight": "--prior-weight",
                 "orientations": "--orientations",
                 "posterior_draw": "--posterior-draw", "renoise": "--renoise", "hot_start": "--hot-start", "t0": "--t0",
                 "adapt_steps": "--adapt-steps", "adapt_lr": "--adapt-lr", "lora_rank": "--lora-rank",
                 "adapt_every": "--adapt-every", "adapt_start": "--adapt-start", "adapt_target": "--adapt-target",
                 "adapt_floor": "--adapt-floor", "std_pool": "--std-pool", "auto": "--auto",
                 "holdout": "--holdout"}


# Options of 2D runs the volume path (DiffusionMBIR-style sampler) does not read (dest → flag).
VOLUME_IGNORES = {"auto": "--auto", "auto_params": "--auto-params", "holdout": "--holdout", "zeta": "--zeta",
                  "snr": "--snr", "lam": "--lam",
                  "orientations": "--orientations",
                  "lam_rel": "--lam-rel", "iters": "--iters", "filter": "--filter", "subsets": "--subsets",
                  "t0": "--t0", "keep_samples": "--keep-samples", "adapt_steps": "--adapt-steps",
                  "adapt_lr": "--adapt-lr", "lora_rank": "--lora-rank", "adapt_every": "--adapt-every",
                  "adapt_start": "--adapt-start", "adapt_target": "--adapt-target", "adapt_floor": "--adapt-floor",
                  "threads": "--threads", "slice": "--slice", "size": "--size"}


def _given(a: argparse.Namespace, flags: dict[str, str]) -> list[str]:
    """The flags of ``flags`` (dest → flag) given on the command line."""
    return [flag for dest, flag in flags.items()
            if (v := getattr(a, dest, None)) is not None and v is not False]  # 0 is given (0 == False)


def _refuse_ignored(given: list[str], where: str, instead: str) -> None:
    """Refuse the ``given`` flags, which apply ``where`` only; ``instead`` says what this run takes."""
    if given:
        one = len(given) == 1
        raise ValueError(f"{', '.join(given)} {'applies' if one else 'apply'} to {where}; {instead}: drop "
                         f"{'it' if one else 'them'}")


def _refuse_flags_the_run_ignores(a: argparse.Namespace) -> None:
    """Refuse options the run would ignore: sampler options with a classical method, ``--auto-params`` without
    ``--auto`` (each used to be dropped without a word)."""
    from .baselines import BASELINES

    if a.method in BASELINES:
        given = _given(a, SAMPLER_FLAGS) + ["--samples"] * (a.samples != 1) + ["--keep-samples"] * bool(a.keep_samples)
        given += ["--precision"] * (getattr(a, "precision", "float32") != "float32")
        _refuse_ignored(given, "the diffusion samplers", f"--method {a.method} is a classical reconstruction (for a "
                        "diffusion run pick a sampler, e.g. --method dds)")
    if getattr(a, "auto_params", None) and not getattr(a, "auto", None):
        raise ValueError("--auto-params says what --auto searches; add --auto (split, discrepancy or sure) or drop "
                         "--auto-params")


# Sampler flags (dest → the parameter it sets, samplers.PARAMS_READ; flag); the adaptation's own settings need it on.
SAMPLER_PARAM_FLAGS = {"steps": ("n_steps", "--steps"), "eta": ("eta", "--eta"), "gamma": ("gamma", "--gamma"),
                       "zeta": ("zeta", "--zeta"), "cg_iters": ("cg_iters", "--cg-iters"), "snr": ("snr", "--snr"),
                       "orientations": ("orientations", "--orientations"), "adapt_steps": ("adapt_steps",
                                                                                          "--adapt-steps")}
ADAPT_SETTING_FLAGS = {"adapt_lr": "--adapt-lr", "lora_rank": "--lora-rank", "adapt_every": "--adapt-every",
                       "adapt_start": "--adapt-start", "adapt_target": "--adapt-target", "adapt_floor": "--adapt-floor"}
# The samplers with an EM data step on PET counts (samplers/datastep.py), where --subsets makes it ordered-subsets.
EM_DATA_STEP_METHODS = ("dds", "consistency")
# The hot start's classical parameters (dest → flag, the starts that read them).
START_PARAM_FLAGS = {"filter": ("--filter", ("fbp",)), "iters": ("--iters", ("cg", "tv", "mlem", "osem")),
                     "lam": ("--lam", ("tv",)), "lam_rel": ("--lam-rel", ("tv",)), "subsets": ("--subsets", ("osem",))}


def _refuse_flags_the_method_ignores(a: argparse.Namespace, m: Any) -> None:
    """Refuse the flags of other methods (``--zeta`` with DDS, ``--filter`` with TV, ``--lam-rel`` without a TV hot
    start, ``--adapt-lr`` without ``--adapt-steps``, ``--holdout`` without ``--auto split``): each ran as if absent."""
    from .baselines import BASELINE_PARAMS
    from .samplers import PARAMS_READ

    modality = str(m.operator.get("modality"))
    method = a.method
    if method in BASELINE_PARAMS:  # the sampler flags are refused by _refuse_flags_the_run_ignores
        given = [flag for dest, (flag, _) in START_PARAM_FLAGS.items()
                 if getattr(a, dest, None) is not None and dest not in BASELINE_PARAMS[method]]
        reads = ", ".join(START_PARAM_FLAGS[d][0] for d in BASELINE_PARAMS[method]) or "none of them"
        _refuse_ignored(given, "other classical methods", f"--method {method} reads {reads}")
        return
    reads = PARAMS_READ.get(method, ())
    given = [flag for dest, (param, flag) in SAMPLER_PARAM_FLAGS.items()
             if getattr(a, dest, None) is not None and param not in reads]
    if given:
        takes = ", ".join(f for d, (p, f) in SAMPLER_PARAM_FLAGS.items() if p in reads)
        _refuse_ignored(given, "other samplers", f"--method {method} reads {takes}")
    if not getattr(a, "adapt_steps", None):
        _refuse_ignored(_given(a, ADAPT_SETTING_FLAGS), "test-time adaptation",
                        "it is off without --adapt-steps N (N ≥ 1; DDS and DPS)")
    start = a.hot_start
    for dest, (flag, starts) in START_PARAM_FLAGS.items():
        if getattr(a, dest, None) is None or (dest == "lam" and "lam" in reads):  # Song / MCG: their λ
            continue
        if dest == "subsets":
            if modality == "pet" and method in EM_DATA_STEP_METHODS:  # ordered subsets in their EM data step
                continue
            if modality != "pet":
                raise ValueError("--subsets applies to PET data (OSEM, or the EM data step of "
                                 f"{' / '.join(EM_DATA_STEP_METHODS)}); these are {modality.upper()} data: drop it")
        if start not in starts:
            where = f"a hot start from {' / '.join(starts).upper()}"
            now = f"this run starts from {start.upper()}" if start else "this run has no hot start"
            raise ValueError(f"{flag} applies to {where}; {now}: drop {flag} (or pass --hot-start {starts[0]})")
    auto = getattr(a, "auto", None)
    if auto == "auto":
        from .tuning import choose_criterion

        auto, _ = choose_criterion(m)
    if a.holdout is not None and auto != "split":
        chose = " (--auto picks the discrepancy principle for these data: Gaussian noise of known σ)" if a.auto else ""
        raise ValueError("--holdout is the share of the data measurement splitting holds out; add --auto split or "
                         f"drop --holdout{chose}")


def _set_threads(n: int | None) -> None:
    """``--threads``: torch's CPU threads (None: torch's default); a count below 1 is refused."""
    if n is None:
        return
    from ._checks import check_number

    check_number("--threads", n, 1, integer=True)
    import torch

    torch.set_num_threads(n)


def _std_pool(v: float | None) -> float:
    from .uncertainty import DEFAULT_STD_POOL

    return DEFAULT_STD_POOL if v is None else float(v)


def _quality(result, m) -> str:
    from .metrics import psnr, ssim

    if m.ground_truth is None:
        return ""
    gt = np.abs(m.ground_truth) if np.iscomplexobj(m.ground_truth) else m.ground_truth
    if not np.ptp(np.asarray(gt, dtype=np.float64)) > 0:  # float: a boolean or int8 truth must not wrap or raise
        return "no PSNR/SSIM (the ground truth is constant), "
    return f"PSNR {psnr(result.reconstruction, gt):.2f} dB, SSIM {ssim(result.reconstruction, gt):.3f}, "


def _auto_tuned(a: argparse.Namespace, m, settings):
    from .tuning import tuned_reconstruct

    if a.method not in ("dds", "dps", "mcg", "song"):
        raise ValueError(f"--auto tunes the data weight of the conditional samplers (dds, dps, mcg, song); --method "
                         f"{a.method} has none to tune: drop --auto")
    grid = None
    if a.auto_params:
        grid = {}
        for item in a.auto_params:
            name, _, vals = item.partition("=")
            try:
                grid[name] = [float(v) for v in vals.split(",")] if vals else None
            except ValueError:
                raise ValueError(f"--auto-params {item}: the values after '=' must be numbers separated by commas "
                                 f"(e.g. {name}=0.3,1,3)") from None
        if any(v is None for v in grid.values()):
            grid = list(grid)  # names only: default grids
    emit, shown = _progress_line(), {"runs": -1}

    def progress(done: float, total: int, msg: str) -> None:
        due = int(done) != shown["runs"]  # in a log or a pipe: a line per finished run
        shown["runs"] = int(done)
        emit(f"auto-tune {msg}", due)

    result, tuned = tuned_reconstruct(
        m, settings, criterion=a.auto, params=grid, holdout=0.2 if a.holdout is None else a.holdout,
        progress=progress
    )
    emit("", False, last=True)
    print(tuned.curve_text())
    print(f"auto-tune ({tuned.criterion}) chose {tuned.best} in {tuned.wall_time_s:.1f} s")
    return result


def _new_folder(path: str | Path) -> str:
    """`` (created the folder F)`` when writing ``path`` creates F (said on the "wrote" line: a typo in a folder name
    made a stray tree without a word), else ""."""
    missing = [p for p in Path(path).parents if not p.exists()]
    return f" (created the folder {missing[-1]})" if missing else ""


def _read_for_reconstruct(a: argparse.Namespace) -> Any:
    """The measurement of a 2D run: a bundle, or a fastMRI file's slice (``--slice``, ``--size``, which other inputs
    refuse: a bundle holds one slice at its own geometry)."""
    from .io import read_measurement
    from .io.fastmri import is_fastmri, read_fastmri

    given = [f for f, v in (("--slice", a.slice), ("--size", a.size)) if v is not None]
    if is_fastmri(a.bundle):
        m = read_fastmri(a.bundle, slice_index=a.slice, size=a.size)
        print(f"{Path(a.bundle).name}: {m.metadata['description']}")
        return m
    _refuse_ignored(given, "fastMRI .h5 files", f"{Path(a.bundle).name} is a bundle of one measurement at its own "
                    "geometry (for an image, `napari-diffrecon simulate --slice K --size N` makes one)")
    return read_measurement(a.bundle)


def _cmd_reconstruct(a: argparse.Namespace) -> int:
    from .distributed import run_from_args, wants_volume

    if wants_volume(a):  # --volume, or the input is a folder of studies
        if getattr(a, "std_pool", None):
            raise ValueError("--std-pool applies to 2D runs; volume runs report the raw per-voxel std (drop it)")
        if getattr(a, "precision", "float32") != "float32":
            raise ValueError("--precision applies to 2D runs; volume runs evaluate the prior in float32 (their memory "
                             "plan assumes it): drop --precision")
        if getattr(a, "posterior_draw", None):
            raise ValueError("--posterior-draw applies to 2D DDS runs; the volume sampler takes the mean data step "
                             "(drop it)")
        if getattr(a, "hot_start", None):
            raise ValueError("--hot-start applies to 2D runs; volume runs start from noise (drop --hot-start and "
                             "--t0)")
        _refuse_ignored(_given(a, VOLUME_IGNORES), "2D runs", "the volume sampler (mbir) takes --steps, --eta, "
                        "--gamma, --cg-iters, --prior-weight, --renoise, --ztv, --rho, --prior, --samples and --seed "
                        "(and --threads-per-worker)")
        return run_from_args(a)
    from .io import check_output_path, write_result
    from .io.bundle import RESULT_SUFFIXES
    from .reconstruct import noise_floor_text, reconstruct

    if not a.method:
        raise ValueError("--method is required for a measurement bundle (e.g. --method dds)")
    if a.method not in _methods():
        raise ValueError(f"unknown method {a.method!r}; choose from {', '.join(_methods())}")
    _refuse_flags_the_run_ignores(a)
    _set_threads(a.threads)
    out = check_output_path(a.output, a.force, RESULT_SUFFIXES)
    created = _new_folder(out)
    if Path(a.bundle).exists() and out.exists() and out.resolve() == Path(a.bundle).resolve():
        raise ValueError(f"-o {a.output} is the input measurement; write the result to another file (--force "
                         "replaces earlier results, never the input)")
    m = _read_for_reconstruct(a)
    from .reconstruct import data_kind, default_hot_start
    from .samplers import SAMPLERS

    if a.hot_start == "auto":  # the data's classical start (reconstruct.default_hot_start), said before the run
        a.hot_start = default_hot_start(m)
        if a.method in SAMPLERS:
            print(f"hot start: {a.hot_start}")

    kind = data_kind(m)
    _refuse_flags_the_method_ignores(a, m)
    settings = _settings_from_args(a, *kind)
    if a.method == "consistency" and not a.hot_start and settings.params.n_steps <= 8:
        print("note: few-step consistency sampling from pure noise is far below a hot start on our benchmarks "
              "(CT 23 views: 24.5 vs 30.2 dB at 4 NFE); add --hot-start auto (the data's classical image; its "
              "tuned t0 is used unless you pass --t0)")
    told: list[str] = []

    def tell(w: str) -> None:  # before the first step: the user need not wait for the run to learn it
        told.append(w)
        print(f"warning: {w}", file=sys.stderr, flush=True)

    if getattr(a, "auto", None):
        result = _auto_tuned(a, m, settings)
    else:
        result = reconstruct(m, settings, notify=tell, callback=_step_printer())
    write_result(out, result.arrays(), result.provenance, overwrite=a.force)
    print(f"{a.method}: {_quality(result, m)}data residual {result.residual:.4g}"
          f"{noise_floor_text(result.provenance)}; wrote {out}{created}")
    for w in result.provenance.get("warnings") or []:
        if w not in told:
            print(f"warning: {w}", file=sys.stderr)
    return 0


def _progress_line() -> Callable[..., None]:
    """``emit(text, due, last=False)``: progress on one line rewritten in place on a terminal; in a log or a pipe a
    line only when ``due`` (the caller's cadence). ``last`` ends the terminal's line."""
    tty = sys.stdout.isatty()

    def emit(text: str, due: bool, last: bool = False) -> None:
        if tty:
            print(f"\r{text}" if text else "", end="\n" if last else "", flush=True)
        elif text and (due or last):
            print(text, flush=True)

    return emit


def _step_printer(every: float = 0.1) -> Callable[[Any], None]:
    """A reconstruct callback printing the run's progress (Ctrl-C stops the run): a line every ``every`` of the run
    in a log or a pipe, every step on a terminal (:func:`_progress_line`). Only the step counter and the clock are
    read (the data residual would cost a forward product per step)."""
    emit, state = _progress_line(), {"next": 0.0}

    def show(it: Any) -> None:
        frac = it.step / max(it.n_steps, 1)
        due = frac >= state["next"]
        if due:
            state["next"] = frac + every
        emit(f"step {it.step}/{it.n_steps}, {it.nfe} network evaluations, {it.elapsed:.1f} s", due, last=it.done)

    return show


def _cmd_export(a: argparse.Namespace) -> int:
    from .io.export import export_result

    if _demo_arrays(a.result) is not None:
        dds = Path(a.result).with_name("demo_dds.npz")
        where = f"export the DDS run's result, {dds}" if dds.exists() else ("rerun `napari-diffrecon demo`, which "
                                                                            "also writes the DDS run's result file")
        raise ValueError(f"{a.result} is the demo's comparison of methods, not a result file; {where}")
    created = _new_folder(a.output)
    out = export_result(a.result, a.output, field=a.field, overwrite=a.force)
    print(f"wrote {out}{created}")
    from .io.bundle import read_result

    _, prov = read_result(a.result)
    modality = str(((prov or {}).get("operator") or {}).get("modality", ""))
    if modality == "ct" and not (prov or {}).get("measurement_intensity"):
        print("note: the measurement declares no intensity mapping (metadata.intensity), so the image holds the "
              "model's attenuation per pixel, not Hounsfield units, at 1 mm pixels; `napari-diffrecon simulate` "
              "records one for images in HU")
    return 0


def _cmd_info(a: argparse.Namespace) -> int:
    from .io import read_measurement
    from .io.bundle import VolumeStudyFileError, is_result_file, read_result

    if is_result_file(a.bundle):  # a reconstruction's output
        arrays, prov = read_result(a.bundle)
        keep = ("software_version", "created", "kind", "prior", "nfe", "wall_time_s", "data_residual",
                "data_residual_of_mean", "noise_floor", "measurement_file", "measurement_intensity", "warnings")
        print(json.dumps({"result": {k: f"{v.shape} {v.dtype}" for k, v in arrays.items()},
                          "method": (prov.get("settings") or {}).get("method"),
                          **{k: prov[k] for k in keep if k in prov}}, indent=2, default=str))
        return 0
    demo = _demo_arrays(a.bundle)
    if demo is not None:  # `napari-diffrecon demo`'s comparison file: one image per method
        print(json.dumps({"demo_comparison": {k: f"{v.shape} {v.dtype}" for k, v in demo.items()},
                          "note": "images of the demo's methods side by side (the DDS run's mean and std); "
                                  "the DDS run's result file, which `export` takes, is demo_dds.npz beside it"},
                         indent=2))
        return 0
    try:
        m = read_measurement(a.bundle)
    except VolumeStudyFileError:
        from .volume import read_volume_study

        st = read_volume_study(a.bundle)
        print(json.dumps({"volume_study": f"{st.data.shape[0]} slices", "measurement": f"{st.data.shape} "
                          f"{st.data.dtype}", "spacing_mm": st.spacing_mm, "orientation": st.orientation,
                          "modality": st.operator.get("modality"), "ground_truth": st.ground_truth is not None,
                          "metadata": st.metadata}, indent=2, default=str))
        return 0
    spec = {k: (f"array{np.asarray(v).shape}" if isinstance(v, np.ndarray) else v) for k, v in m.operator.items()}
    if "angles_deg" in spec:
        spec["angles_deg"] = f"{len(m.operator['angles_deg'])} angles"
    noise = {k: (f"array{np.asarray(v).shape}" if isinstance(v, np.ndarray) else v) for k, v in m.noise.items()}
    print(
        json.dumps(
            {
                "measurement": f"{m.data.shape} {m.data.dtype}",
                "operator": spec,
                "noise": noise,
                "ground_truth": m.ground_truth is not None,
                "metadata": m.metadata,
            },
            indent=2,
            default=str,
        )
    )
    return 0


def _demo_arrays(path: str | Path) -> dict[str, np.ndarray] | None:
    """The arrays of a ``napari-diffrecon demo`` output (``reconstruction_<method>`` per method), else None; read
    without unpickling."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if ("measurement" in z.files or "reconstruction" in z.files  # a bundle, or a result (MRI's hold
                    or not any(k.startswith("reconstruction_") for k in z.files)):  # reconstruction_complex)
                return None
            return {k: z[k] for k in z.files if k != "provenance"}
    except Exception:  # not an archive: read_measurement says what is wrong with it
        return None


def _cmd_priors(a: argparse.Namespace) -> int:
    from .priors import ModelCard, default_prior_for, list_priors
    from .priors.registry import prior_path

    if a.prior:  # one card in full: what it is, what it was trained on, its licence
        path = prior_path(a.prior)
        card_path = path if path.suffix == ".json" or path.is_dir() else path.with_suffix(".json")
        if path.is_dir() or not card_path.is_file():
            raise FileNotFoundError(f"{a.prior!r} is not a shipped prior's name nor a .json model card (or weights "
                                    "beside one); 'napari-diffrecon priors' lists the shipped ones")
        card = ModelCard.read(card_path)
        tr = card.training_record
        desc, source, licence = card.training_data()
        average = tr.get("weight_average")
        print(json.dumps({"prior": card.name, "card": str(card_path), "summary": card.summary(),
                          "description": card.description or None, "modality": card.modality,
                          "resolution": card.resolution, "channels": card.channels,
                          "parametrisation": card.parametrisation, "normalisation": card.normalisation,
                          "training_source": source, "training_data": desc, "licence": licence,
                          "training_command": tr.get("command"), "fine_tuned_from": tr.get("fine_tuned_from"),
                          "weights_averaged_with": average.get("with") if isinstance(average, dict) else None},
                         indent=2, default=str, ensure_ascii=False))
        return 0
    cards = list_priors()
    defaults = {}
    for modality, complex_ in (("ct", False), ("mri", True), ("pet", False)):
        for consistency in (False, True):
            name = default_prior_for(modality, complex_, consistency)
            is_cm = name is not None and cards[name].parametrisation == "consistency"
            if name is not None and is_cm == consistency:  # (no PET consistency model: no such tag)
                role = "consistency sampler" if consistency else "every other sampler"
                defaults.setdefault(name, []).append(f"default for {modality.upper()} ({role})")
    for name, card in cards.items():
        tags = defaults.get(name, [])
        print(f"{name}" + (f"  [{'; '.join(dict.fromkeys(tags))}]" if tags else ""))
        print(f"    {card.summary()}")
    print("(napari-diffrecon priors NAME prints one card in full: training data, licence, the command that made it)")
    return 0


DEMO_FILES = ("demo_reconstruction.npz", "demo_comparison.png", "demo_dds.npz")
DEMO_SAMPLES = 4  # the demo's DDS posterior samples (one batch): their mean and per-pixel std


def _free_demo_folder(outdir: Path, force: bool) -> Path:
    """``outdir``, or, when it already holds a demo's files (and not ``force``), the first ``outdir-N`` that
    does not: rerunning the README's demo command never overwrites earlier results."""
    if force:
        return outdir
    candidate, n = outdir, 1
    while any((candidate / f).exists() for f in DEMO_FILES):
        n += 1
        candidate = outdir.with_name(f"{outdir.name}-{n}")
    if candidate != outdir:
        print(f"demo: {outdir} already holds a demo's results; writing to {candidate} (--force overwrites)")
    return candidate


def _run_demo_headless(outdir: Path) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .io import load_sample, write_result
    from .io.export import native_units
    from .metrics import psnr, ssim
    from .priors import default_prior_for
    from .reconstruct import RunSettings, reconstruct
    from .samplers.defaults import recommended_params

    m = load_sample("ct_sparse23")
    gt = m.ground_truth
    runs = [("FBP", RunSettings(method="fbp")), ("TV", RunSettings(method="tv"))]
    dds = f"DDS (mean of {DEMO_SAMPLES})"
    if default_prior_for("ct"):  # recommended: hot start from the data's classical image (10 network evaluations);
        # a few posterior samples give what the product is for: their mean and a per-pixel std
        runs.append((dds, RunSettings(method="dds", params=recommended_params("dds", "ct", True), hot_start="auto",
                                      n_samples=DEMO_SAMPLES, keep_samples=True)))
    if default_prior_for("ct", consistency=True) not in (None, default_prior_for("ct")):
        runs.append(("Consistency (4 NFE)", RunSettings(
            method="consistency", params=recommended_params("consistency", "ct", True), hot_start="auto")))
    results = {}
    for label, s in runs:
        print(f"demo: {label} ...", flush=True)
        results[label] = reconstruct(m, s)
    outdir.mkdir(parents=True, exist_ok=True)
    best = dds if dds in results else runs[-1][0]
    arrays = {
        "ground_truth": gt,
        **{f"reconstruction_{k.split()[0].lower()}": r.reconstruction for k, r in results.items()},
    }
    if dds in results:
        arrays["std_dds"] = results[dds].std
    npz = write_result(outdir / "demo_reconstruction.npz", arrays, results[best].provenance, overwrite=True)
    result_file = None
    if dds in results:  # the DDS run as `reconstruct` writes it: `export` and `info` take it, the workbench opens it
        result_file = write_result(outdir / "demo_dds.npz", results[dds].arrays(), results[dds].provenance,
                                   overwrite=True)
    panels = len(results) + 1 + (dds in results)
    fig, axes = plt.subplots(1, panels, figsize=(3.2 * panels, 3.4))
    intensity = m.metadata.get("intensity") if isinstance(m.metadata, dict) else None
    shown_gt, units = native_units(gt, "ground truth", intensity)  # CT in HU, as a clinician reads it
    vmin, vmax = float(shown_gt.min()), float(shown_gt.max())
    axes[0].imshow(shown_gt, cmap="gray", vmin=vmin, vmax=vmax)
    axes[0].set_title("ground truth" + (f"\n{vmin:.0f} to {vmax:.0f} {units}" if units else ""), fontsize=9)
    for ax, (label, r) in zip(axes[1:], results.items(), strict=False):
        ax.imshow(native_units(r.reconstruction, "mean", intensity)[0], cmap="gray", vmin=vmin, vmax=vmax)
        ax.set_title(f"{label}\n{psnr(r.reconstruction, gt):.2f} dB, SSIM {ssim(r.reconstruction, gt):.3f}", fontsize=9)
    if dds in results:
        std, std_units = native_units(results[dds].std, "std", intensity)
        im = axes[-1].imshow(std, cmap="magma")
        axes[-1].set_title(f"DDS posterior std ({DEMO_SAMPLES} samples)" + (f", {std_units}" if std_units else "")
                           + "\n0 outside the scanned disc", fontsize=9)
        fig.colorbar(im, ax=axes[-1], fraction=0.046, pad=0.02)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(m.metadata.get("description", "sample"), fontsize=10)
    fig.tight_layout()
    png = outdir / "demo_comparison.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    width = max(len(label) for label in results)
    for label, r in results.items():
        one = (f"  (one sample {psnr(r.samples[0], gt):.2f} dB)" if r.samples is not None and len(r.samples) > 1
               else "")
        print(f"  {label:{width}s}  PSNR {psnr(r.reconstruction, gt):6.2f} dB  SSIM {ssim(r.reconstruction, gt):.3f}"
              + one)
    also = (f"; the DDS run's result file {result_file} (napari-diffrecon export {result_file} -o dds_mean.nii.gz "
            "writes its mean in HU)") if result_file else ""
    print(f"wrote {npz} and {png}{also}")
    return 0


def _cmd_demo(a: argparse.Namespace) -> int:
    outdir = Path(a.output)
    if outdir.exists() and not outdir.is_dir():
        raise ValueError(f"demo output {outdir} is a file, not a folder; pass -o FOLDER")
    has_display = bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    widget = None
    if has_display and not a.headless:
        try:  # needs napari and a Qt binding (the napari extra)
            import napari
            from qtpy import QtWidgets  # noqa: F401 - napari imports without a Qt binding; the viewer does not

            from ._widgets import open_demo as widget
        except ImportError:
            widget = None
    if widget is None:
        if has_display and not a.headless:
            print("demo: the workbench needs napari and a Qt binding "
                  "(pip install -c constraints.txt -e \".[napari]\"); running the headless demo")
        return _run_demo_headless(_free_demo_folder(outdir, a.force))
    viewer = napari.Viewer()  # pragma: no cover - GUI path
    widget(viewer, n_samples=DEMO_SAMPLES)  # the headless demo's DDS run, streaming into the workbench
    napari.run()
    return 0


def _training_pool(a: argparse.Namespace) -> tuple[Any, dict[str, Any], int]:
    """The image pool, its provenance record and the channel count, from ``train``/``distill`` arguments."""
    from .priors.data import load_training_images
    from .priors.sources import BUILTIN_SOURCES, builtin_pool
    from .priors.training import ImagePool

    if a.threads:  # 0: torch's default, as before
        _set_threads(a.threads)
    channels = 2 if a.complex else 1
    if a.complex and a.modality != "mri":
        raise ValueError("--complex (2-channel real/imaginary prior) is for MRI only")
    if str(a.data).startswith("builtin:"):
        source = str(a.data).split(":", 1)[1]
        if source in BUILTIN_SOURCES and BUILTIN_SOURCES[source]["modality"] != a.modality:
            raise ValueError(f"built-in source {source!r} is for --modality {BUILTIN_SOURCES[source]['modality']}")
        pool, data = builtin_pool(source, a.resolution, channels=channels, seed=a.seed, pool_size=a.pool)
        print(f"{a.command}: built-in source {source}, pool of {pool.images.shape[0]} images, refreshed on the fly")
    else:
        if a.complex:
            raise ValueError("--complex needs complex training data; folders hold magnitude images (builtin:mni152)")
        images = load_training_images(a.data, a.modality, a.resolution)
        print(f"{a.command}: {images.shape[0]} slices from {a.data}")
        pool, data = ImagePool(images, seed=a.seed), {"sources": [str(a.data)], "n_slices": int(images.shape[0])}
    return pool, data, channels


def _cmd_train(a: argparse.Namespace) -> int:
    from .priors.sources import normalisation_for
    from .priors.training import TrainConfig, check_train_config, train_prior

    channels = 2 if a.complex else 1
    cfg = TrainConfig(
        name=a.name,
        modality=a.modality,
        channels=channels,
        resolution=a.resolution,
        patch_size=min(a.patch, a.resolution),
        arch=a.arch,
        batch_size=a.batch,
        lr=a.lr,
        lr_schedule=a.lr_schedule,
        steps=a.steps,
        seed=a.seed,
        device=a.device,
        amp=a.amp,
        aug_dim=a.aug_dim,
        init_from=a.init or "",
        val_every=a.val_every,
        ckpt_every=a.val_every,
        normalisation=normalisation_for(a.modality, channels),
        command="napari-diffrecon " + " ".join(sys.argv[1:]) if sys.argv else "",
    )
    check_train_config(cfg)  # bad settings are refused before the training pool is built
    pool, cfg.data, _ = _training_pool(a)
    train_prior(cfg, pool, a.output, resume=not a.restart, progress=not a.no_progress)
    return 0


def _cmd_distill(a: argparse.Namespace) -> int:
    from .priors.consistency import DistillConfig, check_distill_config, distill_consistency
    from .priors.registry import load_prior

    teacher = load_prior(a.teacher, a.device)
    a.modality, a.complex, a.resolution = teacher.card.modality, teacher.card.channels == 2, teacher.card.resolution
    cfg = DistillConfig(
        name=a.name or f"{teacher.card.name}-consistency",
        teacher=str(a.teacher),
        mode="training" if a.from_scratch else "distillation",
        n_grid=a.grid,
        sigma_max=a.sigma_max,
        target_decay=a.target_decay,
        batch_size=a.batch,
        patch_size=min(a.patch, teacher.card.resolution),
        lr=a.lr,
        steps=a.steps,
        val_every=a.val_every,
        seed=a.seed,
        device=a.device,
        command="napari-diffrecon " + " ".join(sys.argv[1:]) if sys.argv else "",
    )
    check_distill_config(cfg, teacher)  # bad settings are refused before the training pool is built
    pool, cfg.data, _ = _training_pool(a)
    distill_consistency(teacher, cfg, pool, a.output, resume=not a.restart, progress=not a.no_progress)
    return 0


def _cmd_export_prior(a: argparse.Namespace) -> int:
    from .io import check_output_path
    from .priors.training import export_checkpoint

    out = Path(a.output)
    stem = out.with_suffix("") if out.suffix in (".json", ".safetensors") else out
    for p in (stem.with_suffix(".json"), stem.with_suffix(".safetensors")):
        check_output_path(p, a.force)
    if a.average_weight is not None and a.average_with is None:
        raise ValueError("--average-weight is the run's share in an average: give the other prior with --average-with")
    share = {} if a.average_weight is None else {"average_weight": a.average_weight}  # else export_checkpoint's ½
    w, c = export_checkpoint(a.run, stem, half=a.half, average_with=a.average_with, **share)
    print(f"wrote {w} ({w.stat().st_size / 1e6:.1f} MB) and {c}")
    return 0


def _parser() -> argparse.ArgumentParser:
    from ._samples import DATA_DIR, SAMPLES

    samples = "\n".join(f"  {DATA_DIR / (key + '.npz')}   {title}" for key, title in SAMPLES.items())
    p = argparse.ArgumentParser(
        prog="napari-diffrecon", description="Reconstruct CT/MRI/PET with diffusion priors.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"shipped sample measurements (any command takes them where it takes a bundle):\n{samples}\n"
               "e.g. napari-diffrecon reconstruct THAT.npz --method dds --hot-start auto -o out.npz")
    p.add_argument("--version", action="version", version=f"napari-diffrecon {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("simulate", help="simulate a measurement bundle from an image")
    s.add_argument("image", help="DICOM file/folder, NIfTI, TIFF, PNG or .npy")
    s.add_argument("--modality", required=True, choices=["ct", "mri", "pet"])
    s.add_argument("--views", type=int, help="CT/PET: number of views over 180°")
    s.add_argument("--limited-angle", type=float, help="CT/PET: angular range in degrees (< 180)")
    s.add_argument("--photons", type=float, help="CT low dose: blank-scan photons per bin (I0)")
    s.add_argument("--accel", type=float, help="MRI: acceleration (default 4)")
    s.add_argument("--coils", type=int, help="MRI: number of coils (default 1)")
    s.add_argument("--mask", default="random", choices=["random", "equispaced", "poisson"], help="MRI mask kind")
    s.add_argument("--counts", type=float, help="PET: expected total true counts (default 2e5)")
    s.add_argument("--noise-sigma", type=float, help="Gaussian noise sigma (CT post-log, MRI k-space)")
    s.add_argument("--size", type=int, default=128)
    s.add_argument("--slice", type=int, help="slice of a volume (default middle)")
    s.add_argument("--volume", action="store_true",
                   help="every slice: a volume study (.npz) for `reconstruct STUDY --volume`; each slice resized to "
                        "--size, noise 1 %% of the data RMS (CT, MRI) or Poisson counts per slice (PET)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("-o", "--output", required=True)
    s.add_argument("--force", action="store_true", help="overwrite an existing output file")
    s.set_defaults(func=_cmd_simulate)

    r = sub.add_parser("reconstruct", help="reconstruct a measurement bundle, a volume study or a folder of studies")
    r.add_argument("bundle")
    r.add_argument("--method", help="fbp, zero_filled, cg, tv, mlem, osem, dds, dps, mcg, song, ...; mbir for volumes")
    r.add_argument("--iters", type=int, help="classical: iterations (default: CG 20, TV 1000, MLEM / OSEM until the "
                   "data residual reaches the noise level)")
    r.add_argument("--lam", type=float, help="TV weight (classical, and a TV hot start of dds/dps/consistency) / "
                   "Song-MCG λ (with --method song or mcg)")
    r.add_argument("--lam-rel", type=float, dest="lam_rel",
                   help="TV weight relative to the largest back-projected value (default by modality: CT 5e-4, PET "
                        "0.016, MRI 0.1 single coil / 0.016 multi-coil); --lam gives an absolute weight instead")
    r.add_argument("--filter", help="FBP filter: ramp, shepp-logan, cosine, hamming, hann (default: ramp for CT, "
                   "hann for PET)")
    r.add_argument("--subsets", type=int, help="OSEM subsets; with a diffusion sampler on PET: ordered subsets "
                   "of its EM data step (default 1 = exact EM)")
    r.add_argument("--prior", help="shipped prior name or path to a .json card ('napari-diffrecon priors' lists them)")
    r.add_argument("--steps", type=int, help="diffusion steps")
    r.add_argument("--samples", type=int, default=1, help="posterior samples (one batch)")
    r.add_argument("--eta", type=float)
    r.add_argument("--gamma", type=float, help="DDS data weight")
    r.add_argument("--zeta", type=float, help="DPS/MCG step")
    r.add_argument("--cg-iters", type=int, help="CG iterations per data step (dds, consistency) or pseudo-inverse "
                   "(song, mcg; tuned: 1 on noisy data — counts, or a noise floor above 1.8 %% — else 5)")
    r.add_argument("--snr", type=float, help="Song corrector SNR")
    r.add_argument("--prior-weight", type=float,
                   help="the prior's weight against the data (default 1): every sampler's data weight is divided by "
                   "it (DDS γ, DPS/MCG ζ, Song/MCG λ)")
    r.add_argument("--orientations", type=int,
                   help="orientation ensemble, 1–8 (default: 8 for DDS hot starts on CT, else 1): posterior sample k "
                   "is denoised in the k-th symmetry of the square (flips, half and quarter turns) and turned back, so "
                   "the samples' mean averages out the network's orientation-dependent errors (hot-started CT means "
                   "of 8: +0.04 to +0.23 dB); one sample is unchanged. From noise it turns the anatomy the prior "
                   "draws, and can cost dB")
    r.add_argument("--posterior-draw", choices=["gaussian", "jacobian"],
                   help="DDS: draw x0 from its posterior at each data step instead of taking its mean (calibrated "
                   "spread: exact for a Gaussian prior at any step count; on real scans wider intervals that hold "
                   "the truth more often, at some cost in PSNR of the mean). jacobian: structured, +1 network "
                   "evaluation per step; gaussian: isotropic")
    r.add_argument("--renoise", choices=["dds", "ddim"],
                   help="DDS: how the data-consistent estimate is re-noised for the next step (also the volume "
                   "sampler). dds (the tuned default): the DDS code's, x0 + σ'(η z + √(1−η²) ε) with the network's ε, "
                   "keeping the data step's whole correction; ddim: the exact DDIM step with ε recomputed from the "
                   "corrected x0 (η then is DDIM's)")
    r.add_argument("--hot-start", choices=["auto", "fbp", "cg", "mlem", "osem", "tv", "zero_filled"],
                   help="start the reverse process at --t0 from this classical reconstruction; auto: the data's "
                   "(MRI cg, PET tv, CT fbp, or tv for ≤ 30 views or an arc under 160°)")
    r.add_argument("--t0", type=float, help="hot start: fraction of the schedule to run")
    r.add_argument(
        "--auto",
        nargs="?",
        const="auto",
        choices=["auto", "split", "discrepancy", "sure"],
        help="self-tune the prior/likelihood balance from the data (DDS γ, DPS/MCG ζ, Song λ) before the run: auto "
        "(default: the discrepancy principle for Gaussian noise of known σ, else measurement splitting), split, "
        "discrepancy or SURE (Gaussian noise)",
    )
    r.add_argument(
        "--auto-params",
        nargs="+",
        metavar="NAME[=v1,v2,...]",
        help="what to search (default: the method's balance parameter on its default grid), e.g. gamma=0.3,1,3 "
        "cg_iters=3,5 (two names = a 2D search)",
    )
    r.add_argument("--holdout", type=float, help="--auto split: fraction of views / lines held out (default 0.2)")
    r.add_argument(
        "--adapt-steps",
        type=int,
        help="DDS/DPS, experimental: adapt the prior to this scan while sampling (LoRA, steerable conditional "
        "diffusion): Adam steps per sampling step (0 = off, the default). Helps DPS; with DDS it can over-fit "
        "noisy data",
    )
    r.add_argument("--adapt-lr", type=float, help="adaptation learning rate (default 1e-3)")
    r.add_argument("--lora-rank", type=int, help="adaptation: LoRA rank (default 4)")
    r.add_argument("--adapt-every", type=int, help="adaptation: adapt at every k-th step (default 1)")
    r.add_argument("--adapt-start", type=float, help="adaptation: fraction of the run before it starts (default 0)")
    r.add_argument(
        "--adapt-target",
        choices=["data_step", "x0_hat"],
        help="adaptation loss on DDS's data-consistent image (default) or on the Tweedie estimate",
    )
    r.add_argument(
        "--adapt-floor",
        type=float,
        help="adaptation: stop once the deviance per datum is at or below this (1 = the noise level; default off)",
    )
    r.add_argument("--keep-samples", action="store_true")
    r.add_argument("--precision", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="the prior network's arithmetic (autocast; the data step stays float32): bfloat16 takes "
                   "1.4–1.6× less CPU time for DDS from noise, up to 1.5× for hot starts, on CPUs with AVX512-BF16/AMX "
                   "(see README) at ≤ 0.01 dB; float16 for GPUs")
    r.add_argument("--std-pool", type=float, default=None, metavar="PX",
                   help="pool the per-voxel variance of the samples over a Gaussian of PX pixels before the std "
                        "(default 1: a steadier std from few samples; 0 = raw per voxel; 2D runs only)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--device", default="cpu", type=_device)
    r.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's, all cores)")
    r.add_argument("--slice", type=int, default=None, help="fastMRI .h5: the slice to reconstruct (default: middle)")
    r.add_argument("--size", type=int, default=None, metavar="N",
                   help="fastMRI .h5: an N × N image — readout oversampling removed, k-space centre N × N kept (the "
                        "same field of view at a coarser pixel; e.g. 128, the shipped MRI prior's resolution, for "
                        "640 × 368 knee k-space)")
    r.add_argument("-o", "--output", required=True)
    r.add_argument("--force", action="store_true")
    from .distributed import add_volume_arguments  # no dask import at module level: cheap

    add_volume_arguments(r)
    r.set_defaults(func=_cmd_reconstruct)

    d = sub.add_parser("demo", help="the main job on the shipped sample (napari when available, else headless)")
    d.add_argument("--headless", action="store_true")
    d.add_argument("-o", "--output", default="diffrecon-demo",
                   help="folder for the headless demo's files (when it holds earlier ones: FOLDER-2, -3, ...)")
    d.add_argument("--force", action="store_true", help="overwrite the headless demo's earlier files in --output")
    d.set_defaults(func=_cmd_demo)

    t = sub.add_parser("train", help="train a diffusion prior on a folder of images (resumable)")
    t.add_argument(
        "data",
        help="folder of DICOM series, NIfTI volumes, TIFF/PNG/NPY images; or builtin:ct-phantoms, "
        "builtin:ct-phantoms-detailed, builtin:ct-phantoms-real, builtin:ct-phantoms-real-chest (reads the "
        "pyradiomics sdist named by $NAPARI_DIFFRECON_PYRADIOMICS_SDIST), builtin:ct-phantoms-real-more (also the "
        "TotalSegmentator sdist named by $NAPARI_DIFFRECON_TOTALSEG_SDIST), builtin:pet-phantoms, builtin:mni152, "
        "builtin:mni152-views",
    )
    t.add_argument("--modality", required=True, choices=["ct", "mri", "pet", "generic"])
    t.add_argument("--name", default="my-prior")
    t.add_argument("--resolution", type=int, default=128)
    t.add_argument("--patch", type=int, default=64, help="training patch size (patch diffusion)")
    t.add_argument("--arch", default="small", choices=["tiny", "small", "base"])
    t.add_argument("--batch", type=int, default=16)
    t.add_argument("--lr", type=float, default=2e-4)
    t.add_argument("--lr-schedule", default="constant", choices=["constant", "cosine"],
                   help="learning rate over the run: constant, or cosine-annealed from --lr to 0 at --steps (a "
                   "fine-tune that should end settled)")
    t.add_argument("--steps", type=int, default=10000)
    t.add_argument("--val-every", type=int, default=250)
    t.add_argument("--amp", action="store_true", help="mixed precision")
    t.add_argument("--restart", action="store_true", help="ignore an existing checkpoint")
    t.add_argument("--complex", action="store_true", help="MRI: 2-channel (real/imag) prior for complex k-space")
    t.add_argument("--pool", type=int, default=384, help="built-in sources: images held in the pool")
    t.add_argument("--threads", type=int, help="CPU threads for torch")
    t.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    t.add_argument(
        "--aug-dim",
        type=float,
        help="PFGM++: train with the Poisson-flow kernel of augmentation dimension D (e.g. 128; default: diffusion, "
        "D = ∞); the EDM sampling code is reused through r = σ√D",
    )
    t.add_argument("--init", help="start from this prior's weights (shipped name or .json path): fine-tuning")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="cpu", type=_device)
    t.add_argument("-o", "--output", required=True, help="output folder (checkpoint, history, weights + card)")
    t.set_defaults(func=_cmd_train)

    c = sub.add_parser(
        "distill", help="distil a diffusion prior into a consistency model (1–4 network evaluations; resumable)"
    )
    c.add_argument("teacher", help="the diffusion prior: shipped name or .json path")
    c.add_argument(
        "data", help="the teacher's training data: builtin:ct-phantoms, builtin:ct-phantoms-detailed, "
        "builtin:ct-phantoms-real, builtin:ct-phantoms-real-chest, builtin:ct-phantoms-real-more, "
        "builtin:pet-phantoms, builtin:mni152, builtin:mni152-views, a folder"
    )
    c.add_argument("--name", help="name of the consistency model (default TEACHER-consistency)")
    c.add_argument(
        "--from-scratch",
        action="store_true",
        help="consistency training (no teacher network; random start); TEACHER only gives architecture and units",
    )
    c.add_argument("--steps", type=int, default=1000)
    c.add_argument("--batch", type=int, default=16)
    c.add_argument("--patch", type=int, default=64)
    c.add_argument("--lr", type=float, default=1e-4)
    c.add_argument("--grid", type=int, default=18, help="noise levels N of the distillation grid (Karras, ρ = 7)")
    c.add_argument("--sigma-max", type=float, default=None,
                   help="top of the distillation grid (default: the teacher's σ_max, 80): a lower one puts every grid "
                        "level where hot starts enter (a consistency model for hot starts only)")
    c.add_argument("--target-decay", type=float, default=0.95, help="EMA μ of the target network")
    c.add_argument("--val-every", type=int, default=100)
    c.add_argument("--pool", type=int, default=384, help="built-in sources: images held in the pool")
    c.add_argument("--threads", type=int, help="CPU threads for torch")
    c.add_argument("--restart", action="store_true", help="ignore an existing checkpoint")
    c.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--device", default="cpu", type=_device)
    c.add_argument("-o", "--output", required=True, help="output folder (checkpoint, history, weights + card)")
    c.set_defaults(func=_cmd_distill)

    e = sub.add_parser("export-prior", help="export a prior (EMA weights + card) from a training run's checkpoint")
    e.add_argument("run", help="training output folder (holds checkpoint.pt); the run may still be going")
    e.add_argument("-o", "--output", required=True, help="output stem: writes STEM.safetensors and STEM.json")
    e.add_argument("--half", action="store_true", help="store float16 weights (half the size)")
    e.add_argument("--average-with", metavar="PRIOR", help="average the run's weights with this prior's (shipped "
                   "name or .json; same architecture, e.g. the prior the run was fine-tuned from)")
    e.add_argument("--average-weight", type=float, default=None, metavar="W",
                   help="with --average-with: the run's share in (0, 1] (default 0.5)")
    e.add_argument("--force", action="store_true")
    e.set_defaults(func=_cmd_export_prior)

    x = sub.add_parser("export", help="export an image of a result (.npz) as NIfTI, DICOM or TIFF (CT in HU)",
                       description="Write one image of a 'reconstruct -o result.npz' file in the format its name "
                                   "ends in (.nii/.nii.gz, .dcm, .tif), with the run's provenance; CT images and "
                                   "their std in Hounsfield units, the pixel size from the measurement.")
    x.add_argument("result", help="a result .npz written by 'napari-diffrecon reconstruct -o'")
    x.add_argument("-o", "--output", required=True, help="image file: .nii, .nii.gz, .dcm, .tif or .tiff")
    x.add_argument("--field", default=None, choices=["mean", "reconstruction", "std", "lower", "upper", "samples"],
                   help="which image (default: the mean of a diffusion run, the reconstruction of a classical one)")
    x.add_argument("--force", action="store_true", help="replace an existing file")
    x.set_defaults(func=_cmd_export)

    pr = sub.add_parser("priors", help="list the shipped priors (and which is each modality's default), or show one "
                        "card in full")
    pr.add_argument("prior", nargs="?", default=None, help="a shipped prior's name or a .json card: its card in full")
    pr.set_defaults(func=_cmd_priors)

    i = sub.add_parser("info", help="summarise a measurement bundle, a volume study or a result file")
    i.add_argument("bundle")
    i.set_defaults(func=_cmd_info)
    return p


def _device(name: str) -> str:
    """argparse type of ``--device``: refuse a device this machine does not have before any work starts."""
    from .reconstruct import check_device

    try:
        check_device(name)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return name


def console_main(argv: list[str] | None = None) -> int:
    """The ``napari-diffrecon`` command: :func:`main`, with Python warnings (e.g. angles that look like radians)
    shown as one ``warning:`` line on stderr, each message once, instead of a source line per call site. Only for
    the command's duration (``main`` called from Python leaves the process's warning handling alone)."""
    import warnings

    shown: set[tuple[type, str]] = set()

    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ARG001 - warnings' signature
        key = (category, str(message))
        if key not in shown:
            shown.add(key)
            print(f"warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():  # restores the handler and the filters afterwards
        warnings.showwarning = show
        return main(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (2 with a one-line ``error:`` for bad input)."""
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except MemoryError as e:
        from .volume.memory import VolumeMemoryError

        if not isinstance(e, VolumeMemoryError):  # a real out-of-memory: the traceback says where
            raise
        print(f"error: {e}", file=sys.stderr)  # a volume run that would not fit its budget: the message says what would
        return 2
    except BrokenPipeError:  # `napari-diffrecon info x.npz | head -1`: the reader left; no traceback, but not a success
        with contextlib.suppress(OSError):  # (a run whose progress lines had nowhere to go stopped: nothing written)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as e:  # a disk that filled up, a folder that became read-only mid-run: one line, not a traceback
        what = f"{e.strerror or e}" + (f": {e.filename}" if e.filename else "")
        print(f"error: {what}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: results are written atomically (nothing half-written); training has saved
        print("interrupted", file=sys.stderr)  # its checkpoint and said so
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(console_main())
