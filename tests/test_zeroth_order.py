"""Zeroth-order optimisers (methods/zeroth_order.py) and their method scripts (mezo, zoadamu).

On tiny problems: MeZO's projected gradient is the directional derivative along its (regenerated)
z; a step allocates no gradients and no autograd graph and stays near two forward passes in
memory; the perturbation is undone exactly; both optimisers reduce a regression loss; resuming
from ``state_dict`` continues bit for bit; g is averaged across processes; ZO-AdaMU's annealing
holds its end values. Through the core's Trainer on the tiny Llama: the loss falls.
"""

from __future__ import annotations

import copy
import io
import math
import sys

from methods.zeroth_order import MeZO, ZOAdaMU, annealed
from stages.core.seeds import step_seed
from stages.core.sft import weight_decay_groups

import pytest
import torch
from conftest import ROOT, assert_help_lists, run_gloo_workers, run_summary, tiny_params, write_params
from test_methods import TARGETS, load_method
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

OPTIMIZERS = {"mezo": MeZO, "zoadamu": ZOAdaMU}


# ----------------------------------------------------------------------------- helpers

def regression(seed: int = 0, n: int = 64, d: int = 8, dtype=torch.float32):
    """A least-squares problem y = X·w* + noise, its optimum loss, and a zero-initialised model."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    y = x @ torch.randn(d, 1, generator=g, dtype=dtype) + 0.1 * torch.randn(n, 1, generator=g, dtype=dtype)
    model = torch.nn.Linear(d, 1).to(dtype)
    torch.nn.init.zeros_(model.weight)
    torch.nn.init.zeros_(model.bias)
    design = torch.cat([x, torch.ones(n, 1, dtype=dtype)], 1)
    best = ((design @ torch.linalg.lstsq(design, y).solution - y) ** 2).mean().item()
    return x, y, model, best


def mlp(seed: int = 0, width: int = 128, depth: int = 1) -> torch.nn.Module:
    """16 -> width (LayerNorm) -> ``depth`` hidden width x width layers -> 1."""
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(16, width), torch.nn.LayerNorm(width), torch.nn.Tanh()]
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(width, 1))


def mse_closure(model, x, y):
    return lambda: ((model(x) - y) ** 2).mean()


def make(name: str, model: torch.nn.Module, **kw):
    defaults = {"mezo": dict(lr=1e-2, eps=1e-3), "zoadamu": dict(lr=1e-2, eps=1e-3, anneal_steps=(20, 200))}[name]
    return OPTIMIZERS[name](weight_decay_groups(model, 0.0), **{**defaults, **kw})


def params_of(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


class PeakMemory(TorchDispatchMode):
    """Peak bytes of the tensors created inside the block and still alive (storages of
    ``existing`` tensors, e.g. the parameters, are not counted)."""

    def __init__(self, existing=()):
        super().__init__()
        self.existing = {t.untyped_storage().data_ptr() for t in existing}
        self.live: dict[int, tuple] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.live and key not in self.existing:
                    self.live[key] = (StorageWeakRef(storage), storage.nbytes())
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


# ----------------------------------------------------------------------------- MeZO's estimate

def test_mezo_projected_gradient_is_the_directional_derivative():
    """On f(w) = ½wᵀAw − bᵀw (float64), for 40 seeds: the update is −lr·g·z with z the step's
    perturbation, z ~ N(0, 1), and g = ∇f·z (exact for a quadratic: central differences cancel
    the curvature), so in particular sign(g) = sign(∇f·z)."""
    g0 = torch.Generator().manual_seed(0)
    a = torch.randn(12, 12, generator=g0, dtype=torch.float64)
    a = a @ a.T / 12 + torch.eye(12, dtype=torch.float64)
    b = torch.randn(12, generator=g0, dtype=torch.float64)
    w0 = torch.randn(12, generator=g0, dtype=torch.float64)
    grad = a @ w0 - b
    eps, zs = 1e-4, []
    for seed in range(40):
        w = torch.nn.Parameter(w0.clone())
        seen = []

        def f():
            seen.append(w.detach().clone())
            return 0.5 * w @ a @ w - b @ w

        opt = MeZO([w], lr=1.0, eps=eps, seed=seed)
        opt.step(f)
        z = (seen[0] - w0) / eps
        assert torch.allclose(seen[1], w0 - eps * z, atol=1e-12)  # θ − εz, same z
        g = opt.projected_grad
        assert torch.allclose(w.detach() - w0, -g * z, atol=1e-10)  # θ − lr·g·z, same z again
        truth = (grad @ z).item()
        assert math.copysign(1, g) == math.copysign(1, truth)
        assert g == pytest.approx(truth, rel=1e-6, abs=1e-8)
        zs.append(z)
    z = torch.cat(zs)
    assert abs(z.mean().item()) < 0.1 and abs(z.std().item() - 1) < 0.1


def test_mezo_estimate_float32_small_eps():
    """float32 and a non-quadratic loss: g ≈ ∇f·z to first order for small ε, signs agree when
    the derivative is not tiny."""
    x, y, model, _ = regression(1)
    torch.nn.init.normal_(model.weight)
    loss = lambda: torch.log1p(((model(x) - y) ** 2).mean())  # noqa: E731
    base = params_of(model)
    loss().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = None
    agree = 0
    for seed in range(30):
        with torch.no_grad():
            for p, b in zip(model.parameters(), base):
                p.copy_(b)
        seen = []
        opt = MeZO(weight_decay_groups(model, 0.0), lr=1.0, eps=1e-3, seed=seed)
        opt.step(lambda: seen.append(params_of(model)) or loss())
        z = [(s - b) / 1e-3 for s, b in zip(seen[0], base)]
        truth = sum((g * zi).sum() for g, zi in zip(grads, z)).item()
        g = opt.projected_grad
        for p, b, zi in zip(model.parameters(), base, z):
            torch.testing.assert_close(p.detach(), b - g * zi, atol=1e-4, rtol=1e-4)
        assert g == pytest.approx(truth, rel=0.02, abs=2e-3)
        agree += math.copysign(1, g) == math.copysign(1, truth)
    assert agree == 30


# ----------------------------------------------------------------------------- memory

@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_step_builds_no_graph_and_no_gradients(name):
    model = mlp()
    x, y = torch.randn(4, 16), torch.randn(4, 1)
    opt = make(name, model, seed=0)
    inside = []

    def closure():
        inside.append(torch.is_grad_enabled())
        loss = ((model(x) - y) ** 2).mean()
        assert loss.grad_fn is None and not loss.requires_grad
        return loss

    for _ in range(3):
        opt.step(closure)
    assert inside == [False] * 6
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())  # still "trainable" for the core
    tensors = [v for state in opt.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    if name == "mezo":
        assert tensors == [] and opt.state["zo"]["step"] == 3  # two integers, no tensor
    else:  # ZO-AdaMU keeps exactly one momentum tensor per parameter
        assert sorted(t.shape for t in tensors) == sorted(p.shape for p in model.parameters())


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_step_memory_is_near_inference(name):
    """Peak memory of a step (beyond parameters and state) ≤ two forward passes plus the
    scratch buffers (per thread, one noise chunk for MeZO, three for ZO-AdaMU; bounded here by
    the largest parameter); a first-order
    step needs more than all gradients together."""
    model = mlp(width=256, depth=6)  # the largest parameter is a seventh of all of them
    x, y = torch.randn(2, 16), torch.randn(2, 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the dispatch mode that counts allocations sees this thread only (no noise pool)
    try:
        measure_step_memory(name, model, x, y)
    finally:
        torch.set_num_threads(threads)


def measure_step_memory(name, model, x, y):
    from methods import zeroth_order

    # Scratch buffers are kept per thread and grow to the largest chunk the process has drawn: a
    # bigger model stepped earlier in this process would have left them larger than this model needs.
    zeroth_order._Draws.local.__dict__.clear()
    closure = mse_closure(model, x, y)
    opt = make(name, model, seed=0)
    opt.step(closure)  # ZO-AdaMU allocates its momentum state at the first step
    existing = list(model.parameters()) + [x, y] + [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    with PeakMemory(existing) as forward:
        with torch.no_grad():
            closure()
            closure()
    with PeakMemory(existing) as step:
        opt.step(closure)
    with PeakMemory(existing) as first_order:
        closure().backward()
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = 1 if name == "mezo" else 3
    assert step.peak <= 2 * forward.peak + buffers * largest + 4096, (step.peak, forward.peak, largest)
    assert first_order.peak >= total > 0
    if name == "mezo":
        assert step.peak < 0.5 * first_order.peak


# ----------------------------------------------------------------------------- exactness

@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_perturbation_is_undone(name):
    """With lr = 0 the parameters after a step equal those before (three rounded float32 adds
    of ±εz: within 1e-7 absolute, or 1e-6 relative for weights of size ~1 like LayerNorm's)."""
    model = mlp()
    x, y = torch.randn(8, 16), torch.randn(8, 1)
    before = params_of(model)
    opt = make(name, model, lr=0.0, eps=1e-3, seed=3)
    for _ in range(5):
        opt.step(mse_closure(model, x, y))
    for b, p in zip(before, model.parameters()):
        torch.testing.assert_close(p.detach(), b, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_noise_chunks_are_distinct_draws_and_threads_do_not_change_a_step(name, monkeypatch):
    """The direction is drawn per chunk of NOISE_CHUNK elements (here 1000), each from its own
    seeded generator, on torch's thread count: 1 and 2 threads give bit-identical steps, and
    neighbouring chunks hold different N(0, 1) draws (no chunk repeats another's noise)."""
    from methods import zeroth_order

    monkeypatch.setattr(zeroth_order, "NOISE_CHUNK", 1000)
    start = torch.randn(4500, generator=torch.Generator().manual_seed(0))
    threads, results = torch.get_num_threads(), []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            w = torch.nn.Parameter(start.clone())
            seen = []
            opt = OPTIMIZERS[name]([w], lr=1e-2, eps=1e-3, seed=5)
            for _ in range(3):
                opt.step(lambda: seen.append(w.detach().clone()) or (w[:7] ** 2).sum())  # thread-independent loss
            results.append((w.detach().clone(), (seen[0] - start) / 1e-3))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0])
    z = results[0][1]
    chunks = z[:4000].view(4, 1000)
    assert all(not torch.allclose(chunks[i], chunks[j], atol=1e-3) for i in range(4) for j in range(i + 1, 4))
    assert abs(z.mean().item()) < 0.1 and abs(z.std().item() - 1) < 0.1


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_closure_error_restores_the_parameters(name):
    """A closure that fails (Ctrl-C in the second forward) leaves θ as it was, not at θ − εz."""
    model = mlp()
    x, y = torch.randn(8, 16), torch.randn(8, 1)
    before = params_of(model)
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return ((model(x) - y) ** 2).mean()

    opt = make(name, model, seed=0)
    with pytest.raises(KeyboardInterrupt):
        opt.step(closure)
    for b, p in zip(before, model.parameters()):
        torch.testing.assert_close(p.detach(), b, atol=1e-7, rtol=1e-6)
    assert opt.steps_done == 0


