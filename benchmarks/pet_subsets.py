"""Ordered subsets in the PET EM data step: PSNR and CPU time of DDS / DDS-hot on pet-low, exact EM vs S subsets.

    python benchmarks/pet_subsets.py            # S = 5 (one full pass per step with the default 5 iterations)

Each setting runs twice (the second run is the one to read: the first builds the subset matrices).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import recon  # noqa: E402

from napari_diffrecon.priors import default_prior_for, load_prior  # noqa: E402
from napari_diffrecon.reconstruct import RunSettings, reconstruct  # noqa: E402
from napari_diffrecon.samplers.defaults import recommended_params  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--subsets", type=int, default=5)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    m = recon.build_task("pet-low")
    gt = np.abs(m.ground_truth)
    prior = load_prior(default_prior_for("pet"))
    for label in ("dds-hot", "dds"):
        method = label.removesuffix("-hot")
        base = recommended_params(method, "pet", hot_start=label.endswith("-hot"))
        for subsets in (1, a.subsets, 1, a.subsets):
            params = replace(base, extra={**base.extra, "em_subsets": subsets})
            settings = RunSettings(method=method, params=params, seed=0,
                                   hot_start="mlem" if label.endswith("-hot") else None)
            timer = recon.NetTimer(prior)
            try:
                c = time.thread_time()
                r = reconstruct(m, settings, prior=prior)
                cpu = time.thread_time() - c
            finally:
                timer.close()
            p, s = recon._metrics(r.reconstruction, gt)
            print(f"{label:8s} subsets {subsets}: PSNR {p:.2f} SSIM {s:.3f} CPU {cpu:.2f} s "
                  f"network share {timer.seconds / cpu:.0%}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
