"""Where a CT hot start should come from: FBP or TV, across view counts and scanned arcs.

Run (CPU, one thread, ≈ 8 min per 5 geometries; more views or a wider arc take longer):

    python benchmarks/hot_start.py                                    # all geometries below
    python benchmarks/hot_start.py --geometries v8 v12 a90 --out /tmp/hs

The real CT slice of :mod:`benchmarks.recon` (pydicom's CT_small, 0.5 % Gaussian noise, 128², seed 0) is measured
with ``vN`` = N views over 180° or ``aD`` = a limited arc of D degrees (1° apart); DDS is hot-started with its tuned
values (:func:`napari_diffrecon.samplers.defaults.recommended_params`, t0 0.3, 10 steps) from FBP and from TV
(default weight), 8 samples in one batch. Reported: PSNR of the posterior mean and of the first sample, and the
start :func:`napari_diffrecon.reconstruct.default_hot_start` picks for that geometry (the rule these numbers set).
Writes ``<out>.md`` / ``<out>.json`` (default ``benchmarks/results/hot_start``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from recon import _ct, _metrics  # noqa: E402

GEOMETRIES = ("v8", "v12", "v14", "v16", "v23", "v30", "v45", "v90", "a90", "a120", "a135", "a140", "a150", "a160",
              "a170")


def run(geometry: str, prior, samples: int = 8, seed: int = 0) -> dict:
    """Both starts on one geometry: PSNR of the mean and of the first sample for each."""
    from napari_diffrecon.physics.ct import angular_coverage
    from napari_diffrecon.reconstruct import RunSettings, data_kind, default_hot_start, reconstruct
    from napari_diffrecon.samplers.defaults import recommended_params

    kind, value = geometry[0], geometry[1:]
    if kind not in "va" or not value.isdigit():
        raise ValueError(f"geometry {geometry!r}: use vN (N views over 180°) or aD (an arc of D degrees)")
    kw = {"views": int(value)} if kind == "v" else {"limited_angle": float(value)}
    m = _ct(**kw)(128, seed)
    _, coils, noisy = data_kind(m)
    views, arc = angular_coverage(m.operator["angles_deg"])
    row = {"geometry": geometry, "views": views, "arc_deg": arc, "default": default_hot_start(m)}
    for start in ("fbp", "tv"):
        params = recommended_params("dds", "ct", hot_start=True, coils=coils, noisy=noisy)
        t = time.perf_counter()
        r = reconstruct(m, RunSettings(method="dds", params=params, n_samples=samples, seed=seed, hot_start=start,
                                       keep_samples=True), prior=prior)
        row[start] = {"mean": _metrics(r.mean, m.ground_truth)[0], "sample0": _metrics(r.samples[0], m.ground_truth)[0],
                      "wall_s": time.perf_counter() - t}
    row["tv_minus_fbp"] = row["tv"]["mean"] - row["fbp"]["mean"]
    return row


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"CT hot start: FBP or TV ({meta['date']}, {meta['machine']}, torch {meta['torch']}, 1 thread, seed "
             f"{meta['seed']}, {meta['samples']} samples, prior {meta['prior']}).", "",
             "| geometry | views | arc ° | FBP start: mean / sample 0 | TV start: mean / sample 0 | TV − FBP (mean) "
             "| default start |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['geometry']} | {r['views']} | {r['arc_deg']:.1f} | {r['fbp']['mean']:.2f} / "
                     f"{r['fbp']['sample0']:.2f} | {r['tv']['mean']:.2f} / {r['tv']['sample0']:.2f} | "
                     f"{r['tv_minus_fbp']:+.2f} | {r['default']} |")
    lines += ["", f"Command: `{meta['argv']}`"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--geometries", nargs="+", default=list(GEOMETRIES))
    p.add_argument("--prior", default="ct-phantom-128")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "hot_start"))
    p.add_argument("--combine", nargs="+", metavar="JSON", help="merge earlier runs' JSON (geometry order) into --out")
    a = p.parse_args(argv)
    out = Path(a.out)
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": platform.machine(), "torch": torch.__version__,
            "seed": a.seed, "samples": a.samples, "prior": a.prior,
            "argv": "python benchmarks/hot_start.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    if a.combine:
        parts = [json.loads(Path(f).read_text()) for f in a.combine]
        order = {g: i for i, g in enumerate(GEOMETRIES)}
        rows = sorted({r["geometry"]: r for d in parts for r in d["rows"]}.values(),
                      key=lambda r: order.get(r["geometry"], len(order)))
        meta = {**parts[0]["meta"], "argv": " and ".join(d["meta"]["argv"] for d in parts)}
        from napari_diffrecon.reconstruct import ct_hot_start

        for r in rows:  # the start today's rule picks (the runs may predate it)
            r["default"] = ct_hot_start(r["views"], r["arc_deg"])
    else:
        from napari_diffrecon.priors import load_prior

        torch.set_num_threads(1)
        prior = load_prior(a.prior)
        rows = []
        for g in a.geometries:
            rows.append(run(g, prior, a.samples, a.seed))
            r = rows[-1]
            print(f"{g}: FBP {r['fbp']['mean']:.2f}, TV {r['tv']['mean']:.2f} ({r['tv_minus_fbp']:+.2f}); "
                  f"default {r['default']}", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(markdown(rows, meta), encoding="utf-8")
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
