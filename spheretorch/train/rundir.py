"""A run directory: the files a run writes there (metrics, summary) and who may write them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["METRICS", "SUMMARY", "RunDir"]

METRICS = "metrics.jsonl"
SUMMARY = "summary.json"


class RunDir:
    """The files of one run in ``path``: ``metrics.jsonl`` (one JSON object per evaluation)
    and ``summary.json``. Only the writing process (rank 0) holds one."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def start(self, history: list[dict[str, Any]]) -> None:
        """Create the directory; ``metrics.jsonl`` holds exactly ``history`` (the evaluations
        the checkpoint knows about: a crash between writing a metrics line and the checkpoint
        must not leave a duplicate after resuming)."""
        self.path.mkdir(parents=True, exist_ok=True)
        lines = [json.dumps(row) + "\n" for row in history]
        (self.path / METRICS).write_text("".join(lines), encoding="utf-8")

    def append_metrics(self, row: dict[str, Any]) -> None:
        with open(self.path / METRICS, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()

    def write_summary(self, summary: dict[str, Any]) -> None:
        text = json.dumps(summary, indent=2) + "\n"
        (self.path / SUMMARY).write_text(text, encoding="utf-8")
