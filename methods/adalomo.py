"""AdaLomo: low-memory full-parameter optimisation with an adaptive learning rate (Lv et al., 2023; Findings of ACL 2024).

Update rule, per parameter θ (matrix m×n or vector), at step t = 1, 2, ... (Algorithm 1 of the
paper and ``lomo_optim.AdaLomo`` 0.1.1, whose numbers this reproduces):

    G   = g                                   (optionally clamped to ±clip_grad_value, then × c)
    β2  = 1 − t^decay_rate                    (decay_rate −0.8: β2 = 0 at t = 1, → 1 later)
    matrix:  R = β2·R + (1 − β2)·rowmean(G² + ε1)        R ∈ R^m  (running row means of g²)
             C = β2·C + (1 − β2)·colmean(G² + ε1)        C ∈ R^n  (running column means)
             V̂ = R·Cᵀ / mean(R)                          (Adafactor's rank-1 factorisation)
    vector:  V̂ = V = β2·V + (1 − β2)·(G² + ε1)          (full second moment)
    U   = G / √V̂
    U   = U / max(1, RMS(U) / clip_threshold)            (grouped update normalisation)
    α   = lr · max(ε2, RMS(θ))                           (relative step size)
    θ   = θ·(1 − α·weight_decay) − α·U

with RMS(x) = ‖x‖₂/√numel(x), (ε1, ε2) = ``eps`` = (1e-30, 1e-3), clip_threshold 1, lr read from
``param_groups`` when the update is applied (so any LR scheduler drives it). The state is R and C
per matrix (m + n floats, fp32) and V per vector: O(m + n), not O(m·n) like Adam's moments.

Fused update: no gradients are stored. Inside ``fused_backward()`` every trainable parameter
carries a ``register_post_accumulate_grad_hook``: the moment autograd has finished accumulating a
parameter's gradient (all its uses in the graph are done, so its value is no longer needed by
backward), the hook applies the rule above and sets ``p.grad = None``. At any time at most the
gradients of the parameters whose hooks are running exist, never a full set. The hooks live only
inside the context (no stray updates from any other backward, no hooks left on the model when the
optimizer is dropped). ``step()`` is then bookkeeping: it advances the step counter t. Outside the
context the class is an ordinary optimizer: a plain ``backward()`` stores gradients and ``step()``
applies the same rule from ``p.grad`` (same numbers, full gradient memory).

Differences from the library, all deliberate:
* devices: state lives on each parameter's device (the library calls ``.cuda()`` unconditionally);
  parameters in bf16/fp16 are updated through an fp32 copy (as the library does), fp32 in place.
* the library hooks ``Tensor.register_hook`` (fires before accumulation, so it updates the
  *previous* parameter and needs a final extra call after backward); post-accumulate hooks make
  each parameter's update self-contained. Each parameter's update depends only on its own gradient,
  value and state, so the order of the updates does not change any number.
* α is computed as a device tensor (no host sync per parameter); the library's implicit
  ``.item()`` rounds the same product, so results agree to float rounding (~1 ulp per step).
* weight decay follows the param groups (the method script decays matrices only; the library
  decays every tensor). The project's default is weight_decay 0, as the paper's fine-tuning runs.
* loss scaling: the library multiplies the loss by ``loss_scale`` (2^10) and divides each gradient
  by it, for fp16 *weights*. Here master weights are fp32 and bf16 autocast has fp32's exponent
  range, so no scaling is needed (a power-of-two scale would change no number anyway); fp16
  mixed precision (a GradScaler unscales in ``step()``, after the hooks ran) is refused.
* gradient clipping: AdaLomo's grouped update normalisation replaces global clipping (the paper
  trains without it; the library's ``clip_grad_norm`` defaults to None). LOMO's optional global
  norm clipping is implemented as the library does it, with TWO backward passes (the first, with
  ``retain_graph``, only measures ‖g‖ per parameter and frees each gradient; the second updates
  with g·c, c = min(1, max_norm/(‖g‖ + 1e-6))): ``adalomo_step`` runs it when the run's
  ``max_grad_norm`` > 0, so the method's params set ``max_grad_norm: 0`` (one backward).

Gradient accumulation: an update needs the whole step's gradient, and keeping micro-batch
gradients would store exactly what AdaLomo avoids: ``--grad_accum`` must be 1 (raise
``--batch_size`` instead); the method refuses anything else with a one-line error.

Several processes (accelerate/DDP): DDP all-reduces gradients in buckets *after* the hooks would
have consumed them, so ``adalomo_step`` runs backward under ``no_sync`` and each hook all-reduces
its own parameter's gradient (mean over processes, ``torch.distributed``) before the update, as
the library does under ZeRO-3: every process applies the same update and replicas stay equal.
This costs one blocking collective per parameter (no bucketing, no overlap with backward): correct
and memory-lean, slower than DDP on many GPUs. The hooks of all processes must fire in the same
order (same graph, same autograd engine: true for identical models and inputs of equal structure).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from stages.core.errors import fail
from stages.core.sft import weight_decay_groups

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from stages.core.sft import StepInputs


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class AdaLomo(torch.optim.Optimizer):
    """AdaLomo (see the module docstring for the rule). ``lr``, ``eps`` = (ε1, ε2),
    ``clip_threshold``, ``decay_rate``, ``weight_decay`` and ``clip_grad_value`` (0 = off) are
    per param group; the step counter is ``state["adalomo"]["step"]`` (saved by ``state_dict``)."""

    def __init__(self, params: Iterable, lr: float = 5e-4, eps: tuple[float, float] = (1e-30, 1e-3),
                 clip_threshold: float = 1.0, decay_rate: float = -0.8, weight_decay: float = 0.0,
                 clip_grad_value: float = 0.0):
        eps = tuple(float(e) for e in eps)
        if lr < 0 or len(eps) != 2 or min(eps) < 0 or clip_threshold <= 0 or weight_decay < 0 or clip_grad_value < 0:
            raise ValueError(f"AdaLomo: need lr >= 0, two eps >= 0, clip_threshold > 0, weight_decay >= 0, "
                             f"clip_grad_value >= 0 (got {lr}, {eps}, {clip_threshold}, {weight_decay}, {clip_grad_value})")
        if decay_rate >= 0:
            raise ValueError(f"AdaLomo: decay_rate must be negative (β2 = 1 − t^decay_rate), got {decay_rate}")
        defaults = {"lr": lr, "eps": eps, "clip_threshold": clip_threshold, "decay_rate": decay_rate,
                    "weight_decay": weight_decay, "clip_grad_value": clip_grad_value}
        super().__init__(params, defaults)
        self.clip_coef: torch.Tensor | None = None  # c of global-norm clipping, for this step only
        self._mode: str | None = None  # inside fused_backward: "update" or "norm"
        self._group_of: dict[torch.Tensor, dict] = {}
        self._norms: list[torch.Tensor] = []
        self._reduce = False

    # -- counter ---------------------------------------------------------------------------------

    @property
    def steps_done(self) -> int:
        return self.state["adalomo"]["step"] if "adalomo" in self.state else 0

    # -- the rule ----------------------------------------------------------------------------------

    def _state(self, param: torch.Tensor) -> dict:
        state = self.state[param]
        if not state:
            kw = {"dtype": torch.float32, "device": param.device}
            if param.ndim >= 2:
                state["exp_avg_sq_row"] = torch.zeros(param.shape[:-1], **kw)
                state["exp_avg_sq_col"] = torch.zeros(param.shape[:-2] + param.shape[-1:], **kw)
            else:
                state["exp_avg_sq"] = torch.zeros(param.shape, **kw)
        return state

    @staticmethod
    def _rms(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.norm(2) / (tensor.numel() ** 0.5)

    @torch.no_grad()
    def _update(self, param: torch.Tensor, grad: torch.Tensor, group: dict, t: int) -> None:
        """One parameter's AdaLomo update from its (already reduced) gradient; t is 1-based."""
        g = grad.to(torch.float32)
        del grad
        if group["clip_grad_value"] > 0:
            g = g.clamp(-group["clip_grad_value"], group["clip_grad_value"])
        if self.clip_coef is not None:
            g = g.mul(self.clip_coef)
        eps1, eps2 = group["eps"]
        beta2 = 1.0 - math.pow(t, group["decay_rate"])
        state = self._state(param)
        squared = g.square().add_(eps1)
        if param.ndim >= 2:
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            row.mul_(beta2).add_(squared.mean(dim=-1), alpha=1.0 - beta2)
            col.mul_(beta2).add_(squared.mean(dim=-2), alpha=1.0 - beta2)
            del squared
            r_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
            c_factor = col.unsqueeze(-2).rsqrt()
            update = torch.mul(r_factor, c_factor).mul_(g)
        else:
            state["exp_avg_sq"].mul_(beta2).add_(squared, alpha=1.0 - beta2)
            del squared
            update = state["exp_avg_sq"].rsqrt().mul_(g)
        del g
        update.div_((self._rms(update) / group["clip_threshold"]).clamp_(min=1.0))
        master = param if param.dtype == torch.float32 else param.to(torch.float32)
        alpha = self._rms(master).clamp_(min=eps2).mul_(group["lr"])
        if group["weight_decay"] > 0:
            master.mul_(1.0 - alpha * group["weight_decay"])
        master.sub_(update.mul_(alpha))
        if master is not param:
            param.copy_(master)

    # -- fused backward ----------------------------------------------------------------------------

    def _hook(self, param: torch.Tensor) -> None:
        grad, param.grad = param.grad, None
        if grad is None:
            return
        if self._reduce:
            dist.all_reduce(grad, op=dist.ReduceOp.SUM)
            grad.div_(dist.get_world_size())
        if self._mode == "norm":
            g = grad.to(torch.float32)
            self._norms.append(torch.norm(g, 2.0))
        else:
            self._update(param, grad, self._group_of[param], self.steps_done + 1)

    @contextlib.contextmanager
    def fused_backward(self, measure_norm: bool = False) -> Iterator[None]:
        """Within this block a ``backward()`` updates every parameter as soon as its gradient is
        complete and frees the gradient. ``measure_norm=True``: the backward only records each
        gradient's norm (first pass of global-norm clipping, see ``set_clip_norm``)."""
        if self._mode is not None:
            raise RuntimeError("AdaLomo.fused_backward is not re-entrant")
        self._group_of = {p: group for group in self.param_groups for p in group["params"] if p.requires_grad}
        stale = [p for p in self._group_of if p.grad is not None]
        if stale:
            raise RuntimeError(f"AdaLomo.fused_backward: {len(stale)} parameters already hold gradients "
                               "(a backward outside the fused block?): call zero_grad(set_to_none=True) first")
        self._mode = "norm" if measure_norm else "update"
        self._reduce = _distributed()
        if measure_norm:
            self._norms = []
        handles = [p.register_post_accumulate_grad_hook(self._hook) for p in self._group_of]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self._mode, self._group_of, self._reduce = None, {}, False

    def set_clip_norm(self, max_norm: float) -> float:
        """After a ``fused_backward(measure_norm=True)`` pass: c = min(1, max_norm/(‖g‖ + 1e-6))
        over all gradients together, applied by this step's updating pass. Returns ‖g‖."""
        if max_norm <= 0:
            raise ValueError(f"AdaLomo: max_norm must be positive, got {max_norm}")
        if not self._norms:
            raise RuntimeError("AdaLomo.set_clip_norm: no gradient norms were measured")
        total = torch.norm(torch.stack([n.to(self._norms[0].device) for n in self._norms]), 2.0)
        self.clip_coef = torch.clamp(float(max_norm) / (total + 1e-6), max=1.0)
        self._norms = []
        return float(total)

    # -- torch.optim.Optimizer -------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable | None = None):  # type: ignore[override]
        """Apply the update to every parameter that still holds a gradient (none after a fused
        backward), then advance the step counter."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        t = self.steps_done + 1
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    grad, param.grad = param.grad, None
                    self._update(param, grad, group, t)
        self.state["adalomo"] = {"step": t}  # replaced, never mutated: a saved state_dict stays as it was
        self.clip_coef = None
        return loss


# ----------------------------------------------------------------------------- the core's hooks

def check_supported(cfg) -> None:
    """One-line errors for settings the fused update cannot honour."""
    if cfg.grad_accum != 1:
        fail(f"AdaLomo updates inside backward and stores no gradients: --grad_accum must be 1, got "
             f"{cfg.grad_accum} (raise --batch_size instead)")
    if cfg.mixed_precision == "fp16":
        fail("AdaLomo cannot run with --mixed_precision fp16 (the gradient scaler unscales in step(), after "
             "the fused update): use bf16 or no")


def build_adalomo(model: torch.nn.Module, cfg) -> AdaLomo:
    """The method's optimizer from its settings (lr, eps, clip_threshold, decay_rate, weight_decay,
    clip_grad_value)."""
    check_supported(cfg)
    return AdaLomo(weight_decay_groups(model, cfg.weight_decay), lr=cfg.lr, eps=tuple(cfg.eps),
                   clip_threshold=cfg.clip_threshold, decay_rate=cfg.decay_rate, weight_decay=cfg.weight_decay,
                   clip_grad_value=cfg.clip_grad_value)


def adalomo_step(step: StepInputs) -> float:
    """The ``train_step`` of AdaLomo: forward (``causal_lm_loss``), backward with the fused update
    (a second, measuring backward first when ``max_grad_norm`` > 0), then ``optimizer.step()``,
    which only advances the counter. Returns this process's loss."""
    from stages.core.batches import causal_lm_loss  # transformers: imported where needed (light DDP workers)

    optimizer, model, acc = step.optimizer, step.model, step.accelerator
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    if not isinstance(inner, AdaLomo):
        fail(f"adalomo_step needs an AdaLomo optimizer, got {type(inner).__name__}")
    if getattr(optimizer, "scaler", None) is not None:
        fail("AdaLomo cannot run with --mixed_precision fp16 (a gradient scaler): use bf16 or no")
    if len(step.micro_batches) != 1:
        fail(f"AdaLomo: --grad_accum must be 1, got {len(step.micro_batches)} micro-batches")
    max_norm = getattr(step.cfg, "max_grad_norm", 0.0) or 0.0
    # Each hook all-reduces its own gradient; DDP's bucketed reduction must stay off.
    with acc.no_sync(model) if _distributed() else contextlib.nullcontext():
        loss = causal_lm_loss(model, step.micro_batches[0])
        if max_norm > 0:
            with inner.fused_backward(measure_norm=True):
                acc.backward(loss, retain_graph=True)
            inner.set_clip_norm(max_norm)
        with inner.fused_backward():
            acc.backward(loss)
    optimizer.step()
    return loss.item()
