"""Stage: collect every row (method x task sequence) into Markdown/CSV tables and PNG plots.

Reads, for each row of params.yaml's ``pipeline``, ``cimeo_table``, ``gorp_table`` (one block per order) and ``adapter_table``:
  results/train/<row>/metrics.json   accuracy matrix, AP, BWT, parameters, memory, step time
  results/train/<row>/plots/metrics/train/loss.tsv   the training-loss curve
  results/eval/<row>.json            lm-eval scores of the merged model (pipeline rows: the final
                                     scores; the *_table rows are not merged: the accuracy
                                     matrix's last row is their final score)
  results/base/<sequence>.json       the base model's zero-shot scores (for FWT)
  results/encoder/<method>.json      the encoder table's rows (stages/train_encoder.py)
and writes results/tables.md, results/table.csv and results/plots/*.png.
"""

import argparse
import csv
import io
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import matplotlib  # noqa: E402

matplotlib.use("Agg")  # render to files; no display, no network
import matplotlib.pyplot as plt  # noqa: E402

from stages.core.config import OneLineParser, load_params, section  # noqa: E402
from stages.core.continual import forward_transfer  # noqa: E402
from stages.core.errors import cli_entry, fail  # noqa: E402
from stages.core.io import atomic_dir, atomic_write_text, read_json  # noqa: E402


def load_row(results: Path, method: str, sequence: str, merged: bool = True) -> dict:
    row = f"{method}-{sequence}"
    metrics = results / "train" / row / "metrics.json"
    evaluated = results / "eval" / f"{row}.json"
    base = results / "base" / f"{sequence}.json"
    for path in (metrics, evaluated, base) if merged else (metrics, base):
        if not path.is_file():
            fail(f"row '{row}' has no {path}: run `dvc repro` (or the stage that writes it) first")
    data = read_json(metrics)
    data["row"] = row
    data["zero_shot"] = read_json(base)["scores"]
    matrix = [[data["matrix"][f"after_{t}"][u] for u in data["tasks"]] for t in data["tasks"]]
    data["matrix_rows"] = matrix
    data["merged"] = read_json(evaluated)["scores"] if merged else dict(zip(data["tasks"], matrix[-1]))
    data["FWT"] = forward_transfer(matrix, [data["zero_shot"][t] for t in data["tasks"]])
    loss_file = results / "train" / row / "plots" / "metrics" / "train" / "loss.tsv"
    data["loss_curve"] = [tuple(map(float, line.split("\t")[:2])) for line in loss_file.read_text().splitlines()[1:]] if loss_file.is_file() else []
    return data


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def summary_rows(rows: list[dict], zero_shot: dict) -> tuple[list[str], list[list]]:
    tasks = rows[0]["tasks"]
    header = ["method", "trainable params", "% of model", "peak memory (MB)", "step time (s)"] + tasks + ["AP", "BWT", "FWT"]
    table = [["base model (zero-shot)", None, None, None, None] + [zero_shot[t] for t in tasks] +
             [sum(zero_shot[t] for t in tasks) / len(tasks), None, None]]
    for r in rows:
        table.append([r["method"], f"{r['trainable_params']:,}", f"{100 * r['trainable_params'] / r['total_params']:.3f}",
                      f"{r['peak_memory_mb']:.0f}", r["step_time_s"]] + [r["merged"][t] for t in tasks] + [r["AP"], r["BWT"], r["FWT"]])
    return header, table


