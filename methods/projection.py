"""Gradient low-rank projection: what GaLore and AdaRankGrad share, and the AdaRankGrad optimizer.

Both methods train every weight of the model (full fine-tuning) but keep Adam's moments of a
target weight matrix W (m x n) in a low-dimensional subspace of its gradient G. Let s = min(m, n)
be W's smaller side and G' = G (m <= n) or Gᵀ (m > n), an s x L matrix. A projection
Q (r x s, orthonormal rows) maps G' to the r x L matrix QG'; Adam runs on it and the step is
mapped back with Qᵀ. Adam's moments of W then take 2·r·L numbers instead of 2·s·L: r/s of
AdamW's (``state_bytes`` counts them). Everything else (embeddings, norms, non-target matrices)
gets plain AdamW in the same optimizer.

Shared here, once:

* ``projection_groups``: the param groups, target 2-D weights (attention and MLP linears named
  in ``target_modules``) in the projected group, the rest in plain groups;
* ``state_bytes``: the bytes an optimizer keeps for a parameter (moments only, or everything,
  projection matrices and projector objects included);
* ``randomized_svd``: top singular triplets by a seeded randomized range finder with power
  iterations (Halko, Martinsson & Tropp 2011), all batched matrix products, no loops over entries;
* ``AdaRankGrad``: the optimizer of methods/adarankgrad4sft.py (see its docstring).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from collections.abc import Callable, Iterable

from stages.core.errors import fail
from stages.core.seeds import step_seed

import torch

MOMENT_KEYS = ("exp_avg", "exp_avg_sq")


# ----------------------------------------------------------------------------- parameter groups

def target_matrices(model: torch.nn.Module, target_modules: Iterable[str]) -> list[torch.nn.Parameter]:
    """The 2-D weights of the linear layers whose name ends in one of ``target_modules``
    (q_proj, ..., down_proj), in model order, each once."""
    targets, seen, out = set(target_modules), set(), []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if (isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets
                and isinstance(weight, torch.nn.Parameter) and weight.ndim == 2 and weight.requires_grad
                and id(weight) not in seen):
            seen.add(id(weight))
            out.append(weight)
    return out


def projection_groups(model: torch.nn.Module, target_modules: Iterable[str], weight_decay: float,
                      **projection: object) -> list[dict]:
    """[projected group (target matrices, with the ``projection`` settings as group keys),
    plain decayed group (other matrices: embeddings), plain undecayed group (norms, biases)];
    empty groups are left out. Tied weights appear once."""
    projected = target_matrices(model, target_modules)
    if not projected:
        fail(f"no trainable 2-D weight matches target_modules {list(target_modules)}")
    taken = {id(p) for p in projected}
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if param.requires_grad and id(param) not in taken:
            taken.add(id(param))
            (no_decay if param.ndim < 2 else decay).append(param)
    groups = [{"params": projected, "weight_decay": weight_decay, **projection},
              {"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


# ----------------------------------------------------------------------------- GaLore (galore-torch)

def galore_adamw():
    """galore_torch.GaLoreAdamW (galore_torch/adamw.py), imported without running the package's
    __init__: that also imports its 8-bit variant and with it bitsandbytes, which GaLoreAdamW
    never uses. (bitsandbytes does import on CPU, but peft imports it eagerly whenever it is
    installed: every method script would pay seconds of import time and print a warning about
    an optional kernel package. So galore-torch is installed with --no-deps, without it.)
    The package is registered under its own name with its real path, so the projector objects
    in a checkpoint unpickle to the same classes."""
    if "galore_torch" not in sys.modules:
        spec = importlib.util.find_spec("galore_torch")
        if spec is None:
            fail("galore-torch is not installed: pip install --no-deps galore-torch==1.0")
        package = types.ModuleType("galore_torch")
        package.__path__ = list(spec.submodule_search_locations)
        package.__spec__ = spec
        sys.modules["galore_torch"] = package
    return importlib.import_module("galore_torch.adamw").AdamW


# ----------------------------------------------------------------------------- state size

def _tensor_bytes(value: object, seen: set) -> int:
    """Bytes of the tensors in ``value``: tensors, containers, and objects' attributes
    (GaLore's projector keeps its matrix in an attribute)."""
    if isinstance(value, torch.Tensor):
        key = (value.untyped_storage().data_ptr(), value.data_ptr(), value.numel())
        if key in seen:
            return 0
        seen.add(key)
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v, seen) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in value)
    if hasattr(value, "__dict__") and not isinstance(value, type):
        return sum(_tensor_bytes(v, seen) for v in vars(value).values())
    return 0


