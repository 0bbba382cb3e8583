"""AdaRankGrad: Adaptive Gradient-Rank and Moments for Memory-Efficient LLMs Training and
Fine-Tuning (Refael et al., ICLR 2025; no official code).

Update rule: full fine-tuning (every weight trainable); for each target weight matrix W
(attention and MLP linears), G' its gradient oriented so the projection acts on the smaller side:
    subspace: randomized SVD of G'; r = the smallest of rank_min, rank_min + rank_step, ...,
              rank_max whose top-r subspace leaves a relative residual
              ‖G' − QᵀQG'‖_F / ‖G'‖_F <= η (`information_threshold`; rank_max when none does);
              Q = those r left singular vectors (r x min(m, n), orthonormal rows)
    step:     M, V = Adam moments of QG';  W -= lr·scale·Qᵀ·(M̂ / (√V̂ + eps))
    refresh:  new Q when ‖QG'‖²/‖G'‖² < refresh_threshold (the gradient has left the subspace)
              or every update_proj_gap steps; the moments move into the new basis with
              R = Q_new·Q_oldᵀ: M <- R·M, V <- max(R·V, 0) (--second_moment squared: (R∘R)·V)
Moments of W: 2·r·max(m, n) numbers, at most rank_max / min(m, n) of AdamW's; embeddings and
norms get plain AdamW. Paper defaults (7B-class, hidden 4096): rank_max 128, rank step 8,
gap 200, information threshold η = 0.2 (the seed's adarankgrad4sft.py: xi_threshold 0.2). We read
η as a bound on the relative residual, a norm: the subspace keeps >= 1 − η² = 96% of ‖G'‖_F². The
paper's text was not at hand to settle it; an earlier reading here (the energy the subspace may
lose: keep 80% of ‖G'‖_F², a residual of 0.45) allowed more than twice the residual the seed's
0.2 names. See params.yaml methods.adarankgrad for the SmolLM2 values.
Optimizer: methods/projection.py AdaRankGrad (its docstring has the details).
"""

from dataclasses import dataclass
from types import SimpleNamespace

from methods.projection import AdaRankGrad, projection_groups
from stages.core.settings import LoraSettings, check_not_empty, check_positive, library_check, like, setting
from stages.core.sft import Method, build_tuned, main
from stages.core.strategies import SHARD


@dataclass(kw_only=True)
class AdaRankGradSettings:
    """AdaRankGrad: GaLore-like, the subspace's rank chosen per matrix from how much of its gradient it keeps."""

    rank_min: int = setting(help="smallest rank of a matrix's gradient subspace")
    rank_max: int = setting(help="largest rank (the moments take at most rank_max / min(m, n) of AdamW's)")
    rank_step: int = setting(help="ranks tried: rank_min, rank_min + rank_step, ..., rank_max")
    information_threshold: float = setting(help="the rank kept is the smallest whose subspace leaves a relative residual "
                                                "‖G − QᵀQG‖_F / ‖G‖_F of at most this, in [0, 1)")
    refresh_threshold: float = setting(help="new subspace when less than this fraction of the gradient's energy lies in it, "
                                            "in [0, 1]")
    update_proj_gap: int = setting(help="steps after which a subspace is renewed anyway")
    scale: float = setting(help="the projected matrices' step is lr·scale (embeddings and norms: lr)")
    second_moment: str = setting(help="how V moves into a new basis R = Q_new·Q_oldᵀ: rotate: max(R·V, 0) (the paper's), "
                                      "squared: (R∘R)·V", choices=("rotate", "squared"))
    target_modules: list[str] = like(LoraSettings, "target_modules")

    def __post_init__(self):
        check_positive(self, "scale")
        check_not_empty(self, "target_modules")
        group = {name: getattr(self, name) for name in ("rank_min", "rank_max", "rank_step", "information_threshold", "refresh_threshold",
                                                        "update_proj_gap", "scale", "second_moment")}
        library_check(AdaRankGrad._check_group, group={**group, "params": []})


def build(model, cfg, ctx):
    return build_tuned(model, SimpleNamespace(tuning="full"))


def optimizer(model, cfg, ctx):
    groups = projection_groups(model, cfg.target_modules, cfg.weight_decay, rank_min=cfg.rank_min,
                               rank_max=cfg.rank_max, rank_step=cfg.rank_step,
                               information_threshold=cfg.information_threshold,
                               refresh_threshold=cfg.refresh_threshold, update_proj_gap=cfg.update_proj_gap,
                               scale=cfg.scale, second_moment=cfg.second_moment)
    return AdaRankGrad(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


METHOD = Method("adarankgrad", build, optimizer=optimizer, doc=__doc__, settings=AdaRankGradSettings,
                refuses={"FSDP": f"it projects each weight matrix's whole gradient onto an adaptive-rank subspace; {SHARD}"})

if __name__ == "__main__":
    main(METHOD)
