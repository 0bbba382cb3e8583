"""O-LoRA: orthogonal subspace learning for continual learning (Wang et al., EMNLP Findings 2023),
GORP's main baseline. Not OLoRA (olora4sft.py, orthonormal initialisation).

Update rule, on task t of a sequence, for every target linear layer
    y = W0·x + (alpha/r)·Σ_{i<=t} B_i·A_i·x:
W0 and the earlier tasks' LoRAs (A_i, B_i, i < t) are frozen; a new LoRA A_t (Kaiming), B_t (zero)
trains with AdamW on
    L = L_task + lambda_1·Σ_layers Σ_{i<t} Σ_jk |(A_i·A_tᵀ)_jk| + lambda_2·‖(A_t, B_t)‖²
so that the new task's input subspace (the rows of A_t) stays orthogonal to the earlier tasks'
(the L1 form of the orthogonality loss as in the authors' code; their T5 settings lambda_1 0.5,
lambda_2 0). With lambda_1 = 0 it is plain sequential LoRA with a fresh adapter per task. Every
LoRA is folded into W0 when the model is saved or scored. The layers are GORP's (methods/gorp.py,
W kept frozen here), so the two methods differ only in their update rule.
"""

from __future__ import annotations

from dataclasses import dataclass

from methods.gorp import activate, attach, export_folded, gorp_layers, plain_copy, trained_numbers
from stages.core.settings import LoraSettings, check_non_negative, setting
from stages.core.sft import Method, StepInputs, first_order_step, main
from stages.core.strategies import NEW_ADAPTER_PER_TASK

import torch


@dataclass(kw_only=True)
class OLoraSettings(LoraSettings):
    """O-LoRA: a new LoRA per task, kept orthogonal to the earlier tasks' ones."""

    lambda_1: float = setting(help="weight of the orthogonality loss Σ|A_i·A_tᵀ|; 0: plain sequential LoRA")
    lambda_2: float = setting(help="weight of the L2 penalty on the new LoRA")

    def __post_init__(self):
        super().__post_init__()
        check_non_negative(self, "lambda_1", "lambda_2")


def build(model, cfg, ctx):
    # rank 1: the layers' GORP basis (unused here) takes one column per earlier task
    model = attach(model, cfg.target_modules, len(ctx.tasks), cfg.r, cfg.lora_alpha, cfg.lora_dropout, rank=1)
    for layer in gorp_layers(model):  # W0 and the basis never train: not checkpointed either
        layer.weight.requires_grad_(False)
        layer.basis.requires_grad_(False)
    return model


def optimizer(model, cfg, ctx):
    """Task ctx.task_index's LoRA, the only trainable tensors."""
    layers = activate(model, ctx.task_index)
    for layer in layers:
        layer.weight.requires_grad_(False)
    params = [p for layer in layers for p in (layer.lora_A[ctx.task_index], layer.lora_B[ctx.task_index])]
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def regulariser(model: torch.nn.Module, lambda_1: float, lambda_2: float) -> torch.Tensor:
    """lambda_1·Σ |A_i·A_tᵀ| over earlier tasks i (orthogonality) + lambda_2·‖A_t, B_t‖² (the new LoRA)."""
    total = torch.zeros(())
    for layer in gorp_layers(model):
        t = layer.active
        a_t = layer.lora_A[t]
        if lambda_1 and t:
            earlier = torch.cat([layer.lora_A[i] for i in range(t)]).detach()
            total = total + lambda_1 * (earlier @ a_t.T).abs().sum()
        if lambda_2:
            total = total + lambda_2 * (a_t.square().sum() + layer.lora_B[t].square().sum())
    return total


def train_step(step: StepInputs) -> float:
    """The regulariser's gradient first (it does not depend on the batch), then the task loss's."""
    penalty = regulariser(step.accelerator.unwrap_model(step.model), step.cfg.lambda_1, step.cfg.lambda_2)
    if penalty.requires_grad:
        step.accelerator.backward(penalty)
    return first_order_step(step)


METHOD = Method("o_lora", build, optimizer=optimizer, train_step=train_step, doc=__doc__, export=export_folded,
                merged=plain_copy, settings=OLoraSettings, refuses=dict.fromkeys(("DDP", "FSDP"), NEW_ADAPTER_PER_TASK),
                trainable=lambda model, cfg, ctx: trained_numbers(model, train_weights=False))

if __name__ == "__main__":
    main(METHOD)
