"""Who writes where: one ``study run`` per OUT, and one writer per dataset folder.

Both are advisory ``flock`` locks on a file: the kernel drops a lock when the process
that holds it ends, however it ends, so a crash leaves nothing stale behind (the lock
file stays; the lock does not). On NFSv4 Linux emulates ``flock`` with POSIX byte-range
locks, which the server arbitrates between machines; see the README for what that
does and does not guarantee.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from study.files import atomic_write_text

OUT_LOCK = ".study.lock"


class Busy(RuntimeError):
    """OUT is held by another run; the message names the holder."""


class Unusable(RuntimeError):
    """OUT cannot be a run's folder: a file, or a place this process cannot write."""


# An OUT inside a checkout (``--out demo-out``) holds gigabytes: git and ``ray job submit
# --working-dir .`` (which reads .gitignore and .rayignore files in every folder it packs)
# leave it out wherever it lies, as uv does for its .venv
OUT_IGNORES = (".gitignore", ".rayignore")
OUT_IGNORE_TEXT = "# a study OUT: kept out of git and of `ray job submit --working-dir` uploads\n*\n"


def prepare_out(out: Path) -> None:
    """OUT made (if missing) and marked as an OUT (OUT_IGNORES), or Unusable before any
    work; nothing already in it is touched."""
    import tempfile

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise Unusable(f"--out {out}: exists and is not a folder; give a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-check-"):
            pass
        for name in OUT_IGNORES:
            if not (out / name).exists():
                atomic_write_text(out / name, OUT_IGNORE_TEXT)
    except OSError as err:
        raise Unusable(f"--out {out}: cannot write there ({err.strerror or err})") from None


def _open(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)


def holder(path: Path) -> str:
    """Who holds (or last held) the lock at ``path``, in words."""
    try:
        h = json.loads(Path(path).read_text() or "{}")
    except (OSError, ValueError):
        h = {}
    if not h:
        return "holder not yet recorded"
    return f"pid {h.get('pid')} on {h.get('host')}, since {h.get('started')}"


def _busy(out: Path, path: Path) -> Busy:
    return Busy(f"{out} is in use by another study run ({holder(path)}); wait for it to finish or give another --out")


def check_free(out: Path) -> None:
    """Busy when another process holds OUT now: asked before a run imports and checks
    anything, so a second run into a held OUT stops at once (``exclusive`` still decides,
    and says what else is wrong with OUT)."""
    path = Path(out) / OUT_LOCK
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # no lock file yet, or none this process may read
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _busy(out, path) from None
    finally:
        os.close(fd)


@contextlib.contextmanager
def exclusive(out: Path):
    """Holds OUT for this process, or refuses at once (Busy) when another process does.
    The holder's pid, host and start time are written into the lock file."""
    path = Path(out) / OUT_LOCK
    fd = _open(path)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _busy(out, path) from None
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        yield me
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def waiting(path: Path, what: str, log=print):
    """Holds the lock file ``path``; while another process holds it, waits (and says so)."""
    fd = _open(Path(path))
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"[study] waiting: another process is {what}")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
