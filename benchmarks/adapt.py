"""Out-of-distribution test-time adaptation (LoRA, steerable conditional diffusion): PSNR with and without, and cost.

A prior reconstructs an image unlike its training data, with DDS (or DPS), once as it is and once with the
adapters trained on the measurement-consistency loss while sampling (:mod:`napari_diffrecon.samplers.adapt`).

Run (CPU, one torch thread; each adapted run costs ~2–10 network forward+backward passes per adapted step):

    python benchmarks/adapt.py                                   # both tasks, the default configurations
    python benchmarks/adapt.py --tasks mri-abd --steps 30 --configs off x0-lr1e-3 dc-lr1e-3
    python benchmarks/adapt.py --tasks ct-23 --config my='{"adapt_steps": 2, "adapt_lr": 3e-4}'

Writes ``<out>.md`` and ``<out>.json`` (default ``benchmarks/results/adapt``), updated after every run.

Tasks (real images; neither prior saw anything like them):

- ``mri-abd``: the brain MRI prior (``mri-brain-128``, trained on nilearn's MNI152 brain) on pydicom's abdominal MR
  ``examples_overlay.dcm`` (centre square, resized to 128, 99.5th percentile = 1, as in ``benchmarks/priors.py``),
  4× random-line undersampling with 8 simulated coils (SENSE), smooth random phase, seed 0
  (:func:`napari_diffrecon.simulate.simulate_from_image`, the settings of ``benchmarks/recon.py``'s ``mri-4x-8c``).
  ``mri-abd-8x``: the same at 8×.
- ``ct-23``: the procedural-phantom CT prior (``ct-phantom-128``) on the real spine CT ``CT_small.dcm``, 23 views,
  0.5 % Gaussian noise (``benchmarks/recon.py``'s ``ct-23``); ``ct-8``: the same with 8 views.

Metrics as in ``benchmarks/recon.py``: PSNR/SSIM of the magnitude over the whole image (data range = ground truth
max − min), data residual ``‖A x − m‖/‖m‖``, NFE = network forward passes per sample (adaptation adds one
forward + backward per Adam step), CPU s = thread CPU time of the ``reconstruct()`` call (robust to other jobs
on a shared machine; wall time is reported too).
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

__all__ = ["CONFIGS", "TASKS", "build_task", "main"]

# name -> params.extra (adaptation off = {}).
CONFIGS: dict[str, dict[str, Any]] = {
    "off": {},
    # Adapters on x0_hat itself, last half of the run, every 2nd step, 2 Adam steps.
    "x0-lr1e-3": {"adapt_steps": 2, "adapt_lr": 1e-3, "lora_rank": 4, "adapt_every": 2, "adapt_start": 0.5,
                  "adapt_target": "x0_hat"},
    # SCD's reference code: the loss scores the data-consistent image (gradient through the CG data step).
    "dc-lr1e-3": {"adapt_steps": 2, "adapt_lr": 1e-3, "lora_rank": 4, "adapt_every": 2, "adapt_start": 0.5},
    "dc-lr3e-4-r16": {"adapt_steps": 2, "adapt_lr": 3e-4, "lora_rank": 16, "adapt_every": 2, "adapt_start": 0.5},
    # Stronger: every step of the last half, lr 3e-3.
    "x0-lr3e-3-all": {"adapt_steps": 2, "adapt_lr": 3e-3, "lora_rank": 4, "adapt_start": 0.5, "adapt_target": "x0_hat"},
    "dc-lr3e-3-all": {"adapt_steps": 2, "adapt_lr": 3e-3, "lora_rank": 4, "adapt_start": 0.5},
    # The same with the discrepancy guard: stop adapting once the loss (deviance per datum) reaches the noise level.
    "dc-lr3e-3-floor1": {"adapt_steps": 2, "adapt_lr": 3e-3, "lora_rank": 4, "adapt_start": 0.5, "adapt_floor": 1.0},
}

TASKS = {
    "mri-abd": ("brain MRI prior on abdominal MR (examples_overlay.dcm), 4×, 8 coils", "mri-brain-128"),
    "mri-abd-8x": ("brain MRI prior on abdominal MR (examples_overlay.dcm), 8×, 8 coils", "mri-brain-128"),
    "ct-23": ("phantom CT prior on real spine CT (CT_small.dcm), 23 views, 0.5% noise", "ct-phantom-128"),
    "ct-8": ("phantom CT prior on real spine CT (CT_small.dcm), 8 views, 0.5% noise", "ct-phantom-128"),
}


def build_task(name: str, size: int = 128, seed: int = 0):
    """The simulated measurement of task ``name``."""
    if name in ("mri-abd", "mri-abd-8x"):
        from priors import eval_images

        from napari_diffrecon.simulate import simulate_from_image

        img = eval_images("mri", size)["examples_overlay.dcm"]
        return simulate_from_image(img, "mri", size=size, accel=8.0 if name.endswith("8x") else 4.0, coils=8,
                                   seed=seed, source="pydicom examples_overlay.dcm (abdominal MR)")
    if name in ("ct-23", "ct-8"):
        from recon import build_task as recon_task

        return recon_task(name, size, seed)
    raise KeyError(f"unknown task {name!r}; use one of {', '.join(TASKS)}")


def run_one(m, prior, method: str, modality: str, extra: dict[str, Any], n_steps: int, seed: int) -> dict[str, Any]:
    """One reconstruction; its PSNR/SSIM, residual, NFE and times."""
    from napari_diffrecon.metrics import psnr, ssim
    from napari_diffrecon.reconstruct import RunSettings, reconstruct
    from napari_diffrecon.samplers.defaults import recommended_params

    before = {k: v.detach().clone() for k, v in prior.network.state_dict().items()}
    # The modality's values only (no coils=/noisy=, unlike recon.py's reconstruct.data_kind): the recorded results
    # in benchmarks/results were made that way, and this command must reproduce them.
    params = recommended_params(method, modality, n_steps=n_steps, extra=dict(extra))
    t, c = time.perf_counter(), time.thread_time()
    r = reconstruct(m, RunSettings(method=method, params=params, seed=seed), prior=prior)
    wall, cpu = time.perf_counter() - t, time.thread_time() - c
    unchanged = all(torch.equal(v, prior.network.state_dict()[k]) for k, v in before.items())
    gt = np.abs(m.ground_truth)
    x = np.abs(r.reconstruction)
    return {"psnr": psnr(x, gt), "ssim": ssim(x, gt), "residual": r.residual, "nfe": r.provenance["nfe"],
            "wall_s": wall, "cpu_s": cpu, "prior_unchanged": unchanged, "params": params.to_dict()}


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The results as markdown tables, one per task and method."""
    out = ["# Out-of-distribution adaptation (LoRA, steerable conditional diffusion)", "",
           f"128², CPU, one torch thread, seeds {meta['seeds']}; made by `{meta['command']}` ({meta['date']}).", "",
           "PSNR, SSIM, residual and times are means over the listed seeds; Δ PSNR and extra CPU are against `off` "
           "with the same task, method, steps and seed (paired), averaged over those seeds. CPU s = thread CPU time "
           "(the machine was shared with training jobs; wall times are inflated by them).", ""]
    groups = dict.fromkeys((r["task"], r["method"], r["params"]["n_steps"]) for r in rows)
    for task, method, n_steps in groups:
        sub = [r for r in rows if (r["task"], r["method"], r["params"]["n_steps"]) == (task, method, n_steps)]
        if True:
            out += [f"## {task} — {TASKS[task][0]}, {method.upper()} ({n_steps} steps)", "",
                    "| config | adaptation (params.extra) | seeds | PSNR dB | Δ PSNR | SSIM | residual | NFE | CPU s | "
                    "extra CPU | wall s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
            base = {r["seed"]: r for r in sub if r["config"] == "off"}
            for cfg in dict.fromkeys(r["config"] for r in sub):
                rs = [r for r in sub if r["config"] == cfg]
                dp = [r["psnr"] - base[r["seed"]]["psnr"] for r in rs if r["seed"] in base]
                dc = [r["cpu_s"] - base[r["seed"]]["cpu_s"] for r in rs if r["seed"] in base]
                extra = {k: v for k, v in rs[0]["extra"].items()}
                out.append(
                    f"| {cfg} | `{json.dumps(extra) if extra else 'off'}` | "
                    f"{','.join(str(x) for x in sorted({r['seed'] for r in rs}))} | "
                    f"{np.mean([r['psnr'] for r in rs]):.2f} | "
                    f"{(f'{np.mean(dp):+.2f}' if dp and cfg != 'off' else '')} | "
                    f"{np.mean([r['ssim'] for r in rs]):.3f} | {np.mean([r['residual'] for r in rs]):.4f} | "
                    f"{rs[0]['nfe']} | {np.mean([r['cpu_s'] for r in rs]):.1f} | "
                    f"{(f'{np.mean(dc):+.1f}' if dc and cfg != 'off' else '')} | "
                    f"{np.mean([r['wall_s'] for r in rs]):.1f} |")
            out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    from napari_diffrecon.priors import load_prior

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", nargs="+", default=["mri-abd", "ct-23"], choices=list(TASKS))
    ap.add_argument("--methods", nargs="+", default=["dds"], choices=["dds", "dps"])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), help=f"named configurations: {', '.join(CONFIGS)}")
    ap.add_argument("--config", action="append", default=[], metavar="NAME=JSON", help="an extra configuration")
    ap.add_argument("--steps", type=int, default=30, help="sampler steps (default 30)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "adapt"))
    ap.add_argument("--append", action="store_true", help="add to the rows already in <out>.json (one table)")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="no runs: combine these result files into <out>")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    configs = {k: CONFIGS[k] for k in a.configs if k in CONFIGS}
    unknown = [k for k in a.configs if k not in CONFIGS]
    if unknown:
        ap.error(f"unknown configurations {unknown}; named ones: {', '.join(CONFIGS)}")
    for item in a.config:
        name, _, js = item.partition("=")
        configs[name] = json.loads(js)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if a.merge:
        parts = [json.loads(Path(f).read_text()) for f in a.merge]
        meta = {**parts[0]["meta"], "command": "; ".join(p["meta"]["command"] for p in parts),
                "seeds": sorted({s for p in parts for s in p["meta"]["seeds"]}),
                "configs": {k: v for p in parts for k, v in p["meta"]["configs"].items()}}
        rows = [r for p in parts for r in p["rows"]]
        out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        out.with_suffix(".md").write_text(markdown(rows, meta))
        return 0
    cmd = "python benchmarks/adapt.py " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = {"n_steps": a.steps, "seeds": a.seeds, "command": cmd.strip(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
            "python": platform.python_version(), "configs": configs}
    rows: list[dict[str, Any]] = []
    if a.append and out.with_suffix(".json").exists():
        old = json.loads(out.with_suffix(".json").read_text())
        rows = old["rows"]
        meta["command"] = old["meta"]["command"] + "; " + meta["command"]
        meta["configs"] = {**old["meta"]["configs"], **configs}
    for task in a.tasks:
        m = build_task(task)
        prior = load_prior(TASKS[task][1])
        modality = m.build_operator().modality
        for method in a.methods:
            for seed in a.seeds:
                for name, extra in configs.items():
                    row = run_one(m, prior, method, modality, extra, a.steps, seed)
                    row.update(task=task, method=method, config=name, seed=seed, extra=extra)
                    rows.append(row)
                    print(f"{task:8s} {method} seed {seed} {name:14s} PSNR {row['psnr']:6.2f} SSIM {row['ssim']:.3f} "
                          f"res {row['residual']:.4f} NFE {row['nfe']:4d} CPU {row['cpu_s']:7.1f} s "
                          f"wall {row['wall_s']:7.1f} s prior unchanged {row['prior_unchanged']}", flush=True)
                    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
                    out.with_suffix(".md").write_text(markdown(rows, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