# ----------------------------------------------------------------------------- learning

@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_reduces_a_regression_loss(name):
    x, y, model, best = regression(0)
    closure = mse_closure(model, x, y)
    with torch.no_grad():
        start = closure().item()
    opt = make(name, model, lr=1e-2 if name == "mezo" else 3e-3, seed=0)
    for _ in range(400):
        opt.step(closure)
    with torch.no_grad():
        end = closure().item()
    assert end - best < 0.1 * (start - best), f"{name}: {start:.3f} -> {end:.3f} (optimum {best:.3f})"


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_resume_from_state_dict_is_identical(name):
    """N steps == N/2 steps, state_dict through torch.save, a NEW optimizer (seed=None: the
    base seed must come from the state), load, N/2 steps. Batches change every step."""
    data = [(torch.randn(8, 16), torch.randn(8, 1)) for _ in range(12)]
    extra = {"anneal_steps": (2, 8)} if name == "zoadamu" else {}  # cross T1 and T2 on the way

    def run(model, opt, steps):
        for x, y in steps:
            opt.step(mse_closure(model, x, y))

    torch.manual_seed(7)
    straight = mlp(1)
    run(straight, make(name, straight, **extra), data)

    torch.manual_seed(7)
    resumed = mlp(1)
    first = make(name, resumed, **extra)
    run(resumed, first, data[:6])
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    saved_weights = copy.deepcopy(resumed.state_dict())
    resumed = mlp(99)
    resumed.load_state_dict(saved_weights)
    torch.manual_seed(12345)  # a different global RNG: must not matter
    second = make(name, resumed, **extra)
    buffer.seek(0)
    second.load_state_dict(torch.load(buffer, weights_only=False))
    run(resumed, second, data[6:])
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert second.state["zo"]["step"] == 12


