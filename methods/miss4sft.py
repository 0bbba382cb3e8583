"""MiSS: Matrix Shard Sharing (Kang & Yin, 2024).

Update rule: one small trainable shard D (r x out) is shared by every r-wide slice of the input:
h = W0·x + Dᵀ·Σ_g x_g, where x_g are the consecutive r-sized slices of x, i.e. ΔW tiles Dᵀ across
the input dimension; D starts at 0, so training starts at the base model.
peft: MissConfig(r, init_weights=True).
"""

from dataclasses import dataclass

from stages.core.settings import LoraSettings, check_fraction, check_not_empty, check_positive, like, setting
from stages.core.sft import Method, main

from peft import MissConfig, get_peft_model


@dataclass(kw_only=True)
class MissSettings:
    """MiSS: one r x out shard shared by every r-wide slice of the input."""

    r: int = setting(help="shard height: the input is cut into r-sized slices (must divide in_features)")
    miss_dropout: float = setting(help="dropout on the shard's input, in [0, 1)")
    target_modules: list[str] = like(LoraSettings, "target_modules")

    def __post_init__(self):
        check_positive(self, "r")
        check_fraction(self, "miss_dropout")
        check_not_empty(self, "target_modules")


def build(model, cfg, ctx):
    config = MissConfig(r=cfg.r, miss_dropout=cfg.miss_dropout, target_modules=cfg.target_modules,
                        init_weights=True, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


METHOD = Method("miss", build, doc=__doc__, settings=MissSettings)

if __name__ == "__main__":
    main(METHOD)
