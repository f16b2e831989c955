"""The public-backbone threat judged (study.threat): are fine-tunes more exposed than
standard models to perturbations crafted on their public pre-trained backbone alone, and
does a defense close that door? Paired intervals over the same test images and seeds, as
claims 1 and 5 have them, under each transfer item the job ran.

Judged on DR, the share of its right answers a model loses to the perturbations, not on
AAI: AAI under a transfer attack is bounded by AOI, so an AAI gap between two models holds
their clean-accuracy gap even where the perturbations change nothing (the demo's first
run: AAI standard − full +9.7 points under a transfer that broke no image of either)."""

from __future__ import annotations

import re

import pandas as pd

from study.claims.findings import _pair_claim
from study.claims.units import dr_gap
from study.methods import METHODS

DEFENSES = ("dm_stage12", "at_stage2")  # the paper's defense and its strongest rival at stage 2
EXPOSED = (
    "Fine-tuned models are more exposed than standard ones to attacks crafted on their public backbone "
    "(a higher DR under them)."
)
CLOSED = "A defense closes that door: it loses less than the full fine-tune (a lower DR) to attacks crafted on f₀."
TRANSFER_NAME = re.compile(r"^(feature|surrogate)_(linf|l2)_")
NEEDS = (
    "no attack crafted on the public backbone in this run: add feature_linf_0.5 and surrogate_linf_0.5 "
    "to eval.attacks (study.threat)"
)


def transfer_names(df: pd.DataFrame) -> list[str]:
    """The transfer items among the run's results, in the order they first appear."""
    if not len(df) or "attack" not in df:
        return []
    return [a for a in dict.fromkeys(df.attack.dropna().astype(str)) if TRANSFER_NAME.match(a)]


def _transfer_claims(df: pd.DataFrame, masks: dict, every: list[dict]) -> list[dict]:
    """Per transfer item: DR full − standard under it (``transfer-exposed:<item>``), and DR
    full − defense for DM@stage-1&2 and AT@stage-2 (``transfer-closed:<item>:<method>``);
    one inconclusive line each, saying what to add, where the run has no transfer item."""
    names = transfer_names(df)
    if not names:
        return [
            {"id": "transfer-exposed", "claim": EXPOSED, "verdict": "inconclusive", "detail": NEEDS, "datasets": []},
            {"id": "transfer-closed", "claim": CLOSED, "verdict": "inconclusive", "detail": NEEDS, "datasets": []},
        ]
    out = []
    for a in names:
        exposed = (f"transfer-exposed:{a}", f"{EXPOSED} ({a})", "full", "scratch", "DR full − standard")
        out.append(_pair_claim(df, masks, every, (*exposed, dr_gap("full", "scratch")), a))
        for m in DEFENSES:
            label = METHODS[m].label
            spec = (f"transfer-closed:{a}:{m}", f"{CLOSED} ({label}, {a})", "full", m, f"DR full − {label}")
            out.append(_pair_claim(df, masks, every, (*spec, dr_gap("full", m)), a))
    return out
