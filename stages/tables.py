"""Stage: one table of params.yaml ``tables:`` from its runs -> Markdown, CSV and PNG plots.

    python stages/tables.py --table default

Reads ``results/tables/<table>/runs/*.json`` (stages/collect.py: one per run and one per
sequence's base-model line) and writes ``results/tables/<table>/table.md``, ``table.csv`` (tidy:
one value per line, with its interval) and ``plots/*.png``. Every table is rendered the same way
from its description (sequences, rows, reference, seeds, merged): per sequence, the base model's
zero-shot line, then one line per row with the numbers it trains over the whole run (and their
share of the base model), its memory and step time, its final score on every task, AP, BWT and
FWT (continual-learning metrics from the accuracy matrix), its score on the sequence's held-out
tasks (sequences.<name>.held_out, never trained: what fine-tuning preserved) and its AP's
difference from the reference row; with several sequences, a summary over them.

Every number carries how sure it is (stages/stats.py): a 95% bootstrap interval over the
test items and the seeds, drawn once per table and shared by all its rows, so a difference
between two rows is paired the way it was measured. A cell reads ``0.743 ± 0.031`` (the
interval's half-width); ▲ / ▼ marks a row's value whose difference from the reference row's
excludes zero. Every row of a sequence and its base line must have been scored in one prompt
format (``check_prompt_formats``) on the same test rows (``item_ids``).
"""

from __future__ import annotations

import argparse
import csv
import io
import statistics
from pathlib import Path

from stages.core.config import OneLineParser, load_params, section
from stages.core.continual import forward_transfer
from stages.core.errors import cli_entry, fail
from stages.core.io import atomic_dir, atomic_write_text, read_json
from stages.core.markdown import markdown_table
from stages.core.plots import plot_losses, plot_matrices

import matplotlib.pyplot as plt
import numpy as np

from stages import stats
from stages.plan import check_plan, check_table, plan_path


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


# ----------------------------------------------------------------------------- how sure (bootstrap)

def item_ids(name: str, table: dict, bases: dict, runs: dict) -> dict[str, list[str]]:
    """{task: its test rows' ids} over every task and held-out task of the table; one error line
    unless every record scored exactly those rows (a paired comparison needs the same items)."""
    ids: dict[str, tuple[str, list[str]]] = {}
    records = [(f"the base model's line ({s})", bases[s]) for s in table["sequences"] if bases[s] is not None]
    records += [(f"row {row}-{s}-s{seed}", run) for s in table["sequences"] for row in table["rows"]
                for seed, run in zip(table["seeds"], runs[row, s])]
    for what, record in records:
        scored = [record["items"]] if record.get("kind") == "base" else list((record.get("items") or {}).values())
        if record.get("merged"):
            scored.append(record["merged"]["items"])
        if not any(scored):
            fail(f"table '{name}': {what} has no per-row outcomes (items): re-run it (dvc repro)")
        for outcomes in (o for cell in scored for o in cell.items()):
            task, rows = outcomes[0], sorted(outcomes[1])
            first = ids.setdefault(task, (what, rows))
            if rows != first[1]:
                fail(f"table '{name}': {what} scored {len(rows)} test rows of '{task}' but {first[0]} {len(first[1])} "
                     f"other ones: every row of a table must be scored on the same test rows (re-run with one eval_limit)")
    return {task: rows for task, (_, rows) in ids.items()}


