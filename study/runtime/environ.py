"""Process settings a run switches on while it runs and puts back when it stops: environment
variables, logger levels, the unraisable-exception hook. Nothing here changes anything at
import."""

from __future__ import annotations

import contextlib
import logging
import os
import sys


@contextlib.contextmanager
def switched(env: dict[str, str] | None = None, quiet_loggers: tuple[str, ...] = (), keep: bool = False):
    """``env`` set (``keep``: only where unset) and ``quiet_loggers`` at ERROR while the block
    runs; both as they were after it."""
    env = {k: v for k, v in (env or {}).items() if not (keep and k in os.environ)}
    saved_env = {k: os.environ.get(k) for k in env}
    saved_levels = {n: logging.getLogger(n).level for n in quiet_loggers}
    os.environ.update(env)
    for n in quiet_loggers:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for n, level in saved_levels.items():
            logging.getLogger(n).setLevel(level)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def numba_quiet_hook(previous):
    """``previous`` (an unraisable hook) less one message: FFCV recompiles its numba pipeline
    per loader, and when a loader is collected numba's dispatcher finalizer looks up an
    overload that is already gone and prints a harmless ``KeyError`` traceback."""
    if getattr(previous, "drops_numba_finalizer_noise", False):
        return previous

    def hook(unraisable):
        tb = unraisable.exc_traceback
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        if (
            isinstance(unraisable.exc_value, KeyError)
            and tb is not None
            and tb.tb_frame.f_code.co_name == "finalizer"
            and "numba" in tb.tb_frame.f_code.co_filename
        ):
            return
        previous(unraisable)

    hook.drops_numba_finalizer_noise = True
    return hook


@contextlib.contextmanager
def numba_quiet():
    """The hook above while the block runs; the one before it after."""
    previous = sys.unraisablehook
    sys.unraisablehook = numba_quiet_hook(previous)
    try:
        yield
    finally:
        sys.unraisablehook = previous
