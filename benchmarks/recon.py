"""Reconstruction benchmark: classical baselines vs diffusion samplers on real images the priors never saw.

Run (CPU, one thread, ≈ 15–20 min for the full table):

    python benchmarks/recon.py                                   # shipped priors by name
    python benchmarks/recon.py --prior-dir /tmp/snap   # <dir>/{ct-phantom-128,mri-brain-128,pet-phantom-128}.json
    python benchmarks/recon.py --tasks ct-23 mri-4x --methods fbp tv dds      # a subset
    python benchmarks/recon.py --extras-only                     # uncertainty, batch cost, NFE curve
    python benchmarks/recon.py --nfe-study                       # PSNR/SSIM vs NFE: DDS, DPS, PFGM++, consistency

Writes ``<out>.md`` (markdown tables) and ``<out>.json`` (every number), default ``benchmarks/results/recon``.

Evaluation images (real; never used to train a prior, which train on procedural phantoms and nilearn's MNI152):

- CT: pydicom's ``CT_small.dcm`` (a real 128×128 CT slice of the thoracic spine, 0.66 mm pixels), in HU.
- CT, more slices (tasks ``ct-23-j2k``, ``ct-8-j2k``, ``ct-23-693``, ``ct-8-693``; not in the default table):
  pydicom's ``J2K_pixelrep_mismatch.dcm`` and ``693_J2KI.dcm`` (real 512² CT sections, JPEG 2000), in HU clipped at
  −1024, resized to 128 by :func:`simulate_from_image`. They informed no phantom, prior or tuned default.
- MRI: nibabel's ``tests/data/anatomical.nii`` (a real T1 brain, 2 mm voxels), axial slice 12,
  zero-padded to a square and resized to 128 by :func:`simulate_from_image`; magnitude scaled so the
  99.5th percentile = 1 and given a smooth random phase by the simulator (a 33×41 slice: blurred at 128).
- MRI, sharper: dipy's ``t1_coronal_slice.npy`` (a real T1 brain slice at 1 mm, BSD-3, vendored in ``benchmarks/data``;
  an individual head, not the MNI152 template the prior trained on), cropped to the 160² square around the head
  and resized to 128 by :func:`simulate_from_image`; magnitude scaled so the 99.5th percentile = 1 and given a
  smooth random phase by the simulator: tasks ``mri-4x-t1c`` and ``mri-4x-8c-t1c`` (not in the default table).
- PET: an FDG-like activity map from a different axial slice (14) of the same T1 volume, made at its native
  2 mm grid by :func:`napari_diffrecon.simulate.activity_from_anatomy` (kind "mr": tissue classes from the
  head's intensity percentiles, uptake CSF 0.1 : GM 4 : WM 1, 1.5-pixel (3 mm) FWHM blur), then resized to 128.

Every task is made by :func:`napari_diffrecon.simulate.simulate_from_image` with seed 0.

Metrics: PSNR and SSIM against the ground truth over the whole 128² image, data range = ground truth max − min
(magnitude for MRI); data residual = :func:`napari_diffrecon.metrics.data_residual` in the data's own domain
(post-log for low-dose CT, expected counts for PET), shown next to the ground truth's own residual (the noise
floor); NFE = network evaluations per sample (DPS/MCG also backpropagate through each; a batch of K samples
evaluates the network once per step on all K); CPU s = CPU time of the ``reconstruct()`` call (thread time, one
torch thread: robust to other processes on a shared machine) and wall s its elapsed time; peak memory = the largest
increase of the process's resident set size over its value before the call (sampled every 2 ms from
/proc/self/statm after ``malloc_trim``; torch's CPU allocations are invisible to tracemalloc); network share =
CPU time inside the network's forward and backward passes (module hooks) over the call's CPU time, so
1 − share is the sampler's overhead (data steps, operators, bookkeeping).

Tuning: the TV weight, the MLEM iteration count and the samplers' parameters
(:mod:`napari_diffrecon.samplers.defaults`) were chosen on these ground truths (a small grid, recorded in
/work/notes/recon.md); the baselines' oracle choice is made here, per task, on the same grid every run.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from napari_diffrecon.io.bundle import Measurement
from napari_diffrecon.priors.prior import PRECISIONS
from napari_diffrecon.simulate import simulate_from_image
from napari_diffrecon.uncertainty import summarize

__all__ = ["ct_hu", "ct_other_hu", "mri_t1", "mri_t1_coronal", "pet_activity", "TASKS", "build_task", "task_names",
           "main"]

SHIPPED = {"ct": "ct-phantom-128", "mri": "mri-brain-128", "pet": "pet-phantom-128"}


def ct_hu() -> tuple[np.ndarray, float]:
    """The CT_small.dcm slice in HU and its pixel size (mm)."""
    import pydicom
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    return hu, float(ds.PixelSpacing[0])


def _t1_volume() -> np.ndarray:
    import nibabel

    path = os.path.join(os.path.dirname(nibabel.__file__), "tests", "data", "anatomical.nii")
    return np.asarray(nibabel.load(path).dataobj, dtype=np.float64)


def _square(img: np.ndarray) -> np.ndarray:
    """Zero-pad to a square (keeps the aspect ratio when resized)."""
    h, w = img.shape
    n = max(h, w)
    out = np.zeros((n, n), dtype=img.dtype)
    out[(n - h) // 2 : (n - h) // 2 + h, (n - w) // 2 : (n - w) // 2 + w] = img
    return out


def mri_t1(index: int = 12) -> np.ndarray:
    """Axial slice ``index`` of nibabel's anatomical.nii T1 brain, square, ≥ 0."""
    vol = _t1_volume()
    return _square(np.clip(np.rot90(vol[:, :, index]), 0, None))


