"""The ground floor: content hashes that key what is written, and atomic writes (a
reader sees the old file or the new one, never half of one). Imports nothing of study's."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


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


_HASHES: dict[tuple, str] = {}


def sha256(path: Path) -> str:
    """The file's sha256 (hex), computed once per process for an unchanged file."""
    st = os.stat(path)
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        with open(path, "rb") as f:
            _HASHES[key] = hashlib.file_digest(f, "sha256").hexdigest()
    return _HASHES[key]
