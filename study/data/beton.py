"""FFCV .beton files: written once per split, atomically, beside a manifest.

Layout under a data folder ``D``::

    D/<dataset>/<split>.beton   the FFCV file
    D/<dataset>/<split>.json    its manifest: count, classes, resolution, config hash, bytes

A split whose manifest carries the same config hash, and whose .beton is intact, is
not written again. A truncated or corrupt .beton is refused with its path named.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from study.data.registry import build_split, get_info, resolve_params
from study.files import atomic_write_text, config_hash
from study.runtime import locks

FORMAT_VERSION = 1  # bump when the way a split is written changes


class BetonError(RuntimeError):
    """A .beton file that is missing, truncated or corrupt."""


@dataclass
class Prepared:
    beton: Path
    manifest: dict
    written: bool  # False when an intact, identical split was already there


def split_config(name: str, split: str, root=None, params=None) -> dict:
    """What determines a split's bytes; its hash keys the .beton."""
    info = get_info(name)
    root = info.root_or_default(root)
    return {
        "dataset": name,
        "split": split,
        "format": FORMAT_VERSION,
        "params": resolve_params(name, params),
        "root": None if info.generated else str(Path(root).expanduser().resolve()) if root else None,
        "write_mode": info.write_mode,
        "max_resolution": info.max_resolution,
    }


def paths(out: Path, folder: str, split: str) -> tuple[Path, Path]:
    folder = Path(out) / folder
    return folder / f"{split}.beton", folder / f"{split}.json"


def read_manifest(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def check_beton(path: Path, manifest: dict | None = None) -> None:
    """Raises BetonError unless ``path`` is a complete FFCV file (and matches its manifest)."""
    from ffcv.types import ALLOC_TABLE_TYPE, CURRENT_VERSION, HeaderType

    path = Path(path)
    if not path.is_file():
        raise BetonError(f"{path}: .beton file not found")
    size = path.stat().st_size
    if manifest is not None and manifest.get("bytes") != size:
        raise BetonError(
            f"{path}: truncated or altered .beton ({size} bytes, manifest says "
            f"{manifest.get('bytes')}); delete it and prepare the data again"
        )
    if size < HeaderType.itemsize:
        raise BetonError(f"{path}: truncated .beton ({size} bytes, shorter than its header)")
    header = np.fromfile(path, dtype=HeaderType, count=1)[0]
    table_ptr = int(header["alloc_table_ptr"])
    if header["version"] != CURRENT_VERSION or not 0 < table_ptr <= size:
        raise BetonError(f"{path}: not an FFCV .beton or truncated (bad header)")
    table_bytes = size - table_ptr
    if table_bytes == 0 or table_bytes % ALLOC_TABLE_TYPE.itemsize:
        raise BetonError(f"{path}: truncated .beton (allocation table cut off)")
    table = np.fromfile(path, dtype=ALLOC_TABLE_TYPE, offset=table_ptr)
    if len(table) and int((table["ptr"] + table["size"]).max()) > table_ptr:
        raise BetonError(f"{path}: truncated .beton (sample data past the allocation table)")
    if manifest is not None and int(header["num_samples"]) != manifest.get("count"):
        raise BetonError(f"{path}: holds {int(header['num_samples'])} samples, manifest says {manifest.get('count')}")


def prepare_split(
    name: str, split: str, out, root=None, params=None, workers: int = 2, folder: str | None = None
) -> Prepared:
    """Writes ``out/<folder>/<split>.beton`` once (``folder``: the job's key for the
    dataset, default its name); a second call with the same config does nothing."""
    beton, _ = paths(out, folder or name, split)
    # one writer per dataset folder: another job sharing data.dir waits, then reuses the file
    with locks.waiting(beton.parent / ".prepare.lock", f"preparing {beton.parent}"):
        return _prepare_split(name, split, out, root, params, workers, folder)


def _prepare_split(name: str, split: str, out, root, params, workers: int, folder: str | None) -> Prepared:
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    cfg = split_config(name, split, root, params)
    digest = config_hash(cfg)
    beton, manifest_path = paths(out, folder or name, split)
    old = read_manifest(manifest_path)
    if old is not None and old.get("config_hash") == digest:
        try:
            check_beton(beton, old)
            return Prepared(beton, old, written=False)
        except BetonError:
            pass  # rewrite a damaged file from its source

    info = get_info(name)
    dataset = build_split(name, split, root, params)
    beton.parent.mkdir(parents=True, exist_ok=True)
    tmp = beton.with_name(f".{beton.name}.tmp{os.getpid()}")
    fields = {
        "image": RGBImageField(write_mode=info.write_mode, max_resolution=info.max_resolution),
        "label": IntField(),
    }
    try:
        writer = DatasetWriter(str(tmp), fields, num_workers=max(1, workers))
        writer.from_indexed_dataset(dataset)
        os.replace(tmp, beton)
    finally:
        tmp.unlink(missing_ok=True)

    first = dataset[0][0] if len(dataset) else np.zeros((0, 0, 3))
    manifest = {
        "dataset": name,
        "split": split,
        "count": len(dataset),
        "classes": list(dataset.classes),
        "num_classes": len(dataset.classes),
        "resolution": [int(first.shape[0]), int(first.shape[1])],
        "max_resolution": info.max_resolution,
        "write_mode": info.write_mode,
        "config": cfg,
        "config_hash": digest,
        "bytes": beton.stat().st_size,
    }
    atomic_write_text(manifest_path, json.dumps(manifest, indent=2))
    return Prepared(beton, manifest, written=True)


def prepare(name: str, out, root=None, params=None, workers: int = 2, folder: str | None = None):
    """Both splits of a dataset; returns {split: Prepared}. Two datasets of one name with
    different params (a job's ``shapes`` and ``shapes10``) need folders of their own."""
    return {s: prepare_split(name, s, out, root, params, workers, folder) for s in ("train", "test")}
