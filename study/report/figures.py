"""Figures 3-6 of the paper as PNG files, drawn from a run's analyses and results, and
the plotting helpers the analyses use. With several seeds, bars and points are means with
±1 standard deviation over the seeds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from study.claims import label, mmd_by_unit, mmd_for, picks, units
from study.files import atomic_write_bytes
from study.methods import TABLE1_ATTACK
from study.report import transfer
from study.report.sources import merged

FIGURES = {
    "fig3": "Figure 3: SVCCA similarity (×100) of the fine-tuned (FT), pre-trained (PT) and "
    "standard (ST) models, (a) bottom layer (layer1), (b) all four layers.",
    "fig4": "Figure 4: targeted UAPs of the fine-tuned and the standard model (scaled to [0, 1] to be seen).",
    "fig5": "Figure 5: (a) each model's UAP against snapshots taken along its own training "
    "(success rate); (b) DR that the pre-trained model's UAP causes on the fine-tuned and the standard model.",
    "fig6": "Figure 6: MMD² between source and target embeddings of the pre-trained model "
    "against the fine-tuned model's DR (Table 1's attack).",
    "figt": transfer.FIGURE,
    "figc": "Common corruptions: (a) accuracy against severity per model, the mean over the corruptions "
    "(±1 sd over seeds; one seed: Wilson 95 % over the images); (b) one test image under each corruption "
    "and severity, as the evaluation corrupts it.",
}
PAPER_FINDINGS = {
    "fig3": "Paper: the fine-tuned model is closer to the pre-trained than to the standard model, on the "
    "bottom layer and on all layers, for most datasets.",
    "fig4": "Paper: the fine-tuned model's UAP shows no semantics; the standard model's shows the target "
    "letter's edges.",
    "fig5": "Paper: (a) the fine-tuned model is fooled by its UAP from the very beginning of training; "
    "(b) the pre-trained UAP raises the fine-tuned model's DR clearly, the standard model's trivially.",
    "fig6": "Paper: DR grows with MMD; above MMD 1.0 DR is almost 100 %.",
    "figt": transfer.FINDING,
    "figc": "Not in the paper: Hendrycks & Dietterich's corruptions; Otani & Yamada (2022) find fine-tuning "
    "loses robust pre-training's corruption robustness, and the architecture matters more.",
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


def figures(df: pd.DataFrame, found: dict, folder, examples: dict | None = None) -> dict:
    """Figures 3-6 and the corruptions' as PNG files in ``folder``; returns name -> file
    name. A figure whose numbers this run lacks still gets its file, saying what is
    missing. With several seeds, bars and points are means with ±1 standard deviation
    over the seeds. ``examples``: a test image under the job's corruptions
    (``study.corruptions.example_grid`` with its ``dataset``, ``names``, ``severities``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data, spread, _ = merged(found)
    out = {}
    for name, (draw, file) in {
        "fig3": (_fig3, "fig3_cca.png"),
        "fig4": (_fig4, "fig4_uap.png"),
        "fig5": (_fig5, "fig5_uap_attacks.png"),
        "fig6": (_fig6, "fig6_mmd_dr.png"),
    }.items():
        save_png(draw(df, found, data, spread), folder / file)
        out[name] = file
    save_png(_figc(df, examples), folder / "figc_corruptions.png")
    out["figc"] = "figc_corruptions.png"
    save_png(transfer.figure(df, pyplot), folder / "figt_transfer.png")
    out["figt"] = "figt_transfer.png"
    return out


VERDICT_COLOURS = {
    "agree": "#17702b",
    "suggests": "#7fb88c",
    "disagree": "#b3261e",
    "contradicts": "#e08a84",
    "inconclusive": "#8a6d00",
}
FOREST = "forest.png"


def forest(checked: list[dict], path) -> None:
    """Every verdict at a glance: one row per judged finding and unit, its effect and 95 %
    interval (points, the paper's direction to the right of zero), coloured by the unit's
    verdict, with images × seeds beside it. Findings without intervals (MMD's ρ) are left
    out; a finding with none of its units judged says so in one line."""
    rows = [
        (c.get("id", ""), d)
        for c in checked
        for d in c.get("datasets", [])
        if all(k in d for k in ("effect", "lo", "hi")) and d["effect"] == d["effect"]
    ]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 0.32 * max(len(rows), 3) + 1.2))
    if not rows:
        _empty(ax, "no finding has an interval in this run")
        save_png(fig, path)
        return
    for y, (_, d) in enumerate(reversed(rows)):
        colour = VERDICT_COLOURS.get(d["verdict"], "#555555")
        ax.plot([d["lo"], d["hi"]], [y, y], color=colour, lw=2)
        ax.plot([d["effect"]], [y], "o", color=colour, ms=5)
        seeds = d.get("seeds", 1)
        ax.annotate(
            f"{d['verdict']}  {d.get('images', '?')} img × {seeds} seed{'s' if seeds != 1 else ''}",
            (1.01, y),
            xycoords=("axes fraction", "data"),
            va="center",
            fontsize=7,
            color=colour,
        )
    ax.axvline(0, color="#444444", lw=0.8)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{cid}: {d['dataset']}" for cid, d in reversed(rows)], fontsize=7)
    ax.set_xlabel("effect (points; > 0: the paper's direction) with its 95 % interval", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    ax.set_title("Every finding at a glance", fontsize=9)
    save_png(fig, path)


def _figc(df: pd.DataFrame, examples: dict | None):
    """(a) accuracy against severity per model of the first unit with corruptions; (b)
    the example grid."""
    from study import corruptions, stats
    from study.methods import METHODS

    fig, (a, b) = pyplot().subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [1, 1.3]})
    names = [x for x in df.attack.dropna().unique() if corruptions.parse(x)] if len(df) else []
    every = units(df[df.attack.isin(names)]) if names else []
    if every:
        unit = every[0]
        for method, info in METHODS.items():
            points = []
            for sev in sorted({corruptions.parse(n).severity for n in names}):
                at = [n for n in names if corruptions.parse(n).severity == sev]
                rows = pd.concat([picks(df, unit, method, n) for n in at])
                if not len(rows):
                    continue
                per_seed = rows.groupby(rows.seed.fillna(-1) if "seed" in rows else np.zeros(len(rows))).AAI.mean()
                m = float(per_seed.mean())
                if len(per_seed) > 1:
                    lo = hi = float(per_seed.std(ddof=1))
                else:
                    n = int(rows.images.iloc[0])  # per image a mean over items: Wilson errs wide
                    w = stats.wilson(round(m / 100 * n), n)
                    lo, hi = m - w[0], w[1] - m
                points.append((sev, m, lo, hi))
            if points:
                s_, m_, lo_, hi_ = zip(*points)
                a.errorbar(s_, m_, yerr=[lo_, hi_], marker="o", capsize=2, label=info.label)
        a.set_xlabel("severity")
        a.set_xticks(sorted({corruptions.parse(n).severity for n in names}))
        a.set_ylabel("accuracy under corruption (%), mean over corruptions")
        a.set_title(f"(a) {label(unit, every)}")
        a.legend(fontsize=7)
    else:
        _empty(a, "this run evaluates no corruptions (eval.corruptions)")
    if examples is not None:
        grid = examples["grid"]  # (corruptions, severities, H, W, 3)
        rows = [np.concatenate(list(r), axis=1) for r in grid]
        b.imshow(np.concatenate(rows, axis=0), interpolation="nearest")
        side = grid.shape[2]
        b.set_yticks([side * (i + 0.5) for i in range(len(examples["names"]))], examples["names"], fontsize=6)
        b.set_xticks([side * (i + 0.5) for i in range(len(examples["severities"]))], examples["severities"])
        b.set_xlabel("severity")
        b.set_title(f"(b) test image 0 of {examples['dataset']}")
    else:
        _empty(b, "no example image (a report built from MLflow, or no corruptions)")
    return fig


