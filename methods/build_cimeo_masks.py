"""CIMEO step 1: gradient-frequency masks, one per task (cognition), on the base model.

    python methods/build_cimeo_masks.py --model_id models/base --sequence cognition --strategy max \\
        --density 0.1 --objective sft --out_dir masks/cimeo
    python methods/build_cimeo_masks.py --tasks qa_wikidata winowhy --batches 4 --out_dir /tmp/masks
    python methods/build_cimeo_masks.py --method cimeo --sequence default --save_model --save_path models/init/cimeo-default/model

--sequence takes one or more sequences (their tasks, each once). For every task: its training
rows are encoded like the method trains on them (--objective sft: loss on the answer, in the
sequence's prompt format, through the chat template where the sequence sets chat_template;
pretrain: every token of the plain text), and the model runs forward/backward over --batches
batches of --batch_size rows (0: one pass over all the rows). Per masked parameter (--masked all:
every parameter but the embedding and the LM head, norms included, as the authors' code;
matrices: the --targets linears only) each entry is counted whenever its |grad| is in the top
--density fraction of the tensor (--strategy max) or the bottom fraction (min); the
floor(--density x size) entries counted most often (ties: larger summed |grad| first for max,
smaller first for min) are the task's mask I_c. --strategy random draws a seeded random subset
of the same size and runs no model.

Writes, atomically, <out_dir>/<task>.safetensors (one tensor of sorted flat indices into
W.view(-1) per weight name, int32) and <out_dir>/masks.json (settings, the model's fingerprint,
per-task counts). --save_model --save_path P (what stages/decompose.py passes when a method's
params have `decompose: {script: build_cimeo_masks.py}`) writes the masks to P/cimeo_masks, where
methods/cimeo4sft.py finds them when its --base_model is the decompose stage's folder.

--method NAME takes the defaults of --strategy, --density, --batches (mask_batches),
--batch_size (mask_batch_size), --max_length, --masked, --chat_template and --targets
(target_modules) from params.yaml methods.NAME (over the sequence's settings, over train:), as
the method's own runs read them; explicit flags win.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

from methods import cimeo
from stages.core.batches import encode_rows
from stages.core.config import OneLineParser, load_params, section, sequence_settings, sequence_tasks
from stages.core.errors import cli_entry, fail
from stages.core.io import atomic_dir
from stages.core.models import compute_device, load_model, load_tokenizer
from stages.core.tasks import load_task

import torch

FALLBACKS = {"strategy": "max", "density": 0.1, "batches": 0, "batch_size": 8, "max_length": 128,
             "targets": cimeo.DEFAULT_TARGETS, "objective": "sft", "seed": 0, "masked": "all", "chat_template": False}
FROM_METHOD = {"strategy": "strategy", "density": "density", "batches": "mask_batches", "batch_size": "mask_batch_size",
               "max_length": "max_length", "targets": "target_modules", "masked": "masked", "chat_template": "chat_template"}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = OneLineParser(prog="build_cimeo_masks.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_id", default=None, help="model folder or hub id (default: params base_model.path)")
    p.add_argument("--params", default=None, help="params file (default: params.yaml)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--sequence", nargs="+", default=None, metavar="SEQUENCE",
                       help="build a mask for every task of these params.yaml sequences")
    which.add_argument("--tasks", nargs="+", default=None, metavar="TASK", help="build masks for these tasks")
    p.add_argument("--method", default=None, help="take defaults from params.yaml methods.METHOD (cimeo, cimeo_pretrain)")
    p.add_argument("--strategy", default=None, help="max | min | random (default: max)")
    p.add_argument("--density", type=float, default=None, help="fraction of each matrix kept (default: 0.1)")
    p.add_argument("--batches", type=int, default=None, help="batches per task; 0 = one pass over all its rows (default)")
    p.add_argument("--batch_size", type=int, default=None, help="rows per batch (default: 8)")
    p.add_argument("--objective", default=None, help="sft (loss on the answer) | pretrain (every token of the plain text)")
    p.add_argument("--masked", default=None, help="all (every parameter but the embedding / LM head; default) | matrices (--targets)")
    p.add_argument("--chat_template", action=argparse.BooleanOptionalAction, default=None,
                   help="encode the rows through the chat template (default: as the sequence / method sets it)")
    p.add_argument("--max_length", type=int, default=None, help="tokens per row at most (default: train.max_length)")
    p.add_argument("--targets", nargs="+", default=None, help="weight matrices to mask (default: q,k,v,o,gate,up,down_proj)")
    p.add_argument("--seed", type=int, default=None, help="seed of the random strategy (default: 0)")
    p.add_argument("--tasks_dir", default="data/tasks")
    p.add_argument("--out_dir", default=None, help="output folder of the masks")
    p.add_argument("--save_model", action="store_true", help="the decompose stage's form: masks in <save_path>/cimeo_masks")
    p.add_argument("--save_path", default=None)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    return p.parse_args(argv)


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill unset flags from params (methods.<method> over train:, base_model.path, seed)."""
    params = load_params(args.params)
    method = dict(params.get("train") or {})
    # The sequence's settings (its prompt format) apply as they do to the method's runs.
    shared = [sequence_settings(params, name) for name in args.sequence or []]
    if any(s.get("chat_template") != shared[0].get("chat_template") for s in shared):
        fail(f"sequences {', '.join(args.sequence)} differ in chat_template: build their masks separately")
    for settings in shared[:1]:
        method.update(settings)
    if args.method:
        method.update(section(params, "methods", args.method) or {})
    for key, fallback in FALLBACKS.items():
        if getattr(args, key) is None:
            source = FROM_METHOD.get(key)
            if source and source in method:
                value = method[source]
            else:
                value = fallback
            setattr(args, key, value)
    if args.model_id is None:
        args.model_id = section(params, "base_model", "path")
    if args.sequence:
        args.tasks = list(dict.fromkeys(task for name in args.sequence for task in sequence_tasks(params, name)))
    if not args.tasks:
        fail("give --sequence NAME or --tasks TASK ...")
    return args


