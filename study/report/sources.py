"""A run read back: its ``results.csv`` and ``analyses.json`` from a folder, or the newest
finished job runs of an MLflow store (through ``study.tracking``), and the replicates'
analyses merged into means and spreads."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from study import corruptions, formats, tracking
from study.claims import by_seed
from study.files import BadInput, read_json


def _merge(values: list):
    """The replicates' analyses as one structure: (numbers averaged, their standard
    deviations over the seeds, 0 for one seed); other leaves are the first seed's."""
    first = values[0]
    if isinstance(first, dict):
        keys = dict.fromkeys(k for v in values if isinstance(v, dict) for k in v)
        pairs = {k: _merge([v[k] for v in values if isinstance(v, dict) and k in v]) for k in keys}
        return {k: m for k, (m, _) in pairs.items()}, {k: sd for k, (_, sd) in pairs.items()}
    if isinstance(first, list) and all(isinstance(v, list) and len(v) == len(first) for v in values):
        pairs = [_merge([v[i] for v in values]) for i in range(len(first))]
        return [m for m, _ in pairs], [sd for _, sd in pairs]
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        a = np.asarray(values, dtype=float)
        return float(np.nanmean(a)), float(np.nanstd(a, ddof=1)) if len(a) > 1 else 0.0
    return first, None


def merged(found: dict) -> tuple[dict, dict, int]:
    """(mean datasets, their sd over seeds, the number of seeds) of an analyses result."""
    reps = [r.get("datasets", {}) for r in by_seed(found).values()]
    if not reps:
        return {}, {}, 0
    mean, sd = _merge(reps)
    return mean, sd, len(reps)


NEEDED = ("dataset", "backbone", "method", "attack", "AOI", "AAI", "DR", "stage")  # what tables and claims read
NUMBERS = ("seed", "images", "AOI", "AAI", "DR")


def read_results(path, job: str = "", need: tuple = ()) -> pd.DataFrame:
    """A ``results.csv``, checked (BadInput naming the file: truncated, a column of
    NEEDED or ``need`` missing, a number that is none or a percentage outside 0-100); one
    of an older format reads as the current one (study.formats: the folder's format)."""
    path = Path(path)
    v = formats.version(path.parent) or formats.FORMAT
    try:
        raw = path.read_bytes()
        df = formats.results(pd.read_csv(path), v, job)
    except (OSError, ValueError, pd.errors.ParserError) as err:
        raise BadInput(f"{path}: not a readable results.csv ({str(err).splitlines()[0]})") from None
    if raw and not raw.endswith(b"\n"):
        raise BadInput(f"{path}: truncated (its last line is cut off)")
    missing = [c for c in (*NEEDED, *need) if c not in df]
    if missing:
        raise BadInput(f"{path}: no {', '.join(missing)} column (not a results.csv of this study, or damaged)")
    for col in (c for c in NUMBERS if c in df):
        values = pd.to_numeric(df[col], errors="coerce")
        if (values.isna() & df[col].notna()).any():
            raise BadInput(f"{path}: column {col} holds something that is not a number")
        if col in ("AOI", "AAI") and ((values < 0) | (values > 100)).any():
            raise BadInput(f"{path}: column {col} holds a percentage outside 0-100")
        df[col] = values
    df["job"] = df["job"].fillna(job).astype(str) if "job" in df else job
    if "selected" in df:
        df["selected"] = df["selected"].fillna(True).astype(bool)
    return df


def read_masks(path, df: pd.DataFrame) -> dict:
    """A ``per_image.json`` (stage -> attack -> {correct, robust}: strings of 0 and 1),
    checked against its results frame ``df``: BadInput naming the file and the entry for
    any other shape, other characters, masks of unequal length, an image robust but not
    correct, a length other than the row's image count, or a stage ``df`` does not have
    (another run's file)."""
    path = Path(path)
    formats.version(path.parent)  # a newer format is refused; every format's masks have this shape
    masks = read_json(path)
    if not isinstance(masks, dict):
        raise BadInput(f"{path}: expected {{stage: {{attack: {{correct, robust}}}}}}, got a {type(masks).__name__}")
    stages = set(df["stage"].astype(str))
    images = {
        (str(r.stage), "" if pd.isna(r.attack) else str(r.attack)): r.images
        for r in df.itertuples()
        if "images" in df and pd.notna(r.images)
    }
    for stage, by_attack in masks.items():
        if stage not in stages:
            raise BadInput(f"{path}: stage {stage} is not in the results beside it (another run's file?)")
        if not isinstance(by_attack, dict):
            raise BadInput(f"{path}: {stage}: expected {{attack: {{correct, robust}}}}")
        for attack, m in by_attack.items():
            # a corruption's "robust" is right on the corrupted image, which a wrong clean one can be
            attacked = corruptions.parse(attack) is None
            _check_mask(path, f"{stage}.{attack}", m, images.get((stage, attack)), attacked)
    return masks


