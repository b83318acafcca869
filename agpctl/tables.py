"""Rich tables of metrics: per category and the mean, in %, one decimal.

Shared by every command that shows metrics (train, eval, tune)."""

from __future__ import annotations

import math
from typing import Any

from rich.table import Table

METRIC_COLUMNS = [
    ("i_auroc", "I-AUROC"),
    ("p_auroc", "P-AUROC"),
    ("pro", "PRO"),
    ("i_ap", "I-AP"),
    ("p_ap", "P-AP"),
    ("i_f1max", "I-F1max"),
    ("p_f1max", "P-F1max"),
]


def format_percent(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{100 * value:.1f}"


def metrics_table(table: dict[str, dict[str, float]], title: str | None = None) -> Table:
    present = [(key, label) for key, label in METRIC_COLUMNS if any(key in row for row in table.values())]
    out = Table(title=title, show_lines=False)
    out.add_column("category", style="bold")
    for _, label in present:
        out.add_column(label, justify="right")
    rows = [(name, row) for name, row in table.items() if name != "mean"]
    for name, row in sorted(rows):
        out.add_row(name, *(format_percent(row.get(key)) for key, _ in present))
    if "mean" in table:
        out.add_section()
        out.add_row("mean", *(format_percent(table["mean"].get(key)) for key, _ in present), style="bold")
    return out
