"""The paper's tables rebuilt from our results, with the published numbers beside ours.

The published figures (Tables 1-5 of the paper) ship with the package in
``study/paper/tables.csv``: ``table, setting, metric, dataset, value`` (read with
``setting`` as ``model``: the paper's name of a model). Our methods map
to the paper's models through ``study.methods`` (scratch = "standard", partial =
"partial_finetune", full = "full_finetune", at_stage2 = "at_stage2", ...). Tables show
the trials that model selection picked (``selected``: best validation accuracy).
"""
from __future__ import annotations

from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from study import stats
from study.backbones import family
from study.claims import TABLE1_ATTACK, by_seed, judge, label, picks, units
from study.data.beton import atomic_write_bytes, atomic_write_text
from study.methods import AOI_MARGIN, METHODS, TABLE1, TABLE5

PAPER_NAME = {m.name: m.paper for m in METHODS.values() if m.paper}
MODEL_NAME = {m.name: m.label for m in METHODS.values()}
TABLE2_ATTACKS = ("pgd10_linf_2.0", "fgsm_linf_0.5", "fgsm_linf_2.0", "autoattack_linf_0.5")


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


def _fmt(v) -> str:
    return "–" if v is None or pd.isna(v) else f"{v:.2f}"


def _md(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _ci(rows: pd.DataFrame, metric: str) -> tuple[float, float, float]:
    """(value, lo, hi): one seed's row and its interval over images, or the mean and
    Student's interval over the seeds' rows."""
    if len(rows) == 0:
        return float("nan"), float("nan"), float("nan")
    if len(rows) == 1:
        r = rows.iloc[0]
        get = lambda k: float(r[k]) if k in r and pd.notna(r[k]) else float("nan")  # noqa: E731
        return get(metric), get(f"{metric}_lo"), get(f"{metric}_hi")
    return stats.over_seeds(rows[metric].astype(float))


def _fmt_ci(rows: pd.DataFrame, metric: str) -> str:
    """``value ± half-width``; † where the half-width exceeds stats.WIDE points."""
    v, lo, hi = _ci(rows, metric)
    if v != v:
        return "–"
    if lo != lo or hi != hi:
        return f"{v:.2f}"
    half = (hi - lo) / 2
    return f"{v:.2f} ± {half:.2f}" + (" †" if half > stats.WIDE else "")


def _basis(rows: pd.DataFrame) -> str:
    """How many images and seeds a block rests on."""
    if len(rows) == 0:
        return ""
    images = sorted({int(n) for n in rows.images.dropna()}) if "images" in rows else []
    seeds = rows.seed.nunique() if "seed" in rows and rows.seed.notna().any() else 1
    kind = (f"Student's interval over the seeds (t = {stats.t_factor(seeds):.1f} with {seeds}: the claims' paired "
            "bootstrap over images and seeds is the sharper test)" if seeds > 1 else "interval over test images")
    few = "too few seeds" if seeds > 1 else "too few images"
    return (f"{'/'.join(map(str, images)) or '?'} test images, {seeds} seed{'s' if seeds > 1 else ''}; "
            f"± is a 95 % {kind}; † wider than ±{stats.WIDE:g} points: {few}")


def replicates(df: pd.DataFrame) -> str:
    """Which seeds the numbers rest on, and whether stage 1 was replicated with them."""
    if "seed" not in df or df.seed.isna().all():
        return ""
    tuned = sorted(int(s) for s in df[df.method != "pretrain"].seed.dropna().unique())
    pre = sorted(int(s) for s in df[df.method == "pretrain"].seed.dropna().unique())
    seeds = sorted(set(tuned) | set(pre))
    line = f"Replicates: seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}."
    if len(tuned) > 1 and len(pre) == 1:
        line += (f" Stage 1 was trained once, with seed {pre[0]} (pretrain.replicate: false): every seed "
                 f"fine-tunes the same pre-trained backbones, so the intervals over seeds leave out "
                 f"pre-training's own variation.")
    return line


def premise(df: pd.DataFrame) -> str:
    """The paper's premise, checked: each pre-trained backbone learned its source task
    (its source AOI), and starting from it helps the target (the full fine-tune's
    validation accuracy after one epoch against the standard model's, from scratch);
    where a target does not show it, the section says so."""
    if not len(df) or "method" not in df:
        return ""
    lines = []
    pre = df[(df.method == "pretrain") & (df.attack.isna() | (df.attack == ""))]
    for (dataset, backbone, source), g in pre.groupby(["dataset", "backbone", "source"], sort=False):
        lines.append(f"- {backbone} pre-trained ({source}) on {dataset}: source AOI {g.AOI.mean():.1f} % "
                     f"({int(g.images.max()) if g.images.notna().any() else '?'} test images)")
    if "val_acc_1" in df:
        every = units(df[df.attack == TABLE1_ATTACK])
        for u in every:
            first = {m: picks(df, u, m, TABLE1_ATTACK) for m in ("full", "scratch")}
            if not all(len(r) and r.val_acc_1.notna().any() for r in first.values()):
                continue
            ft, st = (float(first[m].val_acc_1.mean()) for m in ("full", "scratch"))
            verdict = ("pre-training helps" if ft > st else
                       "**this target does not show that pre-training helps**")
            lines.append(f"- {label(u, every)}: validation accuracy after one epoch, full fine-tune {ft:.1f} % "
                         f"vs standard model {st:.1f} % (mean over {len(first['full'])} seed"
                         f"{'s' if len(first['full']) > 1 else ''}): {verdict}")
    if not lines:
        return ""
    return ("## The premise: pre-training learned its source task and helps the target\n\n"
            "The paper studies models whose pre-training worked: a backbone that learned its source task, "
            "and a fine-tune that starts ahead of training from scratch.\n\n" + "\n".join(lines))


def stage1(df: pd.DataFrame) -> str:
    """The pre-trained backbones on their source task: AOI, and AAI under each attack."""
    pre = df[df.method == "pretrain"]
    if pre.empty:
        return ""
    attacks = [a for a in dict.fromkeys(pre.attack.dropna()) if a]
    rows = []
    for (dataset, backbone, source), g in pre.groupby(["dataset", "backbone", "source"], sort=False):
        clean = g[g.attack.isna() | (g.attack == "")]
        cells = [dataset, backbone, str(source), _fmt_ci(clean, "AOI")]
        cells += [_fmt_ci(g[g.attack == a], "AAI") for a in attacks]
        rows.append(cells)
    return ("## Stage 1: pre-trained backbones on the source task\n\n"
            f"AOI, and AAI under each attack (the paper publishes none of these); {_basis(pre)}.\n\n"
            + _md(["source task", "backbone", "pre-training", "AOI"] + [f"AAI {a}" for a in attacks], rows))


def _units(df: pd.DataFrame, attacks, methods) -> list[tuple[str, dict]]:
    """(label, unit) of every comparison unit with a model of ``methods`` under ``attacks``."""
    hit = df[df.attack.isin(attacks) & df.method.isin(methods)]
    every = units(df[df.attack.isin(attacks)])
    return [(label(u, every), u) for u in every
            if any(len(picks(hit, u, m, a)) for m in methods for a in attacks)]


def _method_rows(df: pd.DataFrame, unit: dict, methods, with_lambda: bool = False) -> tuple[list, list]:
    """A unit's row per method it has, under Table 1's attack: the method (its chosen λ),
    AOI, AAI and DR with their intervals, the paper's value after ours; and the rows used."""
    rows, used = [], []
    for method in methods:
        r = picks(df, unit, method, TABLE1_ATTACK)
        if not len(r):
            continue
        used.append(r)
        p = paper_for_row(unit["dataset"], method, TABLE1_ATTACK)
        rows.append([MODEL_NAME[method]] + ([_lams(r)] if with_lambda else [])
                    + [f"{_fmt_ci(r, m)} ({_fmt(p['paper_' + m])})" for m in ("AOI", "AAI", "DR")])
    return rows, used


def table1(df: pd.DataFrame) -> str:
    """Table 1: AOI, AAI and DR of the standard model, partial and full fine-tune under
    PGD-10 at 0.5/255, one block per unit (job, target dataset, backbone, source data)
    that has a model to compare the full fine-tune with (a job of full fine-tunes alone is
    Table 3's), the paper's value after ours."""
    blocks = []
    for name, unit in _units(df, [TABLE1_ATTACK], [m for m in TABLE1 if m != "full"]):
        rows, used = _method_rows(df, unit, TABLE1)
        blocks.append(f"**{name}**, ours (paper); {_basis(pd.concat(used))}\n\n"
                      + _md(["model", "AOI", "AAI", "DR"], rows))
    if not blocks:
        return ""
    return (f"## Table 1: robustness under {TABLE1_ATTACK} (PGD-10, eps 0.5/255)\n\n"
            + "\n\n".join(blocks))


def table2(df: pd.DataFrame) -> str:
    """Table 2: AAI of the standard model and full fine-tune under the other criteria."""
    attacks = [a for a in TABLE2_ATTACKS if (df.attack == a).any()]
    blocks = []
    for name, unit in _units(df, attacks, ("scratch", "full")):
        rows, used = [], []
        for method in ("scratch", "full"):
            picked = [picks(df, unit, method, a) for a in attacks]
            if all(not len(r) for r in picked):
                continue  # a model this job did not train on this dataset
            used += picked
            cells = [f"{_fmt_ci(r, 'AAI')} ({_fmt(paper_for_row(unit['dataset'], method, a)['paper_AAI'])})"
                     for a, r in zip(attacks, picked)]
            rows.append([MODEL_NAME[method]] + cells)
        blocks.append(f"**{name}**, AAI ours (paper); {_basis(pd.concat(used))}\n\n"
                      + _md(["model"] + attacks, rows))
    if not blocks:
        return ""
    return "## Table 2: AAI under the other attack criteria\n\n" + "\n\n".join(blocks)


def _lams(rows: pd.DataFrame) -> str:
    """The chosen λ of each seed ('' for a method without λ)."""
    lams = [f"{v:g}" for v in dict.fromkeys(rows.lam.dropna())] if "lam" in rows else []
    return " / ".join(lams)


def table5(df: pd.DataFrame) -> str:
    """Table 5: the defenses (AOI and AAI under PGD-10 at 0.5/255), each at the model that
    stands for it (DM at the λ chosen on validation, the one claim 5 judges), the paper's
    value (published for λ = 500) after ours."""
    shown = TABLE5 + ("dm_stage2",)
    if not df.method.isin([m for m in shown if m != "full"]).any():
        return ""
    blocks = []
    for name, unit in _units(df, [TABLE1_ATTACK], [m for m in shown if m != "full"]):
        rows, used = _method_rows(df, unit, shown, with_lambda=True)
        blocks.append(f"**{name}**, ours (paper); {_basis(pd.concat(used))}\n\n"
                      + _md(["method", "λ", "AOI", "AAI", "DR"], rows))
    return (f"## Table 5: defenses under {TABLE1_ATTACK}\n\n"
            f"DM's λ is chosen per seed on the validation split: the best validation AAI under {TABLE1_ATTACK} "
            f"among the λ whose validation accuracy is at most {AOI_MARGIN:g} points below the full "
            "fine-tune's (every λ's model is in the sweep's table). The paper publishes DM@stage-1&2 at "
            "λ = 500 only.\n\n" + "\n\n".join(blocks))


def sweep(df: pd.DataFrame) -> str:
    """Every stage-2 trial: its point, validation accuracy (and validation AAI for λ
    methods), AOI and AAI under Table 1's attack, and what model selection made of it."""
    clean = df[(df.method != "pretrain") & (df.attack.isna() | (df.attack == ""))]
    if len(clean) < 2:
        return ""
    rows = []
    for _, r in clean.iterrows():
        hit = df[(df.stage == r.stage) & (df.attack == TABLE1_ATTACK)]
        aai = hit.AAI.iloc[0] if len(hit) else None
        seed = r.seed if "seed" in r and pd.notna(r.seed) else ""
        mark = "" if not r.selected else "✓ λ chosen" if pd.notna(r.lam) and r.get("chosen", False) else "✓"
        rows.append([r.dataset, r.backbone, MODEL_NAME.get(r.method, r.method), str(seed),
                     "" if pd.isna(r.lam) else f"{r.lam:g}", f"{r.lr_f:g}", f"{r.lr_g:g}", str(r.optimizer),
                     _fmt(r.get("val_acc_1")), _fmt(r.val_acc), _fmt(r.get("val_AAI")), _fmt(r.get("f_l1")),
                     _fmt(r.AOI), _fmt(aai), mark])
    return ("## Stage 2 sweep: every trial\n\nModel selection: best validation accuracy per dataset, "
            "backbone, method, λ and seed (✓); for DM, the λ chosen on validation (✓ λ chosen). The test "
            "split is never used to choose. ‖f(x)‖₁: the mean L1 norm of the features on the validation "
            "images (DM's LL falls if f shrinks while g grows, g∘f unchanged: compare it with the full "
            "fine-tune's).\n\n"
            + _md(["dataset", "backbone", "method", "seed", "λ", "lr_f", "lr_g", "optimizer", "val acc (epoch 1)",
                   "val acc", "val AAI", "‖f(x)‖₁", "AOI", f"AAI {TABLE1_ATTACK}", "selected"], rows))


def _full_by(df: pd.DataFrame, keys: tuple) -> dict:
    """The full fine-tune of every unit, grouped by ``keys`` of the unit: group ->
    [(unit, its rows over the seeds)]."""
    out: dict = {}
    every = units(df[df.attack == TABLE1_ATTACK])
    for u in every:
        rows = picks(df, u, "full", TABLE1_ATTACK)
        if len(rows):
            out.setdefault(tuple(u[k] for k in keys), []).append((u, rows))
    return out


def table3(df: pd.DataFrame) -> str:
    """Table 3: the full fine-tune of each ResNet, averaged over the target datasets
    (the paper: over its seven); one row per job, backbone and source data. Other
    architectures have a table of their own (``architectures``)."""
    groups = {k: v for k, v in _full_by(df, ("job", "backbone", "source_data")).items()
              if family(k[1]).name == "resnet"}
    if not groups:  # one backbone is still a row to set beside the paper's
        return ""
    jobs = len({j for j, _, _ in groups}) > 1
    rows = []
    for (job, backbone, src), members in groups.items():
        means = {k: float(np.mean([r[k].astype(float).mean() for _, r in members])) for k in ("AOI", "AAI", "DR")}
        p = {k: paper_value("table3", f"full_finetune:{backbone}", k, "mean7") for k in ("AOI", "AAI", "DR")}
        rows.append(([job] if jobs else []) + [backbone, src or "–", str(len(members))]
                    + [f"{_fmt(means[k])} ({_fmt(p[k])})" for k in ("AOI", "AAI", "DR")])
    return (f"## Table 3: backbones (full fine-tune, {TABLE1_ATTACK}, mean over target datasets)\n\n"
            + _md((["job"] if jobs else []) + ["backbone", "pre-trained on", "datasets", "AOI", "AAI", "DR"], rows))


def architectures(df: pd.DataFrame) -> str:
    """AOI, AAI and DR by architecture: each backbone's Table-1 models (standard, partial,
    full), averaged over the target datasets of its unit, beside Table 3 rather than in
    it; the paper's numbers (Table 3's, for its ResNets' full fine-tune) where they exist.
    Empty unless a run has a backbone that is not a ResNet."""
    every = units(df[df.attack == TABLE1_ATTACK]) if len(df) else []
    if all(family(u["backbone"]).name == "resnet" for u in every):
        return ""
    groups: dict = {}
    for u in every:
        for method in TABLE1:
            rows = picks(df, u, method, TABLE1_ATTACK)
            if len(rows):
                groups.setdefault((u["job"], u["backbone"], u["source_data"], method), {})[u["dataset"]] = rows
    out = []
    for (job, backbone, src, method), by_ds in groups.items():
        means = {k: float(np.mean([r[k].astype(float).mean() for r in by_ds.values()])) for k in ("AOI", "AAI", "DR")}
        p = {k: paper_value("table3", f"full_finetune:{backbone}", k, "mean7") if method == "full" else None
             for k in ("AOI", "AAI", "DR")}
        out.append([job, family(backbone).name, backbone, method, src or "–", str(len(by_ds))]
                   + [f"{_fmt(means[k])} ({_fmt(p[k])})" for k in ("AOI", "AAI", "DR")])
    return (f"## Architectures (Table 1's protocol by backbone, {TABLE1_ATTACK}, mean over target datasets; "
            f"the paper's ResNet numbers in brackets)\n\n"
            + _md(["job", "family", "backbone", "method", "pre-trained on", "datasets", "AOI", "AAI", "DR"], out))


SOURCE_ALIAS = {"animals10": "imagenet10animals", "imagenet10animals": "imagenet10animals", "cifar10": "cifar10"}


def table4(df: pd.DataFrame) -> str:
    """Table 4: the full fine-tune by the data its backbone was pre-trained on, one row per
    job, backbone, source data and target."""
    groups = _full_by(df, ("job", "backbone", "source_data", "dataset"))
    if not groups or not any(src for _, _, src, _ in groups):
        return ""
    jobs = len({j for j, _, _, _ in groups}) > 1
    rows = []
    for (job, backbone, src, dataset), [(_, r)] in groups.items():
        p = {k: paper_value("table4", f"source:{SOURCE_ALIAS.get(str(src), src)}", k, dataset) for k in ("AOI", "AAI")}
        rows.append(([job] if jobs else []) + [src or "–", backbone, dataset]
                    + [f"{_fmt_ci(r, k)} ({_fmt(p[k])})" for k in ("AOI", "AAI")])
    return (f"## Table 4: source data (full fine-tune, {TABLE1_ATTACK})\n\n"
            + _md((["job"] if jobs else []) + ["pre-trained on", "backbone", "target", "AOI", "AAI"], rows))


# -- figures, claims and the page --------------------------------------------------------

FIGURES = {
    "fig3": "Figure 3: SVCCA similarity (×100) of the fine-tuned (FT), pre-trained (PT) and "
            "standard (ST) models, (a) bottom layer (layer1), (b) all four layers.",
    "fig4": "Figure 4: targeted UAPs of the fine-tuned and the standard model (scaled to [0, 1] to be seen).",
    "fig5": "Figure 5: (a) each model's UAP against snapshots taken along its own training "
            "(success rate); (b) DR that the pre-trained model's UAP causes on the fine-tuned and the standard model.",
    "fig6": "Figure 6: MMD² between source and target embeddings of the pre-trained model "
            "against the fine-tuned model's DR (Table 1's attack).",
}
PAPER_FINDINGS = {
    "fig3": "Paper: the fine-tuned model is closer to the pre-trained than to the standard model, on the "
            "bottom layer and on all layers, for most datasets.",
    "fig4": "Paper: the fine-tuned model's UAP shows no semantics; the standard model's shows the target letter's edges.",
    "fig5": "Paper: (a) the fine-tuned model is fooled by its UAP from the very beginning of training; "
            "(b) the pre-trained UAP raises the fine-tuned model's DR clearly, the standard model's trivially.",
    "fig6": "Paper: DR grows with MMD; above MMD 1.0 DR is almost 100 %.",
}


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=9, wrap=True, transform=ax.transAxes)
    ax.set_axis_off()


