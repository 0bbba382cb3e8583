"""DoRA: Weight-Decomposed Low-Rank Adaptation (Liu et al., ICML 2024).

Update rule: each target weight is split into magnitude and direction,
    W' = m · (W0 + (alpha / r)·B·A) / ||W0 + (alpha / r)·B·A||_c
with m (1 x out) initialised to the column norms ||W0||_c, B = 0, A Kaiming; m, A and B train
(AdamW), W0 stays frozen. peft: LoraConfig(use_dora=True).
"""

from stages.core.settings import LoraSettings
from stages.core.sft import Method, main

from peft import LoraConfig, get_peft_model


def build(model, cfg, ctx):
    config = LoraConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        target_modules=cfg.target_modules, use_dora=True, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


METHOD = Method("dora", build, doc=__doc__, settings=LoraSettings)

if __name__ == "__main__":
    main(METHOD)
