"""Self-tuning of the prior/likelihood balance from the measurements alone (no ground truth).

- :func:`split_measurement`: hold out part of the measurement — a random fraction of the views (CT, PET; the
  remaining views keep their operator rows: the sub-operator is rebuilt from the angle list), k-space lines outside
  the fully sampled calibration region (MRI), pixels (denoising / inpainting).
- :func:`holdout_deviance`: how well an image predicts the held-out part (Gaussian or Poisson deviance per datum).
- :func:`auto_tune`: a short 1D/2D grid search over sampler parameters (DDS data weight ``gamma``, DPS ``zeta``,
  Song/MCG ``lam``, ``cg_iters``, hot-start ``t0``) scored by measurement splitting, the discrepancy principle
  (known Gaussian noise: residual ≈ noise level) or SURE (Gaussian noise, predicted-risk form). Settings run as one
  batch through the denoiser where the sampler allows it (:class:`BatchedPrior`), else one after another.

Everything reuses the core: :func:`napari_diffrecon.reconstruct.reconstruct` runs each setting, operators come from
:func:`napari_diffrecon.physics.build_operator` through the split measurement's spec.
"""

from __future__ import annotations

import copy
import itertools
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

__all__ = [
    "DEFAULT_GRIDS",
    "SEARCHABLE",
    "TuneResult",
    "TuneCancelledError",
    "Split",
    "split_measurement",
    "holdout_deviance",
    "discrepancy_ratio",
    "sure_score",
    "sure_probe",
    "auto_tune",
    "apply_tuning",
    "tuned_reconstruct",
    "BatchedPrior",
    "FOLLOWS_THE_RUN",
]

#: Default search grids (geometric for weights, a few values for counts and fractions).
DEFAULT_GRIDS: dict[str, list[float]] = {
    "gamma": [0.1, 0.3, 1.0, 3.0, 10.0],
    "zeta": [0.1, 0.3, 1.0, 3.0],
    "lam": [0.3, 0.6, 0.84, 1.0],
    "prior_weight": [0.3, 1.0, 3.0],
    "cg_iters": [1, 3, 5, 10],
    "t0": [0.2, 0.3, 0.4, 0.6],
}
SEARCHABLE = tuple(DEFAULT_GRIDS)
#: The parameter each sampler's prior/likelihood balance lives in (what ``auto_tune`` searches by default).
BALANCE_PARAM = {"dds": "gamma", "dps": "zeta", "mcg": "zeta", "song": "lam"}
#: Samplers whose denoiser calls run without gradients, so several settings can share one batch.
BATCHABLE = ("dds", "song", "ddim", "ddpm", "heun", "euler")
INTEGER_PARAMS = ("cg_iters", "n_steps")


# -- splitting -------------------------------------------------------------------------------------
@dataclass
class Split:
    """A measurement split into the part to reconstruct from and the held-out part.

    Attributes
    ----------
    train : Measurement
        The measurement without the held-out part (its own operator spec and noise model).
    operator : LinearOperator
        Forward model of the held-out part only.
    data : torch.Tensor
        The held-out data.
    likelihood : Likelihood
        Noise model of the held-out data (array backgrounds restricted to it).
    description : str
        What was held out (for provenance).
    """

    train: Any
    operator: Any
    data: torch.Tensor
    likelihood: Any
    description: str


def _calibration_columns(cols: np.ndarray) -> np.ndarray:
    """Boolean mask of the contiguous sampled lines around the k-space centre (ACS region)."""
    n = cols.size
    acs = np.zeros(n, bool)
    c = n // 2
    if not cols[c]:
        return acs
    lo, hi = c, c
    while lo - 1 >= 0 and cols[lo - 1]:
        lo -= 1
    while hi + 1 < n and cols[hi + 1]:
        hi += 1
    acs[lo : hi + 1] = True
    return acs


def _restrict_noise(noise: dict[str, Any], index: np.ndarray | None, axis: int) -> dict[str, Any]:
    out = dict(noise or {})
    b = out.get("background")
    if index is not None and isinstance(b, np.ndarray) and b.ndim >= 2:
        out["background"] = np.take(b, index, axis=axis)
    return out


