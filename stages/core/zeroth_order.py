"""Zeroth-order optimisers: MeZO (ZO-SGD with the seed trick) and ZO-AdaMU, plus their train step.

Both estimate the gradient's projection on a random direction from two forward passes and never
run backward:

    g = [L(θ + εd) − L(θ − εd)] / 2ε          (d: the step's random direction)

They are real ``torch.optim.Optimizer`` s: ``step(closure)`` takes a closure that returns the
loss of the current batch WITHOUT calling backward (``zeroth_order_step`` builds it: forward passes
in eval mode, so dropout cannot make ℓ+ and ℓ− incomparable, under ``torch.no_grad``). lr, eps and
weight_decay live in ``param_groups`` so the core's LR scheduler drives lr as for any optimizer.

Randomness. Each step's direction is drawn from a *step seed*, the t-th output of a SplitMix64
counter generator whose whole state, (base seed, steps done), is kept in ``optimizer.state["zo"]``:
a run is reproducible and resumes bit for bit from ``state_dict()``. The base seed is the
constructor's ``seed``, or (``seed=None``, what the method scripts use) one draw from torch's global
RNG at the first step: the core seeds that RNG per task (``seed * 1009 + task``), so each task of a
sequence explores different directions while staying a pure function of the settings. One
``torch.Generator`` per device is re-seeded with the step seed before every pass, and the
parameters are visited in one fixed order (param_groups order), so every pass regenerates the very
same direction, parameter by parameter, into one reusable buffer the size of the largest
parameter: the direction is never stored whole.

Multi-process (accelerate/DDP). Every process holds a different slice of the batch: g is
all-reduced (mean over processes) with ``torch.distributed`` before the update, and the base seed
is broadcast from process 0, so every process applies the same update and replicas stay equal.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Iterable

import torch
import torch.distributed as dist

from .batches import causal_lm_loss
from .errors import fail

if TYPE_CHECKING:
    from .sft import StepInputs

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
V_EPS = 1e-8  # ZO-AdaMU's stability constant in √(v + 1e-8)


def step_seed(base_seed: int, step: int) -> int:
    """Output ``step`` of a SplitMix64 generator seeded with ``base_seed`` (63 bits, for torch)."""
    z = (base_seed + (step + 1) * _GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _ZerothOrder(torch.optim.Optimizer):
    """What MeZO and ZO-AdaMU share: the seeded step counter, the per-device generators and noise
    buffers, the closure's loss as a tensor, and the cross-process mean of g."""

    def __init__(self, params: Iterable, defaults: dict, seed: int | None):
        super().__init__(params, defaults)
        self._seed = seed
        self.projected_grad = 0.0  # g of the last step (for logging and tests)
        self._generators: dict[torch.device, torch.Generator] = {}
        self._buffers: dict[tuple, torch.Tensor] = {}

    # -- counter and seed ------------------------------------------------------------------------

    @property
    def steps_done(self) -> int:
        return self.state["zo"]["step"] if "zo" in self.state else 0

    def _begin_step(self) -> tuple[int, int]:
        """(index of this step, its seed). The state dict is replaced, never mutated, so a state
        dict handed out or loaded earlier is never changed by later steps."""
        if "zo" not in self.state:
            base = self._seed if self._seed is not None else int(torch.randint(0, 2**62, (1,)).item())
            if _distributed():
                value = torch.tensor([base], dtype=torch.int64, device=self._device())
                dist.broadcast(value, src=0)
                base = int(value.item())
            self.state["zo"] = {"seed": base, "step": 0}
        t = self.state["zo"]["step"]
        return t, step_seed(self.state["zo"]["seed"], t)

    def _end_step(self, t: int) -> None:
        self.state["zo"] = {"seed": self.state["zo"]["seed"], "step": t + 1}

    # -- parameters, generators, buffers ---------------------------------------------------------

    def _device(self) -> torch.device:
        return self.param_groups[0]["params"][0].device

    def _reseed(self, seed: int) -> None:
        for param in (p for g in self.param_groups for p in g["params"]):
            if param.device not in self._generators:
                self._generators[param.device] = torch.Generator(device=param.device)
        for generator in self._generators.values():
            generator.manual_seed(seed)

    def _zero_state(self, *keys: str) -> None:
        """Per-parameter state tensors (moments) as zeros, where a parameter does not have them yet."""
        for param in (p for g in self.param_groups for p in g["params"]):
            for key in keys:
                if key not in self.state[param]:
                    self.state[param][key] = torch.zeros_like(param, memory_format=torch.preserve_format)

    def _alloc_buffers(self, count: int) -> None:
        """``count`` flat scratch tensors per (device, dtype), each as large as the largest
        parameter: the only parameter-sized memory a step adds (freed after the step)."""
        sizes: dict[tuple, int] = {}
        for param in (p for g in self.param_groups for p in g["params"]):
            key = (param.device, param.dtype)
            sizes[key] = max(sizes.get(key, 0), param.numel())
        self._buffers = {(dev, dt, i): torch.empty(n, device=dev, dtype=dt) for (dev, dt), n in sizes.items() for i in range(count)}

    def _normal(self, param: torch.Tensor, index: int = 0) -> torch.Tensor:
        """N(0, 1) noise shaped like ``param`` in scratch buffer ``index``: the next draw of the
        step's generator for the parameter's device."""
        buffer = self._buffers[(param.device, param.dtype, index)][:param.numel()].view_as(param)
        return buffer.normal_(generator=self._generators[param.device])

    def _same(self, key: str) -> float:
        values = {g[key] for g in self.param_groups}
        if len(values) != 1:
            raise ValueError(f"{type(self).__name__}: '{key}' must be the same in every param group, got {sorted(values)}")
        return values.pop()

    # -- losses ----------------------------------------------------------------------------------

    @staticmethod
    def _loss(closure: Callable) -> torch.Tensor:
        loss = torch.as_tensor(closure()).detach().reshape(())
        return loss if loss.dtype == torch.float64 else loss.float()

    def _two_losses(self, closure: Callable, seed: int, perturb: Callable[[float], None]) -> tuple[torch.Tensor, torch.Tensor]:
        """ℓ+ at θ + ε·d and ℓ− at θ − ε·d (d regenerated from ``seed`` for each pass); the
        parameters are left at θ − ε·d. If the closure raises (Ctrl-C, out of memory), θ is
        restored before the error propagates."""
        applied = 0.0
        try:
            self._reseed(seed)
            perturb(+1.0)
            applied = 1.0
            loss_plus = self._loss(closure)
            self._reseed(seed)
            perturb(-2.0)
            applied = -1.0
            loss_minus = self._loss(closure)
        except BaseException:
            if applied:
                self._reseed(seed)
                perturb(-applied)
            raise
        return loss_plus, loss_minus

    def _projected_grad(self, loss_plus: torch.Tensor, loss_minus: torch.Tensor, eps: float) -> float:
        """g = (ℓ+ − ℓ−) / 2ε, averaged over processes when several train together (the one
        host sync of the step)."""
        g = ((loss_plus - loss_minus) / (2 * eps)).reshape(1).to(self._device())
        if _distributed():
            dist.all_reduce(g, op=dist.ReduceOp.SUM)
            g = g / dist.get_world_size()
        self.projected_grad = float(g.item())
        return self.projected_grad


