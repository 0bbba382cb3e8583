"""RoAd: 2D Rotary Adaptation (Liao & Monz, NeurIPS 2024).

Update rule: the frozen layer's output h = W0·x is rotated in 2D pairs: within each group of
group_size outputs, element i is paired with element i + group_size/2 and
    (h_i, h_j) <- (α_i cos θ_i · h_i − α_i sin θ_i · h_j,  α_j sin θ_j · h_i + α_j cos θ_j · h_j),
with trainable scales α and angles θ starting at α = 1, θ = 0 (identity). road_1 shares one
(α, θ) per pair (out_features parameters per layer), road_2 gives each element its own, road_4
two of each. out_features must be divisible by group_size. lr ~1e-3. peft: RoadConfig.
"""

from dataclasses import dataclass

from stages.core.settings import LoraSettings, check_not_empty, library_check, like, setting
from stages.core.sft import Method, main

from peft import RoadConfig, get_peft_model


@dataclass(kw_only=True)
class RoadSettings:
    """RoAd: trainable 2D rotations (scale α, angle θ) of the frozen layer's outputs."""

    variant: str = setting(help="road_1: one (α, θ) per pair of outputs; road_2: one per output; road_4: two per output",
                           choices=("road_1", "road_2", "road_4"))
    group_size: int = setting(help="outputs per rotation group, paired i with i + group_size/2; even, divides out_features")
    target_modules: list[str] = like(LoraSettings, "target_modules")

    def __post_init__(self):
        check_not_empty(self, "target_modules")
        library_check(RoadConfig, "RoAd settings: ", variant=self.variant, group_size=self.group_size,
                      target_modules=self.target_modules)


def build(model, cfg, ctx):
    config = RoadConfig(variant=cfg.variant, group_size=cfg.group_size, target_modules=cfg.target_modules,
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


METHOD = Method("road", build, doc=__doc__, settings=RoadSettings)

if __name__ == "__main__":
    main(METHOD)
