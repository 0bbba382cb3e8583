"""Benchmark (not a test): one optimizer step of every method against its floor and against LoRA.

    python stages/bench.py                       # every row of the default table + the floors
    python stages/bench.py --methods lora mezo galore --repeats 7

On one model (params.yaml base_model.path), one batch (the first ``--batch_size`` training rows
of the sequence's first task, padded to their longest) and one precision for all (``--precision``,
fp32 by default, so ratios compare algorithms rather than autocast), it measures:

  forward            one forward of the base model, no autograd: the floor of zeroth-order steps
                     (a ZO step is two of them)
  forward+backward   forward and backward with every weight requiring grad: the floor of
                     full-weight first-order steps
  <method>           one ``train_step`` of the method exactly as its script runs it (its build,
                     optimizer and step on the shared core)
  peft+Trainer       the peer: the same LoRA (params.yaml methods.lora) and batch through plain
                     peft + transformers ``Trainer`` (AdamW, same lr, clipping and precision), what
                     users would otherwise write; a step is timed from Trainer's step-begin to
                     step-end callbacks, so it includes its data loading, clipping and scheduler

Each entry runs in its own process (peak resident memory is per process), ``--warmup`` steps
first, then ``--repeats`` timed steps; the median is reported. Peak memory is the process's peak
RSS on CPU (``torch.cuda.max_memory_allocated`` on GPU), "state" the optimizer's tensors.
Writes <out>/bench.md, bench.json and bench.png atomically.

    python stages/bench.py --scoring             # one scoring call per sequence: lm-eval vs fast

``--scoring`` times what the accuracy matrix costs after each task: one scoring call of every task
of each ``--sequences`` sequence (as the sequence scores: its chat template, max_length and batch
size) on the base model, with lm-eval's HFLM (the evaluate stage's scorer) and with the fast scorer
(params train.scorer), alternately, ``--repeats`` times after an untimed call of each on one row;
the median time of each, their ratio, each call's peak memory, and whether the two gave the same
outcome on every row. Writes <out>/scoring.md and scoring.json (default out: results/bench_scoring).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from stages.core.config import OneLineParser, load_params, section
from stages.core.errors import cli_entry, fail
from stages.core.io import atomic_dir, atomic_write_json, atomic_write_text
from stages.core.markdown import markdown_table
from stages.core.sft import peak_memory_mb

import torch

ROOT = Path(__file__).resolve().parents[1]
FLOORS = ("forward", "forward+backward")
PEER = "peft+Trainer"
ZEROTH_ORDER = {"mezo", "zoadamu"}


def load_method(name: str, params_file: str | None = None):
    """The Method of params.yaml's methods.<name> (its script's METHOD)."""
    from stages.core.sft import script_of

    script = script_of(name, section(load_params(params_file), "methods", name))
    if not (ROOT / "methods" / script).is_file():
        fail(f"methods.{name} runs methods/{script}, which does not exist")
    return importlib.import_module(f"methods.{Path(script).stem}").METHOD


def peer_step_times(model, batch: dict, cfg, args: argparse.Namespace) -> tuple[list[float], torch.optim.Optimizer]:
    """LoRA through peft + transformers Trainer on ``batch`` repeated: per-step wall times (after
    warm-up) from Trainer's own step callbacks, and its optimizer."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class SameBatch(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return (args.warmup + args.repeats) * args.batch_size

        def __getitem__(self, index: int) -> dict:
            return {k: v[index % args.batch_size] for k, v in batch.items()}

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step_begin(self, *_, **__) -> None:
            self.began = time.perf_counter()

        def on_step_end(self, *_, **__) -> None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.began)

    model = get_peft_model(model, LoraConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                             target_modules=cfg.target_modules, task_type="CAUSAL_LM"))
    clock = StepClock()
    training = TrainingArguments(
        output_dir=str(Path(args.scratch) / PEER), per_device_train_batch_size=args.batch_size, max_steps=args.warmup + args.repeats,
        learning_rate=cfg.lr, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, lr_scheduler_type=cfg.scheduler,
        bf16=args.precision == "bf16", use_cpu=not torch.cuda.is_available(), report_to=[], save_strategy="no",
        logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False, seed=0)
    trainer = Trainer(model=model, args=training, train_dataset=SameBatch(), callbacks=[clock],
                      data_collator=lambda rows: {k: torch.stack([r[k] for r in rows]) for k in rows[0]})
    trainer.train()
    return clock.times[args.warmup:], trainer.optimizer


