"""Is the posterior std informative? Spearman ρ(std, |error of the mean|) against the number of samples, and a
figure of one MRI run (ground truth, mean, |error|, std, one sample − mean).

    python benchmarks/uq_samples.py                       # ρ at 8/16/32 samples, DDS-hot, ct-23 and pet-low
    python benchmarks/uq_samples.py --figure mri-4x-t1c --out docs/dev/mri_uq_t1c.png
    python benchmarks/uq_samples.py --pool-study ct-23      # 8-sample std, raw vs pooled, against a 32-sample std
    python benchmarks/uq_samples.py --self-check mri-4x     # ρ the model's own posterior predicts (held-out samples)

Every run's std is the variance pooled over ``DEFAULT_STD_POOL`` pixels (``--std-pool``); ρ of the raw per-voxel
std of the same samples is printed beside it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import recon  # noqa: E402

from napari_diffrecon.priors import default_prior_for, load_prior  # noqa: E402
from napari_diffrecon.uncertainty import pool_variance, summarize  # noqa: E402


def _run(task: str, modality: str, k: int, label: str = "dds-hot", overrides: dict | None = None):
    m = recon.build_task(task)
    gt = np.abs(m.ground_truth)
    prior = load_prior(default_prior_for(modality, complex_=modality == "mri"))
    row = recon._sampler(m, label, prior, modality, gt, 0, {label: dict(overrides or {})}, n_samples=k)
    return row, row["result"], gt, recon.field_of_view(m)


def self_check(task: str, label: str, k: int = 8, n_ref: int = 32, overrides: dict | None = None) -> dict[str, float]:
    """How informative the std would be if the sampler's posterior were the truth.

    ``k + n_ref`` samples in one run; the std (pooled as in every run) and mean of the first ``k`` are scored
    against the ground truth (**real**) and against each held-out sample taken as a stand-in truth (**self**: the
    value each score is expected to take if the truth were a draw from this posterior, i.e. for a calibrated
    sampler with this spread; not a bound — a real error whose bias follows the std could score higher). Scores:
    Spearman ρ(std, |error of the mean|); coverage of mean ± 1.96 std and of the run's empirical 95 % interval (the
    per-voxel quantiles of the k samples, what runs report) — their *self* values, not 95 %, are the calibrated
    yardstick (a new draw's spread about a k-sample mean is var·(1 + 1/k), and k samples estimate it roughly); the
    RMS error real / self (1 = calibrated, > 1 = the spread is too small: overconfident). Complex samples are scored
    by magnitude, as :func:`~napari_diffrecon.uncertainty.summarize` does; real ones as they are.
    """
    from napari_diffrecon.uncertainty import DEFAULT_STD_POOL

    _, r, gt, fov = _run(task, task.split("-")[0], k + n_ref, label, overrides)
    s = np.abs(r.samples) if np.iscomplexobj(r.samples) else np.asarray(r.samples)
    s = s.astype(np.float64)
    summary = summarize(s[:k], std_pool=DEFAULT_STD_POOL)
    mean, std, lo, hi = (summary[key] for key in ("mean", "std", "lower", "upper"))
    half = 1.96 * std

    def scores(truth: np.ndarray) -> tuple[float, float, float, float]:  # over the field of view (0 outside it)
        err = np.abs(mean - truth)[fov]
        return (recon._spearman(std[fov], err), float(np.mean(err <= half[fov])),
                float(np.mean(((truth >= lo) & (truth <= hi))[fov])), float(np.sqrt(np.mean(err**2))))

    real = scores(gt)
    held = np.array([scores(x) for x in s[k:]])
    out = {"task": task, "method": label, "overrides": dict(overrides or {}), "k": k, "n_ref": n_ref,
           "psnr_mean": recon._metrics(mean, gt)[0],
           "rho_real": real[0], "rho_self": float(held[:, 0].mean()), "rho_self_sd_over_refs": float(held[:, 0].std()),
           "cover_gauss_real": real[1], "cover_gauss_self": float(held[:, 1].mean()),
           "cover_interval_real": real[2], "cover_interval_self": float(held[:, 2].mean()),
           "rms_ratio": real[3] / float(np.sqrt(np.mean(held[:, 3] ** 2)))}
    what = label + "".join(f" {k2}={v}" for k2, v in (overrides or {}).items())
    print(f"{task} {what}: PSNR of the {k}-sample mean {out['psnr_mean']:.2f}; ρ real {out['rho_real']:.3f} "
          f"vs self {out['rho_self']:.3f} (sd over the {n_ref} references {out['rho_self_sd_over_refs']:.3f}); "
          f"mean ± 1.96 std covers real {out['cover_gauss_real']:.1%} / self {out['cover_gauss_self']:.1%}; "
          f"the 95 % interval real {out['cover_interval_real']:.1%} / self {out['cover_interval_self']:.1%}; "
          f"RMS error real / self {out['rms_ratio']:.2f}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", nargs="+", default=["ct-23", "pet-low"])
    ap.add_argument("--samples", nargs="+", type=int, default=[8, 16, 32])
    ap.add_argument("--figure", default=None, help="instead: one MRI task's figure with 8 samples")
    ap.add_argument("--out", default="mri_uq.png")
    ap.add_argument("--pool-study", default=None, metavar="TASK",
                    help="instead: 40 samples of TASK; the std of the first 8 (raw and pooled over 0.5–2 px) against "
                         "the std of the other 32")
    ap.add_argument("--self-check", nargs="+", default=None, metavar="TASK",
                    help="instead: ρ, coverage and RMS error against the ground truth and against held-out samples "
                         "of the same run (the model's own prediction of them)")
    ap.add_argument("--method", default="dds-hot", help="sampler label for --self-check (dds, dds-hot, dps, ...)")
    ap.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="FIELD=VALUE",
                    help="--self-check: sampler parameter overrides, e.g. gamma=1 or extra.posterior_draw=1")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.self_check:
        for task in a.self_check:
            overrides: dict = {}
            for k, v in (x.split("=", 1) for x in a.overrides):
                recon.add_override(overrides, k, recon._number_or_text(v))
            self_check(task, a.method, overrides=overrides)
        return 0
    if a.pool_study:
        row, r, gt, fov = _run(a.pool_study, a.pool_study.split("-")[0], 40)
        s = torch.from_numpy(np.abs(r.samples)).double()
        ref = s[8:].std(0)  # 32 other samples of the same run: the reference posterior std
        err = np.abs(s[:8].mean(0).numpy() - gt)
        var8 = s[:8].var(0)
        for width in (0.0, 0.5, 1.0, 1.5, 2.0):
            sd = pool_variance(var8, width).sqrt()
            f = torch.from_numpy(fov)
            rel = float(((sd - ref)[f] ** 2).mean().sqrt() / (ref[f] ** 2).mean().sqrt())
            print(f"{a.pool_study}: 8-sample std pooled {width:.1f} px: RMS difference from the 32-sample std "
                  f"{rel:.3f}, ρ(std, |error of the 8-sample mean|) {recon._spearman(sd.numpy()[fov], err[fov]):.3f}",
                  flush=True)
        return 0
    if a.figure:
        row, r, gt, _ = _run(a.figure, "mri", 8)
        err = np.abs(r.mean - gt)
        print(f"{a.figure}: PSNR {row['psnr']:.2f}, ρ {recon._spearman(r.std, err):.3f}")
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 5, figsize=(20, 4))
        panels = [("gt", gt), ("mean", r.mean), ("|err|", err), ("std", r.std), ("sample0-mean", r.samples[0] - r.mean)]
        for ax, (title, im) in zip(axes, panels, strict=True):
            ax.imshow(im, cmap="gray")
            ax.set_title(title)
            ax.axis("off")
        fig.savefig(a.out, dpi=60, bbox_inches="tight")
        print(f"wrote {a.out}")
        return 0
    for task in a.tasks:
        modality = task.split("-")[0]
        for k in a.samples:
            row, r, gt, fov = _run(task, modality, k)
            err = np.abs(r.mean - gt)
            inside = gt > 0.02 * gt.max()
            raw = summarize(r.samples)["std"]
            print(f"{task} {k:3d} samples: PSNR of the mean {row['psnr']:.2f}, ρ (field of view) "
                  f"{recon._spearman(r.std[fov], err[fov]):.3f}, inside the object "
                  f"{recon._spearman(r.std[inside], err[inside]):.3f}; raw per-voxel std ρ "
                  f"{recon._spearman(raw[fov], err[fov]):.3f}, inside {recon._spearman(raw[inside], err[inside]):.3f}",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
