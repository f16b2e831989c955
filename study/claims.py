"""The paper's five claims, judged under uncertainty.

Each claim is an effect written so that the paper's direction is positive (e.g.
DR(full fine-tune) − DR(standard model)), computed per *unit* on the models that
model selection chose, with a 95 % interval from a paired bootstrap over the same test
images, combined over the seeds so that it covers the spread between training runs too
(``study.stats.paired_effect``; one seed covers the test images only, and says so). A unit is one job's
target dataset with one backbone and one source data (``units``): a comparison never
mixes two of them, also in a report merged from several jobs. A unit of several training
runs **agrees** when the interval excludes zero in the paper's direction, **disagrees**
when it excludes it the other way, **inconclusive** otherwise; a unit of one training run
can only **suggest** or **contradict** (its interval covers the test images, not the
training runs), and never counts in a tally. A unit whose models failed a sanity flag
under the attack it rests on is inconclusive (``_flagged``). A claim's verdict counts its
datasets: agree when more than half agree and none disagrees, disagree the other way
round, inconclusive otherwise (also when the run lacks what the claim needs, with the
reason). The MMD claim is Spearman's ρ over the target datasets with a permutation
p-value, inconclusive below three datasets (two points always give ρ = ±1). Claim 5 is
the paper's wording: DM@stage-1&2, at the λ chosen on validation, has a better AAI and
DR than every defense the paper compares it with (AT@stage-1, AT@stage-2, AT@stage-1&2,
KD@stage-2), one paired interval per rival with Holm's correction across them, with an
AOI shown non-inferior (at most AOI_MARGIN points below the full fine-tune's), on most
units (the paper's own Table 5 has exceptions: Cars and Food, where AT@stage-1&2's AAI is
higher); DM@stage-2 and TRADES, which the paper does not compare, are judged against DM on
a line of their own. Robustness for claim 5 comes from the strongest evaluation the job ran
on every model of the unit: the strong evaluation's worst case at Table 1's eps where it
ran, the paper's PGD-10 otherwise (and the claim says which).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from study import corruptions, stats
from study.attacks import parse_attack, title
from study.backbones import parameters
from study.methods import (
    AOI_MARGIN,
    DEFAULT_LAMBDA,
    METHODS,
    OTHER_RIVALS,
    RIVALS,
    SOURCE_ALIAS,
    STRONG_ATTACK,
    TABLE1_ATTACK,
    TABLE2_ATTACKS,
)

MIN_MMD_DATASETS = 3
# claim 3's second half: "trivial influence on the standard model". A UAP at the analysis'
# eps that takes under a tenth of the images a standard model gets right is trivial beside
# the paper's fine-tuned models, most of whose right answers the same UAP turns (Fig. 5b)
TRIVIAL_DR = 10.0
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


# what a unit of one training run says in place of agree / disagree: its interval covers
# the test images only, so it cannot speak for training runs
ONE_RUN = {"agree": "suggests", "disagree": "contradicts"}


def _tally(per_dataset: list[dict], most: bool) -> str:
    """A claim's verdict from its units': agree when more than half agree, and (unless
    ``most``: the paper claims most, not all) none disagrees; disagree the other way round.
    Units of one training run count only where no unit has several: then the claim at most
    suggests or contradicts."""
    runs = [d for d in per_dataset if d["verdict"] not in ONE_RUN.values()]
    pool, words = (runs, ("agree", "disagree")) if runs else (per_dataset, ("suggests", "contradicts"))
    yes, no = (sum(d["verdict"] == w for d in pool) for w in words)
    half = len(pool) / 2
    if yes > half and (most or not no):
        return words[0]
    if no > half and (most or not yes):
        return words[1]
    return "inconclusive"


def unit_verdict(d: dict) -> str:
    """A unit's verdict from its interval (or the verdict its claim set), said as
    suggests / contradicts where it rests on one training run."""
    v = d.get("verdict") or stats.verdict(d["lo"], d["hi"])
    return ONE_RUN.get(v, v) if d.get("seeds", 2) < 2 else v


def _judge(claim: str, per_dataset: list[dict], missing: str, most: bool = False) -> dict:
    """A claim's line from its units' effects (a unit that has a verdict keeps it, said as
    ``unit_verdict`` says). ``covers`` says what its intervals cover: test images and
    training runs, or, where a unit rests on one training run, test images only."""
    if not per_dataset:
        return {"claim": claim, "verdict": "inconclusive", "detail": missing, "datasets": []}
    for d in per_dataset:
        d["verdict"] = unit_verdict(d)
    verdict = _tally(per_dataset, most)
    detail = "; ".join(
        f"{d['dataset']}: {d['what']} {d['effect']:+.1f} [{d['lo']:+.1f}, {d['hi']:+.1f}]"
        f"{d.get('also', '')} ({d['images']} images, {_runs(d['seeds'])}) {d['verdict']}"
        + (f" (sanity flags failed: {d['flagged']})" if d.get("flagged") else "")
        for d in per_dataset
    )
    runs = [d for d in per_dataset if d["seeds"] >= 2]
    n, single = len(runs), len(per_dataset) - len(runs)
    tally = (
        f"agree on {sum(d['verdict'] == 'agree' for d in runs)} of {n} dataset{'s' if n != 1 else ''}"
        if runs
        else "no dataset with two or more training runs"
    ) + (f" (and {single} of one training run, not counted)" if runs and single else "")
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
    """What to say beside a verdict: '' or 'one training run' (some of its intervals
    cover the test images only, not the spread between training runs)."""
    return "one training run" if claim.get("covers") == stats.COVERS_IMAGES else ""


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


# failed sanity flags that leave a model's robustness number untrustworthy; pgd_le_fgsm is
# a finding to show (the paper's short PGD step), not a broken evaluation
NOT_GATING = ("pgd_le_fgsm",)


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


def _failed(flags, keep) -> list[str]:
    """The failed flags of a row's ``flags`` text (``ok`` or names joined by ``;``) that ``keep``."""
    return [f.strip() for f in str(flags).split(";") if f.strip() not in ("", "ok", "nan") and keep(f.strip())]


