"""Memory budgets for volume runs: what a run needs, how many slices the denoiser takes at once.

A volume run keeps a few volume-sized arrays (the state, the estimate, CG and ADMM vectors, the
measurement) for the whole run and pushes slices through the 2D denoiser in chunks. The plan
picks the largest chunk that keeps ``fixed + chunk · per_slice`` under the budget, and refuses up
front — naming the fix — when even the volume-sized arrays don't fit (then reconstruct in
overlapping slabs of the size it names, or raise the budget).
"""

from __future__ import annotations

import math
import re
import threading
from dataclasses import asdict, dataclass
from typing import Any

import torch

__all__ = [
    "VolumeMemoryError",
    "MemoryPlan",
    "parse_bytes",
    "detect_budget",
    "denoiser_bytes_per_slice",
    "plan_memory",
    "Slab",
    "plan_slabs",
    "plan_volume_slabs",
    "STATE_VOLUMES",
    "DEFAULT_HALO",
]

# Volume-sized arrays alive at once during a step (per posterior sample, per channel):
# u, x0 (model), image, data-step result, CG x/r/p/Ap/rhs, ADMM w/u/Dz x, DDIM temporaries (2),
# the yielded x_t and x0_hat, and the slab assembly buffer.
STATE_VOLUMES = 18
# Measurement-sized arrays: m, A x and its temporaries in the CG normal operator, PWLS weights.
DATA_VOLUMES = 5
# Slab overlap per side with z-TV when none is given (capped so that at least half of a slab is core).
DEFAULT_HALO = 4


class VolumeMemoryError(MemoryError):
    """A volume run would not fit its memory budget; the message says what would.

    Attributes
    ----------
    max_slab_slices : int
        The largest slab (in slices) that fits the budget; 0 when not even a thin slab fits.
    """

    def __init__(self, message: str, max_slab_slices: int = 0) -> None:
        super().__init__(message)
        self.max_slab_slices = int(max_slab_slices)


_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1024**2, "mb": 1024**2, "mib": 1024**2,
          "g": 1024**3, "gb": 1024**3, "gib": 1024**3, "t": 1024**4, "tb": 1024**4, "tib": 1024**4}


def parse_bytes(value: Any) -> int:
    """``"16GB"``, ``"512 MiB"``, ``2e9`` → bytes (binary units: 1 GB = 1024³ bytes)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value <= 0 or not math.isfinite(value):
            raise ValueError(f"memory budget must be positive, got {value}")
        return int(value)
    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read memory budget {value!r}; write e.g. '16GB', '512MB' or a number of bytes")
    out = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if out <= 0:
        raise ValueError(f"memory budget must be positive, got {value!r}")
    return out


def _gib(n: float) -> str:
    if n >= 1024**3 / 10:
        return f"{n / 1024**3:.2f} GiB"
    return f"{n / 1024**2:.0f} MiB" if n >= 1024**2 else f"{n / 1024:.0f} KiB"


def detect_budget(device: str | torch.device = "cpu", fraction: float = 0.7) -> int:
    """A default budget: ``fraction`` of the device's free memory (CUDA) or of available RAM (CPU)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return int(free * fraction)
    try:
        import psutil

        return int(psutil.virtual_memory().available * fraction)
    except ImportError:  # pragma: no cover - psutil comes with distributed
        import os

        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES") * fraction)


def denoiser_bytes_per_slice(prior: Any, channels: int, shape: tuple[int, int]) -> int:
    """Activation memory of one slice through the prior's denoiser (an upper bound).

    Runs the network once on one blank slice at a moderate σ and sums the bytes of every module's
    output (in inference only a few are alive at once, so this over-counts); analytic priors count
    a few image copies.
    """
    net = getattr(prior, "network", None)
    image = channels * shape[0] * shape[1] * 4
    if net is None:
        return 6 * image
    total = [0]
    me = threading.get_ident()

    def hook(_m: Any, _i: Any, out: Any) -> None:
        if threading.get_ident() != me:  # another run's call on the same (shared) network while the hooks are on
            return
        for t in out if isinstance(out, (tuple, list)) else [getattr(out, "sample", out)]:
            if isinstance(t, torch.Tensor):
                total[0] += t.numel() * t.element_size()

    handles = [m.register_forward_hook(hook) for m in net.modules() if m is not net]
    try:
        dev = next(net.parameters()).device
        with torch.no_grad():
            prior.denoise(torch.zeros(1, channels, *shape, device=dev), 1.0)
    finally:
        for h in handles:
            h.remove()
    return int(total[0] + 6 * image)