def split_measurement(measurement: Any, fraction: float = 0.2, seed: int = 0) -> Split:
    """Hold out a random part of a measurement to score reconstructions of the rest.

    Parameters
    ----------
    measurement : Measurement
        CT/PET sinogram (views held out), MRI k-space (phase-encode lines outside the calibration
        region held out), denoising or inpainting data (pixels held out).
    fraction : float
        Fraction of the eligible measurements to hold out, in (0, 0.5].
    seed : int
        Seed of the random choice.

    Returns
    -------
    Split
    """
    from .io import Measurement
    from .physics import build_likelihood, build_operator

    if not 0 < fraction <= 0.5:
        raise ValueError(f"holdout fraction must be in (0, 0.5], got {fraction}; 0.1–0.3 is typical")
    rng = np.random.default_rng(seed)
    spec = dict(measurement.operator)
    modality = str(spec.get("modality", "")).lower()
    data = np.asarray(measurement.data)
    noise = dict(measurement.noise or {})
    if modality in ("ct", "pet"):
        angles = np.asarray(spec["angles_deg"], float)
        n = angles.size
        k = max(1, int(round(fraction * n)))
        if n - k < 2:
            raise ValueError(f"only {n} views: too few to hold any out; turn measurement splitting off (use 'sure')")
        held = np.sort(rng.choice(n, size=k, replace=False))
        keep = np.setdiff1d(np.arange(n), held)

        def sub(idx: np.ndarray) -> tuple[dict[str, Any], dict[str, Any]]:
            s = dict(spec, angles_deg=angles[idx].tolist())
            if s.get("attenuation") is not None:
                s["attenuation"] = np.asarray(s["attenuation"])[:, idx]
            return s, _restrict_noise(noise, idx, axis=-1)

        tr_spec, tr_noise = sub(keep)
        ho_spec, ho_noise = sub(held)
        train = Measurement(data[:, keep], tr_spec, tr_noise, measurement.ground_truth, dict(measurement.metadata))
        ho_data = data[:, held]
        desc = f"{k} of {n} views held out (angles {np.round(angles[held], 1).tolist()})"
    elif modality == "mri":
        mask = np.asarray(spec["mask"], float)
        if mask.ndim == 1:
            mask = np.broadcast_to(mask[None, :], tuple(spec["image_shape"])).copy()
        cols = mask.any(axis=0)
        acs = _calibration_columns(cols)
        eligible = np.flatnonzero(cols & ~acs)
        k = max(1, int(round(fraction * eligible.size)))
        if eligible.size < 2:
            raise ValueError("no sampled k-space lines outside the calibration region to hold out; use 'sure'")
        held = np.sort(rng.choice(eligible, size=k, replace=False))
        ho_cols = np.zeros(mask.shape[1], bool)
        ho_cols[held] = True
        tr_mask = mask * (~ho_cols)[None, :]
        ho_mask = mask * ho_cols[None, :]
        tr_spec, ho_spec = dict(spec, mask=tr_mask), dict(spec, mask=ho_mask)
        tr_noise = ho_noise = noise
        train = Measurement(data * tr_mask, tr_spec, tr_noise, measurement.ground_truth, dict(measurement.metadata))
        ho_data = data * ho_mask
        desc = f"{k} of {int(cols.sum())} sampled k-space lines held out (outside {int(acs.sum())} calibration lines)"
    elif modality in ("denoise", "inpaint"):
        shape = tuple(int(s) for s in spec["image_shape"])
        mask = np.asarray(spec["mask"], float) if modality == "inpaint" else np.ones(shape)
        measured = np.flatnonzero(mask.ravel() > 0)
        k = max(1, int(round(fraction * measured.size)))
        held = rng.choice(measured, size=k, replace=False)
        ho = np.zeros(mask.size)
        ho[held] = 1
        ho = ho.reshape(shape)
        tr_mask = mask * (1 - ho)
        tr_spec = {"modality": "inpaint", "image_shape": list(shape), "mask": tr_mask}
        ho_spec = {"modality": "inpaint", "image_shape": list(shape), "mask": ho}
        tr_noise = ho_noise = noise
        train = Measurement(data * tr_mask, tr_spec, tr_noise, measurement.ground_truth, dict(measurement.metadata))
        ho_data = data * ho
        desc = f"{k} of {measured.size} measured pixels held out"
    else:
        raise ValueError(f"measurement splitting does not know modality {modality!r}")
    ho_op = build_operator(ho_spec)
    ho_lik = build_likelihood(ho_noise)
    dtype = np.complex64 if np.iscomplexobj(ho_data) else np.float32
    ho_t = torch.from_numpy(np.ascontiguousarray(ho_data).astype(dtype))
    return Split(train, ho_op, ho_t, ho_lik, desc)