def worker(args: argparse.Namespace) -> dict:
    """One entry, in this process: build it, step it, measure it."""
    from methods.projection import total_state_bytes
    from stages.core.batches import causal_lm_loss, collate, encode_example, encode_rows
    from stages.core.models import load_model, load_tokenizer
    from stages.core.sft import Context, StepInputs, build_config, count_parameters
    from stages.core.tasks import load_task

    from accelerate import Accelerator

    torch.manual_seed(0)
    name = args.worker
    is_floor = name in FLOORS
    row = "lora" if is_floor or name == PEER else name
    method = None if is_floor or name == PEER else load_method(name, args.params)
    argv = ["--params", args.params or "params.yaml", "--method", row, "--sequence", args.sequence,
            "--mixed_precision", args.precision, "--batch_size", str(args.batch_size), "--grad_accum", "1"]
    for start in (Path("models") / "init" / name, Path("models") / "init" / f"{name}-{args.sequence}"):
        if (start / "init.json").is_file():  # CorDA starts from its decomposed model, CIMEO from its masks
            argv += ["--base_model", str(start)]
    cfg = build_config(method or load_method("lora", args.params), argv)
    base = cfg.base_model
    tokenizer = load_tokenizer(base)
    tasks = [load_task(t, Path(cfg.tasks_dir)) for t in cfg.tasks]
    encode = (method.encoder(cfg) if method and method.encoder else None) or encode_example
    encoded = [encode_rows(t.train, tokenizer, cfg.max_length, t.name, encode) for t in tasks]
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
    batch = {k: v.to(accelerator.device) for k, v in collate(encoded[0][:args.batch_size], tokenizer.pad_token_id).items()}
    model = load_model(base, device=accelerator.device)
    state, trainable, times = 0, 0, []
    if name == PEER:
        batch = {k: v.cpu() for k, v in batch.items()}  # Trainer moves each batch itself
        model.train()
        times, optimizer = peer_step_times(model, batch, cfg, args)
        trainable = count_parameters(model)[0]
    elif name == "forward":
        model = accelerator.prepare(model).eval()

        def step() -> None:
            with torch.no_grad():
                causal_lm_loss(model, batch)
    elif name == "forward+backward":
        model.requires_grad_(True)
        model = accelerator.prepare(model).train()

        def step() -> None:
            accelerator.backward(causal_lm_loss(model, batch))
            model.zero_grad(set_to_none=True)
    else:
        cfg.base_model = base
        context = Context(tokenizer, tasks, encoded, Path(args.scratch) / name)
        model = method.build(model, cfg, context)
        optimizer = method.optimizer(model, cfg, context)
        trainable, _ = count_parameters(model)
        model, optimizer = accelerator.prepare(model, optimizer)
        model.train()

        def step() -> None:
            method.train_step(StepInputs(model, [batch], optimizer, accelerator, cfg))
    for index in range(0 if name == PEER else args.warmup + args.repeats):
        began = time.perf_counter()
        step()
        if accelerator.device.type == "cuda":
            torch.cuda.synchronize()
        if index >= args.warmup:
            times.append(time.perf_counter() - began)
    if not is_floor:
        state = total_state_bytes(optimizer, keys=None)  # every tensor the optimizer keeps
    return {"entry": name, "step_s": statistics.median(times), "times": times,
            "peak_memory_mb": round(peak_memory_mb(), 1), "trainable_params": trainable,
            "optimizer_state_mb": round(state / 2**20, 2), "tokens": int(batch["attention_mask"].sum()),
            "batch_shape": list(batch["input_ids"].shape), "device": str(accelerator.device),
            "precision": "fp32" if args.precision == "no" else args.precision}


def run_entry(name: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--worker", name, "--precision", args.precision, "--sequence", args.sequence,
               "--batch_size", str(args.batch_size), "--repeats", str(args.repeats), "--warmup", str(args.warmup),
               "--scratch", args.scratch] + (["--params", args.params] if args.params else [])
    proc = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        detail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        fail(f"benchmark of '{name}' failed: {detail}")
    result = json.loads(lines[-1])
    print(f"{name:>18}: {result['step_s']:.3f} s/step, peak {result['peak_memory_mb']:.0f} MB", flush=True)
    return result


