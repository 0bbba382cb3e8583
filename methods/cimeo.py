"""CIMEO: cognition-specific sparse continual fine-tuning, and the analyses of its masks.

One module holds everything CIMEO's script (methods/cimeo4sft.py, both forms), its decompose step
(build_cimeo_masks.py) and its analyses (stages/analysis/*.py) share:

* gradient-frequency masks: for a task's training rows, forward/backward batch by batch on the
  base model; for every masked parameter W (``masked_parameters``: every parameter but the
  embedding and the LM head, norms included, as the authors' code; or only the attention and MLP
  linears) count per entry how often |∂L/∂W| is among the top ``density`` fraction of W (strategy
  ``max``) or the bottom fraction (``min``); the floor(density·|W|) entries counted most often are
  the task's index set I_c (ties broken by the summed |grad|: larger first for max, smaller first
  for min). ``random`` draws a seeded subset of the same size. Masks are sorted flat indices into
  ``W.view(-1)``;
* ``SparseAdamW``: AdamW whose step touches W[I] only, with moments of size |I|;
* encodings: SFT (loss on the answer, in the run's prompt format: the chat template's assistant
  turn, or after the plain prompt) and the pretraining form (every token of the plain text);
* set overlap of masks (overall, per layer) and principal angles between base and tuned weights.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
import tempfile
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from stages.core.batches import causal_lm_loss, collate, encode_chat, encode_example
from stages.core.errors import fail
from stages.core.io import atomic_dir, atomic_write_json, atomic_write_text, read_json

import torch

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
STRATEGIES = ("max", "min", "random")
OBJECTIVES = ("sft", "pretrain")
DENSE_CHOICES = ("all", "norms", "none")
MASKED_CHOICES = ("all", "matrices")
MASKS_JSON = "masks.json"
FORMAT_VERSION = 1
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


# ----------------------------------------------------------------------------- encodings

def encode_pretrain(row: dict, tokenizer, max_length: int, where: str = "") -> dict:
    """CIMEO's pretraining form: the task text prompt + " " + answer + EOS as plain text, and the
    causal-LM loss on ALL of its tokens (labels = input ids). Too long a text keeps its end."""
    ids = tokenizer(row["prompt"] + " " + row["answer"], add_special_tokens=False)["input_ids"]
    ids = (ids + [tokenizer.eos_token_id])[-max_length:]
    if len(ids) < 2:
        fail(f"{where or 'example'}: fewer than 2 tokens to learn from")
    return {"input_ids": ids, "labels": list(ids)}


def encoder_for(objective: str, chat_template: bool):
    """How a task row is encoded, for training and for its masks alike. The SFT form learns the
    answer in the run's prompt format: through the chat template (user turn = prompt, assistant
    turn = answer) where the sequence sets ``chat_template``, else on the plain prompt, like every
    other row of the table it is compared in. The pretraining form learns every token of the plain
    text; it has no chat form."""
    if objective not in OBJECTIVES:
        fail(f"--objective '{objective}' is not valid: expected one of {', '.join(OBJECTIVES)}")
    if objective == "pretrain":
        if chat_template:
            fail("--chat_template does not fit CIMEO's pretrain form (every token of the plain text): run it on a "
                 "sequence without chat_template, or use the sft form (--objective sft)")
        return encode_pretrain
    return encode_chat if chat_template else encode_example


# ----------------------------------------------------------------------------- target weights

def target_weights(model: torch.nn.Module, targets: Sequence[str] = DEFAULT_TARGETS) -> dict[str, torch.nn.Parameter]:
    """``{parameter name: weight}`` of every Linear whose last name part is in ``targets``
    (q_proj, ..., down_proj). Embeddings and the LM head are never targets."""
    never = sorted(set(targets) & {"lm_head", "embed_tokens"})
    if never:
        fail(f"CIMEO never masks {', '.join(never)}: targets are attention and MLP linears (q_proj ... down_proj)")
    found = {}
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module_name.rsplit(".", 1)[-1] in targets:
            found[f"{module_name}.weight"] = module.weight
    if not found:
        fail(f"no linear layer named {', '.join(targets)} in the model: check --targets")
    return found


def masked_parameters(model: torch.nn.Module, targets: Sequence[str] = DEFAULT_TARGETS,
                      masked: str = "all") -> dict[str, torch.nn.Parameter]:
    """``{parameter name: tensor}`` of what carries a mask, in model order. ``all`` (the authors'
    code): every parameter but the input embedding and the LM head, so norms and biases are masked
    to ``density`` too; ``matrices``: only the target linears' weights (``target_weights``)."""
    if masked not in MASKED_CHOICES:
        fail(f"--masked '{masked}' is not valid: expected one of {', '.join(MASKED_CHOICES)}")
    weights = target_weights(model, targets)
    if masked == "matrices":
        return weights
    embeddings = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):  # transformers models have both
        module = getattr(model, getter, lambda: None)()
        if module is not None:
            embeddings.add(id(module.weight))
    return {name: param for name, param in model.named_parameters() if id(param) not in embeddings}


