"""OLoRA: Orthonormal Low-Rank Adaptation (Büyükakyüz, 2024).

Update rule: QR-decompose the pretrained weight, W0 = Q·R; the adapter starts on an orthonormal
basis, B = Q[:, :r], A = R[:r, :], and the frozen base becomes W0 − (alpha / r)·B·A, so the model
is unchanged at step 0; A and B train (AdamW) as in LoRA. Saved adapters are converted by peft to
plain LoRA adapters (rank 2r) relative to the original W0.
"""

from stages.core.settings import LoraSettings
from stages.core.sft import Method, main

from peft import LoraConfig, get_peft_model


def build(model, cfg, ctx):
    config = LoraConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        target_modules=cfg.target_modules, init_lora_weights="olora", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


METHOD = Method("olora", build, doc=__doc__, settings=LoraSettings)

if __name__ == "__main__":
    main(METHOD)
