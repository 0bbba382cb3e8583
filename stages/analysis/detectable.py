"""The smallest AP difference a table can detect, at its test sizes and at smaller ones.

    python stages/analysis/detectable.py --table quick --first sst2=100 fever=100 arithmetic=50

Reads a rendered table's collected runs (results/tables/<table>/runs) and prints, per sequence,
the median half-width of the rows' paired ΔAP intervals against the reference row (what
stages/tables.py reports under each block) on every test row, and on only the first N test rows of
the tasks named in ``--first``. A task's test split is the head of one seeded shuffle
(stages/core/tasks.py), so its first N rows are exactly the split a ``test_size: N`` would draw:
this is the table the smaller test sets would have given, from the same runs, without re-scoring.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from stages.core.config import OneLineParser, load_params, section
from stages.core.errors import cli_entry, fail

from stages.tables import Bootstrap, detectable, item_ids, load_runs, sequence_lines


def first_rows(tasks_dir: Path, task: str, n: int) -> set[str]:
    path = tasks_dir / task / "test.jsonl"
    if not path.is_file():
        fail(f"{path} does not exist: run `dvc repro fetch_data` first")
    rows = [json.loads(line)["id"] for line in path.read_text().splitlines() if line.strip()]
    if n > len(rows):
        fail(f"--first {task}={n}: the task has only {len(rows)} test rows")
    return {str(r) for r in rows[:n]}


def half_widths(name: str, table: dict, folder: Path, keep: dict[str, set[str]]) -> dict[str, float]:
    bases, runs = load_runs(folder, table)
    ids = {t: [i for i in rows if t not in keep or i in keep[t]] for t, rows in item_ids(name, table, bases, runs).items()}
    boot = Bootstrap(ids, len(table["seeds"]))
    return {sequence: detectable(sequence_lines(name, table, boot, bases, runs, sequence)[1], table["reference"])
            for sequence in table["sequences"]}


@cli_entry
def main(argv=None) -> None:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", required=True, help="a key of params.yaml tables (rendered: dvc repro tables@<table>)")
    parser.add_argument("--first", nargs="*", default=[], metavar="TASK=N", help="score only the first N test rows of TASK")
    parser.add_argument("--params", default=None)
    parser.add_argument("--results", default="results/tables", type=Path)
    parser.add_argument("--tasks_dir", default="data/tasks", type=Path)
    args = parser.parse_args(argv)
    table = section(load_params(args.params), "tables", args.table)
    keep = {}
    for item in args.first:
        task, _, n = item.partition("=")
        if not n.isdigit() or int(n) < 1:
            fail(f"--first '{item}' is not valid: expected TASK=N with N a positive whole number")
        keep[task] = first_rows(args.tasks_dir, task, int(n))
    folder = args.results / args.table / "runs"
    full, smaller = half_widths(args.table, table, folder, {}), half_widths(args.table, table, folder, keep)
    for sequence in table["sequences"]:
        print(f"{args.table} / {sequence}: detectable ΔAP ±{full[sequence]:.3f} on every test row; "
              f"±{smaller[sequence]:.3f} with {' '.join(args.first) or 'the same rows'}")


if __name__ == "__main__":
    main()
