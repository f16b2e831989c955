"""Who writes where: one ``study run`` per OUT, and one writer per dataset folder.

Both are advisory ``flock`` locks on a file: the kernel drops a lock when the process
that holds it ends, however it ends, so a crash leaves nothing stale behind (the lock
file stays; the lock does not). On NFSv4 Linux emulates ``flock`` with POSIX byte-range
locks, which the server arbitrates between machines; see docs/guide/outputs.md for what that
does and does not guarantee.
"""

from __future__ import annotations

import contextlib
import dataclasses
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


@dataclasses.dataclass(frozen=True)
class Hold:
    """This process holds ``out`` (``exclusive``): what may stop a server a dead run left there."""

    out: Path
    holder: dict

    def __getitem__(self, key):
        return self.holder[key]


# An OUT inside a checkout (``--out demo-out``) holds gigabytes: git and ``ray job submit
# --working-dir .`` (which reads .gitignore and .rayignore files in every folder it packs)
# leave it out wherever it lies, as uv does for its .venv
OUT_IGNORES = (".gitignore", ".rayignore")
OUT_IGNORE_TEXT = "# a study OUT: kept out of git and of `ray job submit --working-dir` uploads\n*\n"


MARKS = (*OUT_IGNORES, OUT_LOCK)  # what a run puts in OUT before any work
KNOWN = {"job.yaml", "job.json", "mlflow.db", "results.csv", "checkpoints", "data"}  # an OUT of an earlier run


def check_out(out: Path) -> None:
    """Unusable when ``out`` can be no run's folder: the file system's root, a git working
    tree's top (a checkout: the marks would hide its files from git), a file."""
    out = Path(out)
    real = out.resolve()
    if real == Path(real.anchor):
        raise Unusable(f"--out {out}: the file system's root; give a folder of its own")
    if (real / ".git").exists():
        raise Unusable(f"--out {out}: the top of a git working tree; give a folder of its own (e.g. {out / 'runs'})")
    if out.exists() and not out.is_dir():
        raise Unusable(f"--out {out}: exists and is not a folder; give a folder")


def prepare_out(out: Path) -> bool:
    """OUT made (if missing) and marked as an OUT (OUT_IGNORES), or Unusable before any
    work; nothing already in it is touched. A folder that holds files of the user's (not
    an OUT, not empty) gets no marks: they would hide those files from git. Returns
    whether OUT was made here (``discard`` takes it away again if nothing was run)."""
    import tempfile

    out = Path(out)
    check_out(out)
    made = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-check-"):
            pass
        entries = {p.name for p in out.iterdir()}
        if not entries - set(MARKS) or entries & KNOWN:
            for name in OUT_IGNORES:
                if not (out / name).exists():
                    atomic_write_text(out / name, OUT_IGNORE_TEXT)
    except OSError as err:
        raise Unusable(f"--out {out}: cannot write there ({err.strerror or err})") from None
    return made


def discard(out: Path) -> None:
    """Removes an OUT this run made and put nothing in but its marks (a job refused after
    OUT was made leaves no folder behind)."""
    out = Path(out)
    with contextlib.suppress(OSError):
        if {p.name for p in out.iterdir()} <= set(MARKS):
            for name in MARKS:
                (out / name).unlink(missing_ok=True)
            out.rmdir()


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
    return Busy(f"{out} is in use by {_command(path)} ({holder(path)}); wait for it to finish or give another --out")


def _command(path: Path) -> str:
    try:
        return json.loads(Path(path).read_text() or "{}").get("command") or "another study run"
    except (OSError, ValueError, AttributeError):
        return "another study run"


def held(out: Path) -> bool:
    """Whether another process holds OUT now (a live run, or a ``study ui`` on it)."""
    try:
        check_free(out)
    except Busy:
        return True
    return False


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
def exclusive(out: Path, command: str = "another study run"):
    """Holds OUT for this process, or refuses at once (Busy) when another process does.
    The holder's pid, host, start time and command are written into the lock file; what
    it yields is the proof of holding OUT that ``study.tracking.owned`` asks for."""
    path = Path(out) / OUT_LOCK
    fd = _open(path)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _busy(out, path) from None
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": command,
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        yield Hold(Path(out).resolve(), me)
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
