"""Supervised fine-tuning over a task sequence: the one training loop every method script uses.

A method script supplies a ``Method``: how to wrap the base model (``build``) and, optionally, its
optimizer. Everything else is here, written once:

* the command line, generated from params.yaml (``train:`` merged with ``methods.<name>:``);
* the sequence: train task 1, save the adapter, score the tasks with lm-eval, train task 2 ...
  (one adapter continues through the sequence; optimizer and schedule restart per task); the
  scores after each task form the accuracy matrix (every cell, or on sequences of 4+ tasks only
  the cells AP, BWT and FWT read unless ``--full_matrix``), each cell with its rows' outcomes;
  after the last task the sequence's held-out tasks (never trained) are scored too;
* checkpoints every ``checkpoint_every`` steps (trainable weights, optimizer, schedule and RNG of
  every process) under ``--work_dir``, so a killed run resumes and ends with identical metrics;
* accelerate, so ``accelerate launch methods/<x>4sft.py`` runs data-parallel (DDP) or sharded
  (FSDP) unchanged; what each method supports is in stages/core/strategies.py;
* outputs written atomically at the end: adapters in ``--output_dir``, dvclive metrics and the
  loss curve in ``--results_dir``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import math
import shutil
import statistics
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, get_scheduler

from . import config as cfglib
from . import settings
from .batches import batch_order, causal_lm_loss, collate, encode_chat, encode_example, encode_rows
from .continual import average_performance, backward_transfer, scored_tasks
from .errors import cli_entry, fail
from .evaluation import ITEMS_FILE, Evaluator
from .io import _prune, atomic_dir, atomic_write_json, read_json
from .models import load_model, load_tokenizer, save_model
from .outputs import RunFolders
from .strategies import check as check_strategy
from .strategies import placement
from .tasks import load_task

# Training diverged when a step's loss is not finite or above DIVERGED × max(the task's first
# step's loss, 1 nat) (the floor keeps a task that starts near 0 from tripping on noise).
DIVERGED = 10.0

BuildFn = Callable[[PreTrainedModel, SimpleNamespace, "Context"], torch.nn.Module]
OptimizerFn = Callable[[torch.nn.Module, SimpleNamespace, "Context"], torch.optim.Optimizer]


def weight_decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """The trainable parameters in model order: matrices decayed, then biases and norms
    (ndim < 2), never decayed; empty groups left out. A tied weight is listed once."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def adamw(model: torch.nn.Module, cfg: SimpleNamespace, ctx: Context | None = None) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; no decay on biases and norms."""
    return torch.optim.AdamW(weight_decay_groups(model, cfg.weight_decay), lr=cfg.lr)


@dataclass
class Context:
    """What a method may need besides the model and its settings: the tokenizer, the sequence's
    tasks, and calibration batches (EVA, CorDA) drawn from the first task's training rows."""

    tokenizer: PreTrainedTokenizerBase
    tasks: list
    encoded: list[list[dict]]
    work_dir: Path
    task_index: int = 0  # the task being trained (optimizers are built anew for every task)

    def calibration_batches(self, n_samples: int, batch_size: int = 1, with_labels: bool = True) -> list[dict]:
        """The first ``n_samples`` training examples of the first task, collated (one sample per
        batch by default: CorDA's covariance hooks require it)."""
        examples = self.encoded[0][:n_samples]
        batches = [collate(examples[i:i + batch_size], self.tokenizer.pad_token_id) for i in range(0, len(examples), batch_size)]
        return batches if with_labels else [{k: v for k, v in b.items() if k != "labels"} for b in batches]


@dataclass
class StepInputs:
    """One optimizer step's worth of work for this process: its micro-batches (already on the
    device; more than one means gradient accumulation) and what is needed to apply them."""

    model: torch.nn.Module
    micro_batches: list[dict[str, torch.Tensor]]
    optimizer: torch.optim.Optimizer
    accelerator: object
    cfg: SimpleNamespace


