"""How one run spreads over processes (``accelerate launch``), and which methods each way can train.

* **one process** (``python methods/<x>4sft.py``): every method.
* **DDP** (``accelerate launch --multi_gpu``, or ``ACCELERATE_USE_CPU=true`` for CPU processes): every
  process holds the whole model and trains on its slice of each global batch; gradients (zeroth-order
  methods: the projected gradient; AdaLomo: each gradient, in its hooks) are averaged across
  processes, so every process applies the same update. Every decoder method but GORP and O-LoRA,
  which add tensors to train at each task after the model is wrapped.
* **FSDP** (``accelerate launch --use_fsdp --fsdp_version 2``: torch's ``fully_shard``): the weights,
  gradients and optimizer state are sharded across processes (resharding after forward is ZeRO-3,
  keeping the gathered weights until backward ZeRO-2). The methods whose update is ordinary autograd + an elementwise optimizer
  over their trainable tensors: the adapter methods. Saving, scoring and checkpoints gather the
  trained tensors into an unsharded copy on the main process (``gathered``); each process
  checkpoints its own optimizer shard. Methods whose update reads whole weight matrices or whole
  gradients (projections, factored moments, fused hooks, zeroth-order perturbations), or that
  change which tensors train after the model is wrapped, declare why they cannot be sharded
  (``Method.refuses``) and are refused.
* **DeepSpeed**: refused. Its engine replaces the optimizer, the gradient clipping and the
  checkpoints this loop owns; FSDP gives the same ZeRO-2/3 sharding through accelerate.

An unsupported combination is one error line before any work starts (``check``).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch

from .errors import fail

# The launch ways, in the order of the strategy table (docs/methods.md).
STRATEGIES = ("one process", "DDP", "FSDP", "DeepSpeed")
DEEPSPEED = ("its engine replaces the optimizer, gradient clipping and checkpoints the training loop owns; "
             "launch with --use_fsdp --fsdp_version 2 instead (the same ZeRO-2/3 sharding)")
# Why the methods that cannot be sharded cannot (their Method.refuses).
SHARD = "FSDP gives each process a slice of every weight and gradient"
ZEROTH_ORDER_SHARD = ("zeroth-order steps perturb and update whole weights between forward passes, outside FSDP's "
                      "gathering; DDP runs them (one scalar all-reduced per step)")
# A new LoRA per task: the tensors that train change after DDP or FSDP has registered them.
NEW_ADAPTER_PER_TASK = ("it trains a new LoRA per task, which a wrapped model cannot pick up after its first task; "
                        "run the script without accelerate launch")
FSDP1 = ("FSDP version 1 is not supported (its flat parameters hide the tensors the loop saves, and it computes on "
         "accelerators only): launch with --fsdp_version 2")


def strategy_of(accelerator) -> str:
    """The launch way of ``accelerator``: one of STRATEGIES (anything else is named as accelerate names it)."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.NO or accelerator.num_processes == 1 and kind != DistributedType.FSDP:
        return "one process"
    if kind in (DistributedType.MULTI_CPU, DistributedType.MULTI_GPU, DistributedType.MULTI_XPU,
                DistributedType.MULTI_NPU, DistributedType.MULTI_MLU, DistributedType.MULTI_MUSA, DistributedType.MULTI_HPU):
        return "DDP"
    if kind == DistributedType.FSDP:
        return "FSDP"
    if kind == DistributedType.DEEPSPEED:
        return "DeepSpeed"
    return str(kind)


def refusal(method, strategy: str, fsdp_version: int = 2, mixed_precision: str = "no") -> str | None:
    """Why ``method`` cannot run under ``strategy`` (None: it can)."""
    if strategy in method.refuses:
        return method.refuses[strategy]
    if strategy in ("one process", "DDP"):
        return None
    if strategy == "DeepSpeed":
        return DEEPSPEED
    if strategy == "FSDP":
        if fsdp_version != 2:
            return FSDP1
        if mixed_precision == "fp16":
            return "fp16 under FSDP needs a sharded gradient scaler the loop does not have: use --mixed_precision bf16"
        return None
    return f"accelerate's {strategy} is not supported (expected one process, DDP or FSDP)"