def layer_index(name: str) -> int | None:
    """The decoder layer a parameter belongs to (model.layers.12.self_attn.q_proj.weight -> 12), or
    None for one outside every layer (the final norm)."""
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def layer_of(name: str) -> int:
    """The decoder layer index in a parameter name (model.layers.12.self_attn.q_proj.weight -> 12)."""
    match = _LAYER.search(name)
    if match is None:
        fail(f"parameter '{name}' is not inside a numbered decoder layer")
    return int(match.group(1))


def model_fingerprint(model: torch.nn.Module, targets: Sequence[str] = DEFAULT_TARGETS, masked: str = "all") -> str:
    """sha256 over the masked parameters' names, shapes, dtypes and bytes: a mask records the model
    it was built on, so masks of another model (or another checkpoint) are refused."""
    digest = hashlib.sha256()
    for name, weight in sorted(masked_parameters(model, targets, masked).items()):
        data = weight.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tuple(data.shape)}:{data.dtype}".encode())
        digest.update(memoryview(data.view(torch.uint8).numpy()) if data.dtype == torch.bfloat16
                      else memoryview(data.numpy()))
    return digest.hexdigest()[:20]


def keep_count(numel: int, density: float) -> int:
    """|I| for a tensor of ``numel`` entries: floor(density·numel) as the authors' code
    (int(0.1 * numel)), at least 1."""
    return max(1, min(numel, int(density * numel)))


# ----------------------------------------------------------------------------- masks

def _seed_for(seed: int, task: str, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(f"{task}:{name}".encode())) % (2**63 - 1)


def random_masks(shapes: Mapping[str, torch.Size], density: float, seed: int, task: str) -> dict[str, torch.Tensor]:
    """A seeded uniformly random subset of size keep_count(numel, density) per matrix (independent
    per task and matrix: the seed mixes in both names)."""
    masks = {}
    for name, shape in shapes.items():
        numel = math.prod(shape)
        generator = torch.Generator().manual_seed(_seed_for(seed, task, name))
        masks[name] = torch.randperm(numel, generator=generator)[:keep_count(numel, density)].sort().values
    return masks


def select_frequent(counts: torch.Tensor, magnitude: torch.Tensor, k: int, strategy: str) -> torch.Tensor:
    """The k entries counted most often; among equal counts, larger summed |grad| first (max) or
    smaller first (min). One float64 key, count + a tie-break fraction in [0, 0.5] that can never
    reach the next count, and one top-k (no sort of the whole matrix, no Python loop). Returns
    sorted indices."""
    magnitude = magnitude.to(torch.float64)
    fraction = magnitude / (2 * float(magnitude.max()) + 1e-300)  # in [0, 0.5]
    key = counts.to(torch.float64) + (fraction if strategy == "max" else 0.5 - fraction)
    return torch.topk(key, k, sorted=False).indices.sort().values


class GradientCounter:
    """Accumulates, per target matrix, how often each entry's |grad| is in the top (max) or
    bottom (min) ``density`` fraction of its matrix, and the summed |grad| (the tie-breaker)."""

    def __init__(self, weights: Mapping[str, torch.nn.Parameter], strategy: str, density: float):
        if strategy not in ("max", "min"):
            fail(f"strategy '{strategy}' needs no gradients: expected max or min here")
        self.weights, self.strategy, self.density = dict(weights), strategy, density
        self.counts = {n: torch.zeros(w.numel(), dtype=torch.int32, device=w.device) for n, w in self.weights.items()}
        self.magnitude = {n: torch.zeros(w.numel(), dtype=torch.float32, device=w.device) for n, w in self.weights.items()}
        self.batches = 0

    def add(self, grads: Mapping[str, torch.Tensor]) -> None:
        for name, grad in grads.items():
            flat = grad.detach().reshape(-1).abs().float()
            k = keep_count(flat.numel(), self.density)
            chosen = torch.topk(flat, k, largest=(self.strategy == "max"), sorted=False).indices
            self.counts[name][chosen] += 1  # topk indices are distinct
            self.magnitude[name] += flat
        self.batches += 1

    def masks(self) -> dict[str, torch.Tensor]:
        return {name: select_frequent(self.counts[name], self.magnitude[name], keep_count(self.counts[name].numel(), self.density),
                                      self.strategy)
                for name in self.weights}