def first_order_step(step: StepInputs) -> float:
    """Forward and backward over every micro-batch, clip, one optimizer step; the mean loss."""
    model, acc, n = step.model, step.accelerator, len(step.micro_batches)
    losses = []
    for k, batch in enumerate(step.micro_batches):
        # Only the last micro-batch all-reduces gradients across processes.
        with acc.no_sync(model) if k < n - 1 else contextlib.nullcontext():
            loss = causal_lm_loss(model, batch)
            acc.backward(loss / n)
        losses.append(loss.item())
    if step.cfg.max_grad_norm > 0:
        # All of the model's parameters (frozen ones have no gradient and count for nothing): under
        # FSDP accelerate then clips by the norm over every shard, not this process's part.
        acc.clip_grad_norm_(model.parameters(), step.cfg.max_grad_norm)
    step.optimizer.step()
    step.optimizer.zero_grad(set_to_none=True)
    return sum(losses) / n


@dataclass
class Method:
    """One fine-tuning method: ``build(model, cfg, ctx)`` turns the base model into the model to
    train (e.g. a peft model); ``optimizer(model, cfg, ctx)`` builds its optimizer for task
    ``ctx.task_index`` (AdamW by default); ``train_step`` turns one batch into one update
    (forward/backward/step by default); ``encoder(cfg)`` gives the function that turns a task row
    into input ids and labels (None: the core's, prompt masked and response learned, through the
    chat template when ``--chat_template``); ``export(model, path)`` saves the trained model after each task (None:
    peft's adapter, or the full weights of a plain model; custom adapters use
    stages/core/adapters.save_adapter); ``merged(model)`` is a plain transformers model computing
    the same function, for scoring (None: peft's merge_and_unload on a copy); ``trainable(model,
    cfg, ctx)`` counts the numbers the run can change over all its tasks, called once the model and
    the first task's optimizer are built (None: the parameters that then require grad; methods
    that train something else per task, or only part of a tensor, count it themselves)."""

    name: str
    build: BuildFn
    optimizer: OptimizerFn = adamw
    train_step: Callable[[StepInputs], float] = first_order_step  # zeroth-order methods replace it
    doc: str = ""
    encoder: Callable[[SimpleNamespace], Callable[..., dict]] | None = None
    default_method: str | None = None  # the params section read without --method (default: name)
    script: str = ""  # its file in methods/ (default: <name>4sft.py)
    export: Callable[[torch.nn.Module, Path], None] | None = None
    merged: Callable[[torch.nn.Module], torch.nn.Module] | None = None
    settings: type | None = None  # its typed settings, the fields of its params section (stages/core/settings.py)
    trainable: Callable[[torch.nn.Module, SimpleNamespace, Context], int] | None = None
    # Launch ways it cannot train under, each with why ({"FSDP": "..."}); stages/core/strategies.py.
    refuses: dict[str, str] = field(default_factory=dict)


def build_tuned(model: torch.nn.Module, cfg) -> torch.nn.Module:
    """``--tuning full``: every weight of the base model is trained; ``--tuning lora``: a peft
    LoRA (r, lora_alpha, target_modules from params) and only its A, B are trained."""
    if cfg.tuning == "full":
        for param in model.parameters():
            param.requires_grad_(True)
        return model
    if cfg.tuning == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                            target_modules=cfg.target_modules, init_lora_weights=True, task_type="CAUSAL_LM")
        return get_peft_model(model, config)
    fail(f"--tuning '{cfg.tuning}' is not valid: expected one of full, lora")


# ----------------------------------------------------------------------------- configuration

RUN_PATH_KEYS = ("output_dir", "results_dir", "work_dir")
# Settings that change how a run is logged or saved, not what it computes.
NOT_IN_FINGERPRINT = RUN_PATH_KEYS + ("checkpoint_every", "log_every", "params", "eval_batch_size")


