"""The paper's tables rebuilt from our results, with the published numbers beside ours.

The published figures (Tables 1-5 of the paper) ship with the package in
``study/paper/tables.csv``: ``table, setting, metric, dataset, value``. Our methods map
to the paper's models through ``study.methods`` (scratch = "standard", partial =
"partial_finetune", full = "full_finetune", at_stage2 = "at_stage2", ...). Tables show
the trials that model selection picked (``selected``: best validation accuracy).
"""
from __future__ import annotations

from functools import lru_cache
from importlib import resources

import pandas as pd

from study.methods import METHODS, TABLE1, TABLE5

PAPER_SETTING = {m.name: m.paper for m in METHODS.values() if m.paper}
MODEL_NAME = {m.name: m.label for m in METHODS.values()}
TABLE1_ATTACK = "pgd10_linf_0.5"
TABLE2_ATTACKS = ("pgd10_linf_2.0", "fgsm_linf_0.5", "fgsm_linf_2.0", "autoattack_linf_0.5")


@lru_cache(maxsize=1)
def paper() -> pd.DataFrame:
    with resources.files("study").joinpath("paper/tables.csv").open() as fh:
        return pd.read_csv(fh)


def paper_value(table: str, setting: str, metric: str, dataset: str) -> float | None:
    p = paper()
    hit = p[(p.table == table) & (p.setting == setting) & (p.metric == metric) & (p.dataset == dataset)]
    return float(hit.value.iloc[0]) if len(hit) else None


def paper_for_row(dataset: str, setting: str, attack: str | None) -> dict:
    """The paper's AOI/AAI/DR for one of our result rows, where it published them."""
    ps = PAPER_SETTING.get(setting)
    out = {"paper_AOI": None, "paper_AAI": None, "paper_DR": None}
    if ps is None:
        return out
    if setting not in TABLE1:  # the defenses: Table 5, under Table 1's attack only
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


def _fmt(v) -> str:
    return "–" if v is None or pd.isna(v) else f"{v:.2f}"


