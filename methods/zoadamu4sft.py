"""ZO-AdaMU: Adapting Perturbation by the Momentum and Uncertainty in Zeroth-order Optimization
(Jiang et al., AAAI 2024), Algorithm 1.

Update rule: MeZO's two-forward-pass estimate, but the perturbation carries momentum. Per step t,
per parameter (noise regenerated from the step's seed, never stored):
    ż ~ N(0, √α),  z̈ ~ N(m_{t−1}, √(1−α))       (second argument = standard deviation)
    m_t = β1·ż + (1 − β1)·z̈
    g = [L(θ + ε·m_t) − L(θ − ε·m_t)] / 2ε
    v_t = β2·ż² + (1 − β2)·z̈²
    θ −= η·(g·m_t / √(v_t + 1e-8) + wd·θ)
α, β1, β2 are simulated-annealed: 1 before T1, a half cosine to (alpha_end, beta1_end,
beta2_end) over T1..T2, then constant. T1, T2 are given as fractions of steps_per_task
(anneal_start, anneal_end; the paper's (1024, 16000) of 20k steps is (0.05, 0.8)). The
momentum m_{t−1} is a per-parameter state tensor (unlike MeZO); v is not carried over.
--tuning lora (the zoadamu row; the ZO-AdaMU paper's LoRA setting lr 1e-2, ε 1e-1 diverges on
SmolLM2-135M: lr 3e-4, ε 1e-2 there) or --tuning full (the zoadamu_full row: MeZO's full-weight
ε 1e-3 and lr 3e-6). CIMEO's Table 1 compares against full-weight ZO-AdaMU: its seed's
ZOAdamu4sft.py applies no adapter (lr 1e-5, cosine, Qwen2.5-1.5B); the CIMEO paper's own text is
not public, so that script is the source. Its table (params tables.cognition) shows both rows.
Optimizer: methods/zeroth_order.py ZOAdaMU; train step: zeroth_order_step.
"""

from dataclasses import dataclass

from methods.zeroth_order import ZerothOrderSettings, ZOAdaMU, zeroth_order_step
from stages.core.errors import fail
from stages.core.settings import TunedSettings, setting
from stages.core.sft import Method, build_tuned, main, weight_decay_groups
from stages.core.strategies import ZEROTH_ORDER_SHARD


@dataclass(kw_only=True)
class ZoAdamuSettings(ZerothOrderSettings, TunedSettings):
    """ZO-AdaMU: MeZO with a momentum perturbation and simulated-annealed α, β1, β2."""

    anneal_start: float = setting(help="T1 as a fraction of steps_per_task: α, β1, β2 stay 1 before it")
    anneal_end: float = setting(help="T2 as a fraction of steps_per_task: the half cosine to the *_end values ends there")
    alpha_end: float = setting(help="α after T2, in [0, 1]: the variance of the fresh noise ż (z̈'s is 1 − α)")
    beta1_end: float = setting(help="β1 after T2, in (0, 1]: ż's weight in the perturbation m_t (z̈'s is 1 − β1)")
    beta2_end: float = setting(help="β2 after T2, in [0, 1]: ż²'s weight in v_t (z̈²'s is 1 − β2)")

    def __post_init__(self):
        TunedSettings.__post_init__(self)
        ZerothOrderSettings.__post_init__(self)
        if not 0 <= self.anneal_start <= self.anneal_end <= 1:
            fail(f"need 0 <= --anneal_start <= --anneal_end <= 1, got {self.anneal_start}, {self.anneal_end}")
        if not (0 <= self.alpha_end <= 1 and 0 < self.beta1_end <= 1 and 0 <= self.beta2_end <= 1):
            fail("--alpha_end and --beta2_end must be in [0, 1], --beta1_end in (0, 1] (β1 = 0 makes m a random walk)")


def build(model, cfg, ctx):
    return build_tuned(model, cfg)


def optimizer(model, cfg, ctx):
    steps = (round(cfg.anneal_start * cfg.steps_per_task), round(cfg.anneal_end * cfg.steps_per_task))
    return ZOAdaMU(weight_decay_groups(model, cfg.weight_decay), lr=cfg.lr, eps=cfg.zo_eps, weight_decay=cfg.weight_decay,
                   anneal_steps=steps, alpha_end=cfg.alpha_end, beta1_end=cfg.beta1_end, beta2_end=cfg.beta2_end)


METHOD = Method("zoadamu", build, optimizer=optimizer, train_step=zeroth_order_step, doc=__doc__, settings=ZoAdamuSettings,
                refuses={"FSDP": ZEROTH_ORDER_SHARD})

if __name__ == "__main__":
    main(METHOD)
