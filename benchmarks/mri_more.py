"""Two MRI checks behind README sentences (CPU, one thread, seed 0, 128²).

    python benchmarks/mri_more.py samples [--method dds|dds-hot] [--k 32]
        PSNR of the posterior mean of the first 1/4/8/16/32 samples of one run on MRI 4× (single coil).
    python benchmarks/mri_more.py song-noise
        Song 2022 against DDS (and zero-filled / oracle TV) on MRI 4× at lower noise levels than the benchmark's,
        with the noise floor (``metrics.noise_floor``) of each: where the hard projection stops paying.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import recon  # noqa: E402

from napari_diffrecon.metrics import noise_floor  # noqa: E402
from napari_diffrecon.priors import load_prior  # noqa: E402
from napari_diffrecon.simulate import simulate_from_image  # noqa: E402

NOISE = {8: (3e-4, 3e-3, 5e-3, 7e-3, 1e-2), 1: (1e-2, 3e-2, 6e-2)}  # noise_sigma per coil count


def samples(method: str, k: int) -> None:
    m = recon.build_task("mri-4x")
    gt = np.abs(m.ground_truth)
    r = recon._sampler(m, method, load_prior("mri-brain-128"), "mri", gt, 0, {}, n_samples=k)["result"]
    s = np.abs(r.samples) if np.iscomplexobj(r.samples) else np.asarray(r.samples)
    for n in (1, 4, 8, 16, 32):
        if n <= k:
            print(f"mri-4x {method}: mean of {n:2d} samples PSNR {recon._metrics(s[:n].mean(0), gt)[0]:.2f} dB",
                  flush=True)


def song_noise() -> None:
    prior = load_prior("mri-brain-128")
    for coils, levels in NOISE.items():
        for ns in levels:
            kw = {"coils": coils} if coils > 1 else {}
            m = simulate_from_image(recon.mri_t1(), "mri", size=128, seed=0, accel=4.0, noise_sigma=ns, **kw)
            gt = np.abs(m.ground_truth)
            floor = noise_floor(m.build_operator(), m.to_tensor(), m.build_likelihood())
            row = {lab: recon._classical(m, lab, gt, "mri-4x")["psnr"] for lab in ("zero_filled", "tv")}
            row.update({lab: recon._sampler(m, lab, prior, "mri", gt, 0, {})["psnr"] for lab in ("song", "dds")})
            print(f"{coils} coil(s), noise floor {floor:.2%}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()),
                  flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["samples", "song-noise"])
    p.add_argument("--method", default="dds", choices=["dds", "dds-hot"])
    p.add_argument("--k", type=int, default=32)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    samples(a.method, a.k) if a.what == "samples" else song_noise()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
