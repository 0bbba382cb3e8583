"""AdaLomo (methods/adalomo.py, methods/adalomo4sft.py).

On a tiny Llama built in-process: the fused optimizer reproduces ``lomo_optim.AdaLomo`` (the
library, run on CPU by making ``Tensor.cuda`` the identity) step for step, with and without LOMO's
two-pass norm clipping; the fused and the stored-gradient paths agree; during backward at most one
parameter holds a gradient and none does afterwards; the state is m + n floats per matrix; a
saved and reloaded state gives the very same next update. Through the core's Trainer on the tiny
project: the loss falls, and a run stopped after a mid-task checkpoint resumes to bit-identical
weights.
"""

from __future__ import annotations

import copy
import io
import math

from methods.adalomo import AdaLomo
from stages.core.errors import AdaptlabError
from stages.core.sft import weight_decay_groups

import pytest
import torch
from conftest import run_gloo_workers, tiny_params, write_params
from test_methods import load_method
from transformers import LlamaConfig, LlamaForCausalLM

ADALOMO = {"eps": [1.0e-30, 1.0e-3], "clip_threshold": 1.0, "decay_rate": -0.8,
           "clip_grad_value": 0.0, "max_grad_norm": 0.0}


# ----------------------------------------------------------------------------- helpers

def small_llama(seed: int = 0) -> LlamaForCausalLM:
    """64-token vocabulary, 2 layers of width 32, tied embeddings: matrices, vectors and a
    parameter used twice in the graph."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    model.train()
    return model


def batches(n: int, seed: int = 1, size: int = 4, length: int = 12) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (size, length), generator=g) for _ in range(n)]


def lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def fused_step(model, opt: AdaLomo, ids: torch.Tensor, max_norm: float = 0.0) -> None:
    loss = lm_loss(model, ids)
    if max_norm > 0:
        with opt.fused_backward(measure_norm=True):
            loss.backward(retain_graph=True)
        opt.set_clip_norm(max_norm)
    with opt.fused_backward():
        loss.backward()
    opt.step()


def weights(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# ----------------------------------------------------------------------------- (a) the library

@pytest.mark.parametrize("clip", [None, 0.05])
def test_matches_the_library_step_for_step(clip, monkeypatch):
    """Same init, same batches, lr changing every step (a schedule), weight decay on every
    tensor (the library decays all): after 6 steps the weights and the factored second moments
    agree to float rounding. clip = 0.05: LOMO's two-backward global-norm clipping is active."""
    lomo_optim = pytest.importorskip("lomo_optim")
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *args, **kwargs: self)  # its state on CPU
    data, lrs = batches(6), [1e-2 * (1 - 0.1 * k) for k in range(6)]
    init = weights(small_llama())

    theirs = small_llama()
    library = lomo_optim.AdaLomo(theirs, lr=lrs[0], weight_decay=0.1, clip_grad_norm=clip)
    for ids, lr in zip(data, lrs):
        loss = lm_loss(theirs, ids)
        if clip:
            library.grad_norm(loss)
        library.fused_backward(loss, lr)

    ours = small_llama()
    opt = AdaLomo([{"params": list(ours.parameters()), "weight_decay": 0.1}], lr=lrs[0], weight_decay=0.1)
    for ids, lr in zip(data, lrs):
        opt.param_groups[0]["lr"] = lr
        fused_step(ours, opt, ids, max_norm=clip or 0.0)

    assert opt.steps_done == library.step_num == 6
    moved = 0.0
    for (name, a), b, start in zip(theirs.named_parameters(), ours.parameters(), init):
        torch.testing.assert_close(b, a, atol=2e-6, rtol=1e-5, msg=name)
        moved = max(moved, (a - start).abs().max().item())
        state = opt.state[b]
        if a.ndim >= 2:
            torch.testing.assert_close(state["exp_avg_sq_row"], library.exp_avg_sq_row[name], rtol=1e-4, atol=0)
            torch.testing.assert_close(state["exp_avg_sq_col"], library.exp_avg_sq_col[name], rtol=1e-4, atol=0)
        else:
            torch.testing.assert_close(state["exp_avg_sq"], library.exp_avg_sq[name], rtol=1e-4, atol=0)
    assert moved > 1e-3  # both really trained (not two unchanged copies of the init)