def _merge(values: list):
    """The replicates' analyses as one structure: (numbers averaged, their standard
    deviations over the seeds, 0 for one seed); other leaves are the first seed's."""
    first = values[0]
    if isinstance(first, dict):
        keys = dict.fromkeys(k for v in values if isinstance(v, dict) for k in v)
        pairs = {k: _merge([v[k] for v in values if isinstance(v, dict) and k in v]) for k in keys}
        return {k: m for k, (m, _) in pairs.items()}, {k: sd for k, (_, sd) in pairs.items()}
    if isinstance(first, list) and all(isinstance(v, list) and len(v) == len(first) for v in values):
        pairs = [_merge([v[i] for v in values]) for i in range(len(first))]
        return [m for m, _ in pairs], [sd for _, sd in pairs]
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        a = np.asarray(values, dtype=float)
        return float(np.nanmean(a)), float(np.nanstd(a, ddof=1)) if len(a) > 1 else 0.0
    return first, None


def merged(found: dict) -> tuple[dict, dict, int]:
    """(mean datasets, their sd over seeds, the number of seeds) of an analyses result."""
    reps = [r.get("datasets", {}) for r in by_seed(found).values()]
    if not reps:
        return {}, {}, 0
    mean, sd = _merge(reps)
    return mean, sd, len(reps)


