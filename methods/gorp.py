"""GORP: continual fine-tuning with gradient low-rank projection (Wang et al., ACL 2025).

Full and low-rank parameters train together in one low-rank gradient subspace that keeps clear
of the gradient subspaces of the earlier tasks. For every target linear layer (q/k/v/o/gate/up/
down) on task t of a sequence of T:

    y = W·x + (α/r)·Σ_{i<=t} B_i·A_i·x

* LoRA: the earlier tasks' adapters (A_i, B_i, i < t) are frozen; a new one, A_t (r x in,
  Kaiming) and B_t (out x r, zero), is trained with AdamW at ``lora_lr``.
* Full weights, GaLore-style, in the same step: with G' = Gᵀ (in x out, W's gradient seen from
  its inputs) every ``update_proj_gap`` steps Q (rank x in) = the top singular vectors of G'
  (``projection.randomized_svd``); Adam runs on R = Q·G' and W -= lr·scale·(Qᵀ·Adam(R))ᵀ. The
  moments live in Q's coordinates, so when Q is refreshed they are moved into the new subspace
  with T = Q_new·Q_oldᵀ: m <- T·m (the old first moment Q_oldᵀ·m, a matrix of W's gradient space,
  projected onto the new subspace) and v <- (T∘T)·v (never negative). GaLore's reference code
  keeps them as they are, which reads the old subspace's moments as coordinates of the new one;
  with a refresh every 10 steps and 16 steps per task, the basis grown from the first moment at
  the task's end would mix the two subspaces.
* Shared gradient space: each layer keeps an orthonormal basis M (in x k) of input directions.
  At the end of a task (its last optimizer step) W's first moment, mapped to the full space as
  Qᵀ·m (in x out), extends M: the part of it outside M is decomposed (SVD) and its leading left
  singular vectors are appended until M holds ``energy`` of the moment's energy ‖Qᵀm‖² (GPM's
  incremental criterion: ‖MᵀQᵀm‖² + Σ_{j<=k} σ_j² >= energy·‖Qᵀm‖²); at most rank new vectors
  per task (the moment has rank <= rank). On the next tasks every gradient that reaches the
  layer is replaced by g − M·Mᵀ·g (in input coordinates) before it updates a moment.

Where the paper (and its unreleased code's README) leaves things open, this is our reading:

* "full parameters" are the target matrices' weights; every other weight stays frozen.
* M lives in each layer's input space. The paper builds its shared space from the first moment
  as a cheap stand-in for the input-feature space of gradient projection memory (GPM), and only
  there does a change with ΔW·M = 0 leave the layer's outputs on the old tasks' inputs unchanged.
  The projection therefore always acts on the input side (GaLore's proj_type "right"), not on the
  smaller side (GaLore's "std"): on the tiny test model, bases of output directions (GaLore's
  side for wide matrices: k/v, down_proj) left a conflicting second task free to undo the first.
* The constraint covers the whole layer, not W alone: W's gradient (so Q is taken from, and lies
  in, the complement of M, and W's step has no component in M) and the gradient of A_t, whose
  rows are the new LoRA's input directions (A_t is also projected once when its task starts).
  The layer's whole change on task t > 0, ΔW + (α/r)·B_t·A_t, then satisfies Δ·M = 0. Adam's
  elementwise normalisation would bring components in M back into A_t's step, so that step is
  projected too (our addition; W needs none: Q ⊥ M). B_t stays free.
* LoRA factors are not GaLore-projected: a rank-r factor already has rank <= r = ``rank``, and
  projecting it would only rotate its coordinates. They keep plain AdamW moments.
* The bases are grown at the last step of a task, not when the next task's optimizer is built:
  the moments are never checkpointed once a task is finished, and the bases live in the model
  (see below), so a run resumed between two tasks, or in the middle of one, has them.

Bookkeeping. The Trainer checkpoints the tensors that require grad when the model is built, so
``attach`` creates, for every target layer, all T LoRAs and the basis up front (the basis as a
zero-padded in x min(in, rank·(T-1)) matrix: its used columns are its non-zero ones), marks them
trainable, and ``activate`` (called by the method's per-task optimizer) freezes all but what
task t trains. Saved models have every LoRA folded into W (``plain_copy``): a plain
transformers folder that stages/merge.py copies and lm-eval scores.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Sequence

from methods.projection import AdaRankGrad, randomized_svd, step_counter
from stages.core.errors import fail
from stages.core.seeds import step_seed

import torch
import torch.nn.functional as F

ROLES = ("full", "constrained", "free")  # W; the LoRA factor on M's side; the other LoRA factor


def check_settings(rank: int, r: int, lora_alpha: float, energy: float, update_proj_gap: int, scale: float,
                   lora_lr: float) -> None:
    """One-line errors for values GORP cannot run with."""
    for name, value in (("rank", rank), ("r", r), ("update_proj_gap", update_proj_gap)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            fail(f"--{name} must be a positive integer, got {value!r}")
    if not isinstance(energy, (int, float)) or not 0 < energy <= 1:
        fail(f"--energy must be in (0, 1] (the fraction of a task's first-moment energy its basis keeps), got {energy!r}")
    for name, value in (("lora_alpha", lora_alpha), ("scale", scale), ("lora_lr", lora_lr)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            fail(f"--{name} must be a positive number, got {value!r}")


# ----------------------------------------------------------------------------- the layer

class GorpLinear(torch.nn.Module):
    """A target linear layer under GORP: its own weight W (and bias), one LoRA per task of the
    sequence, and the basis M of the earlier tasks' gradient subspace in its input space."""

    def __init__(self, base: torch.nn.Linear, n_tasks: int, r: int, lora_alpha: float, lora_dropout: float,
                 capacity: int):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.r, self.scaling = r, lora_alpha / r
        like = {"dtype": base.weight.dtype, "device": base.weight.device}
        a_init = []
        for _ in range(n_tasks):
            a = torch.empty(r, self.in_features, **like)
            torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # peft's (and nn.Linear's) init of A
            a_init.append(torch.nn.Parameter(a))
        self.lora_A = torch.nn.ParameterList(a_init)
        self.lora_B = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(self.out_features, r, **like))
                                              for _ in range(n_tasks)])
        # At least one (zero) column: a one-task sequence never grows it, and no tensor is empty.
        self.basis = torch.nn.Parameter(torch.zeros(self.in_features, max(1, min(self.in_features, capacity)), **like))
        self.dropout = torch.nn.Dropout(lora_dropout) if lora_dropout > 0 else torch.nn.Identity()
        self.active = 0  # the task being trained: LoRAs 0..active take part in the forward pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        count = self.active + 1  # later tasks' B are zero: leaving them out changes nothing
        a = torch.cat([self.lora_A[i] for i in range(count)]) if count > 1 else self.lora_A[0]
        b = torch.cat([self.lora_B[i] for i in range(count)], dim=1) if count > 1 else self.lora_B[0]
        return out + F.linear(F.linear(self.dropout(x), a), b) * self.scaling

    def used_basis(self) -> torch.Tensor:
        """M's filled columns (in x k, float32 at least)."""
        basis = self.basis.detach()
        # Counting them reads the device; the count is kept while M is the same tensor (a copy of
        # the layer has another) unchanged in place (growing it, loading a checkpoint into it bump
        # its version counter).
        version = (basis.data_ptr(), self.basis._version)
        if getattr(self, "_used", (None, 0))[0] != version:
            self._used = (version, int((basis.abs().sum(0) > 0).sum()))
        basis = basis[:, :self._used[1]]
        return basis if basis.dtype in (torch.float32, torch.float64) else basis.float()

    def folded_weight(self) -> torch.Tensor:
        """W + (α/r)·Σ_i B_i·A_i over every task's LoRA (untrained ones are zero)."""
        a = torch.cat(list(self.lora_A)).float()
        b = torch.cat(list(self.lora_B), dim=1).float()
        return (self.weight.float() + self.scaling * (b @ a)).to(self.weight.dtype)