def gradient_masks(model: torch.nn.Module, batches: Iterable[dict], strategy: str, density: float,
                   targets: Sequence[str] = DEFAULT_TARGETS, seed: int = 0, task: str = "",
                   masked: str = "all") -> dict[str, torch.Tensor]:
    """I_c for every masked parameter of ``model`` (``masked_parameters``) from its gradients on ``batches`` (dicts of
    input_ids / attention_mask / labels). The model's weights are left as they were; its
    ``.grad`` fields are cleared. ``random`` ignores the batches. Gradients are computed in the
    model's own precision (no autocast), in eval mode (no dropout)."""
    if strategy not in STRATEGIES:
        fail(f"--strategy '{strategy}' is not valid: expected one of {', '.join(STRATEGIES)}")
    if not 0 < density <= 1:
        fail(f"--density must be in (0, 1], got {density}")
    weights = masked_parameters(model, targets, masked)
    if strategy == "random":
        return random_masks({n: w.shape for n, w in weights.items()}, density, seed, task)
    counter = GradientCounter(weights, strategy, density)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    model.eval()  # deterministic: no dropout while ranking gradients
    try:
        for param in model.parameters():
            param.requires_grad_(any(param is w for w in weights.values()))
            param.grad = None
        device = next(model.parameters()).device
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.enable_grad():
                causal_lm_loss(model, batch).backward()
            counter.add({n: w.grad for n, w in weights.items()})
            for w in weights.values():
                w.grad = None
        if counter.batches == 0:
            fail("no batches to compute gradient masks from")
    finally:
        for name, param in model.named_parameters():
            param.requires_grad_(flags[name])
            param.grad = None
        model.train(was_training)
    return counter.masks()


def mask_batches(encoded: list[dict], pad_id: int, batch_size: int, n_batches: int) -> list[dict]:
    """The batches masks are computed from: with ``n_batches`` = 0, one pass over all the rows in
    order; otherwise the first ``n_batches`` consecutive batches (wrapping around)."""
    if not encoded:
        fail("no training rows to compute masks from")
    if n_batches <= 0:
        n_batches = math.ceil(len(encoded) / batch_size)
        rows = [encoded[i:i + batch_size] for i in range(0, len(encoded), batch_size)]
    else:
        rows = [[encoded[(b * batch_size + j) % len(encoded)] for j in range(batch_size)] for b in range(n_batches)]
    return [collate(r, pad_id) for r in rows]


# ----------------------------------------------------------------------------- saving and loading

def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_masks(out: Path, masks_by_task: Mapping[str, Mapping[str, torch.Tensor]], meta: dict) -> None:
    """``<out>/<task>.safetensors`` (one int32 (int64 if needed) tensor of sorted flat indices per
    weight name) and ``<out>/masks.json`` ({settings..., "tasks": {task: {...}}}), into an existing
    folder (callers wrap it in atomic_dir)."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    record = dict(meta, format=FORMAT_VERSION, tasks={})
    for task, masks in masks_by_task.items():
        big = any(int(idx.max()) >= 2**31 for idx in masks.values() if idx.numel())
        tensors = {name: idx.to(torch.int64 if big else torch.int32).contiguous() for name, idx in masks.items()}
        save_file(tensors, str(out / f"{task}.safetensors"), metadata={"task": task})
        (out / f"{task}.safetensors").chmod(0o666 & ~_umask())  # safetensors writes 0600
        record["tasks"][task] = {"file": f"{task}.safetensors", "selected": int(sum(i.numel() for i in masks.values())),
                                 "weights": len(masks)}
    atomic_write_json(out / MASKS_JSON, record)


def read_masks_meta(folder: str | Path) -> dict:
    path = Path(folder) / MASKS_JSON
    if not path.is_file():
        fail(f"'{folder}' holds no {MASKS_JSON}: expected a folder written by methods/build_cimeo_masks.py")
    try:
        meta = read_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        fail(f"{path}: not valid JSON ({err})")
    if not isinstance(meta, dict) or not isinstance(meta.get("tasks"), dict):
        fail(f"{path}: not a CIMEO masks record (no 'tasks')")
    return meta


def load_task_masks(folder: str | Path, task: str, shapes: Mapping[str, torch.Size] | None = None,
                    fingerprint: str | None = None) -> dict[str, torch.Tensor]:
    """Task ``task``'s masks as sorted int64 flat indices, after checking that they exist, were
    built for the model with ``fingerprint`` and fit the weights of ``shapes``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    meta = read_masks_meta(folder)
    if task not in meta["tasks"]:
        fail(f"no CIMEO mask for task '{task}' in {folder} (it has: {', '.join(meta['tasks']) or 'none'}): "
             f"run methods/build_cimeo_masks.py for it")
    if fingerprint is not None and meta.get("model_fingerprint") != fingerprint:
        fail(f"the masks in {folder} were built for another model ({meta.get('model_id')}, fingerprint "
             f"{meta.get('model_fingerprint')}; this model's is {fingerprint}): rebuild them for this model")
    path = Path(folder) / meta["tasks"][task]["file"]
    try:
        masks = {name: t.to(torch.int64) for name, t in load_file(str(path)).items()}
    except (OSError, SafetensorError) as err:
        fail(f"cannot read the mask of task '{task}' ({path}): {err}")
    if shapes is not None:
        missing, extra = sorted(set(shapes) - set(masks)), sorted(set(masks) - set(shapes))
        if missing or extra:
            fail(f"the mask of task '{task}' in {folder} does not match the model's target weights "
                 f"({len(missing)} missing, e.g. {missing[:1]}; {len(extra)} unknown, e.g. {extra[:1]})")
        for name, idx in masks.items():
            numel = math.prod(shapes[name])
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= numel):
                fail(f"the mask of task '{task}' indexes outside '{name}' ({numel} entries)")
    return masks