def mri_t1_coronal() -> np.ndarray:
    """dipy's ``t1_coronal_slice.npy`` (a real 1 mm T1 brain slice, BSD-3, vendored in ``benchmarks/data``), ≥ 0.

    Cropped to the 160² square around the head (rows 26–185, columns 48–207 of 256²): 1.25 mm pixels at 128².
    """
    img = np.load(Path(__file__).parent / "data" / "dipy_t1_coronal_slice.npy").astype(np.float64)
    return np.clip(img[26:186, 48:208], 0, None)


def pet_activity(index: int = 14) -> np.ndarray:
    """FDG-like activity from a T1 slice at its native 2 mm grid (:func:`simulate.activity_from_anatomy`, "mr").

    Classified at the native resolution (thresholding an upsampled image would give blocky class edges);
    :func:`simulate_from_image` then resizes it (linear interpolation) to the task size.
    """
    from napari_diffrecon.simulate import activity_from_anatomy

    return activity_from_anatomy(mri_t1(index), "mr")


def _ct(**kw: Any) -> Callable[[int, int], Measurement]:
    def make(size: int, seed: int) -> Measurement:
        hu, px = ct_hu()
        px = px * hu.shape[0] / size
        return simulate_from_image(hu, "ct", size=size, units="HU", pixel_size_mm=px, seed=seed,
                                   source="pydicom CT_small.dcm", **kw)

    return make


def ct_other_hu(name: str) -> tuple[np.ndarray, float]:
    """One of pydicom's other real CT slices (``J2K_pixelrep_mismatch.dcm``, ``693_J2KI.dcm``: 512² JPEG 2000, decoded
    by pylibjpeg) in HU, clipped at −1024 (the scanners' padding outside their field of view reads −2000 to −4000),
    and its pixel size (mm). Whole-section fields of view, so at 128² a pixel is 1.7–1.9 mm."""
    from pydicom.data import get_testdata_file

    from napari_diffrecon.io import read_image

    hu, info = read_image(get_testdata_file(name))  # rescaled to HU
    return np.clip(hu.astype(np.float64), -1024, None), float(info["pixel_spacing_mm"][0])


def _ct_other(name: str, **kw: Any) -> Callable[[int, int], Measurement]:
    def make(size: int, seed: int) -> Measurement:
        hu, px = ct_other_hu(name)
        return simulate_from_image(hu, "ct", size=size, units="HU", pixel_size_mm=px * hu.shape[0] / size, seed=seed,
                                   source=f"pydicom {name}", **kw)

    return make


def _mri(**kw: Any) -> Callable[[int, int], Measurement]:
    def make(size: int, seed: int) -> Measurement:
        return simulate_from_image(mri_t1(), "mri", size=size, seed=seed, source="nibabel anatomical.nii z=12", **kw)

    return make


def _mri_t1c(**kw: Any) -> Callable[[int, int], Measurement]:
    def make(size: int, seed: int) -> Measurement:
        return simulate_from_image(mri_t1_coronal(), "mri", size=size, seed=seed,
                                   source="dipy t1_coronal_slice.npy (real T1)", **kw)

    return make


def _pet(**kw: Any) -> Callable[[int, int], Measurement]:
    def make(size: int, seed: int) -> Measurement:
        return simulate_from_image(pet_activity(), "pet", size=size, seed=seed,
                                   source="FDG-like map from nibabel anatomical.nii z=14", **kw)

    return make


