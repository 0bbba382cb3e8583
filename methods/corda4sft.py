"""CorDA: Context-Oriented Decomposition Adaptation (Yang et al., NeurIPS 2024).

Update rule: for every target linear layer W (out x in), C = mean XᵀX over calibration samples
of a context; SVD(W·C) = U Σ Vᵀ, so W = [U Σ Vᵀ C⁻¹] (C damped: + d·mean(diag C)·I until it
inverts safely). KPA, knowledge-preserved adaptation (peft "kpm"; calibrated on the questions
of a knowledge QA task that is never trained on, whose test rows then measure how much of that
knowledge survives: params knowledge_qa, the default table's held-out column), puts the r
SMALLEST components in the trainable adapter,
B = U_r Σ_r^½, A = Σ_r^½ (Vᵀ C⁻¹)_r, and freezes the rest, keeping the directions the world
knowledge context uses most; IPA, instruction-previewed adaptation (peft "ipm", --first_eigen;
calibrated on the fine-tuning task), puts the r LARGEST. The frozen base is the residual
W − B·A, so the model is unchanged at step 0; then AdamW on A and B as in LoRA
(h = W_res·x + (alpha/r)·B·A·x).

The decomposition is its own step (methods/build_corda.py, run by the decompose stage from the
row's `decompose:` params); this script trains from what it saved. Two rows read it: KPA
(methods.corda_kpa, the default) and IPA (methods.corda_ipa):
    python stages/decompose.py --method corda_ipa --out models/init/corda_ipa
    python methods/corda4sft.py --method corda_ipa --base_model models/init/corda_ipa
The decompose folder's init.json names the decomposed model (the residual weights, the run's
base model); its initial adapter <model>/corda_init is loaded trainable with plain peft. Saved
adapters are plain LoRA adapters relative to the decomposed model: merge them onto it
(stages/merge.py --run runs/<run> reads it from train_config.json), never onto the original base.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from stages.core.errors import fail
from stages.core.settings import LoraSettings, like
from stages.core.sft import Method, main


@dataclass(kw_only=True)
class CordaSettings(LoraSettings):
    """CorDA: the LoRA its decompose stage built; r, lora_alpha, target_modules must agree with it (none: its own)."""

    r: int | None = like(LoraSettings, "r", None)
    lora_alpha: int | None = like(LoraSettings, "lora_alpha", None)
    lora_dropout: float | None = like(LoraSettings, "lora_dropout", None)
    target_modules: list[str] | None = like(LoraSettings, "target_modules", None)


def build(model, cfg, ctx):
    from peft import LoraConfig, PeftModel

    init = Path(cfg.base_model) / "corda_init"
    if not (init / "adapter_config.json").is_file():
        fail(f"'{cfg.base_model}' is not a CorDA decomposed model (no corda_init/adapter_config.json): run "
             f"`python stages/decompose.py --method {cfg.method} --out models/init/{cfg.method}` and pass --base_model "
             f"models/init/{cfg.method}")
    config = LoraConfig.from_pretrained(str(init))
    # The adapter's shape was fixed by the decomposition: params that disagree mean a stale model.
    expected = {"r": config.r, "lora_alpha": config.lora_alpha, "target_modules": config.target_modules}
    for key, saved in expected.items():
        wanted = getattr(cfg, key, None)
        if wanted is None:
            continue
        same = set(wanted) == set(saved) if key == "target_modules" else float(wanted) == float(saved)
        if not same:
            fail(f"methods.{cfg.method}.{key} is {wanted} but the decomposed model in {cfg.base_model} was built "
                 f"with {key} {sorted(saved) if key == 'target_modules' else saved}: rerun its decompose stage "
                 f"(params decompose.args) or make the two agree")
    if getattr(cfg, "lora_dropout", None) is not None:
        config.lora_dropout = cfg.lora_dropout
    return PeftModel.from_pretrained(model, str(init), config=config, is_trainable=True)


METHOD = Method("corda", build, doc=__doc__, default_method="corda_kpa", settings=CordaSettings)

if __name__ == "__main__":
    main(METHOD)
