"""Volume operators built slice-wise from the 2D operators (one Radon, one MRI FFT, one PET model).

A :class:`SliceWiseOperator` applies a 2D operator ``A₂`` to every axial slice of a volume
``x`` of shape ``(D, H, W)``: ``(A x)[k] = w_k ⊙ A₂ x[k]``, where the optional per-slice data
weights ``w_k`` carry what differs between slices (PET attenuation factors, MRI sampling masks).
All slices go through ``A₂`` as one batch (one sparse product for CT/PET, one batched FFT for
MRI), optionally in chunks of ``max_batch`` slices to bound the operator's temporaries. The
adjoint is ``(Aᴴ y)[k] = A₂ᴴ (conj(w_k) ⊙ y[k])``, exact because ``A₂``'s is.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..physics import CartesianMRI, LinearOperator, ParallelBeamCT, PETOperator, build_operator

__all__ = ["SliceWiseOperator", "volume_ct", "volume_mri", "volume_pet", "build_volume_operator"]


class SliceWiseOperator(LinearOperator):
    """A 2D operator applied to each slice of a ``(D, H, W)`` volume, batched over slices.

    Parameters
    ----------
    base : LinearOperator
        The 2D operator of one slice (``image_shape == (H, W)``).
    n_slices : int
        Number of axial slices ``D``.
    data_weights : array-like, optional
        Per-slice weights on the data, shape ``(D, *base.data_shape)`` (or broadcastable to it,
        e.g. ``(D, H, W)`` masks for multi-coil MRI data ``(D, C, H, W)``). ``None`` = all ones.
    max_batch : int, optional
        Apply ``base`` to at most this many slices at a time (bounds temporaries; results are
        the same for any value).
    z_offset : int
        Index of this operator's first slice in the whole volume (slabs of a larger volume).

    Attributes
    ----------
    image_shape : tuple of int
        ``(D, H, W)``.
    data_shape : tuple of int
        ``(D, *base.data_shape)``.
    """

    def __init__(
        self,
        base: LinearOperator,
        n_slices: int,
        data_weights: Any = None,
        max_batch: int | None = None,
        z_offset: int = 0,
    ) -> None:
        super().__init__(device=base.device, dtype=base.dtype)
        if len(base.image_shape) != 2:
            raise ValueError(f"the slice operator must be 2D, got image_shape {base.image_shape}")
        if int(n_slices) < 1:
            raise ValueError(f"a volume needs at least one slice, got n_slices={n_slices}")
        self.base = base
        self.n_slices = int(n_slices)
        self.modality = base.modality
        self.is_complex = base.is_complex
        self.image_shape = (self.n_slices, *base.image_shape)
        self.data_shape = (self.n_slices, *base.data_shape)
        self.max_batch = None if max_batch is None else max(int(max_batch), 1)
        self.z_offset = int(z_offset)
        self.data_weights: torch.Tensor | None = None
        if data_weights is not None:
            w = data_weights if isinstance(data_weights, torch.Tensor) else torch.as_tensor(np.asarray(data_weights))
            w = w.to(device=self.device, dtype=self.data_dtype if w.is_complex() else self.dtype)
            if w.ndim < 1 or w.shape[0] != self.n_slices:
                raise ValueError(
                    f"data_weights must have one entry per slice, shape ({self.n_slices}, ...), got {tuple(w.shape)}"
                )
            rest, nd = tuple(w.shape[1:]), len(base.data_shape)
            ok = len(rest) <= nd
            if ok:
                w = w.reshape(self.n_slices, *([1] * (nd - len(rest))), *rest)
                try:
                    ok = tuple(torch.broadcast_shapes(tuple(w.shape), self.data_shape)) == self.data_shape
                except RuntimeError:
                    ok = False
            if not ok:
                raise ValueError(
                    f"data_weights of shape {tuple(w.shape)} do not broadcast to the data shape {self.data_shape}"
                )
            if not torch.isfinite(torch.view_as_real(w) if w.is_complex() else w).all():
                raise ValueError("data_weights contain NaN or Inf")
            self.data_weights = w

    @property
    def support(self) -> torch.Tensor | None:
        """The slice operator's field of view, the same on every slice (``image_shape``), or None."""
        s = self.base.support
        return None if s is None else s.expand(self.n_slices, *s.shape)

    def fill_outside(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`LinearOperator.fill_outside` slice by slice (the nearest pixel inside on the same slice)."""
        return self.base.fill_outside(x)

    # -- slabs -----------------------------------------------------------------------------
    def slab(self, start: int, stop: int) -> SliceWiseOperator:
        """The operator of slices ``start:stop`` (local indices), sharing the 2D operator."""
        if not 0 <= start < stop <= self.n_slices:
            raise ValueError(f"slab {start}:{stop} outside the volume's {self.n_slices} slices")
        w = None if self.data_weights is None else self.data_weights[start:stop]
        return SliceWiseOperator(self.base, stop - start, w, self.max_batch, self.z_offset + start)

    def to(self, device: str | torch.device) -> SliceWiseOperator:
        """Move the operator (and its 2D operator) to ``device``."""
        self.base.to(device)
        self.device = torch.device(device)
        if self.data_weights is not None:
            self.data_weights = self.data_weights.to(self.device)
        return self

    # -- application ---------------------------------------------------------------------------
    def _chunks(self, n: int) -> list[slice]:
        step = self.max_batch or n
        return [slice(i, min(i + step, n)) for i in range(0, n, step)]

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        flat = x.reshape(b * self.n_slices, *self.base.image_shape)
        y = torch.cat([self.base.forward(flat[c]) for c in self._chunks(flat.shape[0])])
        y = y.reshape(b, *self.data_shape)
        return y if self.data_weights is None else y * self.data_weights

    def _adjoint(self, y: torch.Tensor) -> torch.Tensor:
        b = y.shape[0]
        if self.data_weights is not None:
            y = y * (self.data_weights.conj() if self.data_weights.is_complex() else self.data_weights)
        flat = y.reshape(b * self.n_slices, *self.base.data_shape)
        x = torch.cat([self.base.adjoint(flat[c]) for c in self._chunks(flat.shape[0])])
        return x.reshape(b, *self.image_shape)

    def spec(self) -> dict[str, Any]:
        """The 2D slice spec plus ``n_slices`` and the per-slice weights (numpy)."""
        return {
            "modality": self.modality,
            "volume": True,
            "n_slices": self.n_slices,
            "slice_operator": self.base.spec(),
            "data_weights": None if self.data_weights is None else self.data_weights.detach().cpu().numpy(),
        }

    def __repr__(self) -> str:
        return f"SliceWiseOperator({self.base!r}, n_slices={self.n_slices}, weights={self.data_weights is not None})"


def volume_ct(
    n_slices: int, n: int, angles_deg: Any, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
    max_batch: int | None = None,
) -> SliceWiseOperator:
    """Parallel-beam CT per axial slice (the 2D :class:`~napari_diffrecon.physics.ParallelBeamCT`).

    Data are ``(D, n, n_angles)``: one scikit-image-convention sinogram per slice.
    """
    return SliceWiseOperator(ParallelBeamCT(n, angles_deg, device=device, dtype=dtype), n_slices, max_batch=max_batch)


def volume_mri(
    masks: Any, coil_maps: Any = None, n_slices: int | None = None, device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32, max_batch: int | None = None,
) -> SliceWiseOperator:
    """2D multi-slice Cartesian MRI: each slice sampled with its own (or a shared) mask.

    Parameters
    ----------
    masks : array-like
        ``(H, W)`` shared by all slices (then ``n_slices`` is required) or ``(D, H, W)`` per slice.
    coil_maps : array-like, optional
        ``(C, H, W)`` sensitivities shared by the slices (multi-coil data ``(D, C, H, W)``).
    """
    masks = np.asarray(masks)
    if masks.ndim == 2:
        if n_slices is None:
            raise ValueError("a shared (H, W) mask needs n_slices")
        base = CartesianMRI(masks, coil_maps, device=device, dtype=dtype)
        return SliceWiseOperator(base, n_slices, max_batch=max_batch)
    if masks.ndim != 3:
        raise ValueError(f"masks must be (H, W) or (D, H, W), got shape {masks.shape}")
    if n_slices is not None and n_slices != masks.shape[0]:
        raise ValueError(f"{masks.shape[0]} masks for n_slices={n_slices}")
    base = CartesianMRI(np.ones(masks.shape[1:], dtype=np.float32), coil_maps, device=device, dtype=dtype)
    weights = masks if coil_maps is None else masks[:, None]
    return SliceWiseOperator(base, masks.shape[0], weights, max_batch=max_batch)


def volume_pet(
    n_slices: int, n: int, angles_deg: Any, attenuation: Any = None, sensitivity_scale: float = 1.0,
    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, max_batch: int | None = None,
) -> SliceWiseOperator:
    """PET per axial slice (2D :class:`~napari_diffrecon.physics.PETOperator`).

    Parameters
    ----------
    attenuation : array-like, optional
        Attenuation factors ``(n, n_angles)`` shared by all slices or ``(D, n, n_angles)`` per slice.
    """
    att = None if attenuation is None else np.asarray(attenuation)
    if att is None or att.ndim == 2:
        base = PETOperator(n, angles_deg, att, sensitivity_scale, device=device, dtype=dtype)
        return SliceWiseOperator(base, n_slices, max_batch=max_batch)
    if att.ndim != 3 or att.shape[0] != n_slices:
        raise ValueError(f"per-slice attenuation must be ({n_slices}, n, n_angles), got {att.shape}")
    if np.any(att < 0) or np.any(att > 1 + 1e-6) or not np.all(np.isfinite(att)):
        raise ValueError("attenuation factors must be finite and in [0, 1] (they are exp(-∫μ))")
    base = PETOperator(n, angles_deg, None, sensitivity_scale, device=device, dtype=dtype)
    return SliceWiseOperator(base, n_slices, att, max_batch=max_batch)


def build_volume_operator(
    slice_spec: dict[str, Any], n_slices: int, data_weights: Any = None, device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32, max_batch: int | None = None,
) -> SliceWiseOperator:
    """A volume operator from a 2D operator spec (:func:`napari_diffrecon.physics.build_operator`)."""
    return SliceWiseOperator(build_operator(slice_spec, device=device, dtype=dtype), n_slices, data_weights, max_batch)