class MeZO(_ZerothOrder):
    """MeZO: zeroth-order SGD with the seed trick (Malladi et al., NeurIPS 2023, Algorithm 1).

    Per step, with z ~ N(0, I) regenerated from the step seed s, parameter by parameter:
        θ += εz;  ℓ+ = L(θ);  θ −= 2εz;  ℓ− = L(θ);  g = (ℓ+ − ℓ−) / 2ε
        θ += εz (restore);  θ −= lr·(g·z + wd·θ)      (wd = 0 on biases and norms)
    The restore and the update share one pass (three generations of z per step, not four):
    θ ← (1 − lr·wd)·θ + ((1 − lr·wd)·ε − lr·g)·z, which is the restore exactly when lr = 0.
    z is never stored: memory is inference's plus one scratch buffer as large as the largest
    parameter; the optimizer state is two integers. ``step`` returns (ℓ+ + ℓ−)/2, an O(ε²)
    estimate of the loss at θ (ℓ+ alone is off by ε·g).
    """

    def __init__(self, params: Iterable, lr: float = 1e-6, eps: float = 1e-3, weight_decay: float = 0.0,
                 seed: int | None = None):
        if lr < 0 or eps <= 0 or weight_decay < 0:
            raise ValueError(f"MeZO: need lr >= 0, eps > 0, weight_decay >= 0 (got {lr}, {eps}, {weight_decay})")
        super().__init__(params, {"lr": lr, "eps": eps, "weight_decay": weight_decay}, seed)

    def _perturb(self, scale: float) -> None:
        for group in self.param_groups:
            for param in group["params"]:
                param.add_(self._normal(param), alpha=scale * group["eps"])

    def _restore_and_update(self, g: float) -> None:
        for group in self.param_groups:
            lr, eps, keep = group["lr"], group["eps"], 1.0 - group["lr"] * group["weight_decay"]
            for param in group["params"]:
                z = self._normal(param)
                if keep != 1.0:
                    param.mul_(keep)
                param.add_(z, alpha=keep * eps - lr * g)

    @torch.no_grad()
    def step(self, closure: Callable | None = None) -> float:  # type: ignore[override]
        if closure is None:
            raise ValueError("MeZO.step needs a closure returning the batch loss (no backward)")
        eps = self._same("eps")
        t, seed = self._begin_step()
        self._alloc_buffers(1)
        try:
            loss_plus, loss_minus = self._two_losses(closure, seed, self._perturb)
            g = self._projected_grad(loss_plus, loss_minus, eps)
            self._reseed(seed)
            self._restore_and_update(g)
        finally:
            self._buffers = {}
        self._end_step(t)
        return float((loss_plus + loss_minus) / 2)


