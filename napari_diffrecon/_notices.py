"""torch notices that this package's own calls trigger and that tell its users nothing, filtered by message.

Filters, not ``warnings.catch_warnings()`` around the calls: that saves and restores the process-wide filter list and,
entered from several threads at once, left "ignore" filters behind for the rest of a napari session.
"""

from __future__ import annotations

import warnings

__all__ = ["quiet_torch_notices"]


def quiet_torch_notices() -> None:
    """Put the ignore filters for torch's notices at the front of the warning filters (idempotent).

    The notices: sparse CSR tensors "in beta" and their unchecked invariants (the CT system matrix), diffusers'
    TracerWarnings and the deprecation of ``torch.jit.trace`` (the traced inference network). Called when
    :mod:`napari_diffrecon.physics.ct` and :mod:`napari_diffrecon.priors.prior` are imported, before each trace, and at
    the start of every workbench worker: superqt runs a worker inside ``catch_warnings()`` with
    ``filterwarnings("always")`` in front, which would otherwise show each of them as a napari notification (inside
    such a block the filters added here end with it).
    """
    import torch

    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
    warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled", category=UserWarning)
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module=r"(diffusers|torch\.nn)\.")
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.trace(_method)?` is deprecated",
                            category=DeprecationWarning)
