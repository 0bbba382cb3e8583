"""Stage fetch_data: build every task in params.yaml `tasks:` into data/tasks/<name>/.

    python stages/fetch_data.py [--params params.yaml] [--out data/tasks] [--tasks sst2 fever]

The whole output folder is replaced in one step, so a failed or interrupted run leaves the
previous data as it was. With --tasks, the other tasks' folders are carried over unchanged.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from stages.core.config import OneLineParser, load_params
from stages.core.errors import cli_entry
from stages.core.io import atomic_dir, atomic_write_json, atomic_write_text, write_jsonl
from stages.core.markdown import markdown_table
from stages.core.tasks import TASKS_DIR, TaskData, available_tasks, build_tasks, load_task, task_specs


def summary_table(tasks: list[TaskData]) -> str:
    def cut(text: str, width: int = 70) -> str:
        return text if len(text) <= width else text[: width - 1] + "…"

    header = ["task", "kind", "source", "n_train", "n_test", "example prompt", "answer"]
    rows = [[task.name, task.kind, task.meta.get("source", "?"), len(task.train), len(task.test),
             cut(task.test[0]["prompt"]), cut(task.test[0]["answer"], 20)] for task in tasks]
    return "# Tasks\n\n" + markdown_table(header, rows) + "\n"


@cli_entry
def main(argv: list[str] | None = None) -> None:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=None, help="params file (default: params.yaml)")
    parser.add_argument("--out", type=Path, default=TASKS_DIR)
    parser.add_argument("--tasks", nargs="+", metavar="NAME", help="build only these tasks (default: all)")
    args = parser.parse_args(argv)

    params = load_params(args.params)
    specs = task_specs(params, args.tasks)
    keep = [name for name in available_tasks(args.out) if name in params["tasks"] and name not in specs]
    with atomic_dir(args.out) as tmp:
        for name in keep:
            shutil.copytree(args.out / name, tmp / name)
        start = time.perf_counter()
        for name, train, test, meta in build_tasks(specs, params.get("split_seed", 0)):
            write_jsonl(tmp / name / "train.jsonl", train)
            write_jsonl(tmp / name / "test.jsonl", test)
            atomic_write_json(tmp / name / "meta.json", meta)
            print(f"fetch_data: {name} ({meta['kind']}, {meta['source']}): {len(train)} train, {len(test)} test, "
                  f"{meta['n_dropped']} dropped ({time.perf_counter() - start:.1f} s elapsed)", file=sys.stderr)
        # Reading back validates every written row, and the summary covers carried-over tasks too.
        tasks = [load_task(name, tmp) for name in params["tasks"] if (tmp / name).is_dir()]
        atomic_write_text(tmp / "summary.md", summary_table(tasks))
    print(f"fetch_data: wrote {len(tasks)} tasks to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
