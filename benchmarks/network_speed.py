"""The prior network alone: milliseconds per forward pass at batch 1 and 8, float32 vs reduced precision (autocast).

    python benchmarks/network_speed.py                        # mri-brain-128, one thread, float32 and bfloat16
    python benchmarks/network_speed.py --prior ct-phantom-128 --precisions float32 bfloat16 float16 --threads 2
    python benchmarks/network_speed.py --memory-format        # also contiguous weights (a CPU default: channels-last)

Goes through ``NetworkPrior.denoise`` (as every sampler does) without autograd, eager (no tracing); best of
``--reps`` after one warm-up call. The batch-8 / batch-1 ratio is what bounds the cost of 8 posterior samples
against one.
"""

from __future__ import annotations

import argparse
import time

import torch

from napari_diffrecon.priors import load_prior


def time_denoise(prior, batch: int, size: int, reps: int) -> float:
    """Best wall time (s) of one ``prior.denoise`` call on a batch of noisy images."""
    x = torch.randn(batch, prior.channels, size, size) * 0.5
    with torch.no_grad():
        prior.denoise(x, 0.5)
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            prior.denoise(x, 0.5)
            best = min(best, time.perf_counter() - t)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prior", default="mri-brain-128")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--precisions", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--memory-format", action="store_true",
                    help="time the network's weights in the contiguous layout too, against the channels-last one "
                         "NetworkPrior.to uses on a CPU")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    prior = load_prior(a.prior)
    prior.trace = False
    print(f"{a.prior}, {a.size}², {a.threads} thread(s), torch {torch.__version__}")
    layouts = [None, torch.contiguous_format] if a.memory_format else [None]
    for layout in layouts:
        if layout is not None:
            prior.network.to(memory_format=layout)
        name = "contiguous weights" if layout is not None else f"as loaded ({prior.device.type})"
        for precision in a.precisions:
            prior.precision = precision
            ms = {b: 1000 * time_denoise(prior, b, a.size, a.reps) for b in a.batches}
            ratio = f", batch {a.batches[-1]} / batch {a.batches[0]} ×{ms[a.batches[-1]] / ms[a.batches[0]]:.2f}" \
                if len(a.batches) > 1 else ""
            print(f"{name}, {precision:>9}: " + ", ".join(f"batch {b} {v:.0f} ms" for b, v in ms.items()) + ratio,
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
