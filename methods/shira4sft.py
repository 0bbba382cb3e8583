"""SHiRA: Sparse High-Rank Adapters (Bhardwaj et al., NeurIPS 2024).

Update rule: a fixed sparse mask M over each target weight (r·(in + out) entries, chosen at
random with a seed) selects the only entries that train: W = W0 + M ⊙ S, S starting at 0; the
update is high-rank yet touches ~1-2% of the weights, so switching adapters is a sparse scatter.
peft: ShiraConfig(r, mask_type="random", random_seed).
"""

from dataclasses import dataclass

from stages.core.settings import LoraSettings, check_not_empty, check_positive, like, setting
from stages.core.sft import Method, main

from peft import ShiraConfig, get_peft_model


@dataclass(kw_only=True)
class ShiraSettings:
    """SHiRA: a fixed random sparse set of trainable entries in each target weight."""

    r: int = setting(help="sparsity as LoRA's rank: each weight trains r·(in + out) entries")
    target_modules: list[str] = like(LoraSettings, "target_modules")

    def __post_init__(self):
        check_positive(self, "r")
        check_not_empty(self, "target_modules")


def build(model, cfg, ctx):
    config = ShiraConfig(r=cfg.r, mask_type="random", random_seed=cfg.seed, target_modules=cfg.target_modules,
                         task_type="CAUSAL_LM")
    return get_peft_model(model, config)


METHOD = Method("shira", build, doc=__doc__, settings=ShiraSettings)

if __name__ == "__main__":
    main(METHOD)