def test_fused_and_stored_gradient_paths_agree():
    """A fused backward and a plain backward + step() give the same weights (the hook changes
    when the rule runs, not what it computes); the two runs differ from the init."""
    data = batches(4)
    fused, plain = small_llama(), small_llama()
    start = weights(plain)
    opt_f = AdaLomo(weight_decay_groups(fused, 0.01), lr=1e-2, weight_decay=0.01)
    opt_p = AdaLomo(weight_decay_groups(plain, 0.01), lr=1e-2, weight_decay=0.01)
    for ids in data:
        fused_step(fused, opt_f, ids)
        lm_loss(plain, ids).backward()
        opt_p.step()
    for a, b in zip(fused.parameters(), plain.parameters()):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, s) for a, s in zip(plain.parameters(), start))
    assert all(p.grad is None for p in plain.parameters())


# ----------------------------------------------------------------------------- (b) memory

def count_live_grads(model) -> tuple[list[int], list]:
    """Hooks, registered BEFORE the optimizer's, that record how many parameters hold a
    gradient each time one parameter's gradient is complete."""
    params, seen = list(model.parameters()), []
    handles = [p.register_post_accumulate_grad_hook(lambda _: seen.append(sum(q.grad is not None for q in params)))
               for p in params]
    return seen, handles


def test_no_full_set_of_gradients_is_ever_stored():
    model = small_llama()
    params = list(model.parameters())
    opt = AdaLomo(weight_decay_groups(model, 0.0), lr=1e-2)
    ids = batches(1)[0]
    # Control: a plain backward ends with every gradient held at once (the counter can see it).
    seen, handles = count_live_grads(model)
    lm_loss(model, ids).backward()
    assert max(seen) == len(params) and all(p.grad is not None for p in params)
    opt.zero_grad(set_to_none=True)
    seen.clear()
    before = weights(model)
    with opt.fused_backward():
        lm_loss(model, ids).backward()
    for h in handles:
        h.remove()
    assert len(seen) == len(params)  # every parameter's gradient was completed once (tied: once)
    assert max(seen) == 1, seen  # only the parameter being updated, never two
    assert all(p.grad is None for p in params)
    assert all(not torch.equal(p, b) for p, b in zip(params, before))  # all updated in the hooks
    opt.step()
    assert opt.steps_done == 1 and all(p.grad is None for p in params)
    # Outside the block a backward is an ordinary one: no update, no hooks left behind.
    kept = weights(model)
    lm_loss(model, ids).backward()
    assert all(torch.equal(p, k) for p, k in zip(params, kept)) and all(p.grad is not None for p in params)
    with pytest.raises(RuntimeError, match="already hold gradients"):
        with opt.fused_backward():
            pass


# ----------------------------------------------------------------------------- (d) state size

def test_state_is_m_plus_n_per_matrix():
    model = small_llama()
    opt = AdaLomo(weight_decay_groups(model, 0.0), lr=1e-2)
    fused_step(model, opt, batches(1)[0])
    total_state, total_params = 0, 0
    for p in model.parameters():
        tensors = [t for t in opt.state[p].values() if isinstance(t, torch.Tensor)]
        size = sum(t.numel() for t in tensors)
        assert all(t.dtype == torch.float32 for t in tensors)
        if p.ndim == 2:
            m, n = p.shape
            assert size == m + n, (tuple(p.shape), size)
            assert size < m * n / 10
        else:
            assert size == p.numel()
        total_state, total_params = total_state + size, total_params + p.numel()
    assert total_state < 0.1 * total_params  # Adam: 2 x total_params


# ----------------------------------------------------------------------------- (e) save / load

