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
sequence explores different directions while staying a pure function of the settings. The
parameters are cut into fixed chunks of ``NOISE_CHUNK`` elements (param_groups order); a chunk's
noise comes from a generator seeded with (step seed, chunk, draw), so every pass regenerates the
very same direction chunk by chunk into small reusable buffers: the direction is never stored
whole, and on CPU the chunks are drawn on torch's intra-op thread count in parallel (drawing
N(0, 1) for 135M weights takes ~0.4 s a thread, about a forward pass of a small batch: three
draws per step made MeZO 4× a forward on 2 cores). Results do not depend on the thread count.

Multi-process (accelerate/DDP). Every process holds a different slice of the batch: g is
all-reduced (mean over processes) with ``torch.distributed`` before the update, and the base seed
is broadcast from process 0, so every process applies the same update and replicas stay equal.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from stages.core.batches import causal_lm_loss
from stages.core.errors import fail
from stages.core.seeds import mix as _mix
from stages.core.seeds import step_seed
from stages.core.settings import check_positive, setting

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from stages.core.sft import StepInputs

V_EPS = 1e-8  # ZO-AdaMU's stability constant in √(v + 1e-8)
NOISE_CHUNK = 1 << 21  # elements per noise chunk: 8 MB of fp32 scratch per draw and thread


@dataclass(kw_only=True)
class ZerothOrderSettings:
    """Zeroth-order training: two forward passes at θ ± ε·z estimate the gradient along z."""

    zo_eps: float = setting(help="perturbation scale ε (MeZO: 1e-3 for full weights, 1e-2 for a LoRA)")

    def __post_init__(self):
        check_positive(self, "zo_eps")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@dataclass(frozen=True)
class _Chunk:
    """Elements [start, end) of a parameter (flattened); a non-contiguous parameter is one chunk."""
    group: dict
    param: torch.Tensor
    start: int
    end: int
    index: int  # position among all chunks: names its noise

    def of(self, tensor: torch.Tensor) -> torch.Tensor:
        """This chunk of ``tensor`` (the parameter, or a state tensor shaped like it), as a view:
        the tensor itself when the chunk is all of it, else a flat slice."""
        if self.start == 0 and self.end == tensor.numel():
            return tensor
        return tensor.view(-1)[self.start:self.end]


class _Draws:
    """Per thread: one generator per device and scratch buffers, reused from step to step."""
    local = threading.local()

    def __init__(self, chunk: _Chunk, seed: int):
        self.chunk, self.seed = chunk, seed
        if not hasattr(self.local, "generators"):
            self.local.generators, self.local.buffers = {}, {}

    def scratch(self, i: int) -> torch.Tensor:
        """Scratch buffer ``i`` shaped like the chunk (contents undefined)."""
        param = self.chunk.param
        key, size = (param.device, param.dtype, i), self.chunk.end - self.chunk.start
        buffer = self.local.buffers.get(key)
        if buffer is None or buffer.numel() < size:  # grows to the largest chunk seen (at most NOISE_CHUNK)
            buffer = self.local.buffers[key] = torch.empty(size, device=param.device, dtype=param.dtype)
        view = buffer[:size]
        return view.view_as(param) if size == param.numel() else view  # shaped as _Chunk.of gives it

    def normal(self, i: int) -> torch.Tensor:
        """The chunk's i-th N(0, 1) draw of this step, in scratch buffer ``i``: the same in every pass."""
        device = self.chunk.param.device
        generator = self.local.generators.get(device)
        if generator is None:
            generator = self.local.generators[device] = torch.Generator(device=device)
        generator.manual_seed(_mix(self.seed, self.chunk.index, i))
        return self.scratch(i).normal_(generator=generator)


_POOLS: dict[int, ThreadPoolExecutor] = {}


def _pool(workers: int) -> ThreadPoolExecutor:
    if workers not in _POOLS:
        _POOLS[workers] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="zo-noise")
    return _POOLS[workers]


