"""Gradient low-rank projection (methods/projection.py) and its two methods, GaLore
(galore_torch.GaLoreAdamW) and AdaRankGrad.

On small problems: the optimizer state of a projected matrix is rank/min(m, n) of AdamW's;
AdaRankGrad picks a small rank for a rank-2 gradient and a large one for a full-rank gradient;
a refresh that finds the same subspace leaves the moments as they were, and any refresh keeps the
first moment's projection on the new subspace; resuming from ``state_dict`` (through torch.save,
as the Trainer does) gives the identical next steps. Through the core's Trainer on the tiny Llama:
the loss falls with every weight trainable, and the exported full model merges (copied) and
reloads to identical logits.
"""

from __future__ import annotations

import copy
import io
import math
import sys

from methods.projection import AdaRankGrad, choose_rank, projection_groups, randomized_svd, state_bytes

import pytest
import torch
from conftest import assert_help_lists, logits, probe_batch, run_summary, tiny_params, write_params
from test_methods import load_method

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj"]
# The tiny Llama's matrices are 64 x 64 (q, o), 32 x 64 (k, v), 128 x 64 and 64 x 128 (MLP).
GALORE = {"rank": 4, "update_proj_gap": 50, "scale": 4.0, "proj_type": "std", "target_modules": ALL}
ADARANKGRAD = {"rank_min": 2, "rank_max": 8, "rank_step": 2, "information_threshold": 0.2, "refresh_threshold": 0.5,
               "update_proj_gap": 16, "scale": 4.0, "second_moment": "rotate", "target_modules": ALL}
METHODS = {"galore": GALORE, "adarankgrad": ADARANKGRAD}


@pytest.fixture(scope="module")
def proj_project(project):
    params = tiny_params(methods=METHODS, sequences={"default": ["mc", "gen"], "one": ["mc"]})
    write_params(project / "params_projection.yaml", params)
    return project


def run_args(tag: str, *extra: str) -> list[str]:
    return ["--params", "params_projection.yaml", "--sequence", "one", "--eval_limit", "2", "--output_dir", f"runs/{tag}",
            "--results_dir", f"results/train/{tag}", "--work_dir", f"checkpoints/{tag}", *extra]


def galore_class():
    """galore_torch.GaLoreAdamW, imported as methods/galore4sft.py imports it."""
    from methods.projection import galore_adamw

    return galore_adamw()


def galore_optimizer(groups, **kw):
    return galore_class()(groups, no_deprecation_warning=True, **kw)


def galore_groups(model, **over):
    settings = {k: v for k, v in {**GALORE, **over}.items() if k != "target_modules"}
    return projection_groups(model, ALL, 0.0, **settings)


def ada_groups(model, **over):
    settings = {k: v for k, v in {**ADARANKGRAD, **over}.items() if k != "target_modules"}
    return projection_groups(model, ALL, 0.0, **settings)


