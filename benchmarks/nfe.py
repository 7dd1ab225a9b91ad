"""Speed/quality of fast posterior sampling: PSNR/SSIM against NFE for DDS, DPS, PFGM++ and consistency models.

Run (CPU, one thread, ≈ 13 min of sampling with the 2026-12 priors, the points' wall times in results/nfe.json
summed; also reachable as ``python benchmarks/recon.py --nfe-study``):

    python benchmarks/nfe.py                                    # both tasks, all series
    python benchmarks/nfe.py --tasks ct-23 --series cm cm-hot   # a subset

Tasks are :mod:`benchmarks.recon`'s (real images the priors never saw): ``ct-23`` (pydicom CT_small, 23 views)
and ``mri-4x`` (nibabel anatomical.nii, 4× single coil). Each point is the mean over ``--seeds`` posterior
samples (one batch) of the per-sample PSNR/SSIM against the ground truth; NFE = network evaluations per sample
(DPS also backpropagates through each). Series:

- ``dds`` / ``dds-hot``: DDS from noise / hot-started from the data's default classical image
  (``reconstruct.default_hot_start``: TV for CT at 23 views since 2026-12-06, CG for MRI) with the recommended
  parameters (:mod:`napari_diffrecon.samplers.defaults`), varying only the step count;
- ``dps``: DPS from noise with its recommended ζ;
- ``cm`` / ``cm-hot``: the consistency sampler with the distilled consistency model (shipped
  ``*-consistency`` priors), 1–4 NFE, from noise / hot-started;
- ``cm-teacher-hot``: the same sampler with the *diffusion* prior (no distillation), the control;
- ``pfgm`` (mri-4x only): DDS with the MRI prior fine-tuned with the PFGM++ kernel for D ∈ {64, 128, 2048} and,
  as the equal-compute control, with the diffusion kernel (D = ∞): 400 steps each from the shipped prior
  (``benchmarks/weights/``; commands in README).

Writes ``<out>.md``/``<out>.json`` (default ``benchmarks/results/nfe``) and the figure ``--png``
(default ``docs/nfe_curves.png``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from recon import SHIPPED, TASKS, _metrics, build_task  # noqa: E402

__all__ = ["SERIES", "run_point", "main"]

HERE = Path(__file__).parent
PFGM_DIMS = ("64", "128", "2048", "inf")

# series -> (sampler, hot start?, prior kind, step counts)
SERIES: dict[str, tuple[str, bool, str, tuple[int, ...]]] = {
    "dds": ("dds", False, "diffusion", (4, 10, 20, 50)),
    "dds-hot": ("dds", True, "diffusion", (2, 4, 10, 20)),
    "dps": ("dps", False, "diffusion", (20, 50, 100)),
    "cm": ("consistency", False, "consistency", (1, 2, 4)),
    "cm-hot": ("consistency", True, "consistency", (1, 2, 3, 4)),
    "cm-teacher-hot": ("consistency", True, "diffusion", (1, 2, 4)),
}


def run_point(m, method: str, hot: bool, prior, modality: str, n_steps: int, seeds: int, **overrides: Any
              ) -> dict[str, Any]:
    """One (method, NFE) point: ``seeds`` posterior samples as one batch; per-sample mean PSNR/SSIM."""
    from napari_diffrecon.reconstruct import RunSettings, default_hot_start, reconstruct
    from napari_diffrecon.samplers.defaults import recommended_params

    # The modality's values only (no coils=/noisy=, unlike recon.py's reconstruct.data_kind): the recorded results
    # in benchmarks/results were made that way, and this command must reproduce them.
    params = recommended_params(method, modality, hot_start=hot, n_steps=n_steps, **overrides)
    settings = RunSettings(method=method, params=params, n_samples=seeds, seed=0, keep_samples=True,
                           hot_start=default_hot_start(m) if hot else None)
    t, c = time.perf_counter(), time.thread_time()
    r = reconstruct(m, settings, prior=prior)
    wall, cpu = time.perf_counter() - t, time.thread_time() - c
    gt = np.abs(m.ground_truth)
    scores = [_metrics(s, gt) for s in r.samples]
    return {"nfe": int(r.provenance["nfe"]), "psnr": float(np.mean([p for p, _ in scores])),
            "psnr_sd": float(np.std([p for p, _ in scores])), "ssim": float(np.mean([s for _, s in scores])),
            "cpu_s_per_sample": cpu / seeds, "wall_s": wall, "n_steps": n_steps, "setting": params.to_dict(),
            "start": r.provenance.get("hot_start_method")}


def _priors(a: argparse.Namespace, modality: str) -> dict[str, Any]:
    from napari_diffrecon.priors import load_prior

    base = SHIPPED[modality]
    out = {"diffusion": load_prior(getattr(a, f"{modality}_prior") or base)}
    cm = getattr(a, f"{modality}_cm") or f"{base}-consistency"
    try:
        out["consistency"] = load_prior(cm)
    except FileNotFoundError as e:
        print(f"   (no consistency model for {modality}: {e})", flush=True)
    return out


def run(a: argparse.Namespace) -> dict[str, Any]:
    from napari_diffrecon.priors import load_prior

    torch.set_num_threads(a.threads)
    results: dict[str, Any] = {"tasks": {}, "meta": {
        "python": platform.python_version(), "torch": torch.__version__, "threads": a.threads, "seeds": a.seeds,
        "machine": platform.machine(), "command": "python benchmarks/nfe.py " + " ".join(sys.argv[1:])}}
    for task in a.tasks:
        m = build_task(task, a.size, 0)
        modality = m.build_operator().modality
        priors = _priors(a, modality)
        series: dict[str, list[dict[str, Any]]] = {}
        print(f"== {task}: {TASKS[task][0]}", flush=True)
        for name in a.series:
            if name == "pfgm":
                continue
            method, hot, kind, steps = SERIES[name]
            if kind not in priors:
                continue
            for n in steps:
                pt = run_point(m, method, hot, priors[kind], modality, n, a.seeds)
                series.setdefault(name, []).append(pt)
                print(f"   {name:15s} NFE {pt['nfe']:4d}  PSNR {pt['psnr']:6.2f} ± {pt['psnr_sd']:.2f}  "
                      f"SSIM {pt['ssim']:.3f}  {pt['cpu_s_per_sample']:6.1f} CPU s/sample", flush=True)
        if "pfgm" in a.series and modality == a.pfgm_modality:
            for d in PFGM_DIMS:
                path = Path(a.pfgm_dir) / f"{SHIPPED[modality]}-pfgmpp-D{d}.json"
                if not path.exists():
                    print(f"   (missing {path}: skipping PFGM++ D={d})", flush=True)
                    continue
                prior = load_prior(path)
                for eta in a.pfgm_eta:
                    label = f"pfgm-D{d}" + ("" if eta == 1 else f"-eta{eta:g}")
                    for n in a.pfgm_steps:
                        pt = run_point(m, "dds", False, prior, modality, n, a.seeds, eta=eta)
                        series.setdefault(label, []).append(pt)
                        print(f"   PFGM++ D={d:5s} DDS η={eta:g} NFE {pt['nfe']:4d}  PSNR {pt['psnr']:6.2f} ± "
                              f"{pt['psnr_sd']:.2f}  SSIM {pt['ssim']:.3f}", flush=True)
        results["tasks"][task] = {"description": TASKS[task][0], "series": series}
    return results


def _best(points: list[dict[str, Any]], max_nfe: int | None = None) -> dict[str, Any] | None:
    pts = [p for p in points if max_nfe is None or p["nfe"] <= max_nfe]
    return max(pts, key=lambda p: p["psnr"]) if pts else None


def markdown(results: dict[str, Any]) -> str:
    """The README tables: every point, then the consistency target (≤ 4 NFE within 1 dB of the best DDS)."""
    lines = [f"Command: `{results['meta']['command']}` — torch {results['meta']['torch']}, "
             f"{results['meta']['threads']} thread(s), {results['meta']['seeds']} samples per point.", ""]
    for task, tr in results["tasks"].items():
        lines += [f"**{task}** — {tr['description']}", "",
                  "| series | NFE | PSNR (dB) | SSIM | CPU s / sample |", "|---|---:|---:|---:|---:|"]
        for name, pts in tr["series"].items():
            for p in pts:
                start = f" ({p['start']} start)" if p.get("start") else ""
                lines.append(f"| {name}{start} | {p['nfe']} | {p['psnr']:.2f} ± {p['psnr_sd']:.2f} | {p['ssim']:.3f} | "
                             f"{p['cpu_s_per_sample']:.1f} |")
        dds = _best([p for k in ("dds", "dds-hot") for p in tr["series"].get(k, [])])
        for k in ("cm", "cm-hot", "cm-teacher-hot"):
            cm = _best([p for p in tr["series"].get(k, [])], 4)
            if dds and cm:
                gap = cm["psnr"] - dds["psnr"]
                lines.append("")
                lines.append(f"{k} at ≤ 4 NFE: {cm['psnr']:.2f} dB at NFE {cm['nfe']} vs best DDS {dds['psnr']:.2f} dB "
                             f"at NFE {dds['nfe']}: {gap:+.2f} dB ({'within' if gap >= -1 else 'not within'} 1 dB)")
        lines.append("")
    return "\n".join(lines)


def plot(results: dict[str, Any], png: Path) -> None:
    """PSNR and SSIM against NFE, one column per task (+ PFGM++ column when present)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = []
    for task, tr in results["tasks"].items():
        main = {k: v for k, v in tr["series"].items() if not k.startswith("pfgm")}
        pf = {k: v for k, v in tr["series"].items() if k.startswith("pfgm")}
        cols.append((task, main))
        if pf:
            cols.append((f"{task}: PFGM++ (DDS)", pf))
    fig, axes = plt.subplots(2, len(cols), figsize=(4.2 * len(cols), 6.4), squeeze=False)
    for j, (title, series) in enumerate(cols):
        for name, pts in series.items():
            pts = sorted(pts, key=lambda p: p["nfe"])
            nfe = [p["nfe"] for p in pts]
            style = "--" if "teacher" in name or "Dinf" in name else ":" if "eta0" in name else "-"
            for i, key in enumerate(("psnr", "ssim")):
                axes[i, j].plot(nfe, [p[key] for p in pts], style, marker="o", ms=3, label=name)
        for i, key in enumerate(("PSNR (dB)", "SSIM")):
            ax = axes[i, j]
            ax.set_xscale("log")
            ax.set_xlabel("NFE (network evaluations per sample)")
            ax.set_ylabel(key)
            ax.grid(alpha=0.3)
        axes[0, j].set_title(title)
        axes[0, j].legend(fontsize=7)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="PSNR/SSIM against NFE (see the module docstring)")
    p.add_argument("--tasks", nargs="+", default=["ct-23", "mri-4x"])
    p.add_argument("--series", nargs="+", default=[*SERIES, "pfgm"], choices=[*SERIES, "pfgm"])
    p.add_argument("--seeds", type=int, default=3, help="posterior samples per point (one batch)")
    p.add_argument("--ct-prior"), p.add_argument("--mri-prior"), p.add_argument("--pet-prior")
    p.add_argument("--ct-cm"), p.add_argument("--mri-cm"), p.add_argument("--pet-cm")
    p.add_argument("--pfgm-dir", default=str(HERE / "weights"))
    p.add_argument("--pfgm-modality", default="mri")
    p.add_argument("--pfgm-steps", nargs="+", type=int, default=[10, 20, 50])
    p.add_argument("--pfgm-eta", nargs="+", type=float, default=[1.0, 0.0],
                   help="DDS η for the PFGM++ series (0 = deterministic, the ODE regime PFGM++ targets)")
    p.add_argument("--merge", action="store_true", help="update the series of an existing <out>.json instead of "
                   "replacing it (re-run a subset)")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(HERE / "results" / "nfe"))
    p.add_argument("--png", default=str(HERE.parent / "docs" / "nfe_curves.png"))
    a = p.parse_args(argv)
    results = run(a)
    out = Path(a.out)
    if a.merge and out.with_suffix(".json").exists():
        old = json.loads(out.with_suffix(".json").read_text())
        for task, tr in results["tasks"].items():
            old["tasks"].setdefault(task, tr)["series"].update(tr["series"])
        old["meta"]["command"] += f"; python benchmarks/nfe.py {' '.join(sys.argv[1:])}"
        results = old
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    out.with_suffix(".md").write_text(markdown(results))
    plot(results, Path(a.png))
    print(markdown(results))
    print(f"wrote {out.with_suffix('.md')}, {out.with_suffix('.json')} and {a.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
