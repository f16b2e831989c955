"""The results table: one tidy row per trained model and attack.

``job`` is the job's name (its MLflow experiment): a merged report keeps jobs apart.
``method`` is ``pretrain`` for a stage-1 backbone, else the stage-2 method (study.methods:
scratch, partial, full, at_stage2, dm_stage12, ...); ``lam``, ``lr_f``, ``lr_g``,
``optimizer`` are the sweep trial's point, ``val_acc`` its validation accuracy
(``val_acc_1`` after its first epoch: how much a pre-trained start helps), ``val_AAI`` (λ
methods) its accuracy under the strong evaluation at Table 1's eps on the validation images, ``f_l1`` the mean
||f(x)||_1 of its features there (a DM model can lower LL by shrinking f); ``selected``
whether it is the trial that model selection (best ``val_acc`` per dataset, backbone,
method, λ and seed) picked, and ``chosen`` whether it is the model that stands for its
method in the tables and claims: the selected trial, and for a λ method the λ chosen on
validation too (``select``); ``stage`` is the model's key (its checkpoint is
``OUT/checkpoints/*-<stage>.pt``). ``source`` is the pre-training objective (``standard``,
``pgd3_linf_4.0``, ...): of the backbone itself for a ``pretrain`` row, of the backbone a
fine-tune started from otherwise (empty for the standard model, which has none);
``source_data`` the data it was pre-trained on (the source task, ``imagenet`` for imported
weights).

``OUT/results.csv`` is for machines, ``OUT/results.md`` and the console for people.
AOI, AAI and DR are percentages; a clean row (empty attack) has the AOI of the whole
test images the job evaluates (``eval.max_images``; a stage-1 backbone's: every test
image), an attack row the AOI and AAI of the ``images`` it attacked. ``flags`` is
``ok`` or the failed sanity flags that concern the row; ``paper_*`` hold the paper's
published value where it has one. ``OUT/sanity.csv`` lists every flag of every model.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from study import evaluate, stats
from study.config import JobConfig
from study.files import atomic_write_text
from study.methods import AOI_MARGIN, METHODS, STRONG_ATTACK
from study.report.paper import paper_for_row
from study.report.tables import claims_section, premise, replicates, sections
from study.weights import parse as parse_weights

COLUMNS = (
    "job dataset backbone method source source_data seed lam lr_f lr_g optimizer val_acc val_acc_1 "
    "val_AAI f_l1 selected chosen attack images AOI AOI_lo AOI_hi AAI AAI_lo AAI_hi DR DR_lo DR_hi flags "
    "paper_AOI paper_AAI paper_DR stage"
).split()
SANITY_COLUMNS = ("job dataset backbone method source source_data seed lam flag attack passed detail stage").split()


def source_data(cfg: JobConfig, method: str) -> str | None:
    """What a model's backbone was pre-trained on (Table 4 compares these)."""
    if method != "pretrain" and METHODS[method].starts_from is None:
        return None
    p = cfg.pretrain
    if p.weights is None:
        return p.dataset  # the job's key: a folder dataset's name says little
    trained = {parse_weights(p.weights_for(name)).trained_on for name in p.objective_names()}
    return "imagenet" if "imagenet" in trained or len(trained) > 1 else trained.pop()


def model_rows(
    cfg: JobConfig, model: dict, record: dict, records: list[dict], flags: list, point: dict | None = None
) -> tuple[list[dict], list[dict]]:
    """Result rows of one model (``model``: its dataset key, backbone, method, source
    objective and stage key): the clean row, then one per attack; and its sanity rows.
    ``point`` is a sweep trial's λ, rates and optimiser."""
    point = point or {}
    history = record.get("history") or [{}]
    # the job's key names the dataset in results (unique in a job; the paper's name in its job files)
    base = {
        "job": cfg.name,
        **model,
        "source_data": source_data(cfg, model["method"]),
        **{k: point.get(k) for k in ("lam", "lr_f", "lr_g", "optimizer")},
        "val_acc": history[-1].get("val_acc"),
        "val_acc_1": history[0].get("val_acc"),
        # what chooses λ: only a validation AAI under the strong evaluation (one measured
        # under the paper's PGD-10, before it, would reward a masked λ)
        "val_AAI": record.get("val_AAI") if record.get("val_attack") == STRONG_ATTACK else None,
        "f_l1": record.get("f_l1"),
    }
    n = model.pop("images", None)
    base.pop("images", None)
    clean = {}
    if n:  # the clean AOI's interval over its n images
        lo, hi = stats.wilson(round(record["AOI"] * n / 100), n)
        clean = {"images": n, "AOI_lo": lo, "AOI_hi": hi}
    rows = [{**base, "AOI": record["AOI"], **clean}]
    for r in records:
        if r["probe"]:
            continue
        bad = [f.name for f in evaluate.failed(flags, r["attack"])]
        rows.append(
            {
                **base,
                "attack": r["attack"],
                "images": r["images"],
                "AOI": r["AOI"],
                "AAI": r["AAI"],
                "DR": r["DR"],
                **intervals(r, cfg.seed),
                "flags": "; ".join(bad) if bad else "ok",
            }
        )
    sanity = [{**base, "flag": f.name, "attack": f.attack, "passed": f.passed, "detail": f.detail} for f in flags]
    return rows, sanity


def intervals(record: dict, seed: int = 0) -> dict:
    """95 % intervals over the attacked images: Wilson for AOI and AAI, bootstrap for DR."""
    correct, robust = stats.mask(record["correct"]), stats.mask(record["robust"])
    n = len(correct)
    (a, b), (c, d) = stats.wilson(int(correct.sum()), n), stats.wilson(int(robust.sum()), n)
    e, f = stats.dr_interval(correct, robust, seed)
    return {"AOI_lo": a, "AOI_hi": b, "AAI_lo": c, "AAI_hi": d, "DR_lo": e, "DR_hi": f}