def load_all_masks(folder: str | Path, tasks: Sequence[str] | None = None) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """(masks.json record, {task: {weight: indices}}) for ``tasks`` (default: all, in saved order)."""
    meta = read_masks_meta(folder)
    names = list(tasks) if tasks else list(meta["tasks"])
    return meta, {task: load_task_masks(folder, task) for task in names}


# ----------------------------------------------------------------------------- SparseAdamW

class SparseAdamW(torch.optim.Optimizer):
    """AdamW that updates only the entries I of a masked matrix W (CIMEO's update rule).

    For a parameter with a mask I (sorted flat indices into W.view(-1)) the state is m, v of size
    |I|; each step, with g = ∇W.view(-1)[I] and t the step count:
        w = W[I];  w ← w·(1 − lr·wd);  m ← β1·m + (1 − β1)·g;  v ← β2·v + (1 − β2)·g²
        w ← w − lr·(m / (1 − β1ᵗ)) / (√(v / (1 − β2ᵗ)) + eps);  W[I] ← w
    and every other entry of W is left bit for bit as it was. Parameters without a mask get the
    same AdamW step densely. ``masks`` maps parameters to index tensors; they are not part of the
    state dict (which holds only m, v and t), but a digest of them is, so loading a state saved
    for other masks fails."""

    def __init__(self, params, masks: Mapping[torch.Tensor, torch.Tensor] | None = None, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"invalid SparseAdamW settings lr={lr} betas={betas} eps={eps} weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        members = {id(p) for group in self.param_groups for p in group["params"]}
        self._masks: dict[int, torch.Tensor] = {}
        digest = hashlib.sha256()
        order = {id(p): i for i, p in enumerate(p for group in self.param_groups for p in group["params"])}
        for param, index in sorted((masks or {}).items(), key=lambda item: order.get(id(item[0]), -1)):
            if id(param) not in members:
                raise ValueError("a mask is given for a tensor that is not one of the optimizer's parameters")
            if not param.is_contiguous():
                raise ValueError("masked parameters must be contiguous (the mask indexes W.view(-1))")
            index = torch.as_tensor(index).to(device=param.device, dtype=torch.int64).reshape(-1)
            if index.numel() and (int(index.min()) < 0 or int(index.max()) >= param.numel()):
                raise ValueError(f"mask indices out of range for a parameter of {param.numel()} entries")
            if index.numel() > 1 and not bool((index[1:] > index[:-1]).all()):
                index = torch.unique(index)  # sorted and distinct: index_copy_ must not see duplicates
            self._masks[id(param)] = index
            digest.update(f"{order[id(param)]}:{param.numel()}:".encode())
            digest.update(memoryview(index.cpu().numpy()))
        self.mask_digest = digest.hexdigest()[:16]

    def mask_of(self, param: torch.Tensor) -> torch.Tensor | None:
        return self._masks.get(id(param))

    def state_numel(self) -> int:
        """Elements held in the moment buffers (2·|I| per masked matrix, 2·numel per dense one)."""
        return sum(t.numel() for s in self.state.values() for k, t in s.items() if k in ("exp_avg", "exp_avg_sq"))

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["mask_digest"] = self.mask_digest
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        saved = state_dict.pop("mask_digest", None)
        if saved is not None and saved != self.mask_digest:
            fail("the optimizer state was saved with other CIMEO masks; delete the work dir to start over")
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for param in group["params"]:
                index, state = self.mask_of(param), self.state.get(param)
                if state and "exp_avg" in state:
                    expected = index.numel() if index is not None else param.numel()
                    if state["exp_avg"].numel() != expected:
                        fail(f"optimizer state of {state['exp_avg'].numel()} entries does not fit a mask of {expected}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                index = self.mask_of(param)
                state = self.state[param]
                if not state:
                    size = (index.numel(),) if index is not None else param.shape
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros(size, dtype=torch.float32, device=param.device)
                    state["exp_avg_sq"] = torch.zeros(size, dtype=torch.float32, device=param.device)
                for key in ("exp_avg", "exp_avg_sq"):  # a loaded state is cast to the parameter's dtype
                    if state[key].dtype != torch.float32:
                        state[key] = state[key].float()
                state["step"] += 1
                t = float(state["step"])
                if index is not None:
                    flat = param.data.view(-1)
                    grad = param.grad.reshape(-1).index_select(0, index).float()
                    weight = flat.index_select(0, index).float()
                else:
                    grad = param.grad.float()
                    weight = param.data.float() if param.dtype != torch.float32 else param.data
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                if decay:
                    weight.mul_(1 - lr * decay)
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2 ** t)).add_(eps)
                weight.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1 ** t))
                if index is not None:
                    flat.index_copy_(0, index, weight.to(param.dtype))
                elif weight is not param.data:
                    param.data.copy_(weight)
        return loss


