"""The ground floor: content hashes that key what is written, and atomic writes (a
reader sees the old file or the new one, never half of one). Imports nothing of study's."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path


class BadInput(ValueError):
    """A file a command reads is damaged, foreign or meaningless; the message names it."""


def read_json(path: Path):
    """The JSON in ``path``; BadInput naming the file when it is none (or not a file)."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except IsADirectoryError:
        raise BadInput(f"{path}: a folder, not a JSON file") from None
    except UnicodeDecodeError:
        raise BadInput(f"{path}: not UTF-8 text") from None
    except ValueError as err:
        raise BadInput(f"{path}: not valid JSON ({err})") from None
    except OSError as err:
        raise BadInput(f"{path}: cannot be read ({err.strerror or err})") from None


def config_hash(obj) -> str:
    """16 hex digits of the sha256 of ``obj`` as canonical JSON (sorted keys)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@contextlib.contextmanager
def whole_folder(folder: Path):
    """Yields an empty temporary folder beside ``folder`` to write into; when the block
    ends without an error, each file in it replaces its namesake in ``folder`` (made if
    missing; files of ``folder`` it does not write are left as they are); on an error
    nothing of it reaches ``folder``. So a half-built output never replaces a good one."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp", dir=folder.parent))
    try:
        yield tmp
        folder.mkdir(exist_ok=True)
        for path in sorted(tmp.rglob("*")):
            if path.is_file():
                dest = folder / path.relative_to(tmp)
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def sha256(path: Path, kept=None) -> str:
    """The file's sha256 (hex). ``kept`` (study.runtime.Kept): what a run read before, by
    path, size and mtime, so an unchanged file is read once."""

    def read() -> str:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()

    if kept is None:
        return read()
    st = os.stat(path)
    return kept.get((str(path), st.st_size, st.st_mtime_ns), read)