def test_reloaded_state_gives_the_identical_next_update():
    """3 steps; save weights and optimizer state through torch.save; one more step on the
    original, and one on a new model + new optimizer loaded from the saved state: bit-identical.
    A fresh optimizer (state lost) takes a different step."""
    data = batches(4)
    model = small_llama()
    opt = AdaLomo(weight_decay_groups(model, 0.01), lr=1e-2, weight_decay=0.01)
    for ids in data[:3]:
        fused_step(model, opt, ids)
    buffer = io.BytesIO()
    torch.save({"weights": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
    fused_step(model, opt, data[3])

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    torch.manual_seed(99)
    resumed = small_llama(seed=5)
    resumed.load_state_dict(saved["weights"])
    again = AdaLomo(weight_decay_groups(resumed, 0.5), lr=0.5)  # hyper-parameters come from the state
    again.load_state_dict(saved["optimizer"])
    assert again.steps_done == 3 and again.param_groups[0]["lr"] == 1e-2
    fresh_model = copy.deepcopy(resumed)
    fused_step(resumed, again, data[3])
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed.parameters()))

    fresh = AdaLomo(weight_decay_groups(fresh_model, 0.01), lr=1e-2, weight_decay=0.01)
    fused_step(fresh_model, fresh, data[3])
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), fresh_model.parameters()))


# ----------------------------------------------------------------------------- several processes

REGRESSION = """
import torch
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).double()
g = torch.Generator().manual_seed(1)
x, y = torch.randn(16, 8, generator=g, dtype=torch.float64), torch.randn(16, 1, generator=g, dtype=torch.float64)
"""
# One process of a gloo group: DDP on its half of the batch, AdaLomo's fused step (torch and the
# optimizer only: the worker starts in a couple of seconds).
WORKER = r"""
import os, sys
import torch.distributed as dist
from methods.adalomo import AdaLomo
rank, world = int(os.environ["RANK"]), 2
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=rank, world_size=world)
""" + REGRESSION + r"""
ddp = torch.nn.parallel.DistributedDataParallel(model)
rows = slice(rank * 16 // world, (rank + 1) * 16 // world)
opt = AdaLomo(model.parameters(), lr=1e-2)
for _ in range(5):
    with ddp.no_sync():  # as adalomo_step: the hooks reduce, DDP does not
        loss = ((ddp(x[rows]) - y[rows]) ** 2).mean()
        with opt.fused_backward():
            loss.backward()
    opt.step()
torch.save([p.detach() for p in model.parameters()], sys.argv[2] + f"/rank{rank}.pt")
dist.destroy_process_group()
"""


def test_two_processes_reduce_in_the_hooks_and_stay_equal(tmp_path):
    """DDP on two gloo processes, each on half the batch: the replicas end identical and equal
    one process trained on the whole batch (each hook averages its gradient across processes
    before the update)."""
    run_gloo_workers(WORKER, tmp_path)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert all(torch.equal(a, b) for a, b in zip(rank0, rank1))
    scope: dict = {}
    exec(REGRESSION, scope)
    model, x, y = scope["model"], scope["x"], scope["y"]
    start = weights(model)
    opt = AdaLomo(model.parameters(), lr=1e-2)
    for _ in range(5):
        with opt.fused_backward():
            ((model(x) - y) ** 2).mean().backward()
        opt.step()
    for a, b, s in zip(rank0, model.parameters(), start):
        torch.testing.assert_close(a, b.detach(), atol=1e-12, rtol=1e-10)
        assert not torch.equal(a, s)


# ----------------------------------------------------------------------------- the method's settings

def test_method_refuses_gradient_accumulation_and_fp16():
    from types import SimpleNamespace

    method = load_method("adalomo")
    model = small_llama()
    cfg = SimpleNamespace(grad_accum=1, mixed_precision="no", lr=5e-4, weight_decay=0.0, **ADALOMO)
    opt = method.optimizer(model, cfg, None)
    assert isinstance(opt, AdaLomo) and opt.param_groups[0]["eps"] == (1e-30, 1e-3)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    with pytest.raises(AdaptlabError, match="--grad_accum must be 1, got 4"):
        method.optimizer(model, SimpleNamespace(**{**vars(cfg), "grad_accum": 4}), None)
    with pytest.raises(AdaptlabError, match="fp16"):
        method.optimizer(model, SimpleNamespace(**{**vars(cfg), "mixed_precision": "fp16"}), None)