def scoring_bench(args: argparse.Namespace) -> list[dict]:
    """Both scorers on one scoring call of each sequence, in this process (one model in memory)."""
    from stages.core.config import sequence_settings, sequence_tasks
    from stages.core.evaluation import Evaluator
    from stages.core.models import compute_device, load_model, load_tokenizer
    from stages.core.sft import reset_peak_memory

    params = load_params(args.params)
    base = section(params, "base_model", "path")
    model, tokenizer = load_model(base, device=compute_device()), load_tokenizer(base)
    results = []
    for sequence in args.sequences:
        tasks = sequence_tasks(params, sequence)
        train = {**params.get("train", {}), **sequence_settings(params, sequence)}

        def evaluator(scorer: str, limit: int | None, tasks=tasks, train=train) -> Evaluator:
            return Evaluator(tasks, "data/tasks", train.get("eval_batch_size", 32),
                             max_length=train.get("max_length", 128) + 32, limit=limit,
                             chat_template=train.get("chat_template", False), scorer=scorer)

        for scorer in ("lm_eval", "fast"):  # imports, first allocations, dataset caches: not timed
            evaluator(scorer, 1).score(model, tokenizer)
        timed = {scorer: evaluator(scorer, args.limit or None) for scorer in ("lm_eval", "fast")}
        times: dict[str, list[float]] = {"lm_eval": [], "fast": []}
        memory: dict[str, float] = {}
        scored = {}
        for _ in range(args.repeats):
            for scorer, ev in timed.items():
                reset_peak_memory()
                began = time.perf_counter()
                scored[scorer] = ev.score(model, tokenizer)
                times[scorer].append(time.perf_counter() - began)
                memory[scorer] = max(memory.get(scorer, 0.0), peak_memory_mb())
        reference, fast = scored["lm_eval"], scored["fast"]
        rows = sum(len(v) for v in reference.items.values())
        same = sum(fast.items[t].get(i) == outcome for t, items in reference.items.items() for i, outcome in items.items())
        median = {scorer: statistics.median(t) for scorer, t in times.items()}
        result = {"sequence": sequence, "tasks": tasks, "rows": rows, "lm_eval_s": median["lm_eval"], "fast_s": median["fast"],
                  "speedup": median["lm_eval"] / median["fast"], "same_outcomes": same,
                  "max_score_difference": max(abs(reference.scores[t] - fast.scores[t]) for t in tasks),
                  "lm_eval_peak_memory_mb": round(memory["lm_eval"], 1), "fast_peak_memory_mb": round(memory["fast"], 1),
                  "times": times}
        print(f"{sequence:>14}: lm-eval {result['lm_eval_s']:.1f} s, fast {result['fast_s']:.1f} s "
              f"({result['speedup']:.2f}x), same outcome on {same}/{rows} rows", flush=True)
        results.append(result)
    return results


def scoring_report(results: list[dict], out: Path, args: argparse.Namespace) -> None:
    import torch

    header = ["sequence", "rows", "lm-eval (s)", "fast (s)", "speedup", "same outcomes", "peak memory lm-eval / fast (MB)"]
    lines = ["# Scoring benchmark", "",
             f"Generated by `stages/bench.py --scoring`: one scoring call of every task of each sequence on the base model "
             f"({'all rows' if not args.limit else f'{args.limit} rows per task'}), median of {args.repeats} call(s) per scorer "
             f"after an untimed one, device {'cuda' if torch.cuda.is_available() else 'cpu'}.",
             "lm-eval is the evaluate stage's scorer (HFLM), fast the accuracy matrix's (stages/core/scoring.py).", "",
             "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += [f"| {r['sequence']} | {r['rows']} | {r['lm_eval_s']:.1f} | {r['fast_s']:.1f} | {r['speedup']:.2f}× | "
              f"{r['same_outcomes']}/{r['rows']} | {r['lm_eval_peak_memory_mb']:.0f} / {r['fast_peak_memory_mb']:.0f} |"
              for r in results]
    with atomic_dir(out) as tmp:
        atomic_write_text(tmp / "scoring.md", "\n".join(lines) + "\n")
        atomic_write_json(tmp / "scoring.json", {"settings": {k: v for k, v in vars(args).items() if k != "worker"},
                                                 "results": results})
    print(f"wrote {out / 'scoring.md'}")