# ----------------------------------------------------------------------------- the method

MASKS_IN_MODEL = "cimeo_masks"  # build_cimeo_masks.py --save_model: the masks beside the model copy


METHOD_KEYS = ("objective", "strategy", "density", "masks", "mask_batches", "mask_batch_size", "masked", "dense",
               "adam_eps", "target_modules")


def check_method_settings(cfg) -> None:
    missing = [key for key in METHOD_KEYS if not hasattr(cfg, key)]
    if missing:
        fail(f"params.yaml methods.{cfg.method} lacks {', '.join(missing)} (CIMEO needs {', '.join(METHOD_KEYS)})")
    if cfg.objective not in OBJECTIVES:
        fail(f"--objective '{cfg.objective}' is not valid: expected one of {', '.join(OBJECTIVES)}")
    if cfg.strategy not in STRATEGIES:
        fail(f"--strategy '{cfg.strategy}' is not valid: expected one of {', '.join(STRATEGIES)}")
    if not 0 < cfg.density <= 1:
        fail(f"--density must be in (0, 1], got {cfg.density}")
    if cfg.dense not in DENSE_CHOICES:
        fail(f"--dense '{cfg.dense}' is not valid: expected one of {', '.join(DENSE_CHOICES)}")
    if cfg.masked not in MASKED_CHOICES:
        fail(f"--masked '{cfg.masked}' is not valid: expected one of {', '.join(MASKED_CHOICES)}")
    if not cfg.adam_eps >= 0:
        fail(f"--adam_eps must be >= 0, got {cfg.adam_eps}")
    if cfg.mask_batches < 0 or cfg.mask_batch_size <= 0:
        fail(f"--mask_batches must be >= 0 and --mask_batch_size > 0, got {cfg.mask_batches} and {cfg.mask_batch_size}")


def masks_settings(objective: str, strategy: str, density: float, batches: int, batch_size: int, max_length: int,
                   targets: Sequence[str], seed: int, masked: str, chat_template: bool) -> dict:
    """What a mask depends on besides the model and the rows (recorded in masks.json): among them
    what is masked and the prompt format the rows were encoded in (the gradients differ)."""
    return {"objective": objective, "strategy": strategy, "density": density, "batches": batches,
            "batch_size": batch_size, "max_length": max_length, "targets": sorted(targets), "seed": seed,
            "masked": masked, "chat_template": bool(chat_template)}


def check_masks_match(folder: Path, meta: dict, wanted: dict) -> None:
    """Masks given to a run must have been built with the run's strategy, density, objective,
    targets, masked parameters and prompt format (the number of batches and the batch size may differ)."""
    for key in ("objective", "strategy", "density", "targets", "masked", "chat_template"):
        saved = meta.get(key)
        if key == "targets" and saved is not None:
            saved = sorted(saved)
        if saved != wanted[key]:
            fail(f"the masks in {folder} were built with {key} {saved} but this run uses {wanted[key]}: "
                 f"rebuild them (methods/build_cimeo_masks.py) or make the settings agree")