def annealed(t: int, t1: int, t2: int, start: float, end: float) -> float:
    """``start`` for t <= T1, a half cosine from ``start`` to ``end`` over T1..T2, then ``end``."""
    if t <= t1:
        return start
    if t >= t2:
        return end
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * (t - t1) / (t2 - t1)))


class ZOAdaMU(_ZerothOrder):
    """ZO-AdaMU (Jiang et al., AAAI 2024, Algorithm 1): the perturbation itself carries momentum.

    Per step t, per parameter, with fresh noise n1, n2 ~ N(0, I) regenerated from the step seed:
        ż = √α·n1                 ż ~ N(0, √α)
        z̈ = m_{t−1} + √(1−α)·n2   z̈ ~ N(m_{t−1}, √(1−α))
        m_t = β1·ż + (1 − β1)·z̈
        g = [L(θ + ε·m_t) − L(θ − ε·m_t)] / 2ε
        v_t = β2·ż² + (1 − β2)·z̈²
        θ ← θ − η·(g·m_t / √(v_t + 1e-8) + wd·θ)     (wd = 0 on biases and norms)
    N(μ, √a) is read as the paper writes it and its authors' code samples it,
    ``torch.normal(mean=μ, std=√a)``: the second argument is the STANDARD DEVIATION, so ż has
    variance α and z̈ variance 1 − α around m_{t−1} (the two variances sum to one).

    α, β1, β2 are annealed on the optimizer's own step count t (0 at the first step of a task):
    1 up to T1, a half cosine to their end values over T1..T2, then constant (``annealed``).
    The end values (0.01, 0.13, 0.01) are where the authors' released schedule (``_ema_weight``:
    1 before T1, then 0.5·(1 + cos(π·x)) with a per-coefficient speed) stands at T2 for their
    runs (T1, T2, T) = (1024, 16000, 20000) if evaluated once per step; the paper's text fixes
    only the shape. β1 must stay > 0: with β1 = 0, m would be a random walk.
    Before T1 this is m = z ~ N(0, I) and v = z², i.e. MeZO's direction with a sign-like update
    η·g·z/|z|; later the direction keeps a share of the previous one (momentum) and v rescales it.

    State: unlike MeZO, ZO-AdaMU keeps one tensor per parameter, m_{t−1} ("momentum", as large
    as the parameter; zeros at the start). v is not carried over. The noise is regenerated from the
    step seed in each of the three passes (+ε, −2ε, restore + update) and m_t recomputed from
    m_{t−1}, which is overwritten by m_t only in the last pass: memory = inference + m + scratch.
    """

    def __init__(self, params: Iterable, lr: float = 1e-2, eps: float = 1e-1, weight_decay: float = 0.0,
                 anneal_steps: tuple[int, int] = (1024, 16000), alpha_end: float = 0.01,
                 beta1_end: float = 0.13, beta2_end: float = 0.01, seed: int | None = None):
        t1, t2 = anneal_steps
        if lr < 0 or eps <= 0 or weight_decay < 0:
            raise ValueError(f"ZOAdaMU: need lr >= 0, eps > 0, weight_decay >= 0 (got {lr}, {eps}, {weight_decay})")
        if not 0 <= t1 <= t2:
            raise ValueError(f"ZOAdaMU: need 0 <= T1 <= T2, got {anneal_steps}")
        if not (0 <= alpha_end <= 1 and 0 < beta1_end <= 1 and 0 <= beta2_end <= 1):
            raise ValueError("ZOAdaMU: alpha_end and beta2_end must be in [0, 1], beta1_end in (0, 1] "
                             "(β1 = 0 would make m a random walk)")
        super().__init__(params, {"lr": lr, "eps": eps, "weight_decay": weight_decay}, seed)
        self.anneal_steps = (int(t1), int(t2))
        self.ends = {"alpha": alpha_end, "beta1": beta1_end, "beta2": beta2_end}

    def schedule(self, t: int) -> dict[str, float]:
        """α, β1, β2 at step t (0-based)."""
        t1, t2 = self.anneal_steps
        return {name: annealed(t, t1, t2, 1.0, end) for name, end in self.ends.items()}

    def _components(self, param: torch.Tensor, s: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ż, z̈, m_t) for ``param``; ż and z̈ live in scratch buffers (z̈ is m_{t−1} itself when
        α = 1: no second draw)."""
        momentum = self.state[param]["momentum"]
        z_dot = self._normal(param, 0).mul_(math.sqrt(s["alpha"]))
        if s["alpha"] < 1.0:
            z_ddot = self._normal(param, 1).mul_(math.sqrt(1.0 - s["alpha"])).add_(momentum)
        else:
            z_ddot = momentum
        m = self._buffers[(param.device, param.dtype, 2)][:param.numel()].view_as(param)
        torch.mul(z_dot, s["beta1"], out=m).add_(z_ddot, alpha=1.0 - s["beta1"])
        return z_dot, z_ddot, m

    def _perturb(self, s: dict, scale: float) -> None:
        for group in self.param_groups:
            for param in group["params"]:
                param.add_(self._components(param, s)[2], alpha=scale * group["eps"])

    def _restore_and_update(self, s: dict, g: float) -> None:
        for group in self.param_groups:
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for param in group["params"]:
                z_dot, z_ddot, m = self._components(param, s)
                param.add_(m, alpha=eps)  # restore θ
                if lr * wd != 0.0:
                    param.mul_(1.0 - lr * wd)
                # v = β2·ż² + (1 − β2)·z̈², built in ż's buffer (ż is no longer needed)
                v = z_dot.square_().mul_(s["beta2"]).addcmul_(z_ddot, z_ddot, value=1.0 - s["beta2"])
                param.addcdiv_(m, v.add_(V_EPS).sqrt_(), value=-lr * g)
                self.state[param]["momentum"].copy_(m)

    @torch.no_grad()
    def step(self, closure: Callable | None = None) -> float:  # type: ignore[override]
        if closure is None:
            raise ValueError("ZOAdaMU.step needs a closure returning the batch loss (no backward)")
        eps = self._same("eps")
        t, seed = self._begin_step()
        self._zero_state("momentum")
        s = self.schedule(t)
        self._alloc_buffers(3)
        try:
            loss_plus, loss_minus = self._two_losses(closure, seed, lambda scale: self._perturb(s, scale))
            g = self._projected_grad(loss_plus, loss_minus, eps)
            self._reseed(seed)
            self._restore_and_update(s, g)
        finally:
            self._buffers = {}
        self._end_step(t)
        return float((loss_plus + loss_minus) / 2)


# ----------------------------------------------------------------------------- the core's hooks

def zeroth_order_step(step: "StepInputs") -> float:
    """The ``train_step`` of the zeroth-order methods: the closure is the mean loss over the
    step's micro-batches (one forward each, eval mode, no autograd); the optimizer evaluates it
    at θ ± ε·direction and updates. Returns this process's (ℓ+ + ℓ−)/2."""
    model, batches = step.model, step.micro_batches
    if getattr(step.optimizer, "scaler", None) is not None:
        fail("zeroth-order methods cannot run with --mixed_precision fp16 (a gradient scaler needs a "
             "backward pass): use bf16 or no")
    losses: list[torch.Tensor] = []

    def closure() -> torch.Tensor:
        total = sum(causal_lm_loss(model, batch) for batch in batches) / len(batches)
        losses.append(total)
        return total

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            # accelerate's optimizer wrapper drops step()'s return value: the closure keeps the losses
            step.optimizer.step(closure)
    finally:
        model.train(was_training)
    return float(torch.stack(losses).mean())


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


