"""Stage: score a saved model folder on every task of a sequence with lm-evaluation-harness.

    python stages/evaluate.py --model merged/lora-default --sequence default --out results/rows/lora-default/eval.json
The folder is loaded once, with a clear error if it is missing or corrupt, and handed to
lm-eval's HF model wrapper. Besides the sequence's tasks it scores the sequence's held-out tasks
(sequences.<name>.held_out: never trained on it), written apart as "held_out". Prompts go through
the tokenizer's chat template when the model was trained that way (its prompt_format.json,
written by stages/merge.py), else when the sequence sets chat_template (the base model on the
cognition sequence); --chat_template / --no-chat_template win.
Under "items", every row's outcome as [task, row id, outcome] rows (the values lm-eval averages
into each score; a list, so that `dvc metrics show` lists only the scores).
"""

import argparse
import time
from pathlib import Path

from stages.core.config import OneLineParser, load_params, sequence_held_out, sequence_settings, sequence_tasks
from stages.core.errors import cli_entry
from stages.core.evaluation import PROMPT_FORMAT_FILE, Evaluator, item_rows
from stages.core.io import atomic_write_json, read_json
from stages.core.models import compute_device, load_model, load_tokenizer


@cli_entry
def main(argv=None) -> None:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model folder (merged or base)")
    parser.add_argument("--sequence", default="default", help="task sequence from params.yaml")
    parser.add_argument("--out", required=True, help="JSON file for the scores")
    parser.add_argument("--params", default=None)
    parser.add_argument("--tasks_dir", default="data/tasks")
    parser.add_argument("--limit", type=int, default=0, help="score only the first N test rows (0: all)")
    parser.add_argument("--chat_template", action=argparse.BooleanOptionalAction, default=None,
                        help="prompt through the chat template (default: as the model was trained, else the sequence's setting)")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    tasks, held_out = sequence_tasks(params, args.sequence), sequence_held_out(params, args.sequence)
    train = {**params.get("train", {}), **sequence_settings(params, args.sequence)}
    model, tokenizer = load_model(args.model, device=compute_device()), load_tokenizer(args.model)
    chat = args.chat_template
    if chat is None:
        trained_as = Path(args.model) / PROMPT_FORMAT_FILE
        chat = read_json(trained_as)["chat_template"] if trained_as.is_file() else train.get("chat_template", False)
    evaluator = Evaluator(tasks + held_out, args.tasks_dir, train.get("eval_batch_size", 32),
                          max_length=train.get("max_length", 480) + 32, limit=args.limit or None, chat_template=bool(chat))
    began = time.perf_counter()
    scored = evaluator.score(model, tokenizer)
    scores = {task: scored.scores[task] for task in tasks}
    atomic_write_json(args.out, {"model": args.model, "sequence": args.sequence, "chat_template": bool(chat), "scores": scores,
                                 "held_out": {task: scored.scores[task] for task in held_out},
                                 "eval_seconds": round(time.perf_counter() - began, 1), "items": item_rows(scored.items)})
    print(", ".join(f"{k} {v:.3f}" for k, v in scored.scores.items()))


if __name__ == "__main__":
    main()
