"""What the claims compare: units (a job's target, backbone and source data), the model
that stands for a method in a unit, its per-image masks per seed, and the effects
(DR, AOI/AAI and relative corruption error gaps) written in the paper's direction."""

from __future__ import annotations

import numpy as np
import pandas as pd

from study import corruptions, stats
from study.methods import DEFAULT_LAMBDA, METHODS, STRONG_ATTACK, TABLE1_ATTACK

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
    """seed -> that replicate's analyses ``{"datasets": ...}`` (an older format's file is
    read into this shape by study.formats)."""
    return found.get("seeds", {})


def _arrays(entry: dict) -> tuple[np.ndarray, np.ndarray]:
    return stats.mask(entry["correct"]), stats.mask(entry["robust"])


def replicates_of(df: pd.DataFrame, masks: dict, unit: dict, methods: dict, attack: str = TABLE1_ATTACK) -> list[dict]:
    """Per seed that has every model of ``methods`` (name -> method) in ``unit``: name ->
    (correct, robust) under ``attack`` (Table 1's), cut to the images all of them share."""
    return models_by_seed(df, masks, {name: (unit, m) for name, m in methods.items()}, attack)


def models_by_seed(df: pd.DataFrame, masks: dict, wanted: dict, attack: str = TABLE1_ATTACK, arrays=None) -> list[dict]:
    """``replicates_of`` for models of several units (of one target's test images):
    ``wanted``: name -> (unit, method). ``arrays(name -> the model's masks of every
    attack)`` gives name -> (correct, robust) where not one attack's masks are wanted
    (``corrupted``), or None where the models lack what it needs."""
    out = []
    seeds = df.seed.dropna().unique().tolist() if "seed" in df and df.seed.notna().any() else [None]
    for seed in seeds:
        one = df if seed is None else df[df.seed == seed]
        rows = {name: picks(one, unit, m, attack) for name, (unit, m) in wanted.items()}
        if any(not len(r) for r in rows.values()):
            continue
        if arrays is not None:
            got = arrays({name: masks.get(r.iloc[0].stage, {}) for name, r in rows.items()})
            if got is None:
                continue
        else:
            got = {name: masks.get(r.iloc[0].stage, {}).get(attack) for name, r in rows.items()}
            if any(g is None for g in got.values()):
                continue
            got = {name: _arrays(g) for name, g in got.items()}
        n = min(len(c) for c, _ in got.values())
        out.append({name: (c[:n], r[:n]) for name, (c, r) in got.items()})
    return out


def corrupted(models: dict) -> dict | None:
    """name -> (clean correctness, the share of the corruption items each image is right
    under) over the items every model has (None where they share none): the per-image
    accuracy under corruption that the corruption claims pair over images."""
    shared = set.intersection(*({k for k in m if corruptions.parse(k)} for m in models.values()))
    if not shared:
        return None
    shared = sorted(shared)
    out = {}
    for name, m in models.items():
        rob = [stats.mask(m[k]["robust"]) for k in shared]
        n = min(len(r) for r in rob)
        out[name] = (stats.mask(m[shared[0]]["correct"])[:n], np.mean([r[:n] for r in rob], axis=0))
    return out


def corruption_item(df: pd.DataFrame) -> str | None:
    """A corruption item this run evaluated (the rows ``picks`` finds a model by), if any."""
    names = [a for a in df.attack.dropna().unique() if corruptions.parse(a)] if "attack" in df else []
    return names[0] if names else None


def dr_gap(a: str, b: str):
    def effect(models, idx):
        (ca, ra), (cb, rb) = models[a], models[b]
        return stats.dr(ca[idx], ra[idx]) - stats.dr(cb[idx], rb[idx])

    return effect


def rate_gap(a: str, b: str, which: int):
    """AOI (``which`` 0) or AAI (1) of model ``a`` minus model ``b``, in points."""

    def effect(models, idx):
        return 100.0 * (models[a][which][idx].mean(-1) - models[b][which][idx].mean(-1))

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


def strong_names(df: pd.DataFrame) -> list[str]:
    """The strong evaluations at Table 1's eps that ``df`` may hold, the standard one first,
    then versions a job named (``strong_linf_0.5[version=apgd]``)."""
    named = df.attack.dropna().unique() if "attack" in df else []
    return [STRONG_ATTACK, *sorted(a for a in named if str(a).startswith(STRONG_ATTACK + "["))]


def strong_picks(df: pd.DataFrame, unit: dict, method: str) -> pd.DataFrame:
    """``picks`` under the first strong evaluation (``strong_names``) the model met."""
    for name in strong_names(df):
        rows = picks(df, unit, method, name)
        if len(rows):
            return rows
    return df.iloc[:0]


def strongest(df: pd.DataFrame, masks: dict, unit: dict, methods: dict) -> tuple[str, list[dict]]:
    """The attack a robustness claim on ``methods`` in ``unit`` rests on, and its
    replicates (``replicates_of``): a strong evaluation (worst case) at Table 1's eps
    where every seed that has all the models was evaluated by it (the standard version
    before a cheaper one), the paper's PGD-10 otherwise."""
    paper = replicates_of(df, masks, unit, methods)
    for name in strong_names(df):
        strong = replicates_of(df, masks, unit, methods, name)
        if strong and len(strong) == len(paper):
            return name, strong
    return TABLE1_ATTACK, paper


def _items_of(df: pd.DataFrame, masks: dict, unit: dict) -> list[str]:
    """The corruption items both models of ``unit`` have on every seed (``corrupted``'s)."""
    stages = [s for m in ("scratch", "full") for s in picks(df, unit, m, corruption_item(df)).stage]
    shared = set.intersection(*({k for k in masks.get(s, {}) if corruptions.parse(k)} for s in stages))
    return [k.removeprefix("corruption_") for k in sorted(shared)]


def relative_error_gap(a: str, b: str):
    """Relative corruption error (clean accuracy − accuracy under corruption, per image)
    of model ``a`` minus model ``b``, in points."""

    def effect(models, idx):
        (ca, ra), (cb, rb) = models[a], models[b]
        return 100.0 * ((ca[idx] - ra[idx]).mean(-1) - (cb[idx] - rb[idx]).mean(-1))

    return effect
