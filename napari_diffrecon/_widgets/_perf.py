"""What keeps a run in the workbench as fast as the same run headless (measured in benchmarks/gui_stream.py).

Two costs that have nothing to do with reconstruction were found there, on a 2-core CPU with software OpenGL:

- **glibc malloc in worker threads.** torch allocates its activations with ``malloc``. In the main thread the
  dynamic mmap threshold keeps multi-MB blocks on the heap after the first round; in any other thread they live
  in a per-thread arena that glibc trims back to the OS after each network call, so every call page-faults its
  memory again: a DDS run in a plain ``threading.Thread`` took +8 % wall (same with ``MALLOC_ARENA_MAX=1`` or
  fixed thresholds: +0 %). :func:`keep_worker_memory` fixes the thresholds at run time (``mallopt``).
- **napari's activity spinner.** While any napari progress bar is open, the status bar animates a loading GIF;
  every frame makes Qt recompose the window around the OpenGL canvas: +20–25 % wall on the sampler.
  Our progress bar already shows step, NFE and ETA, so :func:`pause_activity_spinner` stops the animation for
  the run (its first frame stays, as the "in progress" sign).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import inspect
import sys
from typing import Any

from .._notices import quiet_torch_notices

__all__ = ["keep_worker_memory", "pause_activity_spinner", "new_worker", "run_progress", "WorkerRuntimeError",
           "original_error"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 32 * 1024 * 1024  # the largest glibc accepts on 64-bit (half of a per-thread heap)
_TRIM_THRESHOLD = 256 * 1024 * 1024  # free heap memory kept for the next network call before it is returned
_done: bool | None = None


def keep_worker_memory() -> bool:
    """Keep freed torch buffers of up to 32 MiB on the heap in every thread (glibc only; once per process).

    Returns
    -------
    bool
        True when the allocator settings are in place (now or before), False where they do not apply
        (not Linux/glibc) or were refused; nothing else changes then.
    """
    global _done
    if _done is not None:
        return _done
    _done = False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another libc: no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # The mmap threshold first: setting either one switches glibc's dynamic threshold off.
    _done = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    return _done


def pause_activity_spinner(widget: Any) -> int:
    """Pause napari's animated "in progress" GIF in the window that holds ``widget``.

    It is found through Qt (labels in the window playing napari's ``loading.gif``), not napari's private
    attributes; the next napari progress bar starts it again.

    Parameters
    ----------
    widget : QWidget
        Any widget docked in the napari window (a widget outside a window changes nothing).

    Returns
    -------
    int
        How many spinners were paused (0 on a napari without one).
    """
    from qtpy.QtGui import QMovie
    from qtpy.QtWidgets import QLabel

    n = 0
    for label in widget.window().findChildren(QLabel):
        movie = label.movie()
        if (movie is not None and movie.state() == QMovie.MovieState.Running
                and movie.fileName().replace("\\", "/").rsplit("/", 1)[-1].startswith("loading")):
            movie.setPaused(True)
            n += 1
    return n


class WorkerRuntimeError(Exception):
    """A ``RuntimeError`` raised in a generator worker, carried out of it as another type (:attr:`error` holds it).

    superqt's ``GeneratorWorker`` takes any ``RuntimeError`` from the generator for "the worker was deleted": it
    only warns and ends without emitting ``errored`` or ``finished``. The sampler's NaN stop (``SamplingError``),
    the search's cancellation, torch's out-of-memory and most torch errors are ``RuntimeError`` subclasses, so the panel
    stayed "running" for good, with Run greyed out and no message. Its ``str`` is the original message.
    """

    def __init__(self, error: RuntimeError) -> None:
        super().__init__(str(error))
        self.error = error


def original_error(exc: BaseException) -> BaseException:
    """The exception a worker raised (unwrapping :class:`WorkerRuntimeError`)."""
    return exc.error if isinstance(exc, WorkerRuntimeError) else exc


def _carry_runtime_errors(fn: Any) -> Any:
    """``fn`` (a generator function) raising :class:`WorkerRuntimeError` for its ``RuntimeError``, and with torch's
    notices filtered again inside superqt's ``catch_warnings()`` (``_notices.quiet_torch_notices``)."""

    @functools.wraps(fn)
    def generator(*args: Any, **kwargs: Any) -> Any:
        quiet_torch_notices()  # runs in the worker, inside superqt's "always" filter
        try:
            return (yield from fn(*args, **kwargs))
        except RuntimeError as e:
            raise WorkerRuntimeError(e) from e

    return generator


def new_worker(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """napari's ``create_worker`` as every panel here uses it: not started yet (the caller connects its slots
    first), errors delivered to ``errored`` instead of raised (a generator's ``RuntimeError`` as
    :class:`WorkerRuntimeError`: see there), and the allocator set for worker threads."""
    from napari.qt.threading import create_worker

    keep_worker_memory()  # torch buffers stay on the heap in the worker thread
    if inspect.isgeneratorfunction(fn):
        fn = _carry_runtime_errors(fn)
    return create_worker(fn, *args, _start_thread=False, _ignore_errors=True, **kwargs)


def run_progress(widget: Any, total: int, desc: str) -> Any:
    """A napari progress bar for a run started from ``widget``, with the window's spinner paused."""
    from napari.utils import progress

    pbar = progress(total=total, desc=desc)
    pause_activity_spinner(widget)  # its animation costs the sampler ~20 % on software GL
    return pbar
