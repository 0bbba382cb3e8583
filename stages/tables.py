"""Stage: one table of params.yaml ``tables:`` from its runs -> Markdown, CSV and PNG plots.

    python stages/tables.py --table default

Reads ``results/tables/<table>/runs/*.json`` (stages/collect.py: one per run and one per
sequence's base-model line) and writes ``results/tables/<table>/table.md``, ``table.csv`` (tidy:
one value per line) and ``plots/*.png``. Every table is rendered the same way from its
description (sequences, rows, reference, seeds, merged): per sequence, the base model's zero-shot
line, then one line per row with the numbers it trains over the whole run (and their share of the
base model), its memory and step time, its final score on every task, AP, BWT and FWT
(continual-learning metrics from the accuracy matrix) and its score on the sequence's held-out
tasks (sequences.<name>.held_out, never trained: what fine-tuning preserved), averaged over the seeds; with several
sequences, a summary over them. Every row of a sequence and its base line must have been scored
in one prompt format (``check_prompt_formats``).
"""

from __future__ import annotations

import argparse
import csv
import io
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # render to files; no display, no network
import matplotlib.pyplot as plt  # noqa: E402

from stages.core.config import OneLineParser, load_params, section  # noqa: E402
from stages.core.continual import forward_transfer  # noqa: E402
from stages.core.errors import cli_entry, fail  # noqa: E402
from stages.core.io import atomic_dir, atomic_write_text, read_json  # noqa: E402
from stages.core.markdown import markdown_table  # noqa: E402
from stages.core.plots import plot_losses, plot_matrices  # noqa: E402
from stages.plan import check_plan, check_table, plan_path  # noqa: E402


def mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


# ----------------------------------------------------------------------------- reading the runs

def load_runs(folder: Path, table: dict) -> tuple[dict, dict]:
    """({sequence: base record}, {(row, sequence): [run record per seed]}) for the table's runs."""
    bases, runs = {}, {}
    for sequence in table["sequences"]:
        bases[sequence] = read_collected(folder / f"base-{sequence}.json") if table.get("zero_shot", True) else None
        for row in table["rows"]:
            runs[row, sequence] = [read_collected(folder / f"{row}-{sequence}-s{seed}.json") for seed in table["seeds"]]
    return bases, runs


def read_collected(path: Path) -> dict:
    if not path.is_file():
        fail(f"{path} does not exist: run `dvc repro` (its collect stage) first")
    return read_json(path)


def prompt_format(record: dict, what: str) -> bool:
    """Whether ``record``'s scores were computed through the chat template (True) or on plain prompts."""
    if not isinstance(record.get("chat_template"), bool):
        fail(f"{what} does not record its prompt format (chat_template): re-run the stage that wrote it (dvc repro)")
    return record["chat_template"]


def format_name(chat_template: bool) -> str:
    return "the chat template" if chat_template else "plain prompts"


def check_prompt_formats(name: str, table: dict, bases: dict, runs: dict) -> None:
    """One error line unless every score of a sequence's block is computed in one prompt format:
    the base model's zero-shot line, every row's accuracy matrix and, in a merged table, its merged
    model's scores. Comparing a row scored through the chat template with rows (or a base line)
    scored on plain prompts would measure the format, not the method."""
    for sequence in table["sequences"]:
        formats = {}
        if bases[sequence] is not None:
            formats[f"the base model's line ({sequence})"] = prompt_format(bases[sequence], f"base-{sequence}")
        for row in table["rows"]:
            for seed, run in zip(table["seeds"], runs[row, sequence]):
                key = f"{row}-{sequence}-s{seed}"
                formats[f"row {key}"] = prompt_format(run, key)
                if run.get("merged"):
                    formats[f"row {key} (merged model)"] = prompt_format(run["merged"], f"{key}'s merged scores")
        (first, expected), *others = formats.items()
        for what, chat_template in others:
            if chat_template != expected:
                fail(f"table '{name}', sequence '{sequence}': {what} is scored with {format_name(chat_template)} but "
                     f"{first} with {format_name(expected)}: every row of a table and its base line must be scored "
                     f"in the table's prompt format (the sequence's chat_template)")


def matrix_of(run: dict) -> list[list[float]]:
    return [[run["matrix"][f"after_{t}"][u] for u in run["tasks"]] for t in run["tasks"]]


def final_scores(run: dict) -> dict[str, float]:
    """The scores after the whole sequence: lm-eval's on the merged model where the table merges,
    else the accuracy matrix's last row (scored in training)."""
    return run["merged"]["scores"] if run.get("merged") else run["final"]