# name -> (description, builder)
TASKS: dict[str, tuple[str, Callable[[int, int], Measurement]]] = {
    "ct-23": ("CT, 23 views over 180°, 0.5% Gaussian noise", _ct(views=23)),
    "ct-8": ("CT, 8 views over 180°, 0.5% Gaussian noise", _ct(views=8)),
    "ct-la90": ("CT, limited angle 90° (90 views), 0.5% Gaussian noise", _ct(limited_angle=90.0)),
    "ct-lowdose": ("CT low-dose, 180 views, 1e4 photons/bin (transmission Poisson)", _ct(views=180, photons=1e4)),
    "mri-4x": ("MRI 4× (random lines, 8% centre), single coil", _mri(accel=4.0)),
    "mri-4x-8c": ("MRI 4×, 8 coils (SENSE)", _mri(accel=4.0, coils=8)),
    "mri-8x": ("MRI 8×, single coil", _mri(accel=8.0)),
    "mri-8x-8c": ("MRI 8×, 8 coils (SENSE)", _mri(accel=8.0, coils=8)),
    "mri-4x-t1c": ("MRI 4×, single coil, dipy's real 1 mm T1 (coronal)", _mri_t1c(accel=4.0)),
    "mri-4x-8c-t1c": ("MRI 4×, 8 coils, dipy's real 1 mm T1 (coronal)", _mri_t1c(accel=4.0, coils=8)),
    "pet-low": ("PET low-count, 180 views, 1e5 true counts, 20% background", _pet(counts=1e5)),
    # pydicom's two other real CTs (whole-body head / neck sections; informed no phantom, prior or default)
    "ct-23-j2k": ("CT, 23 views, 0.5% noise, pydicom's J2K_pixelrep_mismatch.dcm",
                  _ct_other("J2K_pixelrep_mismatch.dcm", views=23)),
    "ct-8-j2k": ("CT, 8 views, 0.5% noise, pydicom's J2K_pixelrep_mismatch.dcm",
                 _ct_other("J2K_pixelrep_mismatch.dcm", views=8)),
    "ct-23-693": ("CT, 23 views, 0.5% noise, pydicom's 693_J2KI.dcm", _ct_other("693_J2KI.dcm", views=23)),
    "ct-8-693": ("CT, 8 views, 0.5% noise, pydicom's 693_J2KI.dcm", _ct_other("693_J2KI.dcm", views=8)),
}


EXTRA_TASKS = ("mri-4x-t1c", "mri-4x-8c-t1c", "ct-23-j2k", "ct-8-j2k", "ct-23-693", "ct-8-693")  # --tasks only


def task_names() -> list[str]:
    """The default table's task names, in table order (:data:`EXTRA_TASKS` on request)."""
    return [t for t in TASKS if t not in EXTRA_TASKS]


def build_task(name: str, size: int = 128, seed: int = 0) -> Measurement:
    """The simulated measurement of task ``name`` (fixed ``seed``)."""
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; use one of {', '.join(TASKS)}")
    return TASKS[name][1](size, seed)


# -- measuring ----------------------------------------------------------------------------------------------
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:  # pragma: no cover - not Linux
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # pragma: no cover - not glibc
        pass


class PeakRSS:
    """Context manager: the peak increase of the resident set size while inside, in bytes."""

    def __enter__(self) -> PeakRSS:
        _trim()
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())
        self.increase = self.peak - self.base


