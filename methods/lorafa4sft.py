"""LoRA-FA: memory-efficient LoRA with frozen A (Zhang et al., 2023).

Update rule: LoRA, h = W0·x + (alpha / r)·B·A·x, but A stays at its random init and only B
trains, so the activations of the r-dimensional A·x, not the full input x, are kept for the
backward pass. The optimizer projects B's gradient onto the row space of A,
g_B <- (1/s²)·g_B·(AᵀA)⁻¹ (s = alpha / r), which makes the update equal to full fine-tuning's
projected onto the low-rank subspace; then AdamW. peft: create_lorafa_optimizer, with r and
alpha equal to the LoraConfig's.
"""

from stages.core.settings import LoraSettings
from stages.core.sft import Method, main

from peft import LoraConfig, get_peft_model
from peft.optimizers import create_lorafa_optimizer


def build(model, cfg, ctx):
    config = LoraConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        target_modules=cfg.target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def optimizer(model, cfg, ctx):
    return create_lorafa_optimizer(model, r=cfg.r, lora_alpha=cfg.lora_alpha, lr=cfg.lr, weight_decay=cfg.weight_decay)


METHOD = Method("lorafa", build, optimizer=optimizer, doc=__doc__, settings=LoraSettings)

if __name__ == "__main__":
    main(METHOD)
