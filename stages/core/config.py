"""params.yaml: loading it, finding a section, checking a section's keys.

params.yaml is read as DVC reads and writes it (YAML 1.2, ruamel): ``dvc exp run -S`` rewrites the
file, and what it wrote reads back the same (``no`` stays the string "no", ``1e-05`` is a number;
YAML 1.1 readers such as PyYAML take them for false and a string). What the values mean and their
types: stages/core/settings.py.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from .errors import fail

REPO_ROOT = Path(__file__).resolve().parents[2]


def params_path(path: str | Path | None = None) -> Path:
    """params.yaml: the one given, else the working directory's, else the repository's."""
    if path is not None:
        return Path(path)
    return Path("params.yaml") if Path("params.yaml").is_file() else REPO_ROOT / "params.yaml"


def load_params(path: str | Path | None = None, what: str = "params file", expected: str = "a mapping") -> dict:
    """A YAML mapping of params sections (YAML 1.2, as DVC reads params.yaml): params.yaml by
    default; ``what`` names the file in errors, ``expected`` says what it must hold."""
    path = params_path(path) if what == "params file" else Path(path)
    if not path.is_file():
        fail(f"{what} '{path}' does not exist")
    try:
        params = YAML(typ="safe", pure=True).load(path.read_text(encoding="utf-8"))
    except YAMLError as err:
        fail(f"{what} '{path}' is not valid YAML: {' '.join(str(err).split())}")
    if not isinstance(params, dict) or not params:
        fail(f"{what} '{path}' must hold {expected} at the top level, got {params!r}"[:300])
    return params


def closest(name: object, known: Iterable[str]) -> str:
    """": did you mean 'X'?" for the known name closest to a misspelt one, else ""."""
    close = difflib.get_close_matches(str(name), list(known), n=1)
    return f": did you mean '{close[0]}'?" if close else ""


def section(params: dict, *keys: str) -> Any:
    """params[k1][k2]... with an error naming the missing key and the keys that exist."""
    node, trail = params, []
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            known = ", ".join(node) if isinstance(node, dict) else "none"
            where = ".".join(trail) or "params.yaml"
            hint = closest(key, node) if isinstance(node, dict) else ""
            fail(f"unknown {'.'.join(trail + [key])}: '{key}' is not in {where}{hint} (expected one of {known})")
        node = node[key]
        trail.append(key)
    return node


def check_keys(mapping: dict, allowed: Iterable[str], where: str) -> None:
    """Every key of ``mapping`` (params.yaml ``where``) is one of ``allowed``; unknown ones (typos)
    are one error naming each with the closest known key."""
    allowed = list(allowed)
    unknown = [f"{where}.{key} is not a known key{closest(key, allowed)}" for key in mapping if key not in allowed]
    if unknown:
        fail(f"{'; '.join(unknown)} ({where} takes {', '.join(sorted(allowed))})")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag or value is one line naming it, not a usage block."""

    def error(self, message: str):  # type: ignore[override]
        print(f"error: {self.prog}: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def sequence_tasks(params: dict, name: str) -> list[str]:
    """The tasks of sequence ``name``: params sequences.<name> is a list of tasks, or a mapping
    with ``tasks:``, optionally ``held_out:`` (``sequence_held_out``) and training settings shared
    by every method on the sequence."""
    value = section(params, "sequences", name)
    tasks = value.get("tasks") if isinstance(value, dict) else value
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
        fail(f"sequences.{name} must be a non-empty list of task names or a mapping with 'tasks:', got {value!r}")
    return list(tasks)


SEQUENCE_KEYS = ("tasks", "held_out")  # what a sequence mapping holds besides training settings


def sequence_settings(params: dict, name: str) -> dict:
    """The training settings sequences.<name> sets for every method on it ({} for a plain list)."""
    value = section(params, "sequences", name)
    return {k: v for k, v in value.items() if k not in SEQUENCE_KEYS} if isinstance(value, dict) else {}


def sequence_held_out(params: dict, name: str) -> list[str]:
    """Tasks never trained on the sequence that every run of it (and the base model's line) scores
    after its last task: what fine-tuning should leave intact (sequences.<name>.held_out; [] if none)."""
    value = section(params, "sequences", name)
    held_out = value.get("held_out", []) if isinstance(value, dict) else []
    if not isinstance(held_out, list) or not all(isinstance(t, str) for t in held_out) or len(set(held_out)) != len(held_out):
        fail(f"sequences.{name}.held_out must be a list of distinct task names, got {held_out!r}")
    trained = sorted(set(held_out) & set(sequence_tasks(params, name)))
    if trained:
        fail(f"sequences.{name}.held_out names {', '.join(trained)}, which the sequence trains on: a held-out task is never trained")
    return list(held_out)