def _md(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _pick(df: pd.DataFrame, dataset: str, setting: str, attack: str):
    """The selected model's row (of the paper's λ for DM, else the largest λ run)."""
    hit = df[(df.dataset == dataset) & (df.setting == setting) & (df.attack == attack)]
    if "selected" in hit:
        hit = hit[hit.selected.astype(bool)]
    if len(hit) > 1 and hit.lam.notna().any():
        from study.methods import DEFAULT_LAMBDA

        paper_lam = hit[hit.lam == DEFAULT_LAMBDA]
        hit = paper_lam if len(paper_lam) else hit.sort_values("lam", ascending=False)
    return hit.iloc[0] if len(hit) else None


def stage1(df: pd.DataFrame) -> str:
    """The pre-trained backbones on their source task: AOI, and AAI under each attack."""
    pre = df[df.setting == "pretrain"]
    if pre.empty:
        return ""
    attacks = [a for a in dict.fromkeys(pre.attack.dropna()) if a]
    rows = []
    for (dataset, backbone, source), g in pre.groupby(["dataset", "backbone", "source"], sort=False):
        clean = g[g.attack.isna() | (g.attack == "")]
        cells = [dataset, backbone, str(source), _fmt(clean.AOI.iloc[0] if len(clean) else None)]
        for a in attacks:
            hit = g[g.attack == a]
            cells.append(_fmt(hit.AAI.iloc[0] if len(hit) else None))
        rows.append(cells)
    return ("## Stage 1: pre-trained backbones on the source task\n\n"
            "AOI, and AAI under each attack (the paper publishes none of these).\n\n"
            + _md(["source task", "backbone", "pre-training", "AOI"] + [f"AAI {a}" for a in attacks], rows))


def table1(df: pd.DataFrame) -> str:
    """Table 1: AOI, AAI and DR of the standard model, partial and full fine-tune under
    PGD-10 at 0.5/255, one block per target dataset, the paper's value after ours."""
    blocks = []
    for dataset in dict.fromkeys(df.dataset[df.attack == TABLE1_ATTACK]):
        rows = []
        for setting in TABLE1:
            r = _pick(df, dataset, setting, TABLE1_ATTACK)
            if r is None:
                continue
            p = paper_for_row(dataset, setting, TABLE1_ATTACK)
            rows.append([MODEL_NAME[setting]] + [f"{_fmt(r[m])} ({_fmt(p['paper_' + m])})"
                                                 for m in ("AOI", "AAI", "DR")])
        if rows:
            blocks.append(f"**{dataset}**, ours (paper)\n\n" + _md(["model", "AOI", "AAI", "DR"], rows))
    if not blocks:
        return ""
    return (f"## Table 1: robustness under {TABLE1_ATTACK} (PGD-10, eps 0.5/255)\n\n"
            + "\n\n".join(blocks))


def table2(df: pd.DataFrame) -> str:
    """Table 2: AAI of the standard model and full fine-tune under the other criteria."""
    attacks = [a for a in TABLE2_ATTACKS if (df.attack == a).any()]
    blocks = []
    models = df.attack.isin(attacks) & df.setting.isin(["scratch", "full"])
    for dataset in dict.fromkeys(df.dataset[models]):
        rows = []
        for setting in ("scratch", "full"):
            cells = []
            for a in attacks:
                r = _pick(df, dataset, setting, a)
                p = paper_for_row(dataset, setting, a)["paper_AAI"]
                cells.append(f"{_fmt(None if r is None else r['AAI'])} ({_fmt(p)})")
            rows.append([MODEL_NAME[setting]] + cells)
        blocks.append(f"**{dataset}**, AAI ours (paper)\n\n" + _md(["model"] + attacks, rows))
    if not blocks:
        return ""
    return "## Table 2: AAI under the other attack criteria\n\n" + "\n\n".join(blocks)


def table5(df: pd.DataFrame) -> str:
    """Table 5: the defenses (AOI and AAI under PGD-10 at 0.5/255), each DM λ on its own
    row, the paper's value (published for λ = 500) after ours."""
    shown = [m for m in TABLE5 + ("dm_stage2",) if m != "full"]
    if not df.setting.isin(shown).any():
        return ""
    blocks = []
    for dataset in dict.fromkeys(df.dataset[(df.attack == TABLE1_ATTACK) & df.setting.isin(shown)]):
        rows = []
        for method in TABLE5 + ("dm_stage2",):
            hit = df[(df.dataset == dataset) & (df.setting == method) & (df.attack == TABLE1_ATTACK)
                     & df.selected.astype(bool)]
            for _, r in hit.sort_values("lam").iterrows():
                p = paper_for_row(dataset, method, TABLE1_ATTACK)
                lam = "" if pd.isna(r.lam) else f"{r.lam:g}"
                rows.append([MODEL_NAME[method], lam] + [f"{_fmt(r[m])} ({_fmt(p['paper_' + m])})"
                                                         for m in ("AOI", "AAI", "DR")])
        if rows:
            blocks.append(f"**{dataset}**, ours (paper)\n\n" + _md(["method", "λ", "AOI", "AAI", "DR"], rows))
    if not blocks:
        return ""
    return (f"## Table 5: defenses under {TABLE1_ATTACK}\n\n"
            "The paper publishes DM@stage-1&2 at λ = 500 only.\n\n" + "\n\n".join(blocks))


def sweep(df: pd.DataFrame) -> str:
    """Every stage-2 trial: its point, validation accuracy, AOI and AAI under Table 1's
    attack, and whether model selection picked it."""
    clean = df[(df.setting != "pretrain") & (df.attack.isna() | (df.attack == ""))]
    if len(clean) < 2:
        return ""
    rows = []
    for _, r in clean.iterrows():
        hit = df[(df.stage == r.stage) & (df.attack == TABLE1_ATTACK)]
        aai = hit.AAI.iloc[0] if len(hit) else None
        rows.append([r.dataset, r.backbone, MODEL_NAME.get(r.setting, r.setting),
                     "" if pd.isna(r.lam) else f"{r.lam:g}", f"{r.lr_f:g}", f"{r.lr_g:g}", str(r.optimizer),
                     _fmt(r.val_acc), _fmt(r.AOI), _fmt(aai), "✓" if r.selected else ""])
    return ("## Stage 2 sweep: every trial\n\nModel selection: best validation accuracy per dataset, "
            "backbone, method and λ (the test split is never used to choose).\n\n"
            + _md(["dataset", "backbone", "method", "λ", "lr_f", "lr_g", "optimizer", "val acc", "AOI",
                   f"AAI {TABLE1_ATTACK}", "selected"], rows))
