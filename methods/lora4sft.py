"""LoRA: Low-Rank Adaptation (Hu et al., ICLR 2022).

Update rule: every target linear layer computes h = W0·x + (alpha / r)·B·A·x with W0 frozen,
A (r x in) Kaiming-initialised, B (out x r) zero-initialised so training starts at the base
model; only A and B are trained (AdamW). Built with peft's LoraConfig, init_lora_weights=True.
"""

from stages.core.settings import LoraSettings
from stages.core.sft import Method, main

from peft import LoraConfig, get_peft_model


def build(model, cfg, ctx):
    config = LoraConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        target_modules=cfg.target_modules, init_lora_weights=True, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


METHOD = Method("lora", build, doc=__doc__, settings=LoraSettings)

if __name__ == "__main__":
    main(METHOD)
