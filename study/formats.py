"""One door for what a run leaves on disk for others to read: ``results.csv``,
``per_image.json``, ``report/claims.json``, ``analyses/analyses.json`` and the stage
records beside the checkpoints. They belong to one *format*, stamped in ``OUT/format.json``
(and logged beside them in MLflow) so the data files keep their bytes. A reader asks the
folder's ``version``; what an older version wrote is brought to the current shape here and
nowhere else; a newer format is refused in one line that says what to do.

A run into an OUT of an older format first upgrades it in place (``open_out``: atomic
writes, nothing lost), so the rest of the study reads one shape only. A reader (``study
report``, ``study plan --from``) upgrades what it reads in memory and writes nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

from study.files import BadInput, atomic_write_text, read_json, sha256

FORMAT = 2
NAME = "format.json"
# what each version wrote that the current one reads otherwise
HISTORY = {
    1: "before the format version (up to commit df4d3c5): results.csv may name `method` `setting` and lack the "
    "`job` and `chosen` columns; analyses.json may hold one replicate's `datasets` at its top; a stage record "
    "may lack its checkpoint's size and sha256",
    2: "format.json stamped; each file as study writes it now",
}
KNOWN = ("job.yaml", "job.json", "results.csv", "checkpoints")  # an OUT of an earlier run


def version(folder: Path) -> int | None:
    """The format of what ``folder`` holds: its ``format.json``'s; 1 for a run's folder from
    before the stamp; None for a folder no run wrote into. A format this study does not
    know (newer, or not a number) is BadInput naming it."""
    folder = Path(folder)
    mark = folder / NAME
    if not mark.is_file():
        return 1 if any((folder / k).exists() for k in KNOWN) else None
    found = read_json(mark)
    v = found.get("format") if isinstance(found, dict) else None
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise BadInput(f'{mark}: expected {{"format": <a whole number>}}, got {json.dumps(found)[:80]}')
    if v > FORMAT:
        raise BadInput(
            f"{folder}: written in format {v} by a newer study; this one reads formats 1 to {FORMAT}: "
            "update study, or write a new OUT with this version"
        )
    return v


def stamp(folder: Path) -> Path:
    """Marks ``folder`` as holding the current format."""
    path = Path(folder) / NAME
    atomic_write_text(path, json.dumps({"format": FORMAT}) + "\n")
    return path


def open_out(out: Path, job: str, log=print) -> None:
    """Before a run writes into ``out``: an older format's files upgraded in place, then the
    stamp. A reader of ``out`` then finds one format in it, even if the run stops early."""
    out = Path(out)
    v = version(out)
    if v == FORMAT:
        return
    if v == 1:
        n = sum(_upgrade_record(p) for p in sorted((out / "checkpoints").glob("*.json")))
        if (out / "results.csv").is_file():
            import pandas as pd

            df = results(pd.read_csv(out / "results.csv"), 1, job)
            atomic_write_text(out / "results.csv", df.to_csv(index=False))
        old = out / "analyses" / "analyses.json"
        if old.is_file() and "seeds" not in read_json(old):  # never reused: its key has no seeds
            old.replace(old.with_name("analyses.format1.json"))
        log(f"[study] {out}: written before the format version; {n} stage record(s) and its results upgraded")
    stamp(out)


def _upgrade_record(path: Path) -> bool:
    """A format-1 stage record gets its checkpoint's size and sha256, as it is now: the
    checkpoint it was written with (format 1 kept no digest to check it against)."""
    record = json.loads(path.read_text())
    ckpt = path.with_suffix(".pt")
    if not isinstance(record, dict) or "checkpoint_sha256" in record or not ckpt.is_file():
        return False
    record |= {"checkpoint_size": ckpt.stat().st_size, "checkpoint_sha256": sha256(ckpt)}
    atomic_write_text(path, json.dumps(record, indent=2))
    return True


def results(df, v: int, job: str = ""):
    """A results frame read from a file of format ``v``, in the current shape."""
    if v == 1:
        df = df.rename(columns={"setting": "method"})
        if "job" not in df:
            df.insert(0, "job", job)
        if "chosen" not in df and "selected" in df:
            df["chosen"] = df["selected"]
    return df


def analyses(found: dict, v: int) -> dict:
    """An analyses result of format ``v``: replicates by seed (``{"seeds": {seed: {"datasets":
    ...}}}``); format 1 could hold one replicate at its top, of an unknown seed."""
    if v == 1 and "seeds" not in found:
        rest = {k: x for k, x in found.items() if k != "datasets"}
        return {**rest, "seeds": {None: {"datasets": found.get("datasets", {})}}}
    return found
