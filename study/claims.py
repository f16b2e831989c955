"""The paper's five claims, judged under uncertainty.

Each claim is an effect written so that the paper's direction is positive (e.g.
DR(full fine-tune) − DR(standard model)), computed per target dataset on the models that
model selection picked, with a 95 % interval from a paired bootstrap over the same test
images, combined over the seeds (``study.stats.paired_effect``). A dataset's verdict is
**agree** when the interval excludes zero in the paper's direction, **disagree** when it
excludes it the other way, **inconclusive** otherwise. A claim's verdict counts its
datasets: agree when more than half agree and none disagrees, disagree the other way
round, inconclusive otherwise (also when the run lacks what the claim needs, with the
reason). The MMD claim is Spearman's ρ over the target datasets with a permutation
p-value, inconclusive below three datasets (two points always give ρ = ±1).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from study import stats
from study.methods import DEFAULT_LAMBDA, DEFENSES

TABLE1_ATTACK = "pgd10_linf_0.5"
MIN_MMD_DATASETS = 3


def picks(df: pd.DataFrame, dataset: str, method: str, attack: str) -> pd.DataFrame:
    """The selected models' rows, one per seed (of the paper's λ for DM, else the largest λ run)."""
    hit = df[(df.dataset == dataset) & (df.method == method) & (df.attack == attack)]
    if "selected" in hit:
        hit = hit[hit.selected.astype(bool)]
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


def _replicates(df: pd.DataFrame, masks: dict, dataset: str, methods: dict) -> list[dict]:
    """Per seed that has every model of ``methods`` (name -> method): name -> (correct,
    robust) under Table 1's attack, cut to the images all of them share."""
    out = []
    seeds = df.seed.dropna().unique().tolist() if "seed" in df and df.seed.notna().any() else [None]
    for seed in seeds:
        one = df if seed is None else df[df.seed == seed]
        rows = {name: picks(one, dataset, m, TABLE1_ATTACK) for name, m in methods.items()}
        if any(not len(r) for r in rows.values()):
            continue
        got = {name: masks.get(r.iloc[0].stage, {}).get(TABLE1_ATTACK) for name, r in rows.items()}
        if any(g is None for g in got.values()):
            continue
        arrays = {name: _arrays(g) for name, g in got.items()}
        n = min(len(c) for c, _ in arrays.values())
        out.append({name: (c[:n], r[:n]) for name, (c, r) in arrays.items()})
    return out


def _judge(claim: str, per_dataset: list[dict], missing: str) -> dict:
    """A claim's line from its datasets' effects."""
    if not per_dataset:
        return {"claim": claim, "verdict": "inconclusive", "detail": missing, "datasets": []}
    for d in per_dataset:
        d["verdict"] = stats.verdict(d["lo"], d["hi"])
    count = {v: sum(d["verdict"] == v for d in per_dataset) for v in ("agree", "disagree", "inconclusive")}
    half = len(per_dataset) / 2
    verdict = ("agree" if count["agree"] > half and not count["disagree"] else
               "disagree" if count["disagree"] > half and not count["agree"] else "inconclusive")
    detail = "; ".join(f"{d['dataset']}: {d['what']} {d['effect']:+.1f} [{d['lo']:+.1f}, {d['hi']:+.1f}] "
                       f"({d['images']} images, {d['seeds']} seed{'s' if d['seeds'] > 1 else ''}) {d['verdict']}"
                       for d in per_dataset)
    tally = f"agree on {count['agree']} of {len(per_dataset)} dataset{'s' if len(per_dataset) > 1 else ''}"
    return {"claim": claim, "verdict": verdict, "detail": f"{tally}: {detail}", "datasets": per_dataset}


def _dr_gap(a: str, b: str):
    def effect(models, idx):
        (ca, ra), (cb, rb) = models[a], models[b]
        return stats.dr(ca[idx], ra[idx]) - stats.dr(cb[idx], rb[idx])

    return effect


