"""CIMEO: cognition-specific sparse continual fine-tuning, in its two forms (--objective).

Update rule. Before training, every task c of the sequence gets an index set I_c per masked
parameter: on the base model, forward/backward over the task's training rows batch by batch,
count per entry how often |∂L/∂W| is in the top `density` fraction of W (strategy max; min:
bottom fraction; random: a seeded random subset), and keep the floor(density·|W|) entries counted
most often. Tasks are then trained in sequence on the full-weight model; while training task c,
SparseAdamW updates only W[I_c]: g = ∇W[I_c], moments m, v of size |I_c| only, decoupled weight
decay and the Adam step on W[I_c] alone,
    W[I_c] ← W[I_c]·(1 − lr·wd) − lr·m̂ / (√v̂ + eps),
and every other entry of W stays bit for bit as it was.

What is masked and what is dense, as the authors' code (their find_index.py and adamw.py): every
parameter but the embedding and the LM head carries a mask (--masked all: attention and MLP
matrices, and the norms and biases too, each at `density`), the tied embedding / LM head trains
densely (--dense all), and Adam's eps is 1e-5 (--adam_eps, their adam_epsilon). --masked matrices
masks only the target linears (q/k/v/o/gate/up/down); then --dense all also trains the norms
densely, --dense norms trains only the norms (1-D parameters) densely, and --dense none changes
nothing but the masked entries. Seed setting: Qwen2.5-1.5B, lr 1e-5 cosine, one epoch per task.

Forms: --objective sft (methods.cimeo): the loss on the answer, in the sequence's prompt format
like every other row of its table: through the tokenizer's chat template (user turn = prompt,
assistant turn = answer) on a sequence with chat_template (the cognition table, as the authors'
SFT script), else after the plain prompt; --objective pretrain (methods.cimeo_pretrain, a params
section naming this script): the plain text, the loss on every token of prompt + answer (plain
sequences only). The masks are ranked on the same loss and encoding as training.

Masks come from (first found): --masks DIR (written by methods/build_cimeo_masks.py); the
decompose stage's folder given as --base_model (build_cimeo_masks.py --save_model); else they are computed in-process on the base model into the run's work dir
(--mask_batches, --mask_batch_size). A mask that is missing, or was built for another model or
with another strategy / density / objective / masked set / prompt format, is refused before training starts.

Memory: the moments hold density x the masked parameters (plus the dense parameters); gradients
are still computed densely by autograd. The core's clipping (--max_grad_norm) sees the whole gradient.
"""

from dataclasses import dataclass

from methods import cimeo
from stages.core.settings import LoraSettings, like, setting
from stages.core.sft import main


@dataclass(kw_only=True)
class CimeoSettings:
    """CIMEO: sparse AdamW on each task's gradient-frequency mask of the target matrices."""

    objective: str = setting(help="sft: through the chat template, the loss on the answer; pretrain: plain text, the loss "
                                  "on every token", choices=cimeo.OBJECTIVES)
    strategy: str = setting(help="the entries a task trains: max: most often in the top density fraction of |∂L/∂W|, "
                                 "min: least often, random: a seeded random subset", choices=cimeo.STRATEGIES)
    density: float = setting(help="fraction of each target matrix a task trains, in (0, 1]")
    masks: str = setting(help="a folder written by methods/build_cimeo_masks.py; empty: the decompose stage's, else "
                              "computed in-process")
    mask_batches: int = setting(help="batches of each task's training rows that rank the entries; 0: all rows")
    mask_batch_size: int = setting(help="rows per batch when ranking the entries")
    masked: str = setting(help="what carries a mask: all: every parameter but the embedding / LM head, norms too (the "
                               "authors' code); matrices: the target linear layers only", choices=cimeo.MASKED_CHOICES)
    dense: str = setting(help="what trains densely besides the masked entries: all: the tied embedding / LM head (and, "
                              "with masked matrices, the norms), norms: norms only, none: nothing", choices=cimeo.DENSE_CHOICES)
    adam_eps: float = setting(help="Adam's epsilon (the authors' 1e-5)")
    target_modules: list[str] = like(LoraSettings, "target_modules")

    def __post_init__(self):
        cimeo.check_method_settings(self)


METHOD = cimeo.make_method(__doc__, CimeoSettings)

if __name__ == "__main__":
    main(METHOD)
