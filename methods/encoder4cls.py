"""Sequence classification on an encoder: LoRETTA's BERT/DeBERTa path (Yang et al., NAACL 2024),
on the MiniLM-L6 encoder of the encoder table.

Update rule: the encoder gets a new classification head over the task's choices and, by --kind,
trains every weight (full), a peft LoRA on --target_modules (h = W0·x + (alpha/r)·B·A·x), or
LoRETTA's tensor-train layers (methods/loretta.py: loretta_rep, LoRA whose A and B are tensor
trains; loretta_adp, tensor-train bottleneck adapters after attention and after the FFN; tt_rank
0 makes them dense, plain Houlsby adapters), with the LayerNorms trainable in both forms as the
reference's encoder path marks them. The head trains in every kind. AdamW with a linear schedule, --steps_per_task steps of --batch_size rows (transformers'
Trainer, methods/encoder.py); the score is test accuracy.

    python methods/encoder4cls.py --method enc_loretta_rep --sequence sst2_cls --base_model models/encoder

The run's outputs follow every method script's layout: the trained model in --output_dir/final,
metrics.json (the one-task accuracy "matrix", trainable parameters, step time), each test row's
outcome (items.json) and the loss curve in --results_dir.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

from methods import encoder, loretta
from methods.loretta import LorettaLayerSettings
from stages.core.errors import cli_entry, fail
from stages.core.evaluation import ITEMS_FILE
from stages.core.io import atomic_dir, atomic_write_json
from stages.core.models import save_model
from stages.core.outputs import RunFolders
from stages.core.settings import LoraSettings, like, setting
from stages.core.sft import Method, build_config, peak_memory_mb, write_live

LORA_KEYS = ("r", "lora_alpha", "lora_dropout", "target_modules")


@dataclass(kw_only=True)
class EncoderSettings:
    """The encoder's method: what trains besides the new classification head (a kind's settings: that kind only)."""

    kind: str = setting(help="full: every weight; lora: a peft LoRA; loretta: LoRETTA's tensor-train layers",
                        choices=encoder.KINDS)
    tuning_type: str | None = like(LorettaLayerSettings, "tuning_type", None)
    tt_rank: int | None = like(LorettaLayerSettings, "tt_rank", None)
    tt_shapes: list[str] | None = like(LorettaLayerSettings, "tt_shapes", None)
    r: int | None = like(LoraSettings, "r", None)
    lora_alpha: int | None = like(LoraSettings, "lora_alpha", None)
    lora_dropout: float | None = like(LoraSettings, "lora_dropout", None)
    target_modules: list[str] | None = like(LoraSettings, "target_modules", None)
    bottleneck: int | None = like(LorettaLayerSettings, "bottleneck", None)
    non_linearity: str | None = like(LorettaLayerSettings, "non_linearity", None)
    adapter_scaling: float | None = like(LorettaLayerSettings, "adapter_scaling", None)
    adapter_modules: list[str] | None = like(LorettaLayerSettings, "adapter_modules", None)

    def __post_init__(self):
        needed = {"full": (), "lora": LORA_KEYS, "loretta": loretta.CONFIG_KEYS}[self.kind]
        missing = [key for key in needed if getattr(self, key) is None]
        if missing:
            fail(f"--kind {self.kind} needs {', '.join(missing)}: set them in the row's params section")
        if self.kind == "lora":
            LoraSettings(**{key: getattr(self, key) for key in LORA_KEYS})
        elif self.kind == "loretta":
            LorettaLayerSettings(**{key: getattr(self, key) for key in loretta.CONFIG_KEYS})


def not_a_decoder_method(model, cfg, ctx):  # encoder4cls.py runs its own loop, not the SFT trainer's
    fail("encoder4cls.py trains an encoder with its own loop: run it as a script")


ONE_PROCESS = "encoder4cls.py trains with its own single-process loop (a classifier on one task, in seconds)"
METHOD = Method("encoder", not_a_decoder_method, doc=__doc__, default_method="enc_lora", script="encoder4cls.py",
                settings=EncoderSettings, refuses=dict.fromkeys(("DDP", "FSDP", "DeepSpeed"), ONE_PROCESS))


@cli_entry
def main(argv=None) -> None:
    cfg = build_config(METHOD, argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # started by accelerate launch / torchrun
        fail(f"method '{cfg.method}' cannot run on {os.environ['WORLD_SIZE']} processes: {ONE_PROCESS}")
    if len(cfg.tasks) != 1:
        fail(f"sequence '{cfg.sequence}' has {len(cfg.tasks)} tasks: the encoder table classifies one task")
    task = cfg.tasks[0]
    if cfg.held_out:
        fail(f"sequence '{cfg.sequence}' has held-out tasks: an encoder row's classifier is trained for its one task only")
    folders = RunFolders({"--output_dir": cfg.output_dir, "--results_dir": cfg.results_dir})  # one writer each
    try:
        with tempfile.TemporaryDirectory(prefix="adaptlab-encoder-") as work:
            row = encoder.train_and_score(cfg.base_model, task, vars(cfg), steps=cfg.steps_per_task, batch_size=cfg.batch_size,
                                          max_length=cfg.max_length, seed=cfg.seed, tasks_dir=cfg.tasks_dir, work_dir=work)
        score = row["accuracy"]
        summary = {"method": cfg.method, "sequence": cfg.sequence, "seed": cfg.seed, "tasks": [task],
                   "chat_template": False,  # the classifier reads the plain prompt
                   "trainable_params": row["trainable_params"], "total_params": row["total_params"],
                   "peak_memory_mb": round(peak_memory_mb(), 1), "step_time_s": row["step_time_s"],
                   "AP": score, "BWT": None, "final": {task: score}, "held_out": {},
                   "matrix": {f"after_{task}": {task: score}}}
        with atomic_dir(cfg.output_dir) as out:
            save_model(row["model"], out / "final")
            atomic_write_json(out / "train_config.json", {k: v for k, v in vars(cfg).items()})
        with atomic_dir(cfg.results_dir) as res:
            write_live(res, [{"loss": row["loss"]}], summary)
            atomic_write_json(res / ITEMS_FILE, {f"after_{task}": {task: row["items"]}})  # each test row's outcome
        print(f"{cfg.method}: accuracy {score:.3f} on {task}, {row['trainable_params']:,} trainable parameters")
    finally:
        folders.release()


if __name__ == "__main__":
    main()