class NetTimer:
    """CPU seconds (this thread's) in the prior's network: forward passes and their backward passes.

    Forward: around ``prior._call_network`` (the traced graph or the eager network, whichever runs); backward
    (``backward=True`` for DPS/MCG): the network's full-backward hooks. Removed by :meth:`close`. Thread CPU
    time, not wall time, so other processes on a shared machine do not inflate it (torch runs the network in
    the calling thread with one intra-op thread here).
    """

    def __init__(self, prior: Any, backward: bool = False) -> None:
        self.seconds = 0.0
        self.calls = 0
        self._b: list[float] = []
        self._prior = prior
        call = prior._call_network

        def timed(x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
            t = time.thread_time()
            try:
                return call(x, label)
            finally:
                self.seconds += time.thread_time() - t
                self.calls += 1

        prior._call_network = timed
        module = prior.network
        self._handles = [  # backward hooks switch the traced network off: only for samplers that backpropagate
            module.register_full_backward_pre_hook(lambda *a: self._b.append(time.thread_time())),
            module.register_full_backward_hook(lambda *a: self._end(self._b)),
        ] if backward else []

    def _end(self, stack: list[float]) -> None:
        if stack:
            self.seconds += time.thread_time() - stack.pop()
            self.calls += 1

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._prior.__dict__.pop("_call_network", None)


# -- methods ------------------------------------------------------------------------------------------------
CLASSICAL = {"ct": ["fbp", "tv"], "mri": ["zero_filled", "cg", "tv"], "pet": ["fbp", "mlem", "tv"]}
SAMPLER_RUNS = ["dds", "dds-hot", "dps", "dps-hot", "mcg", "song"]
# The "-hot" runs start from the data's default classical image (reconstruct.default_hot_start since 2026-12-06;
# before, always FBP / CG / MLEM).
# Oracle grids for the baselines (chosen on the ground truth, per task, every run).
TV_GRID = {  # relative TV weight (lam_rel), around each task family's optimum
    "ct": (0.000125, 0.00025, 0.0005, 0.001, 0.002, 0.004, 0.008),  # converged TV (2026-12-06) wants lower weights
    "ct-lowdose": (0.0001, 0.00025, 0.0005, 0.001, 0.002),
    "mri": (0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256),
    "pet": (0.004, 0.008, 0.016, 0.032, 0.064),
}
MLEM_GRID = (5, 10, 20, 40, 80)
#: The uncertainty table's second scale: ρ of the std against the error's local RMS over a Gaussian of this width.
LOCAL_ERROR_PX = 2.0
CG_GRID = (5, 10, 20, 40)


def _metrics(x: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    from napari_diffrecon.metrics import psnr, ssim

    x, gt = np.abs(x), np.abs(gt)
    return psnr(x, gt), ssim(x, gt)


def _classical(m: Measurement, method: str, gt: np.ndarray, task: str) -> dict[str, Any]:
    """Run a baseline; TV / MLEM / CG get the best setting of their grid on the ground truth."""
    from napari_diffrecon.reconstruct import RunSettings, reconstruct

    grid: list[dict[str, Any]] = [{}]
    if method == "tv":
        grid = [{"lam_rel": v} for v in TV_GRID.get(task, TV_GRID[task.split("-")[0]])]
    elif method == "mlem":
        grid = [{"iters": v} for v in MLEM_GRID]
    elif method == "cg":
        grid = [{"iters": v} for v in CG_GRID]
    best = None
    for bp in grid:
        with PeakRSS() as mem:
            t, c = time.perf_counter(), time.thread_time()
            r = reconstruct(m, RunSettings(method=method, baseline_params=bp))
            wall, cpu = time.perf_counter() - t, time.thread_time() - c
        p, s = _metrics(r.reconstruction, gt)
        row = {"psnr": p, "ssim": s, "residual": r.residual, "nfe": 0, "wall_s": wall, "cpu_s": cpu,
               "peak_mib": mem.increase / 2**20, "net_share": None, "setting": bp}
        if best is None or p > best["psnr"]:
            best = row
    return best


def _sampler(m: Measurement, label: str, prior, modality: str, gt: np.ndarray, seed: int,
             overrides: dict[str, Any], n_samples: int = 1, callback: Callable | None = None,
             device: str = "cpu", precision: str = "float32") -> dict[str, Any]:
    from napari_diffrecon.reconstruct import RunSettings, data_kind, default_hot_start, reconstruct
    from napari_diffrecon.samplers.defaults import recommended_params

    hot = label.endswith("-hot")
    method = label.removesuffix("-hot")
    _, coils, noisy = data_kind(m)
    params = recommended_params(method, modality, hot_start=hot, coils=coils, noisy=noisy, **overrides.get(label, {}))
    settings = RunSettings(method=method, params=params, n_samples=n_samples, seed=seed, device=device,
                           hot_start=default_hot_start(m) if hot else None, keep_samples=n_samples > 1,
                           precision=precision)
    timer = NetTimer(prior, backward=method in ("dps", "mcg")) if hasattr(prior, "_call_network") else None
    try:
        with PeakRSS() as mem:
            t, c = time.perf_counter(), time.thread_time()
            r = reconstruct(m, settings, prior=prior, callback=callback)
            wall, cpu = time.perf_counter() - t, time.thread_time() - c
    finally:
        if timer is not None:
            timer.close()
    p, s = _metrics(r.reconstruction, gt)
    return {"psnr": p, "ssim": s, "residual": r.residual, "nfe": r.provenance["nfe"], "wall_s": wall, "cpu_s": cpu,
            "peak_mib": mem.increase / 2**20, "net_share": timer.seconds / cpu if timer and cpu > 0 else None,
            "net_s": timer.seconds if timer else None,
            "setting": {**params.to_dict(), **({"hot_start": settings.hot_start} if hot else {})}, "result": r}


def _load_priors(a: argparse.Namespace) -> dict[str, Any]:
    from napari_diffrecon.priors import load_prior

    tasks = list(a.tasks) if any(x in SAMPLER_RUNS for x in a.methods) and not a.extras_only else []
    if not a.no_extras:
        tasks += [*a.uq_tasks, a.batch_task, *a.curve_tasks]
    needed = {t.split("-")[0] for t in tasks}
    out = {}
    for mod, name in SHIPPED.items():
        if mod not in needed:
            continue
        explicit = getattr(a, f"{mod}_prior")
        src = explicit or (str(Path(a.prior_dir) / f"{name}.json") if a.prior_dir else name)
        out[mod] = (load_prior(src), src)
    return out


def _prior_info(prior, src: str) -> dict[str, Any]:
    card = getattr(prior, "card", None)
    tr = (card.training or {}) if card is not None else {}
    return {"source": src, "name": getattr(card, "name", None), "train_steps": tr.get("steps"),
            "train_wall_s": tr.get("wall_time_s", tr.get("wall_s")), "averaged": "weight_average" in tr}


def run_table(a: argparse.Namespace, priors: dict[str, Any]) -> list[dict[str, Any]]:
    from napari_diffrecon.metrics import data_residual

    rows = []
    for task in a.tasks:
        m = build_task(task, a.size, a.seed)
        op = m.build_operator()
        gt = m.ground_truth
        floor = float(data_residual(op, torch.from_numpy(gt), m.to_tensor(), m.build_likelihood()))
        modality = op.modality
        methods = [x for x in a.methods if x in CLASSICAL[modality] or x in SAMPLER_RUNS]
        print(f"== {task}: {TASKS[task][0]} (noise-floor residual {floor:.4f})", flush=True)
        for meth in methods:
            if meth in SAMPLER_RUNS:
                row = _sampler(m, meth, priors[modality][0], modality, gt, a.seed, a.overrides, precision=a.precision)
                row.pop("result")
            else:
                row = _classical(m, meth, gt, task)
            row.update(task=task, method=meth, floor=floor)
            rows.append(row)
            print(f"   {meth:12s} PSNR {row['psnr']:6.2f}  SSIM {row['ssim']:.3f}  res {row['residual']:.4f}  "
                  f"NFE {row['nfe']:4d}  {row['wall_s']:6.1f} s (CPU {row['cpu_s']:6.1f} s)  "
                  f"{row['peak_mib']:6.1f} MiB  {row['setting']}",
                  flush=True)
    return rows


def field_of_view(m: Measurement) -> np.ndarray:
    """The measurement's field of view as a boolean image mask (CT / PET: the scanned disc, outside which every result
    is 0; MRI: every pixel) — where uncertainty scores are computed."""
    support = m.build_operator().support
    return np.ones(np.shape(m.ground_truth), bool) if support is None else support.cpu().numpy()


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a.ravel(), b.ravel()).statistic)