def figures(df: pd.DataFrame, found: dict, folder) -> dict:
    """Figures 3-6 as PNG files in ``folder``; returns name -> file name. A figure whose
    numbers this run lacks still gets its file, saying what is missing. With several
    seeds, bars and points are means with ±1 standard deviation over the seeds."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data, spread, _ = merged(found)
    out = {}
    for name, (draw, file) in {"fig3": (_fig3, "fig3_cca.png"), "fig4": (_fig4, "fig4_uap.png"),
                               "fig5": (_fig5, "fig5_uap_attacks.png"), "fig6": (_fig6, "fig6_mmd_dr.png")}.items():
        save_png(draw(df, data, spread), folder / file)
        out[name] = file
    return out


def _fig3(df: pd.DataFrame, data: dict, spread: dict):
    """CCA: two panels of grouped bars."""
    pairs = [("fine-tuned|pre-trained", "FT/PT"), ("fine-tuned|standard", "FT/ST"), ("pre-trained|standard", "PT/ST")]
    fig, axes = pyplot().subplots(1, 2, figsize=(9, 3.2))
    have = [d for d in data if data[d].get("cca")]
    for ax, part, title in zip(axes, ("bottom", "all"), ("(a) bottom layer", "(b) all layers")):
        if not have:
            _empty(ax, "no CCA in this run")
            continue
        x = np.arange(len(have))
        for i, (pair, label) in enumerate(pairs):
            vals = [100 * data[d]["cca"].get(pair, {}).get(part, float("nan")) for d in have]
            err = [100 * (spread.get(d, {}).get("cca", {}).get(pair, {}).get(part) or 0.0) for d in have]
            ax.bar(x + (i - 1) * 0.27, vals, 0.27, yerr=err, capsize=2, label=label)
        chance = [100 * data[d]["cca"].get("chance", {}).get(part, float("nan")) for d in have]
        ax.hlines(chance, x - 0.45, x + 0.45, colors="k", linestyles="dashed", label="chance (rows shuffled)")
        ax.set_xticks(x, have)
        ax.set_ylim(0, 100)
        ax.set_title(title)
        ax.set_ylabel("SVCCA ×100")
    axes[0].legend(fontsize=8)
    return fig


def _fig4(df: pd.DataFrame, data: dict, spread: dict):
    """The UAP images, fine-tuned and standard, per dataset."""
    import torch

    uaps = [(d, k, v) for d in data for k, v in data[d].get("uap", {}).items()]
    fig, axes = pyplot().subplots(1, max(1, len(uaps)), figsize=(2.6 * max(1, len(uaps)), 2.8), squeeze=False)
    if not uaps:
        _empty(axes[0][0], "no UAP in this run")
    for ax, (d, k, v) in zip(axes[0], uaps):
        pt = Path(v["png"]).with_suffix(".pt")
        if pt.is_file():
            delta = torch.load(pt, weights_only=True).float()
            img = ((delta - delta.min()) / (delta.max() - delta.min()).clamp_min(1e-12)).permute(1, 2, 0).numpy()
            ax.imshow(img, interpolation="nearest")
            ax.set_axis_off()
        else:
            _empty(ax, "perturbation file missing")
        ax.set_title(f"{d}, {'fine-tuned' if k == 'full' else 'standard'}\nsuccess {v['success']:.1f} %",
                     fontsize=8)
    return fig


def _fig5(df: pd.DataFrame, data: dict, spread: dict):
    """(a) UAP success along training, (b) the pre-trained UAP's DR."""
    fig, (a, b) = pyplot().subplots(1, 2, figsize=(9, 3.2))
    drawn = False
    for d in data:
        for k, v in data[d].get("uap", {}).items():
            pts = [(p["step"], p["success"]) for p in v.get("along_training", []) if p["step"] is not None]
            if pts:
                a.plot(*zip(*pts), marker="o", label=f"{d}, {'fine-tuned' if k == 'full' else 'standard'}")
                drawn = True
    if drawn:
        a.set_xlabel("training step")
        a.set_ylabel("UAP success rate (%)")
        a.set_ylim(0, 100)
        a.legend(fontsize=8)
        a.set_title("(a) UAP against training snapshots")
    else:
        _empty(a, "no snapshots in this run")
    trans = [d for d in data if data[d].get("uap_transfer")]
    if trans:
        x = np.arange(len(trans))
        for i, who in enumerate(("fine-tuned", "standard")):
            err = [spread.get(d, {}).get("uap_transfer", {}).get("DR", {}).get(who) or 0.0 for d in trans]
            b.bar(x + (i - 0.5) * 0.35, [data[d]["uap_transfer"]["DR"].get(who, float("nan")) for d in trans],
                  0.35, yerr=err, capsize=2, label=who)
        b.set_xticks(x, trans)
        b.set_ylabel("DR under the pre-trained UAP (%)")
        b.legend(fontsize=8)
        b.set_title("(b) pre-trained model's UAP")
    else:
        _empty(b, "no source data here for the pre-trained UAP")
    return fig


