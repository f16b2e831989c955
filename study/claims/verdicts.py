"""From intervals to verdicts: a unit's verdict (one training run only suggests or
contradicts), a claim's tally over its units, and the sanity flags that gate both."""

from __future__ import annotations

import pandas as pd

from study import stats
from study.claims.units import picks, strong_picks
from study.methods import METHODS, STRONG_ATTACK

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


# failed sanity flags that leave a model's robustness number untrustworthy; pgd_le_fgsm is
# a finding to show (the paper's short PGD step), not a broken evaluation
NOT_GATING = ("pgd_le_fgsm",)


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