def _n_data(operator: Any, m: torch.Tensor) -> int:
    """Number of real-valued measured data (masked-out entries do not count; complex counts twice)."""
    mask = getattr(operator, "mask", None)
    if mask is not None:
        per = float((mask != 0).sum())
        rep = m.numel() / mask.numel()
        n = per * rep
    else:
        n = float(m.numel())
    return max(int(round(n * (2 if m.is_complex() else 1))), 1)


def holdout_deviance(operator: Any, x: torch.Tensor, m: torch.Tensor, likelihood: Any) -> torch.Tensor:
    """Deviance of measured data ``m`` given images ``x`` (per image, divided by the number of data).

    Gaussian: ``‖A x − m‖² / (σ² N)`` (≈ 1 + prediction error when ``x`` fits). Poisson emission and
    transmission counts: ``2 Σ [m log(m/ȳ) − (m − ȳ)] / N`` with ``ȳ`` the expected counts.
    """
    from .physics.likelihoods import PoissonLikelihood, TransmissionLikelihood

    x = x.to(operator.device)
    if isinstance(likelihood, PoissonLikelihood):
        x = torch.clamp(x.real if x.is_complex() else x, min=0)
    ax = operator.forward(x)
    m = m.to(ax.device)
    n_core = len(operator.data_shape)
    dims = tuple(range(ax.ndim - n_core, ax.ndim))
    n = _n_data(operator, m)
    if isinstance(likelihood, (PoissonLikelihood, TransmissionLikelihood)):
        ybar = likelihood.mean(ax)
        mlogm = torch.where(m > 0, m * torch.log(torch.clamp(m, min=1e-12) / ybar), torch.zeros_like(ybar))
        return (2 * (mlogm - (m - ybar))).sum(dim=dims) / n
    r = ax - m
    r2 = r.real**2 + r.imag**2 if r.is_complex() else r**2
    sigma = float(getattr(likelihood, "sigma", 1.0))
    return r2.sum(dim=dims) / (sigma**2 * n)


def discrepancy_ratio(measurement: Any, x: torch.Tensor) -> float:
    """Morozov's discrepancy ``‖A x − m‖² / (N σ²)`` for known Gaussian noise (1 = fits to the noise level)."""
    from .physics.likelihoods import GaussianLikelihood

    lik = measurement.build_likelihood()
    if not isinstance(lik, GaussianLikelihood):
        raise ValueError("the discrepancy principle needs Gaussian noise of known σ; use measurement splitting")
    op = measurement.build_operator()
    return float(holdout_deviance(op, x, measurement.to_tensor(), lik).mean())


def sure_score(
    operator: Any, m: torch.Tensor, sigma: float, ax: torch.Tensor, ax_perturbed: torch.Tensor, b: torch.Tensor,
    eps: float,
) -> float:
    """Predicted-risk SURE ``(‖A f(m) − m‖² − Nσ² + 2σ² div(A f)(m)) / (N σ²)`` for Gaussian noise.

    ``ax = A f(m)`` and ``ax_perturbed = A f(m + ε b)`` come from two runs with the same seed (common
    random numbers, so ``f`` is deterministic in the data); the divergence is the Monte-Carlo estimate
    ``bᵀ(A f(m + ε b) − A f(m)) / ε`` (Ramani et al. 2008). Unbiased for the projected risk
    ``E‖A f(m) − A x‖² / (Nσ²)``: lower is better.
    """
    n = _n_data(operator, m)
    d = ax_perturbed - ax
    dot = (b.conj() * d).real.sum() if b.is_complex() else (b * d).sum()
    div = float(dot) / eps * (2 if m.is_complex() else 1)
    r = ax - m
    r2 = float((r.real**2 + r.imag**2).sum() if r.is_complex() else (r**2).sum())
    return (r2 - n * sigma**2 + 2 * sigma**2 * div) / (n * sigma**2)