class _ZerothOrder(torch.optim.Optimizer):
    """What MeZO and ZO-AdaMU share: the seeded step counter, the per-device generators and noise
    buffers, the closure's loss as a tensor, and the cross-process mean of g."""

    def __init__(self, params: Iterable, defaults: dict, seed: int | None):
        super().__init__(params, defaults)
        self._seed = seed
        self.projected_grad = 0.0  # g of the last step (for logging and tests)

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

    def _zero_state(self, *keys: str) -> None:
        """Per-parameter state tensors (moments) as zeros, where a parameter does not have them yet."""
        for param in (p for g in self.param_groups for p in g["params"]):
            for key in keys:
                if key not in self.state[param]:
                    self.state[param][key] = torch.zeros_like(param, memory_format=torch.contiguous_format)

    def _chunks(self) -> list[_Chunk]:
        chunks: list[_Chunk] = []
        for group in self.param_groups:
            for param in group["params"]:
                n = param.numel()
                size = NOISE_CHUNK if param.is_contiguous() else max(n, 1)
                for start in range(0, n, size):
                    chunks.append(_Chunk(group, param, start, min(start + size, n), len(chunks)))
        return chunks

    def _for_chunks(self, seed: int, work: Callable[[_Chunk, _Draws], None]) -> None:
        """``work(chunk, draws)`` on every chunk of every parameter with the step's noise
        (``draws.normal(i)``); chunks are independent, so on CPU they run on a thread pool."""
        def run(chunk: _Chunk) -> None:
            with torch.no_grad():  # grad mode is per thread
                work(chunk, _Draws(chunk, seed))

        chunks = self._chunks()
        workers = torch.get_num_threads() if self._device().type == "cpu" else 1
        if workers > 1 and len(chunks) > 1:
            for _ in _pool(workers).map(run, chunks):
                pass
        else:
            for chunk in chunks:
                run(chunk)

    def _perturb(self, seed: int, scale: float) -> None:
        """θ += scale·ε·z, z the step's N(0, I) direction (MeZO's and ZO-Adam's; ZO-AdaMU perturbs by its momentum)."""
        self._for_chunks(seed, lambda c, draws: c.of(c.param).add_(draws.normal(0), alpha=scale * c.group["eps"]))

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

    def _two_losses(self, closure: Callable, seed: int, perturb: Callable[[int, float], None]) -> tuple[torch.Tensor, torch.Tensor]:
        """ℓ+ at θ + ε·d and ℓ− at θ − ε·d (``perturb(seed, scale)`` regenerates d for each
        pass); the parameters are left at θ − ε·d. If the closure raises (Ctrl-C, out of memory),
        θ is restored before the error propagates."""
        applied = 0.0
        try:
            perturb(seed, +1.0)
            applied = 1.0
            loss_plus = self._loss(closure)
            perturb(seed, -2.0)
            applied = -1.0
            loss_minus = self._loss(closure)
        except BaseException:
            if applied:
                perturb(seed, -applied)
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
    z is never stored: memory is inference's plus a chunk-sized scratch buffer per thread; the
    optimizer state is two integers. ``step`` returns (ℓ+ + ℓ−)/2, an O(ε²)
    estimate of the loss at θ (ℓ+ alone is off by ε·g).
    """

    def __init__(self, params: Iterable, lr: float = 1e-6, eps: float = 1e-3, weight_decay: float = 0.0,
                 seed: int | None = None):
        if lr < 0 or eps <= 0 or weight_decay < 0:
            raise ValueError(f"MeZO: need lr >= 0, eps > 0, weight_decay >= 0 (got {lr}, {eps}, {weight_decay})")
        super().__init__(params, {"lr": lr, "eps": eps, "weight_decay": weight_decay}, seed)

    def _restore_and_update(self, seed: int, g: float) -> None:
        def work(c: _Chunk, draws: _Draws) -> None:
            lr, eps, keep = c.group["lr"], c.group["eps"], 1.0 - c.group["lr"] * c.group["weight_decay"]
            z, param = draws.normal(0), c.of(c.param)
            if keep != 1.0:
                param.mul_(keep)
            param.add_(z, alpha=keep * eps - lr * g)

        self._for_chunks(seed, work)

    @torch.no_grad()
    def step(self, closure: Callable | None = None) -> float:  # type: ignore[override]
        if closure is None:
            raise ValueError("MeZO.step needs a closure returning the batch loss (no backward)")
        eps = self._same("eps")
        t, seed = self._begin_step()
        loss_plus, loss_minus = self._two_losses(closure, seed, self._perturb)
        g = self._projected_grad(loss_plus, loss_minus, eps)
        self._restore_and_update(seed, g)
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

    def _components(self, c: _Chunk, draws: _Draws, s: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ż, z̈, m_t) for chunk ``c``; ż, z̈ and m_t live in scratch buffers (z̈ is m_{t−1}
        itself when α = 1: no second draw)."""
        momentum = c.of(self.state[c.param]["momentum"])
        z_dot = draws.normal(0).mul_(math.sqrt(s["alpha"]))
        if s["alpha"] < 1.0:
            z_ddot = draws.normal(1).mul_(math.sqrt(1.0 - s["alpha"])).add_(momentum)
        else:
            z_ddot = momentum
        m = torch.mul(z_dot, s["beta1"], out=draws.scratch(2)).add_(z_ddot, alpha=1.0 - s["beta1"])
        return z_dot, z_ddot, m

    def _perturb_by_momentum(self, seed: int, s: dict, scale: float) -> None:
        self._for_chunks(seed, lambda c, draws: c.of(c.param).add_(self._components(c, draws, s)[2],
                                                                      alpha=scale * c.group["eps"]))

    def _restore_and_update(self, seed: int, s: dict, g: float) -> None:
        def work(c: _Chunk, draws: _Draws) -> None:
            lr, eps, wd = c.group["lr"], c.group["eps"], c.group["weight_decay"]
            z_dot, z_ddot, m = self._components(c, draws, s)
            param = c.of(c.param)
            param.add_(m, alpha=eps)  # restore θ
            if lr * wd != 0.0:
                param.mul_(1.0 - lr * wd)
            # v = β2·ż² + (1 − β2)·z̈², built in ż's buffer (ż is no longer needed)
            v = z_dot.square_().mul_(s["beta2"]).addcmul_(z_ddot, z_ddot, value=1.0 - s["beta2"])
            param.addcdiv_(m, v.add_(V_EPS).sqrt_(), value=-lr * g)
            c.of(self.state[c.param]["momentum"]).copy_(m)

        self._for_chunks(seed, work)

    @torch.no_grad()
    def step(self, closure: Callable | None = None) -> float:  # type: ignore[override]
        if closure is None:
            raise ValueError("ZOAdaMU.step needs a closure returning the batch loss (no backward)")
        eps = self._same("eps")
        t, seed = self._begin_step()
        self._zero_state("momentum")
        s = self.schedule(t)
        loss_plus, loss_minus = self._two_losses(closure, seed, lambda sd, scale: self._perturb_by_momentum(sd, s, scale))
        g = self._projected_grad(loss_plus, loss_minus, eps)
        self._restore_and_update(seed, s, g)
        self._end_step(t)
        return float((loss_plus + loss_minus) / 2)


