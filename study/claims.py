"""The paper's five claims, judged under uncertainty.

Each claim is an effect written so that the paper's direction is positive (e.g.
DR(full fine-tune) − DR(standard model)), computed per *unit* on the models that
model selection chose, with a 95 % interval from a paired bootstrap over the same test
images, combined over the seeds so that it covers the spread between training runs too
(``study.stats.paired_effect``; one seed covers the test images only, and says so). A unit is one job's
target dataset with one backbone and one source data (``units``): a comparison never
mixes two of them, also in a report merged from several jobs. A unit's verdict is
**agree** when the interval excludes zero in the paper's direction, **disagree** when it
excludes it the other way, **inconclusive** otherwise. A claim's verdict counts its
datasets: agree when more than half agree and none disagrees, disagree the other way
round, inconclusive otherwise (also when the run lacks what the claim needs, with the
reason). The MMD claim is Spearman's ρ over the target datasets with a permutation
p-value, inconclusive below three datasets (two points always give ρ = ±1). Claim 5 is
the paper's wording: DM@stage-1&2, at the λ chosen on validation, has a better AAI and
DR than every other defense with an AOI at most AOI_MARGIN points below the full
fine-tune's, on most units (the paper's own Table 5 has an exception, Cars).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from study import stats
from study.methods import AOI_MARGIN, DEFAULT_LAMBDA, DEFENSES, METHODS, TABLE1_ATTACK

MIN_MMD_DATASETS = 3
UNIT = ("job", "dataset", "backbone", "source_data")


def _col(df: pd.DataFrame, key: str) -> pd.Series:
    """A unit column as text ('' where empty or absent: results from before it existed)."""
    if key not in df:
        return pd.Series("", index=df.index)
    return df[key].astype(object).where(df[key].notna(), "").astype(str)


def units(df: pd.DataFrame) -> list[dict]:
    """Every (job, dataset, backbone, source data) of the stage-2 models, in the order
    they appear: one comparison each. The standard model, pre-trained on nothing, joins
    every unit of its job, dataset and backbone (a unit of its own where it is alone)."""
    tuned = df[df.method != "pretrain"] if len(df) else df
    keys = list(zip(*(_col(tuned, k).tolist() for k in UNIT)))
    scratch = [m in METHODS and METHODS[m].starts_from is None for m in tuned.method]
    found = list(dict.fromkeys(k for k, s in zip(keys, scratch) if not s))
    alone = [u for u in dict.fromkeys(k[:3] for k, s in zip(keys, scratch) if s) if not any(f[:3] == u for f in found)]
    return [dict(zip(UNIT, u)) for u in found] + [dict(zip(UNIT, (*u, ""))) for u in alone]


def label(unit: dict, every: list[dict]) -> str:
    """The unit's name in tables and claims: its dataset, plus what tells it apart from
    the others' (backbone, source data, job)."""
    same = [u for u in every if u["dataset"] == unit["dataset"]]
    parts = [unit["dataset"]]
    for key, fmt in (("backbone", "{}"), ("source_data", "from {}"), ("job", "job {}")):
        if len({u[key] for u in same}) > 1 and unit[key]:
            parts.append(fmt.format(unit[key]))
    return ", ".join(parts)


def picks(df: pd.DataFrame, unit: dict, method: str, attack: str) -> pd.DataFrame:
    """The rows of the model that stands for ``method`` in ``unit`` under ``attack``, one per
    seed: the chosen model (``results.select``: the selected trial, and DM's λ chosen on
    validation). Results from before ``chosen`` existed: the paper's λ if run, else the
    largest."""
    hit = df[(df.method == method) & (df.attack == attack)]
    keys = UNIT if METHODS.get(method) is None or METHODS[method].starts_from is not None else UNIT[:3]
    for k in keys:
        hit = hit[_col(hit, k) == unit[k]]
    if "selected" in hit:
        hit = hit[hit.selected.astype(bool)]
    if "chosen" in hit:
        return hit[hit.chosen.astype(bool)]
    if len(hit) and hit.lam.notna().any():
        lam = DEFAULT_LAMBDA if (hit.lam == DEFAULT_LAMBDA).any() else hit.lam.max()
        hit = hit[hit.lam == lam]
    return hit


def by_seed(found: dict) -> dict:
    """seed -> that replicate's analyses ``{"datasets": ...}``; a result written before
    replicates (one ``datasets`` at the top) is one replicate, of seed None."""
    if "seeds" in found:
        return found["seeds"]
    return {None: {"datasets": found.get("datasets", {})}}


