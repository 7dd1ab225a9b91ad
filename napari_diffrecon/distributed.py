"""Scale-out with Dask distributed: many studies, and the slabs of large ones, over a cluster.

:func:`reconstruct_folder` checks every study of a folder before any work starts, then sends one
task per slab (a whole study when it fits the memory budget) to a Dask cluster — a
``LocalCluster`` by default, or an existing one by scheduler address. Each task reads its study on
the worker, reconstructs its slab (:func:`napari_diffrecon.volume.run_slab`) and writes the core
slices to ``OUT/.partial/<study>/`` atomically. When all slabs of a study are in, the client
stitches them and writes ``OUT/<study>.npz`` (reconstruction, std, provenance) and
``OUT/<study>.json`` (provenance). A failing task is retried (``retries``); one that keeps
failing is reported in ``OUT/<study>.failed.json``, ``OUT/report.json`` and the returned report —
never dropped silently — while the other studies go on. Running again resumes: finished studies
(same input file hash and settings) are skipped, and so are finished slabs of unfinished ones.

Workers must see the folder and the output folder at the same paths (a shared filesystem); a
LocalCluster always does.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__

__all__ = [
    "reconstruct_folder",
    "FolderReport",
    "settings_key",
    "add_volume_arguments",
    "run_from_args",
    "wants_volume",
    "main",
]


def _require_distributed() -> Any:
    try:
        import distributed
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError(
            "scale-out needs Dask distributed: pip install 'dask[distributed]' (or napari-diffrecon[distributed])"
        ) from None
    return distributed


def settings_key(params: dict[str, Any], extra: dict[str, Any]) -> str:
    """A short hash of everything that changes a study's result (sampler params, seed, prior, slabs...)."""
    blob = json.dumps({"params": params, **extra}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _sha256(path: str | Path) -> str:
    from .io.bundle import file_sha256

    return file_sha256(path) or ""


# -- the task that runs on a worker ----------------------------------------------------------------
_PRIOR_CACHE: dict[str, Any] = {}


def _resolve_prior(prior: Any, device: str) -> Any:
    """A prior object, or a name/path loaded once per worker process."""
    if not isinstance(prior, str):
        return prior
    key = f"{prior}@{device}"
    if key not in _PRIOR_CACHE:
        from .priors import load_prior

        _PRIOR_CACHE[key] = load_prior(prior, device)
    return _PRIOR_CACHE[key]


def _count_attempt(attempt_file: str) -> int:
    """Record one attempt of a task (shared filesystem, any process) and return how many there were."""
    p = Path(attempt_file)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "a", encoding="utf-8") as f:
        f.write(f"{time.time():.3f} {os.getpid()}\n")
    return len(p.read_text(encoding="utf-8").splitlines())


class InjectedFaultError(RuntimeError):
    """A failure injected on purpose (``inject_faults``) to exercise retries and failure reports."""


def _chunk_task(
    study_path: str,
    slab: dict[str, int],
    prior: Any,
    params: dict[str, Any],
    scale: float,
    offset: float,
    n_samples: int,
    seed: int,
    device: str,
    budget: int | None,
    ztv_scale: float,
    partial_path: str,
    attempt_file: str,
    fail_attempts: int,
    threads: int,
) -> dict[str, Any]:
    """Reconstruct one slab of one study on a worker and write its core slices to ``partial_path``."""
    import torch

    from .io.bundle import write_result
    from .volume import Slab, VolumeParams, read_volume_study, run_slab

    attempt = _count_attempt(attempt_file)
    if attempt <= fail_attempts:
        raise InjectedFaultError(
            f"injected failure of {Path(partial_path).name} (attempt {attempt}, failing the first {fail_attempts})"
        )
    torch.set_num_threads(max(int(threads), 1))
    study = read_volume_study(study_path)
    p = dict(params)
    for k, v in p.items():
        if v in ("inf", "Infinity"):
            p[k] = float("inf")
    vp = VolumeParams(**p)
    res = run_slab(
        study, Slab(**slab), _resolve_prior(prior, device), vp, scale, offset, n_samples, seed, device, budget,
        ztv_scale,
    )
    info = {**res["info"], "attempts": attempt, "pid": os.getpid()}
    try:
        from distributed import get_worker

        info["worker"] = get_worker().address
    except (ImportError, ValueError):
        info["worker"] = None
    write_result(partial_path, {"mean": res["mean"], "std": res["std"]}, info, overwrite=True)
    return info