def _flagged(df: pd.DataFrame, unit: dict, methods: dict, attack: str) -> dict:
    """{} when every model of ``methods`` in ``unit`` passed its sanity flags under
    ``attack``; else the verdict ``inconclusive`` and which model (method, seed) failed
    which flag. ``pgd_near_worst`` (on the strong evaluation's row: PGD-10 misses what the
    worst case finds) gates what rests on PGD-10, not what rests on the worst case."""
    on_worst = attack.startswith(STRONG_ATTACK)
    bad = []
    for m in dict.fromkeys(methods.values()):
        worst = df.iloc[:0] if on_worst else strong_picks(df, unit, m)
        for _, r in picks(df, unit, m, attack).iterrows():
            seed = r.get("seed")
            failed = _failed(r.get("flags"), lambda f: f not in NOT_GATING and not (on_worst and f == "pgd_near_worst"))
            if "seed" in worst:
                for text in worst[worst.seed == seed].get("flags", []):
                    failed += _failed(text, lambda f: f == "pgd_near_worst")
            if failed:
                who = METHODS[m].label if m in METHODS else m
                at = "" if seed is None or seed != seed else f" seed {int(seed)}"
                bad.append(f"{who}{at}: {', '.join(dict.fromkeys(failed))}")
    return {"verdict": "inconclusive", "flagged": "; ".join(bad)} if bad else {}


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


