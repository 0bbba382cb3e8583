"""Overlap of CIMEO masks between cognitions (the seed's overlap_count.py, Figure 2 left).

    python stages/analysis/overlap_count.py --masks models/init/cimeo/model/cimeo_masks --out_dir results/cimeo

For every ordered pair of tasks (i, j): |I_i ∩ I_j| / |I_i| over all masked weights together, a
true set intersection of the index sets (the seed's script compared index lists position by
position, which undercounts). Two independent random masks of the same density d overlap d in
expectation: the table and the heatmap show that line. Writes <out_dir>/overlap_count.{md,png,json}.
"""

from __future__ import annotations

import argparse

from methods import cimeo
from stages.core.config import OneLineParser
from stages.core.errors import cli_entry, fail
from stages.core.markdown import markdown_table


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--masks", required=True, help="folder written by methods/build_cimeo_masks.py")
    parser.add_argument("--tasks", nargs="+", default=None, help="tasks to compare, in this order (default: all in the folder)")
    parser.add_argument("--labels", nargs="+", default=None, help="display names of --tasks (e.g. the cognitions)")
    parser.add_argument("--out_dir", required=True, help="where the .md, .png and .json go (e.g. results/cimeo)")


def labels_of(args: argparse.Namespace, tasks: list[str]) -> list[str]:
    if args.labels is None:
        return list(tasks)
    if len(args.labels) != len(tasks):
        fail(f"--labels gives {len(args.labels)} names for {len(tasks)} tasks")
    return list(args.labels)


def describe(meta: dict) -> str:
    return (f"Masks: strategy `{meta.get('strategy')}`, density {meta.get('density')}, objective `{meta.get('objective')}`, "
            f"{meta.get('batches') or 'all'} batches of {meta.get('batch_size')}, model `{meta.get('model_id')}` "
            f"(fingerprint {meta.get('model_fingerprint')}).")


@cli_entry
def main(argv=None) -> None:
    parser = OneLineParser(prog="overlap_count.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common(parser)
    args = parser.parse_args(argv)
    meta, masks = cimeo.load_all_masks(args.masks, args.tasks)
    if len(masks) < 2:
        fail(f"the overlap needs at least two tasks' masks, got {len(masks)}")
    tasks, matrix = cimeo.overlap_matrix(masks)
    labels = labels_of(args, tasks)
    density = float(meta["density"])
    off = [matrix[i][j] for i in range(len(tasks)) for j in range(len(tasks)) if i != j]
    mean_off = sum(off) / len(off)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(1.2 * len(tasks) + 3, 1.0 * len(tasks) + 2))
    image = axis.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
    for i in range(len(tasks)):
        for j in range(len(tasks)):
            axis.text(j, i, f"{matrix[i][j]:.2f}", ha="center", va="center", color="white" if matrix[i][j] < 0.6 else "black", fontsize=9)
    axis.set_xticks(range(len(tasks)), labels, rotation=45, ha="right")
    axis.set_yticks(range(len(tasks)), labels)
    axis.set_xlabel("j")
    axis.set_ylabel("i")
    colorbar = figure.colorbar(image, ax=axis, label="|I_i ∩ I_j| / |I_i|")
    colorbar.ax.axhline(density, color="red", linewidth=2)
    axis.set_title(f"Mask overlap ({meta.get('strategy')}); random expectation = {density:g} (red)")
    figure.tight_layout()

    rows = [[label] + row for label, row in zip(labels, matrix)]
    markdown = "\n".join([
        "# CIMEO mask overlap between cognitions", "", describe(meta), "",
        "Entry (i, j) = |I_i ∩ I_j| / |I_i| over all masked weights (set intersection). "
        f"Random expectation (two independent masks of density d): **{density:g}**.", "",
        markdown_table(["i \\ j"] + labels, rows, digits=4), "",
        f"Mean off-diagonal overlap {mean_off:.4f} = {mean_off / density:.2f} x the random expectation.", ""])
    data = {"tasks": tasks, "labels": labels, "matrix": matrix, "density": density, "random_expectation": density,
            "mean_off_diagonal": mean_off, "masks": str(args.masks), "strategy": meta.get("strategy")}
    cimeo.write_report(args.out_dir, "overlap_count", markdown, figure, data)
    print(f"overlap of {len(tasks)} tasks: mean off-diagonal {mean_off:.4f} (random {density:g}) -> {args.out_dir}/overlap_count.md")


if __name__ == "__main__":
    main()
