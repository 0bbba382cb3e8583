"""GORP: Continual Gradient Low-Rank Projection Fine-Tuning for LLMs (Wang et al., ACL 2025).

Update rule, on task t of a sequence, for every target linear layer
    y = W·x + (alpha/r)·Σ_{i<=t} B_i·A_i·x:
the earlier tasks' LoRAs (A_i, B_i, i < t) are frozen and a new LoRA A_t (Kaiming), B_t (zero)
trains with AdamW at lora_lr; in the same step W trains GaLore-style on its input side:
G' = Gᵀ (in x out) with the shared subspace M (in x k, input directions) removed,
G' <- G' - M·Mᵀ·G'; every update_proj_gap steps Q = top-`rank` singular vectors of G'
(orthogonal to M); Adam on Q·G' and
    W -= lr·scale·(Qᵀ·Adam(Q·G'))ᵀ,
the moments moved into each new subspace at a refresh (m <- T·m, v <- (T∘T)·v, T = Q_new·Q_oldᵀ;
our choice, where GaLore's code keeps them unmoved: the basis below is grown from them).
A_t's gradient gets the same g - M·Mᵀ·g on its input side before its moments (and its step is
projected again), so the layer's whole change on task t leaves the earlier tasks' input
directions alone: Δ·M = 0. At the end of every task but the last, W's first moment Qᵀ·m
extends M (SVD of the part outside M, leading directions until M holds `energy` of its energy;
M stays orthonormal and grows task by task). Everything but the target layers is frozen.
The paper: rank 8 (orders 1-3), 32 (orders 4-6), lr 1e-5, update_proj_gap 10, LoRA r 8, alpha 32.
After each task the model is saved with every LoRA folded into W: a plain transformers folder
(stages/merge.py copies it). Details and our reading of the paper: methods/gorp.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from methods.gorp import GorpAdamW, activate, attach, check_settings, export_folded, plain_copy, trained_numbers
from stages.core.settings import LoraSettings, setting
from stages.core.sft import Method, main
from stages.core.strategies import NEW_ADAPTER_PER_TASK


@dataclass(kw_only=True)
class GorpSettings(LoraSettings):
    """GORP: per task a new LoRA (r, lora_alpha, lora_dropout) and GaLore-projected full weights."""

    rank: int = setting(help="rank of the subspace of W's gradient (seen from its inputs) that W's step takes")
    update_proj_gap: int = setting(help="steps between new subspaces of W's gradient")
    scale: float = setting(help="W's step is lr·scale")
    lora_lr: float = setting(help="learning rate of each task's new LoRA (W's is lr)")
    energy: float = setting(help="a finished task's input directions keep this fraction of the energy of W's first "
                                 "moment, in (0, 1]; later tasks stay out of them")

    def __post_init__(self):
        super().__post_init__()
        check_settings(self.rank, self.r, self.lora_alpha, self.energy, self.update_proj_gap, self.scale, self.lora_lr)


def build(model, cfg, ctx):
    return attach(model, cfg.target_modules, len(ctx.tasks), cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.rank)


def optimizer(model, cfg, ctx):
    """Task ctx.task_index's optimizer: its LoRA made the trainable one, the others frozen."""
    layers = activate(model, ctx.task_index)
    return GorpAdamW(layers, ctx.task_index, lr=cfg.lr, lora_lr=cfg.lora_lr, rank=cfg.rank,
                     update_proj_gap=cfg.update_proj_gap, scale=cfg.scale, energy=cfg.energy,
                     steps_per_task=cfg.steps_per_task, grow_bases=ctx.task_index < len(ctx.tasks) - 1,
                     weight_decay=cfg.weight_decay)


METHOD = Method("gorp", build, optimizer=optimizer, doc=__doc__, export=export_folded, merged=plain_copy,
                settings=GorpSettings, refuses=dict.fromkeys(("DDP", "FSDP"), NEW_ADAPTER_PER_TASK),
                trainable=lambda model, cfg, ctx: trained_numbers(model, train_weights=True))

if __name__ == "__main__":
    main(METHOD)
