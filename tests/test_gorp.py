"""GORP (methods/gorp.py, methods/gorp4sft.py): continual learning with gradient low-rank projection.

On small matrices: g − M·Mᵀ·g has no component in M, the GaLore subspace built from it is
orthogonal to M (also when the gradient's rank is below the projection rank), and a basis grows
by the fewest directions that hold the energy threshold, staying orthonormal. On the tiny Llama,
through the core's Trainer: the bases grow task after task from W's first moment, the whole
change of every target layer on a later task (W's update and the new LoRA's) has no component
in the bases, a run killed mid-task (and resumed from a finished task) ends with the weights of
an uninterrupted one, the saved model is a plain folder that merges by copy to the trained
logits, and on two tasks that want opposite answers to the same prompts GORP keeps the first
task's loss far closer to where it was than plain sequential LoRA does. Bad settings are one
line each.
"""

from __future__ import annotations

import dataclasses

from methods.gorp import (
    GorpAdamW,
    GorpLinear,
    activate,
    attach,
    gorp_layers,
    grow_basis,
    orthogonal_subspace,
    plain_copy,
    project_out,
)
from methods.projection import state_bytes
from stages.core.batches import response_loss
from stages.core.errors import AdaptlabError
from stages.core.io import atomic_write_json, write_jsonl

import pytest
import torch
import yaml
from conftest import (
    LORA,
    ROOT,
    assert_help_lists,
    last_line,
    logits,
    make_workspace,
    probe_batch,
    run_script,
    run_summary,
    tiny_params,
)
from test_methods import load_method

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj"]
# The tiny Llama's bases live in its layers' input spaces: 64 wide (down_proj: 128).
GORP = {"r": 8, "lora_alpha": 32, "lora_dropout": 0.05, "rank": 4, "update_proj_gap": 3, "scale": 1.0,
        "energy": 0.9, "lr": 1.0e-4, "lora_lr": 1.0e-2, "target_modules": ALL}
SEQUENCES = {"default": ["mc", "gen"], "three": ["mc", "gen", "agree"], "conflict": ["agree", "flip"]}


def conflict_rows(flip: bool) -> list[dict]:
    """Two reviews; ``flip``: the same prompts with the opposite answers (a second task whose
    gradients collide head-on with the first's). Two prompts keep the first task's inputs within
    what a rank-8 basis can hold."""
    choices = ["negative", "positive"]
    rows = []
    for i, (adjective, label) in enumerate((("good", 1), ("bad", 0))):
        label = 1 - label if flip else label
        rows.append({"id": f"{'flip' if flip else 'agree'}-{i}", "prompt": f"Review: the plot was {adjective}",
                     "answer": choices[label], "choices": choices, "label": label})
    return rows


@pytest.fixture(scope="module")
def gorp_project(project, tmp_path_factory):
    """A workspace on the session's model and data, plus the tasks agree and flip."""
    o_lora = {"r": 8, "lora_alpha": 32, "lora_dropout": 0.0, "lambda_1": 0.5, "lambda_2": 0.0, "target_modules": ALL}
    params = tiny_params(methods={"gorp": GORP, "lora": dict(LORA, lora_alpha=32), "o_lora": o_lora}, sequences=SEQUENCES)
    root = make_workspace(tmp_path_factory.mktemp("gorp") / "ws", project, params, copy_data=True)
    for name in ("agree", "flip"):
        train = test = conflict_rows(name == "flip")
        write_jsonl(root / "data" / "tasks" / name / "train.jsonl", train)
        write_jsonl(root / "data" / "tasks" / name / "test.jsonl", test)
        atomic_write_json(root / "data" / "tasks" / name / "meta.json",
                          {"name": name, "kind": "multiple_choice", "source": "tests", "n_train": len(train), "n_test": len(test)})
    return root


@pytest.fixture(scope="module")
def method():
    return load_method("gorp")


def run_args(tag: str, sequence: str, *extra: str) -> list[str]:
    return ["--params", "params.yaml", "--sequence", sequence, "--eval_limit", "2", "--output_dir", f"runs/{tag}",
            "--results_dir", f"results/train/{tag}", "--work_dir", f"checkpoints/{tag}", *extra]