def sure_probe(operator: Any, m: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A Monte-Carlo probe ``b`` for SURE's divergence: unit Gaussian on the measured data (circular for complex)."""
    g = torch.Generator().manual_seed(int(seed))
    b = torch.randn(m.shape, generator=g)
    if m.is_complex():
        b = torch.complex(b, torch.randn(m.shape, generator=g)) / math.sqrt(2)
    mask = getattr(operator, "mask", None)
    if mask is not None:
        b = b * mask.cpu()
    return b


# -- batched settings ------------------------------------------------------------------------------
class BatchedPrior:
    """A proxy prior that lets several sampler runs (threads) share one denoiser call per step.

    Each run calls :meth:`denoise` with its own batch; the call blocks until every active run has
    submitted, then the last to arrive evaluates the wrapped prior once on the concatenation (per-image
    σ) and hands each run its slice. Runs leave with :meth:`leave` when they finish. Only for samplers
    that call the denoiser without gradients (``BATCHABLE``); results equal separate calls up to float
    rounding.
    """

    def __init__(self, prior: Any, n_runs: int, timeout: float = 600.0) -> None:
        self._prior = prior
        self._active = int(n_runs)
        self._cv = threading.Condition()
        self._pending: dict[int, tuple[torch.Tensor, Any]] = {}
        self._results: dict[int, torch.Tensor] = {}
        self._error: BaseException | None = None
        self._timeout = timeout
        self._local = threading.local()
        self.n_calls = 0

    def bind(self, index: int) -> None:
        """Give the calling thread's run its place in the shared batch (its index in the grid).

        Without it the batch is ordered by thread identities, which change from one search to the next: the float
        rounding of a batched network call depends on where an image sits, so the same search could give different
        last bits. (NaN once seen in such searches came from the runs moving the shared prior at once, a race that
        :meth:`NetworkPrior.to` now excludes, not from the order.)
        """
        self._local.index = int(index)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._prior, name)

    @property
    def precision(self) -> str:
        """The wrapped prior's network precision (setting it here sets it there: the wrapper has no network)."""
        return getattr(self._prior, "precision", "float32")

    @precision.setter
    def precision(self, value: str) -> None:
        self._prior.precision = value

    def to(self, device: Any) -> BatchedPrior:
        self._prior = self._prior.to(device)
        return self

    def _flush(self) -> None:
        keys = sorted(self._pending)
        xs = [self._pending[k][0] for k in keys]
        sig = [
            torch.as_tensor(self._pending[k][1], dtype=xs[i].dtype, device=xs[i].device).reshape(-1).expand(
                xs[i].shape[0]
            )
            for i, k in enumerate(keys)
        ]
        try:
            with torch.no_grad():
                out = self._prior.denoise(torch.cat(xs), torch.cat(sig))
            self.n_calls += 1
            start = 0
            for k, x in zip(keys, xs, strict=False):
                self._results[k] = out[start : start + x.shape[0]]
                start += x.shape[0]
        except BaseException as e:  # noqa: BLE001 - handed to every waiting run
            self._error = e
        self._pending.clear()
        self._cv.notify_all()

    def denoise(self, x_t: torch.Tensor, sigma: Any) -> torch.Tensor:
        key = getattr(self._local, "index", None)
        if key is None:  # a run that did not :meth:`bind`: keyed by its thread (identities are far above indices)
            key = threading.get_ident()
        with self._cv:
            if self._error is not None:
                raise RuntimeError("another run in the batch failed") from self._error
            self._pending[key] = (x_t, sigma)
            if len(self._pending) >= self._active:
                self._flush()
            ok = self._cv.wait_for(lambda: key in self._results or self._error is not None, timeout=self._timeout)
            if self._error is not None:
                raise RuntimeError("the batched denoiser failed") from self._error
            if not ok:
                raise TimeoutError("batched denoiser timed out waiting for the other runs")
            return self._results.pop(key)

    def leave(self) -> None:
        """A run has finished (or failed): stop waiting for it."""
        with self._cv:
            self._active -= 1
            if self._active > 0 and self._pending and len(self._pending) >= self._active:
                self._flush()