# -- the client side --------------------------------------------------------------------------------
@dataclass
class FolderReport:
    """What happened to each study of a folder.

    Attributes
    ----------
    studies : dict
        ``study id → {"status": "done" | "skipped" | "failed", "output", "chunks", "errors", ...}``.
    wall_time_s : float
        Seconds for the whole folder.
    scheduler : str
        The scheduler's address.
    n_workers : int
        Workers the cluster had.
    """

    studies: dict[str, dict[str, Any]] = field(default_factory=dict)
    wall_time_s: float = 0.0
    scheduler: str = ""
    n_workers: int = 0

    @property
    def failed(self) -> list[str]:
        """Ids of studies that did not finish."""
        return [k for k, v in self.studies.items() if v["status"] == "failed"]

    @property
    def ok(self) -> bool:
        """True when every study is done or was already done."""
        return not self.failed

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {"studies": self.studies, "wall_time_s": self.wall_time_s, "scheduler": self.scheduler,
                "n_workers": self.n_workers, "failed": self.failed}


def _prior_for(prior: Any, modality: str) -> Any:
    if isinstance(prior, dict):
        if modality not in prior:
            raise ValueError(f"no prior given for {modality} studies; pass prior={{'{modality}': ...}}")
        return prior[modality]
    return prior


def _prior_name(prior: Any) -> str:
    if isinstance(prior, str):
        return prior
    card = getattr(prior, "card", None)
    return card.name if card is not None else type(prior).__name__ + json.dumps(vars(prior), default=str)


def _check_cluster_shape(n_workers: Any, threads_per_worker: Any, retries: Any) -> None:
    """Refuse a cluster that cannot run anything (0 workers waits forever for one) or negative retries (None: not
    checked, e.g. the workers of an existing cluster)."""
    from ._checks import check_number

    check_number("--workers", n_workers, 1, integer=True)
    check_number("--threads-per-worker", threads_per_worker, 1, integer=True)
    check_number("--retries", retries, 0, integer=True)


