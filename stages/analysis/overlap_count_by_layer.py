"""Overlap of CIMEO masks per decoder layer, mean over cognition pairs (the seed's
overlap_count_by_layer.py, Figure 2 middle).

    python stages/analysis/overlap_count_by_layer.py --masks models/init/cimeo/model/cimeo_masks --out_dir results/cimeo

Per layer l and ordered pair i ≠ j: |I_i ∩ I_j| / |I_i| over the layer's masked matrices
together (set intersection); the table and the plot give the mean over pairs with its min and max,
against the random expectation (= density). Writes <out_dir>/overlap_count_by_layer.{md,png,json}.
"""

from __future__ import annotations

import argparse

from methods import cimeo
from stages.core.config import OneLineParser
from stages.core.errors import cli_entry
from stages.core.markdown import markdown_table

from stages.analysis.overlap_count import add_common, describe, labels_of


@cli_entry
def main(argv=None) -> None:
    parser = OneLineParser(prog="overlap_count_by_layer.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common(parser)
    args = parser.parse_args(argv)
    meta, masks = cimeo.load_all_masks(args.masks, args.tasks)
    labels = labels_of(args, list(masks))
    per_layer = cimeo.mean_layer_overlap(masks)
    density = float(meta["density"])
    layers = sorted(per_layer)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, axis = plt.subplots(figsize=(7, 4))
    mean = [per_layer[l]["mean"] for l in layers]
    axis.fill_between(layers, [per_layer[l]["min"] for l in layers], [per_layer[l]["max"] for l in layers],
                      alpha=0.25, label="min-max over pairs")
    axis.plot(layers, mean, marker="o", label="mean over pairs")
    axis.axhline(density, color="red", linestyle="--", label=f"random expectation ({density:g})")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_xlabel("decoder layer")
    axis.set_ylabel("|I_i ∩ I_j| / |I_i|")
    axis.set_ylim(0, 1)
    axis.set_title(f"Mask overlap by layer ({len(masks)} cognitions, {meta.get('strategy')})")
    axis.legend()
    figure.tight_layout()

    rows = [[layer, per_layer[layer]["mean"], per_layer[layer]["min"], per_layer[layer]["max"],
             per_layer[layer]["mean"] / density] for layer in layers]
    markdown = "\n".join([
        "# CIMEO mask overlap by layer (mean over cognition pairs)", "", describe(meta), "",
        f"Tasks: {', '.join(labels)}. Per layer: |I_i ∩ I_j| / |I_i| over the layer's masked matrices, "
        f"over all ordered pairs i ≠ j. Random expectation: **{density:g}**.", "",
        markdown_table(["layer", "mean", "min", "max", "mean / random"], rows, digits=4), ""])
    data = {"tasks": list(masks), "labels": labels, "density": density, "random_expectation": density,
            "layers": {str(l): per_layer[l] for l in layers}}
    cimeo.write_report(args.out_dir, "overlap_count_by_layer", markdown, figure, data)
    print(f"overlap by layer over {len(layers)} layers -> {args.out_dir}/overlap_count_by_layer.md")


if __name__ == "__main__":
    main()