def run_extras(a: argparse.Namespace, priors: dict[str, Any]) -> dict[str, Any]:
    """Uncertainty calibration (Spearman ρ), batch cost, DDS PSNR against NFE, sampler overhead."""
    from napari_diffrecon.metrics import psnr
    from napari_diffrecon.uncertainty import pool_variance

    out: dict[str, Any] = {"uncertainty": [], "batch": None, "nfe_curve": {}}
    k = a.uq_samples
    for task in dict.fromkeys([*a.uq_tasks, a.batch_task]):
        m = build_task(task, a.size, a.seed)
        modality = m.build_operator().modality
        gt = np.abs(m.ground_truth)
        for label in a.uq_methods:
            one = None
            if task == a.batch_task and label == a.uq_methods[0]:
                one = _sampler(m, label, priors[modality][0], modality, gt, a.seed, a.overrides, n_samples=1,
                               precision=a.precision)
                one.pop("result")
            row = _sampler(m, label, priors[modality][0], modality, gt, a.seed, a.overrides, n_samples=k,
                           precision=a.precision)
            r = row.pop("result")
            if one is not None:
                out["batch"] = {"task": task, "method": label, "n_samples": k, "wall_1": one["wall_s"],
                                "wall_k": row["wall_s"], "cpu_1": one["cpu_s"], "cpu_k": row["cpu_s"],
                                "ratio": row["cpu_s"] / one["cpu_s"],
                                "net_share_1": one["net_share"], "net_share_k": row["net_share"],
                                "peak_mib_1": one["peak_mib"], "peak_mib_k": row["peak_mib"],
                                "threads": torch.get_num_threads()}
                print(f"   batch: {k} samples CPU {row['cpu_s']:.1f} s vs 1 sample {one['cpu_s']:.1f} s "
                      f"(×{out['batch']['ratio']:.2f})", flush=True)
            if task not in a.uq_tasks:
                continue
            from napari_diffrecon.metrics import data_residual

            floor = float(data_residual(m.build_operator(), torch.from_numpy(m.ground_truth), m.to_tensor(),
                                        m.build_likelihood()))
            out.setdefault("rows", []).append({**{k2: v for k2, v in row.items() if k2 != "net_s"}, "task": task,
                                               "method": f"{label} ×{k} mean", "floor": floor})
            err = np.abs(r.mean - gt)
            per = [psnr(x, gt) for x in r.samples]
            # Over the field of view (CT / PET: the scanned disc; MRI: every pixel): outside it every result is 0, so
            # std and error are both 0 there — ties that would inflate ρ and a coverage that would be free.
            fov = field_of_view(m)
            rho = _spearman(r.std[fov], err[fov])  # the run's std: variance pooled over RunSettings.std_pool pixels
            rho_raw = _spearman(summarize(r.samples)["std"][fov], err[fov])  # the raw per-voxel std of the samples
            # Within the object only (where the background's std and error are both ~0, inflating ρ).
            inside = gt > 0.02 * gt.max()
            rho_in = _spearman(r.std[inside], err[inside])
            cover = float(np.mean(((gt >= r.lower) & (gt <= r.upper))[fov])) if r.lower is not None else None
            # At what scale the std ranks the error: against the error's local RMS (Gaussian of LOCAL_ERROR_PX px),
            # which drops the pixel-to-pixel scatter of |error| that no std can predict (|e| of a calibrated
            # e ~ N(0, std²) alone scatters by a factor of ~3 between neighbours).
            local = np.sqrt(pool_variance(torch.from_numpy(err**2), LOCAL_ERROR_PX).numpy())
            rho_local = _spearman(r.std[fov], local[fov])
            # Overconfidence: RMS error of the mean over RMS of the predictive spread std·√(1 + 1/K) (1 = calibrated).
            spread = float(np.sqrt(np.mean(r.std[fov] ** 2) * (1 + 1 / k)))
            rms_ratio = float(np.sqrt(np.mean(err[fov] ** 2))) / max(spread, 1e-30)
            out["uncertainty"].append({"task": task, "method": label, "n_samples": k, "spearman": rho,
                                       "spearman_raw": rho_raw,
                                       "std_pool": r.provenance["settings"]["std_pool"],
                                       "spearman_inside": rho_in, "spearman_local": rho_local,
                                       "local_error_px": LOCAL_ERROR_PX, "rms_error_over_spread": rms_ratio,
                                       "psnr_mean": row["psnr"],
                                       "ssim_mean": row["ssim"], "psnr_samples": float(np.mean(per)),
                                       "coverage95": cover, "wall_s": row["wall_s"], "cpu_s": row["cpu_s"],
                                       "peak_mib": row["peak_mib"]})
            print(f"   UQ {task} {label}: ρ {rho:.3f} (inside {rho_in:.3f}, raw std {rho_raw:.3f}, local error "
                  f"{rho_local:.3f}), RMS error / spread {rms_ratio:.2f}, "
                  f"PSNR mean {row['psnr']:.2f} vs samples {np.mean(per):.2f}, 95% coverage {cover}", flush=True)
    # PSNR of x0_hat against NFE for DDS at 100 steps.
    from napari_diffrecon.reconstruct import RunSettings, prepare_run
    from napari_diffrecon.samplers.defaults import recommended_params

    for task in a.curve_tasks:
        m = build_task(task, a.size, a.seed)
        modality = m.build_operator().modality
        gt = np.abs(m.ground_truth)
        params = recommended_params("dds", modality, **{**a.overrides.get("dds", {}), "n_steps": 100})
        _, start, _ = prepare_run(m, RunSettings(method="dds", params=params, seed=a.seed), priors[modality][0])
        curve = [(it.nfe, psnr(np.abs(it.x0_hat[0].cpu().numpy()), gt)) for it in start(yield_every=1)]
        best = max(curve, key=lambda c: c[1])
        out["nfe_curve"][task] = {"curve": curve, "best_nfe": best[0], "best_psnr": best[1],
                                  "final_psnr": curve[-1][1]}
        print(f"   DDS-100 on {task}: best PSNR {best[1]:.2f} at NFE {best[0]}, final {curve[-1][1]:.2f}", flush=True)
    return out