def held_out_scores(record: dict) -> dict[str, float]:
    """Scores on the sequence's held-out tasks (never trained on it) after the whole sequence:
    the merged model's where the table merges, else the run's own; the base model's zero-shot."""
    source = record["merged"] if record.get("merged") else record
    return source.get("held_out") or {}


def held_out_tasks(name: str, sequence: str, base: dict | None, runs: list[tuple[str, dict]]) -> list[str]:
    """The held-out tasks of a sequence's block; one error line unless every record (the base
    model's line included) scored the same ones."""
    records = ([("the base model's line", base)] if base is not None else []) + runs
    expected = list(held_out_scores(records[0][1]))
    for what, record in records:
        if sorted(held_out_scores(record)) != sorted(expected):
            fail(f"table '{name}', sequence '{sequence}': {what} scored the held-out tasks "
                 f"{sorted(held_out_scores(record)) or 'none'} but {records[0][0]} {sorted(expected) or 'none'}: re-run it (dvc repro)")
    return expected


def row_summary(row: str, runs: list[dict], zero_shot: dict | None, held_out: list[str] = ()) -> dict:
    """One line of a table: the row's runs (one per seed) averaged."""
    tasks = runs[0]["tasks"]
    finals = [final_scores(r) for r in runs]
    return {
        "row": row, "seeds": len(runs), "tasks": tasks,
        "trainable": runs[0]["trainable_params"], "total": runs[0]["total_params"],
        "memory": mean([r["peak_memory_mb"] for r in runs]), "step_time": mean([r["step_time_s"] for r in runs]),
        "final": {t: mean([f[t] for f in finals]) for t in tasks},
        "held_out": {t: mean([held_out_scores(r)[t] for r in runs]) for t in held_out},
        "AP": mean([sum(f[t] for t in tasks) / len(tasks) for f in finals]),
        "BWT": mean([r["BWT"] for r in runs]),
        "FWT": mean([forward_transfer(matrix_of(r), [zero_shot[t] for t in tasks]) for r in runs]) if zero_shot else None,
        "matrix": [[mean(cells) for cells in zip(*rows)] for rows in zip(*(matrix_of(r) for r in runs))],
        "loss_curve": runs[0].get("loss_curve") or [],
    }


# ----------------------------------------------------------------------------- rendering

# What the size columns count: every number the run can change at some point of its sequence
# (an adapter; every task's LoRA; the union of CIMEO's masks; all weights), over the base model's
# parameter count (not the model with the adapters a method adds).
TRAINED_COLUMN = "trained numbers (whole run)"


def held_out_column(task: str) -> str:
    return f"{task} (held out)"


def sequence_block(zero: dict | None, lines: list[dict], reference: str,
                   zero_held_out: dict | None = None) -> tuple[list[str], str, list[list]]:
    """(header, Markdown text, table rows) of one sequence; ``zero``: the base model's scores
    (``zero_held_out``: on the held-out tasks). The held-out columns follow FWT: scores on tasks no
    row trains on, what fine-tuning left of the base model's ability there (CorDA's preserved knowledge)."""
    tasks, held_out = lines[0]["tasks"], list(lines[0]["held_out"])
    header = ["method", TRAINED_COLUMN, "% of base model", "peak memory (MB)", "step time (s)", *tasks, "AP", "BWT", "FWT",
              *map(held_out_column, held_out), f"ΔAP vs {reference}"]
    ref_ap = next(line["AP"] for line in lines if line["row"] == reference)
    table = [["base model (zero-shot)", None, None, None, None, *(zero[t] for t in tasks),
              sum(zero[t] for t in tasks) / len(tasks), None, None, *((zero_held_out or {})[t] for t in held_out),
              None]] if zero else []
    for line in lines:
        table.append([line["row"], f"{line['trainable']:,}", f"{100 * line['trainable'] / line['total']:.3f}",
                      f"{line['memory']:.0f}", line["step_time"], *(line["final"][t] for t in tasks),
                      line["AP"], line["BWT"], line["FWT"], *(line["held_out"][t] for t in held_out),
                      None if line["row"] == reference else line["AP"] - ref_ap])
    return header, markdown_table(header, table), table


