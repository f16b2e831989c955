"""A run read back: its ``results.csv`` and ``analyses.json`` from a folder, or the newest
finished job runs of an MLflow store (through ``study.tracking``), and the replicates'
analyses merged into means and spreads."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from study import tracking
from study.claims import by_seed


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


def read_results(path, job: str = "") -> pd.DataFrame:
    """A ``results.csv``; one written by an earlier version reads as the new one (``setting``
    is ``method``, a missing ``job`` is ``job``, a missing ``chosen`` is ``selected``)."""
    df = pd.read_csv(path).rename(columns={"setting": "method"})
    if "job" not in df:
        df.insert(0, "job", job)
    df["job"] = df["job"].fillna(job).astype(str)
    if "selected" in df:
        df["selected"] = df["selected"].fillna(True).astype(bool)
    if "chosen" not in df and "selected" in df:
        df["chosen"] = df["selected"]
    return df


def read_analyses(folder) -> dict:
    """``folder/analyses.json`` with each UAP image's path pointing into ``folder`` (the
    run wrote paths under its own OUT; a download or a copy moves the images)."""
    folder = Path(folder)
    found = json.loads((folder / "analyses.json").read_text())
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
    """A job run's results frame (``job``: its name, for results written before the
    column); its analyses (per seed) and per-image results are merged into ``found``
    and ``masks``."""
    df = read_results(tracking.download(run_id, "results.csv", d), job)
    if "per_image.json" in have:
        masks.update(json.loads(tracking.download(run_id, "per_image.json", d).read_text()))
    if "analyses" in have:
        a = tracking.download(run_id, "analyses", d)
        if (a / "analyses.json").is_file():
            for seed, rep in by_seed(read_analyses(a)).items():
                slot = found["seeds"].setdefault(str(seed), {"datasets": {}})["datasets"]
                earlier = set(slot)  # another job's: both stay (their MMD entries name their job)
                for ds, v in rep.get("datasets", {}).items():
                    slot.setdefault(f"{ds} ({job})" if ds in earlier else ds, {}).update(v)
    return df