def state_bytes(optimizer: torch.optim.Optimizer, param: torch.Tensor, keys: Iterable[str] | None = MOMENT_KEYS) -> int:
    """Bytes ``optimizer`` keeps for ``param``: the Adam moments by default, every tensor
    (projection matrix, projector object, step counters) with ``keys=None``."""
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    state = optimizer.state.get(param, {})
    items = state.values() if keys is None else [state[k] for k in keys if k in state]
    seen: set = set()
    return sum(_tensor_bytes(v, seen) for v in items)


def total_state_bytes(optimizer: torch.optim.Optimizer, keys: Iterable[str] | None = MOMENT_KEYS) -> int:
    optimizer = getattr(optimizer, "optimizer", optimizer)
    return sum(state_bytes(optimizer, p, keys) for g in optimizer.param_groups for p in g["params"])


# ----------------------------------------------------------------------------- randomized SVD

def randomized_svd(matrix: torch.Tensor, k: int, generator: torch.Generator, niter: int = 2,
                   oversample: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, S): the top ``k`` left singular vectors (columns of U, rows x k) and values of
    ``matrix``, by a randomized range finder: Y = A·Ω (Ω Gaussian from ``generator``), ``niter``
    power iterations with QR re-orthonormalisation, then the exact SVD of the small QᵀA.
    float32 at least (the gradient may be bf16); signs are made deterministic (the largest
    entry of every singular vector is positive)."""
    a = matrix if matrix.dtype in (torch.float32, torch.float64) else matrix.float()
    rows, cols = a.shape
    sketch = min(k + oversample, rows, cols)
    omega = torch.randn(cols, sketch, generator=generator, device=a.device, dtype=a.dtype)
    basis = torch.linalg.qr(a @ omega).Q
    for _ in range(niter):
        basis = torch.linalg.qr(a.T @ basis).Q
        basis = torch.linalg.qr(a @ basis).Q
    u_small, s, _ = torch.linalg.svd(basis.T @ a, full_matrices=False)
    u = (basis @ u_small)[:, :k]
    signs = torch.sign(u.gather(0, u.abs().argmax(0, keepdim=True)))
    return u * torch.where(signs == 0, torch.ones_like(signs), signs), s[:k]


def choose_rank(energies: torch.Tensor, total: float, energy: float, r_min: int, r_max: int, rank_step: int) -> int:
    """The smallest r in r_min, r_min + rank_step, ..., r_max whose top-r components hold at
    least ``energy`` of ``total`` (= ‖G‖_F²); r_max when none does. ``energies`` are the squared
    singular values, largest first."""
    kept = torch.cumsum(energies.double(), 0)
    for r in range(r_min, r_max + 1, rank_step):
        if r >= len(kept) or kept[r - 1].item() >= energy * total:
            return min(r, len(kept))
    return min(r_max, len(kept))


# ----------------------------------------------------------------------------- AdaRankGrad

def _oriented(grad: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """G' = G (rows <= cols) or Gᵀ, so that the projection always acts on the smaller side."""
    return (grad, False) if grad.shape[0] <= grad.shape[1] else (grad.T, True)


def step_counter(optimizer: torch.optim.Optimizer, key: str, seed: int | None, **extra) -> dict:
    """``optimizer.state[key]``: the step count and the base seed of the step's randomness (drawn
    once from torch's global RNG unless given), created at the first step; in the state dict, so a
    resumed run continues bit for bit."""
    if key not in optimizer.state:
        base = seed if seed is not None else int(torch.randint(0, 2**62, (1,)).item())
        optimizer.state[key] = {"seed": base, "step": 0, **extra}
    return optimizer.state[key]