# ----------------------------------------------------------------------------- ZO-Adam (LoRETTA)

class ZOAdam(_ZerothOrder):
    """ZO-Adam, LoRETTA's third trainer (its trainer_torch.py): Adam's moments fed with MeZO's
    SPSA gradient estimate instead of a backpropagated gradient.

    Per step t (1-based for the bias corrections), with z ~ N(0, I) regenerated from the step seed:
        ℓ± = L(θ ± εz);  g = (ℓ+ − ℓ−) / 2ε;  ĝ = g·z            (SPSA estimate of ∇L)
        m ← β1·m + (1 − β1)·ĝ;   v ← β2·v + (1 − β2)·ĝ²
        θ ← θ − lr·(m / (1 − β1^t)) / (√(v / (1 − β2^t)) + δ) − lr·wd·θ   (wd = 0 on biases and norms)
    Memory: inference + Adam's two moments (as large as the trainable parameters: meant for
    adapters such as LoRETTA's, not full fine-tuning) + one scratch buffer; z is never stored.
    The restore θ − εz → θ and the update share the third pass over the parameters.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, eps: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 adam_eps: float = 1e-8, weight_decay: float = 0.0, seed: int | None = None):
        if lr < 0 or eps <= 0 or weight_decay < 0 or adam_eps <= 0:
            raise ValueError(f"ZOAdam: need lr >= 0, eps > 0, adam_eps > 0, weight_decay >= 0 "
                             f"(got {lr}, {eps}, {adam_eps}, {weight_decay})")
        if not all(0 <= b < 1 for b in betas):
            raise ValueError(f"ZOAdam: betas must be in [0, 1), got {betas}")
        super().__init__(params, {"lr": lr, "eps": eps, "betas": tuple(betas), "adam_eps": adam_eps,
                                  "weight_decay": weight_decay}, seed)

    def _perturb(self, scale: float) -> None:
        for group in self.param_groups:
            for param in group["params"]:
                param.add_(self._normal(param), alpha=scale * group["eps"])

    def _restore_and_update(self, g: float, t: int) -> None:
        for group in self.param_groups:
            lr, eps, wd, (beta1, beta2) = group["lr"], group["eps"], group["weight_decay"], group["betas"]
            correction1, correction2 = 1.0 - beta1 ** t, 1.0 - beta2 ** t
            for param in group["params"]:
                z = self._normal(param)
                param.add_(z, alpha=eps)  # restore θ
                state = self.state[param]
                state["exp_avg"].mul_(beta1).add_(z, alpha=(1.0 - beta1) * g)
                state["exp_avg_sq"].mul_(beta2).addcmul_(z, z, value=(1.0 - beta2) * g * g)
                if lr * wd != 0.0:
                    param.mul_(1.0 - lr * wd)
                # the denominator in z's buffer (z is no longer needed)
                denominator = torch.div(state["exp_avg_sq"], correction2, out=z).sqrt_().add_(group["adam_eps"])
                param.addcdiv_(state["exp_avg"], denominator, value=-lr / correction1)

    @torch.no_grad()
    def step(self, closure: Callable | None = None) -> float:  # type: ignore[override]
        if closure is None:
            raise ValueError("ZOAdam.step needs a closure returning the batch loss (no backward)")
        eps = self._same("eps")
        t, seed = self._begin_step()
        self._zero_state("exp_avg", "exp_avg_sq")
        self._alloc_buffers(1)
        try:
            loss_plus, loss_minus = self._two_losses(closure, seed, self._perturb)
            g = self._projected_grad(loss_plus, loss_minus, eps)
            self._reseed(seed)
            self._restore_and_update(g, t + 1)
        finally:
            self._buffers = {}
        self._end_step(t)
        return float((loss_plus + loss_minus) / 2)
