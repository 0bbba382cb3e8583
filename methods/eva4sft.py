"""EVA: Explained Variance Adaptation (Paischer et al., 2024).

Update rule: before training, feed calibration batches (here: the first task's training rows)
and take, per target layer, the top right-singular vectors of its input activations X
(incremental SVD, stopped once successive estimates agree to cosine similarity tau). A is
initialised with them, B = 0; ranks are redistributed across layers by explained variance with
a budget of rho·r per layer. Training then proceeds as LoRA (AdamW on A, B).
peft: LoraConfig(init_lora_weights="eva", eva_config=EvaConfig(rho, tau)) +
initialize_lora_eva_weights(model, dataloader).
"""

from dataclasses import dataclass

from stages.core.settings import LoraSettings, check_positive, library_check, setting
from stages.core.sft import Method, main

from peft import EvaConfig, LoraConfig, get_peft_model, initialize_lora_eva_weights


@dataclass(kw_only=True)
class EvaSettings(LoraSettings):
    """EVA: LoRA's A started on the top singular vectors of each layer's inputs."""

    rho: float = setting(help="rank budget: a layer may get up to rho·r ranks by explained variance (>= 1)")
    tau: float = setting(help="stop the incremental SVD once successive estimates agree to this cosine similarity, in [0, 1]")
    calib_samples: int = setting(help="calibration rows, the first of the sequence's first task")
    calib_batch_size: int = setting(help="calibration rows per batch")

    def __post_init__(self):
        super().__post_init__()
        check_positive(self, "calib_samples", "calib_batch_size")
        library_check(EvaConfig, "EVA settings: ", rho=self.rho, tau=self.tau)


def build(model, cfg, ctx):
    config = LoraConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                        target_modules=cfg.target_modules, init_lora_weights="eva", task_type="CAUSAL_LM",
                        eva_config=EvaConfig(rho=cfg.rho, tau=cfg.tau))
    model = get_peft_model(model, config, low_cpu_mem_usage=True)
    batches = ctx.calibration_batches(cfg.calib_samples, cfg.calib_batch_size)
    initialize_lora_eva_weights(model, batches)
    return model


METHOD = Method("eva", build, doc=__doc__, settings=EvaSettings)

if __name__ == "__main__":
    main(METHOD)