def reconstruct_folder(
    folder: str | Path,
    out_dir: str | Path,
    prior: Any,
    params: Any = None,
    *,
    scheduler: str | None = None,
    client: Any = None,
    n_workers: int = 2,
    threads_per_worker: int = 1,
    processes: bool = True,
    slab_slices: int | str | None = None,
    halo: int | None = None,
    memory_budget: int | str | None = None,
    n_samples: int = 1,
    seed: int = 0,
    device: str = "cpu",
    retries: int = 2,
    allow_mixed: bool = False,
    check: dict[str, Any] | None = None,
    inject_faults: dict[str, int] | None = None,
    on_chunk: Callable[[str, dict[str, Any]], Any] | None = None,
    log: Callable[[str], Any] = lambda s: None,
    overwrite: bool = False,
) -> FolderReport:
    """Reconstruct every volume study of ``folder`` on a Dask cluster, one output per study.

    Parameters
    ----------
    folder : path
        Study files (:func:`napari_diffrecon.volume.write_volume_study`), all checked before work starts.
    out_dir : path
        Where ``<study>.npz`` / ``<study>.json`` / ``<study>.failed.json`` and ``report.json`` go.
    prior : Prior, str or dict
        A prior object (sent to the workers), a shipped name / card path (loaded on each worker), or
        ``{modality: prior}`` for mixed folders.
    params : VolumeParams or dict, optional
        Sampler parameters (z-TV weight ``ztv`` ...), or ``{modality: VolumeParams}`` for mixed folders; default
        :func:`~napari_diffrecon.volume.recommended_volume_params` of each study's modality.
    scheduler : str, optional
        Address of an existing scheduler (``tcp://host:8786``); default: a LocalCluster.
    client : distributed.Client, optional
        An existing client (takes precedence over ``scheduler``).
    n_workers, threads_per_worker, processes
        The LocalCluster's shape when one is started.
    slab_slices, halo, memory_budget
        As :func:`napari_diffrecon.volume.stream_volume`; each slab is one task. ``memory_budget`` is per
        worker; by default a LocalCluster's workers share 70% of this machine's free memory, and the
        workers of an existing cluster each take 70% of theirs.
    retries : int
        Extra attempts per failing task before it is reported as failed.
    allow_mixed : bool
        Accept folders mixing modalities / slice geometries.
    check : dict, optional
        Keyword arguments of :func:`napari_diffrecon.volume.check_study` (``assume_spacing`` ...).
    inject_faults : dict, optional
        ``{"<study>:<slab index>": n}`` makes that task fail its first ``n`` attempts (to exercise
        retries and failure reports on a real cluster).
    on_chunk : callable, optional
        ``on_chunk(study_id, info)`` as each slab completes (progress, streaming).
    overwrite : bool
        Recompute a study whose output was made from another input or with other settings (the CLI's
        ``--force``); by default that is refused, and an output made the same way is skipped (resume).

    Returns
    -------
    FolderReport
    """
    local = client is None and not scheduler  # the LocalCluster's shape is ours; an existing cluster's is not
    _check_cluster_shape(n_workers if local else None, threads_per_worker if local else None, retries)
    distributed = _require_distributed()
    from .io.bundle import write_result
    from .volume import VolumeParams, check_folder, intensity_for, recommended_volume_params
    from .volume.mbir import live
    from .volume.memory import detect_budget, parse_bytes, plan_volume_slabs
    from .volume.run import volume_provenance

    t0 = time.perf_counter()

    def params_for(modality: str) -> Any:  # one study's parameters: given, per modality, or that modality's defaults
        if isinstance(params, dict):
            return params[modality] if modality in params else recommended_volume_params(modality)
        return params if params is not None else recommended_volume_params(modality)

    first = next(iter(params.values()), None) if isinstance(params, dict) else params
    ztv = float(live(first if first is not None else VolumeParams(), "ztv", 0.0))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    studies = check_folder(folder, allow_mixed=allow_mixed, ztv=ztv, **(check or {}))
    budget = parse_bytes(memory_budget) if memory_budget is not None else None
    if budget is None and client is None and not scheduler:  # a LocalCluster shares this machine's memory
        budget = detect_budget(device) // max(int(n_workers), 1)
    faults = dict(inject_faults or {})
    report = FolderReport()

    # -- plan every study (client side): skip finished ones, intensity mapping, slabs ------------------
    jobs = []
    for path, study, findings in studies:
        sid = study.name
        pr = _prior_for(prior, study.modality)
        local_prior = _resolve_prior(pr, "cpu")
        # refuse up front what would not fit a worker's budget (when it is known)
        slabs, halo_s, _ = plan_volume_slabs(study.build_operator("cpu"), local_prior, budget or detect_budget(device),
                                             n_samples, slab_slices, halo, ztv, check=budget is not None)
        pdict = params_for(study.modality).to_dict()
        key = settings_key(pdict, {"prior": _prior_name(pr), "seed": seed, "n_samples": n_samples,
                                   "slabs": [x.to_dict() for x in slabs], "checks": findings})
        sha = _sha256(path)
        done_json = out / f"{sid}.json"
        if (out / f"{sid}.npz").exists() and done_json.exists():
            prev = json.loads(done_json.read_text(encoding="utf-8"))
            if prev.get("measurement_sha256") == sha and prev.get("settings_key") == key:
                report.studies[sid] = {"status": "skipped", "output": str(out / f"{sid}.npz"),
                                       "reason": "finished earlier with the same input and settings"}
                log(f"{sid}: already done, skipped")
                continue
            if not overwrite:
                raise FileExistsError(
                    f"{out / (sid + '.npz')} was made from another input or with other settings; use another "
                    "output folder, remove it, or pass --force to recompute it"
                )
            log(f"{sid}: made from another input or with other settings; recomputed (--force)")
        scale, offset, how = intensity_for(study, local_prior, "cpu")
        jobs.append(dict(sid=sid, path=path, study=study, findings=findings, prior=pr, key=key, sha=sha,
                         prior_name=_prior_name(local_prior), pdict=pdict,
                         scale=scale, offset=offset, how=how, slabs=slabs, halo=halo_s))

    if not jobs:
        report.wall_time_s = time.perf_counter() - t0
        (out / "report.json").write_text(json.dumps(report.to_dict(), indent=1, default=str))
        return report

    # -- the cluster ----------------------------------------------------------------------------------
    own_cluster = None
    own_client = None
    if client is None:
        if scheduler:
            client = own_client = distributed.Client(scheduler)
        else:
            own_cluster = distributed.LocalCluster(
                n_workers=n_workers, threads_per_worker=threads_per_worker, processes=processes,
                dashboard_address=None,
            )
            client = own_client = distributed.Client(own_cluster)
    report.scheduler = str(client.scheduler.address)
    report.n_workers = len(client.nthreads())
    try:
        futures = {}
        state: dict[str, dict[str, Any]] = {}
        scattered: dict[int, Any] = {}
        for job in jobs:
            sid = job["sid"]
            part_dir = out / ".partial" / sid
            part_dir.mkdir(parents=True, exist_ok=True)
            pr = job["prior"]
            if not isinstance(pr, str) and id(pr) not in scattered:
                scattered[id(pr)] = client.scatter(pr, broadcast=True, hash=False)
            pr_arg = pr if isinstance(pr, str) else scattered[id(pr)]
            st = state[sid] = {"job": job, "chunks": {}, "errors": [], "pending": 0}
            for i, slab in enumerate(job["slabs"]):
                # keyed by the settings and the input's checksum: a rerun after the input file changed must not
                # stitch slabs of the old input into the new result
                part = part_dir / f"{job['key']}_{job['sha'][:16]}_{slab.start:05d}-{slab.stop:05d}.npz"
                if part.exists():
                    st["chunks"][i] = {"status": "resumed", "partial": str(part)}
                    continue
                attempts = out / ".attempts" / f"{sid}_{i}"
                if attempts.exists():
                    attempts.unlink()  # count this run's attempts only
                fut = client.submit(
                    _chunk_task, str(job["path"]), slab.to_dict(), pr_arg, job["pdict"], job["scale"], job["offset"],
                    n_samples, seed, device, budget, job["findings"]["ztv_scale"], str(part),
                    str(attempts), int(faults.get(f"{sid}:{i}", 0)), threads_per_worker,
                    retries=int(retries), pure=False, key=f"slab-{sid}-{i}-{job['key']}-{time.time_ns()}",
                )
                futures[fut] = (sid, i, part)
                st["pending"] += 1
        for st in state.values():
            if st["pending"] == 0:
                _finish_study(st, out, report, seed, n_samples, device, budget, distributed, write_result,
                              volume_provenance, log)
        for fut in distributed.as_completed(list(futures)):
            sid, i, part = futures[fut]
            st = state[sid]
            st["pending"] -= 1
            if fut.status == "finished":
                info = fut.result()
                st["chunks"][i] = {"status": "done", "partial": str(part), **info}
                log(f"{sid}: slab {i + 1}/{len(st['job']['slabs'])} done on {info.get('worker')} "
                    f"(attempt {info['attempts']})")
                if on_chunk is not None:
                    on_chunk(sid, st["chunks"][i])
            else:
                exc = fut.exception()
                attempts_file = out / ".attempts" / f"{sid}_{i}"
                n_att = len(attempts_file.read_text().splitlines()) if attempts_file.exists() else None
                err = {"slab": i, "error": f"{type(exc).__name__}: {exc}", "attempts": n_att,
                       "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-4000:]}
                st["chunks"][i] = {"status": "failed", **err}
                st["errors"].append(err)
                log(f"{sid}: slab {i + 1} FAILED after {n_att} attempts: {err['error']}")
            if st["pending"] == 0:
                _finish_study(st, out, report, seed, n_samples, device, budget, distributed, write_result,
                              volume_provenance, log)
    finally:
        if own_client is not None:
            own_client.close()
        if own_cluster is not None:
            own_cluster.close()
    report.wall_time_s = time.perf_counter() - t0
    (out / "report.json").write_text(json.dumps(report.to_dict(), indent=1, default=str))
    return report


def _finish_study(st, out, report, seed, n_samples, device, budget, distributed, write_result,
                  volume_provenance, log) -> None:
    """Stitch a study's slabs and write its outputs, or write its failure report."""
    job = st["job"]
    sid = job["sid"]
    if st["errors"]:
        failed = {
            "study": sid,
            "input": str(job["path"]),
            "status": "failed",
            "failed_slabs": st["errors"],
            "finished_slabs": sorted(i for i, c in st["chunks"].items() if c["status"] in ("done", "resumed")),
            "how_to_resume": "fix the cause and run the same command again: finished slabs are kept in "
                             f"{out / '.partial' / sid} and reused",
        }
        (out / f"{sid}.failed.json").write_text(json.dumps(failed, indent=1, default=str))
        report.studies[sid] = {"status": "failed", "errors": st["errors"], "chunks": st["chunks"],
                               "failure_report": str(out / f"{sid}.failed.json")}
        return
    study = job["study"]
    op = study.build_operator("cpu")
    d, h, w = op.image_shape
    recon = np.zeros((d, h, w), dtype=np.complex64 if op.is_complex else np.float32)
    std = np.zeros((d, h, w), dtype=np.float32)
    for i, slab in enumerate(job["slabs"]):
        with np.load(st["chunks"][i]["partial"], allow_pickle=False) as z:
            recon[slab.core_start : slab.core_stop] = z["mean"]
            std[slab.core_start : slab.core_stop] = z["std"]
            if st["chunks"][i]["status"] == "resumed":
                st["chunks"][i].update(json.loads(str(z["provenance"])))
    import torch

    from .metrics import data_residual
    from .volume import VolumeParams

    res = float(data_residual(op, torch.from_numpy(recon)[None], study.to_tensor(), study.build_likelihood())[0])
    prov = volume_provenance(study, VolumeParams(**job["pdict"]), {  # this study's parameters (per modality)
        "kind": "diffusion-volume",
        "sampler": "mbir",
        "prior": job["prior_name"],
        "prior_source": job["prior"] if isinstance(job["prior"], str) else None,
        "settings_key": job["key"],
        "n_samples": n_samples,
        "seed": seed,
        "device": device,
        "intensity_mapping": {"scale": job["scale"], "offset": job["offset"], "how": job["how"]},
        "checks": job["findings"],
        "memory_budget": budget,
        "slabs": [s.to_dict() for s in job["slabs"]],
        "halo": job["halo"],
        "chunks": {str(k): {kk: vv for kk, vv in v.items() if kk != "partial"}
                   for k, v in sorted(st["chunks"].items())},
        "data_residual": res,
        "dask_version": distributed.__version__,
        "scheduler": report.scheduler,
    })
    arrays = {"reconstruction": (np.abs(recon) if op.is_complex else recon).astype(np.float32), "std": std}
    if op.is_complex:
        arrays["reconstruction_complex"] = recon
    write_result(out / f"{sid}.npz", arrays, prov, overwrite=True)
    tmp = out / f".{sid}.json.tmp"
    tmp.write_text(json.dumps(prov, indent=1, default=str), encoding="utf-8")
    os.replace(tmp, out / f"{sid}.json")  # written last: its presence marks the study finished
    stale = out / f"{sid}.failed.json"
    if stale.exists():
        stale.unlink()
    shutil.rmtree(out / ".partial" / sid, ignore_errors=True)
    report.studies[sid] = {"status": "done", "output": str(out / f"{sid}.npz"), "data_residual": res,
                           "chunks": st["chunks"]}
    log(f"{sid}: done → {out / (sid + '.npz')}")


# -- command line (called by 'napari-diffrecon reconstruct --volume', or python -m) ----------------
def add_volume_arguments(p: argparse.ArgumentParser) -> None:
    """The volume / scale-out options of ``napari-diffrecon reconstruct`` (``--volume`` selects this path)."""
    g = p.add_argument_group("volumes and scale-out (with --volume, or when the input is a folder)")
    g.add_argument("--volume", action="store_true", help="the input is a volume study (.npz) or a folder of them")
    g.add_argument("--scheduler", default=None, help="Dask scheduler address (default: a local cluster)")
    g.add_argument("--workers", type=int, default=2, help="local cluster workers (default 2)")
    g.add_argument("--threads-per-worker", type=int, default=1)
    g.add_argument("--ztv", type=float, default=None, help="z-TV weight λ (0 = slice by slice; default: the "
                   "modality's, 0.01 CT / 0.03 MRI / 0.02 PET, volume.ZTV_DEFAULTS)")
    g.add_argument("--rho", type=float, default=1.0, help="ADMM penalty ρ")
    g.add_argument("--memory-budget", default=None, help="per-worker memory budget, e.g. 16GB (default: 70%% free)")
    g.add_argument("--slab", default=None, help="slab size in slices, or 'auto' (default: whole volumes)")
    g.add_argument("--halo", type=int, default=None, help="slab overlap per side (default 4 with z-TV)")
    g.add_argument("--retries", type=int, default=2, help="extra attempts for a failing slab (default 2)")
    g.add_argument("--spacing", type=float, nargs=3, default=None, metavar=("DZ", "DY", "DX"),
                   help="voxel spacing in mm for studies that lack it")
    g.add_argument("--allow-anisotropic", action="store_true", help="accept thick slices with z-TV")
    g.add_argument("--allow-mixed", action="store_true", help="accept folders mixing modalities/geometries")


def wants_volume(args: argparse.Namespace) -> bool:
    """Whether parsed ``reconstruct`` arguments ask for the volume path (``--volume`` or a folder input)."""
    src = getattr(args, "input", None) or getattr(args, "bundle", None)
    return bool(getattr(args, "volume", False)) or (src is not None and Path(src).is_dir())


def run_from_args(args: argparse.Namespace) -> int:
    """Run a folder (or one study file) from parsed arguments; exit status 0 only if every study finished.

    Works with this module's parser (:func:`main`) and with ``napari-diffrecon reconstruct``'s
    (``bundle``, ``--steps``/``--eta``/``--cg-iters`` may be None there: the volume defaults apply).
    """
    src = Path(getattr(args, "input", None) or args.bundle)
    method = getattr(args, "method", None)
    _check_cluster_shape(getattr(args, "workers", 1), getattr(args, "threads_per_worker", 1),
                         getattr(args, "retries", 0))
    if getattr(args, "halo", None) is not None:
        from ._checks import check_number

        check_number("--halo", args.halo, 0, integer=True)
    if method not in (None, "mbir"):
        raise ValueError(f"volumes are reconstructed by the DiffusionMBIR-style sampler: --method mbir, not {method}")
    if not src.exists():
        raise FileNotFoundError(f"{src} not found")
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file; volume runs write a folder (one result per study and report.json): "
                         "pass -o FOLDER")
    from .io.bundle import MEASUREMENT_SUFFIXES, RESULT_SUFFIXES
    from .io.export import EXPORT_FORMATS

    file_suffixes = {*MEASUREMENT_SUFFIXES, *RESULT_SUFFIXES, ".gz", *(e for exts in EXPORT_FORMATS.values()
                                                                      for e in exts if e.count(".") == 1)}
    if not out.exists() and out.suffix.lower() in file_suffixes:
        raise ValueError(f"volume runs write a folder (one result per study and report.json), not a {out.suffix} "
                         f"file: pass -o {out.parent / out.name.split('.')[0]} (a folder name)")
    if src.is_file() and src.suffix.lower() in (".h5", ".hdf5"):  # a bundle or fastMRI file: 2D runs
        raise ValueError(f"{src.name} is a 2D measurement (an .h5 bundle or fastMRI slice); reconstruct it without "
                         "--volume (a fastMRI file's other slices: --slice K)")
    if src.is_file() and src.suffix.lower() != ".npz":  # a 3D image, not a volume study: say how to make one
        raise ValueError(f"{src.name} is not a volume study (.npz: a stack of measurements with their operator); "
                         f"make one from a 3D image with `napari-diffrecon simulate {src.name} --volume --modality "
                         "ct|mri|pet -o STUDY.npz` (or napari_diffrecon.volume.simulate_study from Python), or open "
                         "the image in the workbench's Volume group")
    folder = src
    made_out = not out.exists()
    if src.is_file():  # one study: a folder of one, via a link, so that outputs and resume work the same
        folder = out / ".input"
        folder.mkdir(parents=True, exist_ok=True)
        link = folder / src.name
        if not link.exists():
            try:
                link.symlink_to(src.resolve())
            except OSError:
                shutil.copy2(src, link)
    try:
        return _run_folder_from_args(args, folder, out)
    except BaseException:
        # a run refused before any study was written leaves no output folder behind (only the input link)
        if made_out and out.is_dir() and all(p.name == ".input" for p in out.iterdir()):
            shutil.rmtree(out, ignore_errors=True)
        raise


