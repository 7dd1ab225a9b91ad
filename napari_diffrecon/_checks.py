"""Checks of user-given numbers shared by the entry points that take them (simulation options, classical
reconstruction parameters): a clear ``ValueError`` instead of garbage or a silent default."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["check_number"]


def check_number(name: str, value: Any, minimum: float = 0.0, *, above: bool = False, integer: bool = False,
                 context: str = "") -> None:
    """Raise ``ValueError`` unless ``value`` is None or a finite number ≥ ``minimum`` (> with ``above``).

    Parameters
    ----------
    name : str
        The parameter's name, as the user gave it.
    value : Any
        The value (None: not given, accepted).
    minimum : float
        The smallest value allowed (excluded with ``above``).
    above : bool
        Require ``value > minimum``.
    integer : bool
        Require a whole number.
    context : str
        Put before the message (e.g. ``"tv: "``).

    Raises
    ------
    ValueError
        Naming the parameter, the range and the value given (booleans and text are not numbers here).
    """
    if value is None:
        return
    kind = "a whole number" if integer else "a finite number"
    bound = f"{'above' if above else '≥'} {minimum:g}"
    try:
        if isinstance(value, (bool, str, bytes)):  # float("4") and float(True) would pass silently
            raise TypeError
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{context}{name} must be {kind} {bound}, got {value!r}") from None
    if not math.isfinite(v) or (v <= minimum if above else v < minimum) or (integer and v != int(v)):
        raise ValueError(f"{context}{name} must be {kind} {bound}, got {value!r}")
