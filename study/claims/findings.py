"""The paper's findings 1-4 judged per unit: DR and AAI of the full fine-tune against the
standard model (claim 1), partial against full (claim 2), the pre-trained UAP (claim 3),
the bottom-layer SVCCA, the MMD-DR correlation (claim 4), backbone capacity and source data."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from study import stats
from study.backbones import parameters
from study.claims.units import (
    _arrays,
    _unit_fields,
    by_seed,
    dr_gap,
    models_by_seed,
    once,
    picks,
    rate_gap,
    replicates_of,
)
from study.claims.verdicts import _flagged, _judge
from study.methods import METHODS, SOURCE_ALIAS, TABLE1_ATTACK, TABLE2_ATTACKS

MIN_MMD_DATASETS = 3
# claim 3's second half: "trivial influence on the standard model". A UAP at the analysis'
# eps that takes under a tenth of the images a standard model gets right is trivial beside
# the paper's fine-tuned models, most of whose right answers the same UAP turns (Fig. 5b)
TRIVIAL_DR = 10.0


def _pair_claim(df, masks, every, spec: tuple, attack: str = TABLE1_ATTACK) -> dict:
    """An effect of method ``a`` against method ``b`` per unit (each pair of models once);
    ``spec``: (id, claim, a, b, what, effect)."""
    cid, claim, a, b, what, effect = spec
    per = []
    for unit in once(df, every, (a, b)):
        reps = replicates_of(df, masks, unit, {a: a, b: b}, attack)
        if reps:
            per.append(
                {
                    **_unit_fields(unit, every),
                    "what": what,
                    **stats.paired_effect(reps, effect),
                    **_flagged(df, unit, {a: a, b: b}, attack),
                }
            )
    missing = f"no {METHODS[a].label} and {METHODS[b].label} with per-image results under {attack}"
    return {"id": cid, **_judge(claim, per, missing)}


def _aai_claims(df, masks, every) -> list[dict]:
    """Claim 1 on AAI: one line per attack of Table 2 this run has (Table 1's always)."""
    attacks = [TABLE1_ATTACK] + [a for a in TABLE2_ATTACKS if "attack" in df and (df.attack == a).any()]
    return [
        _pair_claim(
            df,
            masks,
            every,
            (
                f"1-aai:{a}",
                f"Under {a}, fine-tuned models have a lower AAI than standard ones.",
                "scratch",
                "full",
                "AAI standard − full",
                rate_gap("scratch", "full", 1),
            ),
            a,
        )
        for a in attacks
    ]


def _uap_claims(found: dict) -> list[dict]:
    """Claim 3: the DR the pre-trained model's UAP causes on the fine-tuned minus on the
    standard model; and its second half, the standard model's DR under it below
    TRIVIAL_DR (the effect TRIVIAL_DR − DR: agree when the whole interval is below it)."""
    per_dataset: dict = {}
    for rep in by_seed(found).values():
        for d, v in rep.get("datasets", {}).items():
            m = v.get("uap_transfer", {}).get("masks", {})
            if "fine-tuned" in m and "standard" in m:
                (cf, rf), (cs, rs) = _arrays(m["fine-tuned"]), _arrays(m["standard"])
                n = min(len(cf), len(cs))
                per_dataset.setdefault(d, []).append({"ft": (cf[:n], rf[:n]), "st": (cs[:n], rs[:n])})
    transfer = [
        {"dataset": d, "what": "DR under it, fine-tuned − standard", **stats.paired_effect(reps, dr_gap("ft", "st"))}
        for d, reps in per_dataset.items()
    ]

    def below(models, idx):
        return TRIVIAL_DR - stats.dr(models["st"][0][idx], models["st"][1][idx])

    trivial = [
        {"dataset": d, "what": f"{TRIVIAL_DR:g} − standard model's DR under it", **stats.paired_effect(reps, below)}
        for d, reps in per_dataset.items()
    ]
    missing = "no UAP transfer with per-image results in this run"
    return [
        {
            "id": "3-transfer",
            **_judge(
                "The pre-trained model's UAP transfers to fine-tuned models but not to standard ones.",
                transfer,
                missing,
            ),
        },
        {
            "id": "3-standard",
            **_judge(
                f"The pre-trained model's UAP has a trivial influence on the standard model (DR below {TRIVIAL_DR:g}).",
                trivial,
                missing,
            ),
        },
    ]


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


# claims 1 and 2 on Table 1's attack: (id, claim, method a, method b, what, effect)
PAIR_CLAIMS = [
    ("1-dr", "Fine-tuned models have a higher DR than standard ones.", "full", "scratch", "DR full − standard",
     dr_gap("full", "scratch")),
    ("2-dr", "Partial fine-tuning is worse (higher DR) than full fine-tuning.", "partial", "full", "DR partial − full",
     dr_gap("partial", "full")),
    ("2-aoi", "Full fine-tuning is better in accuracy too (higher AOI) than partial fine-tuning.", "full", "partial",
     "AOI full − partial", rate_gap("full", "partial", 0)),
]  # fmt: skip


def _cca_claim(found: dict) -> dict:
    """Fig. 3: in the bottom layer the fine-tuned model stays closer to the pre-trained
    one than to the standard model, and above the chance level: SVCCA(fine-tuned,
    pre-trained) − SVCCA(fine-tuned, standard), in points of 100 × SVCCA, over bootstrap
    draws of the images (the same draws for every seed) and the seeds; the margin over
    chance beside it. Agree: both intervals above zero; disagree: the first below."""
    ft_pre, ft_std = "fine-tuned|pre-trained", "fine-tuned|standard"
    per_dataset: dict = {}
    images: dict = {}
    for rep in by_seed(found).values():
        for d, v in rep.get("datasets", {}).items():
            cca = v.get("cca", {})
            draws = cca.get("bottom_draws", {})
            images[d] = min(images.get(d, 10**9), draws.get("images", 10**9))
            if all(k in cca and k in draws for k in (ft_pre, ft_std, "chance")):
                per_dataset.setdefault(d, []).append(
                    {k: (100.0 * cca[k]["bottom"], 100.0 * np.asarray(draws[k])) for k in (ft_pre, ft_std, "chance")}
                )
    per = []
    for d, reps in per_dataset.items():
        n = min(len(r[ft_pre][1]) for r in reps)

        def gap(other, reps=reps, n=n):
            points = [r[ft_pre][0] - r[other][0] for r in reps]
            return stats.combine(points, np.stack([r[ft_pre][1][:n] - r[other][1][:n] for r in reps]))

        closer, above = gap(ft_std), gap("chance")
        verdict = (
            "agree" if closer["lo"] > 0 and above["lo"] > 0 else "disagree" if closer["hi"] < 0 else "inconclusive"
        )
        what = "bottom-layer SVCCA ×100, (fine-tuned, pre-trained) − (fine-tuned, standard)"
        also = f"; above chance {above['effect']:+.1f} [{above['lo']:+.1f}, {above['hi']:+.1f}]"
        per.append({"dataset": d, "what": what, **closer, "images": images[d], "also": also, "verdict": verdict})
    return {
        "id": "cca",
        **_judge(
            "In the bottom layer the fine-tuned model is closer to the pre-trained model than to the standard one "
            "(and above chance).",
            per,
            "no bottom-layer SVCCA with bootstrap draws in this run",
        ),
    }


def _capacity_claim(df: pd.DataFrame, masks: dict, every: list[dict]) -> dict:
    """Table 3: the full fine-tune's DR falls as the pre-trained backbone grows. Per target
    (job, dataset, source data) with full fine-tunes of at least two backbones: minus the
    least-squares slope of DR on log10(parameters), in DR points per tenfold parameters,
    paired over the same test images and seeds."""
    groups: dict = {}
    for u in every:
        groups.setdefault((u["job"], u["dataset"], u["source_data"]), []).append(u)
    per = []
    for us in groups.values():
        us = [u for u in us if len(picks(df, u, "full", TABLE1_ATTACK))]
        if len(us) < 2:
            continue
        names = [u["backbone"] for u in us]
        reps = models_by_seed(df, masks, {u["backbone"]: (u, "full") for u in us})
        if not reps:
            continue
        x = np.log10([parameters(b) for b in names])
        xc = x - x.mean()

        def fall(models, idx, names=names, xc=xc):
            drs = np.stack([stats.dr(models[b][0][idx], models[b][1][idx]) for b in names])
            return -np.tensordot(xc, drs, axes=1) / float((xc**2).sum())

        what = "DR fall per tenfold parameters over " + ", ".join(names)
        per.append({**_unit_fields({**us[0], "backbone": ""}, every), "what": what, **stats.paired_effect(reps, fall)})
    return {
        "id": "capacity",
        **_judge(
            "A larger pre-trained backbone transfers less non-robustness: the full fine-tune's DR falls as it grows.",
            per,
            "needs full fine-tunes of at least two backbones on one target, source data and job",
        ),
    }


def _source_claim(df: pd.DataFrame, masks: dict, every: list[dict]) -> dict:
    """Table 4: pre-training on a source with more semantics (ImageNet-10animals) gives the
    full fine-tune a higher DR than pre-training on a poorer one (CIFAR10), and a higher
    AOI (reported beside it). Per target, job and backbone that has both."""
    rich, poor = "imagenet10animals", "cifar10"
    groups: dict = {}
    for u in every:
        alias = SOURCE_ALIAS.get(u["source_data"])
        if alias in (rich, poor):
            groups.setdefault((u["job"], u["dataset"], u["backbone"]), {})[alias] = u
    per = []
    for pair in groups.values():
        if len(pair) < 2:
            continue
        reps = models_by_seed(df, masks, {k: (u, "full") for k, u in pair.items()})
        if not reps:
            continue
        aoi = stats.paired_effect(reps, rate_gap(rich, poor, 0))
        also = f"; AOI {rich} − {poor} {aoi['effect']:+.1f} [{aoi['lo']:+.1f}, {aoi['hi']:+.1f}]"
        per.append(
            {
                **_unit_fields({**pair[rich], "source_data": ""}, every),
                "what": f"DR from {rich} − from {poor}",
                **stats.paired_effect(reps, dr_gap(rich, poor)),
                "also": also,
            }
        )
    return {
        "id": "source",
        **_judge(
            "A source task with more semantics (ImageNet-10animals) transfers more non-robustness (higher DR) "
            "than a poorer one (CIFAR10), with a higher AOI.",
            per,
            f"needs full fine-tunes of one target pre-trained on {rich} and on {poor}",
        ),
    }
