"""The worker side of a GUI run: no Qt here, only the core and numpy.

:func:`run_stream` is the generator napari's ``thread_worker`` iterates. It calls the same
:func:`napari_diffrecon.reconstruct.prepare_run` as the CLI, converts every streamed iterate to
CPU numpy *inside the worker* and yields :class:`Update` objects the GUI assigns to its layers.
It reads the live ``settings.params`` object that the GUI's sliders write to, never a widget.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = ["Update", "run_stream", "baseline_for", "MAX_UPDATES_PER_S"]

MAX_UPDATES_PER_S = 10.0


@dataclass
class Update:
    """One message from the worker to the GUI (arrays are CPU numpy, magnitude for complex images).

    Attributes
    ----------
    cpu_s : float
        CPU seconds the worker thread has spent on the run so far (streaming cost included).
    kind : str
        ``"baseline"`` (classical comparison ready), ``"iterate"`` (a streamed state),
        ``"tick"`` (progress only, no arrays: lets Stop act between throttled updates),
        ``"warnings"`` (known before the first step: ``provenance["warnings"]``) or
        ``"final"`` (the finished run with its summary and provenance).
    """

    kind: str
    step: int = 0
    n_steps: int = 0
    nfe: int = 0
    elapsed: float = 0.0
    sigma: float = 0.0
    x_t: np.ndarray | None = None
    x0_hat: np.ndarray | None = None
    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    residual: float | None = None
    residual_map: np.ndarray | None = None
    baseline: np.ndarray | None = None
    baseline_method: str | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    cpu_s: float = 0.0


def _mag(t: torch.Tensor) -> np.ndarray:
    t = t.detach()
    t = t.abs() if t.is_complex() else t
    return t.to("cpu", torch.float32).numpy().copy()


def _residual_map(operator: Any, x: torch.Tensor, m: torch.Tensor) -> np.ndarray:
    """``|A x − m|`` in data space; coils combined as root-sum-of-squares (display only)."""
    r = (operator.forward(x) - m).abs()
    if r.ndim == 3 and operator.modality == "mri":
        r = r.pow(2).sum(0).sqrt()
    return _mag(r)


def baseline_for(modality: str) -> str:
    """The classical reconstruction shown beside a diffusion run."""
    return {"ct": "fbp", "pet": "mlem", "mri": "zero_filled"}.get(modality, "cg")


def _classical(measurement: Any, method: str, device: str, params: dict[str, Any] | None = None) -> Any:
    from ..reconstruct import RunSettings, reconstruct

    return reconstruct(measurement, RunSettings(method=method, device=device, baseline_params=dict(params or {})))


def run_stream(
    measurement: Any,
    settings: Any,
    prior: Any = None,
    baseline: str | None = None,
    max_rate: float = MAX_UPDATES_PER_S,
    live_log: list[dict[str, Any]] | None = None,
) -> Iterator[Update]:
    """Run a reconstruction, yielding GUI updates (at most ``max_rate`` array updates per second).

    Parameters
    ----------
    measurement : Measurement
        What to reconstruct.
    settings : RunSettings
        A snapshot owned by this run; ``settings.params`` is the live object the GUI may change.
    prior : Prior, optional
        Already loaded prior (else ``settings.prior`` / the modality's default).
    baseline : str, optional
        Classical method to run first for the side-by-side comparison (None: none). A hot-started run shows its
        start image instead (the classical image it starts from, computed once for both).
    max_rate : float
        Upper bound on array updates per second sent to the GUI.
    live_log : list, optional
        The GUI appends ``{"after_step", name: value}`` records of live parameter changes here;
        they are copied into the provenance.
    """
    from ..baselines import BASELINES
    from ..reconstruct import finish_diffusion_run, hot_start_params, prepare_run, provenance, resolve_settings
    from ..uncertainty import summarize

    t_start = time.perf_counter()
    c_start = time.thread_time()
    device = str(settings.device)
    modality = str(measurement.operator.get("modality", ""))
    if settings.method in BASELINES:
        res = _classical(measurement, settings.method, device, settings.baseline_params)
        op = measurement.build_operator(device)
        x = torch.from_numpy(res.complex_reconstruction if res.complex_reconstruction is not None
                             else res.reconstruction).to(device)
        rmap = _residual_map(op, x, measurement.to_tensor(device))
        yield Update(kind="final", step=1, n_steps=1, elapsed=time.perf_counter() - t_start, x0_hat=res.reconstruction,
                     mean=res.reconstruction, residual=res.residual, residual_map=rmap,
                     baseline=res.reconstruction, baseline_method=settings.method, provenance=res.provenance)
        return
    settings = resolve_settings(settings, measurement)  # "auto" → the data's start (the same live params)
    start_image = None
    if baseline:
        hot = settings.hot_start
        if hot:  # the image the run starts from: the fairest comparison, and computed once
            baseline = hot
        elif modality not in BASELINES.get(baseline, ((),))[0]:
            baseline = baseline_for(modality)
        res = _classical(measurement, baseline, device, hot_start_params(baseline, settings) if hot else None)
        yield Update(kind="baseline", baseline=res.reconstruction, baseline_method=baseline,
                     elapsed=time.perf_counter() - t_start, provenance=res.provenance)
        if hot:
            img = res.complex_reconstruction if res.complex_reconstruction is not None else res.reconstruction
            start_image = (torch.from_numpy(img), res.provenance.get("baseline_params_used") or {})
    problem, start, info = prepare_run(measurement, settings, prior, start_image=start_image)
    if info.get("warnings"):  # e.g. song/mcg on noisy data: say so before the user waits for the run
        yield Update(kind="warnings", elapsed=time.perf_counter() - t_start, provenance={"warnings": info["warnings"]})
    period = 1.0 / max(float(max_rate), 1e-3)
    last_sent = -1e9
    last = None
    try:
        for it in start():
            last = it
            now = time.perf_counter()
            if not it.done and now - last_sent < period:
                yield Update(kind="tick", step=it.step, n_steps=it.n_steps, nfe=it.nfe, elapsed=it.elapsed)
                continue
            last_sent = now
            if it.done:
                break
            x0 = it.x0_hat
            upd = Update(kind="iterate", step=it.step, n_steps=it.n_steps, nfe=it.nfe, elapsed=it.elapsed,
                         sigma=float(it.sigma), x_t=_mag(it.x_t[0]), x0_hat=_mag(x0[0]),
                         residual=float(it.data_residual.mean()))
            if x0.shape[0] > 1:  # streamed uncertainty: spread of the current estimates across samples
                s = summarize(x0.detach(), std_pool=settings.std_pool)
                upd.mean, upd.std = _mag(s["mean"]), _mag(s["std"])
            yield upd
        if last is None or not last.done:
            return
        samples, summary, extra = finish_diffusion_run(problem, last, info, t_start, settings.std_pool)
        extra.update({"live_parameter_changes": list(live_log or []), "frontend": "napari widget"})
        res_mean = extra["data_residual_of_mean"]
        mean_c = samples.mean(0)
        yield Update(
            kind="final", step=last.step, n_steps=last.n_steps, nfe=last.nfe, elapsed=last.elapsed,
            x_t=_mag(last.x0_hat[0]), x0_hat=_mag(last.x0_hat[0]), mean=_mag(summary["mean"]),
            std=_mag(summary["std"]), residual=res_mean,
            residual_map=_residual_map(problem.operator, mean_c.to(problem.device), problem.measurement),
            provenance=provenance(measurement, settings, extra), cpu_s=time.thread_time() - c_start,
        )
    finally:
        del problem
        if device.startswith("cuda") and torch.cuda.is_available():
            torch.cuda.empty_cache()