def test_step_seeds_are_distinct_and_deterministic():
    seeds = [step_seed(5, t) for t in range(1000)]
    assert len(set(seeds)) == 1000 and all(0 <= s < 2**63 for s in seeds)
    assert seeds == [step_seed(5, t) for t in range(1000)] and step_seed(6, 0) != seeds[0]


# ----------------------------------------------------------------------------- ZO-AdaMU's schedule

def test_zoadamu_schedule_before_t1_and_after_t2():
    opt = ZOAdaMU([torch.nn.Parameter(torch.zeros(3))], anneal_steps=(10, 30), alpha_end=0.2, beta1_end=0.3, beta2_end=0.4)
    for t in (0, 5, 10):
        assert opt.schedule(t) == {"alpha": 1.0, "beta1": 1.0, "beta2": 1.0}
    for t in (30, 31, 500):
        assert opt.schedule(t) == {"alpha": 0.2, "beta1": 0.3, "beta2": 0.4}
    assert opt.schedule(20)["alpha"] == pytest.approx(0.6)  # half-way down the cosine
    alphas = [opt.schedule(t)["alpha"] for t in range(10, 31)]
    assert all(a > b for a, b in zip(alphas, alphas[1:]))
    assert annealed(7, 5, 5, 1.0, 0.1) == 0.1  # T1 == T2: a step change


