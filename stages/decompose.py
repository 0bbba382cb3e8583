"""Stage: a row's decomposition, the step some methods take before training.

    python stages/decompose.py --method corda_kpa --out models/init/corda_kpa
    python stages/decompose.py --method cimeo --sequence cognition --out models/init/cimeo-cognition

Runs the script named by the row's ``decompose:`` params (CorDA: ``methods/build_corda.py``;
CIMEO: ``methods/build_cimeo_masks.py``) with its ``args`` and ``--save_model --save_path
<out>/model``; with ``per_sequence: true`` it also passes ``--sequence`` (CIMEO's masks are built
for the sequence's tasks). Writes ``<out>/init.json`` = {"method", "base_model", "decomposition"}:
the model the row's runs start from, which is ``<out>/model`` when the script saved a model there
(CorDA's residual weights) and the base model otherwise (CIMEO, whose masks lie in
``<out>/model/cimeo_masks``). The train stage passes ``<out>`` as ``--base_model``. Rows without
``decompose:`` start from the base model and have no such stage (stages/plan.py).
"""

import argparse
import importlib
import subprocess
import sys
from pathlib import Path

from stages.core.config import OneLineParser, check_keys, load_params, params_path, section
from stages.core.errors import cli_entry, fail
from stages.core.io import atomic_dir, atomic_write_json

METHODS_DIR = Path(__file__).resolve().parents[1] / "methods"


def script_args(args: dict) -> list[str]:
    """{"r": 8, "first_eigen": True, "use_cache": False, "t": [a, b]} -> ["--r", "8", "--first_eigen", "--t", "a", "b"]."""
    flags: list[str] = []
    for key, value in args.items():
        if isinstance(value, bool):
            flags += [f"--{key}"] if value else []
        elif isinstance(value, list):
            flags += [f"--{key}", *map(str, value)]
        else:
            flags += [f"--{key}", str(value)]
    return flags


def check_row(params: dict, params_file: str | None, row: str, sequence: str | None) -> None:
    """The row's settings as its train stage reads them (keys, types, ranges): a bad value stops
    the pipeline here, before the decomposition's minutes of work."""
    from stages.core.sft import build_config, script_of

    script = script_of(row, section(params, "methods", row))
    method = importlib.import_module(f"methods.{script.removesuffix('.py')}").METHOD
    sequence = sequence or next(iter(section(params, "sequences")))
    build_config(method, ["--params", str(params_path(params_file)), "--method", row, "--sequence", sequence])


@cli_entry
def main(argv=None) -> None:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", required=True, help="a section of params.yaml methods that has decompose:")
    parser.add_argument("--sequence", default=None, help="the sequence whose tasks it calibrates on (per_sequence decompositions)")
    parser.add_argument("--out", required=True, help="output folder (models/init/<method>[-<sequence>])")
    parser.add_argument("--params", default=None)
    args = parser.parse_args(argv)
    params = load_params(args.params)
    spec = (section(params, "methods", args.method) or {}).get("decompose")
    base = section(params, "base_model", "path")
    if not isinstance(spec, dict):
        fail(f"methods.{args.method} has no decompose: section: its runs start from the base model ({base})")
    check_keys(spec, ("script", "per_sequence", "args"), f"methods.{args.method}.decompose")
    if not isinstance(spec.get("args", {}), dict):
        fail(f"methods.{args.method}.decompose.args must be a mapping of the script's flags, got {spec['args']!r}")
    script = METHODS_DIR / str(spec.get("script", ""))
    if not script.is_file():
        fail(f"methods.{args.method}.decompose.script '{spec.get('script')}' is not a script in methods/")
    extra = []
    if spec.get("per_sequence"):
        if not args.sequence:
            fail(f"methods.{args.method}.decompose is per_sequence: give --sequence")
        section(params, "sequences", args.sequence)
        extra = ["--sequence", args.sequence]
    check_row(params, args.params, args.method, args.sequence)
    with atomic_dir(args.out) as tmp:
        command = [sys.executable, str(script), "--model_id", base, *script_args(spec.get("args", {})), *extra,
                   "--save_model", "--save_path", str(tmp / "model")]
        code = subprocess.run(command).returncode
        if code != 0:
            raise SystemExit(code)  # the script has printed its one-line error; atomic_dir cleans up
        saved_model = (tmp / "model" / "config.json").is_file()
        record = {"method": args.method, "sequence": args.sequence,
                  "base_model": str(Path(args.out) / "model") if saved_model else base,
                  "decomposition": script.stem, "args": spec.get("args", {})}
        atomic_write_json(tmp / "init.json", record)
    print(f"{args.method}: starts from {record['base_model']} ({record['decomposition']})")


if __name__ == "__main__":
    main()