def check_args(args: argparse.Namespace) -> None:
    if args.strategy not in cimeo.STRATEGIES:
        fail(f"--strategy '{args.strategy}' is not valid: expected one of {', '.join(cimeo.STRATEGIES)}")
    if args.objective not in cimeo.OBJECTIVES:
        fail(f"--objective '{args.objective}' is not valid: expected one of {', '.join(cimeo.OBJECTIVES)}")
    if args.masked not in cimeo.MASKED_CHOICES:
        fail(f"--masked '{args.masked}' is not valid: expected one of {', '.join(cimeo.MASKED_CHOICES)}")
    cimeo.encoder_for(args.objective, args.chat_template)
    if not isinstance(args.density, (int, float)) or not 0 < args.density <= 1:
        fail(f"--density must be in (0, 1], got {args.density}")
    if args.batches < 0:
        fail(f"--batches must be >= 0 (0: one pass over all rows), got {args.batches}")
    if args.batch_size <= 0 or args.max_length <= 0:
        fail(f"--batch_size and --max_length must be positive, got {args.batch_size} and {args.max_length}")
    if args.threads < 0:
        fail(f"--threads must be >= 0, got {args.threads}")
    if len(set(args.tasks)) != len(args.tasks):
        fail(f"a task is named twice in {args.tasks}")
    if args.save_model and not args.save_path:
        fail("--save_model needs --save_path")
    if not args.save_model and not args.out_dir:
        fail("give --out_dir (or --save_model --save_path)")


@cli_entry
def main(argv: Sequence[str] | None = None) -> None:
    args = resolve(parse_args(argv))
    check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    began = time.perf_counter()
    tokenizer = load_tokenizer(args.model_id)
    tasks = [load_task(name, Path(args.tasks_dir)) for name in args.tasks]  # fail on a bad name before the model loads
    model = load_model(args.model_id, device=compute_device())
    weights = cimeo.masked_parameters(model, args.targets, args.masked)
    fingerprint = cimeo.model_fingerprint(model, args.targets, args.masked)
    settings = cimeo.masks_settings(args.objective, args.strategy, args.density, args.batches, args.batch_size,
                                    args.max_length, args.targets, args.seed, args.masked, args.chat_template)
    encode = cimeo.encoder_for(args.objective, args.chat_template)
    masks, seconds = {}, {}
    for task in tasks:
        t0 = time.perf_counter()
        encoded = encode_rows(task.train, tokenizer, args.max_length, task.name, encode)
        masks[task.name] = cimeo.compute_task_masks(model, [encoded], [task.name], tokenizer.pad_token_id, settings)[task.name]
        seconds[task.name] = round(time.perf_counter() - t0, 2)
        n_batches = args.batches or -(-len(encoded) // args.batch_size)
        print(f"{task.name}: {sum(i.numel() for i in masks[task.name].values()):,} of "
              f"{sum(w.numel() for w in weights.values()):,} entries ({args.strategy}, density {args.density}, "
              f"{0 if args.strategy == 'random' else n_batches} batches of {args.batch_size}) in {seconds[task.name]} s")
    # the inputs only (times are in the log): the same inputs give the same folder, byte for byte
    meta = dict(settings, model_id=str(args.model_id), model_fingerprint=fingerprint)
    if args.save_model:
        with atomic_dir(args.save_path) as tmp:  # masks only: CIMEO trains from the base model itself
            cimeo.save_masks(tmp / cimeo.MASKS_IN_MODEL, masks, meta)
        where = Path(args.save_path) / cimeo.MASKS_IN_MODEL
    else:
        with atomic_dir(args.out_dir) as tmp:
            cimeo.save_masks(tmp, masks, meta)
        where = Path(args.out_dir)
    print(f"masks of {len(masks)} task(s) written to {where} in {time.perf_counter() - began:.1f} s")


if __name__ == "__main__":
    main()