def compute_task_masks(model: torch.nn.Module, encoded: Sequence[list[dict]], task_names: Sequence[str], pad_id: int,
                       settings: dict) -> dict[str, dict[str, torch.Tensor]]:
    """Masks of every task, all on the model as given (the base model)."""
    return {name: gradient_masks(model, mask_batches(rows, pad_id, settings["batch_size"], settings["batches"]),
                                 settings["strategy"], settings["density"], settings["targets"], settings["seed"], name,
                                 settings["masked"])
            for name, rows in zip(task_names, encoded)}


def build(model: torch.nn.Module, cfg, ctx) -> torch.nn.Module:
    """Full-weight model: every masked parameter trainable (--masked all: everything but the
    embedding / LM head, as the authors' code; matrices: the target linears), updated on its task's
    mask only; the unmasked parameters trained densely or frozen by --dense (all: every one, i.e.
    the tied embedding / LM head as the authors' code, plus the norms under --masked matrices;
    norms: unmasked 1-D parameters only; none: the masked entries are the only numbers that
    change). Finds (or computes) a mask for every task of the sequence and checks it was built
    for this model with this run's settings, before any training."""
    from accelerate import PartialState

    check_method_settings(cfg)
    objective = cfg.objective
    encoder_for(objective, cfg.chat_template)
    weights = masked_parameters(model, cfg.target_modules, cfg.masked)
    fingerprint = model_fingerprint(model, cfg.target_modules, cfg.masked)
    tasks = [t.name for t in ctx.tasks]
    wanted = masks_settings(objective, cfg.strategy, cfg.density, cfg.mask_batches, cfg.mask_batch_size, cfg.max_length,
                            cfg.target_modules, cfg.seed, cfg.masked, cfg.chat_template)
    # the decompose stage's masks (models/init/<row>-<sequence>/model/cimeo_masks), or masks saved
    # beside a model folder
    beside_model = (Path(cfg.init) / "model" if cfg.init else Path(cfg.base_model)) / MASKS_IN_MODEL
    if cfg.masks:
        folder, source = Path(cfg.masks), f"--masks {cfg.masks}"
    elif (beside_model / MASKS_JSON).is_file():
        folder, source = beside_model, f"{beside_model} (written by build_cimeo_masks.py --save_model)"
    else:
        folder, source = Path(ctx.work_dir) / "masks", "computed in-process on the base model"
        state = PartialState()
        meta = read_masks_meta(folder) if (folder / MASKS_JSON).is_file() else None
        fresh = meta is None or meta.get("model_fingerprint") != fingerprint or set(meta["tasks"]) != set(tasks) or any(
            meta.get(k) != v for k, v in wanted.items())
        if fresh and state.is_main_process:
            model.to(state.device)
            masks = compute_task_masks(model, ctx.encoded, tasks, ctx.tokenizer.pad_token_id, wanted)
            with atomic_dir(folder) as tmp:
                save_masks(tmp, masks, dict(wanted, model_id=str(cfg.base_model), model_fingerprint=fingerprint))
            del masks
        state.wait_for_everyone()
    meta = read_masks_meta(folder)
    check_masks_match(folder, meta, wanted)
    for task in tasks:  # every task's mask exists, fits and belongs to this model: fail now, not at task 5
        load_task_masks(folder, task, {n: w.shape for n, w in weights.items()}, fingerprint)
    ctx.cimeo = {"folder": folder, "fingerprint": fingerprint, "source": source}
    cfg.mask_source = source
    masked = {id(w) for w in weights.values()}
    for param in model.parameters():
        dense = cfg.dense == "all" or (cfg.dense == "norms" and param.ndim < 2)
        param.requires_grad_(id(param) in masked or dense)
    return model


def optimizer(model: torch.nn.Module, cfg, ctx) -> SparseAdamW:
    """SparseAdamW for task ``ctx.task_index``: its mask on every masked parameter, dense AdamW on
    the other trainable parameters (no decay on 1-D ones); eps --adam_eps (the authors' 1e-5)."""
    task = ctx.tasks[ctx.task_index].name
    weights = masked_parameters(model, cfg.target_modules, cfg.masked)
    masks = load_task_masks(ctx.cimeo["folder"], task, {n: w.shape for n, w in weights.items()}, ctx.cimeo["fingerprint"])
    masked = {id(w) for w in weights.values()}
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return SparseAdamW([g for g in groups if g["params"]], masks={weights[n]: idx for n, idx in masks.items()
                                                                  if id(weights[n]) in masked}, lr=cfg.lr, eps=cfg.adam_eps)