# -- report -------------------------------------------------------------------------------------------------
def _fmt(v: Any, f: str) -> str:
    return "–" if v is None else format(v, f)


def markdown(rows: list[dict[str, Any]], extras: dict[str, Any] | None, meta: dict[str, Any]) -> str:
    lines = [f"Reconstruction benchmark ({meta['date']}, {meta['machine']}, torch {meta['torch']}, "
             f"{meta['threads']} thread(s), seed {meta['seed']}, {meta['size']}² images"
             f"{'' if meta.get('precision', 'float32') == 'float32' else ', network in ' + meta['precision']}).", ""]
    lines.append("Priors: " + "; ".join(f"{k}: `{v['source']}` ({v['train_steps']} training steps"
                                         f"{', averaged with its previous stage' if v.get('averaged') else ''})"
                                         for k, v in meta["priors"].items()))
    lines.append("")
    by_task: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_task.setdefault(r["task"], []).append(r)
    lines.append("| task | method | PSNR dB | SSIM | residual (floor) | NFE | CPU s | wall s | peak MiB | net share |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    for task, rs in by_task.items():
        best_c = max((r for r in rs if r["nfe"] == 0), key=lambda r: r["psnr"], default=None)
        best_d = max((r for r in rs if r["nfe"] > 0), key=lambda r: r["psnr"], default=None)
        for r in rs:
            mark = "**" if r is best_c or r is best_d else ""
            lines.append(
                f"| {task} | {r['method']} | {mark}{r['psnr']:.2f}{mark} | {r['ssim']:.3f} | "
                f"{r['residual']:.4f} ({r['floor']:.4f}) | {r['nfe']} | {r['cpu_s']:.1f} | {r['wall_s']:.1f} | "
                f"{r['peak_mib']:.0f} | "
                f"{_fmt(r['net_share'], '.0%')} |"
            )
    lines += ["", "Targets (best diffusion sampler vs baselines):", ""]
    lines.append("| task | best sampler | PSNR | vs TV | vs FBP/zero-filled/MLEM | target |")
    lines.append("|---|---|---|---|---|---|")
    targets = {"ct-23": ("tv", 2.0, "fbp", 6.0), "mri-4x": ("tv", 2.0, "zero_filled", 6.0),
               "pet-low": (None, None, "mlem", 2.0)}
    for task, rs in by_task.items():
        d = [r for r in rs if r["nfe"] > 0]
        if not d:
            continue
        best = max(d, key=lambda r: r["psnr"])
        get = {r["method"]: r["psnr"] for r in rs}
        t = targets.get(task)
        tv = best["psnr"] - get["tv"] if "tv" in get else None
        base_name = t[2] if t else {"ct": "fbp", "mri": "zero_filled", "pet": "mlem"}.get(task.split("-")[0])
        base = best["psnr"] - get[base_name] if base_name in get else None
        if t:  # each margin says whether it is met
            parts = [] if t[0] is None else [
                f"TV +{t[1]:g}: {'met' if tv is not None and tv >= t[1] else 'missed'}"]
            parts.append(f"{t[2]} +{t[3]:g}: {'met' if base is not None and base >= t[3] else 'missed'}")
            tgt = "; ".join(parts)
        else:
            tgt = "–"
        lines.append(f"| {task} | {best['method']} | {best['psnr']:.2f} | {_fmt(tv, '+.2f')} | "
                     f"{_fmt(base, '+.2f')} ({base_name}) | {tgt} |")
    if extras:
        lines += ["", "Uncertainty (posterior std vs absolute error of the mean, per pixel):", ""]
        lines.append("| task | sampler | samples | Spearman ρ (field of view) | ρ inside object | "
                     f"ρ raw per-voxel std | ρ vs local error ({LOCAL_ERROR_PX:g} px) | RMS error / spread | "
                     "PSNR of mean | mean PSNR of samples | 95% interval coverage | CPU s |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for u in extras.get("uncertainty", []):
            pool = f" (std pooled {u['std_pool']:g} px)" if u.get("std_pool") else ""
            lines.append(f"| {u['task']} | {u['method']}{pool} | {u['n_samples']} | {u['spearman']:.3f} | "
                         f"{u['spearman_inside']:.3f} | {_fmt(u.get('spearman_raw'), '.3f')} | "
                         f"{_fmt(u.get('spearman_local'), '.3f')} | {_fmt(u.get('rms_error_over_spread'), '.2f')} | "
                         f"{u['psnr_mean']:.2f} | {u['psnr_samples']:.2f} | "
                         f"{_fmt(u['coverage95'], '.1%')} | {u['cpu_s']:.1f} |")
        batches = extras.get("batch") or []
        for b in batches if isinstance(batches, list) else [batches]:
            lines += ["", f"Batch cost ({b['task']}, {b['method']}, {b['threads']} thread(s)): {b['n_samples']} "
                      f"samples in one batch {b['cpu_k']:.1f} s vs 1 sample {b['cpu_1']:.1f} s CPU time = "
                      f"×{b['ratio']:.2f} (wall {b['wall_k']:.1f} / {b['wall_1']:.1f} s); "
                      f"network share {b['net_share_1']:.0%} (1) / {b['net_share_k']:.0%} ({b['n_samples']}); "
                      f"peak memory {b['peak_mib_1']:.0f} / {b['peak_mib_k']:.0f} MiB."]
        for task, c in extras.get("nfe_curve", {}).items():
            lines += ["", f"DDS at 100 steps on {task}: best PSNR of x0_hat {c['best_psnr']:.2f} dB at NFE "
                      f"{c['best_nfe']}, final {c['final_psnr']:.2f} dB."]
    for note in meta.get("notes", []):
        lines += ["", note]
    return "\n".join(lines) + "\n"


def _argvs(argv: Any) -> list[list[str]]:
    """The command lines in a run's ``meta["argv"]``: one list of strings, or (merged runs) nested lists of them."""
    if not argv:
        return []
    if all(isinstance(x, str) for x in argv):
        return [list(argv)]
    return [a for x in argv for a in _argvs(x)]


def _replace_or_append(rows: list[dict[str, Any]], newer: list[dict[str, Any]], key: Callable[[dict], Any]) -> None:
    """Put each of ``newer`` in ``rows`` where a row with its key is, else at the end (in place)."""
    where = {key(r): i for i, r in enumerate(rows)}
    for r in newer:
        if key(r) in where:
            rows[where[key(r)]] = r
        else:
            where[key(r)] = len(rows)
            rows.append(r)


def combine(paths: list[str], out: Path, notes: list[str] | None = None) -> int:
    """Merge partial runs' JSON outputs (rows in task order; extras and priors united) and write ``out``.md/.json.

    ``notes`` (paragraphs on what was re-run and how) are added to the merged files' own, in order, without repeats.
    """
    parts = [json.loads(Path(p).read_text()) for p in paths]
    order = {t: i for i, t in enumerate(TASKS)}
    latest: dict[tuple[str, str], dict[str, Any]] = {}  # a later run's row replaces an earlier one's
    for d in parts:
        rows_d = list(d["rows"]) + list((d.get("extras") or {}).get("rows", []))
        if any(r["method"].endswith(" mean") for r in d["rows"]):
            rows_d = list(d["rows"])
        for r in rows_d:
            latest[(r["task"], r["method"])] = r
    rows = sorted(latest.values(), key=lambda r: order.get(r["task"], len(order)))
    extras: dict[str, Any] = {"uncertainty": [], "batch": [], "nfe_curve": {}}
    meta = dict(parts[0]["meta"])
    meta["priors"], meta["total_wall_s"], meta["argv"] = {}, 0.0, []
    for d in parts:
        meta["priors"].update(d["meta"]["priors"])
        meta["total_wall_s"] += d["meta"].get("total_wall_s", 0.0)
        meta["argv"] += _argvs(d["meta"].get("argv"))
        e = d.get("extras") or {}
        # a re-run row takes the place of the one it replaces (the tables keep their order); new ones are appended
        _replace_or_append(extras["uncertainty"], e.get("uncertainty", []), lambda u: (u["task"], u["method"]))
        extras["nfe_curve"].update(e.get("nfe_curve", {}))
        b = e.get("batch") or []
        _replace_or_append(extras["batch"], b if isinstance(b, list) else [b], lambda x: x["task"])
    meta["combined_from"] = [str(p) for p in paths]
    meta["notes"] = list(dict.fromkeys([n for d in parts for n in d["meta"].get("notes", [])] + list(notes or [])))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(markdown(rows, extras, meta), encoding="utf-8")
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows, "extras": extras}, indent=1))
    print(f"wrote {out.with_suffix('.md')} and .json from {len(paths)} runs")
    return 0