def test_zoadamu_momentum_is_the_perturbation():
    """Before T1 (α = β1 = 1) the perturbation is m = ż ~ N(0, 1) and the stored momentum is it;
    after T2 the next perturbation is β1·ż + (1 − β1)·z̈ around the stored m_{t−1}."""
    w = torch.nn.Parameter(torch.zeros(20000))
    seen = []
    closure = lambda: seen.append(w.detach().clone()) or (w - 1).square().sum()  # noqa: E731
    opt = ZOAdaMU([w], lr=0.0, eps=1e-2, anneal_steps=(0, 1), alpha_end=0.25, beta1_end=0.5, beta2_end=0.5, seed=0)
    opt.step(closure)  # t = 0 <= T1: α = β1 = β2 = 1
    m1 = opt.state[w]["momentum"].clone()
    torch.testing.assert_close(seen[0] / 1e-2, m1)
    assert abs(m1.std().item() - 1) < 0.03
    restored = w.detach().clone()
    opt.step(closure)  # t = 1 >= T2: α = 0.25, β1 = 0.5
    m2 = opt.state[w]["momentum"]
    torch.testing.assert_close((seen[2] - restored) / 1e-2, m2, atol=1e-4, rtol=1e-4)
    # m2 = 0.5·ż + 0.5·(m1 + √0.75·n): mean 0.5·m1, residual variance 0.25·0.25 + 0.25·0.75 = 0.25
    residual = m2 - 0.5 * m1
    assert abs(residual.std().item() - 0.5) < 0.02
    assert abs(torch.corrcoef(torch.stack([residual, m1]))[0, 1].item()) < 0.05


# ----------------------------------------------------------------------------- several processes