def check(method, accelerator) -> str:
    """The run's launch way; one error line, before any work, if ``method`` cannot train under it."""
    strategy = strategy_of(accelerator)
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    why = refusal(method, strategy, getattr(plugin, "fsdp_version", 2), accelerator.mixed_precision)
    if why:
        fail(f"method '{method.name}' cannot run under {strategy}: {why}")
    return strategy


class Replicated:
    """One process or DDP: every process holds the whole model."""

    sharded = False

    def __init__(self, accelerator):
        self.accelerator = accelerator

    def prepare(self, model: torch.nn.Module, optimizer) -> torch.nn.Module:
        return self.accelerator.prepare(model)

    def prepare_optimizer(self, optimizer):
        return self.accelerator.prepare(optimizer)

    @contextlib.contextmanager
    def gathered(self, model: torch.nn.Module, on_device: bool = True) -> Iterator[torch.nn.Module | None]:
        """The trained model, whole, on the main process (None elsewhere); entered by every process.
        ``on_device``: where it computes (scoring); else wherever it is kept (saving tensors)."""
        yield self.accelerator.unwrap_model(model) if self.accelerator.is_main_process else None

    def load(self, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Write whole tensors (by name) into the model of every process."""
        params = dict(self.accelerator.unwrap_model(model).named_parameters())
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)


class Sharded:
    """FSDP2 (torch's ``fully_shard`` through accelerate): every tensor of the model is a DTensor,
    sharded over the processes. The main process keeps an unsharded copy of the built model (on
    the CPU between uses) that ``gathered`` fills with the trained tensors, for saving and scoring;
    only the trained tensors are gathered, the frozen ones never change."""

    sharded = True

    def __init__(self, accelerator, model: torch.nn.Module, trained: set[str]):
        self.accelerator, self.trained = accelerator, sorted(trained)  # one order on every process
        self.copy = copy.deepcopy(model).cpu() if accelerator.is_main_process else None

    def prepare(self, model: torch.nn.Module, optimizer) -> torch.nn.Module:
        return self.accelerator.prepare(model, optimizer)[0]  # accelerate's FSDP2 shards a model with an optimizer

    def prepare_optimizer(self, optimizer):
        return optimizer  # built over the sharded tensors already; nothing to add without fp16's scaler

    @contextlib.contextmanager
    def gathered(self, model: torch.nn.Module, on_device: bool = True) -> Iterator[torch.nn.Module | None]:
        params = dict(model.named_parameters())  # fully_shard keeps the module tree and its names
        with torch.no_grad():
            for name in self.trained:
                whole = params[name].full_tensor()  # a collective: every process, in one order
                if self.copy is not None:
                    self.copy.get_parameter(name).copy_(whole)
        if self.copy is None or not on_device:
            yield self.copy
            return
        self.copy.to(self.accelerator.device)
        try:
            yield self.copy
        finally:
            self.copy.to("cpu")

    def load(self, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
        from torch.distributed.tensor import distribute_tensor

        params = dict(model.named_parameters())
        with torch.no_grad():
            for name in self.trained:
                param = params[name]
                param.copy_(distribute_tensor(state[name].to(param.device, param.dtype), param.device_mesh, param.placements))


def placement(strategy: str, accelerator, model: torch.nn.Module, trained: set[str]) -> Replicated | Sharded:
    """How the loop prepares the model and reads and writes its trained tensors under ``strategy``
    (``model``: built, not yet prepared; ``trained``: the names of the tensors the run trains)."""
    return Sharded(accelerator, model, trained) if strategy == "FSDP" else Replicated(accelerator)