class Bootstrap:
    """A table's replicates: each statistic as a (B + 1,) array, index 0 the value as measured."""

    def __init__(self, ids: dict[str, list[str]], n_seeds: int, replicates: int = stats.REPLICATES):
        self.ids = ids
        self.draws = stats.Resampler.draw({t: len(rows) for t, rows in ids.items()}, n_seeds, replicates)

    def cell(self, outcomes: dict[str, float], task: str) -> np.ndarray:
        """One scored cell's mean outcome under every item draw."""
        return self.draws.score(task, np.array([outcomes[i] for i in self.ids[task]], dtype=float))

    def base(self, record: dict) -> dict[str, np.ndarray]:
        return {task: self.cell(outcomes, task) for task, outcomes in record["items"].items()}

    def run(self, run: dict, held_out: list[str], zero: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
        """One seed's statistics: final score per task (the merged model's where merged), AP, BWT,
        FWT and the held-out scores."""
        tasks = run["tasks"]
        after = run["items"]
        matrix = [[self.cell(after[f"after_{t}"][u], u) if u in after[f"after_{t}"] else None for u in tasks] for t in tasks]
        final_items = run["merged"]["items"] if run.get("merged") else after[f"after_{tasks[-1]}"]
        out = {t: self.cell(final_items[t], t) for t in tasks + list(held_out)}
        out["AP"] = stats.average_performance([out[t] for t in tasks])
        bwt = stats.backward_transfer(matrix)
        fwt = stats.forward_transfer(matrix, [zero[t] for t in tasks]) if zero else None
        out.update({k: v for k, v in (("BWT", bwt), ("FWT", fwt)) if v is not None})
        return out

    def row(self, runs: list[dict], held_out: list[str], zero: dict | None) -> dict[str, np.ndarray]:
        """A row's statistics, averaged over its seeds (each replicate over the seeds it drew)."""
        per_seed = [self.run(r, held_out, zero) for r in runs]
        return {k: self.draws.over_seeds(np.stack([s[k] for s in per_seed])) for k in per_seed[0]}


MARKS = {1: " ▲", -1: " ▼", 0: ""}  # stats.excludes_zero of a difference from the reference row


def shown(replicates: np.ndarray | None, reference: np.ndarray | None = None) -> str | None:
    """A cell: the value, ± the half-width of its interval, and ▲ / ▼ where its difference from
    ``reference`` (the reference row's same number) excludes zero."""
    if replicates is None:
        return None
    estimate, low, high = stats.interval(replicates)
    mark = MARKS[stats.excludes_zero(replicates - reference)] if reference is not None else ""
    return f"{estimate:.3f} ± {(high - low) / 2:.3f}{mark}"


def shown_difference(difference: np.ndarray | None) -> str | None:
    """A difference from the reference row: the value, its interval, and ▲ / ▼ where it excludes zero."""
    if difference is None:
        return None
    estimate, low, high = stats.interval(difference)
    mark = MARKS[stats.excludes_zero(difference)]
    return f"{estimate:+.3f} [{low:+.3f}, {high:+.3f}]{mark}"


def tidy(sequence: str, method: str, column: str, value) -> list:
    """A CSV line: a number with its interval (low, high) and mark (+1 / -1 / 0 against the reference)."""
    if isinstance(value, tuple):  # (replicates, reference replicates or None)
        replicates, reference = value
        estimate, low, high = stats.interval(replicates)
        mark = stats.excludes_zero(replicates - reference) if reference is not None else ""
        return [sequence, method, column, estimate, low, high, mark]
    return [sequence, method, column, value, "", "", ""]


# ----------------------------------------------------------------------------- rendering

# What the size columns count: every number the run can change at some point of its sequence
# (an adapter; every task's LoRA; the union of CIMEO's masks; all weights), over the base model's
# parameter count (not the model with the adapters a method adds).
TRAINED_COLUMN = "trained numbers (whole run)"


def held_out_column(task: str) -> str:
    return f"{task} (held out)"


def sequence_block(zero: dict | None, lines: list[dict], reference: str) -> tuple[list[str], list[list]]:
    """(header, lines) of one sequence; a statistic is (replicates, reference replicates or None),
    plain values stay as they are. ``zero``: the base model's replicates (the held-out tasks
    too). The held-out columns follow FWT: scores on tasks no row trains on, what fine-tuning left
    of the base model's ability there (CorDA's preserved knowledge)."""
    tasks, held_out = lines[0]["tasks"], list(lines[0]["held_out"])
    header = ["method", TRAINED_COLUMN, "% of base model", "peak memory (MB)", "step time (s)", *tasks, "AP", "BWT", "FWT",
              *map(held_out_column, held_out), f"ΔAP vs {reference}"]
    ref = next(line["stats"] for line in lines if line["row"] == reference)
    compared = [*tasks, "AP", "BWT", "FWT", *held_out]
    table = []
    if zero:
        zero_ap = stats.average_performance([zero[t] for t in tasks])
        table.append(["base model (zero-shot)", None, None, None, None, *((zero[t], None) for t in tasks),
                      (zero_ap, None), None, None, *((zero[t], None) for t in held_out), None])
    for line in lines:
        s, is_ref = line["stats"], line["row"] == reference
        values = [(s[k], None if is_ref else ref[k]) if k in s else None for k in compared]
        table.append([line["row"], f"{line['trainable']:,}", f"{100 * line['trainable'] / line['total']:.3f}",
                      f"{line['memory']:.0f}", line["step_time"], *values,
                      None if is_ref else ("Δ", s["AP"] - ref["AP"])])
    return header, table


def is_difference(value) -> bool:
    """A ("Δ", replicates) cell: a difference from the reference row, shown with its interval."""
    return isinstance(value, tuple) and isinstance(value[0], str)


def markdown_block(header: list[str], table: list[list]) -> str:
    def text(value):
        if isinstance(value, tuple):
            return shown_difference(value[1]) if is_difference(value) else shown(*value)
        return value
    return markdown_table(header, [[text(v) for v in line] for line in table])


def csv_block(sequence: str, header: list[str], table: list[list]) -> list[list]:
    rows = []
    for line in table:
        for column, value in zip(header[1:], line[1:]):
            if value is not None:
                rows.append(tidy(sequence, line[0], column, (value[1], np.zeros_like(value[1])) if
                                 is_difference(value) else value))
    return rows


def detectable(lines: list[dict], reference: str) -> float:
    """The median half-width of the rows' ΔAP intervals: differences smaller than this are noise here."""
    ref = next(line["stats"]["AP"] for line in lines if line["row"] == reference)
    halves = []
    for line in lines:
        if line["row"] != reference:
            _, low, high = stats.interval(line["stats"]["AP"] - ref)
            halves.append((high - low) / 2)
    return float(np.median(halves)) if halves else float("nan")


def errors(replicates: list[np.ndarray]) -> np.ndarray:
    """Matplotlib's yerr (2, n): distances from each value to its interval's ends."""
    spans = [stats.interval(r) for r in replicates]
    return np.array([[max(e - lo, 0) for e, lo, _ in spans], [max(hi - e, 0) for e, _, hi in spans]])


def plot_scores(lines: list[dict], zero: dict | None, path: Path, title: str) -> None:
    """Final score per task and AP for every row with their 95% intervals, base model first: the
    table at a glance."""
    tasks = lines[0]["tasks"]
    base = ["base"] if zero else []
    labels = base + [line["row"] for line in lines]
    series = {t: ([zero[t]] if zero else []) + [line["stats"][t] for line in lines] for t in tasks}
    series["AP"] = ([stats.average_performance([zero[t] for t in tasks])] if zero else []) + [line["stats"]["AP"] for line in lines]
    fig, ax = plt.subplots(figsize=(max(7, 0.7 * len(labels) * (len(series) / 3)), 4))
    width = 0.8 / len(series)
    for k, (name, values) in enumerate(series.items()):
        ax.bar([i + (k - (len(series) - 1) / 2) * width for i in range(len(labels))], [v[0] for v in values], width,
               yerr=errors(values), capsize=2, error_kw={"lw": 0.8}, label=name,
               color="black" if name == "AP" else None, alpha=0.85 if name == "AP" else 1.0)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set(ylabel="score after the whole sequence (95% interval)", ylim=(0, 1.05), title=title)
    ax.legend(fontsize=8, ncol=len(series))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (lower cost, higher AP), by cost."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -np.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def plot_pareto(lines: list[dict], path: Path, title: str) -> None:
    """AP (95% interval) against what a row costs: the share of the base model it trains, its
    peak training memory and its step time; the rows on the Pareto front (nothing cheaper scores
    higher) joined."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ap = [line["stats"]["AP"] for line in lines]
    for ax, cost, label, log in ((axes[0], [100 * line["trainable"] / line["total"] for line in lines],
                                  "trained numbers, % of the base model", True),
                                 (axes[1], [line["memory"] for line in lines], "peak training memory (MB)", False),
                                 (axes[2], [line["step_time"] for line in lines], "step time (s)", False)):
        ax.errorbar(cost, [a[0] for a in ap], yerr=errors(ap), fmt="o", ms=4, capsize=2, lw=0.8, color="tab:blue")
        front = pareto_front([(c, a[0]) for c, a in zip(cost, ap)])
        ax.plot([cost[i] for i in front], [ap[i][0] for i in front], color="tab:red", lw=1.2, drawstyle="steps-post",
                label="Pareto front")
        for c, a, line in zip(cost, ap, lines):
            ax.annotate(line["row"], (c, a[0]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set(xlabel=label, ylabel="AP (95% interval)")
        if log:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary_over_sequences(table: dict, by_sequence: dict[str, list[dict]]) -> tuple[list[str], list[list]]:
    """AP of every row on each sequence, AP and BWT averaged over them (GORP's task orders) and
    the mean AP's difference from the reference row, each with its interval (the same replicates
    for every sequence: a task's items and the seeds are drawn once per table)."""
    sequences, reference = table["sequences"], table["reference"]
    header = ["method"] + [f"AP {s}" for s in sequences] + ["mean AP", "mean BWT", f"Δ mean AP vs {reference}"]
    ref = table["rows"].index(reference)

    def over(i: int, key: str) -> np.ndarray | None:
        values = [by_sequence[s][i]["stats"].get(key) for s in sequences]
        return None if any(v is None for v in values) else np.mean(values, axis=0)

    rows = []
    for i, row in enumerate(table["rows"]):
        against = (lambda r: None) if i == ref else (lambda r: r)  # noqa: E731
        aps = [(by_sequence[s][i]["stats"]["AP"], against(by_sequence[s][ref]["stats"]["AP"])) for s in sequences]
        bwt = over(i, "BWT")
        rows.append([row, *aps, (over(i, "AP"), against(over(ref, "AP"))),
                     None if bwt is None else (bwt, against(over(ref, "BWT"))),
                     None if i == ref else ("Δ", over(i, "AP") - over(ref, "AP"))])
    return header, rows


def sequence_lines(name: str, table: dict, boot: Bootstrap, bases: dict, runs: dict,
                   sequence: str) -> tuple[dict | None, list[dict]]:
    """(the base model's replicates, one line per row with its ``stats``) of one sequence's block."""
    base = bases[sequence]
    zero = boot.base(base) if base else None
    held_out = held_out_tasks(name, sequence, base, [(f"row {row}-{sequence}-s{seed}", run) for row in table["rows"]
                                                     for seed, run in zip(table["seeds"], runs[row, sequence])])
    lines = []
    for row in table["rows"]:
        line = row_summary(row, runs[row, sequence], base["scores"] if base else None, held_out)
        line["stats"] = boot.row(runs[row, sequence], held_out, zero)
        lines.append(line)
    return zero, lines


def render(name: str, table: dict, runs_dir: Path, plots: Path) -> tuple[str, list[list]]:
    """(Markdown page, tidy CSV rows) of one table, its plots written into ``plots``."""
    bases, runs = load_runs(runs_dir, table)
    check_prompt_formats(name, table, bases, runs)
    boot = Bootstrap(item_ids(name, table, bases, runs), len(table["seeds"]))
    seeds = ", ".join(map(str, table["seeds"]))
    final_from = ("the merged model, scored by lm-eval" if table.get("merged") else
                  "the accuracy matrix's last row (scored in training; not merged)")
    sizes = ", ".join(f"{t} {len(rows)}" for t, rows in boot.ids.items())
    doc = [f"# {table.get('title') or name}", "",
           f"Generated by `stages/tables.py --table {name}` from the runs of `dvc repro tables@{name}`; nothing here is typed in.",
           f"Rows: {', '.join(table['rows'])}; reference row: {table['reference']}; seeds: {seeds} (values are means over them).",
           f"Final scores are {final_from}; AP, BWT and FWT come from the accuracy matrix (scores after each task;",
           "cells not scored, by default those no metric reads on sequences of 4+ tasks, are hatched).", "",
           f"**How sure:** `0.743 ± 0.031` is a value and the half-width of its 95% bootstrap interval over the test rows "
           f"({sizes}) and the {len(table['seeds'])} seed(s), drawn once for the whole table (stages/stats.py). "
           f"▲ / ▼: the row's value is above / below the reference row's ({table['reference']}) and the interval of the "
           "paired difference excludes zero; a value without a mark is not distinguishable from the reference's. "
           "ΔAP shows the difference and its interval."
           + (" With one seed the intervals cover the test rows only, not training noise." if len(table["seeds"]) == 1 else ""),
           ""]
    csv_rows: list[list] = []
    by_sequence = {}
    for sequence in table["sequences"]:
        zero, lines = sequence_lines(name, table, boot, bases, runs, sequence)
        by_sequence[sequence] = lines
        header, rows = sequence_block(zero, lines, table["reference"])
        title = f"{' → '.join(lines[0]['tasks'])}"
        doc += [f"## Sequence `{sequence}`: {title}", "", markdown_block(header, rows), "",
                f"Differences in AP smaller than about ±{detectable(lines, table['reference']):.3f} (the median half-width "
                f"of the ΔAP intervals) cannot be told from noise on this sequence.", "",
                f"![final scores](plots/scores_{sequence}.png)", f"![AP against cost](plots/pareto_{sequence}.png)",
                f"![training loss](plots/loss_{sequence}.png)", f"![accuracy matrices](plots/matrix_{sequence}.png)", ""]
        csv_rows += csv_block(sequence, header, rows)
        plot_scores(lines, zero, plots / f"scores_{sequence}.png", f"Final scores: {title}")
        plot_pareto(lines, plots / f"pareto_{sequence}.png", f"AP against cost: {title}")
        plot_losses(lines, plots / f"loss_{sequence}.png", f"Training loss over {title}")
        plot_matrices(lines, plots / f"matrix_{sequence}.png")
    if len(table["sequences"]) > 1:
        header, rows = summary_over_sequences(table, by_sequence)
        doc += [f"## Over the sequences: {', '.join(table['sequences'])}", "", markdown_block(header, rows), ""]
        csv_rows += csv_block("all", header, rows)
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
        csv.writer(buffer).writerows([["sequence", "method", "column", "value", "low", "high", "vs_reference"], *csv_rows])
        atomic_write_text(folder / "table.csv", buffer.getvalue())
        atomic_write_text(folder / "table.md", page + "\n")
    print(f"wrote {folder}/table.md, table.csv and plots/")


if __name__ == "__main__":
    main()
