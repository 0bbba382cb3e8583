"""Apply a paper's params overlay: overlays/<paper>.yaml deep-merged over params.yaml, checked, written.

    python stages/overlay.py overlays/corda.yaml            # params.yaml <- params.yaml + overlay, then plan.yaml
    python stages/overlay.py overlays/corda.yaml --check    # only check the merged result; nothing is written
    python stages/overlay.py overlays/corda.yaml --params params.yaml --out params.corda.yaml

An overlay is a partial params tree (base_model, tasks, sequences, methods, tables, ...). Mappings
merge key by key; a list or a scalar replaces the value it lands on; nothing is deleted. YAML
merge keys behave as YAML says: a setting given to an anchored section (methods.loretta) also
reaches the sections that merge it (methods.loretta_adp), unless they set it themselves.

Before anything is written the merged tree passes the project's own checks: the overlay's top-level
keys are sections of params.yaml; every task has a known source, only that source's keys, positive
sizes and a kind and metric the core scores (stages/core/tasks.py), an hf task a prompt over its
columns and exactly one of label_column + choices or answer_column; every sequence names defined
tasks; the plan builds (stages/plan.py: tables, rows, sequences, code); and every row of the
overlay's tables reads its settings on every one of its sequences as its script would
(stages/core/sft.py build_config). A problem is one error line naming the bad value and what was
expected, exit 2, and params.yaml and plan.yaml are left as they were.

The merged file is written the way `dvc exp run -S` writes params.yaml (ruamel's round trip, so
the comments stay), atomically, and plan.yaml is regenerated beside it (what `make plan` does).
Only the data path is checked here: nothing is downloaded. Whether a hub id exists is found out
by fetch_data, on a machine with a hub (HF_HUB_OFFLINE=0 HF_DATASETS_OFFLINE=0).
"""

from __future__ import annotations

import argparse
import importlib
import io
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

from stages.core.config import OneLineParser, closest, load_params, params_path, section
from stages.core.errors import AdaptlabError, cli_entry, fail
from stages.core.io import atomic_write_text
from stages.core.tasks import check_task_spec, task_specs

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import YAMLError

from stages.plan import build_plan, dump, plan_path, script_of


def _round_trip() -> YAML:
    """ruamel as DVC sets it up to rewrite params.yaml (dvc.utils.serialize._yaml)."""
    yaml = YAML()
    yaml.default_flow_style = False
    return yaml


def load_overlay(path: str | Path) -> dict:
    """The overlay's tree: a mapping of params sections."""
    return load_params(path, what="overlay (overlays/<paper>.yaml)",
                       expected="a mapping of params.yaml sections (base_model, tasks, sequences, ...)")


def _node(value):
    """A plain overlay value as a round-trip node: lists of scalars in flow style ([a, b]), as
    params.yaml writes them."""
    if isinstance(value, Mapping):
        node = CommentedMap()
        for key, item in value.items():
            node[key] = _node(item)
        return node
    if isinstance(value, list):
        node = CommentedSeq(_node(item) for item in value)
        if not any(isinstance(item, (Mapping, list)) for item in value):
            node.fa.set_flow_style()
        return node
    return value


def deep_merge(base: Mapping, overlay: Mapping) -> None:
    """Merge ``overlay`` into ``base`` in place: mappings key by key, anything else replaces."""
    for key, value in overlay.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), Mapping):
            deep_merge(base[key], value)
        else:
            base[key] = _node(value)


def merged_text(base_file: str | Path, overlay: dict) -> str:
    """params.yaml's text with ``overlay`` merged in, comments kept."""
    yaml = _round_trip()
    try:
        base = yaml.load(Path(base_file).read_text(encoding="utf-8"))
    except YAMLError as err:
        fail(f"params file '{base_file}' is not valid YAML: {' '.join(str(err).split())}")
    if not isinstance(base, Mapping):
        fail(f"params file '{base_file}' must hold a mapping at the top level")
    unknown = [key for key in overlay if key not in base]
    if unknown:
        fail(f"unknown section '{unknown[0]}'{closest(unknown[0], base)}: an overlay sets sections of {base_file} "
             f"({', '.join(base)})")
    deep_merge(base, overlay)
    out = io.StringIO()
    yaml.dump(base, out)
    return out.getvalue()


def check_rows(params: dict, params_file: Path, tables: list[str]) -> int:
    """Every row of ``tables`` reads its settings on every one of its sequences, as its script
    would (build_config: types, allowed values, unknown keys, the sequence's settings); returns
    how many (row, sequence) pairs were checked."""
    from stages.core.sft import build_config

    checked = 0
    for table in tables:
        spec = section(params, "tables", table)
        for row in spec["rows"]:
            script = script_of(row, params["methods"][row] or {})
            method = importlib.import_module(f"methods.{script.removesuffix('.py')}").METHOD
            for sequence in spec["sequences"]:
                build_config(method, ["--params", str(params_file), "--sequence", sequence, "--method", row])
                checked += 1
    return checked


def validate(text: str, overlay: dict) -> tuple[dict, dict, int]:
    """The merged params (as every stage reads them), their plan and the number of (row,
    sequence) pairs whose settings were read; any problem is an AdaptlabError."""
    with tempfile.TemporaryDirectory(prefix="adaptlab-overlay-") as tmp:
        params_file = Path(tmp) / "params.yaml"
        params_file.write_text(text, encoding="utf-8")
        params = load_params(params_file)
        for key in ("base_model", "tasks", "sequences", "train", "methods", "tables"):
            section(params, key)
        specs = task_specs(params)
        for name, spec in specs.items():
            check_task_spec(name, spec)
        plan = build_plan(params)
        tables = list(overlay.get("tables") or {})
        checked = check_rows(params, params_file, tables)
    return params, plan, checked


@cli_entry
def main(argv: list[str] | None = None) -> None:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overlay", type=Path, help="the overlay, overlays/<paper>.yaml")
    parser.add_argument("--params", type=Path, default=None, help="the params file merged into (default: params.yaml)")
    parser.add_argument("--out", type=Path, default=None, help="where the result goes (default: the --params file); "
                                                                 "plan.yaml is written beside it")
    parser.add_argument("--check", action="store_true", help="check the merged result only; write nothing")
    args = parser.parse_args(argv)

    base_file = params_path(args.params)
    if not base_file.is_file():
        fail(f"params file '{base_file}' does not exist")
    out = args.out or base_file
    overlay = load_overlay(args.overlay)
    try:
        text = merged_text(base_file, overlay)
        params, plan, checked = validate(text, overlay)
    except AdaptlabError as err:
        raise AdaptlabError(f"{args.overlay}: {err}") from None
    summary = (f"{args.overlay}: {len(overlay.get('tasks') or {})} tasks, {len(overlay.get('sequences') or {})} sequences, tables "
               f"{', '.join(overlay.get('tables') or {}) or 'none'} ({checked} row x sequence settings read); "
               f"base model {params['base_model']['source']}; plan: {len(plan['runs'])} runs")
    if args.check:
        print(f"{summary}; valid, nothing written (--check)", file=sys.stderr)
        return
    plan_text = dump(plan)
    atomic_write_text(out, text)
    atomic_write_text(plan_path(str(out)), plan_text)
    print(f"{summary}; wrote {out} and {plan_path(str(out))}", file=sys.stderr)


if __name__ == "__main__":
    main()
