"""The budgets each row must meet, read from the table in ``bench/README.md`` so that the
numbers live in one place, and the check of a row's figures against them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

README = Path(__file__).with_name("README.md")
# what a budget can bound: the keys of a row's figures (`bench.measure.Row.figures`)
UNITS = ("req/s", "ms p50", "ms p99", "µs CPU/req", "MB RSS", "ms added p50")
_ROW = re.compile(r"^\|\s*`(?P<row>[a-z0-9-]+)`\s*\|.*\|(?P<budget>[^|]*)\|\s*$")
_CLAUSE = re.compile(r"(?P<op>[≥≤])\s*(?P<limit>[\d,.]+)\s+(?P<unit>.+)")


@dataclass(frozen=True)
class Budget:
    op: str  # "≥" or "≤"
    limit: float
    unit: str  # one of UNITS

    def failure(self, figures: dict[str, float]) -> str | None:
        """Why `figures` miss this budget, or None when they meet it."""
        value = figures.get(self.unit)
        if value is None:
            return f"no {self.unit} measured"
        met = value >= self.limit if self.op == "≥" else value <= self.limit
        return None if met else f"{show(value)} {self.unit}, budget {self.op} {show(self.limit)}"


def show(value: float) -> str:
    """A figure as the table prints it: 3,000 and 228 but 0.39."""
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"


def parse_budget(text: str) -> list[Budget]:
    """``≥ 3,000 req/s; ≤ 400 µs CPU/req`` -> two budgets; ``—`` (none) -> []."""
    budgets = []
    for clause in text.split(";"):
        clause = clause.strip()
        if clause in ("", "—", "-"):
            continue
        got = _CLAUSE.fullmatch(clause)
        if got is None or got["unit"] not in UNITS:
            raise ValueError(f"{README.name}: cannot read the budget {clause!r} "
                             f"(units: {', '.join(UNITS)})")
        budgets.append(Budget(got["op"], float(got["limit"].replace(",", "")), got["unit"]))
    return budgets


def read_budgets(readme: Path = README) -> dict[str, list[Budget]]:
    """Row name -> its budgets, from the README's table rows ``| `name` | ... | budget |``."""
    found = {}
    for line in readme.read_text(encoding="utf-8").splitlines():
        row = _ROW.match(line)
        if row is not None:
            found[row["row"]] = parse_budget(row["budget"])
    return found


def verdict(figures: dict[str, float], problems: list[str], budgets: list[Budget]) -> str:
    """``PASS``, ``FAIL: <why>`` (its problems, else the budgets it missed), or ``-`` (no
    budget)."""
    failures = problems or [why for b in budgets if (why := b.failure(figures)) is not None]
    if failures:
        return "FAIL: " + "; ".join(failures)
    return "PASS" if budgets else "-"
