"""Overlap of two cognitions' CIMEO masks per decoder layer (the seed's
overlap_count_by_layer_by_cognition.py, Figure 2 right).

    python stages/analysis/overlap_count_by_layer_by_cognition.py --masks DIR --pair qa_wikidata winowhy --out_dir results/cimeo

Per layer: |I_a ∩ I_b| / |I_a| over the layer's masked matrices (set intersection), per projection
and for the layer as a whole, against the random expectation (= density). Writes
<out_dir>/overlap_count_by_layer_<a>__<b>.{md,png,json}.
"""

from __future__ import annotations

import argparse

from methods import cimeo
from stages.core.config import OneLineParser
from stages.core.errors import cli_entry, fail
from stages.core.markdown import markdown_table

from stages.analysis.overlap_count import describe


def part_of(name: str) -> str:
    """A parameter's column: its module (q_proj, input_layernorm), with the tensor's name when it
    is not the weight (q_proj.bias)."""
    module, tensor = name.rsplit(".", 2)[-2:]
    return module if tensor == "weight" else f"{module}.{tensor}"


@cli_entry
def main(argv=None) -> None:
    parser = OneLineParser(prog="overlap_count_by_layer_by_cognition.py", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--masks", required=True, help="folder written by methods/build_cimeo_masks.py")
    parser.add_argument("--pair", nargs=2, required=True, metavar=("A", "B"), help="the two tasks to compare")
    parser.add_argument("--labels", nargs=2, default=None, metavar=("LABEL_A", "LABEL_B"), help="their display names")
    parser.add_argument("--out_dir", required=True)
    args = parser.parse_args(argv)
    a, b = args.pair
    if a == b:
        fail(f"--pair names '{a}' twice: give two different tasks")
    meta, masks = cimeo.load_all_masks(args.masks, [a, b])
    label_a, label_b = args.labels or (a, b)
    density = float(meta["density"])
    by_layer = cimeo.layer_overlap(masks[a], masks[b])
    per_weight = {name: counts for name, counts in cimeo.weight_overlaps(masks[a], masks[b]).items()
                  if cimeo.layer_index(name) is not None}  # the final norm belongs to no layer
    projections = sorted({part_of(name) for name in per_weight})
    table: dict[int, dict[str, float]] = {layer: {} for layer in by_layer}
    for name, (inter, size) in per_weight.items():
        table[cimeo.layer_of(name)][part_of(name)] = inter / size if size else float("nan")
    overall = cimeo.overall_overlap(masks[a], masks[b])
    layers = sorted(by_layer)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, axis = plt.subplots(figsize=(7, 4))
    for projection in projections:
        axis.plot(layers, [table[l].get(projection, float("nan")) for l in layers], linewidth=1, alpha=0.6, label=projection)
    axis.plot(layers, [by_layer[l] for l in layers], color="black", marker="o", linewidth=2, label="layer")
    axis.axhline(density, color="red", linestyle="--", label=f"random expectation ({density:g})")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_xlabel("decoder layer")
    axis.set_ylabel(f"|I_{label_a} ∩ I_{label_b}| / |I_{label_a}|")
    axis.set_ylim(0, 1)
    axis.set_title(f"Mask overlap by layer: {label_a} vs {label_b}")
    axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()

    rows = [[layer, by_layer[layer]] + [table[layer].get(p, float("nan")) for p in projections] for layer in layers]
    markdown = "\n".join([
        f"# CIMEO mask overlap by layer: {label_a} vs {label_b}", "", describe(meta), "",
        f"Per layer: |I_a ∩ I_b| / |I_a| with a = `{a}`, b = `{b}` (set intersection). All layers together: "
        f"{overall:.4f}. Random expectation: **{density:g}**.", "",
        markdown_table(["layer", "layer overall"] + projections, rows, digits=4), ""])
    data = {"pair": [a, b], "labels": [label_a, label_b], "density": density, "random_expectation": density,
            "overall": overall, "layers": {str(l): {"overall": by_layer[l], **table[l]} for l in layers}}
    cimeo.write_report(args.out_dir, f"overlap_count_by_layer_{a}__{b}", markdown, figure, data)
    print(f"{a} vs {b}: overlap {overall:.4f} (random {density:g}) -> {args.out_dir}/overlap_count_by_layer_{a}__{b}.md")


if __name__ == "__main__":
    main()
