"""Stage: merge a trained adapter into its base model -> a plain transformers folder.

Same interface as the papers' merge_adapter_to_base_model.py:
    python stages/merge.py --base_model models/base --adapter runs/lora-default/final --output_path merged/lora-default
or, for a run folder written by a method script (its base model is read from train_config.json,
so CorDA merges onto its decomposed model):
    python stages/merge.py --run runs/lora-default --output_path merged/lora-default
The merged model's logits equal those of base + adapter (checked by the tests). An adapter that
cannot be folded into the weights (LoRETTA's non-linear bottleneck adapters) is written as the
base weights plus the adapter files; stages/core/models.load_model attaches it again. A folder of full
weights (a method that trains the base model itself) is copied as it is. With --run, the merged
folder also gets prompt_format.json (whether the run trained through the chat template), so
stages/evaluate.py prompts the model the way it was trained.
"""

import argparse
import shutil
from pathlib import Path

from stages.core.adapters import is_saved_adapter, save_merged
from stages.core.config import OneLineParser
from stages.core.errors import cli_entry, fail
from stages.core.evaluation import PROMPT_FORMAT_FILE
from stages.core.io import atomic_dir, atomic_write_json, read_json
from stages.core.models import compute_device, copy_tokenizer, load_model


def merge(base_model: str, adapter: str, output_path: str, dtype: str = "float32",
          chat_template: bool | None = None) -> Path:
    from peft import PeftModel

    adapter_dir = Path(adapter)
    if not adapter_dir.is_dir():
        fail(f"adapter '{adapter}' does not exist: expected a folder saved by a method script")
    with atomic_dir(output_path) as tmp:
        if (adapter_dir / "adapter_config.json").is_file():
            try:
                model = PeftModel.from_pretrained(load_model(base_model, dtype, compute_device()), str(adapter_dir))
            except (OSError, ValueError, RuntimeError) as err:
                fail(f"cannot load adapter '{adapter}': {str(err).splitlines()[0]}")
            model.merge_and_unload().save_pretrained(tmp, safe_serialization=True)
        elif is_saved_adapter(adapter_dir):  # an adapter no library carries (stages/core/adapters.py)
            # folded into the weights, or (a non-linear adapter: LoRETTA's bottleneck adapters) base
            # weights + adapter files, which models.load_model attaches again
            save_merged(load_model(base_model, dtype, compute_device()), adapter_dir, tmp)
        elif (adapter_dir / "config.json").is_file():
            shutil.copytree(adapter_dir, tmp, dirs_exist_ok=True)
        else:
            fail(f"'{adapter}' holds neither adapter_config.json, adaptlab_adapter.json nor config.json: expected a saved adapter or model")
        copy_tokenizer(base_model, tmp)
        if chat_template is not None:
            atomic_write_json(tmp / PROMPT_FORMAT_FILE, {"chat_template": chat_template})
    return Path(output_path)


@cli_entry
def main(argv=None) -> None:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="run folder of a method script: merges its final adapter onto its base model")
    parser.add_argument("--base_model", help="base model folder (the decomposed model for CorDA)")
    parser.add_argument("--adapter", help="adapter folder saved by a method script")
    parser.add_argument("--output_path", required=True, help="where to write the merged model")
    parser.add_argument("--dtype", default="float32", help="dtype to merge and save in")
    args = parser.parse_args(argv)
    chat_template = None
    if args.run:
        config = Path(args.run) / "train_config.json"
        if not config.is_file():
            fail(f"--run '{args.run}' has no train_config.json: expected a folder written by a method script")
        run_config = read_json(config)
        args.base_model = args.base_model or run_config["base_model"]
        args.adapter = args.adapter or str(Path(args.run) / "final")
        chat_template = bool(run_config.get("chat_template", False))
    if not (args.base_model and args.adapter):
        fail("give --run, or both --base_model and --adapter")
    print(f"merged model written to {merge(args.base_model, args.adapter, args.output_path, args.dtype, chat_template)}")


if __name__ == "__main__":
    main()