class AdaRankGrad(torch.optim.Optimizer):
    """AdaRankGrad (Refael et al., ICLR 2025): Adam in an adaptive-rank gradient subspace.

    Groups with a ``rank_max`` key are projected; the others get plain AdamW. Per projected
    matrix W (G' its gradient oriented so the projection acts on the smaller side s):

    * subspace choice (the paper's IASS): a randomized SVD of G' (``randomized_svd``, sketch
      rank_max + 8, 2 power iterations) and the smallest r in [rank_min, rank_max] (steps of
      ``rank_step``) whose top-r subspace leaves a relative residual
      ‖G' − Q_rᵀQ_rG'‖_F / ‖G'‖_F <= ``information_threshold`` (η; the top-r components then hold
      at least 1 − η² of ‖G'‖_F²: 96% for the paper's η = 0.2), rank_max when none does; Q = the
      top-r left singular vectors (r x s, orthonormal rows). η bounds a norm, not a squared
      norm: our reading of the paper's information threshold (its text was not at hand; the
      seed's script sets xi_threshold 0.2), where an earlier reading kept 1 − η = 80% of the
      energy;
    * Adam on QG': M = β1·M + (1 − β1)·QG', V = β2·V + (1 − β2)·(QG')², bias-corrected, and
      W −= lr·scale·Qᵀ·M̂/(√V̂ + eps) (mapped back to W's orientation); decoupled weight decay
      W −= lr·wd·W first;
    * refresh: the subspace is chosen anew when the fraction of the current gradient's energy it
      captures, ‖QG'‖²/‖G'‖², falls below ``refresh_threshold`` (the gradient left it: the
      paper's convergence criterion for the subspace, taken relative to ‖G'‖ so it is
      scale-free), or when it is ``update_proj_gap`` steps old;
    * moments carried into the new basis with R = Q_new·Q_oldᵀ (r_new x r_old):
      M_new = R·M_old and V_new = max(R·V_old, 0). The paper's rule as documented publicly is
      V ← R·V, which may produce negative entries: they are clamped to 0 (our addition). With
      ``second_moment="squared"``, V_new = (R∘R)·V_old instead (exact when the projected
      coordinates are independent; never negative). Q_new's rows are sign-aligned to Q_old
      (the largest |entry| of each row of R made positive), so a refresh that finds the same
      subspace leaves both moments unchanged. The bias-correction step count carries on.

    Randomness: the range finder draws from a ``torch.Generator`` seeded with
    step_seed(step_seed(base, t), i) (t: the optimizer step, i: the parameter's position), the
    base seed being the constructor's ``seed`` or, if None, one draw from torch's global RNG at
    the first step. The base seed, the step count and every Q, M, V live in ``state``, so
    ``state_dict()`` resumes bit for bit. Every process of a data-parallel run sees the same
    all-reduced gradient and the same seeds: replicas stay equal (the base seed, if drawn,
    comes from the global RNG, which the core seeds identically in every process).
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, seed: int | None = None):
        if lr < 0 or eps < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"AdaRankGrad: invalid lr {lr}, betas {betas} or eps {eps}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        self._seed = seed
        for group in self.param_groups:
            if "rank_max" in group:
                self._check_group(group)

    @staticmethod
    def _check_group(group: dict) -> None:
        defaults = {"rank_min": group["rank_max"], "rank_step": 1, "information_threshold": 0.2, "refresh_threshold": 0.0,
                    "update_proj_gap": 200, "scale": 1.0, "second_moment": "rotate"}
        for key, value in defaults.items():
            group.setdefault(key, value)
        if not 1 <= group["rank_min"] <= group["rank_max"] or group["rank_step"] < 1:
            raise ValueError(f"AdaRankGrad: need 1 <= rank_min <= rank_max and rank_step >= 1, got "
                             f"{group['rank_min']}, {group['rank_max']}, {group['rank_step']}")
        if not 0 <= group["information_threshold"] < 1 or not 0 <= group["refresh_threshold"] <= 1 or group["update_proj_gap"] < 1:
            raise ValueError("AdaRankGrad: information_threshold in [0, 1), refresh_threshold in [0, 1], update_proj_gap >= 1")
        if group["second_moment"] not in ("rotate", "squared"):
            raise ValueError(f"AdaRankGrad: second_moment must be rotate or squared, got {group['second_moment']!r}")
        for p in group["params"]:
            if p.ndim != 2:
                raise ValueError(f"AdaRankGrad: projected parameters must be matrices, got shape {tuple(p.shape)}")

    # -- bookkeeping ----------------------------------------------------------------------------

    def _counter(self) -> dict:
        return step_counter(self, "adarankgrad", self._seed, refreshes=0)

    def ranks(self) -> list[int]:
        """The current rank of every projected matrix (0 before its first step)."""
        return [self.state[p]["Q"].shape[0] if "Q" in self.state.get(p, {}) else 0
                for g in self.param_groups if "rank_max" in g for p in g["params"]]

    # -- the step -------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        counter = self._counter()
        t = counter["step"]
        index = -1
        for group in self.param_groups:
            for p in group["params"]:
                index += 1
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdaRankGrad does not support sparse gradients")
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                if "rank_max" in group:
                    self._projected_step(p, group, step_seed(step_seed(counter["seed"], t), index))
                else:
                    state = self.state[p]
                    if "exp_avg" not in state:
                        state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                    p.add_(self._adam(state, p.grad, group), alpha=-group["lr"])
        counter["step"] = t + 1
        return loss

    @staticmethod
    def _adam(state: dict, grad: torch.Tensor, group: dict) -> torch.Tensor:
        """One Adam update of the moments in ``state`` with ``grad``; the bias-corrected
        direction M̂/(√V̂ + eps)."""
        beta1, beta2 = group["betas"]
        state["step"] += 1
        state["exp_avg"].mul_(beta1).add_(grad, alpha=1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        correction1 = 1 - beta1 ** state["step"]
        correction2 = 1 - beta2 ** state["step"]
        denom = (state["exp_avg_sq"] / correction2).sqrt_().add_(group["eps"])
        return (state["exp_avg"] / correction1).div_(denom)

    def _projected_step(self, p: torch.Tensor, group: dict, seed: int) -> None:
        state = self.state[p]
        grad, transposed = _oriented(p.grad.float() if p.grad.dtype not in (torch.float32, torch.float64) else p.grad)
        if "Q" in state:
            low = state["Q"] @ grad
            # One read of the device for both sums (the refresh test needs them on the host).
            total, kept = torch.stack([grad.square().sum(), low.square().sum()]).tolist()
            state["captured"] = kept / total if total > 0 else 1.0
            state["age"] += 1
            if state["age"] >= group["update_proj_gap"] or state["captured"] < group["refresh_threshold"]:
                low = self._refresh(state, grad, total, group, seed)
        else:
            low = self._refresh(state, grad, grad.square().sum().item(), group, seed)
        direction = state["Q"].T @ self._adam(state, low, group)
        p.add_((direction.T if transposed else direction).to(p.dtype), alpha=-group["lr"] * group["scale"])

    def _refresh(self, state: dict, grad: torch.Tensor, total: float, group: dict, seed: int) -> torch.Tensor:
        """Choose the subspace of ``grad`` anew, carry the moments into it; QG'."""
        generator = torch.Generator(device=grad.device).manual_seed(seed)
        rank_max = min(group["rank_max"], grad.shape[0])
        u, s = randomized_svd(grad, rank_max, generator)
        # ‖G' − QᵀQG'‖² = ‖G'‖² − Σ_{i<=r} σ_i²: a relative residual <= η keeps >= 1 − η² of the energy
        kept = 1 - group["information_threshold"] ** 2
        rank = choose_rank(s.square(), total, kept, min(group["rank_min"], rank_max), rank_max, group["rank_step"])
        q = u[:, :rank].T.contiguous().to(grad.dtype)
        if "Q" in state:
            rotation = q @ state["Q"].T  # r_new x r_old
            # Align signs: the largest |entry| of every row of R positive (same subspace -> R = I).
            signs = torch.sign(rotation.gather(1, rotation.abs().argmax(1, keepdim=True)))
            signs = torch.where(signs == 0, torch.ones_like(signs), signs)
            q, rotation = q * signs, rotation * signs
            state["exp_avg"] = rotation @ state["exp_avg"]
            if group["second_moment"] == "squared":
                state["exp_avg_sq"] = rotation.square() @ state["exp_avg_sq"]
            else:
                state["exp_avg_sq"] = (rotation @ state["exp_avg_sq"]).clamp_(min=0)
        else:
            state["step"] = 0
            state["exp_avg"] = torch.zeros(rank, grad.shape[1], dtype=grad.dtype, device=grad.device)
            state["exp_avg_sq"] = torch.zeros_like(state["exp_avg"])
        state["Q"] = q
        state["age"] = 0
        low = q @ grad
        state["captured"] = low.square().sum().item() / total if total > 0 else 1.0
        self._counter()["refreshes"] += 1
        return low


__all__ = ["AdaRankGrad", "MOMENT_KEYS", "choose_rank", "projection_groups", "randomized_svd",
           "state_bytes", "target_matrices", "total_state_bytes"]