def _fig6(df: pd.DataFrame, data: dict, spread: dict):
    """MMD against the full fine-tune's DR (means, ±1 sd over seeds)."""
    fig, ax = pyplot().subplots(figsize=(4.5, 3.2))
    xs, ys, xe, ye, ls = [], [], [], [], []
    every = units(df[df.attack == TABLE1_ATTACK]) if len(df) else []
    for d in data:
        unit = next((u for u in every if u["dataset"] == d), None)
        rows = picks(df, unit, "full", TABLE1_ATTACK) if unit else []
        if "mmd" in data[d] and len(rows):
            xs.append(data[d]["mmd"]["mmd2"])
            xe.append(spread.get(d, {}).get("mmd", {}).get("mmd2") or 0.0)
            ys.append(float(rows.DR.mean()))
            ye.append(float(rows.DR.std(ddof=1)) if len(rows) > 1 else 0.0)
            ls.append(d)
    if xs:
        ax.errorbar(xs, ys, xerr=xe, yerr=ye, fmt="o", capsize=2)
        for x_, y_, l_ in zip(xs, ys, ls):
            ax.annotate(l_, (x_, y_), fontsize=8)
        ax.set_xlabel("MMD² (source, target)")
        ax.set_ylabel(f"DR of the full fine-tune (%), {TABLE1_ATTACK}")
    else:
        _empty(ax, "no MMD in this run")
    return fig