def _dm_against(df: pd.DataFrame, masks: dict, unit: dict, every: list[dict], candidates) -> dict | None:
    """DM@stage-1&2 on one unit against each of ``candidates`` that ran there: one paired
    interval per rival (DM − that rival, AAI and DR, over images and seeds) and DM's AOI
    against the full fine-tune's. Disagree: some rival's AAI beats DM's beyond doubt after
    Holm's correction across the rivals, or DM's AOI is below the full fine-tune's minus
    AOI_MARGIN beyond doubt. Agree: DM beats every rival beyond doubt in AAI and DR (Holm)
    and its AOI is shown non-inferior (the interval's lower end above −AOI_MARGIN). Under
    anything weaker than the strong evaluation on every compared model and seed, at most
    suggests / contradicts."""
    rivals = [m for m in candidates if len(picks(df, unit, m, TABLE1_ATTACK))]
    if not rivals or not len(picks(df, unit, "dm_stage12", TABLE1_ATTACK)):
        return None
    with_full = len(picks(df, unit, "full", TABLE1_ATTACK)) > 0
    methods = {"dm": "dm_stage12", **{m: m for m in rivals}}  # robustness: these, under the strongest attack
    attack, reps = strongest(df, masks, unit, methods)
    if not reps:
        return None
    gains = {m: stats.paired_effect(reps, rate_gap("dm", m, 1)) for m in rivals}
    drops = {m: stats.paired_effect(reps, dr_gap(m, "dm")) for m in rivals}
    beats = dict(zip(rivals, stats.holm([stats.p_value(gains[m]) for m in rivals])))
    beats_dr = dict(zip(rivals, stats.holm([stats.p_value(drops[m]) for m in rivals])))
    lost = [m for m in rivals if beats[m] and gains[m]["effect"] < 0]
    won = all(beats[m] and gains[m]["effect"] > 0 and beats_dr[m] and drops[m]["effect"] > 0 for m in rivals)
    worst = min(rivals, key=lambda m: gains[m]["effect"])  # the headline: DM against its closest rival
    also = "".join(
        f"; {METHODS[m].label}: AAI DM − it {gains[m]['effect']:+.1f} [{gains[m]['lo']:+.1f}, {gains[m]['hi']:+.1f}], "
        f"DR it − DM {drops[m]['effect']:+.1f} [{drops[m]['lo']:+.1f}, {drops[m]['hi']:+.1f}]"
        for m in rivals
    )
    aoi_ok, aoi_bad = True, False
    # clean accuracy: on every test image the paper's attack saw, whatever attack robustness rests on
    aoi = replicates_of(df, masks, unit, {"dm": "dm_stage12", "full": "full"}) if with_full else []
    if aoi:
        gap = stats.paired_effect(aoi, rate_gap("dm", "full", 0))
        aoi_ok, aoi_bad = gap["lo"] > -AOI_MARGIN, gap["hi"] < -AOI_MARGIN
        also += f"; AOI DM − full {gap['effect']:+.1f} [{gap['lo']:+.1f}, {gap['hi']:+.1f}] (margin {AOI_MARGIN:g})"
    strong = attack.startswith(STRONG_ATTACK)
    # a weaker attack than the strong evaluation carries no firm robustness verdict either
    # way; DM's clean accuracy (AOI) does not depend on the attack
    verdict = (
        "disagree"
        if aoi_bad
        else ("disagree" if strong else "contradicts")
        if lost
        else ("agree" if strong else "suggests")
        if won and aoi_ok
        else "inconclusive"
    )
    some = any(len(strong_picks(df, unit, m)) for m in methods.values())
    images, seeds = gains[worst]["images"], gains[worst]["seeds"]
    under = (
        f"the strong evaluation ({title(parse_attack(attack))}) on {images} images of "
        + (f"each of the {seeds} seeds" if seeds > 1 else "its one seed")
        if strong
        else f"{attack} only (the strong evaluation did not run on every model and seed compared)"
        if some
        else f"{attack} only (no strong evaluation)"
    )
    return {
        **_unit_fields(unit, every),
        "what": f"AAI DM@stage-1&2 − {METHODS[worst].label} (the closest of {len(rivals)}, Holm across them)",
        **gains[worst],
        "also": f"{also}; under {under}",
        "verdict": verdict,
        "rivals": rivals,
        "attack": attack,
        **_flagged(df, unit, methods, attack),
    }


def _dm_claim(df: pd.DataFrame, masks: dict, every: list[dict], candidates, claim: str, most: bool) -> dict:
    shown = ("dm_stage12", "full", *candidates)
    per = [d for d in (_dm_against(df, masks, u, every, candidates) for u in once(df, every, shown)) if d is not None]
    need = ", ".join(METHODS[m].label for m in candidates)
    return _judge(claim, per, f"needs DM@stage-1&2 and one of {need} under {TABLE1_ATTACK}", most=most)


DM_CLAIM = (
    "DM@stage-1&2 gives a better AAI and DR than the other defenses, keeping the full fine-tune's AOI, "
    "on most datasets."
)
DM_OTHERS = (
    "Not in the paper: DM@stage-1&2 against DM@stage-2 and TRADES@stage-2, as claim 5 judges the paper's rivals."
)


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


CORRUPTION_CLAIM = (
    "Fine-tuned models are less robust to common corruptions than standard ones: the full fine-tune's "
    "relative corruption error (above its clean error) is higher (not in the paper: Hendrycks & Dietterich's "
    "corruptions, the study's second question)."
)
# Otani & Yamada (2022): the architecture, not robust ImageNet training, carries corruption
# robustness into downstream tasks; the CNN they compare with is ResNet-50
ARCH_REFERENCE = "resnet50"
ARCH_CONTENDERS = ("vit_b_16", "swin_t", "convnext_tiny")
ARCH_CLAIM = (
    "Under full fine-tuning, ViT-B/16, Swin-T and ConvNeXt-T lose less accuracy to common corruptions "
    "than ResNet-50 (Otani & Yamada 2022: the architecture matters more than robust pre-training)."
)