def trainable(model: torch.nn.Module, cfg, ctx) -> int:
    """The numbers a CIMEO run can change over its sequence: the union of its tasks' masked
    entries (what any task's SparseAdamW may touch) plus every parameter trained densely."""
    weights = masked_parameters(model, cfg.target_modules, cfg.masked)
    touched = {name: torch.zeros(w.numel(), dtype=torch.bool) for name, w in weights.items()}
    for task in ctx.tasks:
        for name, index in load_task_masks(ctx.cimeo["folder"], task.name).items():
            touched[name][index] = True
    masked = {id(w) for w in weights.values()}
    dense = sum(p.numel() for p in model.parameters() if p.requires_grad and id(p) not in masked)
    return sum(int(flags.sum()) for flags in touched.values()) + dense


def make_method(doc: str, settings: type):
    """The Method of methods/cimeo4sft.py: its params section's ``objective`` picks the form, sft
    (loss on the answer, in the sequence's prompt format) or pretrain (every token of the plain text)."""
    from stages.core.sft import Method

    def encoder(cfg):
        check_method_settings(cfg)
        return encoder_for(cfg.objective, cfg.chat_template)

    return Method("cimeo", build, optimizer=optimizer, doc=doc, encoder=encoder, settings=settings, trainable=trainable,
                  refuses={"FSDP": "its task masks select entries of whole weight matrices (indices into each "
                                   "matrix, in its sparse AdamW); FSDP gives each process a slice of every weight"})


# ----------------------------------------------------------------------------- overlap

def set_overlap(a: torch.Tensor, b: torch.Tensor) -> tuple[int, int]:
    """(|a ∩ b|, |a|) for two index sets (true set intersection: torch.isin, order irrelevant)."""
    if a.numel() == 0:
        return 0, 0
    return int(torch.isin(a, b).sum()), int(a.numel())


def weight_overlaps(mask_a: Mapping[str, torch.Tensor], mask_b: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, int]]:
    """Per weight name: (|I_a ∩ I_b|, |I_a|)."""
    if set(mask_a) != set(mask_b):
        fail(f"the two masks cover different weights ({len(set(mask_a) ^ set(mask_b))} differ): built for different models?")
    return {name: set_overlap(mask_a[name], mask_b[name]) for name in mask_a}


def overall_overlap(mask_a, mask_b) -> float:
    """|I_a ∩ I_b| / |I_a| over all weights together."""
    parts = weight_overlaps(mask_a, mask_b).values()
    total = sum(size for _, size in parts)
    return sum(inter for inter, _ in parts) / total if total else float("nan")


def layer_overlap(mask_a, mask_b) -> dict[int, float]:
    """|I_a ∩ I_b| / |I_a| per decoder layer (all target matrices of the layer together)."""
    sums: dict[int, list[int]] = {}
    for name, (inter, size) in weight_overlaps(mask_a, mask_b).items():
        if layer_index(name) is None:  # the final norm belongs to no layer
            continue
        acc = sums.setdefault(layer_of(name), [0, 0])
        acc[0] += inter
        acc[1] += size
    return {layer: inter / size if size else float("nan") for layer, (inter, size) in sorted(sums.items())}


def overlap_matrix(masks: Mapping[str, Mapping[str, torch.Tensor]]) -> tuple[list[str], list[list[float]]]:
    """Tasks and the matrix M[i][j] = |I_i ∩ I_j| / |I_i| (1 on the diagonal). Each unordered
    pair's intersection is computed once: M[j][i] is the same count over |I_j|."""
    tasks = list(masks)
    sizes = [sum(int(v.numel()) for v in masks[t].values()) for t in tasks]
    matrix = [[1.0 if size else float("nan")] * len(tasks) for size in sizes]
    for i, j in itertools.combinations(range(len(tasks)), 2):
        inter = sum(count for count, _ in weight_overlaps(masks[tasks[i]], masks[tasks[j]]).values())
        matrix[i][j] = inter / sizes[i] if sizes[i] else float("nan")
        matrix[j][i] = inter / sizes[j] if sizes[j] else float("nan")
    return tasks, matrix