def capturing(method):
    """``method`` whose optimizers are kept in a list (the Trainer builds one per task)."""
    built = []

    def optimizer(model, cfg, ctx):
        built.append(method.optimizer(model, cfg, ctx))
        return built[-1]

    return dataclasses.replace(method, optimizer=optimizer), built


def orthonormal(d: int, k: int, generator: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(d, k, generator=generator, dtype=torch.float64)).Q


def energy_held(basis: torch.Tensor, moment: torch.Tensor) -> float:
    moment = moment.double()
    return (basis.double().T @ moment).square().sum().item() / moment.square().sum().item()


# ----------------------------------------------------------------------------- projections and bases

def test_projected_gradient_has_no_component_in_the_basis():
    g = torch.Generator().manual_seed(0)
    basis = orthonormal(40, 6, g).float()
    grad = torch.randn(40, 70, generator=g)
    projected = project_out(grad, basis)
    assert (basis.T @ projected).abs().max() < 1e-5
    torch.testing.assert_close(project_out(projected, basis), projected, atol=1e-5, rtol=0)  # a projector
    torch.testing.assert_close(basis @ (basis.T @ (grad - projected)), grad - projected, atol=1e-5, rtol=0)  # removed part is in M
    assert project_out(grad, basis[:, :0]) is grad


@pytest.mark.parametrize("gradient_rank", [20, 2])
def test_galore_subspace_is_orthogonal_to_the_basis(gradient_rank):
    """Q's rows span the projected gradient's top directions and are orthogonal to M; when the
    gradient has rank 2 < rank 6, the rows a randomized SVD would fill arbitrarily are never
    left inside M."""
    g = torch.Generator().manual_seed(1)
    basis = orthonormal(40, 8, g).float()
    # a clear gap after the 6th singular value, as in a trained layer's gradient (and a randomized SVD's premise)
    scales = torch.tensor([10.0, 8, 6, 5, 4, 3] + [0.3] * 14, dtype=torch.float64)[:gradient_rank]
    left = project_out(orthonormal(40, gradient_rank, g), basis.double())
    grad = (left * scales @ orthonormal(70, gradient_rank, g).T).float()
    q = orthogonal_subspace(grad, basis, rank=6, seed=3)
    assert q.shape == (6, 40)
    assert (q @ basis).abs().max() < 1e-5
    rows = q[q.norm(dim=1) > 0]
    assert len(rows) >= min(6, gradient_rank)
    torch.testing.assert_close(rows @ rows.T, torch.eye(len(rows)), atol=1e-5, rtol=0)
    top = torch.linalg.svd(grad.double(), full_matrices=False).U[:, :min(6, gradient_rank)].float()
    torch.testing.assert_close(q.T @ (q @ top), top, atol=1e-3, rtol=0)  # Q spans the top directions