def plot_losses(rows: list[dict], path: Path) -> None:
    """Every row's loss against training progress in tasks (rows may differ in steps per task:
    MeZO runs more), so the task boundaries line up at 1, 2, ... for all of them."""
    fig, ax = plt.subplots(figsize=(9, 4.5))
    colours = plt.get_cmap("tab20").colors
    for i, r in enumerate(rows):
        if r["loss_curve"]:
            steps, losses = zip(*r["loss_curve"])
            per_task = steps[-1] / len(r["tasks"])  # the last logged step ends the last task
            ax.plot([s / per_task for s in steps], losses, label=r["method"], color=colours[i % len(colours)], lw=1.2)
    for x in range(1, len(rows[0]["tasks"])):
        ax.axvline(x, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(rows[0]["tasks"]) + 1))
    ax.set(xlabel="tasks trained (dashed: next task)", ylabel="training loss (mean since last log)",
           title=f"Training loss over the sequence {' → '.join(rows[0]['tasks'])}")
    ax.set_yscale("log")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_matrices(rows: list[dict], path: Path, per_line: int = 4) -> None:
    tasks = rows[0]["tasks"]
    lines = -(-len(rows) // per_line)
    cols = min(per_line, len(rows))
    fig, axes = plt.subplots(lines, cols, figsize=(3.2 * cols + 0.8, 3.2 * lines), squeeze=False)
    for ax in axes.flat[len(rows):]:
        ax.axis("off")
    for ax, r in zip(axes.flat, rows):
        image = ax.imshow(r["matrix_rows"], vmin=0, vmax=1, cmap="viridis")
        for i, line in enumerate(r["matrix_rows"]):
            for j, value in enumerate(line):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.6 else "black", fontsize=8)
        ax.set_xticks(range(len(tasks)), tasks, rotation=30, fontsize=8)
        ax.set_yticks(range(len(tasks)), [f"after {t}" for t in tasks], fontsize=8)
        ax.set_title(f"{r['method']}  AP {r['AP']:.2f}  BWT {fmt(r['BWT'], 2)}", fontsize=9)
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="score")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_scores(rows: list[dict], zero_shot: dict, path: Path) -> None:
    """Final score per task and AP for every method, base model first: the table at a glance."""
    tasks = rows[0]["tasks"]
    labels = ["base"] + [r["method"] for r in rows]
    series = {t: [zero_shot[t]] + [r["merged"][t] for r in rows] for t in tasks}
    series["AP"] = [sum(zero_shot[t] for t in tasks) / len(tasks)] + [r["AP"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(7, 0.7 * len(labels) * (len(series) / 3)), 4))
    width = 0.8 / len(series)
    for k, (name, values) in enumerate(series.items()):
        ax.bar([i + (k - (len(series) - 1) / 2) * width for i in range(len(labels))], values, width, label=name,
               color="black" if name == "AP" else None, alpha=0.85 if name == "AP" else 1.0)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set(ylabel="score after the whole sequence", ylim=(0, 1), title=f"Final scores: {' → '.join(tasks)}")
    ax.legend(fontsize=8, ncol=len(series))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def encoder_section(results: Path, table: dict, plots: Path) -> tuple[list[str], list[list]]:
    """The encoder table (stage train_encoder): accuracy and trainable parameters per method, and
    a PNG of accuracy against trainable parameters (log scale). Returns (Markdown lines, CSV rows)."""
    rows = [read_json(results / "encoder" / f"{method}.json") for method in table["methods"]]
    header = ["method", "trainable params", "% of model", "step time (s)", f"{table['task']} accuracy"]
    lines = [[r["method"], f"{r['trainable_params']:,}", f"{100 * r['trainable_params'] / r['total_params']:.3f}",
              r["step_time_s"], r["accuracy"]] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.scatter(r["trainable_params"], r["accuracy"], s=40)
        ax.annotate(r["method"], (r["trainable_params"], r["accuracy"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set(xscale="log", xlabel="trainable parameters (log)", ylabel=f"{table['task']} test accuracy",
           title=f"{rows[0]['model']} on {table['task']}: accuracy vs trainable parameters")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(plots / "encoder.png", dpi=120)
    plt.close(fig)
    doc = [f"## Encoder table: LoRETTA on `{rows[0]['model']}` ({table['task']}, {table['steps']} steps × batch {table['batch_size']})", "",
           "A new classification head on the encoder, trained in every row; accuracy on the task's test rows.", "",
           markdown_table(header, lines), "", "![encoder](plots/encoder.png)", ""]
    csv_rows = [["encoder", line[0], column, line[k]] for line in lines for k, column in enumerate(header) if k]
    return doc, csv_rows


def orders_section(by_order: dict[str, list[dict]]) -> tuple[list[str], list[list]]:
    """GORP's headline: each method's AP on every task order, and AP and BWT averaged over them."""
    orders = list(by_order)
    methods = [r["method"] for r in by_order[orders[0]]]
    header = ["method"] + [f"AP {o}" for o in orders] + ["mean AP", "mean BWT"]
    table = []
    for i, method in enumerate(methods):
        aps = [by_order[o][i]["AP"] for o in orders]
        bwts = [by_order[o][i]["BWT"] for o in orders]
        table.append([method] + aps + [sum(aps) / len(aps), sum(bwts) / len(bwts)])
    lines = [f"## GORP's table over the orders: {', '.join(orders)}", "", markdown_table(header, table), ""]
    return lines, [["gorp_orders", line[0], column, line[k]] for line in table for k, column in enumerate(header) if k]


@cli_entry
def main(argv=None) -> None:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default=None)
    parser.add_argument("--results", default="results")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    pipeline = section(params, "pipeline")
    results = Path(args.results)
    doc = ["# Results", "", "Generated by `stages/tables.py` from the runs of `dvc repro`; nothing here is typed in.",
           "Scores are lm-eval's (acc for multiple choice, exact match for generation) on each task's test split,",
           "final scores from the merged model; AP, BWT, FWT from the accuracy matrix (scores after each task).", ""]
    # (title, sequence, methods, scored merged, plot stem)
    groups = [(f"Sequence `{s}`", s, pipeline["methods"], True, s) for s in pipeline["sequences"]]
    cimeo = params.get("cimeo_table")
    if cimeo:
        groups.append((f"CIMEO's Table 1: CIMEO and its baselines on `{cimeo['sequence']}`", cimeo["sequence"],
                       cimeo["methods"], False, f"cimeo_{cimeo['sequence']}"))
    gorp = params.get("gorp_table")
    if gorp:  # one block per task order
        groups += [(f"GORP's table: GORP and its baselines on `{s}`", s, gorp["methods"], False, f"gorp_{s}")
                   for s in gorp["sequences"]]
    adapters = params.get("adapter_table")
    if adapters:
        groups += [(f"Adapter table: LoRAN and LoRETTA against LoRA on `{s}`", s, adapters["methods"], False, f"adapters_{s}")
                   for s in adapters["sequences"]]
    csv_rows = []
    by_order: dict[str, list[dict]] = {}
    with atomic_dir(results / "plots") as plots:
        for title, sequence, methods, merged, stem in groups:
            rows = [load_row(results, method, sequence, merged) for method in methods]
            if stem.startswith("gorp_"):
                by_order[sequence] = rows
            header, table = summary_rows(rows, rows[0]["zero_shot"])
            final = ("Final scores from the merged model." if merged else
                     "Final scores are the accuracy matrix's last row (scored in-process after the last task; not merged).")
            doc += [f"## {title}: {' → '.join(rows[0]['tasks'])}", "", final, "", markdown_table(header, table), "",
                    f"![final scores](plots/scores_{stem}.png)", f"![training loss](plots/loss_{stem}.png)",
                    f"![accuracy matrices](plots/matrix_{stem}.png)", "",
                    "### Accuracy matrices (row: after training on task; column: scored task)", ""]
            for r in rows:
                doc += [f"**{r['method']}**", "", markdown_table(["after \\ on"] + r["tasks"],
                        [[t] + line for t, line in zip(r["tasks"], r["matrix_rows"])]), ""]
            # tidy CSV (one value per line): the groups' task columns differ
            csv_rows += [[stem, line[0], column, line[k]] for line in table
                         for k, column in enumerate(header) if k and line[k] is not None]
            plot_scores(rows, rows[0]["zero_shot"], plots / f"scores_{stem}.png")
            plot_losses(rows, plots / f"loss_{stem}.png")
            plot_matrices(rows, plots / f"matrix_{stem}.png")
            if gorp and len(gorp["sequences"]) > 1 and stem == f"gorp_{gorp['sequences'][-1]}":
                lines, extra = orders_section(by_order)
                doc += lines
                csv_rows += extra
        encoder = params.get("encoder_table")
        if encoder:
            lines, rows = encoder_section(results, encoder, plots)
            doc += lines
            csv_rows += rows
        buffer = io.StringIO()
        csv.writer(buffer).writerows([["table", "method", "column", "value"]] + csv_rows)
        atomic_write_text(results / "table.csv", buffer.getvalue())
        atomic_write_text(results / "tables.md", "\n".join(doc))
    print(f"wrote {results / 'tables.md'}, {results / 'table.csv'} and {results / 'plots'}")


if __name__ == "__main__":
    main()