def _check_mask(path: Path, where: str, m, count, attacked: bool = True) -> None:
    if not isinstance(m, dict) or not all(isinstance(m.get(k), str) for k in ("correct", "robust")):
        raise BadInput(f"{path}: {where}: expected {{correct, robust}} as strings of 0 and 1")
    c, r = m["correct"], m["robust"]
    if set(c) - {"0", "1"} or set(r) - {"0", "1"}:
        raise BadInput(f"{path}: {where}: a mask holds characters other than 0 and 1")
    if len(c) != len(r):
        raise BadInput(f"{path}: {where}: correct has {len(c)} images, robust {len(r)}")
    if attacked and any(b == "1" and a == "0" for a, b in zip(c, r)):
        raise BadInput(f"{path}: {where}: an image is robust but not correct")
    if count is not None and len(c) != int(count):
        raise BadInput(f"{path}: {where}: {len(c)} images, its results row says {int(count)} (shortened?)")


def read_analyses(folder) -> dict:
    """``folder/analyses.json`` with each UAP image's path pointing into ``folder`` (the
    run wrote paths under its own OUT; a download or a copy moves the images)."""
    folder = Path(folder)
    found = formats.analyses(json.loads((folder / "analyses.json").read_text()), formats.version(folder.parent) or 1)
    for rep in by_seed(found).values():
        for v in rep.get("datasets", {}).values():
            for u in v.get("uap", {}).values():
                u["png"] = str(folder / Path(u["png"]).name)
    return found


def from_mlflow(experiment: str | None = None, log=print) -> tuple[pd.DataFrame, dict, dict, str]:
    """From the tracking server in use: for each experiment (or the one named), the newest
    finished job run that logged ``results.csv``; their results are merged (the paper's
    tables come from several jobs) and so are their analyses and per-image results.
    Returns (results, analyses, per-image masks, a title naming the experiments)."""
    frames, found, names, masks = [], {"seeds": {}}, [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, run_id, run_name, have in tracking.job_runs(experiment):
            d = Path(tmp) / run_id
            d.mkdir()
            frames.append(_job_artifacts(run_id, have, d, found, masks, name))
            names.append(name)
            log(f"report: {name}: run {run_id} ({run_name})")
    # every job's rows stay apart (tables and claims compare within a job's units)
    df = pd.concat(frames, ignore_index=True).drop_duplicates(subset=["job", "stage", "attack"], keep="first")
    df["selected"] = df["selected"].fillna(True).astype(bool)
    df["chosen"] = df["chosen"].where(df["chosen"].notna(), df["selected"]).astype(bool)
    return df, found, masks, " + ".join(names)


def _job_artifacts(run_id: str, have: set, d: Path, found: dict, masks: dict, job: str = "") -> pd.DataFrame:
    """A job run's results frame (``job``: its name, for results of a format without the
    column); its analyses (per seed) and per-image results are merged into ``found``
    and ``masks``. Read through study.formats: the run's ``format.json`` beside them."""
    if formats.NAME in have:
        tracking.download(run_id, formats.NAME, d)
    df = read_results(tracking.download(run_id, "results.csv", d), job)
    if "per_image.json" in have:
        masks.update(read_masks(tracking.download(run_id, "per_image.json", d), df))
    if "analyses" in have:
        a = tracking.download(run_id, "analyses", d)
        if (a / "analyses.json").is_file():
            for seed, rep in by_seed(read_analyses(a)).items():
                slot = found["seeds"].setdefault(str(seed), {"datasets": {}})["datasets"]
                earlier = set(slot)  # another job's: both stay (their MMD entries name their job)
                for ds, v in rep.get("datasets", {}).items():
                    slot.setdefault(f"{ds} ({job})" if ds in earlier else ds, {}).update(v)
    return df
