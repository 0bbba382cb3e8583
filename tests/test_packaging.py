"""pyproject.toml declares every package that stages/ and methods/ import (read from the installed
project's metadata, which `make venv` rebuilds whenever pyproject.toml changes)."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys

from conftest import ROOT
from packaging.requirements import Requirement


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_imported_package_is_declared():
    declared = {canonical(Requirement(r).name) for r in importlib.metadata.requires("adaptlab")}  # extras included
    imported = set()
    for path in [*(ROOT / "stages").rglob("*.py"), *(ROOT / "methods").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"stages", "methods"}
    providers = importlib.metadata.packages_distributions()
    undeclared = {module: providers.get(module) for module in third_party
                  if not declared & {canonical(d) for d in providers.get(module, [])}}
    assert third_party and not undeclared, f"imported but not in pyproject.toml: {undeclared}"
