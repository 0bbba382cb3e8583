"""Bone: Block Affine Transformation (Kang, 2024) — its "Bat" form.

Update rule: W0 is cut into r x r blocks W_ij; output block row i owns one trainable r x r block
D_i, shared by all its blocks, and every block is updated by a block-affine map of itself,
    W_ij <- W_ij + W_ij·D_i + D_i,
so the adapter interacts with the pretrained weights instead of adding an independent low-rank
product; D starts at 0 (training starts at the base model). r must divide in and out features.
peft dropped the Bone tuner: its Bat form lives on as MissConfig(init_weights="bat").
"""

from dataclasses import dataclass

from stages.core.settings import LoraSettings, check_not_empty, check_positive, like, setting
from stages.core.sft import Method, main

from peft import MissConfig, get_peft_model


@dataclass(kw_only=True)
class BoneSettings:
    """Bone: one trainable r x r block per output block row."""

    r: int = setting(help="block size: r x r blocks; must divide the target layers' in and out features")
    target_modules: list[str] = like(LoraSettings, "target_modules")

    def __post_init__(self):
        check_positive(self, "r")
        check_not_empty(self, "target_modules")


def build(model, cfg, ctx):
    config = MissConfig(r=cfg.r, target_modules=cfg.target_modules, init_weights="bat", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


METHOD = Method("bone", build, doc=__doc__, settings=BoneSettings)

if __name__ == "__main__":
    main(METHOD)