def _arrays(entry: dict) -> tuple[np.ndarray, np.ndarray]:
    return stats.mask(entry["correct"]), stats.mask(entry["robust"])


def replicates_of(df: pd.DataFrame, masks: dict, unit: dict, methods: dict) -> list[dict]:
    """Per seed that has every model of ``methods`` (name -> method) in ``unit``: name ->
    (correct, robust) under Table 1's attack, cut to the images all of them share."""
    out = []
    seeds = df.seed.dropna().unique().tolist() if "seed" in df and df.seed.notna().any() else [None]
    for seed in seeds:
        one = df if seed is None else df[df.seed == seed]
        rows = {name: picks(one, unit, m, TABLE1_ATTACK) for name, m in methods.items()}
        if any(not len(r) for r in rows.values()):
            continue
        got = {name: masks.get(r.iloc[0].stage, {}).get(TABLE1_ATTACK) for name, r in rows.items()}
        if any(g is None for g in got.values()):
            continue
        arrays = {name: _arrays(g) for name, g in got.items()}
        n = min(len(c) for c, _ in arrays.values())
        out.append({name: (c[:n], r[:n]) for name, (c, r) in arrays.items()})
    return out


def _tally(per_dataset: list[dict], most: bool) -> str:
    """A claim's verdict from its units': agree when more than half agree, and (unless
    ``most``: the paper claims most, not all) none disagrees; disagree the other way round."""
    count = {v: sum(d["verdict"] == v for d in per_dataset) for v in ("agree", "disagree", "inconclusive")}
    half = len(per_dataset) / 2
    if count["agree"] > half and (most or not count["disagree"]):
        return "agree"
    if count["disagree"] > half and (most or not count["agree"]):
        return "disagree"
    return "inconclusive"


def _judge(claim: str, per_dataset: list[dict], missing: str, most: bool = False) -> dict:
    """A claim's line from its units' effects (a unit that has a verdict keeps it).
    ``covers`` says what its intervals cover: test images and training runs, or, where a
    unit rests on one training run, test images only."""
    if not per_dataset:
        return {"claim": claim, "verdict": "inconclusive", "detail": missing, "datasets": []}
    for d in per_dataset:
        d.setdefault("verdict", stats.verdict(d["lo"], d["hi"]))
    verdict = _tally(per_dataset, most)
    detail = "; ".join(
        f"{d['dataset']}: {d['what']} {d['effect']:+.1f} [{d['lo']:+.1f}, {d['hi']:+.1f}]"
        f"{d.get('also', '')} ({d['images']} images, {_runs(d['seeds'])}) {d['verdict']}"
        for d in per_dataset
    )
    n = len(per_dataset)
    tally = f"agree on {sum(d['verdict'] == 'agree' for d in per_dataset)} of {n} dataset{'s' if n > 1 else ''}"
    one = any(d.get("covers") == stats.COVERS_IMAGES for d in per_dataset)
    return {
        "claim": claim,
        "verdict": verdict,
        "covers": stats.COVERS_IMAGES if one else stats.COVERS_RUNS,
        "detail": f"{tally}: {detail}",
        "datasets": per_dataset,
    }


def _runs(seeds: int) -> str:
    if seeds == 1:
        return "one training run: the interval covers test images only"
    return f"{seeds} seeds: the interval covers test images and training runs"


def qualifier(claim: dict) -> str:
    """What to say beside a verdict: '' or 'one training run' (its intervals cover the
    test images only, not the spread between training runs)."""
    return "one training run" if claim.get("covers") == stats.COVERS_IMAGES else ""


def dr_gap(a: str, b: str):
    def effect(models, idx):
        (ca, ra), (cb, rb) = models[a], models[b]
        return stats.dr(ca[idx], ra[idx]) - stats.dr(cb[idx], rb[idx])

    return effect


def _unit_fields(unit: dict, every: list[dict]) -> dict:
    return {"dataset": label(unit, every), **{f"unit_{k}": unit[k] for k in UNIT}}


def _models(df: pd.DataFrame, unit: dict, methods) -> frozenset:
    """The stage keys of the models that stand for ``methods`` in ``unit``, over the seeds."""
    return frozenset(s for m in methods for s in picks(df, unit, m, TABLE1_ATTACK).stage)


def once(df: pd.DataFrame, every: list[dict], methods) -> list[dict]:
    """The units whose models no earlier unit compared: jobs that share an OUT share the
    models they have in common (the same stage key), and a model counts once in a tally."""
    if "stage" not in df:
        return every
    seen, out = set(), []
    for unit in every:
        models = _models(df, unit, methods)
        if models and models in seen:
            continue
        seen.add(models)
        out.append(unit)
    return out


