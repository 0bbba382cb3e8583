"""Atomic file and folder writes, so an interrupted stage never leaves output DVC could cache."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _first_missing(folder: Path) -> Path | None:
    """The outermost ancestor of ``folder`` (itself included) that does not exist yet."""
    missing = None
    for candidate in [folder, *folder.parents]:
        if candidate.exists():
            break
        missing = candidate
    return missing


def _prune(folder: Path, top: Path | None) -> None:
    """Remove the empty folders from ``folder`` up to ``top``: the ones a failed write created."""
    if top is None:
        return
    for candidate in [folder, *folder.parents]:
        with contextlib.suppress(OSError):
            candidate.rmdir()  # only if empty
        if candidate == top:
            break


def _tmp_sibling(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):  # left by a killed (SIGKILL) writer
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; outputs get the usual permissions
    return tmp


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` in one rename,
    on any error (or Ctrl-C) it is deleted and ``path`` is left as it was."""
    path = Path(path)
    created = _first_missing(path.parent)
    tmp = _tmp_sibling(path)
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _prune(path.parent, created)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    created = _first_missing(path.parent)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        _prune(path.parent, created)
        raise


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def read_json(path: str | os.PathLike) -> Any:
    """A JSON file; a corrupt one (half-written by a killed job, edited by hand) is one error line."""
    from .errors import fail

    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        fail(f"{path}: not valid JSON ({err}): delete it and re-run the stage that writes it")
