"""CorDA IPA, instruction-previewed adaptation (Yang et al., NeurIPS 2024): the r LARGEST components of SVD(W·C) train, C from the fine-tuning task.

The corda_ipa row of dvc.yaml; the method, its update rule and options are in corda4sft.py:
    python methods/build_corda.py --model_id models/base --first_eigen ... --save_model --save_path <dir>
    python methods/corda_ipa4sft.py --init models/init/corda_ipa
"""

from corda4sft import corda_method, run

METHOD = corda_method("corda_ipa")

if __name__ == "__main__":
    run(default="corda_ipa")