def _fig3(df: pd.DataFrame, found: dict, data: dict, spread: dict):
    """CCA: two panels of grouped bars."""
    pairs = [("fine-tuned|pre-trained", "FT/PT"), ("fine-tuned|standard", "FT/ST"), ("pre-trained|standard", "PT/ST")]
    fig, axes = pyplot().subplots(1, 2, figsize=(9, 3.2))
    have = [d for d in data if data[d].get("cca")]
    for ax, part, title in zip(axes, ("bottom", "all"), ("(a) bottom layer", "(b) all layers")):
        if not have:
            _empty(ax, "no CCA in this run")
            continue
        x = np.arange(len(have))
        for i, (pair, short) in enumerate(pairs):
            vals = [100 * data[d]["cca"].get(pair, {}).get(part, float("nan")) for d in have]
            err = [100 * (spread.get(d, {}).get("cca", {}).get(pair, {}).get(part) or 0.0) for d in have]
            ax.bar(x + (i - 1) * 0.27, vals, 0.27, yerr=err, capsize=2, label=short)
        chance = [100 * data[d]["cca"].get("chance", {}).get(part, float("nan")) for d in have]
        ax.hlines(chance, x - 0.45, x + 0.45, colors="k", linestyles="dashed", label="chance (rows shuffled)")
        ax.set_xticks(x, have)
        ax.set_ylim(0, 100)
        ax.set_title(title)
        ax.set_ylabel("SVCCA ×100")
    if have:
        axes[0].legend(fontsize=8)
    return fig


