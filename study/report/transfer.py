"""The public-backbone threat in the report (study.threat): a table of each model's AAI
under the white-box attack and under each transfer item crafted on f₀, with the share of
the white-box damage the transfer achieves, and a figure of the two side by side."""

from __future__ import annotations

import numpy as np
import pandas as pd

from study.attacks import parse_attack
from study.claims import label, picks, transfer_names, units
from study.methods import METHODS, TABLE1_ATTACK
from study.report.cells import MODEL_NAME, _basis, _ci, _fmt_ci, _md

FIGURE = (
    "The public backbone's threat: each model's AAI under the white-box attack (PGD-10 on the model itself, at the "
    "transfer items' eps where the run has it) and under the attacks crafted on the public pre-trained model f₀ "
    "alone (95 % intervals; over the seeds with the test images' noise, or over the images for one seed)."
)
FINDING = (
    "Not in the paper: Abdelkader et al. (2020) found attacks on the public feature extractor alone cost a "
    "fine-tune over 40 points; Sitawarin et al. (2023) defend against transfer from public models."
)


def white_box(df: pd.DataFrame, item: str) -> str:
    """The white-box attack a transfer item is set against: PGD-10 at its norm and eps where
    the run has it, else Table 1's."""
    a = parse_attack(item)
    same = f"pgd10_{a.norm}_{float(a.eps)!r}"
    return same if (df.attack == same).any() else TABLE1_ATTACK


def share(df: pd.DataFrame, unit: dict, method: str, item: str) -> str:
    """The share of the white-box damage (AOI − AAI) that the transfer item achieves, in %,
    the mean over the seeds that have both (–: no white-box damage to compare with)."""
    wb, tr = picks(df, unit, method, white_box(df, item)), picks(df, unit, method, item)
    if not len(wb) or not len(tr):
        return "–"
    seed = lambda r: r.seed.fillna(-1) if "seed" in r else pd.Series(0, index=r.index)  # noqa: E731
    both = pd.merge(wb.assign(s=seed(wb)), tr.assign(s=seed(tr)), on="s", suffixes=("_wb", "_tr"))
    damage = both.AOI_wb - both.AAI_wb
    ratio = 100.0 * (both.AOI_wb - both.AAI_tr) / damage.where(damage > 0)
    return "–" if ratio.isna().all() else f"{float(ratio.mean()):.0f} %"


def _models(df: pd.DataFrame, unit: dict, items: list[str]) -> list[str]:
    return [m for m in METHODS if any(len(picks(df, unit, m, a)) for a in items)]


def transfer_table(df: pd.DataFrame) -> str:
    """Per unit: each model's AOI, its AAI under the white-box attacks the transfer items are
    set against, and under each transfer item its AAI and share of that white-box damage."""
    items = transfer_names(df)
    if not items:
        return ""
    refs = list(dict.fromkeys(white_box(df, a) for a in items))
    blocks = []
    every = units(df[df.attack.isin(items)])
    for unit in every:
        rows, used = [], []
        for m in _models(df, unit, items):
            wb = [picks(df, unit, m, r) for r in refs]
            tr = [picks(df, unit, m, a) for a in items]
            used += [*wb, *tr]
            cells = [_fmt_ci(tr[0], "AOI")] + [_fmt_ci(r, "AAI") for r in wb]
            for a, r in zip(items, tr):
                cells += [_fmt_ci(r, "AAI"), share(df, unit, m, a)]
            rows.append([MODEL_NAME[m]] + cells)
        header = ["model", "AOI"] + [f"AAI white-box {r}" for r in refs]
        for a in items:
            header += [f"AAI {a}", f"share of {white_box(df, a)}'s damage"]
        blocks.append(f"**{label(unit, every)}**; {_basis(pd.concat(used))}\n\n" + _md(header, rows))
    return (
        "## The public backbone's threat: attacks crafted on f₀ alone\n\n"
        "Each transfer item's perturbations are crafted once on the public pre-trained model f₀ (the backbone the "
        "full fine-tune starts from: the feature attack pushes f₀'s features away, label-blind; the surrogate "
        "attacks f₀ with a linear probe trained on the target's training split) and added to the same test images "
        "of every model; an image counts as robust when the model is right on it with and without them. Share: "
        "(AOI − AAI under transfer) / (AOI − AAI under the white-box PGD-10 at the item's eps, or Table 1's where "
        "the run has none), per seed.\n\n" + "\n\n".join(blocks)
    )


def figure(df: pd.DataFrame, pyplot):
    """AAI white-box and under each transfer item per model of the first unit, with intervals."""
    fig, ax = pyplot().subplots(figsize=(8, 3.6))
    items = transfer_names(df)
    every = units(df[df.attack.isin(items)]) if items else []
    if not every:
        empty = "this run crafts no attack on the public backbone (eval.attacks: feature_linf_0.5, surrogate_linf_0.5)"
        ax.text(0.5, 0.5, empty, ha="center", va="center", fontsize=9, wrap=True, transform=ax.transAxes)
        ax.set_axis_off()
        return fig
    unit = every[0]
    models = _models(df, unit, items)
    refs = list(dict.fromkeys(white_box(df, a) for a in items))
    attacks = [*refs, *items]
    width = 0.8 / len(attacks)
    for j, a in enumerate(attacks):
        vals = [_ci(picks(df, unit, m, a), "AAI") for m in models]
        x = np.arange(len(models)) + (j - (len(attacks) - 1) / 2) * width
        v = np.array([c[0] for c in vals])
        lo = np.nan_to_num(v - np.clip([c[1] for c in vals], 0, 100))  # within the metric's range, as the table
        hi = np.nan_to_num(np.clip([c[2] for c in vals], 0, 100) - v)
        name = f"white-box {a}" if a in refs else f"crafted on f₀: {a}"
        ax.bar(x, v, width, yerr=[np.clip(lo, 0, None), np.clip(hi, 0, None)], capsize=2, label=name)
    ax.set_xticks(np.arange(len(models)), [MODEL_NAME[m] for m in models], fontsize=7, rotation=15)
    ax.set_ylabel("AAI (%)")
    ax.set_title(label(unit, every), fontsize=9)
    ax.legend(fontsize=7)
    return fig