def _dr_claim(df, masks, every, claim, a, b, what, missing) -> dict:
    """DR of method ``a`` minus DR of method ``b``, per unit (each pair of models once)."""
    per = []
    for unit in once(df, every, (a, b)):
        reps = replicates_of(df, masks, unit, {a: a, b: b})
        if reps:
            per.append({**_unit_fields(unit, every), "what": what, **stats.paired_effect(reps, dr_gap(a, b))})
    return _judge(claim, per, missing)


def _uap_claim(found: dict) -> dict:
    """DR the pre-trained model's UAP causes on the fine-tuned minus on the standard model."""
    per_dataset: dict = {}
    for rep in by_seed(found).values():
        for d, v in rep.get("datasets", {}).items():
            m = v.get("uap_transfer", {}).get("masks", {})
            if "fine-tuned" in m and "standard" in m:
                (cf, rf), (cs, rs) = _arrays(m["fine-tuned"]), _arrays(m["standard"])
                n = min(len(cf), len(cs))
                per_dataset.setdefault(d, []).append({"ft": (cf[:n], rf[:n]), "st": (cs[:n], rs[:n])})
    per = [
        {"dataset": d, "what": "DR under it, fine-tuned − standard", **stats.paired_effect(reps, dr_gap("ft", "st"))}
        for d, reps in per_dataset.items()
    ]
    return _judge(
        "The pre-trained model's UAP transfers to fine-tuned models but not to standard ones.",
        per,
        "no UAP transfer with per-image results in this run",
    )


def mmd_by_unit(found: dict) -> dict:
    """(job, backbone, dataset) -> the MMD² of each seed; an entry written before MMD named
    its job and backbone has '' for both."""
    mmd: dict = {}
    for rep in by_seed(found).values():
        for d, v in rep.get("datasets", {}).items():
            if "mmd" in v:
                m = v["mmd"]
                mmd.setdefault((m.get("job", ""), m.get("backbone", ""), m.get("dataset", d)), []).append(m["mmd2"])
    return mmd


def mmd_for(mmd: dict, unit: dict) -> list:
    """A unit's MMD² per seed: matched by job, backbone and dataset (by dataset alone for
    entries that do not name them)."""
    return mmd.get((unit["job"], unit["backbone"], unit["dataset"])) or mmd.get(("", "", unit["dataset"])) or []


def _mmd_claim(df: pd.DataFrame, found: dict, every: list[dict]) -> dict:
    """Spearman's ρ of MMD² against the full fine-tune's DR over the target datasets of
    one job, backbone and source data (the group with the most of them)."""
    claim = "DR grows with the MMD between source and target."
    mmd = mmd_by_unit(found)
    groups: dict = {}
    for unit in every:
        got = mmd_for(mmd, unit)
        rows = picks(df, unit, "full", TABLE1_ATTACK) if got else []
        if len(rows) and rows.DR.notna().any():
            groups.setdefault((unit["job"], unit["backbone"], unit["source_data"]), []).append(
                (unit["dataset"], float(np.mean(got)), float(rows.DR.mean()))
            )
    pts = max(groups.values(), key=len, default=[])
    listing = ", ".join(f"{d} MMD² {m:.3f} DR {r:.1f}" for d, m, r in sorted(pts, key=lambda p: p[1]))
    if len(pts) < MIN_MMD_DATASETS:
        return {
            "claim": claim,
            "verdict": "inconclusive",
            "datasets": [],
            "detail": f"needs at least {MIN_MMD_DATASETS} target datasets with MMD and DR "
            f"(ρ over two is always ±1), this run has {len(pts)}" + (f": {listing}" if pts else ""),
        }
    rho, p = stats.spearman([m for _, m, _ in pts], [r for _, _, r in pts])
    verdict = "inconclusive" if not p < 0.05 or rho != rho else ("agree" if rho > 0 else "disagree")
    floor = 2.0 / math.factorial(len(pts))  # the exact test's smallest two-sided p: ρ = ±1
    note = (
        f"; with {len(pts)} datasets the smallest possible p is 2/{len(pts)}! = {floor:.3f}, so p < 0.05 "
        f"needs at least 5"
        if floor >= 0.05
        else ""
    )
    return {
        "claim": claim,
        "verdict": verdict,
        "rho": rho,
        "p": p,
        "datasets": [],
        "detail": f"Spearman ρ(MMD², DR) = {rho:.2f}, permutation p = {p:.3f}, over {len(pts)} target "
        f"datasets: {listing}{note}",
    }


