"""What a run owns of the machine, as one object passed down (``Runtime``): OUT's lock
(``locks``), the Ray it uses (``local_ray``), the MLflow server processes it supervises
(``server``), and the loaders and file digests it has made (``Kept``). ``pipeline.run_job``
and ``study ui`` create one; a Tune trial or an analysis actor creates its own in its
process. Settings of the process (environment, loggers, hooks) change while a runtime
runs and are put back when it stops (``environ``); importing any of this changes nothing."""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from study.runtime import locks
from study.runtime.environ import numba_quiet
from study.runtime.local_ray import LocalRay, quiet_ray_process


class Kept:
    """The last ``size`` things made, by key (least recently asked for goes first)."""

    def __init__(self, size: int):
        self.size, self.items = size, OrderedDict()

    def get(self, key, make):
        """What ``make()`` made for ``key`` before, else made now."""
        item = self.items.pop(key, None)
        if item is None:
            item = make()
        self.items[key] = item
        while len(self.items) > self.size:
            self.items.popitem(last=False)
        return item

    def clear(self) -> None:
        self.items.clear()

    def __len__(self) -> int:
        return len(self.items)


@dataclass
class Runtime:
    """A run's processes and caches. ``loaders``: FFCV compiles a loader's numba pipeline at
    its first epoch (a second or more on a CPU), so a loader asked for again with the same
    arguments is the one made before, rewound (study.data.loaders.make_loader).
    ``digests``: a checkpoint's sha256, read once while its size and mtime hold."""

    ray: LocalRay = field(default_factory=LocalRay)
    loaders: Kept = field(default_factory=lambda: Kept(32))
    digests: Kept = field(default_factory=lambda: Kept(4096))
    hold: locks.Hold | None = None  # OUT's lock, while this runtime holds OUT

    @classmethod
    @contextlib.contextmanager
    def holding(cls, out: Path, command: str = "another study run"):
        """A runtime that holds ``out`` alone while the block runs (a second run into it stops
        at once, naming this one); however the block ends, the local Ray it started stops,
        its loaders go, and the process's settings are put back."""
        with locks.exclusive(out, command) as hold, numba_quiet():
            runtime = cls(hold=hold)
            try:
                yield runtime
            finally:
                runtime.close()

    def close(self) -> None:
        self.ray.release()
        self.loaders.clear()
        self.digests.clear()


__all__ = ["Kept", "LocalRay", "Runtime", "locks", "quiet_ray_process"]