def test_first_moment_is_carried_into_each_new_subspace():
    """W's first moment m is kept in the coordinates of the current projection Q. At a refresh it
    is moved into the new subspace, so Qᵀ·m, what the basis grows from at the task's end, is a
    moment of W's gradient in one subspace: the average of the projected gradients in which each
    refresh projects the average so far onto the new subspace. Read unmoved in the new
    coordinates, the old subspace's moment lands on the new directions (the bug this replaces)."""
    g = torch.Generator().manual_seed(5)
    torch.manual_seed(0)
    layer = GorpLinear(torch.nn.Linear(6, 4, bias=False), n_tasks=2, r=2, lora_alpha=2.0, lora_dropout=0.0, capacity=1)
    steps, gap, beta1 = 6, 2, 0.9
    opt = GorpAdamW([layer], 0, lr=1e-3, lora_lr=1e-3, rank=1, update_proj_gap=gap, scale=1.0, energy=1.0,
                    steps_per_task=steps, grow_bases=True, seed=0)
    # rank-1 gradients whose input direction changes at every refresh (steps 1-2, 3-4, 5-6)
    inputs = [torch.randn(6, generator=g, dtype=torch.float64) for _ in range(steps // gap)]
    reference = torch.zeros(6, 4, dtype=torch.float64)  # m in W's gradient space (in x out), projected at refreshes
    for t in range(steps):
        direction = inputs[t // gap] / inputs[t // gap].norm()
        grad_t = torch.outer(direction, torch.randn(4, generator=g, dtype=torch.float64))  # G' = Gᵀ (in x out)
        layer.weight.grad = grad_t.T.float()
        opt.step()
        q = opt.state[layer.weight]["Q"].double()  # rank 1: the gradient's own input direction
        torch.testing.assert_close(q.T @ q, torch.outer(direction, direction), atol=1e-5, rtol=0)
        if t % gap == 0 and t:  # a refresh: the moment so far, projected onto the new subspace
            reference = q.T @ (q @ reference)
        reference = beta1 * reference + (1 - beta1) * grad_t
        moment = q.T @ opt.state[layer.weight]["exp_avg"].double()
        torch.testing.assert_close(moment, reference, atol=1e-5, rtol=1e-4)
    # The basis grown at the task's end is the moment's own direction (the last subspace's).
    grown = layer.used_basis().double()
    assert grown.shape[1] == 1
    torch.testing.assert_close((grown @ grown.T) @ reference, reference, atol=1e-5, rtol=1e-4)


def test_basis_grows_by_the_fewest_directions_that_hold_the_energy():
    g = torch.Generator().manual_seed(2)
    d, room = 50, 16

    def moment(scales):  # d x r times r x L with singular values ``scales``
        left = orthonormal(d, len(scales), g) * torch.tensor(scales, dtype=torch.float64)
        return left.float(), orthonormal(60, len(scales), g).T.float()

    empty = torch.zeros(d, 0)
    left1, right1 = moment([5.0, 3.0, 2.0, 1.0, 0.5, 0.2])
    first = grow_basis(empty, left1, right1, 0.9, room)
    m1 = left1 @ right1
    k1 = first.shape[1]
    assert 1 <= k1 < 6
    assert energy_held(first, m1) >= 0.9 - 1e-6 and energy_held(first[:, :k1 - 1], m1) < 0.9  # the fewest
    assert grow_basis(first, left1, right1, 0.9, room).shape[1] == 0  # already held

    left2, right2 = moment([4.0, 4.0, 1.0, 1.0])
    second = grow_basis(first, left2, right2, 0.9, room)
    basis = torch.cat([first, second], dim=1)
    m2 = left2 @ right2
    assert second.shape[1] >= 1
    torch.testing.assert_close(basis.T @ basis, torch.eye(basis.shape[1]), atol=1e-5, rtol=0)
    assert energy_held(basis, m2) >= 0.9 - 1e-6
    assert energy_held(basis[:, :-1], m2) < 0.9
    assert grow_basis(first, left2, right2, 0.9, 1).shape[1] == 1  # never beyond the room left
    assert grow_basis(first, left2, right2, 1.0, room).shape[1] == basis.shape[1] - k1 + (4 - second.shape[1])


# ----------------------------------------------------------------------------- through the Trainer

def effective_weights(model) -> list[torch.Tensor]:
    return [layer.folded_weight().detach().clone() for layer in gorp_layers(model)]


def test_bases_grow_across_tasks_and_later_updates_avoid_them(gorp_project, method, monkeypatch):
    from stages.core.sft import Trainer, build_config

    monkeypatch.chdir(gorp_project)
    recording, built = capturing(method)
    cfg = build_config(recording, run_args("grow", "three", "--steps_per_task", "5", "--batch_size", "4",
                                           "--checkpoint_every", "100"))
    trainer = Trainer(recording, cfg)
    model = trainer.unwrapped
    layers = gorp_layers(model)
    assert len(layers) == 2 * 7
    assert all(layer.basis.shape == (layer.in_features, GORP["rank"] * 2) for layer in layers)  # two earlier tasks

    sizes = []
    for task in range(3):
        before_w = [layer.weight.detach().clone() for layer in layers]
        before = effective_weights(model)
        bases = [layer.used_basis().clone() for layer in layers]
        trainer.train_task(task)
        optimizer = built[-1]
        after = effective_weights(model)
        for layer, basis, w0, e0, e1 in zip(layers, bases, before_w, before, after):
            change_w = (layer.weight.detach() - w0).T  # in x out: seen from the layer's inputs
            change = (e1 - e0).T
            assert change_w.norm() > 0 and change.norm() > 0
            if task == 0:
                assert basis.shape[1] == 0
            else:  # W's update and the layer's whole change (new LoRA included): Δ·M = 0
                assert (basis.T @ change_w).norm() <= 1e-4 * change_w.norm(), layer
                assert (basis.T @ change).norm() <= 1e-4 * change.norm(), layer
        grown = [layer.used_basis() for layer in layers]
        sizes.append([b.shape[1] for b in grown])
        for layer, old, new in zip(layers, bases, grown):
            torch.testing.assert_close(new.T @ new, torch.eye(new.shape[1]), atol=1e-5, rtol=0)
            torch.testing.assert_close(new[:, :old.shape[1]], old, atol=0, rtol=0)  # earlier directions kept
            if task < 2:  # the energy rule on W's first moment (Qᵀ·m), the fewest new directions
                state = optimizer.state[layer.weight]
                moment = state["Q"].T @ state["exp_avg"]
                assert energy_held(new, moment) >= GORP["energy"] - 1e-5
                if new.shape[1] > old.shape[1]:
                    assert energy_held(new[:, :-1], moment) < GORP["energy"]
        if task == 2:
            assert sizes[2] == sizes[1]  # nothing after the last task
    assert all(0 < k0 <= GORP["rank"] for k0 in sizes[0])
    assert all(k1 >= k0 for k0, k1 in zip(sizes[0], sizes[1])) and sum(sizes[1]) > sum(sizes[0])
    # what trains: W and the current LoRA only
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.endswith((".weight", ".lora_A.2", ".lora_B.2")) for n in trainable)
    assert not any(n.endswith(("embed_tokens.weight", "norm.weight")) for n in trainable)


def test_killed_run_resumes_with_the_weights_of_an_uninterrupted_one(gorp_project, method, monkeypatch, capsys):
    """Killed at step 4 of task 2 (checkpoints every 2 steps): the restarted run reuses task 1
    (its weights and bases from the saved task), resumes task 2 from step 2 and ends with the
    very weights, bases and scores of a run that never stopped. The saved model is a plain
    transformers folder: stages/merge.py copies it and it gives the trained model's logits."""
    from stages.core.models import load_model
    from stages.core.sft import Trainer, build_config

    from safetensors.torch import load_file

    from stages.merge import merge

    monkeypatch.chdir(gorp_project)
    steps = ["--steps_per_task", "6", "--batch_size", "4"]
    reference = Trainer(method, build_config(method, run_args("straight", "default", *steps, "--checkpoint_every", "100")))
    reference.run()

    class Killed(Exception):
        pass

    calls = []

    def dies_at_step_10(step):
        calls.append(1)
        if len(calls) == 10:  # task 2, step 4: the last checkpoint is after its step 2
            raise Killed
        return method.train_step(step)

    dying = dataclasses.replace(method, train_step=dies_at_step_10)
    cut = run_args("cut", "default", *steps, "--checkpoint_every", "2")
    with pytest.raises(Killed):
        Trainer(dying, build_config(dying, cut)).run()
    capsys.readouterr()
    resumed = Trainer(method, build_config(method, cut))
    resumed.run()
    out = capsys.readouterr().out
    assert "task 1 (mc) already finished: reusing it" in out and "resumed task 2 from step 2" in out

    for name in ("after_1_mc", "after_2_gen", "final"):
        ours = load_file(gorp_project / "runs" / "cut" / name / "model.safetensors")
        theirs = load_file(gorp_project / "runs" / "straight" / name / "model.safetensors")
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name
    mine, ref = dict(resumed.unwrapped.named_parameters()), dict(reference.unwrapped.named_parameters())
    assert all(torch.equal(mine[n], ref[n]) for n in ref)  # bases and every LoRA included
    metrics = [run_summary(gorp_project / "results" / "train" / t) for t in ("cut", "straight")]
    assert metrics[0]["matrix"] == metrics[1]["matrix"]

    final = gorp_project / "runs" / "straight" / "final"
    assert (final / "config.json").is_file() and not (final / "adapter_config.json").exists()
    _, _, batch = probe_batch(gorp_project)
    expected = logits(reference.unwrapped, batch)
    assert not torch.allclose(expected, logits(load_model("models/base"), batch))
    merged = merge("models/base", str(final), str(gorp_project / "merged" / "gorp"))
    torch.testing.assert_close(logits(load_model(merged), batch), expected, atol=1e-5, rtol=1e-5)
    # What the run trains, over its whole sequence: W and every task's LoRA (not the bases), over
    # the base model's size (not the model with the LoRAs and bases GORP pre-allocates).
    layers = gorp_layers(reference.unwrapped)
    trainable = sum(layer.weight.numel() + sum(a.numel() + b.numel() for a, b in zip(layer.lora_A, layer.lora_B))
                    for layer in layers)
    assert len(layers[0].lora_A) == 2 and metrics[1]["trainable_params"] == trainable
    assert metrics[1]["total_params"] == sum(p.numel() for p in load_model("models/base").parameters())


def forgetting(method, tag: str, *flags: str) -> tuple[float, float, float]:
    """Train agree then flip (24 steps each, seed 0); agree's loss before, after agree and after flip."""
    from stages.core.sft import Trainer, build_config

    cfg = build_config(method, run_args(tag, "conflict", "--steps_per_task", "24", "--checkpoint_every", "100",
                                        "--warmup_ratio", "0", *flags))
    trainer = Trainer(method, cfg)
    agree = trainer.encoded[0]

    def loss() -> float:
        return response_loss(trainer.unwrapped, agree, trainer.tokenizer.pad_token_id)

    start = loss()
    trainer.train_task(0)
    learned = loss()
    trainer.train_task(1)
    return start, learned, loss()


def test_gorp_forgets_a_conflicting_task_less_than_sequential_lora(gorp_project, method, monkeypatch):
    """agree then flip (the same two prompts, every answer reversed), the same LoRA (r 8, alpha
    32, lr 1e-2), steps and seed for both. Plain sequential LoRA undoes agree (its loss climbs
    back by > 0.3 nats, most of what it learned); GORP's second LoRA and W's update avoid the
    input directions of agree's gradient (rank 8, the whole first-moment subspace kept:
    energy 1), so agree's loss moves by under a third of that. (With energy 0.9 the directions
    left out of the basis are enough, on this random tiny model, for the second task to undo
    the first: Adam takes full-size steps in whatever the projection leaves.)"""
    monkeypatch.chdir(gorp_project)
    lora = forgetting(load_method("lora"), "conflict-lora")
    gorp = forgetting(method, "conflict-gorp", "--rank", "8", "--energy", "1.0")
    for start, learned, _ in (lora, gorp):
        assert learned < start - 0.3, (lora, gorp)  # both learned the first task
    lora_rise, gorp_rise = lora[2] - lora[1], gorp[2] - gorp[1]
    assert lora_rise > 0.3, (lora, gorp)
    assert gorp_rise < lora_rise / 3, (lora, gorp)


# ----------------------------------------------------------------------------- memory, settings, script

def test_state_is_rank_over_in_of_adamw_for_w_and_adamw_for_the_lora(tiny_base, project):
    """One step on the tiny Llama: GORP's moments of a target W (out x in) are rank/in of
    AdamW's, plus Q (rank x in); the LoRA factors' moments are AdamW's."""
    from stages.core.batches import causal_lm_loss
    from stages.core.models import load_model

    _, _, batch = probe_batch(project)
    torch.manual_seed(0)
    model = attach(load_model(tiny_base), ALL, n_tasks=2, r=8, lora_alpha=32, lora_dropout=0.0, rank=4)
    layers = activate(model, 0)
    opt = GorpAdamW(layers, 0, lr=1e-3, lora_lr=1e-2, rank=4, update_proj_gap=3, scale=1.0, energy=0.9,
                    steps_per_task=5, grow_bases=True)
    causal_lm_loss(model, batch).backward()
    opt.step()
    for layer in layers:
        w = layer.weight
        adamw = 2 * w.numel() * 4
        assert state_bytes(opt, w) * layer.in_features == adamw * 4
        assert state_bytes(opt, w, None) - state_bytes(opt, w) == 4 * layer.in_features * 4  # Q (step, age: plain numbers)
        for factor in (layer.lora_A[0], layer.lora_B[0]):
            assert state_bytes(opt, factor) == 2 * factor.numel() * 4


@pytest.mark.parametrize("flags, message", [
    (("--energy", "0"), "--energy must be in (0, 1] (the fraction of a task's first-moment energy its basis keeps), got 0.0"),
    (("--energy", "1.5"), "--energy must be in (0, 1]"),
    (("--rank", "0"), "--rank must be a positive integer, got 0"),
    (("--r", "-8"), "--r must be a positive integer, got -8"),
    (("--update_proj_gap", "0"), "--update_proj_gap must be a positive integer, got 0"),
])
def test_bad_settings_are_one_line_errors(flags, message, gorp_project, method, monkeypatch):
    from stages.core.sft import build_config

    monkeypatch.chdir(gorp_project)
    with pytest.raises(AdaptlabError) as error:
        build_config(method, run_args("bad", "default", *flags))  # checked with the settings, before any work
    assert message in str(error.value) and "\n" not in str(error.value)


def test_script_reports_a_bad_energy_in_one_line(gorp_project, script_env):
    proc = run_script("methods/gorp4sft.py", *run_args("bad-script", "default", "--energy", "1.5"), cwd=gorp_project,
                      env=script_env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert last_line(proc.stderr) == ("error: --energy must be in (0, 1] (the fraction of a task's first-moment "
                                      "energy its basis keeps), got 1.5")
    assert not (gorp_project / "runs" / "bad-script").exists()


def test_help_lists_the_method_params(gorp_project, method, capsys, monkeypatch):
    monkeypatch.chdir(gorp_project)
    assert_help_lists(method, "params.yaml", GORP, capsys)


def test_repository_params_hold_the_papers_defaults(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    from stages.core.sft import build_config

    cfg = build_config(load_method("gorp"), [])
    assert (cfg.rank, cfg.r, cfg.lora_alpha, cfg.lr, cfg.update_proj_gap, cfg.energy) == (8, 8, 32, 1e-5, 10, 0.9)
    assert sorted(cfg.target_modules) == sorted(ALL)
    # O-LoRA's orders 1-3 (dbpedia, amazon, yahoo, agnews) on stand-ins, in GORP's table
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    dbpedia, amazon, yahoo, agnews = "cl_intent", "cl_reviews", "cl_strategyqa", "cl_politifact"
    orders = {name: params["sequences"][name]["tasks"] for name in ("gorp_order1", "gorp_order2", "gorp_order3")}
    assert params["tables"]["gorp"]["sequences"] == list(orders)
    assert orders == {"gorp_order1": [dbpedia, amazon, yahoo, agnews],
                      "gorp_order2": [dbpedia, amazon, agnews, yahoo],
                      "gorp_order3": [yahoo, amazon, agnews, dbpedia]}
    assert all((params["tasks"][t]["train_size"], params["tasks"][t]["test_size"]) == (64, 300) for t in orders["gorp_order1"])
    assert {"gorp", "o_lora", "lora", "galore", "cimeo"} <= set(params["tables"]["gorp"]["rows"])


# ----------------------------------------------------------------------------- O-LoRA, GORP's baseline

def o_lora_run(tag: str, *flags: str):
    """Train agree then flip with O-LoRA (r 8, alpha 32, lr 1e-2, 12 steps each); the trainer."""
    from stages.core.sft import Trainer, build_config

    method = load_method("o_lora")
    cfg = build_config(method, run_args(tag, "conflict", "--steps_per_task", "12", "--checkpoint_every", "100",
                                        "--warmup_ratio", "0", "--lr", "1e-2", *flags))
    trainer = Trainer(method, cfg)
    trainer.train_task(0)
    trainer.train_task(1)
    return trainer


def overlap(trainer) -> float:
    """Σ |A_0·A_1ᵀ| over the layers: how far the second task's LoRA leaves the first's input subspace."""
    return sum((layer.lora_A[0] @ layer.lora_A[1].T).abs().sum().item() for layer in gorp_layers(trainer.unwrapped))


def test_o_lora_keeps_the_new_lora_orthogonal_and_w_frozen(gorp_project, monkeypatch):
    """O-LoRA's orthogonality loss (lambda_1) drives the second LoRA's rows away from the first's:
    the overlap Σ|A_0·A_1ᵀ| ends far below plain sequential LoRA's (lambda_1 = 0); W0 and the
    first task's LoRA do not move on the second task; the saved model is the folded one."""
    monkeypatch.chdir(gorp_project)
    plain = o_lora_run("o_lora-plain", "--lambda_1", "0")
    weights = [layer.weight.detach().clone() for layer in gorp_layers(plain.unwrapped)]
    orthogonal = o_lora_run("o_lora-orth", "--lambda_1", "5")
    assert overlap(orthogonal) < overlap(plain) / 3, (overlap(orthogonal), overlap(plain))
    for layer, before in zip(gorp_layers(orthogonal.unwrapped), weights):
        assert torch.equal(layer.weight, before)  # W0 never trains (same seed: same start)
        assert not layer.lora_A[0].requires_grad and layer.lora_A[1].requires_grad
    # Trained over the run: every task's LoRA, over the base model's size (not its padded bases).
    from stages.core.models import load_model

    layers = gorp_layers(orthogonal.unwrapped)
    assert orthogonal.trainable == sum(p.numel() for layer in layers for p in (*layer.lora_A, *layer.lora_B))
    assert orthogonal.total == sum(p.numel() for p in load_model("models/base").parameters())
    *_, batch = probe_batch(gorp_project)
    folded = plain_copy(orthogonal.unwrapped)
    assert torch.allclose(logits(folded, batch), logits(orthogonal.unwrapped, batch), atol=1e-4)


def test_o_lora_script_saves_a_plain_model(gorp_project, script_env):
    """The script's final model folds every task's LoRA into a plain transformers folder
    (stages/merge.py copies it); the run has the accuracy matrix; with --no-save_every_task
    the run folder holds the final model only."""
    from stages.core.models import load_model

    out = run_script("methods/o_lora4sft.py", *run_args("o_lora-script", "default", "--steps_per_task", "3",
                                                         "--checkpoint_every", "100", "--no-save_every_task"),
                     cwd=gorp_project, env=script_env)
    assert out.returncode == 0, out.stderr[-2000:]
    final = gorp_project / "runs" / "o_lora-script" / "final"
    assert (final / "config.json").is_file() and not (final / "adapter_config.json").exists()
    assert sorted(p.name for p in final.parent.iterdir()) == ["final", "train_config.json"]
    metrics = run_summary(gorp_project / "results" / "train" / "o_lora-script")
    assert set(metrics["matrix"]) == {"after_mc", "after_gen"}
    assert load_model(final) is not None


def test_tables_average_ap_and_bwt_over_the_orders():
    """GORP's headline table (any table over several sequences): every order's AP per method,
    then AP and BWT averaged over the orders and the mean AP's difference from the reference,
    each as replicates (index 0: the value as measured)."""
    import numpy as np

    from stages.tables import summary_over_sequences

    def line(row, ap, bwt):  # two replicates after the measured value
        return {"row": row, "stats": {"AP": np.array([ap, ap - 0.01, ap + 0.01]), "BWT": np.array([bwt] * 3)}}

    table = {"sequences": ["o1", "o2"], "rows": ["gorp", "lora"], "reference": "lora"}
    by_order = {"o1": [line("gorp", 0.6, 0.0), line("lora", 0.4, -0.1)],
                "o2": [line("gorp", 0.5, 0.1), line("lora", 0.5, -0.2)]}
    header, rows = summary_over_sequences(table, by_order)
    assert header == ["method", "AP o1", "AP o2", "mean AP", "mean BWT", "Δ mean AP vs lora"]
    measured = [[c if c is None else (c[1][0] if isinstance(c[0], str) else c[0][0]) for c in r[1:]] for r in rows]
    assert measured[0] == [0.6, 0.5, pytest.approx(0.55), pytest.approx(0.05), pytest.approx(0.1)]
    assert measured[1] == [0.4, 0.5, pytest.approx(0.45), pytest.approx(-0.15), None]
    assert rows[0][1][1] is by_order["o1"][1]["stats"]["AP"] and rows[1][1][1] is None  # the reference is not compared