def _run_batched(jobs: list[Callable[[Any], Any]], prior: Any) -> list[Any]:
    """Run ``job(shared_prior)`` for each job in its own thread, sharing one denoiser batch per step."""
    bp = BatchedPrior(prior, len(jobs))
    results: list[Any] = [None] * len(jobs)
    errors: list[BaseException | None] = [None] * len(jobs)

    def work(i: int) -> None:
        bp.bind(i)
        try:
            results[i] = jobs[i](bp)
        except BaseException as e:  # noqa: BLE001
            errors[i] = e
        finally:
            bp.leave()

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for e in errors:
        if e is not None:
            raise e
    return results


# -- the search ------------------------------------------------------------------------------------
class TuneCancelledError(RuntimeError):
    """The search was cancelled (``cancel`` event set)."""


@dataclass
class TuneResult:
    """Outcome of :func:`auto_tune`: the chosen values, the score curve and how it was obtained."""

    best: dict[str, float]
    grid: list[dict[str, float]]
    scores: list[float]
    criterion: str
    method: str
    details: dict[str, Any] = field(default_factory=dict)
    wall_time_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable record for provenance."""
        return {
            "best": self.best,
            "grid": self.grid,
            "scores": [float(s) for s in self.scores],
            "criterion": self.criterion,
            "method": self.method,
            "wall_time_s": self.wall_time_s,
            "edge_note": self.edge_note(),
            **self.details,
        }

    def curve_text(self) -> str:
        """The score curve as a small text table (best row marked), and :meth:`edge_note` when there is one."""
        keys = list(self.grid[0]) if self.grid else []
        lines = ["  ".join(f"{k:>9}" for k in keys) + f"  {self.criterion:>12}"]
        for g, s in zip(self.grid, self.scores, strict=False):
            mark = "  ←" if g == self.best else ""
            lines.append("  ".join(f"{g[k]:>9.4g}" for k in keys) + f"  {s:>12.5g}{mark}")
        note = self.edge_note()
        return "\n".join(lines + ([note] if note else []))

    def edge_note(self) -> str | None:
        """A warning when the held-out scores are flat (splitting: under :data:`FLAT_SPLIT` relative spread), so the
        data hardly decide, or when the chosen value is the grid's lowest or highest (of ≥ 3): the optimum may lie
        beyond it.

        Returns
        -------
        str or None
            The note, or None when the curve decides and every chosen value is inside the grid.
        """
        scores = [float(v) for v in self.scores]
        if self.criterion == "split" and len(scores) >= 3 and min(scores) > 0:
            spread = (max(scores) - min(scores)) / min(scores)
            if spread < FLAT_SPLIT:
                return (f"note: the held-out scores differ by {spread:.2%} across the grid: the data hardly decide "
                        "between these values (each predicts the held-out data about as well); the pick is weak "
                        "evidence, and the tuned default is as good a choice")
        for k, v in self.best.items():
            values = sorted({float(g[k]) for g in self.grid if k in g})
            if len(values) < 3 or float(v) not in (values[0], values[-1]):
                continue
            end = "lowest" if float(v) == values[0] else "highest"
            return (f"note: the chosen {k} ({float(v):g}) is the grid's {end} value, so the best may lie beyond it; "
                    f"widen the grid (e.g. --auto-params {k}=…) or check the curve")
        return None


#: Relative spread of the held-out scores below which a split search says it hardly decided (PET's 3-step runs in the
#: workbench: 0.05 %; MRI 4× at 30 steps, where splitting picked 1.4 dB off once: 3 %, README "Self-tuning").
FLAT_SPLIT = 0.005

#: Default grids that follow the run's own value when it lies outside them (the tuned DPS step is ζ 6 on CT and 40 on
#: PET, beyond the MRI-centred 0.1–3): the grid's shape is kept and its scale moved so the value is its third point.
FOLLOWS_THE_RUN = ("zeta",)


def _default_grid(name: str, current: float | None) -> list[float] | None:
    grid = DEFAULT_GRIDS.get(name)
    if grid is None or name not in FOLLOWS_THE_RUN or current is None or not math.isfinite(current) or current <= 0:
        return grid
    if grid[0] <= current <= grid[-1]:
        return grid
    return [float(f"{v * current / grid[2]:.3g}") for v in grid]


def _grid(params: dict[str, Sequence[float]] | str | Sequence[str] | None, method: str,
          current: Any = None) -> list[dict[str, float]]:
    if params is None:
        params = BALANCE_PARAM.get(method, "gamma")
    if isinstance(params, str):
        params = [params]
    if not isinstance(params, dict):
        params = {p: _default_grid(p, getattr(current, p, None)) for p in params}
    for k, v in params.items():
        if k not in SEARCHABLE:
            raise ValueError(f"cannot tune {k!r}; searchable parameters: {', '.join(SEARCHABLE)}")
        if v is None or len(v) == 0:
            raise ValueError(f"no values to try for {k!r}")
    keys = list(params)
    out = []
    for combo in itertools.product(*(params[k] for k in keys)):
        out.append({k: (int(v) if k in INTEGER_PARAMS else float(v)) for k, v in zip(keys, combo, strict=False)})
    return out


def apply_tuning(settings: Any, values: dict[str, float]) -> Any:
    """A copy of ``settings`` with the tuned parameter values."""
    if settings.params is None:
        raise ValueError("these settings hold no sampler parameters yet (RunSettings' default: the tuned values for "
                         "the data); resolve them first: napari_diffrecon.reconstruct.resolve_settings(settings, "
                         "measurement)")
    params = replace(settings.params, **values)
    return replace(settings, params=params)


def choose_criterion(measurement: Any) -> tuple[str, str]:
    """The ``"auto"`` criterion for these data, and why: the discrepancy principle for Gaussian noise of known σ,
    measurement splitting otherwise (counts, transmission data, or a σ that is a reader's assumption).

    With DDS on the benchmark's real slices (three noise draws each; ``benchmarks/tuning.py``, README "Self-tuning")
    the discrepancy principle landed 0.07–0.15 dB below the ground truth's best γ on CT 23 views, 0.36–0.41 on MRI 4×
    and 0.47–0.66 with 8 coils; splitting 0.48–0.50, 0.36–1.42 and 0–3.93 (its held-out k-space lines are mostly
    noise, and the score barely moves with γ).
    """
    from .physics.likelihoods import GaussianLikelihood
    from .reconstruct import noise_is_assumed

    if not isinstance(measurement.build_likelihood(), GaussianLikelihood):
        return "split", "counts / transmission data: measurement splitting (any noise model)"
    if noise_is_assumed(measurement.noise):
        return "split", "the noise σ is an assumption, not a property of the data: measurement splitting"
    return "discrepancy", "Gaussian noise of known σ: the discrepancy principle"


def auto_tune(
    measurement: Any,
    settings: Any,
    prior: Any = None,
    params: dict[str, Sequence[float]] | str | Sequence[str] | None = None,
    criterion: str = "auto",
    holdout: float = 0.2,
    n_splits: int = 1,
    seed: int = 0,
    batched: bool | None = None,
    progress: Callable[[float, int, str], Any] | None = None,
    cancel: threading.Event | None = None,
) -> TuneResult:
    """Pick sampler parameters from the measurements alone.

    Parameters
    ----------
    measurement : Measurement
        The data to reconstruct.
    settings : RunSettings
        The run to tune (method, prior, hot start, the other parameters).
    prior : Prior, optional
        Already-loaded prior (else loaded once from the settings).
    params : str, list of str or dict
        What to search: a parameter name (default grid, see ``DEFAULT_GRIDS``; ζ's follows the run's own value
        when it lies outside it, see ``FOLLOWS_THE_RUN``), several names (their
        product: a 2D search), or ``{name: values}``. Default: the method's balance parameter
        (DDS ``gamma``, DPS/MCG ``zeta``, Song ``lam``).
    criterion : {"auto", "split", "discrepancy", "sure"}
        ``auto`` (default): ``discrepancy`` for Gaussian noise of known σ, else ``split``
        (:func:`choose_criterion`). ``split``: held-out deviance (any noise model). ``discrepancy``: the setting
        whose residual is closest to the known Gaussian noise level (``|log ratio|``). ``sure``: predicted-risk SURE
        (Gaussian noise, two runs per setting).
    holdout : float
        Fraction held out per split.
    n_splits : int
        Independent random splits averaged (more = smoother curve, more cost).
    seed : int
        Seeds the splits (the runs use ``settings.seed``).
    batched : bool, optional
        Run all settings as one batch through the denoiser (default: when the sampler allows).
    progress : callable, optional
        ``progress(done, total, message)``: ``done`` runs (fractional while they step) of ``total``.
    cancel : threading.Event, optional
        Set it to stop the search (raises :class:`TuneCancelledError` at the runs' next step).

    Returns
    -------
    TuneResult
    """
    from .reconstruct import reconstruct
    from .samplers import SAMPLERS

    t_start = time.perf_counter()
    if settings.method not in SAMPLERS:
        raise ValueError(f"auto-tuning is for diffusion samplers ({', '.join(SAMPLERS)}), not {settings.method!r}")
    if criterion not in ("auto", "split", "discrepancy", "sure"):
        raise ValueError(f"unknown criterion {criterion!r}; use 'auto', 'split', 'discrepancy' or 'sure'")
    why = None
    if criterion == "auto":
        criterion, why = choose_criterion(measurement)
    if criterion in ("discrepancy", "sure"):  # said before the search, not after its runs
        from .physics.likelihoods import GaussianLikelihood

        if not isinstance(measurement.build_likelihood(), GaussianLikelihood):
            raise ValueError(f"the {'discrepancy principle' if criterion == 'discrepancy' else 'SURE'} needs "
                             "Gaussian noise of known σ; use criterion 'split' (measurement splitting) for counts")
    from .reconstruct import resolve_settings

    settings = resolve_settings(settings, measurement)  # no params: the tuned values for the data are the start
    grid = _grid(params, settings.method, settings.params)
    if prior is None:
        prior = _load_prior_for(measurement, settings)
    # The search runs without test-time adaptation (samplers/adapt.py): the balance γ/ζ is a property of the data
    # and the prior, batched runs share one network, and adapting every grid point would multiply the cost.
    from .samplers.adapt import ADAPT_DEFAULTS

    adapt_keys = [k for k in settings.params.extra if k in ADAPT_DEFAULTS]
    if adapt_keys:
        from dataclasses import replace

        extra = {k: v for k, v in settings.params.extra.items() if k not in adapt_keys}
        settings = replace(settings, params=replace(settings.params, extra=extra))
    if batched is None:
        batched = settings.method in BATCHABLE and len(grid) > 1
    if batched and settings.method not in BATCHABLE:
        raise ValueError(f"{settings.method} needs gradients through the denoiser; run it with batched=False")

    def image_of(result: Any) -> torch.Tensor:
        arr = result.complex_reconstruction if result.complex_reconstruction is not None else result.reconstruction
        return torch.from_numpy(np.asarray(arr))

    n_passes = n_splits if criterion == "split" else 2 if criterion == "sure" else 1
    total = n_passes * len(grid)
    state = {"done": 0}
    lock = threading.Lock()
    steps: dict[int, float] = {}

    def callback(key: int, it: Any) -> None:
        if cancel is not None and cancel.is_set():
            raise TuneCancelledError("auto-tune cancelled")
        if progress is None:
            return
        with lock:
            steps[key] = it.step / max(it.n_steps, 1)
            # a run at its last step counts as almost done until it returns (dropping it made the count go back)
            done = state["done"] + sum(min(v, 0.999) for v in steps.values())
        progress(done, total, f"{criterion}: {int(done)}/{total} runs")

    def run_all(meas: Any) -> list[torch.Tensor]:
        """Reconstruct ``meas`` with every setting of the grid (one batch or sequentially)."""

        def job(k: int, g: dict[str, float]) -> Callable[[Any], torch.Tensor]:
            def run(p: Any) -> torch.Tensor:
                r = reconstruct(meas, apply_tuning(settings, g), prior=p, callback=lambda it: callback(k, it))
                with lock:
                    state["done"] += 1
                    steps.pop(k, None)
                return image_of(r)

            return run

        jobs = [job(k, g) for k, g in enumerate(grid)]
        if batched:
            return _run_batched(jobs, prior)
        return [j(prior) for j in jobs]

    scores = np.zeros(len(grid))
    details: dict[str, Any] = {"holdout": holdout, "n_splits": n_splits, "batched": bool(batched),
                               "adaptation_off_during_search": bool(adapt_keys)}
    if why is not None:
        details["criterion_chosen"] = f"auto: {why}"
    if criterion == "split":
        splits = [split_measurement(measurement, holdout, seed + k) for k in range(n_splits)]
        details["split"] = [s.description for s in splits]
        for s in splits:
            images = run_all(s.train)
            for i, x in enumerate(images):
                scores[i] += float(holdout_deviance(s.operator, x[None], s.data, s.likelihood)[0]) / n_splits
    elif criterion == "discrepancy":
        images = run_all(measurement)
        ratios = [discrepancy_ratio(measurement, x[None]) for x in images]
        details["discrepancy_ratio"] = ratios
        scores[:] = [abs(math.log(max(r, 1e-12))) for r in ratios]
    else:
        lik = measurement.build_likelihood()  # Gaussian: refused before the search otherwise
        op = measurement.build_operator()
        m = measurement.to_tensor()
        sigma = float(lik.sigma)
        eps = 0.5 * sigma
        b = sure_probe(op, m, seed + 7919)
        pert = copy.copy(measurement)
        pert.data = (m + eps * b).numpy()
        plain = run_all(measurement)
        perturbed = run_all(pert)
        for i, (x, xp) in enumerate(zip(plain, perturbed, strict=False)):
            scores[i] = sure_score(op, m, sigma, op.forward(x), op.forward(xp), b, eps)
    if progress is not None:
        progress(total, total, "done")
    best = grid[int(np.argmin(scores))]
    return TuneResult(
        best=dict(best),
        grid=grid,
        scores=[float(s) for s in scores],
        criterion=criterion,
        method=settings.method,
        details=details,
        wall_time_s=time.perf_counter() - t_start,
    )


def _load_prior_for(measurement: Any, settings: Any) -> Any:
    from .priors import default_prior_for, load_prior

    if settings.prior:
        return load_prior(settings.prior, settings.device)
    op = measurement.build_operator()
    name = default_prior_for(op.modality, op.is_complex)
    if name is None:
        raise ValueError(f"no shipped prior for {op.modality}; pass prior= or set settings.prior")
    return load_prior(name, settings.device)


def tuned_reconstruct(
    measurement: Any,
    settings: Any,
    prior: Any = None,
    criterion: str = "auto",
    params: dict[str, Sequence[float]] | str | Sequence[str] | None = None,
    progress: Callable[[float, int, str], Any] | None = None,
    **kw: Any,
) -> tuple[Any, TuneResult]:
    """:func:`auto_tune`, then :func:`napari_diffrecon.reconstruct.reconstruct` with the chosen values.

    The search (chosen values, grid, score curve, criterion) is stored in the result's provenance under
    ``"auto_tune"``. ``kw`` goes to :func:`auto_tune` (``holdout``, ``n_splits``, ``seed``, ``batched``).
    Used by ``napari-diffrecon reconstruct --auto``.
    """
    from .reconstruct import reconstruct, resolve_settings

    settings = resolve_settings(settings, measurement)
    if prior is None:
        prior = _load_prior_for(measurement, settings)
    tune_settings = replace(settings, n_samples=1, keep_samples=False)
    res = auto_tune(measurement, tune_settings, prior=prior, params=params, criterion=criterion, progress=progress,
                    **kw)
    result = reconstruct(measurement, apply_tuning(settings, res.best), prior=prior)
    result.provenance["auto_tune"] = res.to_dict()
    return result, res
