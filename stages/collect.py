"""Stage: what a table reads of one run, or of the base model on one of its sequences, in one file.

    python stages/collect.py --inputs results/train/lora-default-s0 results/eval/lora-default-s0.json \\
        --out results/tables/default/runs/lora-default-s0.json
    python stages/collect.py --inputs results/base/default.json --out results/tables/default/runs/base-default.json

A table's stage depends on exactly its own runs through these files (dvc.yaml cannot list a
variable number of inputs in one stage, but a loop of stages can). From a run's results folder it
takes metrics.json, details.json, the loss curve and every scored row's outcome (items.json); with
a second input, the merged model's lm-eval scores and outcomes (results/eval/<run>.json); a
base-model file is taken as it is. Outcomes come out as {task: {row id: outcome}} everywhere.
"""

import argparse
from pathlib import Path

from stages.core.config import OneLineParser
from stages.core.errors import cli_entry, fail
from stages.core.evaluation import ITEMS_FILE, items_of
from stages.core.io import atomic_write_json, read_json


def loss_curve(results: Path) -> list[list[float]]:
    """(step, loss) pairs of the run's dvclive loss plot."""
    path = results / "plots" / "metrics" / "train" / "loss.tsv"
    if not path.is_file():
        return []
    return [[float(v) for v in line.split("\t")[:2]] for line in path.read_text().splitlines()[1:] if line.strip()]


def collect(inputs: list[Path]) -> dict:
    first = inputs[0]
    for path in inputs:
        if not path.exists():
            fail(f"{path} does not exist: run the stage that writes it (dvc repro)")
    if first.is_file():  # the base model's zero-shot scores (stages/evaluate.py)
        return evaluated(first, kind="base")
    for name in ("metrics.json", "details.json"):  # the summary metrics; the matrix, parameters, memory, step time
        if not (first / name).is_file():
            fail(f"{first} has no {name}: expected a run's results folder (results/train/<run>); re-run its train stage")
    record = {"kind": "run", "run": first.name, **read_json(first / "metrics.json"), **read_json(first / "details.json"),
              "loss_curve": loss_curve(first)}
    items = first / ITEMS_FILE
    record["items"] = read_json(items) if items.is_file() else None  # {after_<task>: {task: {row id: outcome}}}
    merged = [p for p in inputs[1:] if p != first]
    record["merged"] = evaluated(merged[0]) if merged else None
    return record


def evaluated(path: Path, **extra) -> dict:
    """stages/evaluate.py's scores, with their outcome rows as {task: {row id: outcome}}."""
    record = read_json(path)
    return {**extra, **record, "items": items_of(record.get("items") or [])}


@cli_entry
def main(argv=None) -> None:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", nargs="+", type=Path, required=True,
                        help="a run's results folder [and its merged scores], or a base-model scores file")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    atomic_write_json(args.out, collect(args.inputs))


if __name__ == "__main__":
    main()
