"""Principal angles between the base and the fine-tuned weights, per layer (the seed's
singular_value_plot.py, Figure 4).

    python stages/analysis/singular_value_plot.py --base models/base --tuned merged/cimeo-cognition --out_dir results/cimeo
    python stages/analysis/singular_value_plot.py --base models/base --tuned merged/lora-cognition --proj all --out_dir ...

Per decoder layer and projection (--proj q_proj, the default; any other projection name; or all):
U0, Ut = left singular vectors of the base and the tuned W (float64 SVD); for each k of --ks
(8 and 32): principal angles θ = degrees(arccos(svdvals(U0[:, :k]ᵀ Ut[:, :k]))), their mean and
max; the subspace overlap ‖U0_kᵀ Ut_k‖²_F / k; and the energy ratio ‖U0_kᵀ Wt‖²_F / ‖Wt‖²_F (share
of the tuned matrix's energy inside the base's top-k left singular subspace; the base's own share
Σ_{i≤k} σ_i² / Σ σ_i² beside it). With --proj all a layer's row averages its projections (max angle:
the largest). Writes <out_dir>/principal_angles_<proj>.{md,png,json} (--stem to rename).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from methods import cimeo
from stages.core.config import OneLineParser
from stages.core.errors import cli_entry, fail
from stages.core.markdown import markdown_table
from stages.core.models import load_model


def layer_rows(base_model, tuned_model, projections: list[str], ks: list[int]) -> tuple[dict, dict]:
    """(per layer averaged metrics, per weight metrics)."""
    base = cimeo.target_weights(base_model, projections)
    tuned = cimeo.target_weights(tuned_model, projections)
    if set(base) != set(tuned):
        fail(f"--base and --tuned have different {', '.join(projections)} weights: not the same architecture")
    per_weight = {name: cimeo.subspace_metrics(base[name], tuned[name], ks) for name in sorted(base, key=lambda n: (cimeo.layer_of(n), n))}
    per_layer: dict[int, dict] = {}
    for name, metrics in per_weight.items():
        per_layer.setdefault(cimeo.layer_of(name), []).append(metrics)
    averaged = {}
    for layer, items in sorted(per_layer.items()):
        averaged[layer] = {k: {"mean_angle": sum(m[k]["mean_angle"] for m in items) / len(items),
                               "max_angle": max(m[k]["max_angle"] for m in items),
                               "overlap": sum(m[k]["overlap"] for m in items) / len(items),
                               "energy_ratio": sum(m[k]["energy_ratio"] for m in items) / len(items),
                               "base_energy_ratio": sum(m[k]["base_energy_ratio"] for m in items) / len(items)}
                           for k in ks}
    return averaged, per_weight


@cli_entry
def main(argv=None) -> None:
    parser = OneLineParser(prog="singular_value_plot.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="base model folder (models/base)")
    parser.add_argument("--tuned", required=True, help="fine-tuned full model folder (merged/<row>)")
    parser.add_argument("--proj", default="q_proj", help="q_proj (default), another projection name, or all")
    parser.add_argument("--ks", type=int, nargs="+", default=[8, 32], help="subspace sizes (default: 8 32)")
    parser.add_argument("--label", default=None, help="name of the tuned model in the report (default: its folder)")
    parser.add_argument("--stem", default=None, help="output file stem (default: principal_angles_<proj>)")
    parser.add_argument("--out_dir", required=True)
    args = parser.parse_args(argv)
    projections = list(cimeo.DEFAULT_TARGETS) if args.proj == "all" else [args.proj]
    if args.proj != "all" and args.proj not in cimeo.DEFAULT_TARGETS:
        fail(f"--proj '{args.proj}' is not valid: expected all or one of {', '.join(cimeo.DEFAULT_TARGETS)}")
    ks = sorted(set(args.ks))
    if not ks or ks[0] <= 0:
        fail(f"--ks must be positive, got {args.ks}")
    label = args.label or Path(args.tuned).name
    per_layer, per_weight = layer_rows(load_model(args.base), load_model(args.tuned), projections, ks)
    layers = sorted(per_layer)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, (angles, shares) = plt.subplots(1, 2, figsize=(12, 4))
    for k in ks:
        line = angles.plot(layers, [per_layer[l][k]["mean_angle"] for l in layers], marker="o", label=f"mean, k={k}")[0]
        angles.plot(layers, [per_layer[l][k]["max_angle"] for l in layers], marker="^", linestyle="--",
                    color=line.get_color(), label=f"max, k={k}")
        line = shares.plot(layers, [per_layer[l][k]["overlap"] for l in layers], marker="o", label=f"subspace overlap, k={k}")[0]
        shares.plot(layers, [per_layer[l][k]["energy_ratio"] for l in layers], marker="s", linestyle="--",
                    color=line.get_color(), label=f"energy ratio, k={k}")
    for axis in (angles, shares):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    angles.set_xlabel("decoder layer")
    angles.set_ylabel("principal angle (degrees)")
    angles.set_title(f"Base vs {label}: {args.proj}")
    angles.legend(fontsize=8)
    shares.set_xlabel("decoder layer")
    shares.set_ylabel("fraction")
    shares.set_title("‖U0ᵀUt‖²/k and energy in the base top-k subspace")
    shares.legend(fontsize=8)
    figure.tight_layout()

    header = ["layer"]
    for k in ks:
        header += [f"mean θ k={k}", f"max θ k={k}", f"overlap k={k}", f"energy k={k}", f"base energy k={k}"]
    rows = [[layer] + [per_layer[layer][k][key] for k in ks
                       for key in ("mean_angle", "max_angle", "overlap", "energy_ratio", "base_energy_ratio")]
            for layer in layers]
    summary = {k: {"mean_angle": sum(per_layer[l][k]["mean_angle"] for l in layers) / len(layers),
                   "max_angle": max(per_layer[l][k]["max_angle"] for l in layers)} for k in ks}
    markdown = "\n".join([
        f"# Principal angles: `{args.base}` vs `{args.tuned}` ({args.proj})", "",
        "θ = degrees(arccos(svdvals(U0[:, :k]ᵀ Ut[:, :k]))) between the top-k left singular subspaces of the base and "
        "tuned W; overlap = ‖U0_kᵀ Ut_k‖²_F / k; energy = ‖U0_kᵀ Wt‖²_F / ‖Wt‖²_F (base energy: the same for W0)."
        + (" Rows average the layer's projections (max θ: the largest)." if args.proj == "all" else ""), "",
        markdown_table(header, rows, digits=4), "",
        "Over all layers: " + "; ".join(f"k={k}: mean θ {summary[k]['mean_angle']:.3f}°, max θ {summary[k]['max_angle']:.3f}°"
                                        for k in ks), ""])
    data = {"base": str(args.base), "tuned": str(args.tuned), "proj": args.proj, "ks": ks, "summary": summary,
            "layers": {str(l): {str(k): v for k, v in per_layer[l].items()} for l in layers},
            "weights": {n: {str(k): v for k, v in m.items()} for n, m in per_weight.items()}}
    stem = args.stem or f"principal_angles_{args.proj}"
    cimeo.write_report(args.out_dir, stem, markdown, figure, data)
    print(f"principal angles over {len(layers)} layers ({args.proj}) -> {args.out_dir}/{stem}.md")


if __name__ == "__main__":
    main()
