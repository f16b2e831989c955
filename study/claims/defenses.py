"""Claim 5: DM@stage-1&2 against every rival defense, one paired interval per rival with
Holm's correction, DM's AOI shown non-inferior, under the strongest evaluation the job ran."""

from __future__ import annotations

import pandas as pd

from study import stats
from study.attacks import parse_attack, title
from study.claims.units import _unit_fields, dr_gap, once, picks, rate_gap, replicates_of, strong_picks, strongest
from study.claims.verdicts import _flagged, _judge
from study.methods import AOI_MARGIN, METHODS, STRONG_ATTACK, TABLE1_ATTACK


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
