"""Usage reports read back from the usage store: the rows ``gateway usage`` prints and the
admin API serves, and their CSV form."""

from __future__ import annotations

import csv
import io
from datetime import UTC, date, datetime
from typing import Any

from gateway.stores.usage import COUNTERS, UsageStore

COLUMNS = ("day", "team", "key_id", "model", *COUNTERS, "total_tokens")


async def usage_report(store: UsageStore, team: str | None, since: date, until: date,
                       model: str | None = None) -> list[dict[str, Any]]:
    """Usage rows as JSON-ready dicts, sorted by day, team (of one model, when given)."""
    rows = await store.query(team, since, until)
    return [{"day": r.day.isoformat(), "team": r.team, "key_id": r.key_id, "model": r.model,
             **r.counts(), "total_tokens": r.prompt_tokens + r.completion_tokens}
            for r in rows if model is None or r.model == model]


def default_range(today: date | None = None) -> tuple[date, date]:
    """From the first day of the current (UTC) month to today."""
    day = today or datetime.now(UTC).date()
    return day.replace(day=1), day


def usage_csv(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()
