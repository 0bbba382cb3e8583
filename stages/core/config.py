"""params.yaml as plain values, and a command line generated from it.

A method script's flags are the union of ``train:`` and ``methods.<name>:`` (the method's values
win), plus the run-level values below; ``--help`` lists them with their params.yaml defaults.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml

from .errors import fail

REPO_ROOT = Path(__file__).resolve().parents[2]


def params_path(path: str | Path | None = None) -> Path:
    """params.yaml: the one given, else the working directory's, else the repository's."""
    if path is not None:
        return Path(path)
    return Path("params.yaml") if Path("params.yaml").is_file() else REPO_ROOT / "params.yaml"


def load_params(path: str | Path | None = None) -> dict:
    path = params_path(path)
    if not path.is_file():
        fail(f"params file '{path}' does not exist")
    try:
        params = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        fail(f"params file '{path}' is not valid YAML: {str(err).splitlines()[0]}")
    if not isinstance(params, dict):
        fail(f"params file '{path}' must hold a mapping at the top level")
    return params


def section(params: dict, *keys: str) -> Any:
    """params[k1][k2]... with an error naming the missing key and the keys that exist."""
    node, trail = params, []
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            known = ", ".join(node) if isinstance(node, dict) else "none"
            where = ".".join(trail) or "params.yaml"
            fail(f"unknown {'.'.join(trail + [key])}: '{key}' is not in {where} (expected one of {known})")
        node = node[key]
        trail.append(key)
    return node


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag or value is one line naming it, not a usage block."""

    def error(self, message: str):  # type: ignore[override]
        print(f"error: {self.prog}: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def _typed(default: Any):
    if isinstance(default, bool):
        return None  # booleans get --flag / --no-flag
    if isinstance(default, int):
        return int
    if isinstance(default, float):
        return float
    return str


def add_flags(parser: argparse.ArgumentParser, defaults: dict, group: str | None = None) -> None:
    """One flag per key, typed from its default (lists take several values)."""
    target = parser.add_argument_group(group) if group else parser
    for key, default in defaults.items():
        flag = f"--{key}"
        if isinstance(default, bool):
            target.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=f"(default: {default})")
        elif isinstance(default, list):
            element = _typed(default[0]) if default else str
            target.add_argument(flag, nargs="+", type=element, default=default, metavar=key.upper(), help=f"(default: {' '.join(map(str, default))})")
        elif isinstance(default, dict):
            continue  # nested settings are edited in params.yaml, not on the command line
        else:
            target.add_argument(flag, type=_typed(default), default=default, metavar=key.upper(), help=f"(default: {default})")


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> SimpleNamespace:
    return SimpleNamespace(**vars(parser.parse_args(argv)))


def _check_numbers(cfg: SimpleNamespace, names: Sequence[str], allow_zero: bool) -> None:
    for name in names:
        value = getattr(cfg, name)
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not number or value < 0 or (value == 0 and not allow_zero):
            fail(f"--{name} must be {'a number >= 0' if allow_zero else 'a positive number'}, got {value!r}")


def check_positive(cfg: SimpleNamespace, *names: str) -> None:
    _check_numbers(cfg, names, allow_zero=False)


def check_non_negative(cfg: SimpleNamespace, *names: str) -> None:
    _check_numbers(cfg, names, allow_zero=True)


def check_finite(cfg: SimpleNamespace) -> None:
    """No setting may be nan or ±inf (argparse's float() accepts both)."""
    for name, value in vars(cfg).items():
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            fail(f"--{name} must be a finite number, got {value!r}")


def check_choice(cfg: SimpleNamespace, name: str, choices: Sequence[str]) -> None:
    value = getattr(cfg, name)
    if value not in choices:
        fail(f"--{name} '{value}' is not valid: expected one of {', '.join(choices)}")


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