@pytest.mark.parametrize("max_norm", [0.0, 0.05])
def test_train_step_is_one_fused_update(max_norm):
    """``adalomo_step`` (accelerate's wrapper, causal_lm_loss) = forward + fused backward(s) +
    counter: the same weights as the bare optimizer; max_grad_norm > 0 clips (two passes)."""
    from types import SimpleNamespace

    from methods.adalomo import adalomo_step
    from stages.core.batches import causal_lm_loss
    from stages.core.sft import StepInputs

    from accelerate import Accelerator

    acc = Accelerator(mixed_precision="no")
    data = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids} for ids in batches(3)]
    cfg = SimpleNamespace(max_grad_norm=max_norm)
    model, bare = small_llama(), small_llama()
    opt = acc.prepare(AdaLomo(weight_decay_groups(model, 0.0), lr=1e-2))
    ref = AdaLomo(weight_decay_groups(bare, 0.0), lr=1e-2)
    for batch in data:
        loss = adalomo_step(StepInputs(model, [batch], opt, acc, cfg))
        expected = causal_lm_loss(bare, batch)
        assert loss == expected.item()
        if max_norm:
            with ref.fused_backward(measure_norm=True):
                expected.backward(retain_graph=True)
            assert ref.set_clip_norm(max_norm) > max_norm  # the clip is active
        with ref.fused_backward():
            expected.backward()
        ref.step()
    assert opt.optimizer.steps_done == 3
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), bare.parameters()))
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(AdaptlabError, match="grad_accum"):
        adalomo_step(StepInputs(model, data[:2], opt, acc, cfg))


# ----------------------------------------------------------------------------- (c, f) the Trainer

@pytest.fixture(scope="module")
def ada_project(project):
    params = tiny_params(methods={"adalomo": dict(ADALOMO)}, sequences={"default": ["mc", "gen"], "one": ["mc"]})
    write_params(project / "params_adalomo.yaml", params)
    return project


def trainer_for(tag: str, *extra: str):
    from stages.core.sft import Trainer, build_config

    method = load_method("adalomo")
    cfg = build_config(method, ["--params", "params_adalomo.yaml", "--sequence", "one", "--eval_limit", "2",
                                "--lr", "3e-2", "--steps_per_task", "8", "--batch_size", "4", "--checkpoint_every", "4",
                                "--output_dir", f"runs/{tag}", "--results_dir", f"results/train/{tag}",
                                "--work_dir", f"checkpoints/{tag}", *extra])
    return Trainer(method, cfg)


@pytest.fixture(scope="module")
def uninterrupted(ada_project):
    """Task 1 trained for 8 steps in one go: (loss before, loss after, weights, history)."""
    from stages.core.batches import response_loss

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ada_project)
        trainer = trainer_for("ada-straight")
        rows, pad = trainer.encoded[0][:16], trainer.tokenizer.pad_token_id
        before = response_loss(trainer.unwrapped, rows, pad)
        history = trainer.train_task(0)
        after = response_loss(trainer.unwrapped, rows, pad)
        return before, after, weights(trainer.unwrapped), history, trainer


def test_trainer_loss_falls_on_the_tiny_llama(uninterrupted):
    before, after, _, history, trainer = uninterrupted
    assert after < before - 0.2, f"{before:.3f} -> {after:.3f}"
    assert all(math.isfinite(loss) for _, loss in history["loss"])
    assert all(p.grad is None for p in trainer.unwrapped.parameters())
    assert trainer.trainable == trainer.total  # full-parameter tuning


def test_trainer_resumes_mid_task_bit_identically(ada_project, uninterrupted, monkeypatch, capsys):
    """A run stopped right after its step-4 checkpoint (as if killed) and started again ends
    with exactly the uninterrupted run's weights and loss log."""
    from stages.core.sft import Trainer

    monkeypatch.chdir(ada_project)
    save = Trainer._save_state

    def save_then_die(self, step, *args):
        save(self, step, *args)
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_save_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        trainer_for("ada-killed").train_task(0)
    monkeypatch.setattr(Trainer, "_save_state", save)

    resumed = trainer_for("ada-killed")
    history = resumed.train_task(0)
    assert "resumed task 1 from step 4" in capsys.readouterr().out
    _, _, expected, straight, _ = uninterrupted
    assert history["loss"] == straight["loss"]
    assert all(torch.equal(a, b) for a, b in zip(weights(resumed.unwrapped), expected))
