"""The ``Prior``: a denoiser ``D(x_σ; σ) → x0_hat`` (Tweedie estimate) and its score, in model units.

Samplers talk to every prior the same way, whatever schedule or parametrisation it was trained
with: ``x_σ = x0 + σ ε`` (variance-exploding form; see :mod:`.schedules` for the VP mapping).
"""

from __future__ import annotations

import contextlib
import os
import threading
import weakref
from abc import ABC, abstractmethod
from pathlib import Path

import torch

from .._notices import quiet_torch_notices
from .card import CardError, ModelCard
from .network import build_network
from .schedules import Schedule, VPSchedule, get_schedule, pfgmpp_noise, sigma_to_alpha_bar

__all__ = [
    "Prior",
    "NetworkPrior",
    "GaussianPrior",
    "save_prior",
    "load_prior_file",
    "complex_to_channels",
    "channels_to_complex",
    "edm_noise_label",
    "PRECISIONS",
    "check_precision",
]

#: Network evaluation precisions: name -> autocast dtype (None = full float32).
PRECISIONS: dict[str, torch.dtype | None] = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_precision(precision: str) -> str:
    """Validate a network-evaluation precision name (see :data:`PRECISIONS`) and return it."""
    if precision not in PRECISIONS:
        raise ValueError(
            f"unknown network precision {precision!r}; use one of {', '.join(PRECISIONS)} (bfloat16: up to 1.6× less "
            "CPU time on CPUs with AVX512-BF16/AMX; float16: meant for GPUs, slow on most CPUs)"
        )
    return precision


def complex_to_channels(x: torch.Tensor) -> torch.Tensor:
    """``(*b, H, W)`` complex → ``(*b, 2, H, W)`` real (real, imag)."""
    return torch.stack([x.real, x.imag], dim=-3)


def channels_to_complex(x: torch.Tensor) -> torch.Tensor:
    """``(*b, 2, H, W)`` real → ``(*b, H, W)`` complex."""
    return torch.complex(x[..., 0, :, :], x[..., 1, :, :])