def _run_folder_from_args(args: argparse.Namespace, folder: Path, out: Path) -> int:
    """:func:`run_from_args` once the input folder is known: parameters, prior, the run, the summary."""
    from .volume import VolumeInputError, check_folder, find_studies, read_volume_study, recommended_volume_params

    # each study runs with its modality's defaults (mixed folders too); the options given on the command line win
    given = {"ztv": args.ztv, "rho": args.rho, **{k: getattr(args, a, None) for k, a in (
        ("n_steps", "steps"), ("eta", "eta"), ("cg_iters", "cg_iters"), ("gamma", "gamma"),
        ("prior_weight", "prior_weight"), ("renoise", "renoise"))}}
    params = {mod: recommended_volume_params(mod, **given) for mod in ("ct", "mri", "pet")}
    for p in params.values():  # a bad --steps / --eta / --ztv ... is refused here, not by every worker in turn
        p.check()
    n_samples = getattr(args, "samples", None)
    n_samples = 1 if n_samples is None else n_samples
    from ._checks import check_number

    check_number("--samples", n_samples, 1, integer=True)
    from .priors import default_prior_for

    # The first readable study's modality picks the shipped prior (and is what a given one must fit); unreadable
    # studies are left to check_folder, which lists every problem of the folder at once.
    modality = None
    for path in find_studies(folder):
        try:
            modality = read_volume_study(path).modality
            break
        except (VolumeInputError, FileNotFoundError):
            continue
    if modality is None:
        check_folder(folder, allow_mixed=args.allow_mixed)  # raises, naming every study that cannot be run
    prior = getattr(args, "prior", None)
    if prior is None:
        prior = default_prior_for(modality, modality == "mri")
        if prior is None:
            raise ValueError(f"no shipped prior for {modality}; pass --prior PATH to a trained prior")
    elif modality is not None and not args.allow_mixed:
        from .priors import ModelCard
        from .priors.registry import prior_path
        from .reconstruct import modality_mismatch

        card_path = prior_path(prior).with_suffix(".json")
        if not card_path.exists():
            raise FileNotFoundError(f"--prior {prior}: no prior card {card_path} (a prior is a .json card beside its "
                                    ".safetensors weights)")
        why = modality_mismatch(ModelCard.read(card_path), modality)  # the 2D runs' rule (reconstruct)
        if why:
            shipped = default_prior_for(modality, modality == "mri")
            raise ValueError(f"--prior {prior}: {why}" + (f" (the shipped one: --prior {shipped})" if shipped else ""))
    check = {"allow_anisotropic": args.allow_anisotropic}
    if args.spacing:
        check["assume_spacing"] = tuple(args.spacing)
    slab = args.slab if args.slab in (None, "auto") else int(args.slab)
    rep = reconstruct_folder(
        folder, out, prior, params, scheduler=args.scheduler, n_workers=args.workers,
        threads_per_worker=args.threads_per_worker, slab_slices=slab, halo=args.halo,
        memory_budget=args.memory_budget, n_samples=n_samples, seed=args.seed,
        device=args.device, retries=args.retries, allow_mixed=args.allow_mixed, check=check, log=print,
        overwrite=bool(getattr(args, "force", False)),
    )
    for sid, s in rep.studies.items():
        print(f"{sid}: {s['status']}" + (f" — {s['errors'][0]['error']}" if s["status"] == "failed" else ""))
    print(f"{len(rep.studies)} studies in {rep.wall_time_s:.1f} s on {rep.n_workers} workers ({rep.scheduler or '-'}); "
          f"report: {out / 'report.json'}")
    return 0 if rep.ok else 1


def main(argv: list[str] | None = None) -> int:
    """``python -m napari_diffrecon.distributed INPUT -o OUT --prior P`` (until the CLI has ``--volume``)."""
    p = argparse.ArgumentParser(prog="python -m napari_diffrecon.distributed",
                                description=f"napari-diffrecon {__version__}: volumes / folders of studies on Dask")
    p.add_argument("input", help="a volume study (.npz) or a folder of them")
    p.add_argument("-o", "--output", required=True, help="output folder (one result per study)")
    p.add_argument("--prior", default=None, help="prior name or card path (.json); default: the modality's shipped one")
    p.add_argument("--steps", type=int, default=None, help="diffusion steps (default 50)")
    p.add_argument("--eta", type=float, default=None)
    p.add_argument("--cg-iters", type=int, default=None)
    p.add_argument("--gamma", type=float, default=None)
    p.add_argument("--prior-weight", type=float, default=None,
                   help="the prior's weight against the data (default 1): the data weight γ is divided by it")
    p.add_argument("--renoise", choices=["dds", "ddim"], default=None,
                   help="re-noise of each step (default dds: the DDS code's, with the network's ε; ddim: exact DDIM)")
    p.add_argument("--samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    add_volume_arguments(p)
    return run_from_args(p.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
