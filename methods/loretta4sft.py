"""LoRETTA: Low-Rank Economic Tensor-Train Adaptation (Yang et al., NAACL 2024; seed 003).

Update rule: the trained matrices are tensor trains. A matrix (out x in) is reshaped into a tensor
over factorisations of out and in (576 -> 8·8·9; --tt_shapes) held as cores G_i (r_{i-1} x k_i x
r_i) of TT-rank --tt_rank (5): sum r_{i-1}·k_i·r_i numbers instead of out·in.
  --tuning_type loretta_rep: LoRA with TT-factorised A and B on --target_modules,
      h = W0·x + (lora_alpha / r)·B·A·dropout(x)                 (r 8, alpha 16; merges exactly)
  --tuning_type loretta_adp: a TT bottleneck adapter after attention and after the FFN
      (--adapter_modules o_proj down_proj), h <- h + s·Up(sigma(Down(h))), bottleneck 64, relu,
      with every normalisation layer trainable too (non-linear: merged as base + adapter)
B's and Up's last cores start at zero, so training starts at the base model.
  --trainer adam:    AdamW on the cores (backpropagation)
  --trainer zo:      MeZO, ZO-SGD: theta -= lr·g·z, g = [L(theta + eps·z) − L(theta − eps·z)] / 2eps
                     (methods/zeroth_order.py MeZO and zeroth_order_step; --zo_eps)
  --trainer zo_adam: ZO-Adam, Adam's moments fed with the same estimate g·z (ZOAdam)
ZO trainers need many more steps and full precision (--mixed_precision no).
Layers: methods/loretta.py, methods/tensor_train.py; saved with
stages/core/adapters.save_adapter (kind "loretta") and merged by stages/merge.py.
"""

from dataclasses import dataclass

from methods import loretta
from methods.zeroth_order import MeZO, ZerothOrderSettings, ZOAdam, zeroth_order_step
from stages.core import adapters
from stages.core.settings import setting
from stages.core.sft import Method, StepInputs, adamw, first_order_step, main, weight_decay_groups


@dataclass(kw_only=True)
class LorettaSettings(ZerothOrderSettings, loretta.LorettaLayerSettings):
    """LoRETTA: tensor-train adapters, trained by Adam or zeroth-order."""

    trainer: str = setting(help="adam: AdamW by backpropagation; zo: MeZO's ZO-SGD; zo_adam: Adam fed with the zeroth-order "
                                "estimate (zo_eps applies to the zo trainers)", choices=loretta.TRAINERS)

    def __post_init__(self):
        loretta.LorettaLayerSettings.__post_init__(self)
        ZerothOrderSettings.__post_init__(self)


def build(model, cfg, ctx):
    return loretta.attach(model, loretta.config_from(cfg))


def optimizer(model, cfg, ctx):
    if cfg.trainer == "zo":
        return MeZO(weight_decay_groups(model, cfg.weight_decay), lr=cfg.lr, eps=cfg.zo_eps, weight_decay=cfg.weight_decay)
    if cfg.trainer == "zo_adam":
        return ZOAdam(weight_decay_groups(model, cfg.weight_decay), lr=cfg.lr, eps=cfg.zo_eps, weight_decay=cfg.weight_decay)
    return adamw(model, cfg, ctx)


def train_step(step: StepInputs) -> float:
    """Two forward passes for the zeroth-order trainers, forward + backward for Adam."""
    if step.cfg.trainer in loretta.ZEROTH_ORDER_TRAINERS:
        return zeroth_order_step(step)
    return first_order_step(step)


def export(model, path) -> None:
    adapters.save_adapter(model, path, loretta.KIND, model.adaptlab_adapter["config"], loretta.adapter_names(model))


METHOD = Method("loretta", build, optimizer=optimizer, train_step=train_step, doc=__doc__, export=export,
                merged=loretta.merge, settings=LorettaSettings,
                refuses={"FSDP": "its zeroth-order trainers perturb whole tensors between forward passes, and its "
                                 "tensor-train factors are read whole to build each layer's update"})

if __name__ == "__main__":
    main(METHOD)
