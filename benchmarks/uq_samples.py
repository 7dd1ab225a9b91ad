"""Is the posterior std informative? Spearman ρ(std, |error of the mean|) against the number of samples, and a
figure of one MRI run (ground truth, mean, |error|, std, one sample − mean).

    python benchmarks/uq_samples.py                       # ρ at 8/16/32 samples, DDS-hot, ct-23 and pet-low
    python benchmarks/uq_samples.py --figure mri-4x-t1c --out docs/dev/mri_uq_t1c.png
    python benchmarks/uq_samples.py --pool-study ct-23      # 8-sample std, raw vs pooled, against a 32-sample std

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


def _run(task: str, modality: str, k: int):
    m = recon.build_task(task)
    gt = np.abs(m.ground_truth)
    prior = load_prior(default_prior_for(modality, complex_=modality == "mri"))
    row = recon._sampler(m, "dds-hot", prior, modality, gt, 0, {}, n_samples=k)
    return row, row["result"], gt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", nargs="+", default=["ct-23", "pet-low"])
    ap.add_argument("--samples", nargs="+", type=int, default=[8, 16, 32])
    ap.add_argument("--figure", default=None, help="instead: one MRI task's figure with 8 samples")
    ap.add_argument("--out", default="mri_uq.png")
    ap.add_argument("--pool-study", default=None, metavar="TASK",
                    help="instead: 40 samples of TASK; the std of the first 8 (raw and pooled over 0.5–2 px) against "
                         "the std of the other 32")
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    if a.pool_study:
        row, r, gt = _run(a.pool_study, a.pool_study.split("-")[0], 40)
        s = torch.from_numpy(np.abs(r.samples)).double()
        ref = s[8:].std(0)  # 32 other samples of the same run: the reference posterior std
        err = np.abs(s[:8].mean(0).numpy() - gt)
        var8 = s[:8].var(0)
        for width in (0.0, 0.5, 1.0, 1.5, 2.0):
            sd = pool_variance(var8, width).sqrt()
            rel = float(((sd - ref) ** 2).mean().sqrt() / (ref**2).mean().sqrt())
            print(f"{a.pool_study}: 8-sample std pooled {width:.1f} px: RMS difference from the 32-sample std "
                  f"{rel:.3f}, ρ(std, |error of the 8-sample mean|) {recon._spearman(sd.numpy(), err):.3f}", flush=True)
        return 0
    if a.figure:
        row, r, gt = _run(a.figure, "mri", 8)
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
            row, r, gt = _run(task, modality, k)
            err = np.abs(r.mean - gt)
            inside = gt > 0.02 * gt.max()
            raw = summarize(r.samples)["std"]
            print(f"{task} {k:3d} samples: PSNR of the mean {row['psnr']:.2f}, ρ {recon._spearman(r.std, err):.3f}, "
                  f"inside the object {recon._spearman(r.std[inside], err[inside]):.3f}; raw per-voxel std ρ "
                  f"{recon._spearman(raw, err):.3f}, inside {recon._spearman(raw[inside], err[inside]):.3f}",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