def gorp_layers(model: torch.nn.Module) -> list[GorpLinear]:
    return [m for m in model.modules() if isinstance(m, GorpLinear)]


def attach(model: torch.nn.Module, target_modules: Iterable[str], n_tasks: int, r: int, lora_alpha: float,
           lora_dropout: float, rank: int) -> torch.nn.Module:
    """Every linear layer named in ``target_modules`` becomes a GorpLinear with ``n_tasks``
    LoRAs and a basis of room rank·(n_tasks - 1); everything else is frozen. W, every LoRA and
    every basis require grad on return (the Trainer checkpoints that set; ``activate`` then
    freezes what the current task does not train)."""
    targets = set(target_modules)
    for param in model.parameters():
        param.requires_grad_(False)
    replaced = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            layer = GorpLinear(module, n_tasks, r, lora_alpha, lora_dropout, capacity=rank * (n_tasks - 1))
            setattr(parent, name.rsplit(".", 1)[-1], layer)
            for param in layer.parameters():
                param.requires_grad_(True)
            replaced += 1
    if not replaced:
        fail(f"no linear layer matches target_modules {sorted(targets)}")
    return model


def activate(model: torch.nn.Module, task: int) -> list[GorpLinear]:
    """Make ``task`` the one being trained: W and its LoRA trainable, every other LoRA and the
    bases frozen; the new A_t starts with its rows outside span(M). Idempotent."""
    layers = gorp_layers(model)
    for layer in layers:
        if not 0 <= task < len(layer.lora_A):
            fail(f"task index {task} is outside the {len(layer.lora_A)} LoRAs GORP was built with")
        layer.active = task
        layer.weight.requires_grad_(True)
        layer.basis.requires_grad_(False)
        for i, (a, b) in enumerate(zip(layer.lora_A, layer.lora_B)):
            a.requires_grad_(i == task)
            b.requires_grad_(i == task)
        basis = layer.used_basis()
        if task > 0 and basis.shape[1]:
            with torch.no_grad():
                a = layer.lora_A[task]
                a.copy_(project_out(a.float().T, basis).T)
    return layers


