"""The report folder: ``index.md``, a static ``index.html`` and ``claims.json``."""

from __future__ import annotations

import html
import json
from pathlib import Path

import markdown
import pandas as pd

from study.claims import judge, qualifier
from study.files import atomic_write_text, whole_folder
from study.report import sources
from study.report.figures import FIGURES, FOREST, PAPER_FINDINGS, figures, forest
from study.report.tables import analyses_table, claims_section, premise, replicates, sections

_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:.9em}th,td{border:1px solid #ccc;padding:.3em .6em}
th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee}.agree{color:#17702b;font-weight:bold}
.disagree{color:#b3261e;font-weight:bold}.inconclusive{color:#8a6d00;font-weight:bold}
.suggests{color:#17702b;font-style:italic}.contradicts{color:#b3261e;font-style:italic}
.one-run{color:#8a6d00}figure{margin:1.5em 0}figcaption{font-size:.9em;color:#444}"""


def build(
    df: pd.DataFrame,
    found: dict,
    folder,
    title: str = "study",
    masks: dict | None = None,
    checked: list[dict] | None = None,
    examples: dict | None = None,
) -> Path:
    """The report: ``index.md`` and a static ``index.html`` with the tables of
    ``tables.SECTIONS`` (the paper's values beside ours, with intervals), Figures 3-6 as
    PNG, the analyses and a line per main claim (``study.claims``; also ``claims.json``,
    for machines). ``masks``: the models' per-image results (``per_image.json``), which
    the claims' paired intervals need. Tables 1-5 and every figure are there even when this
    run lacks their numbers (they then say so), so the page's shape never depends on the
    job. ``checked``: the claims already judged on the same inputs (else judged here).
    ``examples``: a test image under the job's corruptions (``figures.figures``).
    Built whole in a temporary folder, then moved into ``folder``: a report that fails
    half-way leaves the one before it as it was. Returns the HTML path."""
    folder = Path(folder)
    with whole_folder(folder) as tmp:
        _build(df, found, tmp, title, masks, checked, examples)
    return folder / "index.html"


def _build(df, found, folder: Path, title, masks, checked, examples) -> None:
    figs = figures(df, found, folder, examples)
    checked = judge(df, found, masks or {}) if checked is None else checked
    forest(checked, folder / FOREST)
    atomic_write_text(folder / "claims.json", json.dumps(checked, indent=1, sort_keys=True) + "\n")
    pre = premise(df) if len(df) else ""
    tables = sections(df, placeholders=True) + [analyses_table(found)]
    claim_md = claims_section(checked, heading=False)
    fig_md = "\n\n".join(f"![{FIGURES[k]}]({v})\n\n*{FIGURES[k]}* {PAPER_FINDINGS[k]}" for k, v in figs.items())
    md = (
        "\n\n".join(
            p
            for p in [
                f"# {title}: report",
                replicates(df),
                pre,
                "## The paper's claims, checked on this run",
                f"![Every verdict at a glance]({FOREST})",
                claim_md,
                *tables,
                "## Figures",
                fig_md,
            ]
            if p
        )
        + "\n"
    )
    atomic_write_text(folder / "index.md", md)
    atomic_write_text(folder / "index.html", _html(df, title, pre, checked, tables, figs))


def _html(df: pd.DataFrame, title: str, pre: str, checked: list, tables: list, figs: dict) -> str:
    body = [f"<h1>{html.escape(title)}: report</h1><p>{html.escape(replicates(df))}</p>"]
    if pre:
        body.append(markdown.markdown(pre))
    body.append("<h2>The paper's claims, checked on this run</h2>")
    body.append(
        f'<figure id="forest"><img src="{FOREST}" alt="every verdict at a glance"><figcaption>Each judged '
        "finding and unit: its effect and 95 % interval, coloured by its verdict (suggests / contradicts: a single "
        "training run), with the test images × seeds it rests on.</figcaption></figure><ul>"
    )
    for c in checked:
        body.append(
            f'<li class="claim"><span class="{c["verdict"]}">{c["verdict"]}</span>{_one_run(c)} — '
            f"{html.escape(c['claim'])} <small>({html.escape(c['detail'])})</small></li>"
        )
    body.append("</ul>")
    body += [markdown.markdown(t, extensions=["tables"]) for t in tables if t]
    body.append("<h2>Figures</h2>")
    for k, v in figs.items():
        body.append(
            f'<figure id="{k}"><img src="{v}" alt="{html.escape(FIGURES[k])}">'
            f"<figcaption>{html.escape(FIGURES[k])} {html.escape(PAPER_FINDINGS[k])}</figcaption></figure>"
        )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}: report</title>"
        f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>"
    )


def from_mlflow(folder, experiment: str | None = None, log=print) -> Path:
    """The report rebuilt from the tracking server in use (``sources.from_mlflow``)."""
    df, found, masks, title = sources.from_mlflow(experiment, log)
    return build(df, found, folder, title=title, masks=masks)


def _one_run(claim: dict) -> str:
    q = qualifier(claim)
    return f' <span class="one-run">({html.escape(q)})</span>' if q else ""
