"""The paper's published numbers (Tables 1-5), shipped in ``study/paper/tables.csv``:
``table, setting, metric, dataset, value`` (read with ``setting`` as ``model``: the
paper's name of a model). Our methods map to the paper's models through
``study.methods`` (scratch = "standard", partial = "partial_finetune", full =
"full_finetune", at_stage2 = "at_stage2", ...).
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

import pandas as pd

from study.methods import METHODS, TABLE1, TABLE1_ATTACK, TABLE2_ATTACKS

PAPER_NAME = {m.name: m.paper for m in METHODS.values() if m.paper}


@lru_cache(maxsize=1)
def paper() -> pd.DataFrame:
    with resources.files("study").joinpath("paper/tables.csv").open() as fh:
        return pd.read_csv(fh).rename(columns={"setting": "model"})


def paper_value(table: str, model: str, metric: str, dataset: str) -> float | None:
    p = paper()
    hit = p[(p.table == table) & (p.model == model) & (p.metric == metric) & (p.dataset == dataset)]
    return float(hit.value.iloc[0]) if len(hit) else None


def paper_for_row(dataset: str, method: str, attack: str | None) -> dict:
    """The paper's AOI/AAI/DR for one of our result rows, where it published them."""
    ps = PAPER_NAME.get(method)
    out = {"paper_AOI": None, "paper_AAI": None, "paper_DR": None}
    if ps is None:
        return out
    if method not in TABLE1:  # the defenses: Table 5, under Table 1's attack only
        out["paper_AOI"] = paper_value("table5", ps, "AOI", dataset)
        if attack == TABLE1_ATTACK:
            out["paper_AAI"] = paper_value("table5", ps, "AAI", dataset)
            if out["paper_AOI"] and out["paper_AAI"] is not None:
                out["paper_DR"] = round(100.0 * (out["paper_AOI"] - out["paper_AAI"]) / out["paper_AOI"], 2)
        return out
    out["paper_AOI"] = paper_value("table1", ps, "AOI", dataset)  # the same models' clean accuracy
    if attack == TABLE1_ATTACK:
        out["paper_AAI"] = paper_value("table1", ps, "AAI", dataset)
        out["paper_DR"] = paper_value("table1", ps, "DR", dataset)
    elif attack in TABLE2_ATTACKS:
        out["paper_AAI"] = paper_value("table2", f"{ps}:{attack}", "AAI", dataset)
        aoi = out["paper_AOI"]
        if aoi and out["paper_AAI"] is not None:
            out["paper_DR"] = round(100.0 * (aoi - out["paper_AAI"]) / aoi, 2)
    return out
