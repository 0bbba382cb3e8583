"""PiSSA: Principal Singular values and Singular vectors Adaptation (Meng et al., NeurIPS 2024).

Update rule: W0 = U S Vᵀ; the adapter starts on the principal part, A = S[:r]^½ Vᵀ[:r],
B = U[:, :r] S[:r]^½, and the frozen base becomes the residual W_res = W0 − B·A, so the model is
unchanged at step 0; A and B train (AdamW) as in LoRA. init "pissa_niter_K" uses a fast
randomised SVD with K subspace iterations. Saved adapters are converted by peft to plain LoRA
adapters (rank 2r) relative to the original W0, so any LoRA tooling can merge them.
"""

from dataclasses import dataclass

from stages.core.settings import LoraSettings, check_non_negative, setting
from stages.core.sft import Method, main

from peft import LoraConfig, get_peft_model


@dataclass(kw_only=True)
class PissaSettings(LoraSettings):
    """PiSSA: LoRA started on the principal singular vectors."""

    svd_niter: int = setting(help="subspace iterations of the fast randomised SVD (peft's pissa_niter_K); 0: exact SVD")

    def __post_init__(self):
        super().__post_init__()
        check_non_negative(self, "svd_niter")


def build(model, cfg, ctx):
    init = "pissa" if cfg.svd_niter == 0 else f"pissa_niter_{cfg.svd_niter}"
    config = LoraConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        target_modules=cfg.target_modules, init_lora_weights=init, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


METHOD = Method("pissa", build, doc=__doc__, settings=PissaSettings)

if __name__ == "__main__":
    main(METHOD)