def analyses_markdown(found: dict) -> str:
    data, _, seeds = merged(found)
    if not data:
        return ""
    rows = []
    for d, v in data.items():
        cca = v.get("cca", {})
        cell = lambda pair, part: _fmt(100 * cca[pair][part]) if pair in cca else "–"  # noqa: E731
        uap = v.get("uap", {})
        tr = v.get("uap_transfer", {}).get("DR", {})
        ll = v.get("ll", {})
        rows.append([d, cell("fine-tuned|pre-trained", "bottom"), cell("fine-tuned|standard", "bottom"),
                     cell("pre-trained|standard", "bottom"), cell("chance", "bottom"), cell("fine-tuned|pre-trained", "all"),
                     cell("fine-tuned|standard", "all"), cell("pre-trained|standard", "all"), cell("chance", "all"),
                     _fmt(uap.get("full", {}).get("success")), _fmt(uap.get("scratch", {}).get("success")),
                     _fmt(tr.get("fine-tuned")), _fmt(tr.get("standard")),
                     "–" if "mmd" not in v else f"{v['mmd']['mmd2']:.4f}",
                     _fmt(ll.get("pre-trained")), _fmt(ll.get("standard")), _fmt(ll.get("fine-tuned"))])
    return ("## Analyses (Section 4)\n\nSVCCA ×100 (bottom layer | all layers; chance: the same rows of two "
            "unrelated representations, one side's rows shuffled: a similarity near it means nothing), UAP "
            "success rates (%), DR under the pre-trained model's UAP, MMD² of source and target embeddings, "
            "LL (Eq. 4) of f"
            + (f"; means over {seeds} seeds (the figures show their spread)" if seeds > 1 else "") + ".\n\n"
            + _md(["dataset", "FT/PT bottom", "FT/ST bottom", "PT/ST bottom", "chance bottom", "FT/PT all",
                   "FT/ST all", "PT/ST all", "chance all", "UAP success FT", "UAP success ST", "pre-trained UAP: DR FT",
                   "pre-trained UAP: DR ST", "MMD²", "LL PT", "LL ST", "LL FT"], rows))


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:.9em}th,td{border:1px solid #ccc;padding:.3em .6em}
th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee}.agree{color:#17702b;font-weight:bold}
.disagree{color:#b3261e;font-weight:bold}.inconclusive{color:#8a6d00;font-weight:bold}
figure{margin:1.5em 0}figcaption{font-size:.9em;color:#444}"""


def build(df: pd.DataFrame, found: dict, folder, title: str = "study", masks: dict | None = None) -> Path:
    """The report: ``index.md`` and a static ``index.html`` with Tables 1-5 (the paper's
    values beside ours, with intervals), Figures 3-6 as PNG, the analyses and a line per
    main claim (``study.claims``; also ``claims.json``, for machines). ``masks``: the
    models' per-image results (``per_image.json``), which the claims' paired intervals
    need. Every table and figure is there even when this run lacks its numbers (it then
    says so), so the page's shape never depends on the job. Returns the HTML path."""
    import html
    import json

    import markdown

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    figs = figures(df, found, folder)
    checked = judge(df, found, masks or {})
    atomic_write_text(folder / "claims.json", json.dumps(checked, indent=1, sort_keys=True) + "\n")
    empty = {"table1": table1, "table2": table2, "table3": table3, "table4": table4, "table5": table5}
    pre, first = (premise(df), stage1(df)) if len(df) else ("", "")
    tables = [first] if first else []
    for name, fn in empty.items():
        body = fn(df) if len(df) else ""
        tables.append(body or f"## {name.replace('table', 'Table ')}\n\n*This run has no models for this table.*")
        if name == "table3" and len(df):
            tables.append(architectures(df))
    claim_md = "\n".join(f"- **{c['verdict']}** — {c['claim']} ({c['detail']})" for c in checked)
    fig_md = "\n\n".join(f"![{FIGURES[k]}]({v})\n\n*{FIGURES[k]}* {PAPER_FINDINGS[k]}" for k, v in figs.items())
    md = "\n\n".join(p for p in [f"# {title}: report", replicates(df), pre,
                                 "## The paper's claims, checked on this run", claim_md,
                                 *tables, analyses_markdown(found), "## Figures", fig_md] if p) + "\n"
    atomic_write_text(folder / "index.md", md)
    body = []
    body.append(f"<h1>{html.escape(title)}: report</h1><p>{html.escape(replicates(df))}</p>")
    if pre:
        body.append(markdown.markdown(pre))
    body.append("<h2>The paper's claims, checked on this run</h2><ul>")
    for c in checked:
        body.append(f'<li class="claim"><span class="{c["verdict"]}">{c["verdict"]}</span> — '
                    f"{html.escape(c['claim'])} <small>({html.escape(c['detail'])})</small></li>")
    body.append("</ul>")
    for t in tables + [analyses_markdown(found)]:
        if t:
            body.append(markdown.markdown(t, extensions=["tables"]))
    body.append("<h2>Figures</h2>")
    for k, v in figs.items():
        body.append(f'<figure id="{k}"><img src="{v}" alt="{html.escape(FIGURES[k])}">'
                    f"<figcaption>{html.escape(FIGURES[k])} {html.escape(PAPER_FINDINGS[k])}</figcaption></figure>")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}: report</title>"
            f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>")
    atomic_write_text(folder / "index.html", page)
    return folder / "index.html"


def read_results(path, job: str = "") -> pd.DataFrame:
    """A ``results.csv``; one written by an earlier version reads as the new one (``setting``
    is ``method``, a missing ``job`` is ``job``, a missing ``chosen`` is ``selected``)."""
    df = pd.read_csv(path).rename(columns={"setting": "method"})
    if "job" not in df:
        df.insert(0, "job", job)
    df["job"] = df["job"].fillna(job).astype(str)
    if "selected" in df:
        df["selected"] = df["selected"].fillna(True).astype(bool)
    if "chosen" not in df and "selected" in df:
        df["chosen"] = df["selected"]
    return df


def read_analyses(folder) -> dict:
    """``folder/analyses.json`` with each UAP image's path pointing into ``folder`` (the
    run wrote paths under its own OUT; a download or a copy moves the images)."""
    import json

    folder = Path(folder)
    found = json.loads((folder / "analyses.json").read_text())
    for rep in by_seed(found).values():
        for v in rep.get("datasets", {}).values():
            for u in v.get("uap", {}).values():
                u["png"] = str(folder / Path(u["png"]).name)
    return found


def from_mlflow(folder, experiment: str | None = None, log=print) -> Path:
    """Rebuilds the report from the tracking server in use: for each experiment (or the
    one named), the newest finished job run that logged ``results.csv``; their results
    are merged (the paper's tables come from several jobs) and so are their analyses."""
    import tempfile

    import mlflow

    client = mlflow.MlflowClient()
    if experiment:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            known = ", ".join(e.name for e in client.search_experiments()) or "none"
            raise LookupError(f"no MLflow experiment named {experiment!r} (known: {known})")
        exps = [exp]
    else:
        exps = [e for e in client.search_experiments() if e.name != "Default"]
    frames, found, names, masks = [], {"seeds": {}}, [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for exp in exps:
            runs = client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'",
                                      order_by=["attributes.start_time DESC"], max_results=200)
            for run in runs:
                if run.data.tags.get("mlflow.parentRunId"):
                    continue
                have = {a.path for a in client.list_artifacts(run.info.run_id)}
                if "results.csv" not in have:
                    continue
                d = Path(tmp) / run.info.run_id
                d.mkdir()
                frames.append(_job_artifacts(client, run.info.run_id, have, d, found, masks, exp.name))
                names.append(exp.name)
                log(f"report: {exp.name}: run {run.info.run_id} ({run.info.run_name})")
                break
        if not frames:
            raise LookupError("no finished job run with results.csv in "
                              + (f"experiment {experiment!r}" if experiment else "any experiment"))
        # every job's rows stay apart (tables and claims compare within a job's units)
        df = pd.concat(frames, ignore_index=True).drop_duplicates(subset=["job", "stage", "attack"], keep="first")
        df["selected"] = df["selected"].fillna(True).astype(bool)
        df["chosen"] = df["chosen"].where(df["chosen"].notna(), df["selected"]).astype(bool)
        return build(df, found, folder, title=" + ".join(names), masks=masks)


def _job_artifacts(client, run_id: str, have: set, d: Path, found: dict, masks: dict,
                   job: str = "") -> pd.DataFrame:
    """A job run's results frame (``job``: its name, for results written before the
    column); its analyses (per seed) and per-image results are merged into ``found``
    and ``masks``."""
    import json

    df = read_results(client.download_artifacts(run_id, "results.csv", str(d)), job)
    if "per_image.json" in have:
        masks.update(json.loads(Path(client.download_artifacts(run_id, "per_image.json", str(d))).read_text()))
    if "analyses" in have:
        a = Path(client.download_artifacts(run_id, "analyses", str(d)))
        if (a / "analyses.json").is_file():
            for seed, rep in by_seed(read_analyses(a)).items():
                slot = found["seeds"].setdefault(str(seed), {"datasets": {}})["datasets"]
                for ds, v in rep.get("datasets", {}).items():
                    slot.setdefault(ds, {}).update(v)
    return df
