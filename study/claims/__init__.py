"""The paper's five claims, and four findings of the study's own, judged under uncertainty.

What ``judge`` returns, one entry each: claim 1 on DR (``1-dr``) and on AAI under every
attack of Tables 1 and 2 the job ran (``1-aai:<attack>``), claim 2 on DR and AOI (``2-dr``,
``2-aoi``), claim 3 in two halves (``3-transfer``, ``3-standard``), the bottom-layer SVCCA
(``cca``), claim 4 (``4-mmd``), backbone capacity and source data (``capacity``,
``source``), claim 5 against the paper's rivals and against DM@stage-2 and TRADES (``5``,
``5-others``), the corruption findings (``corruption``, ``corruption-architecture``), and
the public-backbone threat (study.claims.transfer: ``transfer-exposed:<item>`` and
``transfer-closed:<item>:<defense>`` under each transfer item the job ran, or one line each
saying what to add).

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

import pandas as pd

from study.claims.corruption import ARCH_CLAIM, CORRUPTION_CLAIM, _architecture_claim, _corruption_claim
from study.claims.defenses import DM_CLAIM, DM_OTHERS, _dm_claim
from study.claims.findings import (
    PAIR_CLAIMS,
    _aai_claims,
    _capacity_claim,
    _cca_claim,
    _mmd_claim,
    _pair_claim,
    _source_claim,
    _uap_claims,
    mmd_by_unit,
    mmd_for,
)
from study.claims.transfer import DEFENSES as TRANSFER_DEFENSES
from study.claims.transfer import _transfer_claims, transfer_names
from study.claims.units import (
    UNIT,
    by_seed,
    corrupted,
    corruption_item,
    label,
    models_by_seed,
    once,
    picks,
    rate_gap,
    relative_error_gap,
    replicates_of,
    strong_names,
    strong_picks,
    strongest,
    units,
)
from study.claims.verdicts import ONE_RUN, _judge, qualifier, unit_verdict
from study.methods import OTHER_RIVALS, RIVALS, TABLE1_ATTACK


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
        *_transfer_claims(df, masks, every),
    ]


def by_id(checked: list[dict], cid: str) -> dict:
    """The judged claim of id ``cid`` ('1-dr', '1-aai:<attack>', '2-dr', '2-aoi',
    '3-transfer', '3-standard', '4-mmd', 'capacity', 'source', 'cca', '5', '5-others',
    'corruption', 'corruption-architecture', 'transfer-exposed:<item>', 'transfer-closed:<item>:<defense>')."""
    return next(c for c in checked if c.get("id") == cid)


__all__ = [
    "TRANSFER_DEFENSES",
    "transfer_names",
    "ARCH_CLAIM",
    "CORRUPTION_CLAIM",
    "DM_CLAIM",
    "DM_OTHERS",
    "ONE_RUN",
    "PAIR_CLAIMS",
    "UNIT",
    "_judge",
    "by_id",
    "by_seed",
    "corrupted",
    "corruption_item",
    "judge",
    "label",
    "mmd_by_unit",
    "mmd_for",
    "models_by_seed",
    "once",
    "picks",
    "qualifier",
    "rate_gap",
    "relative_error_gap",
    "replicates_of",
    "strong_names",
    "strong_picks",
    "strongest",
    "unit_verdict",
    "units",
]
