"""What every methods section of ./params.yaml runs with: each section's config as its script
builds it (build_config, all in one process), written as JSON to the file given.

    python settings_of.py settings.json [--sequence default]

test_settings.py runs it as the stage of a temporary DVC repository: after `dvc exp run -S` has
rewritten params.yaml, every method script must still read it, to the values and types swept."""

from __future__ import annotations

import importlib
import sys

from stages.core.config import load_params
from stages.core.errors import cli_entry
from stages.core.io import atomic_write_json
from stages.core.sft import build_config, script_of


@cli_entry
def main(out: str, *argv: str) -> None:
    configs = {}
    for row, spec in load_params("params.yaml")["methods"].items():
        method = importlib.import_module(f"methods.{script_of(row, spec).removesuffix('.py')}").METHOD
        configs[row] = vars(build_config(method, ["--method", row, *argv]))
    atomic_write_json(out, configs)


if __name__ == "__main__":
    main(*sys.argv[1:])
