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
