"""MeZO: Fine-Tuning Language Models with Just Forward Passes (Malladi et al., NeurIPS 2023).

Update rule (ZO-SGD with the seed trick): each step draws a seed s; z ~ N(0, I) is regenerated
from s parameter by parameter and never stored, so memory is that of inference:
    θ += εz;  ℓ+ = L(θ);  θ −= 2εz;  ℓ− = L(θ);  θ += εz          (restore)
    g = (ℓ+ − ℓ−) / 2ε;   θ −= lr·(g·z + wd·θ)                 (no decay on biases and norms)
Two forward passes per step (eval mode, no autograd, no .grad), one scalar g all-reduced across
processes. --tuning full trains every weight of the base model (paper: ε 1e-3, lr 1e-6..1e-7 on
13B models; SmolLM2-135M: lr 3e-6); --tuning lora trains only a LoRA's A and B (paper: ε 1e-2,
lr 1e-4; SmolLM2-135M: --zo_eps 1e-2 --lr 3e-4, 1e-3 diverges). ZO needs far more steps than
first-order training: see params.yaml methods.mezo.
Optimizer: methods/zeroth_order.py MeZO; train step: zeroth_order_step.
"""

from dataclasses import dataclass

from methods.zeroth_order import MeZO, ZerothOrderSettings, zeroth_order_step
from stages.core.settings import TunedSettings
from stages.core.sft import Method, build_tuned, main, weight_decay_groups
from stages.core.strategies import ZEROTH_ORDER_SHARD


@dataclass(kw_only=True)
class MezoSettings(ZerothOrderSettings, TunedSettings):
    """MeZO: ZO-SGD on every weight or on a LoRA."""

    def __post_init__(self):
        TunedSettings.__post_init__(self)
        ZerothOrderSettings.__post_init__(self)


def build(model, cfg, ctx):
    return build_tuned(model, cfg)


def optimizer(model, cfg, ctx):
    return MeZO(weight_decay_groups(model, cfg.weight_decay), lr=cfg.lr, eps=cfg.zo_eps, weight_decay=cfg.weight_decay)


METHOD = Method("mezo", build, optimizer=optimizer, train_step=zeroth_order_step, doc=__doc__, settings=MezoSettings,
                refuses={"FSDP": ZEROTH_ORDER_SHARD})

if __name__ == "__main__":
    main(METHOD)
