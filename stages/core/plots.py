"""The plots a run and a table draw (PNG: they render anywhere, `dvc plots show` included, with no
script from the network). A line is one row: ``row``, ``tasks``, ``matrix`` (scores after each
task, one list per task trained), ``AP``, ``BWT`` and ``loss_curve`` ([step, loss] pairs)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # render to files; no display, no network
import matplotlib.pyplot as plt  # noqa: E402


def plot_losses(lines: list[dict], path: Path, title: str) -> None:
    """Every row's loss against training progress in tasks (rows may differ in steps per task),
    so the task boundaries line up at 1, 2, ... for all of them."""
    fig, ax = plt.subplots(figsize=(9, 4.5))
    colours = plt.get_cmap("tab20").colors
    tasks = lines[0]["tasks"]
    for i, line in enumerate(lines):
        if line["loss_curve"]:
            steps, losses = zip(*line["loss_curve"])
            per_task = steps[-1] / len(tasks)  # the last logged step ends the last task
            ax.plot([s / per_task for s in steps], losses, label=line["row"], color=colours[i % len(colours)], lw=1.2)
    for x in range(1, len(tasks)):
        ax.axvline(x, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(tasks) + 1))
    ax.set(xlabel="tasks trained (dashed: next task)", ylabel="training loss (mean since last log)", title=title)
    ax.set_yscale("log")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_matrices(lines: list[dict], path: Path, per_line: int = 4) -> None:
    """Every row's accuracy matrix (scores on every task after training each one), annotated; a
    cell that was not scored (None: no metric reads it, params train.full_matrix) is hatched."""
    tasks = lines[0]["tasks"]
    rows = -(-len(lines) // per_line)
    cols = min(per_line, len(lines))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols + 0.8, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(lines):]:
        ax.axis("off")
    for ax, line in zip(axes.flat, lines):
        cells = [[float("nan") if value is None else value for value in values] for values in line["matrix"]]
        image = ax.imshow(cells, vmin=0, vmax=1, cmap="viridis")
        for i, values in enumerate(line["matrix"]):
            for j, value in enumerate(values):
                if value is None:
                    ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="///", edgecolor="0.8", lw=0))
                else:
                    ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.6 else "black", fontsize=8)
        ax.set_xticks(range(len(tasks)), tasks, rotation=30, fontsize=8)
        ax.set_yticks(range(len(tasks)), [f"after {t}" for t in tasks], fontsize=8)
        bwt = "–" if line["BWT"] is None else f"{line['BWT']:.2f}"
        ax.set_title(f"{line['row']}  AP {line['AP']:.2f}  BWT {bwt}", fontsize=9)
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="score")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
