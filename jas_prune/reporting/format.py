"""Number formatting and markdown tables shared by every part of the report."""

from __future__ import annotations

import re
from typing import Any, Iterable, Sequence

import numpy as np

__all__ = ["pct", "pct_pm", "num", "millions", "table", "mean_std", "md_text"]


def md_text(text: Any) -> str:
    """Text from the data (a class folder's name) made safe in one markdown line or table cell:
    line breaks become spaces, ``|`` is escaped."""
    return _one_line(text).replace("|", "\\|")


def _one_line(text: Any) -> str:
    return re.sub(r"[\r\n\t\v\f]+", " ", str(text))


def pct(x: Any) -> str:
    """``0.8123`` -> ``81.23 %`` (``n/a`` for None)."""
    return "n/a" if x is None else f"{100 * x:.2f} %"


def pct_pm(x: Any, sd: Any) -> str:
    """A share with its std, ``81.23 ± 1.50 %`` (the std left out when None)."""
    if x is None:
        return "n/a"
    return f"{100 * x:.2f} ± {100 * sd:.2f} %" if sd is not None else pct(x)


def num(x: Any, fmt: str = "{:.2f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def millions(x: Any) -> str:
    return "n/a" if x is None else f"{x / 1e6:.3f} M"


def table(header: Sequence[str], rows: Iterable[Sequence[str]], align: str | None = None) -> list[str]:
    """A markdown table (first column left-aligned, the others right-aligned by default)."""
    align = align or "|".join(["---"] + ["---:"] * (len(header) - 1))
    return ["| " + " | ".join(header) + " |", f"|{align}|",
            *("| " + " | ".join(_one_line(c) for c in r) + " |" for r in rows), ""]


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample std (ddof=1; None for a single value) of the non-missing values."""
    v = [float(x) for x in values if x is not None]
    if not v:
        return None, None
    return float(np.mean(v)), (float(np.std(v, ddof=1)) if len(v) > 1 else None)
