"""CorDA KPA, knowledge-preserved adaptation (Yang et al., NeurIPS 2024): the r SMALLEST components of SVD(W·C) train, C from a knowledge-QA task's questions.

The corda_kpa row of dvc.yaml; the method, its update rule and options are in corda4sft.py:
    python methods/build_corda.py --model_id models/base ... --save_model --save_path <dir>
    python methods/corda_kpa4sft.py --init models/init/corda_kpa
"""

from corda4sft import corda_method, run

METHOD = corda_method("corda_kpa")

if __name__ == "__main__":
    run(default="corda_kpa")