def per_image(records: list[dict]) -> dict:
    """attack -> the per-image clean and robust masks (what paired comparisons need)."""
    return {r["attack"]: {"correct": r["correct"], "robust": r["robust"]} for r in records if not r["probe"]}


def select(rows: list[dict]) -> None:
    """Model selection, on the validation split only (the test split never chooses).
    ``selected``: per (dataset, backbone, method, λ, seed) the trial with the best
    validation accuracy (ties: the first). ``chosen``: the model that stands for its
    method, the selected one, and for a λ method (DM) the λ chosen on validation
    (``choose_lambda``). Stage-1 rows have no rivals."""
    best: dict = {}
    for r in rows:
        if r["method"] == "pretrain" or r.get("attack"):
            continue
        k = (r["dataset"], r["backbone"], r["method"], r.get("lam"), r.get("seed"))
        val = -1.0 if r.get("val_acc") is None else r["val_acc"]
        if k not in best or val > best[k][0]:
            best[k] = (val, r["stage"])
    picked = {stage for _, stage in best.values()}
    for r in rows:
        r["selected"] = r["method"] == "pretrain" or r["stage"] in picked
    chosen = choose_lambda([r for r in rows if r["selected"] and not r.get("attack")])
    for r in rows:
        r["chosen"] = r["selected"] and (r.get("lam") is None or r["stage"] in chosen)


def choose_lambda(clean: list[dict]) -> set[str]:
    """Per (dataset, backbone, method, seed) of a λ method, the stage of the λ chosen on
    validation: the best validation AAI (the strong evaluation on the validation images) among
    the λ whose validation accuracy is at most AOI_MARGIN points below the full
    fine-tune's (all of them if none is, or without a full fine-tune); models without a
    validation AAI under the strong evaluation (trained before it) compare validation
    accuracy instead."""
    full = {(r["dataset"], r["backbone"], r.get("seed")): r.get("val_acc") for r in clean if r["method"] == "full"}
    groups: dict = {}
    for r in clean:
        if r.get("lam") is not None:
            groups.setdefault((r["dataset"], r["backbone"], r["method"], r.get("seed")), []).append(r)
    chosen = set()
    for (dataset, backbone, _, seed), group in groups.items():
        floor = full.get((dataset, backbone, seed))
        keep = [r for r in group if floor is None or (r.get("val_acc") or 0.0) >= floor - AOI_MARGIN] or group
        score = lambda r: (-1.0 if r.get("val_AAI") is None else r["val_AAI"], r.get("val_acc") or 0.0)  # noqa: E731
        chosen.add(max(keep, key=score)["stage"])
    return chosen


def frame(rows: list[dict]) -> pd.DataFrame:
    rows = [{**paper_for_row(r["dataset"], r["method"], r.get("attack")), **r} for r in rows]
    df = pd.DataFrame(rows, columns=COLUMNS)
    numbers = "AOI AOI_lo AOI_hi AAI AAI_lo AAI_hi DR DR_lo DR_hi val_acc val_acc_1 val_AAI f_l1 paper_AOI paper_AAI"
    for col in [*numbers.split(), "paper_DR"]:
        df[col] = pd.to_numeric(df[col], errors="coerce").round(2)
    df["selected"] = df["selected"].fillna(True).astype(bool)
    df["chosen"] = df["chosen"].where(df["chosen"].notna(), df["selected"]).astype(bool)
    df["images"] = pd.to_numeric(df["images"], errors="coerce").astype("Int64")
    df["seed"] = pd.to_numeric(df["seed"], errors="coerce").astype("Int64")
    return df


def to_markdown(df: pd.DataFrame) -> str:
    return df.astype(object).where(df.notna(), "").to_markdown(index=False, floatfmt=".2f")


def sanity_markdown(sanity: pd.DataFrame) -> str:
    if sanity.empty:
        return ""
    bad = sanity[~sanity.passed.astype(bool)]
    head = f"## Sanity checks: {len(sanity) - len(bad)} of {len(sanity)} passed" + ("" if len(bad) else " (all)")
    if bad.empty:
        names = ", ".join(dict.fromkeys(sanity.flag))
        return f"{head}\n\nChecked: {names}."
    cols = ["dataset", "method", "source", "lam", "flag", "attack", "detail"]
    return head + "\n\nFailed (shown, not hidden):\n\n" + to_markdown(bad[cols])


def write(
    df: pd.DataFrame,
    out: Path,
    title: str = "",
    sanity: list[dict] | None = None,
    masks: dict | None = None,
    checked: list[dict] | None = None,
) -> tuple[pd.DataFrame, str]:
    """Writes the results frame (``frame``) as results.csv, and results.md, sanity.csv and
    per_image.json (stage -> attack -> per-image masks), atomically; returns the frame and
    the Markdown (the claims as ``checked``, study.claims.judge, the paper's tables, then
    the sanity checks, then every row)."""
    import json

    out = Path(out)
    san = pd.DataFrame(sanity or [], columns=SANITY_COLUMNS)
    atomic_write_text(out / "results.csv", df.to_csv(index=False))
    atomic_write_text(out / "per_image.json", json.dumps(masks or {}, sort_keys=True))
    atomic_write_text(out / "sanity.csv", san.to_csv(index=False))
    parts = [
        f"# {title}" if title else "",
        replicates(df),
        premise(df),
        claims_section(checked or []),
        *sections(df),
        sanity_markdown(san),
        "## All results\n\n" + to_markdown(df),
    ]
    md = "\n\n".join(p for p in parts if p) + "\n"
    atomic_write_text(out / "results.md", md)
    return df, md