WORKER = r"""
import os, sys, torch, torch.distributed as dist
from methods.zeroth_order import MeZO, ZOAdaMU
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=rank, world_size=world)
g = torch.Generator().manual_seed(0)
x, y = torch.randn(16, 4, generator=g, dtype=torch.float64), torch.randn(16, 1, generator=g, dtype=torch.float64)
rows = slice(rank * 16 // world, (rank + 1) * 16 // world)  # this process's share of the batch
for name, cls, extra in (("mezo", MeZO, {}), ("zoadamu", ZOAdaMU, {"anneal_steps": (1, 3)})):
    torch.manual_seed(100 + rank)  # different global RNGs: the base seed must come from rank 0
    w = torch.nn.Parameter(torch.zeros(4, 1, dtype=torch.float64))
    opt = cls([w], lr=1e-2, eps=1e-3, **extra)
    for _ in range(5):
        opt.step(lambda: ((x[rows] @ w - y[rows]) ** 2).mean())
    torch.save(w.detach(), sys.argv[2] + f"/{name}{rank}.pt")
"""


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    """Both optimisers trained by two gloo processes, each on half of the batch."""
    out = tmp_path_factory.mktemp("ddp")
    run_gloo_workers(WORKER, out)
    return out


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_two_processes_average_g_and_share_the_seed(name, two_process_results):
    """The two processes end with identical parameters, equal to one process on the whole batch
    (g is the mean of the halves' estimates; the base seed is rank 0's)."""
    rank0, rank1 = (torch.load(two_process_results / f"{name}{r}.pt") for r in range(2))
    assert torch.equal(rank0, rank1)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 4, generator=g, dtype=torch.float64), torch.randn(16, 1, generator=g, dtype=torch.float64)
    torch.manual_seed(100)  # rank 0's global RNG
    w = torch.nn.Parameter(torch.zeros(4, 1, dtype=torch.float64))
    opt = MeZO([w], lr=1e-2, eps=1e-3) if name == "mezo" else ZOAdaMU([w], lr=1e-2, eps=1e-3, anneal_steps=(1, 3))
    for _ in range(5):
        opt.step(lambda: ((x @ w - y) ** 2).mean())
    assert not torch.equal(rank0, torch.zeros_like(rank0))
    torch.testing.assert_close(rank0, w.detach(), atol=1e-9, rtol=1e-7)


# ----------------------------------------------------------------------------- through the Trainer

ZO_LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": TARGETS}
ZO_METHODS = {
    "mezo": dict(ZO_LORA, tuning="full", zo_eps=1e-3),
    "zoadamu": dict(ZO_LORA, tuning="lora", zo_eps=1e-2, anneal_start=0.05, anneal_end=0.8,
                    alpha_end=0.01, beta1_end=0.13, beta2_end=0.01),
}
ZO_METHODS["zoadamu_full"] = dict(ZO_METHODS["zoadamu"], script="zoadamu4sft.py", tuning="full", zo_eps=1e-3)


@pytest.fixture(scope="module")
def zo_project(project):
    params = tiny_params(methods=ZO_METHODS, sequences={"default": ["mc", "gen"], "one": ["mc"]})
    write_params(project / "params_zo.yaml", params)
    return project


def run_args(tag: str, *extra: str) -> list[str]:
    return ["--params", "params_zo.yaml", "--sequence", "one", "--eval_limit", "2", "--output_dir", f"runs/{tag}",
            "--results_dir", f"results/train/{tag}", "--work_dir", f"checkpoints/{tag}", *extra]


# (method, tuning, lr, steps): the tiny random Llama needs large learning rates to move in a few steps.
TRAINER_RUNS = [("mezo", "full", "1e-3", "16"), ("zoadamu", "lora", "1e-1", "10")]


@pytest.mark.parametrize("name, tuning, lr, steps", TRAINER_RUNS)
def test_trainer_loss_falls_on_the_tiny_llama(name, tuning, lr, steps, zo_project, monkeypatch):
    from stages.core.batches import response_loss
    from stages.core.sft import Trainer, build_config

    monkeypatch.chdir(zo_project)
    method = load_method(name)
    tag = f"zo-{name}-{tuning}"
    cfg = build_config(method, run_args(tag, "--tuning", tuning, "--lr", lr, "--steps_per_task", steps, "--batch_size", "4",
                                        "--checkpoint_every", "100"))
    trainer = Trainer(method, cfg)
    tokenizer, rows = trainer.tokenizer, trainer.encoded[0][:16]
    before = response_loss(trainer.unwrapped, rows, tokenizer.pad_token_id)
    history = trainer.train_task(0)
    after = response_loss(trainer.unwrapped, rows, tokenizer.pad_token_id)
    assert after < before - 0.05, f"{name}/{tuning}: {before:.3f} -> {after:.3f}"
    assert all(p.grad is None for p in trainer.unwrapped.parameters())
    assert all(math.isfinite(loss) for _, loss in history["loss"])
    n_trainable = sum(p.numel() for p in trainer.unwrapped.parameters() if p.requires_grad)
    assert (n_trainable == trainer.total) == (tuning == "full")