# ----------------------------------------------------------------------------- the core's hooks

def zeroth_order_step(step: StepInputs) -> float:
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

    def _restore_and_update(self, seed: int, g: float, t: int) -> None:
        def work(c: _Chunk, draws: _Draws) -> None:
            group = c.group
            lr, eps, wd, (beta1, beta2) = group["lr"], group["eps"], group["weight_decay"], group["betas"]
            correction1, correction2 = 1.0 - beta1 ** t, 1.0 - beta2 ** t
            z, param = draws.normal(0), c.of(c.param)
            param.add_(z, alpha=eps)  # restore θ
            exp_avg, exp_avg_sq = c.of(self.state[c.param]["exp_avg"]), c.of(self.state[c.param]["exp_avg_sq"])
            exp_avg.mul_(beta1).add_(z, alpha=(1.0 - beta1) * g)
            exp_avg_sq.mul_(beta2).addcmul_(z, z, value=(1.0 - beta2) * g * g)
            if lr * wd != 0.0:
                param.mul_(1.0 - lr * wd)
            # the denominator in z's buffer (z is no longer needed)
            denominator = torch.div(exp_avg_sq, correction2, out=z).sqrt_().add_(group["adam_eps"])
            param.addcdiv_(exp_avg, denominator, value=-lr / correction1)

        self._for_chunks(seed, work)

    @torch.no_grad()
    def step(self, closure: Callable | None = None) -> float:  # type: ignore[override]
        if closure is None:
            raise ValueError("ZOAdam.step needs a closure returning the batch loss (no backward)")
        eps = self._same("eps")
        t, seed = self._begin_step()
        self._zero_state("exp_avg", "exp_avg_sq")
        loss_plus, loss_minus = self._two_losses(closure, seed, self._perturb)
        g = self._projected_grad(loss_plus, loss_minus, eps)
        self._restore_and_update(seed, g, t + 1)
        self._end_step(t)
        return float((loss_plus + loss_minus) / 2)