def _corruption_claim(df: pd.DataFrame, masks: dict, every: list[dict]) -> dict:
    """The full fine-tune's relative corruption error minus the standard model's, per unit:
    each image's clean correctness minus its share of the corruption items it is right
    under (error above clean error: the fine-tune's other clean accuracy stays out of it,
    as in Hendrycks & Dietterich's relative mCE), paired over the images and seeds; the
    absolute error's gap beside it, and which corruption items the mean covers."""
    item = corruption_item(df)
    per = []
    for unit in once(df, every, ("scratch", "full")) if item else []:
        reps = models_by_seed(df, masks, {m: (unit, m) for m in ("scratch", "full")}, item, corrupted)
        if reps:
            effect = stats.paired_effect(reps, relative_error_gap("full", "scratch"))
            absolute = stats.paired_effect(reps, rate_gap("scratch", "full", 1))
            covered = _items_of(df, masks, unit)
            also = (
                f"; absolute error full − standard {absolute['effect']:+.1f} [{absolute['lo']:+.1f}, "
                f"{absolute['hi']:+.1f}]; mean over {len(covered)} corruption items ({', '.join(covered)})"
            )
            per.append(
                {
                    **_unit_fields(unit, every),
                    "what": "relative corruption error full − standard",
                    **effect,
                    "also": also,
                }
            )
    missing = (
        "needs eval.corruptions on a standard model and a full fine-tune of one unit"
        if item
        else "the job evaluates no corruptions (eval.corruptions)"
    )
    return {"id": "corruption", **_judge(CORRUPTION_CLAIM, per, missing)}


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


def _architecture_claim(df: pd.DataFrame, masks: dict, every: list[dict]) -> dict:
    """Per target (job, dataset, source data) with full fine-tunes of ResNet-50 and of a
    contender: ResNet-50's relative corruption error minus the contender's, paired over
    the images and seeds; one line per contender."""
    item = corruption_item(df)
    groups: dict = {}
    for u in every:
        groups.setdefault((u["job"], u["dataset"], u["source_data"]), {})[u["backbone"]] = u
    per = []
    for by_backbone in groups.values() if item else []:
        ref = by_backbone.get(ARCH_REFERENCE)
        for b in ARCH_CONTENDERS:
            if ref is None or b not in by_backbone:
                continue
            wanted = {ARCH_REFERENCE: (ref, "full"), b: (by_backbone[b], "full")}
            reps = models_by_seed(df, masks, wanted, item, corrupted)
            if reps:
                what = f"relative corruption error {ARCH_REFERENCE} − {b}"
                per.append(
                    {
                        **_unit_fields({**by_backbone[b], "backbone": b}, every),
                        "what": what,
                        **stats.paired_effect(reps, relative_error_gap(ARCH_REFERENCE, b)),
                    }
                )
    missing = (
        f"needs eval.corruptions on full fine-tunes of {ARCH_REFERENCE} and of one of "
        f"{', '.join(ARCH_CONTENDERS)} on one target (jobs/architectures.yaml)"
    )
    return {"id": "corruption-architecture", **_judge(ARCH_CLAIM, per, missing)}


def judge(df: pd.DataFrame, found: dict, masks: dict) -> list[dict]:
    """Every finding of the paper, judged on this run's results, analyses and per-image
    masks (stage -> attack -> {correct, robust}, results.per_image); each has an ``id``."""
    every = units(df[df.attack == TABLE1_ATTACK]) if len(df) else []
    masks = masks or {}
    return [
        _pair_claim(df, masks, every, PAIR_CLAIMS[0]),
        *_aai_claims(df, masks, every),
        *(_pair_claim(df, masks, every, spec) for spec in PAIR_CLAIMS[1:]),
        *_uap_claims(found),
        _cca_claim(found),
        {"id": "4-mmd", **_mmd_claim(df, found, every)},
        _capacity_claim(df, masks, every),
        _source_claim(df, masks, every),
        {"id": "5", **_dm_claim(df, masks, every, RIVALS, DM_CLAIM, most=True)},
        {"id": "5-others", **_dm_claim(df, masks, every, OTHER_RIVALS, DM_OTHERS, most=True)},
        _corruption_claim(df, masks, every),
        _architecture_claim(df, masks, every),
    ]


def by_id(checked: list[dict], cid: str) -> dict:
    """The judged claim of id ``cid`` ('1-dr', '1-aai:<attack>', '2-dr', '2-aoi',
    '3-transfer', '3-standard', '4-mmd', 'capacity', 'source', 'cca', '5', '5-others',
    'corruption', 'corruption-architecture')."""
    return next(c for c in checked if c.get("id") == cid)
