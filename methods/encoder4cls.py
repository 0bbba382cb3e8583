"""Sequence classification on an encoder: LoRETTA's BERT/DeBERTa path (Yang et al., NAACL 2024),
on the MiniLM-L6 encoder of the encoder table.

Update rule: the encoder gets a new classification head over the task's choices and, by --kind,
trains every weight (full), a peft LoRA on --target_modules (h = W0·x + (alpha/r)·B·A·x), or
LoRETTA's tensor-train layers (methods/loretta.py: loretta_rep, LoRA whose A and B are tensor
trains; loretta_adp, tensor-train bottleneck adapters after attention and after the FFN with the
norms trainable; tt_rank 0 makes them dense, plain Houlsby adapters). The head trains in every
kind. AdamW with a linear schedule, --steps_per_task steps of --batch_size rows (transformers'
Trainer, methods/encoder.py); the score is test accuracy.

    python methods/encoder4cls.py --method enc_loretta_rep --sequence sst2_cls --base_model models/encoder

The run's outputs follow every method script's layout: the trained model in --output_dir/final,
metrics.json (the one-task accuracy "matrix", trainable parameters, step time) and the loss curve
in --results_dir.
"""

from __future__ import annotations

import tempfile

from methods.encoder import train_and_score
from stages.core.errors import cli_entry, fail
from stages.core.io import atomic_dir, atomic_write_json
from stages.core.outputs import RunFolders
from stages.core.sft import Method, build_config, peak_memory_mb, write_live


def not_a_decoder_method(model, cfg, ctx):  # encoder4cls.py runs its own loop, not the SFT trainer's
    fail("encoder4cls.py trains an encoder with its own loop: run it as a script")


METHOD = Method("encoder", not_a_decoder_method, doc=__doc__, default_method="enc_lora", script="encoder4cls.py")


@cli_entry
def main(argv=None) -> None:
    cfg = build_config(METHOD, argv)
    if len(cfg.tasks) != 1:
        fail(f"sequence '{cfg.sequence}' has {len(cfg.tasks)} tasks: the encoder table classifies one task")
    task = cfg.tasks[0]
    folders = RunFolders({"--output_dir": cfg.output_dir, "--results_dir": cfg.results_dir})  # one writer each
    try:
        with tempfile.TemporaryDirectory(prefix="adaptlab-encoder-") as work:
            row = train_and_score(cfg.base_model, task, vars(cfg), steps=cfg.steps_per_task, batch_size=cfg.batch_size,
                                  max_length=cfg.max_length, seed=cfg.seed, tasks_dir=cfg.tasks_dir, work_dir=work)
        score = row["accuracy"]
        summary = {"method": cfg.method, "sequence": cfg.sequence, "seed": cfg.seed, "tasks": [task],
                   "trainable_params": row["trainable_params"], "total_params": row["total_params"],
                   "peak_memory_mb": round(peak_memory_mb(), 1), "step_time_s": row["step_time_s"],
                   "AP": score, "BWT": None, "final": {task: score}, "matrix": {f"after_{task}": {task: score}}}
        with atomic_dir(cfg.output_dir) as out:
            row["model"].save_pretrained(out / "final")
            atomic_write_json(out / "train_config.json", {k: v for k, v in vars(cfg).items()})
        with atomic_dir(cfg.results_dir) as res:
            write_live(res, [{"loss": row["loss"]}], summary)
        print(f"{cfg.method}: accuracy {score:.3f} on {task}, {row['trainable_params']:,} trainable parameters")
    finally:
        folders.release()


if __name__ == "__main__":
    main()
