"""CIMEO, pretraining form: the cimeo_pretrain row of dvc.yaml; the method is in cimeo4pretrain.py."""

from cimeo4pretrain import METHOD

from stages.core.sft import main

if __name__ == "__main__":
    main(METHOD)
