"""A run directory: the files a run writes there, the guard that keeps one run from replacing
another, and the lock that keeps two runs out of one directory at a time.

Policy (``docs/errors.md``), the same for ``train`` and ``compare``:

* a directory *holds a run* when it has a checkpoint (``train``), or ``compare``'s outputs or
  a model directory with a checkpoint (``compare``); files of a run that never reached its
  first checkpoint (it crashed or diverged first) are no run: the next run starts over;
* a new run into a directory that holds one needs ``--resume`` (continue it) or ``--force``
  (replace it); ``train`` and ``compare`` never write into each other's directories;
* ``--force`` moves the old run's files into ``DIR/.replaced/`` and *removes* them once the
  new run has written its first checkpoint; if the new run stops before that (error, signal,
  kill), the old run is moved back (at exit, or by the next command that opens ``DIR``);
* one process at a time: ``DIR/.spheretorch.lock`` is held with ``flock`` while a run works
  (released by the OS if the process dies) and names the holder for the second one.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from ..distributed import CHECKPOINT_FILE, SHARDED_CHECKPOINT, find_sharded
from .errors import UserError

__all__ = ["LOCK", "METRICS", "REPLACED", "SUMMARY", "RunDir", "check_out"]

logger = logging.getLogger(__name__)

METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
LOCK = ".spheretorch.lock"
REPLACED = ".replaced"
Kind = Literal["train", "compare"]
#: what each kind of run writes at the top of its directory
FILES: dict[str, tuple[str, ...]] = {
    "train": (CHECKPOINT_FILE, SHARDED_CHECKPOINT, SHARDED_CHECKPOINT + ".old", METRICS, SUMMARY),
    "compare": (
        "compare.json",
        "runs.jsonl",
        "runs.csv",
        "results.json",
        "results.md",
        "run_info.json",
        "loss_curves.png",
        "sweep",
    ),
}


def check_out(text: str | os.PathLike[str]) -> Path:
    """``--out`` as a path that is, or can be made, a directory (``UserError`` otherwise)."""
    if not str(text).strip():
        raise UserError("--out must not be empty (use . for the current directory)")
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {path} exists and is not a directory")
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if ancestor.exists() and not ancestor.is_dir():
        raise UserError(f"--out {path}: {ancestor} is not a directory")
    if not os.access(ancestor if not path.exists() else path, os.W_OK | os.X_OK):
        raise UserError(f"--out {path}: no permission to write in {ancestor}")
    return path


class RunDir:
    """The files of one run in ``path``: ``metrics.jsonl`` (one JSON object per evaluation),
    ``summary.json``, the checkpoint; and :meth:`claim`, the guard and lock around a run."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._given = os.fspath(path)  # Path("") would silently be "."

    # -- files written by the trainer (rank 0) --------------------------------------------
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

    def checkpoint_written(self) -> None:
        """The new run has a checkpoint: a run it replaces (``--force``) goes now. A compare's
        model runs live one level below the compare's directory, hence the parent."""
        for d in (self.path, self.path.parent):
            if (d / REPLACED).is_dir() and RunDir(d)._holds_run():
                shutil.rmtree(d / REPLACED, ignore_errors=True)

    # -- what the directory holds ---------------------------------------------------------
    def _has_checkpoint(self) -> bool:
        return (self.path / CHECKPOINT_FILE).is_file() or bool(
            find_sharded(self.path / SHARDED_CHECKPOINT)
        )

    def _model_runs(self) -> list[Path]:
        return (
            sorted(d for d in self.path.iterdir() if d.is_dir() and RunDir(d)._has_checkpoint())
            if self.path.is_dir()
            else []
        )

    def kind(self) -> Kind | None:
        """``train`` or ``compare`` (as recorded by :meth:`claim`, else from the files)."""
        with contextlib.suppress(OSError, ValueError, AttributeError):
            return json.loads((self.path / LOCK).read_text(encoding="utf-8"))["kind"]
        for kind, names in FILES.items():
            if any((self.path / n).exists() for n in names):
                return kind  # type: ignore[return-value]
        return None

    def _holds_run(self) -> bool:
        if self.kind() == "compare":
            return any((self.path / n).exists() for n in FILES["compare"]) or bool(
                self._model_runs()
            )
        return self._has_checkpoint()

    def _entries(self) -> list[Path]:
        """Everything a run of this directory's kind wrote (what ``--force`` moves aside)."""
        names = {n for names in FILES.values() for n in names}
        found = [self.path / n for n in sorted(names) if (self.path / n).exists()]
        found += list(self.path.glob(f".{CHECKPOINT_FILE}.*.tmp"))
        if self.kind() == "compare":
            found += [d for d in self._model_runs() if d not in found]
            found += [d for d in self.path.iterdir() if d.is_dir() and (d / METRICS).exists()]
            # a grid's points (seq_len=64/, ...) and its plots: the directory is compare's
            found += [d for d in self.path.iterdir() if "=" in d.name or d.suffix == ".png"]
        return list(dict.fromkeys(found))

    # -- guard and lock -------------------------------------------------------------------
    @contextlib.contextmanager
    def claim(self, kind: Kind, *, resume: bool = False, force: bool = False) -> Iterator[None]:
        """Hold the directory for one ``kind`` run (see the module docstring). Under
        ``torchrun`` only rank 0 guards and locks; the other ranks follow it."""
        if resume and force:
            raise UserError("--resume and --force contradict each other: pass one of them")
        check_out(self._given)
        if int(os.environ.get("RANK", "0")) != 0:
            yield
            return
        created = not self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"--out {self.path}: cannot create it ({e.strerror})") from None
        with self._lock() as lock:
            try:
                self._settle_replacement()
                self._guard(kind, resume, force)
                lock.seek(0)
                lock.truncate()
                lock.write(json.dumps(_holder(kind)))
                lock.flush()
                yield
            finally:
                self._settle_replacement()
                if created and not any(p.name != LOCK for p in self.path.iterdir()):
                    shutil.rmtree(self.path, ignore_errors=True)  # nothing written: no trace
                elif not self._entries():
                    (self.path / LOCK).unlink(missing_ok=True)

    @contextlib.contextmanager
    def _lock(self) -> Iterator[Any]:
        with open(self.path / LOCK, "a+", encoding="utf-8") as f:
            try:
                import fcntl
            except ImportError:  # pragma: no cover - Windows: no flock, no lock
                yield f
                return
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = _describe(f.read())
                raise UserError(
                    f"{self.path} is in use by another run ({holder}); wait for it to finish "
                    f"or choose another --out"
                ) from None
            try:
                yield f
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def _guard(self, kind: Kind, resume: bool, force: bool) -> None:
        there = self.kind() if self._entries() else None
        if there is not None and there != kind:
            raise UserError(
                f"{self.path} holds a {there} run; {kind} writes into a directory of its own: "
                f"choose another --out"
            )
        from .prepare import META  # (prepare imports this module)

        if (self.path / META).is_file():
            raise UserError(
                f"{self.path} holds a prepared corpus; {kind} writes into a directory of its "
                f"own: choose another --out"
            )
        if kind == "compare" and there is None and self._model_runs():
            raise UserError(
                f"{self.path} holds a train run ({self._model_runs()[0]}); compare writes "
                f"into a directory of its own: choose another --out"
            )
        if resume or not self._entries():
            return
        if self._holds_run() and not force:
            hint = "--resume to continue it or --force" if kind == "train" else "--force"
            raise UserError(f"{self.path} already holds a run; pass {hint}")
        if not self._holds_run():
            logger.warning(
                "note: %s holds the files of a run that wrote no checkpoint; starting over",
                self.path,
            )
        aside = self.path / REPLACED
        aside.mkdir()
        for entry in self._entries():
            entry.rename(aside / entry.name)

    def _settle_replacement(self) -> None:
        """After a ``--force`` run: drop the old run if the new one has a checkpoint, else
        put the old one back."""
        aside = self.path / REPLACED
        if not aside.is_dir():
            return
        if self._holds_run():
            shutil.rmtree(aside, ignore_errors=True)
            return
        for entry in self._entries():
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        for entry in aside.iterdir():
            entry.rename(self.path / entry.name)
        aside.rmdir()
        logger.warning("the new run wrote no checkpoint: the previous run in %s is kept", self.path)


def _holder(kind: str) -> dict[str, Any]:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return {"kind": kind, "pid": os.getpid(), "host": socket.gethostname(), "started": now}


def _describe(text: str) -> str:
    with contextlib.suppress(ValueError, KeyError, TypeError):
        h = json.loads(text)
        return f"{h['kind']}, pid {h['pid']} on {h['host']}, started {h['started']}"
    return "holder unknown"