def report(results: list[dict], out: Path, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {r["entry"]: r for r in results}
    forward, fwd_bwd, lora, peer = by.get("forward"), by.get("forward+backward"), by.get("lora"), by.get(PEER)
    header = ["entry", "step (s)", "× forward", "× fwd+bwd", "× LoRA", "× peft+Trainer", "peak memory (MB)",
              "× inference memory", "trainable params", "optimizer state (MB)"]
    rows = []
    for r in results:
        ratio = lambda ref, key="step_s", r=r: f"{r[key] / ref[key]:.2f}" if ref else "–"  # noqa: E731
        rows.append([r["entry"], f"{r['step_s']:.3f}", ratio(forward), ratio(fwd_bwd), ratio(lora), ratio(peer),
                     f"{r['peak_memory_mb']:.0f}", ratio(forward, "peak_memory_mb"),
                     f"{r['trainable_params']:,}" if r["trainable_params"] else "–",
                     f"{r['optimizer_state_mb']:.1f}" if r["entry"] not in FLOORS else "–"])
    first = results[0]
    lines = ["# Step benchmark", "",
             f"Generated by `stages/bench.py`: one batch of {first['batch_shape'][0]} rows × {first['batch_shape'][1]} "
             f"tokens ({first['tokens']} real) of the sequence's first task, {first['precision']}, device {first['device']}, "
             f"median of {args.repeats} steps after {args.warmup} warm-up, each entry in its own process.",
             "Zeroth-order steps compare with `forward` (a step is two), full-weight first-order steps with",
             "`forward+backward`; memory is the process's peak RSS (CPU) or max allocated (GPU).", "",
             markdown_table(header, rows)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.45 * len(results) + 1.5))
    names = [r["entry"] for r in results][::-1]
    axes[0].barh(names, [by[n]["step_s"] / forward["step_s"] if forward else by[n]["step_s"] for n in names], color="tab:blue")
    axes[0].set_xlabel("step time / one forward" if forward else "step time (s)")
    axes[1].barh(names, [by[n]["peak_memory_mb"] for n in names], color="tab:orange")
    axes[1].set_xlabel("peak memory (MB)")
    for ax in axes:
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"One optimizer step, {first['precision']} on {first['device']}")
    fig.tight_layout()
    with atomic_dir(out) as tmp:
        atomic_write_text(tmp / "bench.md", "\n".join(lines) + "\n")
        atomic_write_json(tmp / "bench.json", {"settings": {k: v for k, v in vars(args).items() if k != "worker"},
                                               "results": results})
        fig.savefig(tmp / "bench.png", dpi=110)
    plt.close(fig)
    print(f"wrote {out / 'bench.md'}")


@cli_entry
def main(argv=None) -> None:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=None, help="default: the rows of params.yaml tables.default")
    parser.add_argument("--params", default=None)
    parser.add_argument("--sequence", default="default")
    parser.add_argument("--precision", default="no", choices=["no", "bf16"], help="mixed precision for every entry")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=None, help="default: 5 (with --scoring: 1)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default=None, help="default: results/bench, with --scoring results/bench_scoring")
    parser.add_argument("--scoring", action="store_true", help="benchmark the scorers instead of the optimizer steps")
    parser.add_argument("--sequences", nargs="+", default=["cognition", "gorp_order1"], help="--scoring: the sequences")
    parser.add_argument("--limit", type=int, default=0, help="--scoring: rows per task (0: all)")
    parser.add_argument("--scratch", default="checkpoints/bench", help="work folder for methods that write calibration files")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 1 if args.scoring else 5
    if args.repeats < 1 or args.warmup < 0 or args.batch_size < 1:
        fail(f"--repeats {args.repeats} / --warmup {args.warmup} / --batch_size {args.batch_size}: expected >= 1, >= 0, >= 1")
    if args.scoring:
        if args.limit < 0:
            fail(f"--limit {args.limit}: expected >= 0 (0: every row)")
        scoring_report(scoring_bench(args), Path(args.out or "results/bench_scoring"), args)
        return
    args.out = args.out or "results/bench"
    if args.worker:
        print(json.dumps(worker(args)))
        return
    methods = args.methods or section(load_params(args.params), "tables", "default")["rows"]
    for name in methods:  # one line before any work: an unknown row, or a row whose script is missing
        load_method(name, args.params)
    entries = list(FLOORS) + [PEER, "lora"] + [m for m in methods if m != "lora"]
    results = [run_entry(name, args) for name in entries]
    report(results, Path(args.out), args)


if __name__ == "__main__":
    main()