def _number_or_text(val: str) -> int | float | str:
    """An override value: int, else float, else the text itself (``jacobian``)."""
    for kind in (int, float):
        try:
            return kind(val)
        except ValueError:
            pass
    return val


def add_override(params: dict[str, Any], field: str, value: Any) -> None:
    """Set ``field`` in a SamplerParams override dict; ``extra.KEY`` goes into its ``extra`` dict."""
    if field.startswith("extra."):
        params.setdefault("extra", {})[field[len("extra."):]] = value
    else:
        params[field] = value


def _parse_overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    """``dds.gamma=2`` → ``{"dds": {"gamma": 2.0}}``; ``dds.extra.posterior_draw=1`` → ``extra["posterior_draw"]``."""
    out: dict[str, dict[str, Any]] = {}
    for it in items or []:
        key, _, val = it.partition("=")
        label, _, field = key.partition(".")
        if not field or not val:
            raise SystemExit(f"--set wants LABEL.FIELD=VALUE (e.g. dds.gamma=2), got {it!r}")
        add_override(out.setdefault(label, {}), field, _number_or_text(val))
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--nfe-study" in argv:  # PSNR/SSIM against NFE for DDS, DPS, PFGM++ and consistency models (benchmarks/nfe.py)
        from nfe import main as nfe_main

        return nfe_main([x for x in argv if x != "--nfe-study"])
    p = argparse.ArgumentParser(description="Reconstruction benchmark (see the module docstring)")
    p.add_argument("--prior-dir", help="folder with ct-phantom-128.json, mri-brain-128.json, pet-phantom-128.json")
    p.add_argument("--ct-prior"), p.add_argument("--mri-prior"), p.add_argument("--pet-prior")
    p.add_argument("--tasks", nargs="+", default=task_names())
    p.add_argument("--methods", nargs="+", default=[*dict.fromkeys(sum(CLASSICAL.values(), [])), *SAMPLER_RUNS])
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="parameter override LABEL.FIELD=VALUE, e.g. dds.gamma=2 or dps.n_steps=200")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "recon"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--precision", default="float32", choices=list(PRECISIONS),
                   help="the prior network's arithmetic for every sampler run (RunSettings.precision)")
    p.add_argument("--no-extras", action="store_true", help="skip uncertainty / batch / NFE-curve measurements")
    p.add_argument("--extras-only", action="store_true")
    p.add_argument("--uq-tasks", nargs="*", default=None, help="tasks whose uncertainty (ρ) is measured: "
                   "those of --tasks by default (the issue's ρ target is on every benchmark task)")
    p.add_argument("--uq-methods", nargs="+", default=["dds-hot"])
    p.add_argument("--uq-samples", type=int, default=8)
    p.add_argument("--batch-task", default="ct-23")
    p.add_argument("--curve-tasks", nargs="*", default=["ct-23"])
    p.add_argument("--combine", nargs="+", metavar="JSON",
                   help="merge the .json outputs of partial runs (e.g. CT and MRI/PET tasks run apart) into --out")
    p.add_argument("--note", action="append", default=[],
                   help="with --combine: a paragraph saying which rows were re-run and how (kept in the JSON, printed "
                   "under the tables; the notes of the merged files are kept)")
    a = p.parse_args(argv)
    if a.combine:
        return combine(a.combine, Path(a.out), a.note)
    if a.note:
        p.error("--note goes with --combine (it annotates the merged table)")
    if a.uq_tasks is None:
        a.uq_tasks = list(a.tasks)
    a.overrides = _parse_overrides(a.overrides)
    torch.set_num_threads(a.threads)
    bad = [t for t in a.tasks if t not in TASKS]
    if bad:
        raise SystemExit(f"unknown task(s) {bad}; use {task_names()}")
    priors = _load_priors(a)
    for pr, _ in priors.values():
        if hasattr(pr, "network"):
            pr.network.requires_grad_(False)  # DPS/MCG differentiate w.r.t. the input only
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or platform.machine()} CPU",
            "torch": torch.__version__, "threads": torch.get_num_threads(), "seed": a.seed, "size": a.size,
            "precision": a.precision, "priors": {k: _prior_info(pr, src) for k, (pr, src) in priors.items()},
            "overrides": a.overrides,
            "argv": sys.argv[1:] if argv is None else argv}
    t0 = time.perf_counter()
    rows = [] if a.extras_only else run_table(a, priors)
    extras = None if a.no_extras else run_extras(a, priors)
    if extras:  # posterior means of the uncertainty runs join the main table, after their task's rows
        for extra_row in extras.get("rows", []):
            idx = max((i for i, r in enumerate(rows) if r["task"] == extra_row["task"]), default=len(rows) - 1)
            rows.insert(idx + 1, extra_row)
    meta["total_wall_s"] = time.perf_counter() - t0
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(markdown(rows, extras, meta), encoding="utf-8")
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows, "extras": extras}, indent=1,
                                                   default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
    print(f"wrote {out.with_suffix('.md')} and .json ({meta['total_wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