def native_bf16() -> bool:
    """Whether this machine computes bf16 natively: a CUDA GPU that supports it, or a CPU with
    AMX or AVX512-BF16. Elsewhere autocast emulates bf16 and is slower than fp32 (2.8x for a
    SmolLM2 LoRA step on an AVX512 CPU without BF16)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def resolve_precision(mixed_precision: str) -> str:
    """``auto``: bf16 autocast where the hardware has it, else fp32 (``no``)."""
    if mixed_precision != "auto":
        return mixed_precision
    return "bf16" if native_bf16() else "no"


def script_of(section_name: str, section: dict) -> str:
    """The script a params section runs: its ``script:``, else ``<section>4sft.py``."""
    return (section or {}).get("script") or f"{section_name}4sft.py"


# Keys of a methods section that describe the row, not settings of the run.
ROW_KEYS = ("script", "decompose", "base")


def build_config(method: Method, argv: Sequence[str] | None = None) -> SimpleNamespace:
    """The run's settings: params.yaml (train < sequences.<s> < methods.<m>) under the command
    line, every value converted by its declared type (stages/core/settings.py) and checked, and
    every key of those sections a known one, before any work."""
    pre = cfglib.OneLineParser(add_help=False)
    pre.add_argument("--params", default=None)
    pre.add_argument("--sequence", default="default")
    pre.add_argument("--method", default=method.default_method or method.name)
    known, _ = pre.parse_known_args(argv)
    params = cfglib.load_params(known.params)
    where = f"methods.{known.method}"
    # The params section this run reads: the script's own, or a variant naming this script
    # (methods.lora_qv: {script: lora4sft.py, ...}: LoRA with other targets, its own rows).
    method_params = cfglib.section(params, "methods", known.method) or {}
    if not isinstance(method_params, dict):
        fail(f"{where} must be a mapping of settings, got {method_params!r}")
    wanted, mine = script_of(known.method, method_params), method.script or f"{method.name}4sft.py"
    if wanted != mine:
        fail(f"{where} runs methods/{wanted}, not {mine}: run that script, or give --method a section of {mine}")
    own, train_keys = method.settings, settings.names(settings.TrainSettings)
    # A sequence's settings override the shared ones for every method on it (the cognition
    # sequence's one epoch per task); a method's section overrides both (PiSSA's lr, MeZO's steps).
    train: dict = {}
    for name, values in (("train", params.get("train") or {}),
                         (f"sequences.{known.sequence}", cfglib.sequence_settings(params, known.sequence)),
                         (where, method_params)):
        cfglib.check_keys(values, train_keys + (settings.names(own) + list(ROW_KEYS) if name == where else []), name)
        train |= settings.values_of(settings.TrainSettings, values, name)
    run = {"params": str(cfglib.params_path(known.params)), "method": known.method, "sequence": known.sequence,
           "base_model": cfglib.section(params, "base_model", "path")}
    parser = cfglib.OneLineParser(prog=mine, description=method.doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    settings.add_flags(parser, settings.RunSettings, run, "run")
    settings.add_flags(parser, settings.TrainSettings, train,
                       f"training (params.yaml: train, overridden by sequences.{known.sequence} and {where})")
    settings.add_flags(parser, own, settings.values_of(own, method_params, where), f"method (params.yaml: {where})")
    args = vars(parser.parse_args(argv))
    cfg = SimpleNamespace(**asdict(settings.instance(settings.RunSettings, args, "run")),
                          **asdict(settings.instance(settings.TrainSettings, args, "train")),
                          **(asdict(settings.instance(own, args, where)) if own else {}))
    # Every run has its own folders: a row on a sequence with a seed (the pipeline's run key).
    key = f"{cfg.method}-{cfg.sequence}-s{cfg.seed}"
    cfg.output_dir = cfg.output_dir or f"runs/{key}"
    cfg.results_dir = cfg.results_dir or f"results/train/{key}"
    cfg.work_dir = cfg.work_dir or f"checkpoints/{key}"
    # --base_model is a model, or what a decompose stage wrote for this row (init.json names the
    # model to start from, e.g. CorDA's residual, and the folder holds its extras, e.g. CIMEO's masks).
    cfg.init = ""
    init_file = Path(cfg.base_model) / "init.json"
    if init_file.is_file():
        cfg.init, cfg.base_model = cfg.base_model, read_json(init_file)["base_model"]
    cfg.tasks = cfglib.sequence_tasks(params, cfg.sequence)
    cfg.held_out = cfglib.sequence_held_out(params, cfg.sequence)
    cfg.mixed_precision = resolve_precision(cfg.mixed_precision)
    return cfg


def fingerprint(cfg: SimpleNamespace) -> str:
    """Identifies what a run computes: its settings and the bytes of its data, so a checkpoint
    is only ever resumed by the very same run."""
    digest = hashlib.sha256()
    settings = {k: v for k, v in sorted(vars(cfg).items()) if k not in NOT_IN_FINGERPRINT}
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for task in cfg.tasks + cfg.held_out:
        for split in ("train.jsonl", "test.jsonl"):
            path = Path(cfg.tasks_dir) / task / split
            if path.is_file():
                digest.update(path.read_bytes())
    base = Path(cfg.base_model)
    for file in sorted(base.glob("*")) if base.is_dir() else []:
        digest.update(f"{file.name}:{file.stat().st_size}".encode())
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------- checkpoints

class WorkDir:
    """Progress of one run under checkpoints/<row>/<fingerprint>/:
    ``task{i}/`` for every finished task (adapter + scores), ``state/`` for the task in progress."""

    def __init__(self, root: str | Path, key: str, is_main: bool):
        self.root = Path(root) / key
        if is_main:
            # Checkpoints of other settings can never be resumed by this run: remove them.
            for other in Path(root).glob("*") if Path(root).is_dir() else []:
                if other.is_dir() and other.name != key:
                    shutil.rmtree(other, ignore_errors=True)
            self.root.mkdir(parents=True, exist_ok=True)

    def task_dir(self, index: int) -> Path:
        return self.root / f"task{index}"

    def finished(self, index: int) -> dict | None:
        record = self.task_dir(index) / "record.json"
        return read_json(record) if record.is_file() else None

    @property
    def state_dir(self) -> Path:
        return self.root / "state"


def tuned_state(model: torch.nn.Module, names: set[str]) -> dict[str, torch.Tensor]:
    """The tensors a method trains (captured by name at build time, so methods that freeze some
    of them later, like LoRA-FA's A, still checkpoint a fixed set)."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if n in names}


def rng_state() -> dict:
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- training

def reset_peak_memory() -> None:
    """Start a new phase for ``peak_memory_mb``: torch's peak counter on GPU; on Linux the process's
    resident high-water mark (``5 > /proc/self/clear_refs``), so training is not charged with the
    memory scoring used before it. Where the mark cannot be reset, the peak stays the process's."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_mb() -> float:
    """Peak GPU memory allocated by torch since the last ``reset_peak_memory``, or the peak resident
    set on CPU (Linux's VmHWM; elsewhere the process's ru_maxrss)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(parameters that require grad, all parameters); a tied weight counts once."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


# peft inits that rewrite the base weights (W <- W - BA): their adapters are exported as plain
# LoRA adapters of rank 2r relative to the ORIGINAL base, so merging with models/base is exact.
CONVERTED_INITS = ("pissa", "olora")


def needs_conversion(model: torch.nn.Module) -> bool:
    config = getattr(model, "peft_config", {}).get("default")
    init = str(getattr(config, "init_lora_weights", ""))
    return any(init.startswith(name) for name in CONVERTED_INITS)


def export_trained(model: torch.nn.Module, path: Path, initial_adapter: Path | None = None) -> None:
    """peft models save their adapter only (loadable with PeftModel.from_pretrained); plain
    models save their full weights."""
    if initial_adapter is not None:
        save_model(model, path, safe_serialization=True, path_initial_model_for_weight_conversion=str(initial_adapter))
    else:
        save_model(model, path, safe_serialization=True)


def mergeable_copy(model: torch.nn.Module) -> PreTrainedModel:
    """A plain transformers model equal to ``model`` (adapters merged into a copy), for lm-eval."""
    import copy

    from peft import PeftModel

    if isinstance(model, PeftModel):
        return copy.deepcopy(model).merge_and_unload()
    if "_original_forward" in model.__dict__:
        # accelerate wrapped forward in autocast for mixed-precision training: score a copy with
        # the class's own forward, in full precision like the evaluate stage (a full-precision
        # run scores the model itself: no copy, so MeZO's memory stays at inference level).
        plain = copy.deepcopy(model)
        plain.__dict__.pop("forward", None)
        plain.__dict__.pop("_original_forward", None)
        return plain
    return model


class Trainer:
    def __init__(self, method: Method, cfg: SimpleNamespace):
        from accelerate import Accelerator

        self.method, self.cfg = method, cfg
        self.accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
        self.strategy = check_strategy(method, self.accelerator)  # before any work: one line if unsupported
        # Before any work: this run alone writes its folders, and it can (stages/core/outputs.py).
        self.folders = RunFolders({f"--{key}": getattr(cfg, key) for key in RUN_PATH_KEYS}) \
            if self.accelerator.is_main_process else None
        try:
            self._build()
        except BaseException:
            if hasattr(self, "work"):  # a work folder this start created and left empty
                _prune(self.work.root, Path(cfg.work_dir))
            self.release()
            raise
        if self.folders:
            weakref.finalize(self, self.folders.release)  # a Trainer dropped without run()

    def release(self) -> None:
        if self.folders:
            self.folders.release()

    def disk_needs(self, model: torch.nn.Module) -> dict[str, int]:
        """Bytes the run will write at most: per task its exported model and trained tensors in
        the work folder, plus one checkpoint in progress (trained tensors and up to two optimizer
        states per tensor, beside the previous one); per kept model one export in the output
        folder. An export is a peft adapter (x2: PiSSA's and OLoRA's rank-2r conversion), or at
        most the full weights. What an interrupted run already wrote counts as written."""
        full = sum(p.numel() * p.element_size() for p in model.parameters())
        tuned = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        export = 2 * tuned if hasattr(model, "peft_config") else full
        tasks = len(self.tasks)
        written = sum(f.stat().st_size for f in self.work.root.rglob("*") if f.is_file())
        return {"--work_dir": max(0, tasks * (export + tuned) + 6 * tuned - written),
                "--output_dir": (tasks + 1 if self.cfg.save_every_task else 1) * export}

    def _build(self) -> None:
        cfg, method = self.cfg, self.method
        torch.manual_seed(cfg.seed)
        self.tokenizer = load_tokenizer(cfg.base_model)
        # On the device before build, so what builds compute (EVA's calibration, PiSSA's SVD,
        # CIMEO's fingerprint) runs there; before the work folder exists: an unusable model leaves nothing behind.
        model = load_model(cfg.base_model, device=self.accelerator.device)
        self.tasks = [load_task(name, Path(cfg.tasks_dir)) for name in cfg.tasks]
        encode = method.encoder(cfg) if method.encoder else (encode_chat if cfg.chat_template else encode_example)
        self.encoded = [encode_rows(t.train, self.tokenizer, cfg.max_length, t.name, encode) for t in self.tasks]
        self.work = WorkDir(cfg.work_dir, fingerprint(cfg), self.accelerator.is_main_process)
        self.context = Context(self.tokenizer, self.tasks, self.encoded, self.work.root)
        # The denominator of every trained-numbers share: the base model's size, not the model with
        # whatever a method adds (adapters of later tasks, bases, padding).
        self.total = count_parameters(model)[1]
        try:
            model = method.build(model, cfg, self.context)
        except ValueError as err:  # peft's and our checks of a method's settings against the model
            fail(f"method '{method.name}' cannot be applied to '{cfg.base_model}': {str(err).strip().splitlines()[0]}")
        self.tuned = {n for n, p in model.named_parameters() if p.requires_grad}
        if not self.tuned:
            fail(f"method '{method.name}' left no trainable parameters")
        optimizer = method.optimizer(model, cfg, self.context)  # some freeze tensors (LoRA-FA's A): count after it
        self.trainable = method.trainable(model, cfg, self.context) if method.trainable else count_parameters(model)[0]
        if self.folders:
            self.folders.check_space(self.disk_needs(model))
        self.initial_adapter = None
        if needs_conversion(model):
            # PiSSA/OLoRA rewrite W: keep the initial adapter to export plain-LoRA adapters later.
            self.initial_adapter = self.work.root / "initial_adapter"
            if self.accelerator.is_main_process:
                save_model(model, self.initial_adapter)
        self.weights = placement(self.strategy, self.accelerator, model, self.tuned)  # before sharding: FSDP's unsharded copy
        self.model = self.weights.prepare(model, optimizer)
        self.evaluator = Evaluator(cfg.tasks + cfg.held_out, cfg.tasks_dir, cfg.eval_batch_size, max_length=cfg.max_length + 32,
                                   limit=cfg.eval_limit or None, chat_template=cfg.chat_template, scorer=cfg.scorer,
                                   ) if self.accelerator.is_main_process else None

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def load_tuned(self, state: dict[str, torch.Tensor]) -> None:
        """Set the trained tensors (whole, by name) in every process's model."""
        if set(state) != self.tuned:
            fail(f"checkpoint does not match the model ({len(self.tuned ^ set(state))} tensors differ); "
                 "delete the work dir to start over")
        self.weights.load(self.model, state)

    def _save_state(self, step: int, optimizer, scheduler, history: dict) -> None:
        """Write the checkpoint beside the old one, then swap: a kill mid-save keeps the old."""
        acc, state, sharded = self.accelerator, self.work.state_dir, self.weights.sharded
        tmp = state.with_name("state.tmp")
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        with self.weights.gathered(self.model, on_device=False) as model:  # every process: FSDP gathers
            if acc.is_main_process:
                torch.save({"step": step, "tuned": tuned_state(model, self.tuned), "scheduler": scheduler.state_dict(),
                            "processes": acc.num_processes, "strategy": self.strategy,
                            "optimizer": None if sharded else optimizer.state_dict(), "history": history}, tmp / "state.pt")
        # Each process's RNG (dropout differs per process) and, sharded, its part of the optimizer.
        torch.save({"rng": rng_state(), "optimizer": optimizer.state_dict() if sharded else None},
                   tmp / f"process{acc.process_index}.pt")
        acc.wait_for_everyone()
        if acc.is_main_process:
            shutil.rmtree(state, ignore_errors=True)
            tmp.rename(state)
        acc.wait_for_everyone()

    def _load_state(self, task_index: int, optimizer, scheduler) -> tuple[int, dict]:
        path, local = self.work.state_dir / "state.pt", self.work.state_dir / f"process{self.accelerator.process_index}.pt"
        if not path.is_file():
            return 0, {"loss": [], "step_time": []}
        saved = torch.load(path, weights_only=False)  # every process reads it, so all decide alike
        if saved["history"].get("task") != task_index or "processes" not in saved:  # an older layout: start over
            return 0, {"loss": [], "step_time": []}
        if saved["processes"] != self.accelerator.num_processes:
            fail(f"the checkpoint in {self.work.state_dir} was written by {saved['processes']} process(es), this run has "
                 f"{self.accelerator.num_processes}: resume with {saved['processes']} or delete --work_dir to start over")
        local = torch.load(local, weights_only=False)
        self.load_tuned(saved["tuned"])
        optimizer.load_state_dict(local["optimizer"] if self.weights.sharded else saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        set_rng_state(local["rng"])
        self.accelerator.print(f"resumed task {task_index + 1} from step {saved['step']}")
        return saved["step"], saved["history"]

    def train_task(self, index: int) -> dict:
        cfg, acc = self.cfg, self.accelerator
        task, encoded = self.tasks[index], self.encoded[index]
        world, micro = acc.num_processes, cfg.batch_size
        self.context.task_index = index
        optimizer = self.weights.prepare_optimizer(self.method.optimizer(self.unwrapped, cfg, self.context))
        scheduler = get_scheduler(cfg.scheduler, optimizer, num_warmup_steps=int(cfg.warmup_ratio * cfg.steps_per_task),
                                  num_training_steps=cfg.steps_per_task)
        start, history = self._load_state(index, optimizer, scheduler)
        if start == 0:
            # Each task starts from its own RNG state (dropout), not from whatever the previous task's
            # training and lm-eval scoring left: a run resumed between tasks draws the same masks.
            torch.manual_seed(cfg.seed * 1009 + index)
        history["task"] = index
        # Global batch g holds micro*world examples; process r takes its slice of it.
        order = batch_order(len(encoded), micro * world, cfg.steps_per_task * cfg.grad_accum, cfg.seed * 1009 + index)
        self.model.train()
        # Losses since the last log; part of the checkpointed history, so a run resumed between two
        # logs logs the same means as an uninterrupted one.
        window: list[float] = history.setdefault("window", [])
        reset_peak_memory()  # this task's training peak, not the scoring before it
        bar = tqdm(range(start, cfg.steps_per_task), desc=f"task {index + 1}/{len(self.tasks)} {task.name}",
                   disable=not acc.is_local_main_process, initial=start, total=cfg.steps_per_task)
        for step in bar:
            began = time.perf_counter()
            batches = []
            for k in range(cfg.grad_accum):
                ids = order[step * cfg.grad_accum + k][acc.process_index * micro:(acc.process_index + 1) * micro]
                batch = collate([encoded[i] for i in ids], self.tokenizer.pad_token_id)
                batches.append({key: value.to(acc.device) for key, value in batch.items()})
            local_loss = self.method.train_step(StepInputs(self.model, batches, optimizer, acc, cfg))
            scheduler.step()
            loss = acc.reduce(torch.tensor(local_loss, device=acc.device), "mean").item()
            first = history.setdefault("first_loss", loss)
            if not math.isfinite(loss) or loss > DIVERGED * max(first, 1.0):
                kept = f"the last good checkpoint is kept in {self.work.state_dir}" if self.work.state_dir.is_dir() else \
                    "no checkpoint was written yet (lower --lr or --checkpoint_every)"
                fail(f"training diverged: loss {loss:.4g} at step {step + 1} of task '{task.name}' (first step {first:.4g}); {kept}")
            history["step_time"].append(time.perf_counter() - began)
            window.append(loss)
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps_per_task:
                history["loss"].append([step + 1, sum(window) / len(window)])  # mean since the last log
                bar.set_postfix(loss=f"{history['loss'][-1][1]:.4f}")
                window.clear()
            if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps_per_task:
                self._save_state(step + 1, optimizer, scheduler, history)
        history["peak_memory_mb"] = peak_memory_mb()
        return history

    def finish_task(self, index: int, history: dict) -> dict:
        """Save the adapter after task ``index`` and score the tasks of the sequence the metrics need
        (``scored_tasks``; after the last task, the held-out tasks too): their scores, every row's
        outcome and the peak memory of scoring."""
        record = {"task": self.tasks[index].name, "loss": history["loss"], "step_time": history["step_time"],
                  "peak_memory_mb": history["peak_memory_mb"]}
        names = [t.name for t in self.tasks]
        # Every process enters (FSDP gathers the shards); the main process saves and scores.
        with self.weights.gathered(self.model) as model:
            if self.accelerator.is_main_process:
                self.save_and_score(index, model, record, names)
        if self.accelerator.is_main_process:
            shutil.rmtree(self.work.state_dir, ignore_errors=True)
            scored = {**record["scores"], **{f"{k} (held out)": v for k, v in record.get("held_out", {}).items()}}
            self.accelerator.print(f"after {record['task']}: " + ", ".join(f"{k} {v:.3f}" for k, v in scored.items()))
        self.accelerator.wait_for_everyone()
        return self.work.finished(index)

    def save_and_score(self, index: int, model: torch.nn.Module, record: dict, names: list[str]) -> None:
        """The task's finished folder: the exported model, its trained tensors and its scores."""
        with atomic_dir(self.work.task_dir(index)) as tmp:
            if self.method.export:
                self.method.export(model, tmp / "adapter")
            else:
                export_trained(model, tmp / "adapter", self.initial_adapter)
            save_file(tuned_state(model, self.tuned), tmp / "tuned.safetensors")
            reset_peak_memory()
            merged = (self.method.merged or mergeable_copy)(model)
            wanted = [names[i] for i in scored_tasks(len(names), index, self.cfg.full_matrix)]
            held_out = self.cfg.held_out if index == len(names) - 1 else []
            scored = self.evaluator.score(merged, self.tokenizer, wanted + held_out)
            record["scores"] = {task: scored.scores[task] for task in wanted}
            if held_out:
                record["held_out"] = {task: scored.scores[task] for task in held_out}
            record["items"] = scored.items  # the held-out tasks' too
            record["scoring_peak_memory_mb"] = peak_memory_mb()
            del merged, scored
            gc.collect()  # the merged copy goes before the next task's training peak is measured
            atomic_write_json(tmp / "record.json", record)

    def resume_finished(self, index: int) -> dict | None:
        record = self.work.finished(index)
        if record is not None:
            self.load_tuned(load_file(self.work.task_dir(index) / "tuned.safetensors"))
            self.accelerator.print(f"task {index + 1} ({record['task']}) already finished: reusing it")
        return record

    def run(self) -> None:
        try:
            records = []
            for index in range(len(self.tasks)):
                record = self.resume_finished(index)
                if record is None:
                    record = self.finish_task(index, self.train_task(index))
                records.append(record)
            if self.accelerator.is_main_process:
                self.write_outputs(records)
                shutil.rmtree(self.work.root, ignore_errors=True)
            self.accelerator.wait_for_everyone()
        finally:
            self.release()

    def write_outputs(self, records: list[dict]) -> None:
        cfg = self.cfg
        names = [t.name for t in self.tasks]
        matrix = [[r["scores"].get(n) for n in names] for r in records]  # None: a cell not scored
        # The first steps of a task include allocator warm-up: leave them out of the median.
        step_times = [t for r in records for t in (r["step_time"][2:] or r["step_time"])]
        summary = {
            "method": cfg.method, "sequence": cfg.sequence, "tasks": names,
            "chat_template": bool(cfg.chat_template),  # the prompt format every score of the run used
            # numbers the run can change over all its tasks; the base model's size
            "trainable_params": self.trainable, "total_params": self.total,
            "peak_memory_mb": round(max(r["peak_memory_mb"] for r in records), 1),  # training
            "scoring_peak_memory_mb": round(max(r["scoring_peak_memory_mb"] for r in records), 1),
            "step_time_s": round(statistics.median(step_times), 4),
            "AP": average_performance(matrix), "BWT": backward_transfer(matrix),
            "final": dict(zip(names, matrix[-1])),
            "held_out": records[-1].get("held_out", {}),  # the sequence's held-out tasks after the last task
            "matrix": {f"after_{r['task']}": dict(zip(names, row)) for r, row in zip(records, matrix)},
        }
        with atomic_dir(cfg.output_dir) as out:
            for index, record in enumerate(records if cfg.save_every_task else []):
                shutil.copytree(self.work.task_dir(index) / "adapter", out / f"after_{index + 1}_{record['task']}")
            shutil.copytree(self.work.task_dir(len(records) - 1) / "adapter", out / "final")
            atomic_write_json(out / "train_config.json", vars(cfg))
        with atomic_dir(cfg.results_dir) as res:
            write_live(res, records, summary)
            # every scored cell's row outcomes: {after_<task>: {task: {row id: outcome}}}
            atomic_write_json(res / ITEMS_FILE, {f"after_{r['task']}": r["items"] for r in records})


# What `dvc metrics show` and `dvc exp show` list of a run (metrics.json); the rest of its summary
# (the accuracy matrix, parameter counts, memory, step time) is in details.json beside it.
SUMMARY_METRICS = ("AP", "BWT", "final", "held_out")


def write_live(folder: Path, records: list[dict], summary: dict) -> None:
    """The run's results: its loss curve in dvclive's layout (plots/metrics/train/loss.tsv), its
    summary metrics (metrics.json), the rest of its summary (details.json), and loss.png and
    accuracy.png (the loss at every logged step, the accuracy matrix): the plots dvc.yaml declares,
    images, so that `dvc plots show` needs no network."""
    from dvclive import Live

    from .plots import plot_losses, plot_matrices

    curve = []
    with Live(dir=str(folder), save_dvc_exp=False, dvcyaml=None, report=None) as live:
        offset = 0
        for record in records:
            for step, loss in record["loss"]:
                live.step = offset + step
                live.log_metric("train/loss", loss, plot=True)
                curve.append([offset + step, loss])
            offset += record["loss"][-1][0] if record["loss"] else 0
    (folder / "report.html").unlink(missing_ok=True)
    # dvclive's own metrics.json adds its step and last loss: two more columns per run in `dvc exp show`.
    atomic_write_json(folder / "metrics.json", {key: summary[key] for key in SUMMARY_METRICS})
    atomic_write_json(folder / "details.json", {k: v for k, v in summary.items() if k not in SUMMARY_METRICS})
    tasks = summary["tasks"]
    line = {"row": summary["method"], "tasks": tasks, "AP": summary["AP"], "BWT": summary["BWT"], "loss_curve": curve,
            "matrix": [[summary["matrix"][f"after_{t}"][u] for u in tasks] for t in tasks]}
    plot_losses([line], folder / "loss.png", f"{summary['method']}: training loss over {' → '.join(tasks)}")
    plot_matrices([line], folder / "accuracy.png")


@cli_entry
def main(method: Method, argv: Sequence[str] | None = None) -> None:
    """Entry point of every ``methods/<name>4sft.py``."""
    cfg = build_config(method, argv)
    Trainer(method, cfg).run()
