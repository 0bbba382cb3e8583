"""GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection (Zhao et al., ICML 2024).

Update rule: full fine-tuning (every weight trainable), but for each target weight matrix W
(m x n, attention and MLP linears) Adam runs in a rank-r subspace of its gradient G. Every
``update_proj_gap`` steps P = the top-r singular vectors of G on W's smaller side (left if
m < n, right otherwise: ``proj_type: std``); between refreshes P is fixed and
    R = PᵀG (or G·P),   M, V = Adam moments of R,   W -= lr·scale·P·(M̂ / (√V̂ + eps)).
The moments of W take 2·r·max(m, n) numbers instead of AdamW's 2·m·n (a fraction
r / min(m, n)), plus P itself (r·min(m, n)); embeddings and norms get plain AdamW (same
optimizer, a group without projection). Fine-tuning defaults of the paper: rank 4-8, gap 500,
scale 4 (pre-training: rank 128+, gap 200, scale 0.25).
Optimizer: galore_torch.GaLoreAdamW (galore-torch 1.0, galore_torch/adamw.py), param groups built by
methods/projection.py ``projection_groups``. The full model is saved after every task.
"""

from dataclasses import dataclass
from types import SimpleNamespace

from methods.projection import galore_adamw, projection_groups
from stages.core.settings import LoraSettings, check_not_empty, check_positive, like, setting
from stages.core.sft import Method, build_tuned, main
from stages.core.strategies import SHARD


@dataclass(kw_only=True)
class GaloreSettings:
    """GaLore: Adam in a rank-r subspace of each target matrix's gradient."""

    rank: int = setting(help="rank r of the gradient subspace of each target matrix")
    update_proj_gap: int = setting(help="steps between new subspaces (an SVD of each target matrix's gradient)")
    scale: float = setting(help="the projected matrices' step is lr·scale (embeddings and norms: lr)")
    proj_type: str = setting(help="which side of G is projected: std: the smaller, reverse_std: the larger, or left, right, "
                                  "full (both)", choices=("std", "reverse_std", "left", "right", "full"))
    target_modules: list[str] = like(LoraSettings, "target_modules")

    def __post_init__(self):
        check_positive(self, "rank", "update_proj_gap", "scale")
        check_not_empty(self, "target_modules")


def build(model, cfg, ctx):
    return build_tuned(model, SimpleNamespace(tuning="full"))


def optimizer(model, cfg, ctx):
    groups = projection_groups(model, cfg.target_modules, cfg.weight_decay, rank=cfg.rank,
                               update_proj_gap=cfg.update_proj_gap, scale=cfg.scale, proj_type=cfg.proj_type)
    return galore_adamw()(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, no_deprecation_warning=True)


METHOD = Method("galore", build, optimizer=optimizer, doc=__doc__, settings=GaloreSettings,
                refuses={"FSDP": f"it projects each weight matrix's whole gradient (an SVD every update_proj_gap steps); {SHARD}"})

if __name__ == "__main__":
    main(METHOD)
