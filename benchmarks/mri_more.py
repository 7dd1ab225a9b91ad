"""Two MRI checks behind README sentences (CPU, one thread, seed 0, 128²).

    python benchmarks/mri_more.py samples [--method dds|dds-hot] [--k 32]
        PSNR of the posterior mean of the first 1/4/8/16/32 samples of one run on MRI 4× (single coil).
    python benchmarks/mri_more.py song-noise
        Song 2022 against DDS (and zero-filled / oracle TV) on MRI 4× at lower noise levels than the benchmark's,
        and on CT 23 views with the benchmark's noise ×1 / 2.5 / 5, with the noise floor (``metrics.noise_floor``) of
        each: where the hard projection stops paying, and Song with 5 CG steps per pseudo-inverse (the noise-free
        value) against 1 (the tuned value for noisy data, ``samplers.defaults.NOISY_FLOOR``).
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

NOISE = {8: (3e-4, 3e-3, 5e-3, 5.7e-3, 7e-3, 1e-2, 2e-2), 1: (1e-2, 3e-2, 6e-2)}  # noise_sigma per coil count
CT_NOISE = (1.0, 2.5, 5.0)  # CT 23 views: multiples of the benchmark's noise (0.5 % of the sinogram's maximum)


def samples(method: str, k: int) -> None:
    m = recon.build_task("mri-4x")
    gt = np.abs(m.ground_truth)
    r = recon._sampler(m, method, load_prior("mri-brain-128"), "mri", gt, 0, {}, n_samples=k)["result"]
    s = np.abs(r.samples) if np.iscomplexobj(r.samples) else np.asarray(r.samples)
    for n in (1, 4, 8, 16, 32):
        if n <= k:
            print(f"mri-4x {method}: mean of {n:2d} samples PSNR {recon._metrics(s[:n].mean(0), gt)[0]:.2f} dB",
                  flush=True)


def _song_rows(m, prior, modality: str, task: str, classical: tuple[str, ...]) -> str:
    from napari_diffrecon.reconstruct import data_kind

    gt = np.abs(m.ground_truth)
    floor = noise_floor(m.build_operator(), m.to_tensor(), m.build_likelihood())
    row = {lab: recon._classical(m, lab, gt, task)["psnr"] for lab in classical}
    row.update({f"song {k} CG": recon._sampler(m, "song", prior, modality, gt, 0, {"song": {"cg_iters": k}})["psnr"]
                for k in (5, 1)})
    row["dds"] = recon._sampler(m, "dds", prior, modality, gt, 0, {})["psnr"]
    tuned = "1" if data_kind(m)[2] else "5"
    return f"noise floor {floor:.2%} (tuned song: {tuned} CG): " + ", ".join(f"{k} {v:.2f}" for k, v in row.items())


def song_noise() -> None:
    prior = load_prior("mri-brain-128")
    for coils, levels in NOISE.items():
        for ns in levels:
            kw = {"coils": coils} if coils > 1 else {}
            m = simulate_from_image(recon.mri_t1(), "mri", size=128, seed=0, accel=4.0, noise_sigma=ns, **kw)
            print(f"MRI 4×, {coils} coil(s), σ {ns:g}, " + _song_rows(m, prior, "mri", "mri-4x", ("zero_filled", "tv")),
                  flush=True)
    prior = load_prior("ct-phantom-128")
    base = recon.build_task("ct-23")
    hu, px = recon.ct_hu()
    for f in CT_NOISE:
        m = base if f == 1 else simulate_from_image(
            hu, "ct", size=128, units="HU", pixel_size_mm=px * hu.shape[0] / 128, seed=0, views=23,
            noise_sigma=f * float(base.noise["sigma"]), source="pydicom CT_small.dcm")
        print(f"CT 23 views, noise ×{f:g}, " + _song_rows(m, prior, "ct", "ct-23", ("fbp", "tv")), flush=True)


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
