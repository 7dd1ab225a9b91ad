"""GPU check and timings: every sampler of the benchmark on a CUDA device, one sample and 8 in one batch.

Run on a machine with a GPU (``python benchmarks/gpu.py --out benchmarks/results/gpu``): for each task and method
of :mod:`benchmarks.recon` (same simulated measurements, same tuned defaults, same shipped priors) it reconstructs on
``--device`` and records PSNR/SSIM against the ground truth, NFE, wall time (until the result is on the host, so the
device has finished), the peak GPU memory allocated by torch, and the same run's PSNR on the CPU when
``--cpu-check`` is given (the quality must not depend on the device). A second table times ``--samples``
posterior samples in one batch against one sample: on a GPU the network's cost is far from linear in the batch.
Nothing here runs in the tests.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import recon  # noqa: E402  (benchmarks/recon.py: tasks, defaults, metrics)

DEFAULT_TASKS = ["ct-23", "ct-lowdose", "mri-4x", "mri-4x-8c", "pet-low"]
DEFAULT_METHODS = ["dds", "dds-hot", "dps-hot", "mcg", "song"]


def _run(m: Any, label: str, prior: Any, modality: str, gt: np.ndarray, device: str, n_samples: int = 1,
         seed: int = 0) -> dict[str, Any]:
    """:func:`recon._sampler` on ``device`` (its wall time ends with the result copied to the host, so the device
    has finished), plus the peak GPU memory torch allocated."""
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    row = recon._sampler(m, label, prior, modality, gt, seed, {}, n_samples=n_samples, device=device)
    return {"psnr": row["psnr"], "ssim": row["ssim"], "nfe": row["nfe"], "wall_s": row["wall_s"],
            "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tasks", nargs="+", default=DEFAULT_TASKS)
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--batch-tasks", nargs="*", default=["ct-23", "mri-4x", "pet-low"])
    p.add_argument("--cpu-check", action="store_true", help="also run each method on the CPU and compare PSNR")
    p.add_argument("--mri-prior", help="another MRI prior (.json) than the shipped one")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "gpu"))
    a = p.parse_args(argv)
    from napari_diffrecon.priors import load_prior

    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: no CUDA device here; run this on a machine with a GPU or pass --device cpu", file=sys.stderr)
        return 2
    names = {"ct": "ct-phantom-128", "mri": a.mri_prior or "mri-brain-128", "pet": "pet-phantom-128"}
    priors = {k: load_prior(v) for k, v in names.items()}
    gpu_name = torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu"
    rows, batch = [], []
    for task in a.tasks:
        m = recon.build_task(task)
        modality = m.build_operator().modality
        gt = m.ground_truth
        for label in a.methods:
            _run(m, label, priors[modality], modality, gt, a.device)  # warm-up (kernels, traced network)
            row = {"task": task, "method": label, **_run(m, label, priors[modality], modality, gt, a.device)}
            if a.cpu_check:
                row["psnr_cpu"] = _run(m, label, priors[modality], modality, gt, "cpu")["psnr"]
            rows.append(row)
            print(f"{task:12s} {label:8s} {row['psnr']:6.2f} dB  {row['nfe']:4d} NFE  {row['wall_s']:6.2f} s  "
                  f"{row['peak_gpu_mib'] or 0:7.1f} MiB" + (f"  cpu {row['psnr_cpu']:.2f} dB" if a.cpu_check else ""),
                  flush=True)
        if task in a.batch_tasks:
            one = {"task": task, **_run(m, "dds-hot", priors[modality], modality, gt, a.device)}
            many = _run(m, "dds-hot", priors[modality], modality, gt, a.device, n_samples=a.samples)
            batch.append({"task": task, "one_s": one["wall_s"], "batch_s": many["wall_s"],
                          "ratio": many["wall_s"] / one["wall_s"], "batch_mib": many["peak_gpu_mib"],
                          "mean_psnr": many["psnr"]})
            print(f"{task:12s} dds-hot ×{a.samples} batch {many['wall_s']:.2f} s = ×{batch[-1]['ratio']:.2f} one "
                  f"sample, mean of {a.samples} {many['psnr']:.2f} dB", flush=True)
    meta = {"device": gpu_name, "torch": torch.__version__, "priors": names, "samples": a.samples,
            "command": "python benchmarks/gpu.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows, "batch": batch}, indent=1))
    lines = [f"# GPU timings ({gpu_name}, torch {torch.__version__})", "", f"`{meta['command']}`", "",
             "| task | method | PSNR | SSIM | NFE | wall s | peak GPU MiB |"
             + (" PSNR on CPU |" if a.cpu_check else ""),
             "|---|---|---|---|---|---|---|" + ("---|" if a.cpu_check else "")]
    for r in rows:
        lines.append(f"| {r['task']} | {r['method']} | {r['psnr']:.2f} | {r['ssim']:.3f} | {r['nfe']} | "
                     f"{r['wall_s']:.2f} | {r['peak_gpu_mib'] or 0:.0f} |"
                     + (f" {r['psnr_cpu']:.2f} |" if a.cpu_check else ""))
    if batch:
        lines += ["", f"| task | dds-hot, 1 sample s | {a.samples} samples in one batch s | ratio | peak GPU MiB |"
                  f" mean of {a.samples} PSNR |", "|---|---|---|---|---|---|"]
        for b in batch:
            lines.append(f"| {b['task']} | {b['one_s']:.2f} | {b['batch_s']:.2f} | ×{b['ratio']:.2f} | "
                         f"{b['batch_mib'] or 0:.0f} | {b['mean_psnr']:.2f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
