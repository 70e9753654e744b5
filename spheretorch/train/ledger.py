"""The tidy record of a study: ``runs.jsonl`` (one JSON object per finished run, appended as
runs finish, which also makes an interrupted study resumable) and the same rows as
``runs.csv``."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["Ledger", "write_csv"]


class Ledger:
    """Append-only ``runs.jsonl``: one row per finished run, keyed by ``row["key"]``.

    A study records each run as it finishes; on resume every recorded key is skipped, so an
    interrupted study continues where it stopped. A torn last line (a kill mid-write) is
    ignored and rewritten away."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.rows: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            good = []
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(row, dict) and "key" in row:
                    self.rows[row["key"]] = row
                    good.append(line + "\n")
            self.path.write_text("".join(good), encoding="utf-8")

    def __contains__(self, key: str) -> bool:
        return key in self.rows

    def get(self, key: str) -> dict[str, Any] | None:
        return self.rows.get(key)

    def record(self, row: dict[str, Any]) -> None:
        self.rows[row["key"]] = row
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()

    def select(self, **match: Any) -> list[dict[str, Any]]:
        return [r for r in self.rows.values() if all(r.get(k) == v for k, v in match.items())]


def write_csv(rows: Sequence[dict[str, Any]], path: str | Path) -> None:
    """The rows as CSV (columns: the union of keys in first-seen order; nested values as
    JSON)."""
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for r in rows:
            w.writerow(
                {k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in r.items()}
            )