def _operator_bytes(operator: Any) -> int:
    """Bytes held by an operator's tensors (CT/PET sparse system matrices included)."""
    seen: set[int] = set()
    total = 0

    def add(t: Any) -> None:
        nonlocal total
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            if t.layout == torch.sparse_csr:
                total += sum(a.numel() * a.element_size() for a in (t.crow_indices(), t.col_indices(), t.values()))
            else:
                total += t.numel() * t.element_size()

    def walk(obj: Any, depth: int = 0) -> None:
        if depth > 3:
            return
        if hasattr(obj, "matrices") and obj.__class__.__name__ == "ParallelBeamCT":
            for t in obj.matrices:
                add(t)
        for v in vars(obj).values():
            if isinstance(v, torch.Tensor):
                add(v)
            elif isinstance(v, (tuple, list)):
                for t in v:
                    add(t)
            elif hasattr(v, "_forward"):
                walk(v, depth + 1)

    walk(operator)
    return total


@dataclass
class MemoryPlan:
    """How a volume run uses its budget (bytes).

    Attributes
    ----------
    budget : int
        The budget the plan respects.
    fixed : int
        Volume-sized arrays, measurement, operator and network weights (alive all run).
    per_slice : int
        Extra memory per slice in a denoiser/operator chunk.
    chunk_slices : int
        Slices per denoiser batch (``fixed + chunk_slices · per_slice ≤ budget``).
    n_slices : int
        Slices in the volume (or slab) planned for.
    """

    budget: int
    fixed: int
    per_slice: int
    chunk_slices: int
    n_slices: int

    @property
    def peak(self) -> int:
        """Planned peak: ``fixed + chunk_slices · per_slice``."""
        return self.fixed + self.chunk_slices * self.per_slice

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, with the planned peak."""
        return {**asdict(self), "peak": self.peak}


def plan_memory(
    operator: Any, prior: Any, budget: int | str, n_samples: int = 1, per_slice_denoiser: int | None = None
) -> MemoryPlan:
    """Plan a volume run under ``budget`` bytes, or raise :class:`VolumeMemoryError` naming the fix.

    Parameters
    ----------
    operator : SliceWiseOperator
        The volume (or slab) operator.
    prior : Prior
        The 2D prior (its network's activation size sets the per-slice cost).
    budget : int or str
        Bytes, or a string like ``"16GB"``.
    n_samples : int
        Posterior samples run as one batch.
    per_slice_denoiser : int, optional
        Measured denoiser bytes per slice (default: :func:`denoiser_bytes_per_slice`).
    """
    budget = parse_bytes(budget)
    d, h, w = operator.image_shape
    ch = 2 if operator.is_complex else 1
    img = h * w * 4 * ch
    data = int(math.prod(operator.base.data_shape)) * 4 * ch
    weights = 0
    net = getattr(prior, "network", None)
    if net is not None:
        weights = sum(p.numel() * p.element_size() for p in net.parameters())
    op_bytes = _operator_bytes(operator)
    per_slice_state = n_samples * (STATE_VOLUMES * img + DATA_VOLUMES * data)
    fixed = d * per_slice_state + op_bytes + weights
    den = per_slice_denoiser if per_slice_denoiser is not None else denoiser_bytes_per_slice(prior, ch, (h, w))
    per_slice = den + 3 * data  # activations + the operator's temporaries for a chunk of slices
    room = budget - fixed
    if room < per_slice:
        overhead = op_bytes + weights + per_slice
        fit = (budget - overhead) // per_slice_state if budget > overhead else 0
        need = fixed + per_slice
        if fit >= 2:
            hint = (
                f"reconstruct it in overlapping slabs of at most {int(fit)} slices (slab_slices={int(fit)}, "
                f"CLI --slab {int(fit)}), or raise the budget to {_gib(need)}"
            )
        else:
            hint = (
                f"raise the budget to at least {_gib(need)}; even one slice needs {_gib(overhead + per_slice_state)} "
                "(operator, network and one slice's state)"
            )
        raise VolumeMemoryError(
            f"a {d}×{h}×{w} volume needs {_gib(need)} but the memory budget is {_gib(budget)}: {hint}",
            int(fit) if fit >= 2 else 0,
        )
    chunk = int(min(d * n_samples, room // per_slice))
    return MemoryPlan(budget=budget, fixed=int(fixed), per_slice=int(per_slice), chunk_slices=chunk, n_slices=d)


@dataclass(frozen=True)
class Slab:
    """Slices ``start:stop`` are reconstructed; ``core_start:core_stop`` of them are kept."""

    start: int
    stop: int
    core_start: int
    core_stop: int

    def to_dict(self) -> dict[str, int]:
        """JSON-ready."""
        return {"start": self.start, "stop": self.stop, "core_start": self.core_start, "core_stop": self.core_stop}


def plan_slabs(n_slices: int, slab_slices: int | None, halo: int = 0) -> list[Slab]:
    """Cover ``n_slices`` with slabs of at most ``slab_slices`` slices overlapping by ``halo`` on each side.

    Every slice is in exactly one core; each slab reaches ``halo`` slices beyond its core where
    the volume allows (so cores are ``slab_slices − 2·halo`` slices).
    """
    if slab_slices is None or slab_slices >= n_slices:
        return [Slab(0, n_slices, 0, n_slices)]
    slab_slices, halo = int(slab_slices), max(int(halo), 0)
    core = slab_slices - 2 * halo
    if core < 1:
        raise VolumeMemoryError(
            f"slabs of {slab_slices} slices leave no core with a halo of {halo} slices on each side: "
            f"use slabs of at least {2 * halo + 1} slices or a smaller halo"
        )
    out = []
    for c0 in range(0, n_slices, core):
        c1 = min(c0 + core, n_slices)
        s0, s1 = max(c0 - halo, 0), min(c1 + halo, n_slices)
        out.append(Slab(s0, s1, c0, c1))
    return out


def plan_volume_slabs(
    operator: Any,
    prior: Any,
    budget: int | str,
    n_samples: int = 1,
    slab_slices: int | str | None = None,
    halo: int | None = None,
    ztv: float = 0.0,
    check: bool = True,
) -> tuple[list[Slab], int, MemoryPlan | None]:
    """The slabs a volume runs in under ``budget``, or :class:`VolumeMemoryError` naming the fix.

    The one slab planner of the in-process runner (:func:`~napari_diffrecon.volume.stream_volume`) and the
    distributed one (:func:`napari_diffrecon.distributed.reconstruct_folder`).

    Parameters
    ----------
    operator : SliceWiseOperator
        The whole volume's operator.
    prior : Prior
        The 2D prior (sets the per-slice memory).
    budget : int or str
        Memory budget (bytes or e.g. ``"16GB"``).
    n_samples : int
        Posterior samples run as one batch.
    slab_slices : int, "auto" or None
        None: the whole volume, which must fit (else the error names the slab size that would);
        ``"auto"``: the whole volume when it fits, else the largest slab that fits; an int: slabs of that
        many slices.
    halo : int, optional
        Overlap slices per side. Default: :data:`DEFAULT_HALO` with z-TV (``ztv > 0``), 0 without; for
        slabs the default is capped at a quarter of a slab so that at least half of each slab is core
        (an explicit ``halo`` is kept for an int ``slab_slices``, capped the same way for ``"auto"``).
    ztv : float
        The run's z-TV weight (only its sign matters here).
    check : bool
        Verify that the (first, largest) slab fits ``budget`` (False: only ``"auto"`` consults the budget,
        e.g. for an existing cluster whose workers' memory is unknown here).

    Returns
    -------
    slabs : list of Slab
        Every slice in exactly one core.
    halo : int
        The overlap used.
    plan : MemoryPlan or None
        The whole volume's plan when it is run as one slab and was planned.
    """
    d = int(operator.n_slices)
    given = halo is not None
    halo = int(halo) if given else (DEFAULT_HALO if ztv > 0 else 0)
    if slab_slices is None or slab_slices == "auto":
        if slab_slices is None and not check:
            return plan_slabs(d, None), halo, None
        try:
            return plan_slabs(d, None), halo, plan_memory(operator, prior, budget, n_samples)
        except VolumeMemoryError as e:  # the message names the slab size that would fit
            if slab_slices is None or not e.max_slab_slices:
                raise
            slab_slices, given = e.max_slab_slices, False
    size = int(slab_slices)
    if not given:
        halo = min(halo, max(size - 1, 0) // 4)  # keep at least half of each slab as core
    slabs = plan_slabs(d, size, halo)
    if check:
        first = max(slabs, key=lambda s: s.stop - s.start)
        plan_memory(operator.slab(first.start, first.stop), prior, budget, n_samples)  # fits, or says why
    return slabs, halo, None
