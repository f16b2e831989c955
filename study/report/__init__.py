"""The report: the paper's tables and figures rebuilt from a run's results, with the
published numbers beside ours, and the claims judged.

- ``paper``: the paper's published numbers (``study/paper/tables.csv``), by our row
- ``tables``: every Markdown table, and ``SECTIONS``, the one list of tables that both
  ``results.md`` and the report show
- ``figures``: Figures 3-6 as PNG, and the plotting helpers the analyses use
- ``sources``: reading a run back (results.csv, analyses.json, or an MLflow store)
- ``page``: the report folder (``index.md``, ``index.html``, ``claims.json``)

A new table is one function in ``tables`` plus its line in ``SECTIONS``; a new figure is
one function in ``figures`` plus its line in ``FIGURES``.
"""