def mean_layer_overlap(masks: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[int, dict[str, float]]:
    """Per layer: mean, min and max over the ordered pairs i ≠ j of |I_i ∩ I_j| / |I_i| (each
    unordered pair's intersections computed once)."""
    tasks = list(masks)
    if len(tasks) < 2:
        fail(f"the overlap needs at least two tasks' masks, got {len(tasks)}")
    per_pair = []
    for a, b in itertools.combinations(tasks, 2):
        sums: dict[int, list[int]] = {}
        for name, (inter, size_a) in weight_overlaps(masks[a], masks[b]).items():
            if layer_index(name) is None:
                continue
            acc = sums.setdefault(layer_of(name), [0, 0, 0])
            acc[0] += inter
            acc[1] += size_a
            acc[2] += int(masks[b][name].numel())
        per_pair.append({layer: inter / size_a if size_a else float("nan") for layer, (inter, size_a, _) in sums.items()})
        per_pair.append({layer: inter / size_b if size_b else float("nan") for layer, (inter, _, size_b) in sums.items()})
    return {layer: {"mean": sum(p[layer] for p in per_pair) / len(per_pair),
                    "min": min(p[layer] for p in per_pair), "max": max(p[layer] for p in per_pair)}
            for layer in per_pair[0]}


# ----------------------------------------------------------------------------- principal angles

def left_singular_vectors(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, S) of W (out x in) in float64, singular values descending."""
    u, s, _ = torch.linalg.svd(weight.detach().to(torch.float64), full_matrices=False)
    return u, s


def principal_angles(q1: torch.Tensor, q2: torch.Tensor) -> torch.Tensor:
    """Principal angles (degrees, ascending) between span(q1) and span(q2), both with orthonormal
    columns: θ_i = arccos(σ_i(q1ᵀq2)), σ clamped to [0, 1]."""
    cosines = torch.linalg.svdvals(q1.T.to(torch.float64) @ q2.to(torch.float64)).clamp(0.0, 1.0)
    return torch.rad2deg(torch.arccos(cosines)).sort().values


def subspace_metrics(base: torch.Tensor, tuned: torch.Tensor, ks: Sequence[int] = (8, 32)) -> dict[int, dict[str, float]]:
    """For each k: the principal angles between the top-k left singular subspaces of the base W0
    and the tuned Wt (mean and max, degrees); the subspace overlap ‖U0_kᵀ Ut_k‖²_F / k (= mean
    cos²θ, 1 for the same subspace, 0 for orthogonal ones); and the energy ratio
        E_k = ‖U0_kᵀ Wt‖²_F / ‖Wt‖²_F,
    the fraction of the tuned matrix's energy (squared Frobenius norm) that lies in the base
    model's top-k left singular subspace, next to the base's own fraction
        E0_k = ‖U0_kᵀ W0‖²_F / ‖W0‖²_F = Σ_{i≤k} σ_i² / Σ σ_i²,
    so E_k < E0_k means fine-tuning moved energy out of the base's principal directions."""
    if base.shape != tuned.shape:
        fail(f"base and tuned weights differ in shape: {tuple(base.shape)} vs {tuple(tuned.shape)}")
    u0, s0 = left_singular_vectors(base)
    ut, _ = left_singular_vectors(tuned)
    wt = tuned.detach().to(torch.float64)
    result = {}
    for k in ks:
        if not 0 < k <= u0.shape[1]:
            fail(f"k = {k} is out of range for a {tuple(base.shape)} matrix (at most {u0.shape[1]})")
        angles = principal_angles(u0[:, :k], ut[:, :k])
        cross = u0[:, :k].T @ ut[:, :k]
        result[k] = {
            "mean_angle": float(angles.mean()), "max_angle": float(angles.max()),
            "overlap": float((cross ** 2).sum() / k),
            "energy_ratio": float(((u0[:, :k].T @ wt) ** 2).sum() / (wt ** 2).sum()),
            "base_energy_ratio": float((s0[:k] ** 2).sum() / (s0 ** 2).sum()),
        }
    return result


# ----------------------------------------------------------------------------- report files

def write_figure(figure, path: Path) -> None:
    """Save a matplotlib figure atomically (temp file beside it, then rename)."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        figure.savefig(tmp, dpi=120)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        plt.close(figure)
        Path(tmp).unlink(missing_ok=True)


def write_report(out_dir: str | Path, stem: str, markdown: str, figure, data: dict) -> None:
    """<out_dir>/<stem>.md, <stem>.png and <stem>.json, each written atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / f"{stem}.json", data)
    write_figure(figure, out / f"{stem}.png")
    atomic_write_text(out / f"{stem}.md", markdown)


__all__ = [
    "DEFAULT_TARGETS", "STRATEGIES", "OBJECTIVES", "DENSE_CHOICES", "encoder_for", "encode_chat", "encode_pretrain",
    "target_weights", "masked_parameters", "MASKED_CHOICES", "layer_index", "layer_of", "model_fingerprint", "keep_count", "random_masks", "select_frequent",
    "GradientCounter", "gradient_masks", "mask_batches", "save_masks", "read_masks_meta", "load_task_masks",
    "load_all_masks", "SparseAdamW", "set_overlap", "weight_overlaps", "overall_overlap", "layer_overlap",
    "overlap_matrix", "mean_layer_overlap", "principal_angles", "subspace_metrics", "write_report",
    "build", "optimizer", "trainable", "make_method", "MASKS_IN_MODEL", "masks_settings", "compute_task_masks",
]
