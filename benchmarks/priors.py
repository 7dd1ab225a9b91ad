"""Quality and speed of the shipped priors: denoising on real images they never saw, samples, timing.

Run (CPU, a few minutes):
    python benchmarks/priors.py                       # shipped priors by name
    python benchmarks/priors.py --priors /tmp/snap/ct-phantom-128.json ...   # any prior files
    python benchmarks/priors.py --speed-only          # network timing table only

Writes ``benchmarks/results/priors.md`` / ``priors.json`` and ``docs/prior_samples.png``.

Denoising: x_σ = x + σ·z in the prior's model units (σ relative to the model range: CT model units are
HU/1000, so σ = 0.1 is 100 HU; PET and MRI magnitude are mapped to [−1, 1] and [0, 1]). Compared with
scikit-image's TV (Chambolle) and non-local-means denoisers whose weights are chosen *with the ground
truth* (oracle: the best of a grid per image and σ), which favours the baselines. PSNR over the image's own
range (max − min of the clean image).

Evaluation images (real; never used to train any prior): pydicom's CT_small.dcm (spine CT) and, when
pylibjpeg can decode them, its head CTs 693_J2KI.dcm and J2K_pixelrep_mismatch.dcm; MR: pydicom's
MR_small.dcm and the abdominal MR examples_overlay.dcm; PET: FDG-like activity maps derived from those real
CT/MR images by ``simulate.activity_from_anatomy``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from skimage.restoration import denoise_nl_means, denoise_tv_chambolle
from skimage.transform import resize

from napari_diffrecon.priors import load_prior
from napari_diffrecon.simulate import activity_from_anatomy

ROOT = Path(__file__).resolve().parent.parent
SIGMAS = (0.05, 0.1, 0.2, 0.5)
TV_WEIGHTS = (0.01, 0.02, 0.04, 0.07, 0.1, 0.15, 0.2, 0.3, 0.45, 0.6)
NLM_H = (0.4, 0.6, 0.8, 1.0, 1.3)
SHIPPED = ("ct-phantom-128", "mri-brain-128", "pet-phantom-128")


def _dicom(name: str) -> np.ndarray | None:
    import pydicom
    from pydicom.data import get_testdata_file

    try:
        ds = pydicom.dcmread(get_testdata_file(name))
        a = ds.pixel_array.astype(np.float64)
    except Exception:  # noqa: BLE001 - optional decoders (JPEG 2000) may be missing
        return None
    return a * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))


def _square(img: np.ndarray) -> np.ndarray:
    h, w = img.shape
    s = min(h, w)
    y0, x0 = (h - s) // 2, (w - s) // 2
    return img[y0 : y0 + s, x0 : x0 + s]


def _fit(img: np.ndarray, n: int) -> np.ndarray:
    return resize(_square(img), (n, n), anti_aliasing=True, preserve_range=True)


def _unit(img: np.ndarray) -> np.ndarray:
    hi = np.percentile(img, 99.5)
    return np.clip(img / max(hi, 1e-12), 0, 1.2)


def eval_images(modality: str, n: int = 128) -> dict[str, np.ndarray]:
    """Real evaluation images in *native* units (HU for CT, [0, 1] magnitude/activity otherwise)."""
    cts = {k: _dicom(k) for k in ("CT_small.dcm", "J2K_pixelrep_mismatch.dcm", "693_J2KI.dcm")}
    cts = {k: np.clip(v, -1024, 3000) for k, v in cts.items() if v is not None}
    mrs = {k: _dicom(k) for k in ("MR_small.dcm", "examples_overlay.dcm")}
    mrs = {k: v for k, v in mrs.items() if v is not None}
    if modality == "ct":
        return {k: _fit(v, n) for k, v in cts.items()}
    if modality == "mri":
        return {k: _unit(_fit(v, n)) for k, v in mrs.items()}
    if modality == "pet":
        out = {f"FDG map of {k}": _fit(activity_from_anatomy(v, "ct", fwhm_px=v.shape[0] / n * 1.5), n)
               for k, v in cts.items()}
        out["FDG map of MR_small.dcm"] = _fit(activity_from_anatomy(mrs["MR_small.dcm"], "mr"), n)
        return {k: _unit(v) for k, v in out.items()}
    raise ValueError(modality)


def _psnr(x: np.ndarray, ref: np.ndarray) -> float:
    rng = float(ref.max() - ref.min())
    return 10 * np.log10(rng**2 / max(float(np.mean((x - ref) ** 2)), 1e-20))


def _best(fn, grid, clean):
    best = -np.inf
    for g in grid:
        best = max(best, _psnr(fn(g), clean))
    return best


def denoising_table(prior, modality: str, seed: int = 0) -> list[dict]:
    """PSNR (dB) of prior / oracle TV / oracle NLM at each σ, averaged over the evaluation images."""
    rows = []
    imgs = eval_images(modality, prior.card.resolution)
    rng = np.random.default_rng(seed)
    for sigma in SIGMAS:
        res = {"prior": [], "tv": [], "nlm": [], "noisy": []}
        for img in imgs.values():
            u = prior.to_model(torch.tensor(img, dtype=torch.float32)).numpy()
            clean = np.stack([u, np.zeros_like(u)]) if prior.channels == 2 else u[None]
            noisy = clean + sigma * rng.standard_normal(clean.shape)
            with torch.no_grad():
                den = prior.denoise(torch.tensor(noisy[None], dtype=torch.float32), sigma)[0].numpy()
            ca = 0 if prior.channels == 2 else None
            nz = noisy if prior.channels == 2 else noisy[0]
            cl = clean if prior.channels == 2 else clean[0]
            res["prior"].append(_psnr(den if prior.channels == 2 else den[0], cl))
            res["noisy"].append(_psnr(nz, cl))
            rng_c = float(cl.max() - cl.min())
            res["tv"].append(_best(lambda w, nz=nz, ca=ca, r=rng_c, s=sigma: denoise_tv_chambolle(
                nz, weight=w * r * s / 0.1, channel_axis=ca), TV_WEIGHTS, cl))
            res["nlm"].append(_best(lambda h, nz=nz, ca=ca, s=sigma: denoise_nl_means(
                nz, h=h * s, sigma=s, patch_size=5, patch_distance=6, fast_mode=True, channel_axis=ca),
                NLM_H, cl))
        rows.append({"sigma": sigma, **{k: float(np.mean(v)) for k, v in res.items()}, "n_images": len(imgs)})
    return rows


@torch.no_grad()
def sample_grid(priors: list, path: Path, n: int = 4, steps: int = 40, seed: int = 0) -> None:
    """Unconditional samples (EDM Heun) of each prior, one row per prior, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from napari_diffrecon.physics import Identity
    from napari_diffrecon.samplers import Problem, SamplerParams, get_sampler

    fig, axes = plt.subplots(len(priors), n, figsize=(2.2 * n, 2.3 * len(priors)), squeeze=False)
    for row, prior in zip(axes, priors, strict=True):
        res = prior.card.resolution
        dtype = torch.complex64 if prior.channels == 2 else torch.float32
        op = Identity((res, res), complex_=prior.channels == 2)
        prob = Problem(op, torch.zeros((res, res), dtype=dtype), prior)
        last = None
        for last in get_sampler("heun")(prob, SamplerParams(n_steps=steps), n_samples=n, seed=seed):  # noqa: B007
            pass
        x = last.x0_hat.abs() if last.x0_hat.is_complex() else last.x0_hat
        for k, ax in enumerate(row):
            img = x[k].numpy()
            if prior.card.modality == "ct":
                ax.imshow(img, cmap="gray", vmin=-0.25, vmax=0.35)  # HU/1000: soft-tissue window −250..350 HU
            else:
                ax.imshow(img, cmap="gray" if prior.card.modality == "mri" else "magma", vmin=0, vmax=1)
            ax.axis("off")
        row[0].set_title(f"{prior.card.name} ({steps} Heun steps)", fontsize=8, loc="left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


@torch.no_grad()
def speed_table(prior, sizes=(128, 256), batches=(1, 8), repeats: int = 3) -> list[dict]:
    """Milliseconds per network evaluation (``prior.denoise``), per batch and per image."""
    rows = []
    dev = prior.device
    for s in sizes:
        for b in batches:
            x = torch.randn(b, prior.channels, s, s, device=dev)
            prior.denoise(x, 0.5)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(repeats):
                prior.denoise(x, 0.5)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            ms = (time.perf_counter() - t) / repeats * 1000
            rows.append({"size": s, "batch": b, "ms_per_call": ms, "ms_per_image": ms / b})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--priors", nargs="*", default=list(SHIPPED), help="names or .json paths")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--speed-only", action="store_true")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--grid", default=str(ROOT / "docs" / "prior_samples.png"))
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    priors = [load_prior(x, a.device) for x in a.priors]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads, device {a.device}", "priors": {}}
    lines = [f"Machine: {report['machine']}", ""]
    for prior in priors:
        card = prior.card
        start = len(lines)
        entry: dict = {"card": {"modality": card.modality, "channels": card.channels,
                                "steps": card.training.get("steps"), "parameters": card.training.get("parameters")}}
        entry["speed"] = speed_table(prior)
        if not a.speed_only:
            entry["denoising"] = denoising_table(prior, card.modality)
        report["priors"][card.name] = entry
        lines.append(f"### {card.name} ({card.modality}, {card.channels} ch, "
                     f"{(card.training.get('parameters') or 0) / 1e6:.2f}M parameters, "
                     f"{card.training.get('steps')} training steps"
                     f"{', averaged with its previous stage' if 'weight_average' in card.training else ''})")
        lines.append("")
        if "denoising" in entry:
            n_img = entry["denoising"][0]["n_images"]
            lines += [f"Denoising PSNR (dB), mean over {n_img} real images it never saw:", "",
                      "| σ (model units) | noisy | TV (oracle weight) | NLM (oracle h) | **prior** | prior − best |",
                      "|---|---|---|---|---|---|"]
            for r in entry["denoising"]:
                margin = r["prior"] - max(r["tv"], r["nlm"])
                lines.append(f"| {r['sigma']} | {r['noisy']:.2f} | {r['tv']:.2f} | {r['nlm']:.2f} | "
                             f"**{r['prior']:.2f}** | {margin:+.2f} |")
            lines.append("")
        lines += ["| image | batch | ms / call | ms / image |", "|---|---|---|---|"]
        for r in entry["speed"]:
            lines.append(f"| {r['size']}² | {r['batch']} | {r['ms_per_call']:.0f} | {r['ms_per_image']:.0f} |")
        lines.append("")
        print("\n".join(lines[start:]), flush=True)
    if not a.speed_only:
        sample_grid(priors, Path(a.grid))
        lines.append(f"Unconditional samples: {a.grid}")
    (out / "priors.json").write_text(json.dumps(report, indent=1))
    (out / "priors.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'priors.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
