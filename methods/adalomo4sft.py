"""AdaLomo: Low-memory Optimization with Adaptive Learning Rate (Lv et al., 2023).

Full-parameter fine-tuning: every weight of the base model is trained. Update rule, per weight θ
at step t (g its gradient, ε1 = 1e-30, ε2 = 1e-3, decay_rate −0.8):
    β2 = 1 − t^decay_rate
    matrix m×n: R = β2·R + (1−β2)·rowmean(g² + ε1);  C = β2·C + (1−β2)·colmean(g² + ε1)
                V̂ = R·Cᵀ / mean(R)                   (factored second moment: m + n floats)
    vector:     V̂ = β2·V̂ + (1−β2)·(g² + ε1)
    U = g / √V̂;   U = U / max(1, RMS(U)/clip_threshold)  (grouped update normalisation)
    α = lr · max(ε2, RMS(θ));   θ = θ·(1 − α·weight_decay) − α·U
The update is applied inside backward: a post-accumulate-grad hook updates each weight as soon as
its gradient is complete and frees that gradient, so no full set of gradients is ever stored and
the optimizer state is O(m + n) per matrix (memory ≈ weights + activations + one gradient).
Global gradient clipping is replaced by the grouped normalisation (max_grad_norm 0; > 0 runs
LOMO's two-backward clipping). --grad_accum must be 1; fp16 mixed precision is refused.
Optimizer and train step: methods/adalomo.py (AdaLomo, adalomo_step).
"""

from dataclasses import dataclass

from methods.adalomo import adalomo_step, build_adalomo
from stages.core.errors import fail
from stages.core.settings import check_non_negative, check_positive, setting
from stages.core.sft import Method, main
from stages.core.strategies import SHARD


@dataclass(kw_only=True)
class AdaLomoSettings:
    """AdaLomo: full-parameter tuning, the Adafactor-like update fused into backward."""

    eps: list[float] = setting(help="ε1 ε2: ε1 added to g² in the second moment, ε2 the floor of RMS(θ) in the step size")
    clip_threshold: float = setting(help="grouped update normalisation: U /= max(1, RMS(U) / clip_threshold)")
    decay_rate: float = setting(help="β2 at step t is 1 − t^decay_rate (Adafactor's schedule); negative")
    clip_grad_value: float = setting(help="clip each gradient entry to ±clip_grad_value; 0: off")

    def __post_init__(self):
        if len(self.eps) != 2 or min(self.eps) < 0:
            fail(f"--eps must be two numbers >= 0 (ε1 ε2), got {self.eps}")
        if self.decay_rate >= 0:
            fail(f"--decay_rate must be negative (β2 = 1 − t^decay_rate), got {self.decay_rate}")
        check_positive(self, "clip_threshold")
        check_non_negative(self, "clip_grad_value")


def build(model, cfg, ctx):
    """Full-parameter tuning: every weight of the base model is trained."""
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def optimizer(model, cfg, ctx):
    return build_adalomo(model, cfg)


METHOD = Method("adalomo", build, optimizer=optimizer, train_step=adalomo_step, doc=__doc__, settings=AdaLomoSettings,
                refuses={"FSDP": f"it updates each weight inside backward from its whole gradient (fused hooks, row and column moments); {SHARD}"})

if __name__ == "__main__":
    main(METHOD)
