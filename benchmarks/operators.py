"""Forward+adjoint throughput of our operators against scikit-image's radon/iradon.

Run:  python benchmarks/operators.py [--size 256] [--repeats 3] [--device cpu]

Prints a markdown table (paste it into README). scikit-image's "adjoint" is its unfiltered
back-projection ``iradon(sino, theta, filter_name=None, circle=True)``, the closest thing it has.
The one-time cost of building our sparse system matrix is reported separately (it is cached
per geometry for the life of the process).
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch
from skimage.transform import iradon, radon

from napari_diffrecon.physics import CartesianMRI, ParallelBeamCT, sparse_view_angles
from napari_diffrecon.physics.ct import radon_matrix


def _best(fn, repeats: int, sync=lambda: None, *args) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args)
        sync()
        times.append(time.perf_counter() - t0)
    return min(times)


def _fwd_adj(op, x):
    return op.adjoint(op.forward(x))


def _skimage_fwd_adj(imgs, theta):
    for im in imgs:
        iradon(radon(im, theta=theta, circle=True), theta=theta, filter_name=None, circle=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    n, dev = a.size, torch.device(a.device)
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:n, :n]
    disk = ((yy - n // 2) ** 2 + (xx - n // 2) ** 2) <= (n // 2) ** 2
    print(f"# operators benchmark: {n}x{n}, device {dev}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}\n")
    print("| operator | views/coils | batch | ours fwd+adj (s) | scikit-image fwd+adj (s) | speed-up |")
    print("|---|---|---|---|---|---|")
    for n_views in (180, 23):
        theta = sparse_view_angles(n_views)
        t0 = time.perf_counter()
        radon_matrix(n, theta, dev)
        build = time.perf_counter() - t0
        op = ParallelBeamCT(n, theta, device=dev)
        for batch in (1, 8):
            imgs = rng.random((batch, n, n)) * disk
            x = torch.tensor(imgs, dtype=torch.float32, device=dev)
            op.adjoint(op.forward(x))  # warm-up
            ours = _best(_fwd_adj, a.repeats, sync, op, x)
            ref = _best(_skimage_fwd_adj, max(1, a.repeats - 1), lambda: None, imgs, theta)
            print(f"| CT parallel beam | {n_views} views | {batch} | {ours:.4f} | {ref:.3f} | {ref / ours:.0f}× |")
        print(f"| (CT system matrix build, once per geometry) | {n_views} views | – | {build:.2f} | – | – |")
    maps = rng.standard_normal((8, n, n)) + 1j * rng.standard_normal((8, n, n))
    maps /= np.sqrt((np.abs(maps) ** 2).sum(0))
    mask = (rng.random((n, n)) < 0.25).astype(np.float32)
    mri = CartesianMRI(mask, maps.astype(np.complex64), device=dev)
    for batch in (1, 8):
        x = torch.randn(batch, n, n, dtype=torch.complex64, device=dev)
        mri.adjoint(mri.forward(x))
        ours = _best(_fwd_adj, a.repeats, sync, mri, x)
        print(f"| MRI multi-coil SENSE | 8 coils | {batch} | {ours:.4f} | – | – |")


if __name__ == "__main__":
    main()