def test_zoadamu_full_row_trains_every_weight(zo_project, monkeypatch):
    """CIMEO's Table 1 runs ZO-AdaMU on full weights (its seed's script applies no adapter): the
    zoadamu_full row, a section of zoadamu4sft.py, perturbs and updates every weight and its loss
    falls; the repository's cognition table shows it beside the LoRA row."""
    from stages.core.batches import response_loss
    from stages.core.config import load_params
    from stages.core.sft import Trainer, build_config

    monkeypatch.chdir(zo_project)
    method = load_method("zoadamu")
    cfg = build_config(method, run_args("zo-adamu-full", "--method", "zoadamu_full", "--lr", "1e-3", "--steps_per_task", "16",
                                        "--batch_size", "4", "--checkpoint_every", "100"))
    trainer = Trainer(method, cfg)
    rows = trainer.encoded[0][:16]
    before = {n: p.detach().clone() for n, p in trainer.unwrapped.named_parameters()}
    loss_before = response_loss(trainer.unwrapped, rows, trainer.tokenizer.pad_token_id)
    trainer.train_task(0)
    assert response_loss(trainer.unwrapped, rows, trainer.tokenizer.pad_token_id) < loss_before - 0.05
    assert trainer.trainable == trainer.total and not hasattr(trainer.unwrapped, "peft_config")
    assert all(not torch.equal(p, before[n]) for n, p in trainer.unwrapped.named_parameters())
    params = load_params(ROOT / "params.yaml")
    assert {"zoadamu", "zoadamu_full"} <= set(params["tables"]["cognition"]["rows"])
    assert params["methods"]["zoadamu"]["tuning"] == "lora" and params["methods"]["zoadamu_full"]["tuning"] == "full"
    assert params["methods"]["zoadamu_full"]["script"] == "zoadamu4sft.py"


def test_tuning_full_or_lora(tiny_base):
    from types import SimpleNamespace

    from stages.core.errors import AdaptlabError
    from stages.core.models import load_model
    from stages.core.sft import build_tuned

    cfg = SimpleNamespace(tuning="lora", **ZO_LORA)
    lora = build_tuned(load_model(tiny_base), cfg)
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    assert {n.split(".")[-4] for n in trainable} == set(TARGETS)  # ...q_proj.lora_A.default.weight
    full = build_tuned(load_model(tiny_base), SimpleNamespace(tuning="full"))
    assert all(p.requires_grad for p in full.parameters())
    with pytest.raises(AdaptlabError, match="tuning"):
        build_tuned(load_model(tiny_base), SimpleNamespace(tuning="half"))


def test_mezo_full_run_exports_a_full_model(zo_project, monkeypatch):
    """The whole script path for full weights: train, score, export the model itself."""
    from stages.core.sft import Trainer, build_config

    monkeypatch.chdir(zo_project)
    method = load_method("mezo")
    cfg = build_config(method, run_args("zo-run", "--steps_per_task", "2", "--checkpoint_every", "1", "--batch_size", "2"))
    Trainer(method, cfg).run()
    final = zo_project / "runs" / "zo-run" / "final"
    assert (final / "config.json").is_file() and not (final / "adapter_config.json").exists()
    metrics = run_summary(zo_project / "results" / "train" / "zo-run")
    assert metrics["trainable_params"] == metrics["total_params"]


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_help_lists_the_method_params(name, zo_project, capsys, monkeypatch):
    monkeypatch.chdir(zo_project)
    assert_help_lists(load_method(name), "params_zo.yaml", ZO_METHODS[name], capsys)


def test_zeroth_order_step_rejects_fp16_scaler():
    from types import SimpleNamespace

    from methods.zeroth_order import zeroth_order_step
    from stages.core.errors import AdaptlabError
    from stages.core.sft import StepInputs

    model = mlp()
    wrapped = SimpleNamespace(scaler=object(), step=None)
    with pytest.raises(AdaptlabError, match="fp16"):
        zeroth_order_step(StepInputs(model, [], wrapped, None, SimpleNamespace()))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
