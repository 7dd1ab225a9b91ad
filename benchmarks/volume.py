"""Volume benchmark: z-TV (DiffusionMBIR-style) vs slice-by-slice, Dask 1 vs 2 workers, memory plans.

Run (CPU, one thread per worker; a few minutes each):

    python benchmarks/volume.py quality --prior /tmp/snap/ct-phantom-128.json     # z-TV vs slice-by-slice
    python benchmarks/volume.py quality --prior mri-brain-128 --modality mri       # the same on 4× MRI k-space
    python benchmarks/volume.py quality --prior pet-phantom-128 --modality pet     # ... on low-count PET
    python benchmarks/volume.py workers --prior /tmp/snap/ct-phantom-128.json     # Dask speed-up 1 → 2 workers
    python benchmarks/volume.py memory  --prior /tmp/snap/ct-phantom-128.json     # planned vs measured memory

Evaluation volume (real, never seen by any prior — the CT prior trains on procedural phantoms, the MRI prior
on nilearn's MNI152): nibabel's ``tests/data/example4d.nii.gz`` (a real EPI brain series, 128×96×24 voxels of
2 × 2 × 2.2 mm, first frame), axial slices ``--first`` … ``--first + --slices``, zero-padded to 128×128,
intensity scaled so the 99.5th percentile of the head is 1 and treated as attenuation relative to water
(declared as HU = 1000·(μ − 1), the CT prior's units). It is an MR contrast under a CT prior — out of
distribution for both arms alike; the comparison isolates the z coupling. Sparse-view parallel-beam CT
(``--views``), Gaussian noise ``--noise`` × the sinogram RMS, same seed for both arms. With ``--modality mri`` the
same volume (an MR image: in its own modality) is sampled in k-space, ``--accel`` × undersampled, each slice by its
own random mask, noise ``--noise`` × the sampled k-space RMS, a smooth phase; with ``--modality pet`` it is an
activity map, 180 views, ``--counts`` true counts per slice, each slice its own attenuation, 20 % background.

Metrics over the whole volume: PSNR (data range = ground truth max − min), mean |∂z error| =
mean |D_z (x − x_true)| (slice consistency), and the FBP baseline for context.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from napari_diffrecon.metrics import psnr
from napari_diffrecon.volume import (
    dz,
    plan_memory,
    read_volume_study,
    recommended_volume_params,
    reconstruct_volume,
    simulate_ct_study,
    volume_ct,
    write_volume_study,
)


def real_volume(first: int = 6, n_slices: int = 12, n: int = 128) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Axial slices of nibabel's example4d (frame 0) as attenuation relative to water, ``(D, n, n)``, and spacing."""
    import nibabel as nib
    import nibabel.testing

    img = nib.load(os.path.join(nibabel.testing.data_path, "example4d.nii.gz"))
    data = np.asarray(img.dataobj, dtype=np.float32)[..., 0]  # (128, 96, 24), LAS
    zooms = [float(z) for z in img.header.get_zooms()[:3]]
    if first + n_slices > data.shape[2]:
        raise ValueError(f"example4d has {data.shape[2]} slices; --first + --slices = {first + n_slices}")
    vol = np.moveaxis(data[:, :, first : first + n_slices], 2, 0)  # (D, 128, 96)
    vol = np.transpose(vol, (0, 2, 1))[:, ::-1]  # rows anterior→posterior
    pad = vol.shape[2] - vol.shape[1]  # 96 rows → 128: a square field of view
    vol = np.pad(vol, ((0, 0), (pad // 2, pad - pad // 2), (0, 0)))
    if vol.shape[2] != n:
        from skimage.transform import resize

        vol = np.stack([resize(s, (n, n), anti_aliasing=True) for s in vol])
    vol = vol / np.percentile(vol[vol > 0], 99.5)
    vol = np.clip(vol, 0, 1.2).astype(np.float32)
    yy, xx = np.mgrid[:n, :n]
    vol[:, (yy - n // 2) ** 2 + (xx - n // 2) ** 2 > (n // 2) ** 2] = 0  # the scanner's field of view
    return vol, (zooms[2], zooms[1], zooms[0])


def _load_prior(path: str) -> Any:
    from napari_diffrecon.priors import load_prior

    return load_prior(path)


def _fbp(study) -> np.ndarray:
    from napari_diffrecon.baselines import reconstruct_baseline

    op = study.build_operator()
    return reconstruct_baseline("fbp", op.base, study.to_tensor(), study.build_likelihood()).numpy()


def _classical(study, modality: str) -> tuple[str, np.ndarray]:
    """The modality's classical baseline on the whole study: FBP (CT), zero filling (MRI), MLEM (PET)."""
    from napari_diffrecon.baselines import reconstruct_baseline

    if modality == "ct":
        return "FBP", _fbp(study)
    op = study.build_operator()
    name = {"mri": "zero_filled", "pet": "mlem"}[modality]
    x = reconstruct_baseline(name, op, study.to_tensor(), study.build_likelihood()).numpy()
    return {"mri": "zero-filled", "pet": "MLEM"}[modality], np.abs(x) if modality == "mri" else x


def quality(args: argparse.Namespace) -> dict[str, Any]:
    """z-TV weights vs slice-by-slice (ztv = 0) on the real volume, same seed, same prior.

    ``--modality ct`` (sparse-view CT, ``--views``, ``--noise``), ``mri`` (Cartesian, ``--accel``, one coil, each slice
    its own mask, ``--noise`` of the sampled k-space RMS) or ``pet`` (180 views, ``--counts`` true counts per slice,
    20 % background, each slice its own attenuation). Scored on magnitudes (MRI) against the volume.
    """
    from napari_diffrecon.volume import ZTV_DEFAULTS, simulate_study

    torch.set_num_threads(1)
    vol, spacing = real_volume(args.first, args.slices)
    modality = args.modality
    if modality == "ct":
        study = simulate_ct_study(vol, args.views, args.noise, spacing_mm=spacing, seed=0, study_id="example4d")
        study.metadata["intensity"] = {"native_units": "HU", "scale": 0.001, "offset": 1.0}
        acquisition = {"views": args.views, "noise": args.noise}
    elif modality == "mri":
        study = simulate_study(vol, "mri", acceleration=args.accel, noise_fraction=args.noise, spacing_mm=spacing,
                               seed=0, study_id="example4d")
        acquisition = {"acceleration": args.accel, "noise_fraction": args.noise}
    else:
        study = simulate_study(vol, "pet", counts_per_slice=args.counts, spacing_mm=spacing, seed=0,
                               study_id="example4d")
        acquisition = {"counts_per_slice": args.counts}
    prior = _load_prior(args.prior)
    rows = []
    base_name, x_base = _classical(study, modality)
    rng = float(vol.max() - vol.min())
    rows.append({"method": base_name, "ztv": None, "psnr": psnr(x_base, vol, rng),
                 "mean_abs_dz_err": float(np.abs(np.diff(x_base - vol, axis=0)).mean()), "wall_s": 0.0})
    print(f"{base_name}: PSNR {rows[0]['psnr']:.2f} dB, mean|∂z err| {rows[0]['mean_abs_dz_err']:.4f}", flush=True)
    for lam in args.ztv if args.ztv is not None else [0.0, ZTV_DEFAULTS[modality]]:
        params = recommended_volume_params(modality, n_steps=args.steps, ztv=lam, cg_iters=args.cg_iters,
                                           eta=args.eta)
        t0 = time.perf_counter()
        res = reconstruct_volume(study, prior, params, seed=args.seed, memory_budget=args.budget)
        wall = time.perf_counter() - t0
        x = np.abs(res.reconstruction) if modality == "mri" else res.reconstruction
        err = torch.from_numpy(x - vol)
        row = {
            "method": "mbir z-TV" if lam > 0 else "slice-by-slice (ztv=0)",
            "ztv": lam,
            "psnr": psnr(x, vol, rng),
            "mean_abs_dz_err": float(dz(err).abs().mean()),
            "per_slice_psnr": [psnr(x[k], vol[k], rng) for k in range(len(vol))],
            "data_residual": res.residual,
            "wall_s": wall,
        }
        rows.append(row)
        print(f"ztv={lam}: PSNR {row['psnr']:.2f} dB, mean|∂z err| {row['mean_abs_dz_err']:.4f}, {wall:.0f} s",
              flush=True)
    return {"volume": {"source": "nibabel tests/data/example4d.nii.gz frame 0", "first": args.first,
                       "shape": list(vol.shape), "spacing_mm": list(spacing)},
            "modality": modality, **acquisition, "steps": args.steps, "seed": args.seed, "rows": rows}


def workers(args: argparse.Namespace) -> dict[str, Any]:
    """Wall time of a folder of studies on a LocalCluster with 1 and 2 single-threaded worker processes."""
    import distributed

    from napari_diffrecon.distributed import reconstruct_folder

    tmp = Path(tempfile.mkdtemp(prefix="volbench-"))
    src = tmp / "in"
    src.mkdir()
    vol, spacing = real_volume(0, 24, args.size)
    k = args.slices
    for i in range(args.studies):  # different slabs of the real volume as separate studies
        part = vol[(i * k) % (24 - k + 1) :][:k]
        st = simulate_ct_study(part, args.views, args.noise, spacing_mm=spacing, seed=i, study_id=f"s{i}")
        write_volume_study(st, src / f"s{i}.npz")
    params = recommended_volume_params("ct", n_steps=args.steps, ztv=0.05)
    out = {}
    for nw in (1, 2):
        with distributed.LocalCluster(n_workers=nw, threads_per_worker=1, processes=True,
                                      dashboard_address=None) as cl, distributed.Client(cl) as client:
            client.run(lambda: _load_prior(args.prior) and None)  # warm the workers (imports, weights)
            t0 = time.perf_counter()
            rep = reconstruct_folder(src, tmp / f"out{nw}", args.prior, params, client=client, memory_budget="2GB")
            out[nw] = time.perf_counter() - t0
            assert rep.ok, rep.to_dict()
        print(f"{nw} worker(s): {out[nw]:.1f} s", flush=True)
    load = os.getloadavg()
    return {"studies": args.studies, "study_shape": [k, args.size, args.size], "steps": args.steps,
            "wall_s": out, "speedup": out[1] / out[2], "cpu_count": os.cpu_count(), "loadavg": load}


def _vm(key: str) -> int:
    """A /proc/self/status memory field in bytes (VmHWM: this process image's peak RSS; VmRSS: current)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _measure_child(args: argparse.Namespace) -> None:
    """Run one volume reconstruction and print its peak RSS (in a fresh process)."""
    torch.set_num_threads(1)
    study = read_volume_study(args.study)
    prior = _load_prior(args.prior)
    base = _vm("VmRSS")  # (ru_maxrss would carry the parent's peak across exec)
    t0 = time.perf_counter()
    res = reconstruct_volume(study, prior, recommended_volume_params(study.modality, n_steps=args.steps, ztv=0.05),
                             memory_budget=args.budget,
                             slab_slices=args.slab)
    peak = _vm("VmHWM")
    print(json.dumps({"peak_rss": peak, "rss_before_run": base, "wall_s": time.perf_counter() - t0,
                      "plans": [r["memory_plan"] for r in res.slab_info]}))


def memory(args: argparse.Namespace) -> dict[str, Any]:
    """Planned memory of a 256³ CT volume under 16 GB, and measured peak RSS of a smaller run vs its budget."""
    torch.set_num_threads(1)
    prior = _load_prior(args.prior)
    from napari_diffrecon.physics import sparse_view_angles

    out: dict[str, Any] = {}
    op = volume_ct(256, 256, sparse_view_angles(180))
    plan = plan_memory(op, prior, "16GB")
    out["plan_256cubed_16GB"] = plan.to_dict()
    print(f"256³, 180 views, 16 GB: chunk {plan.chunk_slices} slices, planned peak {plan.peak / 2**30:.2f} GiB",
          flush=True)
    vol, spacing = real_volume(0, min(args.slices, 24), args.size)
    if args.slices > len(vol):  # the real volume has 24 slices: repeat them (memory measurement only)
        vol = np.resize(vol, (args.slices, *vol.shape[1:]))
    tmp = Path(tempfile.mkdtemp(prefix="volmem-"))
    st = simulate_ct_study(vol, args.views, 0.01, spacing_mm=spacing, study_id="mem")
    write_volume_study(st, tmp / "mem.npz")
    cmd = [sys.executable, __file__, "_child", "--study", str(tmp / "mem.npz"), "--prior", args.prior,
           "--steps", str(args.steps), "--budget", args.budget] + (["--slab", args.slab] if args.slab else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    child = json.loads(r.stdout.strip().splitlines()[-1])
    out["measured"] = {"shape": list(vol.shape), "budget": args.budget, **child}
    print(f"{vol.shape} under {args.budget}: peak RSS {child['peak_rss'] / 2**30:.2f} GiB "
          f"(process before the run {child['rss_before_run'] / 2**30:.2f} GiB)", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("quality")
    q.add_argument("--prior", required=True)
    q.add_argument("--first", type=int, default=6)
    q.add_argument("--slices", type=int, default=12)
    q.add_argument("--views", type=int, default=30)
    q.add_argument("--noise", type=float, default=0.01)
    q.add_argument("--steps", type=int, default=30)
    q.add_argument("--cg-iters", type=int, default=5)
    q.add_argument("--eta", type=float, default=None, help="default: the modality's DDS setting (samplers.defaults)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--budget", default="4GB")
    q.add_argument("--ztv", type=float, nargs="+", default=None,
                   help="z-TV weights to compare (default: 0 and the modality's, volume.ZTV_DEFAULTS)")
    q.add_argument("--modality", choices=["ct", "mri", "pet"], default="ct")
    q.add_argument("--accel", type=float, default=4.0, help="MRI: acceleration of every slice's mask")
    q.add_argument("--counts", type=float, default=1e5, help="PET: expected true counts per slice")
    w = sub.add_parser("workers")
    w.add_argument("--prior", required=True)
    w.add_argument("--studies", type=int, default=4)
    w.add_argument("--slices", type=int, default=6)
    w.add_argument("--size", type=int, default=64)
    w.add_argument("--views", type=int, default=30)
    w.add_argument("--noise", type=float, default=0.01)
    w.add_argument("--steps", type=int, default=10)
    m = sub.add_parser("memory")
    m.add_argument("--prior", required=True)
    m.add_argument("--slices", type=int, default=24)
    m.add_argument("--size", type=int, default=128)
    m.add_argument("--views", type=int, default=60)
    m.add_argument("--steps", type=int, default=2)
    m.add_argument("--budget", default="1GB")
    m.add_argument("--slab", default=None)
    c = sub.add_parser("_child")
    c.add_argument("--study")
    c.add_argument("--prior")
    c.add_argument("--steps", type=int)
    c.add_argument("--budget")
    c.add_argument("--slab", default=None)
    for s in (q, w, m):
        s.add_argument("--out", default=None, help="write the numbers as JSON here")
    args = p.parse_args(argv)
    if args.cmd == "_child":
        if args.slab and args.slab != "auto":
            args.slab = int(args.slab)
        _measure_child(args)
        return 0
    res = {"quality": quality, "workers": workers, "memory": memory}[args.cmd](args)
    res["command"] = " ".join(["python", "benchmarks/volume.py", *(argv if argv is not None else sys.argv[1:])])
    res["torch_threads"] = torch.get_num_threads()
    text = json.dumps(res, indent=1, default=str)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