def _dm_unit(df: pd.DataFrame, masks: dict, unit: dict, every: list[dict]) -> dict | None:
    """Claim 5 on one unit: AAI of DM@stage-1&2 minus the best other defense's (the best
    per draw), the same for DR (the best: the lowest), and DM's AOI against the full
    fine-tune's. Agree: DM's AAI and DR are better with intervals clear of zero, and its
    AOI interval reaches above the full fine-tune's minus AOI_MARGIN; disagree: a rival's
    AAI is better beyond doubt, or DM's AOI is below that margin beyond doubt."""
    rivals = [m for m in DEFENSES if m != "dm_stage12" and len(picks(df, unit, m, TABLE1_ATTACK))]
    if not rivals or not len(picks(df, unit, "dm_stage12", TABLE1_ATTACK)):
        return None
    with_full = {"full": "full"} if len(picks(df, unit, "full", TABLE1_ATTACK)) else {}
    reps = replicates_of(df, masks, unit, {"dm": "dm_stage12", **with_full, **{m: m for m in rivals}})
    if not reps:
        return None

    def aai(models, idx):
        best = np.max([models[m][1][idx].mean(-1) for m in rivals], axis=0)
        return 100.0 * (models["dm"][1][idx].mean(-1) - best)

    def dr(models, idx):
        best = np.nanmin([stats.dr(*[a[idx] for a in models[m]]) for m in rivals], axis=0)
        return best - stats.dr(models["dm"][0][idx], models["dm"][1][idx])

    gain, drop = stats.paired_effect(reps, aai), stats.paired_effect(reps, dr)
    also = f"; DR best other − DM {drop['effect']:+.1f} [{drop['lo']:+.1f}, {drop['hi']:+.1f}]"
    aoi_ok = True
    if with_full:
        gap = stats.paired_effect(reps, lambda m, idx: 100.0 * (m["dm"][0][idx].mean(-1) - m["full"][0][idx].mean(-1)))
        aoi_ok = gap["hi"] >= -AOI_MARGIN
        also += f"; AOI DM − full {gap['effect']:+.1f} [{gap['lo']:+.1f}, {gap['hi']:+.1f}] (margin {AOI_MARGIN:g})"
    verdict = (
        "agree"
        if gain["lo"] > 0 and drop["lo"] > 0 and aoi_ok
        else "disagree"
        if gain["hi"] < 0 or not aoi_ok
        else "inconclusive"
    )
    return {
        **_unit_fields(unit, every),
        "what": "AAI DM@stage-1&2 − best other defense",
        **gain,
        "also": also,
        "verdict": verdict,
        "rivals": rivals,
    }


def _dm_claim(df: pd.DataFrame, masks: dict, every: list[dict]) -> dict:
    shown = ("dm_stage12", "full", *DEFENSES)
    per = [d for d in (_dm_unit(df, masks, u, every) for u in once(df, every, shown)) if d is not None]
    return _judge(
        "DM@stage-1&2 gives a better AAI and DR than the other defenses, keeping the full fine-tune's "
        "AOI, on most datasets.",
        per,
        "needs DM@stage-1&2 and another defense under " + TABLE1_ATTACK,
        most=True,
    )


# claims 1 and 2: (claim, method a, method b, what the effect is, what a run without them lacks)
DR_CLAIMS = [
    (
        "Fine-tuned models have a higher DR than standard ones.",
        "full",
        "scratch",
        "DR full − standard",
        "no full fine-tune and standard model with per-image results under " + TABLE1_ATTACK,
    ),
    (
        "Partial fine-tuning is worse (higher DR) than full fine-tuning.",
        "partial",
        "full",
        "DR partial − full",
        "no partial and full fine-tune with per-image results under " + TABLE1_ATTACK,
    ),
]


def judge(df: pd.DataFrame, found: dict, masks: dict) -> list[dict]:
    """The five claims on this run's results, analyses and per-image masks (stage ->
    attack -> {correct, robust}, results.per_image)."""
    every = units(df[df.attack == TABLE1_ATTACK]) if len(df) else []
    masks = masks or {}
    return [
        *(_dr_claim(df, masks, every, *spec) for spec in DR_CLAIMS),
        _uap_claim(found),
        _mmd_claim(df, found, every),
        _dm_claim(df, masks, every),
    ]