class Toy(torch.nn.Module):
    """Named like a Llama block: an embedding, a norm, and target linears of both orientations."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(20, 24)
        self.norm = torch.nn.LayerNorm(24)
        self.q_proj = torch.nn.Linear(24, 24, bias=False)
        self.up_proj = torch.nn.Linear(24, 40, bias=False)    # 40 x 24: projected on the right
        self.down_proj = torch.nn.Linear(40, 24, bias=False)  # 24 x 40: projected on the left
        self.head = torch.nn.Linear(24, 20)

    def forward(self, ids):
        h = self.norm(self.embed(ids))
        h = h + self.q_proj(h)
        h = h + self.down_proj(torch.tanh(self.up_proj(h)))
        return self.head(h)


def toy_batches(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 20, (6, 7), generator=g) for _ in range(n)]


def toy_step(model, opt, ids) -> None:
    logits_ = model(ids[:, :-1])
    torch.nn.functional.cross_entropy(logits_.reshape(-1, 20), ids[:, 1:].reshape(-1)).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------- grouping and state size

def test_galore_needs_no_bitsandbytes(monkeypatch):
    """GaLoreAdamW imports with bitsandbytes unimportable (galore-torch's __init__ would need it),
    and its projector objects survive torch.save/torch.load as the same class."""
    for name in [n for n in sys.modules if n == "galore_torch" or n.startswith("galore_torch.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError
    cls = galore_class()
    assert cls.__module__ == "galore_torch.adamw" and "galore_torch.adamw8bit" not in sys.modules
    w = torch.nn.Parameter(torch.randn(6, 10))
    opt = cls([{"params": [w], "rank": 2, "update_proj_gap": 5, "scale": 1.0, "proj_type": "std"}], lr=1e-2,
              no_deprecation_warning=True)
    w.grad = torch.randn(6, 10)
    opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    projector = torch.load(buffer, weights_only=False)["state"][0]["projector"]
    assert type(projector) is type(opt.state[w]["projector"])
    torch.testing.assert_close(projector.ortho_matrix, opt.state[w]["projector"].ortho_matrix, rtol=0, atol=0)


def test_groups_put_target_matrices_in_the_projected_group():
    model = Toy()
    groups = ada_groups(model)
    assert [set(map(id, g["params"])) for g in groups] == [
        {id(model.q_proj.weight), id(model.up_proj.weight), id(model.down_proj.weight)},
        {id(model.embed.weight), id(model.head.weight)},
        {id(model.norm.weight), id(model.norm.bias), id(model.head.bias)}]
    assert groups[0]["rank_max"] == 8 and "rank_max" not in groups[1] and groups[2]["weight_decay"] == 0.0


def test_state_bytes_are_rank_over_min_side_of_adamw(tiny_base, project):
    """One step on the tiny Llama's gradient: for every projected matrix (m x n) GaLore's moments
    take exactly rank/min(m, n) of torch AdamW's bytes, AdaRankGrad's r/min(m, n) <= rank_max/min(m, n);
    unprojected parameters take AdamW's bytes."""
    from stages.core.batches import causal_lm_loss
    from stages.core.models import load_model

    _, _, batch = probe_batch(project)
    optimizers = {}
    for name in ("adamw", "galore", "adarankgrad"):
        model = load_model(tiny_base)
        causal_lm_loss(model, batch).backward()
        if name == "adamw":
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        elif name == "galore":
            opt = galore_optimizer(galore_groups(model), lr=1e-3)
        else:
            opt = AdaRankGrad(ada_groups(model), lr=1e-3, seed=0)
        opt.step()
        optimizers[name] = (model, opt)
    adam_model, adam = optimizers["adamw"]
    adam_bytes = {n: state_bytes(adam, p) for n, p in adam_model.named_parameters()}
    for name, (model, opt) in optimizers.items():
        projected = {id(p) for p in opt.param_groups[0]["params"]} if name != "adamw" else set()
        assert name == "adamw" or len(projected) == 2 * 7  # 2 layers x 7 matrices
        ranks = iter(opt.ranks()) if name == "adarankgrad" else None
        for pname, p in model.named_parameters():
            full = adam_bytes[pname]
            assert full == 2 * p.numel() * 4
            mine = state_bytes(opt, p)
            if id(p) not in projected:
                assert mine == full, pname
            elif name == "galore":
                assert mine * min(p.shape) == full * GALORE["rank"], (pname, mine, full)
            else:
                r = next(ranks)
                assert ADARANKGRAD["rank_min"] <= r <= ADARANKGRAD["rank_max"]
                assert mine * min(p.shape) == full * r <= full * ADARANKGRAD["rank_max"], (pname, mine, full)
    # everything included (GaLore's projector object, AdaRankGrad's Q): still far below AdamW
    for name in ("galore", "adarankgrad"):
        model, opt = optimizers[name]
        for p in opt.param_groups[0]["params"]:
            assert 0 < state_bytes(opt, p, None) - state_bytes(opt, p) <= min(p.shape) * 8 * 4 + 64


# ----------------------------------------------------------------------------- AdaRankGrad's rank

def test_rank_follows_the_gradient_energy():
    """A gradient of exact rank 2 gets rank_min and its column space; a Gaussian full-rank one
    (whose top 16 of 48 directions leave far more than a 0.2 relative residual) gets rank_max."""
    g = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.zeros(48, 80))
    opt = AdaRankGrad([{"params": [w], "rank_min": 2, "rank_max": 16, "rank_step": 2, "information_threshold": 0.2}],
                      lr=0.0, seed=0)
    low = torch.randn(48, 2, generator=g) @ torch.randn(2, 80, generator=g)
    w.grad = low
    opt.step()
    assert opt.ranks() == [2]
    q = opt.state[w]["Q"]
    torch.testing.assert_close(q @ q.T, torch.eye(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(q.T @ (q @ low), low, atol=1e-4, rtol=1e-4)  # Q spans the gradient's columns
    w2 = torch.nn.Parameter(torch.zeros(48, 80))
    opt2 = AdaRankGrad([{"params": [w2], "rank_min": 2, "rank_max": 16, "rank_step": 2, "information_threshold": 0.2}],
                       lr=0.0, seed=0)
    w2.grad = torch.randn(48, 80, generator=g)
    opt2.step()
    assert opt2.ranks() == [16]
    # in between: energy spread over 6 directions -> the grid's first r whose subspace leaves a
    # relative residual ‖G − QᵀQG‖_F / ‖G‖_F <= η = 0.2 (the paper's threshold as a norm: 96% of
    # the energy), measured on the matrix itself; reading 0.2 as lost energy would stop at 4
    s = torch.tensor([10.0, 9, 8, 7, 6, 5] + [0.01] * 42)
    u, _ = torch.linalg.qr(torch.randn(48, 48, generator=g))
    v, _ = torch.linalg.qr(torch.randn(80, 48, generator=g))
    grad = u @ torch.diag(s) @ v.T

    def residual(r: int) -> float:
        q = u[:, :r].T
        return float((grad - q.T @ (q @ grad)).norm() / grad.norm())

    assert residual(4) > 0.2 and (s[:4] ** 2).sum() >= 0.8 * (s ** 2).sum()  # the two readings differ here
    w3 = torch.nn.Parameter(torch.zeros(48, 80))
    opt3 = AdaRankGrad([{"params": [w3], "rank_min": 2, "rank_max": 16, "rank_step": 2, "information_threshold": 0.2}],
                       lr=0.0, seed=0)
    w3.grad = grad
    opt3.step()
    assert opt3.ranks() == [next(r for r in (2, 4, 6, 8) if residual(r) <= 0.2)] == [6]
    q = opt3.state[w3]["Q"]
    assert float((grad - q.T @ (q @ grad)).norm() / grad.norm()) <= 0.2
    _, svals = randomized_svd(grad, 16, torch.Generator().manual_seed(1))
    torch.testing.assert_close(svals[:6], s[:6], atol=1e-3, rtol=1e-4)
    assert choose_rank(svals ** 2, (s ** 2).sum().item(), 1 - 0.2 ** 2, 2, 16, 2) == 6


# ----------------------------------------------------------------------------- moment transfer

def _ada_after_steps(grads: list[torch.Tensor], **group):
    w = torch.nn.Parameter(torch.zeros(grads[0].shape))
    settings = {"rank_min": 3, "rank_max": 3, "rank_step": 1, "information_threshold": 0.0, "update_proj_gap": 100, **group}
    opt = AdaRankGrad([{"params": [w], **settings}], lr=1e-2, seed=0)
    for grad in grads:
        w.grad = grad.clone()
        opt.step()
    return w, opt


def test_refresh_to_the_same_subspace_keeps_the_moments():
    """Moments built on a rank-3 subspace; a refresh whose gradient spans the same subspace,
    with its singular values in another order (so Q's rows come permuted and with other
    signs), maps the moments by a permutation R = Q_new·Q_oldᵀ once Q_new's signs are aligned:
    the full-space first moment QᵀM is unchanged and V holds the same numbers, none clamped."""
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(30, 3, generator=g))

    def right() -> torch.Tensor:  # orthonormal right factors: u's columns are the singular vectors
        return torch.linalg.qr(torch.randn(50, 3, generator=g)).Q.T

    grads = [u @ torch.diag(torch.tensor([5.0, 3.0, 1.0])) @ right() for _ in range(4)]
    w, opt = _ada_after_steps(grads)
    state = opt.state[w]
    # The same state in a basis with one vector's sign flipped (Q's signs are arbitrary): the
    # refresh must align signs, or the rotated V of that row turns negative and is clamped.
    state["Q"][1].neg_()
    state["exp_avg"][1].neg_()
    q_old, m_old, v_old = state["Q"].clone(), state["exp_avg"].clone(), state["exp_avg_sq"].clone()
    assert m_old.abs().sum() > 0 and v_old.abs().sum() > 0 and state["step"] == 4
    new_grad = u @ torch.diag(torch.tensor([1.0, 7.0, 4.0])) @ right()  # same column space, other order
    group = opt.param_groups[0]
    opt._refresh(state, new_grad, new_grad.square().sum().item(), group, seed=123)
    rotation = state["Q"] @ q_old.T
    assert not torch.allclose(rotation, torch.eye(3), atol=1e-3)  # a real permutation happened
    torch.testing.assert_close(rotation.abs(), rotation.abs().round(), atol=1e-4, rtol=0)
    torch.testing.assert_close(state["Q"].T @ state["exp_avg"], q_old.T @ m_old, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(state["exp_avg_sq"].sort(0).values.sum(0), v_old.sort(0).values.sum(0), atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(state["exp_avg_sq"], rotation.round() @ v_old, atol=1e-6, rtol=1e-4)
    assert state["step"] == 4  # Adam's bias correction carries on in the new basis


def test_refresh_projects_the_first_moment_onto_the_new_subspace():
    """Into an unrelated subspace: QₙᵀMₙ = QₙQₙᵀ(QₒᵀMₒ) (the old full-space first moment
    projected on the new subspace); V stays >= 0 under both second-moment rules."""
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(30, 50, generator=g) for _ in range(3)]
    for rule in ("rotate", "squared"):
        w, opt = _ada_after_steps(grads, second_moment=rule, rank_min=2, rank_max=6, rank_step=2,
                                  information_threshold=0.3)
        state = opt.state[w]
        q_old, m_old, v_old = state["Q"].clone(), state["exp_avg"].clone(), state["exp_avg_sq"].clone()
        new_grad = torch.randn(30, 50, generator=g)
        opt._refresh(state, new_grad, new_grad.square().sum().item(), opt.param_groups[0], seed=7)
        q_new = state["Q"]
        assert q_new.shape == (6, 30)
        torch.testing.assert_close(q_new.T @ state["exp_avg"], q_new.T @ q_new @ (q_old.T @ m_old), atol=1e-6, rtol=1e-4)
        assert (state["exp_avg_sq"] >= 0).all() and state["exp_avg_sq"].sum() > 0
        rotation = q_new @ q_old.T
        expected = rotation.square() @ v_old if rule == "squared" else (rotation @ v_old).clamp(min=0)
        torch.testing.assert_close(state["exp_avg_sq"], expected)


def test_refresh_fires_on_the_threshold_and_the_gap():
    g = torch.Generator().manual_seed(2)
    u1, _ = torch.linalg.qr(torch.randn(30, 2, generator=g))
    u2, _ = torch.linalg.qr(torch.randn(30, 2, generator=g))
    same = [u1 @ torch.randn(2, 50, generator=g) for _ in range(3)]
    w, opt = _ada_after_steps(same, rank_min=2, rank_max=2, refresh_threshold=0.5, update_proj_gap=100)
    assert opt.state["adarankgrad"]["refreshes"] == 1 and opt.state[w]["captured"] > 0.99
    w.grad = u2 @ torch.randn(2, 50, generator=g)  # the gradient left the subspace
    opt.step()
    assert opt.state["adarankgrad"]["refreshes"] == 2 and opt.state[w]["captured"] > 0.99
    w, opt = _ada_after_steps(same, rank_min=2, rank_max=2, refresh_threshold=0.0, update_proj_gap=2)
    assert opt.state["adarankgrad"]["refreshes"] == 2  # steps 1 and 3


# ----------------------------------------------------------------------------- resume

@pytest.mark.parametrize("name", ["galore", "adarankgrad"])
def test_resume_from_state_dict_is_identical(name):
    """12 steps straight == 6 steps, state_dict through torch.save (GaLore's projector objects
    are pickled, as by the Trainer), a NEW model and optimizer, load, 6 more steps: the weights
    are equal bit for bit; subspaces are refreshed on both sides of the cut."""
    batches = toy_batches(12)

    def make(model):
        if name == "galore":
            return galore_optimizer(galore_groups(model, rank=3, update_proj_gap=4), lr=1e-2)
        return AdaRankGrad(ada_groups(model, rank_min=2, rank_max=6, update_proj_gap=4, refresh_threshold=0.8), lr=1e-2)

    torch.manual_seed(5)
    straight = Toy()
    opt = make(straight)
    for ids in batches:
        toy_step(straight, opt, ids)

    torch.manual_seed(5)
    first_model = Toy()
    first = make(first_model)
    for ids in batches[:6]:
        toy_step(first_model, first, ids)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    weights = copy.deepcopy(first_model.state_dict())
    del first, first_model
    resumed = Toy(seed=99)
    resumed.load_state_dict(weights)
    torch.manual_seed(12345)  # another global RNG: must not matter
    second = make(resumed)
    buffer.seek(0)
    second.load_state_dict(torch.load(buffer, weights_only=False))
    if name == "galore":
        projector = second.state[resumed.q_proj.weight]["projector"]
        assert type(projector).__name__ == "GaLoreProjector" and projector.ortho_matrix.shape == (3, 24)
    for ids in batches[6:]:
        toy_step(resumed, second, ids)
    moved = 0
    for (pname, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), pname
        moved += not torch.equal(a, weights[pname])
    assert moved == len(weights)
    if name == "adarankgrad":
        assert second.state["adarankgrad"]["refreshes"] > 3 and second.state["adarankgrad"]["step"] == 12


# ----------------------------------------------------------------------------- through the Trainer

@pytest.mark.parametrize("name, lr", [("galore", "2e-3"), ("adarankgrad", "2e-3")])
def test_trainer_loss_falls_with_every_weight_trainable(name, lr, proj_project, monkeypatch):
    from stages.core.batches import response_loss
    from stages.core.sft import Trainer, build_config

    monkeypatch.chdir(proj_project)
    method = load_method(name)
    cfg = build_config(method, run_args(f"proj-{name}", "--lr", lr, "--steps_per_task", "8", "--batch_size", "4",
                                        "--checkpoint_every", "100"))
    trainer = Trainer(method, cfg)
    assert trainer.trainable == trainer.total
    rows = trainer.encoded[0][:16]
    before = response_loss(trainer.unwrapped, rows, trainer.tokenizer.pad_token_id)
    history = trainer.train_task(0)
    after = response_loss(trainer.unwrapped, rows, trainer.tokenizer.pad_token_id)
    assert after < before - 0.3, f"{name}: {before:.3f} -> {after:.3f}"
    assert all(math.isfinite(loss) for _, loss in history["loss"])


@pytest.mark.parametrize("name", ["galore", "adarankgrad"])
def test_full_run_saves_a_model_that_merges_to_identical_logits(name, proj_project, monkeypatch):
    """The script's whole path: train (checkpointing the optimizer every step), score, export
    the model itself; stages/merge.py copies it and the copy gives the trained logits."""
    from stages.core.models import load_model
    from stages.core.sft import Trainer, build_config

    from stages.merge import merge

    monkeypatch.chdir(proj_project)
    method = load_method(name)
    tag = f"proj-run-{name}"
    cfg = build_config(method, run_args(tag, "--steps_per_task", "2", "--checkpoint_every", "1", "--batch_size", "2",
                                        "--lr", "1e-3"))
    trainer = Trainer(method, cfg)
    trainer.run()
    _, _, batch = probe_batch(proj_project)
    expected = logits(trainer.unwrapped, batch)
    base = logits(load_model("models/base"), batch)
    assert not torch.allclose(expected, base)
    final = proj_project / "runs" / tag / "final"
    assert (final / "config.json").is_file() and not (final / "adapter_config.json").exists()
    merged = merge("models/base", str(final), str(proj_project / "merged" / tag))
    torch.testing.assert_close(logits(load_model(merged), batch), expected, atol=1e-5, rtol=1e-5)
    metrics = run_summary(proj_project / "results" / "train" / tag)
    assert metrics["trainable_params"] == metrics["total_params"]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_help_lists_the_method_params(name, proj_project, capsys, monkeypatch):
    monkeypatch.chdir(proj_project)
    assert_help_lists(load_method(name), "params_projection.yaml", METHODS[name], capsys)