def _dr_claim(df, masks, datasets, claim, a, b, what, missing) -> dict:
    """DR of method ``a`` minus DR of method ``b``, per dataset."""
    per = []
    for d in datasets:
        reps = _replicates(df, masks, d, {a: a, b: b})
        if reps:
            per.append({"dataset": d, "what": what, **stats.paired_effect(reps, _dr_gap(a, b))})
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
    per = [{"dataset": d, "what": "DR under it, fine-tuned − standard", **stats.paired_effect(reps, _dr_gap("ft", "st"))}
           for d, reps in per_dataset.items()]
    return _judge("The pre-trained model's UAP transfers to fine-tuned models but not to standard ones.", per,
                  "no UAP transfer with per-image results in this run")


def _mmd_claim(df: pd.DataFrame, found: dict) -> dict:
    claim = "DR grows with the MMD between source and target."
    mmd: dict = {}
    for rep in by_seed(found).values():
        for d, v in rep.get("datasets", {}).items():
            if "mmd" in v:
                mmd.setdefault(d, []).append(v["mmd"]["mmd2"])
    pts = []
    for d, values in mmd.items():
        rows = picks(df, d, "full", TABLE1_ATTACK)
        if len(rows) and rows.DR.notna().any():
            pts.append((d, float(np.mean(values)), float(rows.DR.mean())))
    listing = ", ".join(f"{d} MMD² {m:.3f} DR {r:.1f}" for d, m, r in sorted(pts, key=lambda p: p[1]))
    if len(pts) < MIN_MMD_DATASETS:
        return {"claim": claim, "verdict": "inconclusive", "datasets": [],
                "detail": f"needs at least {MIN_MMD_DATASETS} target datasets with MMD and DR "
                          f"(ρ over two is always ±1), this run has {len(pts)}" + (f": {listing}" if pts else "")}
    rho, p = stats.spearman([m for _, m, _ in pts], [r for _, _, r in pts])
    verdict = "inconclusive" if not p < 0.05 or rho != rho else ("agree" if rho > 0 else "disagree")
    return {"claim": claim, "verdict": verdict, "rho": rho, "p": p, "datasets": [],
            "detail": f"Spearman ρ(MMD², DR) = {rho:.2f}, permutation p = {p:.3f}, over {len(pts)} target "
                      f"datasets: {listing}"}


def _dm_claim(df: pd.DataFrame, masks: dict, datasets: list) -> dict:
    """AAI of DM@stage-1&2 minus the best AAI among the other defenses (best per draw)."""
    per = []
    for d in datasets:
        rivals = [m for m in DEFENSES if m != "dm_stage12" and len(picks(df, d, m, TABLE1_ATTACK))]
        if not rivals or not len(picks(df, d, "dm_stage12", TABLE1_ATTACK)):
            continue
        reps = _replicates(df, masks, d, {"dm": "dm_stage12", **{m: m for m in rivals}})

        def effect(models, idx, rivals=rivals):
            best = np.max([models[m][1][idx].mean(-1) for m in rivals], axis=0)
            return 100.0 * (models["dm"][1][idx].mean(-1) - best)

        if reps:
            per.append({"dataset": d, "what": "AAI DM@stage-1&2 − best other defense", **stats.paired_effect(reps, effect)})
    return _judge("DM@stage-1&2 gives the best AAI among the defenses.", per,
                  "needs DM@stage-1&2 and another defense under " + TABLE1_ATTACK)


def judge(df: pd.DataFrame, found: dict, masks: dict) -> list[dict]:
    """The five claims on this run's results, analyses and per-image masks (stage ->
    attack -> {correct, robust}, results.per_image)."""
    datasets = list(dict.fromkeys(df.dataset[df.attack == TABLE1_ATTACK])) if len(df) else []
    masks = masks or {}
    return [
        _dr_claim(df, masks, datasets, "Fine-tuned models have a higher DR than standard ones.", "full", "scratch",
                  "DR full − standard", "no full fine-tune and standard model with per-image results under "
                  + TABLE1_ATTACK),
        _dr_claim(df, masks, datasets, "Partial fine-tuning is worse (higher DR) than full fine-tuning.", "partial",
                  "full", "DR partial − full", "no partial and full fine-tune with per-image results under "
                  + TABLE1_ATTACK),
        _uap_claim(found),
        _mmd_claim(df, found),
        _dm_claim(df, masks, datasets),
    ]