# ----------------------------------------------------------------------------- subspace helpers

def project_out(matrix: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """matrix - M·Mᵀ·matrix (matrix: d x L, M: d x k orthonormal; k = 0 leaves it as it is)."""
    if basis.shape[1] == 0:
        return matrix
    return matrix - basis @ (basis.T @ matrix)


def grow_basis(basis: torch.Tensor, left: torch.Tensor, right: torch.Tensor, energy: float, room: int) -> torch.Tensor:
    """The columns to append to the orthonormal ``basis`` (d x k) so that it holds ``energy`` of
    the energy of the moment left·right (d x r times r x L): the leading left singular vectors of
    the moment's residual outside the basis, fewest first, at most ``room``. Returns d x k_new,
    orthonormal and orthogonal to ``basis``."""
    dim = basis.shape[0]
    basis64, left64, right64 = basis.double(), left.double(), right.double()
    moment = left64 @ right64
    total = moment.square().sum().item()
    captured = (basis64.T @ moment).square().sum().item() if basis.shape[1] else 0.0
    if room <= 0 or total == 0 or captured >= energy * total:
        return basis.new_zeros(dim, 0)
    # residual = (I - MMᵀ)·left·right; with (I - MMᵀ)·left = Qz·Rz its SVD is Qz·SVD(Rz·right).
    qz, rz = torch.linalg.qr(project_out(left64, basis64))
    u_small, s, _ = torch.linalg.svd(rz @ right64, full_matrices=False)
    kept = captured + torch.cumsum(s.square(), 0)
    reach = (kept >= energy * total * (1 - 1e-12)).nonzero()
    k = int(reach[0]) + 1 if len(reach) else int((s > 0).sum())
    new = (qz @ u_small)[:, :min(k, room)]
    # Orthogonal to the basis and orthonormal to working precision: twice is enough.
    new = project_out(project_out(new, basis64), basis64)
    new = project_out(torch.linalg.qr(new).Q, basis64)
    return new.to(basis.dtype)


def orthogonal_subspace(grad: torch.Tensor, basis: torch.Tensor, rank: int, seed: int) -> torch.Tensor:
    """Q (rank x d): the top singular vectors of ``grad`` (d x L, already outside span(M)) as
    rows, each orthogonal to M. A direction of a zero singular value may fall inside M (the
    randomized range finder completes its basis arbitrarily): such a row is zeroed, so the
    projected step never has a component in M."""
    generator = torch.Generator(device=grad.device).manual_seed(seed)
    rank = min(rank, grad.shape[0])
    u, _ = randomized_svd(grad, rank, generator)
    if basis.shape[1]:
        u = project_out(project_out(u, basis), basis)
        keep = u.norm(dim=0) > 0.5
        q = torch.zeros_like(u)
        if keep.any():
            q[:, keep] = project_out(torch.linalg.qr(u[:, keep]).Q, basis)
        u = q
    if u.shape[1] < rank:
        u = torch.cat([u, u.new_zeros(u.shape[0], rank - u.shape[1])], dim=1)
    return u.T.contiguous()


# ----------------------------------------------------------------------------- the optimizer

class GorpAdamW(torch.optim.Optimizer):
    """GORP's optimizer for one task (the Trainer builds one per task): three param groups,

    * ``full``: the target layers' W, GaLore-projected Adam on the complement of M
      (lr·scale; no weight decay: decaying W would pull it along M too), its moments moved into
      each new subspace at a refresh (m <- T·m, v <- (T∘T)·v, T = Q_new·Q_oldᵀ);
    * ``constrained``: task t's A, AdamW on the gradient with its M component removed (input
      coordinates), the step projected again after Adam's elementwise normalisation;
    * ``free``: task t's B, plain AdamW;

    and, at step ``steps_per_task`` when ``grow_bases``, every layer's M extended from W's first
    moment (``grow_basis``). The projections' randomness (randomized SVD) comes from
    step_seed(step_seed(base, t), i) (t the step, i the layer), the base seed drawn once from
    torch's global RNG at the first step; seed, step, every Q and moment are in ``state``, so
    ``state_dict()`` resumes bit for bit.
    """

    def __init__(self, layers: Sequence[GorpLinear], task: int, *, lr: float, lora_lr: float, rank: int,
                 update_proj_gap: int, scale: float, energy: float, steps_per_task: int, grow_bases: bool,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 seed: int | None = None):
        if not layers:
            fail("GORP found no target layer: build the model with methods.gorp.attach first")
        check_settings(rank, layers[0].r, layers[0].scaling * layers[0].r, energy, update_proj_gap, scale, lora_lr)
        groups = [
            {"params": [layer.weight for layer in layers], "lr": lr, "weight_decay": 0.0, "role": "full",
             "rank": rank, "update_proj_gap": update_proj_gap, "scale": scale},
            {"params": [layer.lora_A[task] for layer in layers], "lr": lora_lr, "weight_decay": weight_decay,
             "role": "constrained"},
            {"params": [layer.lora_B[task] for layer in layers], "lr": lora_lr, "weight_decay": weight_decay,
             "role": "free"},
        ]
        super().__init__(groups, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": 0.0})
        self.layers = list(layers)
        self.task, self.energy, self.steps_per_task, self.grow_bases = task, energy, steps_per_task, grow_bases
        self._seed = seed

    def _counter(self) -> dict:
        return step_counter(self, "gorp", self._seed)

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        counter = self._counter()
        t = counter["step"]
        for group in self.param_groups:
            for index, (p, layer) in enumerate(zip(group["params"], self.layers)):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("GorpAdamW does not support sparse gradients")
                if group["role"] == "full":
                    self._full_step(p, layer, group, step_seed(step_seed(counter["seed"], t), index))
                else:
                    self._lora_step(p, layer, group)
        counter["step"] = t + 1
        if self.grow_bases and counter["step"] == self.steps_per_task:
            self.extend_bases()
        return loss

    def _full_step(self, p: torch.Tensor, layer: GorpLinear, group: dict, seed: int) -> None:
        state = self.state[p]
        basis = layer.used_basis()
        grad = project_out(p.grad.float().T, basis)  # in x out: W's gradient seen from its inputs
        if "Q" not in state or state["age"] >= group["update_proj_gap"]:
            q = orthogonal_subspace(grad, basis, group["rank"], seed)
            if "exp_avg" in state:
                # The moments are coordinates in the old subspace: move them into the new one, so
                # that Qᵀ·m (what the basis grows from) is always a moment of one subspace.
                transfer = q @ state["Q"].T  # rank_new x rank_old
                state["exp_avg"] = transfer @ state["exp_avg"]
                state["exp_avg_sq"] = transfer.square() @ state["exp_avg_sq"]
            else:
                state["step"] = 0
                state["exp_avg"] = grad.new_zeros(q.shape[0], grad.shape[1])
                state["exp_avg_sq"] = torch.zeros_like(state["exp_avg"])
            state["Q"], state["age"] = q, 0
        state["age"] += 1
        direction = state["Q"].T @ AdaRankGrad._adam(state, state["Q"] @ grad, group)
        p.add_(direction.T.to(p.dtype), alpha=-group["lr"] * group["scale"])

    def _lora_step(self, p: torch.Tensor, layer: GorpLinear, group: dict) -> None:
        state = self.state[p]
        constrained = group["role"] == "constrained"
        basis = layer.used_basis() if constrained else None
        grad = p.grad.float()
        if constrained:  # A (r x in): its rows are input directions
            grad = project_out(grad.T, basis).T
        if "exp_avg" not in state:
            state.update(step=0, exp_avg=torch.zeros_like(grad), exp_avg_sq=torch.zeros_like(grad))
        update = AdaRankGrad._adam(state, grad, group)
        if constrained:
            update = project_out(update.T, basis).T
        if group["weight_decay"]:
            p.mul_(1 - group["lr"] * group["weight_decay"])  # a scaling: keeps A's rows outside M
        p.add_(update.to(p.dtype), alpha=-group["lr"])

    def extend_bases(self) -> list[int]:
        """Append to every layer's M the directions of W's first moment (Qᵀ·m) it lacks; the
        number of columns added per layer (also kept in ``state['gorp']['grown']``)."""
        grown = []
        full = next(g for g in self.param_groups if g["role"] == "full")
        for p, layer in zip(full["params"], self.layers):
            state = self.state.get(p, {})
            if "Q" not in state:
                grown.append(0)
                continue
            basis = layer.used_basis()
            room = layer.basis.shape[1] - basis.shape[1]
            new = grow_basis(basis, state["Q"].T, state["exp_avg"], self.energy, room)
            layer.basis[:, basis.shape[1]:basis.shape[1] + new.shape[1]] = new.to(layer.basis.dtype)
            grown.append(new.shape[1])
        self._counter()["grown"] = grown
        return grown


def trained_numbers(model: torch.nn.Module, train_weights: bool) -> int:
    """The numbers a run over the whole sequence trains: every task's LoRA (A_t, B_t; each trains
    on its task) and, for GORP (``train_weights``), the target layers' weights W. The bases are
    derived from W's moments, not trained; the base model's other weights stay frozen."""
    layers = gorp_layers(model)
    loras = sum(p.numel() for layer in layers for p in (*layer.lora_A, *layer.lora_B))
    return loras + (sum(layer.weight.numel() for layer in layers) if train_weights else 0)


def plain_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A plain transformers model computing what ``model`` computes: a copy in which every
    GorpLinear is an nn.Linear holding W + (α/r)·Σ B_i·A_i."""
    plain = copy.deepcopy(model)
    # accelerate's mixed-precision wrapper of forward (see sft.mergeable_copy): score the class's own
    plain.__dict__.pop("forward", None)
    plain.__dict__.pop("_original_forward", None)
    for name, module in list(plain.named_modules()):
        if isinstance(module, GorpLinear):
            linear = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                                     device=module.weight.device, dtype=module.weight.dtype)
            with torch.no_grad():
                linear.weight.copy_(module.folded_weight())
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
            parent = plain.get_submodule(name.rsplit(".", 1)[0]) if "." in name else plain
            setattr(parent, name.rsplit(".", 1)[-1], linear)
    for param in plain.parameters():
        param.requires_grad_(False)
    return plain


def export_folded(model: torch.nn.Module, path) -> None:
    """Save the model with every LoRA folded in, as a plain transformers folder."""
    plain_copy(model).save_pretrained(path, safe_serialization=True)


__all__ = ["GorpAdamW", "GorpLinear", "activate", "attach", "check_settings", "export_folded", "gorp_layers",
           "grow_basis", "orthogonal_subspace", "plain_copy", "project_out", "trained_numbers"]