def _sigma_tensor(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """σ as a tensor broadcastable against ``x`` of shape (B, C, H, W)."""
    s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if s.ndim == 0:
        s = s.expand(x.shape[0])
    if s.shape[0] != x.shape[0]:
        raise ValueError(f"sigma has {s.shape[0]} values for a batch of {x.shape[0]} images")
    return s.reshape(-1, *([1] * (x.ndim - 1)))


def _has_hooks(m: torch.nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def _global_hooks() -> bool:
    from torch.nn.modules import module as _m

    return bool(_m._global_forward_hooks or _m._global_forward_pre_hooks or _m._global_backward_hooks
                or _m._global_backward_pre_hooks)


def edm_noise_label(sigma: torch.Tensor) -> torch.Tensor:
    """The network's noise input: 250 · ln σ (EDM's c_noise = ln σ / 4, scaled for the sinusoidal embedding)."""
    return 250.0 * torch.log(torch.clamp(sigma, min=1e-12))


class Prior(ABC):
    """An image prior given by its denoiser.

    Attributes
    ----------
    channels : int
        1 (real) or 2 (complex as real/imag).
    card : ModelCard or None
        Provenance and normalisation (None for analytic priors).
    schedule : Schedule
        The schedule the prior was trained with; samplers may use another.
    aug_dim : float or None
        PFGM++ augmentation dimension D (None: diffusion). Only the start state of a run
        depends on it (:meth:`draw_noise`); denoiser and samplers are shared through ``r = σ√D``.
    """

    channels: int = 1
    card: ModelCard | None = None
    schedule: Schedule
    aug_dim: float | None = None
    #: Precision of the network's evaluation (:data:`PRECISIONS`); analytic priors ignore it.
    precision: str = "float32"
    #: How far from 0 a typical image reaches, in model units (trained priors: images mapped to about [−1, 1]);
    #: a sampler's estimate far beyond it has diverged (:func:`~napari_diffrecon.samplers.base.check_finite`).
    image_range: float = 1.0

    @property
    def is_consistency(self) -> bool:
        """True for a consistency model (``denoise`` maps to the ODE's end point, not to E[x0 | x_t])."""
        return self.card is not None and self.card.parametrisation == "consistency"

    def draw_noise(
        self, shape: tuple[int, ...], sigma: float, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """A perturbation at noise level σ from the prior's training kernel (CPU, float32).

        Gaussian ``σ ε`` for diffusion priors; the heavy-tailed PFGM++ kernel for a prior trained
        with finite D (:func:`~napari_diffrecon.priors.schedules.pfgmpp_noise`).
        """
        if self.aug_dim is None:
            return float(sigma) * torch.randn(shape, generator=generator)
        return pfgmpp_noise(shape, sigma, self.aug_dim, None, generator)

    @abstractmethod
    def denoise(self, x_t: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """Tweedie estimate ``E[x0 | x_t]`` for ``x_t = x0 + σ ε``, shape ``(B, C, H, W)``."""

    def score(self, x_t: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """``∇ log p_σ(x_t) = (x0_hat − x_t) / σ²``."""
        s = _sigma_tensor(sigma, x_t)
        return (self.denoise(x_t, sigma) - x_t) / s**2

    def to(self, device: str | torch.device) -> Prior:
        """Move to ``device`` and return self."""
        return self

    # Intensity normalisation between native units (e.g. HU) and model units.
    def to_model(self, x_native: torch.Tensor) -> torch.Tensor:
        """Native image units → model units."""
        n = self.card.normalisation if self.card else {"offset": 0.0, "scale": 1.0}
        return (x_native - n["offset"]) / n["scale"]

    def from_model(self, x_model: torch.Tensor) -> torch.Tensor:
        """Model units → native image units."""
        n = self.card.normalisation if self.card else {"offset": 0.0, "scale": 1.0}
        return x_model * n["scale"] + n["offset"]


class GaussianPrior(Prior):
    """``x0 ~ N(mean, σp² I)``: its denoiser is exact, ``x0_hat = mean + (x_t − mean)·σp²/(σp² + σ²)``.

    Used to test samplers against the closed-form Gaussian posterior.
    """

    def __init__(self, sigma_p: float = 1.0, mean: float = 0.0, channels: int = 1) -> None:
        self.sigma_p = float(sigma_p)
        self.mean = float(mean)
        self.channels = channels
        self.image_range = abs(self.mean) + 3 * self.sigma_p
        self.schedule = get_schedule("edm")

    def denoise(self, x_t: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        s = _sigma_tensor(sigma, x_t)
        return self.mean + (x_t - self.mean) * self.sigma_p**2 / (self.sigma_p**2 + s**2)

    @staticmethod
    def real_coordinates(x: torch.Tensor, n_core: int = 2) -> torch.Tensor:
        """Flatten a batch of images ``(*batch, *core)`` to real vectors ``(*batch, N)``; complex → ``[Re, Im]``."""
        flat = x.reshape(*x.shape[: x.ndim - n_core], -1)
        return torch.cat([flat.real, flat.imag], -1) if flat.is_complex() else flat

    def posterior(
        self, operator: object, measurement: torch.Tensor, sigma_y: float, max_pixels: int = 4096
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The closed-form posterior ``N(μ, C)`` of ``x`` given ``m = A x + N(0, σ_y²)`` under this prior.

        ``C = (I/σp² + AᵀA/σ_y²)⁻¹`` and ``μ = C (Aᵀm/σ_y² + mean/σp²)``, in the real coordinates of
        :meth:`real_coordinates` (complex images and data: real and imaginary parts each with variance σp² / σ_y²).
        ``A`` is built column by column from ``operator.forward``, so this is for small test problems only. The
        prior is taken in image units (a sampler's ``Problem`` with scale 1 and offset 0; otherwise build the
        prior's image-unit mean and σ yourself).

        Parameters
        ----------
        operator : LinearOperator
            The forward operator (real or complex).
        measurement : torch.Tensor
            One measurement with the operator's data shape.
        sigma_y : float
            Standard deviation of the Gaussian data noise (per real and imaginary part).
        max_pixels : int
            Refuse images larger than this (the dense matrix grows as pixels²).

        Returns
        -------
        mean, cov : torch.Tensor
            float64, shapes ``(N,)`` and ``(N, N)``; ``N`` = pixels (×2 for complex images).
        """
        shape = tuple(operator.image_shape)
        n_pix = int(torch.tensor(shape).prod())
        if n_pix > max_pixels:
            raise ValueError(f"the closed-form posterior builds a dense {n_pix}²-entry matrix: use an image of at "
                             f"most {max_pixels} pixels")
        eye = torch.eye(n_pix, dtype=torch.float64)
        basis = list(eye)
        if getattr(operator, "is_complex", False):
            basis = [e.to(torch.complex128) for e in eye] + [1j * e.to(torch.complex128) for e in eye]

        def column(v: torch.Tensor) -> torch.Tensor:
            x = v.reshape(shape).to(operator.image_dtype).to(operator.device)
            return self.real_coordinates(operator.forward(x), len(operator.data_shape)).double().cpu()

        a = torch.stack([column(b) for b in basis], 1)
        m = self.real_coordinates(torch.as_tensor(measurement), len(operator.data_shape)).double().cpu()
        cov = torch.linalg.inv(torch.eye(a.shape[1], dtype=torch.float64) / self.sigma_p**2 + a.T @ a / sigma_y**2)
        mean = cov @ (a.T @ m / sigma_y**2 + self.mean / self.sigma_p**2)
        return mean, cov


#: One trace at a time: runs starting together (a batched search) trace once. Tracing's notices are filtered by
#: :func:`~napari_diffrecon._notices.quiet_torch_notices`.
_TRACE_LOCK = threading.Lock()
#: Moves of a prior's network (:meth:`NetworkPrior.to`) one at a time, in any thread (module-level: a lock in the
#: prior would keep it from being pickled for Dask's worker processes).
_MOVE_LOCK = threading.Lock()
#: Per thread: network -> the precision a run in this thread set (see NetworkPrior.precision).
_THREAD_PRECISION = threading.local()
quiet_torch_notices()


def _in_place(network: torch.nn.Module, device: torch.device, layout: torch.memory_format) -> bool:
    """Whether every parameter and buffer of ``network`` is on ``device`` and its 4-D ones in ``layout``."""
    if device.index is None and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())  # "cuda" means the current device
    for t in list(network.parameters()) + list(network.buffers()):
        if t.device.type != device.type or (device.index is not None and t.device.index != device.index):
            return False
        if t.dim() == 4 and not t.is_contiguous(memory_format=layout):
            return False
    return True


class NetworkPrior(Prior):
    """A trained U-Net with EDM preconditioning, VP ε-prediction, or a consistency model's boundary condition.

    Parameters
    ----------
    network : torch.nn.Module
        Called as ``network(x, noise_label)``.
    card : ModelCard
        The model card (parametrisation, schedule, σ_data, normalisation...).
    """

    def __init__(self, network: torch.nn.Module, card: ModelCard) -> None:
        card.validate()
        self.network = network
        self.card = card
        self.channels = card.channels
        self.sigma_data = float(card.sigma_data)
        self.schedule = get_schedule(card.schedule)
        self.parametrisation = card.parametrisation
        self.aug_dim = float(card.aug_dim) if card.aug_dim else None
        self.sigma_min = float(getattr(self.schedule, "sigma_min", 0.002))
        if self.parametrisation == "eps" and not isinstance(self.schedule, VPSchedule):
            raise CardError("an 'eps' (noise-prediction) prior needs a VP schedule in its card")
        if isinstance(self.schedule, VPSchedule):
            self._log_ab = torch.log(self.schedule.alpha_bars())
        self.network.eval()
        self._precision = "float32"  # see the precision property
        env = os.environ.get("NAPARI_DIFFRECON_TRACE", "auto").lower()
        #: Traced inference network: True, False, or None = only off the main thread (see _call_network).
        self.trace: bool | None = {"0": False, "false": False, "1": True, "true": True}.get(env)
        self._traced: tuple[tuple, torch.nn.Module] | None = None
        self._trace_failed: tuple | None = None  # the key whose tracing failed (tried again when it changes)

    @property
    def precision(self) -> str:
        """The network's arithmetic (:data:`PRECISIONS`) for calls from this thread.

        Every run states its precision at its start (``prior.precision = settings.precision``); it holds for the calls
        that run makes in its thread, whatever a run in another thread sets meanwhile on the same prior (the
        workbench, a search, Dask threads). Calls from a thread that set none use the value set last anywhere.
        """
        own = getattr(_THREAD_PRECISION, "values", None)
        value = own.get(self.network) if own is not None else None
        return value if value is not None else self._precision

    @precision.setter
    def precision(self, value: str) -> None:
        self._precision = value
        own = getattr(_THREAD_PRECISION, "values", None)
        if own is None:
            own = _THREAD_PRECISION.values = weakref.WeakKeyDictionary()
        own[self.network] = value

    def __getstate__(self) -> dict:
        """Pickled without the traced graph (a TorchScript module does not pickle; the copy traces again)."""
        state = self.__dict__.copy()
        state["_traced"] = None
        return state

    def _call_network(self, x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """``network(x, label)``; without autograd through a traced copy of the network (see :attr:`trace`).

        Why: an eager network dispatches each of its ~hundreds of operations from Python, so in a worker thread
        it waits for the GIL whenever another thread runs Python; in the napari workbench the GUI thread holds
        the GIL while it repaints, which cost the sampler ~5 % per 2 updates/s on a 2-core CPU
        (benchmarks/gui_stream.py). The traced graph runs the whole forward pass in C++ and gives the same
        numbers (tested bit for bit). It is used only where nothing differs: no autograd, eval mode, no LoRA
        layers, no module hooks, batches and sizes below diffusers' large-tensor branches. It shares the
        network's weights; a change of device, dtype, channels or modules traces again. If tracing fails, the
        eager network is used.

        Size: an image whose height or width is not a multiple of the U-Net's :attr:`size_multiple` (8 for the
        shipped 4-level networks) is reflect-padded to one and the output cropped back.

        When: ``trace = None`` (the default) traces only in threads other than the main one (GUI and Dask
        workers, where other Python threads compete for the GIL); in a one-shot CLI run in the main thread the
        tracing itself (0.2–0.7 s once per prior) would cost more than the ~3 % it saves. ``prior.trace = True``
        / ``False`` or ``NAPARI_DIFFRECON_TRACE=1`` / ``0`` decide it everywhere.

        Precision: with :attr:`precision` ``"bfloat16"`` or ``"float16"`` the network runs under
        ``torch.autocast`` (weights stay float32; convolutions and matrix products in the reduced type, norms in
        float32) and its output is cast back to the input's dtype, so everything outside the network (the data
        step, the schedule, the samples) stays in full precision. A bfloat16 graph is traced inside autocast (the
        casts are then part of the graph, which runs outside autocast) and gives the eager numbers bit for bit;
        float16, and any call made inside the caller's own autocast, run eagerly.
        """
        net = self.network
        k = int(getattr(net, "size_multiple", 1))
        h, w = x.shape[-2:]
        if h % k or w % k:  # a U-Net halves the image at every level: reflect-pad to a multiple, crop the output
            ph, pw = -h % k, -w % k
            x = torch.nn.functional.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), mode="reflect")
            return self._call_network(x, label)[..., ph // 2 : ph // 2 + h, pw // 2 : pw // 2 + w]
        precision = check_precision(self.precision)  # read once per call (this thread's run's value)
        reduced = PRECISIONS[precision]

        def eager() -> torch.Tensor:
            if reduced is None:
                return net(x, label)
            with torch.autocast(x.device.type, dtype=reduced):
                return net(x, label).to(x.dtype)

        trace = self.trace if self.trace is not None else threading.current_thread() is not threading.main_thread()
        if not trace or torch.is_grad_enabled() or net.training or precision == "float16":
            return eager()  # float16: a traced graph rounds differently from the eager network (~5e-4)
        if torch.is_autocast_enabled(x.device.type):
            return eager()  # a graph traced with its own casts would cast twice inside the caller's autocast
        b, c, h, w = x.shape
        if b >= 64 or b * h * w > 2**21:  # diffusers' U-Net takes other code paths for such tensors
            return eager()
        modules = list(net.modules())
        if any(type(m).__name__.startswith("LoRA") or _has_hooks(m) for m in modules) or _global_hooks():
            return eager()  # LoRA (test-time adaptation) or hooks (timers, memory probes) need the modules
        key = (id(net), len(modules), c, x.dtype, x.device, label.dtype, precision)
        if key == self._trace_failed:
            return eager()
        cached = self._traced
        if cached is None or cached[0] != key:
            try:
                # Traced under autocast, the graph holds the casts: it is then called outside autocast.
                amp = torch.autocast(x.device.type, dtype=reduced) if reduced is not None else contextlib.nullcontext()
                with _TRACE_LOCK, amp:
                    quiet_torch_notices()  # again: a caller's catch_warnings() may have reset them
                    again = self._traced  # traced by another run while this one waited
                    traced = again[1] if again is not None and again[0] == key else torch.jit.trace(
                        net, (x[:1], label.reshape(-1)[:1]), check_trace=False)
            except Exception:  # noqa: BLE001 - any tracing problem: the eager network is always right
                self._trace_failed = key
                return eager()
            cached = self._traced = (key, traced)
        return cached[1](x, label).to(x.dtype)

    @property
    def device(self) -> torch.device:
        """Device of the network's weights."""
        return next(self.network.parameters()).device

    def to(self, device: str | torch.device) -> NetworkPrior:
        """Move the network to ``device``; on a CPU its convolution weights are stored channels-last.

        oneDNN's CPU convolutions run on channels-last weights without reordering them at every call: for the
        shipped 5M-parameter U-Nets at 128² on one thread, bfloat16 calls take 16–22 % less time, float32 batches
        of 8 13–14 % less, a float32 batch of 1 the same (`python benchmarks/network_speed.py --memory-format`,
        benchmarks/results/memory_format.md). The numbers differ from the contiguous layout's only by float
        rounding. Other devices keep the contiguous layout.

        Threads: a network already on ``device`` in its layout is left as it is, and a move is made under a lock.
        Runs that share one prior call this at their start (the batched tuning search, several workbench runs); two
        moves at once swapped a weight's storage while the other thread copied it, so one run read freed memory
        (NaN from an untrained test network in about one search in five, on a CPU).
        """
        device = torch.device(device)
        layout = torch.channels_last if device.type == "cpu" else torch.contiguous_format
        with _MOVE_LOCK:
            if not _in_place(self.network, device, layout):
                self.network.to(device, memory_format=layout)
        return self

    def _vp_timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """Continuous training index t with ᾱ_t = 1/(1+σ²) (linear interpolation in log ᾱ)."""
        target = torch.log(sigma_to_alpha_bar(sigma.double().cpu()))
        log_ab = self._log_ab
        # log ᾱ decreases with t: search on the negated, increasing sequence.
        idx = torch.searchsorted(-log_ab, -target).clamp(1, len(log_ab) - 1)
        lo, hi = log_ab[idx - 1], log_ab[idx]
        frac = ((target - lo) / (hi - lo)).clamp(0, 1)
        return (idx - 1 + frac).to(sigma.device, torch.float32)

    def raw(self, x_t: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """The network's prediction with preconditioning applied; differentiable."""
        s = _sigma_tensor(sigma, x_t)
        sd = self.sigma_data
        if self.parametrisation == "consistency":
            # Song et al. (2023): c_skip(σ_min) = 1, c_out(σ_min) = 0, so f(x, σ_min) = x exactly.
            c_skip = sd**2 / ((s - self.sigma_min) ** 2 + sd**2)
            c_out = (s - self.sigma_min) * sd / torch.sqrt(s**2 + sd**2)
            c_in = 1.0 / torch.sqrt(s**2 + sd**2)
            f = self._call_network(c_in * x_t, edm_noise_label(s.reshape(-1)))
            return c_skip * x_t + c_out * f
        if self.parametrisation == "edm":
            c_skip = sd**2 / (s**2 + sd**2)
            c_out = s * sd / torch.sqrt(s**2 + sd**2)
            c_in = 1.0 / torch.sqrt(s**2 + sd**2)
            f = self._call_network(c_in * x_t, edm_noise_label(s.reshape(-1)))
            return c_skip * x_t + c_out * f
        # VP ε-prediction: x_vp = √ᾱ x_t, ε = net(x_vp, t), x0 = x_t − σ ε.
        x_vp = x_t / torch.sqrt(1 + s**2)
        eps = self._call_network(x_vp, self._vp_timestep(s.reshape(-1)))
        return x_t - s * eps

    def denoise(self, x_t: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        if x_t.ndim != 4 or x_t.shape[1] != self.channels:
            raise ValueError(
                f"prior {self.card.name!r} takes (B, {self.channels}, H, W) images, got {tuple(x_t.shape)}"
            )
        return self.raw(x_t, sigma)


def save_prior(prior: NetworkPrior, path: str | Path, half: bool = False) -> tuple[Path, Path]:
    """Write ``<path>.safetensors`` (weights) and ``<path>.json`` (card); returns both paths.

    Parameters
    ----------
    prior : NetworkPrior
        The prior to write.
    path : str or Path
        Output stem (a ``.json``/``.safetensors`` suffix is replaced).
    half : bool
        Store floating-point weights as float16 (half the size, for shipped priors); they are
        loaded back as float32.
    """
    from safetensors.torch import save_file

    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".json", ".safetensors") else path
    weights, card_path = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    weights.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in prior.network.state_dict().items()}
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    save_file(state, str(weights), metadata={"name": prior.card.name, "format": "napari-diffrecon prior"})
    from ..io.bundle import usual_permissions

    usual_permissions(weights)  # safetensors writes 0600: a prior exported to share was readable by its owner only
    card_path.write_text(prior.card.to_json(), encoding="utf-8")
    return weights, card_path


def load_prior_file(path: str | Path, device: str | torch.device = "cpu") -> NetworkPrior:
    """Load a prior from its card (``.json``) or weights (``.safetensors``) path; never unpickles.

    Raises
    ------
    FileNotFoundError
        When the card or the weights are missing.
    CardError
        When the card is invalid or the weights don't fit the architecture it describes.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".json", ".safetensors") else path
    card_path, weights = stem.with_suffix(".json"), stem.with_suffix(".safetensors")
    for p in (card_path, weights):
        if not p.exists():
            raise FileNotFoundError(f"prior file {p} not found (a prior is a .json card beside a .safetensors file)")
    card = ModelCard.read(card_path)
    net = build_network({**card.architecture, "channels": card.channels})
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CardError(f"cannot read weights {weights}: {e} (is it a safetensors file?)") from None
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}  # float16 shipped weights
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as e:  # same names, other shapes (another channel count or width): torch's message is long
        shapes = [line.strip() for line in str(e).splitlines() if "size mismatch" in line]
        raise CardError(
            f"weights {weights.name} do not fit the network {card_path.name} describes ({card.channels} channel(s), "
            f"{card.architecture.get('preset', card.architecture)}): {len(shapes)} tensors have other shapes, e.g. "
            f"{shapes[0] if shapes else str(e)[:200]}; the card and the weights must come from the same run"
        ) from None
    if missing or unexpected:
        raise CardError(
            f"weights {weights.name} do not match the architecture in {card_path.name}: "
            f"{len(missing)} missing and {len(unexpected)} unexpected tensors"
        )
    prior = NetworkPrior(net, card)
    return prior.to(device)


