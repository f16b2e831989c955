"""A table's cells: numbers as the report writes them, a metric's value with its interval
(one seed's over images, or Student's over the seeds with the image noise they share),
and the line under a table that says what its numbers rest on."""

from __future__ import annotations

import pandas as pd

from study import stats
from study.methods import METHODS

MODEL_NAME = {m.name: m.label for m in METHODS.values()}


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
    # the seeds share their test images: each seed's own image noise (from its interval
    # over images), all of it counted as shared, is the bound on it the rows allow
    image_var = 0.0
    if f"{metric}_lo" in rows and f"{metric}_hi" in rows:
        lo, hi = (pd.to_numeric(rows[f"{metric}_{e}"], errors="coerce") for e in ("lo", "hi"))
        widths = ((hi - lo) / (2 * stats.Z)) ** 2
        image_var = float(widths.mean()) if widths.notna().any() else 0.0
    return stats.over_seeds(rows[metric].astype(float), image_var)


def _fmt_ci(rows: pd.DataFrame, metric: str) -> str:
    """``value [lo, hi]``, the bounds within the metric's range (0-100 %); † where the
    interval is wider than 2 · stats.WIDE points."""
    v, lo, hi = _ci(rows, metric)
    if v != v:
        return "–"
    if lo != lo or hi != hi:
        return f"{v:.2f}"
    lo, hi = max(lo, 0.0), min(hi, 100.0)
    return f"{v:.2f} [{lo:.1f}, {hi:.1f}]" + (" †" if hi - lo > 2 * stats.WIDE else "")


def _basis(rows: pd.DataFrame) -> str:
    """How many images and seeds a block rests on, and what its intervals cover."""
    if len(rows) == 0:
        return ""
    images = sorted({int(n) for n in rows.images.dropna()}) if "images" in rows else []
    seeds = rows.seed.nunique() if "seed" in rows and rows.seed.notna().any() else 1
    if seeds > 1:
        kind = (
            f"Student's t interval over the {seeds} seeds (training runs; t = {stats.t_factor(seeds):.1f}) "
            "with the test images' noise the seeds share (z), within 0–100"
        )
        few = "too few seeds"
    else:
        kind = "interval over the test images (Wilson for AOI and AAI, bootstrap for DR), one training run"
        few = "too few images"
    return (
        f"{'/'.join(map(str, images)) or '?'} test images, {seeds} seed{'s' if seeds > 1 else ''}; "
        f"[lo, hi] is a 95 % {kind}; † wider than {2 * stats.WIDE:g} points: {few}"
    )
