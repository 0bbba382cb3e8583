"""CIMEO, unsupervised pretraining form (cimeo4pretrain.py): the same sparse continual update as
cimeo4sft.py, on plain text.

Update rule (identical to cimeo4sft.py): per task c, the index set I_c of every target matrix W
is the `density` fraction of entries whose |∂L/∂W| is most often in W's top `density` fraction
over the task's batches on the base model (strategy max; min / random also available); training
task c, SparseAdamW updates W[I_c] only — g = ∇W[I_c], moments of size |I_c|, decoupled decay and
the Adam step on W[I_c] — and leaves every other entry of W unchanged; unmasked parameters follow
--dense (all: dense AdamW on norms and the tied embedding, as the authors' code).

This form: the causal-LM loss on ALL tokens of the task text (prompt + " " + answer + EOS, no
chat template; stages/core/cimeo.py encode_pretrain), and the masks are ranked on that loss too.
Its params section is methods.cimeo_pretrain (its dvc row `cimeo_pretrain` runs
methods/cimeo_pretrain4sft.py, which only calls this script's METHOD). Masks: as cimeo4sft.py
(--masks, the starting model's cimeo_masks folder, or computed in-process), built with
--objective pretrain.
"""

from stages.core.cimeo import make_method
from stages.core.sft import main

METHOD = make_method("cimeo_pretrain", "pretrain", __doc__)

if __name__ == "__main__":
    main(METHOD)
