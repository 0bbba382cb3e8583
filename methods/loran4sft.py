"""LoRAN: Low-Rank Adaptation with a Non-linear transformation (seed 004; PEFT-based MLoraConfig).

Update rule: every target linear layer (W0: out x in, frozen) computes
    h = W0·x + (alpha / r0)·f(B·A)·dropout(x),     f(u) = u + A_amp·u·sin(omega·u)  (elementwise)
with B (out x r0) zero-initialised and A (r0 x r1) Kaiming-uniform, so training starts at the base
model; only A and B are trained (AdamW). --r is the seed's list: r=[64, 4096] is the rank and
then the layer's in_features (not a second rank): SmolLM2's q_proj/v_proj take --r 8 576, and 0
stands for each layer's own in_features. --use_P turns the update into a chain
M <- f(M)·P_i (+ b_i with --use_b) over r0, r1, ..., in_features (see methods/loran.py).
Released config: alpha 16, dropout 0.2, A_amp 5e-5, omega 1e4, use_P/use_b off, q_proj + v_proj;
the baseline is LoRA with the same r, alpha and dropout. f(BA) does not depend on x: merging folds
W0 + (alpha / r0)·f(BA) into each layer exactly. Adapters are saved with
stages/core/adapters.save_adapter (kind "loran") and merged by stages/merge.py.
"""

from dataclasses import dataclass

from methods import loran
from stages.core import adapters
from stages.core.settings import LoraSettings, like, setting
from stages.core.sft import Method, main


@dataclass(kw_only=True)
class LoranSettings:
    """LoRAN: LoRA whose update B·A passes through f(u) = u + A_amp·u·sin(omega·u)."""

    r: list[int] = setting(help="the rank r0, then the layer's in_features (0: each layer's own); with use_P more "
                                "entries, the widths of the chain")
    alpha: float = setting(help="scale numerator: the update is (alpha / r0)·f(B·A)")
    dropout: float = setting(help="dropout on the adapter's input, in [0, 1)")
    A_amp: float = setting(help="amplitude A_amp of f(u) = u + A_amp·u·sin(omega·u)")
    omega: float = setting(help="frequency omega of f")
    use_P: bool = setting(help="a chain M <- f(M)·P_i through the widths of r instead of one f(B·A)")
    use_b: bool = setting(help="add a bias row b_i after each step of the chain")
    layers_to_transform: list[int] = setting(help="indices of the blocks that get the adapter; empty: every block")
    target_modules: list[str] = like(LoraSettings, "target_modules")

    def __post_init__(self):
        loran.check_config({key: getattr(self, key) for key in loran.CONFIG_KEYS})


def build(model, cfg, ctx):
    return loran.attach(model, loran.config_from(cfg))


def export(model, path) -> None:
    adapters.save_adapter(model, path, loran.KIND, model.adaptlab_adapter["config"], loran.adapter_names(model))


METHOD = Method("loran", build, doc=__doc__, export=export, merged=loran.merge, settings=LoranSettings)

if __name__ == "__main__":
    main(METHOD)