def plot_scores(lines: list[dict], zero: dict | None, path: Path, title: str) -> None:
    """Final score per task and AP for every row, base model first: the table at a glance."""
    tasks = lines[0]["tasks"]
    base = ["base"] if zero else []
    labels = base + [line["row"] for line in lines]
    series = {t: ([zero[t]] if zero else []) + [line["final"][t] for line in lines] for t in tasks}
    series["AP"] = ([sum(zero[t] for t in tasks) / len(tasks)] if zero else []) + [line["AP"] for line in lines]
    fig, ax = plt.subplots(figsize=(max(7, 0.7 * len(labels) * (len(series) / 3)), 4))
    width = 0.8 / len(series)
    for k, (name, values) in enumerate(series.items()):
        ax.bar([i + (k - (len(series) - 1) / 2) * width for i in range(len(labels))], values, width, label=name,
               color="black" if name == "AP" else None, alpha=0.85 if name == "AP" else 1.0)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set(ylabel="score after the whole sequence", ylim=(0, 1), title=title)
    ax.legend(fontsize=8, ncol=len(series))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary_over_sequences(table: dict, by_sequence: dict[str, list[dict]]) -> tuple[list[str], list[list]]:
    """AP of every row on each sequence, and AP and BWT averaged over them (GORP's task orders)."""
    sequences = table["sequences"]
    header = ["method"] + [f"AP {s}" for s in sequences] + ["mean AP", "mean BWT"]
    rows = []
    for i, row in enumerate(table["rows"]):
        aps = [by_sequence[s][i]["AP"] for s in sequences]
        rows.append([row, *aps, mean(aps), mean([by_sequence[s][i]["BWT"] for s in sequences])])
    return header, rows


def render(name: str, table: dict, runs_dir: Path, plots: Path) -> tuple[str, list[list]]:
    """(Markdown page, tidy CSV rows) of one table, its plots written into ``plots``."""
    bases, runs = load_runs(runs_dir, table)
    check_prompt_formats(name, table, bases, runs)
    seeds = ", ".join(map(str, table["seeds"]))
    final_from = ("the merged model, scored by lm-eval" if table.get("merged") else
                  "the accuracy matrix's last row (scored in training; not merged)")
    doc = [f"# {table.get('title') or name}", "",
           f"Generated by `stages/tables.py --table {name}` from the runs of `dvc repro tables@{name}`; nothing here is typed in.",
           f"Rows: {', '.join(table['rows'])}; reference row: {table['reference']}; seeds: {seeds} (values are means over them).",
           f"Final scores are {final_from}; AP, BWT and FWT come from the accuracy matrix (scores after each task).", ""]
    csv_rows: list[list] = []
    by_sequence = {}
    for sequence in table["sequences"]:
        base = bases[sequence]
        zero = base["scores"] if base else None
        held_out = held_out_tasks(name, sequence, base, [(f"row {row}-{sequence}-s{seed}", run) for row in table["rows"]
                                                         for seed, run in zip(table["seeds"], runs[row, sequence])])
        lines = [row_summary(row, runs[row, sequence], zero, held_out) for row in table["rows"]]
        by_sequence[sequence] = lines
        header, text, rows = sequence_block(zero, lines, table["reference"], held_out_scores(base) if base else None)
        title = f"{' → '.join(lines[0]['tasks'])}"
        doc += [f"## Sequence `{sequence}`: {title}", "", text, "",
                f"![final scores](plots/scores_{sequence}.png)", f"![training loss](plots/loss_{sequence}.png)",
                f"![accuracy matrices](plots/matrix_{sequence}.png)", ""]
        csv_rows += [[sequence, line[0], column, line[k]] for line in rows
                     for k, column in enumerate(header) if k and line[k] is not None]
        plot_scores(lines, zero, plots / f"scores_{sequence}.png", f"Final scores: {title}")
        plot_losses(lines, plots / f"loss_{sequence}.png", f"Training loss over {title}")
        plot_matrices(lines, plots / f"matrix_{sequence}.png")
    if len(table["sequences"]) > 1:
        header, rows = summary_over_sequences(table, by_sequence)
        doc += [f"## Over the sequences: {', '.join(table['sequences'])}", "", markdown_table(header, rows), ""]
        csv_rows += [["all", line[0], column, line[k]] for line in rows for k, column in enumerate(header) if k]
    return "\n".join(doc), csv_rows


@cli_entry
def main(argv=None) -> None:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", required=True, help="a key of params.yaml tables")
    parser.add_argument("--params", default=None)
    parser.add_argument("--results", default="results/tables", type=Path)
    args = parser.parse_args(argv)
    params = load_params(args.params)
    table = section(params, "tables", args.table)
    check_table(args.table, table, params)
    check_plan(params, plan_path(args.params))  # a table, row or seed added without `make plan` is one line
    folder = args.results / args.table
    with atomic_dir(folder / "plots") as plots:
        page, csv_rows = render(args.table, table, folder / "runs", plots)
        buffer = io.StringIO()
        csv.writer(buffer).writerows([["sequence", "method", "column", "value"], *csv_rows])
        atomic_write_text(folder / "table.csv", buffer.getvalue())
        atomic_write_text(folder / "table.md", page + "\n")
    print(f"wrote {folder}/table.md, table.csv and plots/")


if __name__ == "__main__":
    main()