def _fig4(df: pd.DataFrame, found: dict, data: dict, spread: dict):
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
        ax.set_title(f"{d}, {'fine-tuned' if k == 'full' else 'standard'}\nsuccess {v['success']:.1f} %", fontsize=8)
    return fig


def _fig5(df: pd.DataFrame, found: dict, data: dict, spread: dict):
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
            b.bar(
                x + (i - 0.5) * 0.35,
                [data[d]["uap_transfer"]["DR"].get(who, float("nan")) for d in trans],
                0.35,
                yerr=err,
                capsize=2,
                label=who,
            )
        b.set_xticks(x, trans)
        b.set_ylabel("DR under the pre-trained UAP (%)")
        b.legend(fontsize=8)
        b.set_title("(b) pre-trained model's UAP")
    else:
        _empty(b, "no source data here for the pre-trained UAP")
    return fig


def _fig6(df: pd.DataFrame, found: dict, data: dict, spread: dict):
    """MMD against the full fine-tune's DR, per unit (job, backbone, dataset; means, ±1 sd
    over seeds)."""
    fig, ax = pyplot().subplots(figsize=(4.5, 3.2))
    xs, ys, xe, ye, ls = [], [], [], [], []
    every = units(df[df.attack == TABLE1_ATTACK]) if len(df) else []
    mmd = mmd_by_unit(found)
    for unit in every:
        got = mmd_for(mmd, unit)
        rows = picks(df, unit, "full", TABLE1_ATTACK) if got else []
        if len(rows):
            xs.append(float(np.mean(got)))
            xe.append(float(np.std(got, ddof=1)) if len(got) > 1 else 0.0)
            ys.append(float(rows.DR.mean()))
            ye.append(float(rows.DR.std(ddof=1)) if len(rows) > 1 else 0.0)
            ls.append(label(unit, every))
    if xs:
        ax.errorbar(xs, ys, xerr=xe, yerr=ye, fmt="o", capsize=2)
        for x_, y_, l_ in zip(xs, ys, ls):
            ax.annotate(l_, (x_, y_), fontsize=8)
        ax.set_xlabel("MMD² (source, target)")
        ax.set_ylabel(f"DR of the full fine-tune (%), {TABLE1_ATTACK}")
    else:
        _empty(ax, "no MMD in this run")
    return fig
