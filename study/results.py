"""The results table: one tidy row per (dataset, backbone, setting, attack).

``OUT/results.csv`` is for machines, ``OUT/results.md`` and the console for people.
AOI, AAI and DR are percentages; attack, AAI and DR are empty for clean-only rows.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from study.data.beton import atomic_write_text

COLUMNS = ["dataset", "backbone", "setting", "attack", "AOI", "AAI", "DR"]


def frame(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=COLUMNS)
    for col in ("AOI", "AAI", "DR"):
        df[col] = pd.to_numeric(df[col], errors="coerce").round(2)
    return df


def to_markdown(df: pd.DataFrame) -> str:
    return df.astype(object).where(df.notna(), "").to_markdown(index=False, floatfmt=".2f")


def write(rows: list[dict], out: Path, title: str = "") -> pd.DataFrame:
    out = Path(out)
    df = frame(rows)
    atomic_write_text(out / "results.csv", df.to_csv(index=False))
    md = (f"# {title}\n\n" if title else "") + to_markdown(df) + "\n"
    atomic_write_text(out / "results.md", md)
    return df
