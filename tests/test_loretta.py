"""LoRETTA (methods/tensor_train.py, methods/loretta.py, methods/loretta4sft.py) and the
ZO-Adam optimizer (methods/zeroth_order.py) on the tiny Llama.

The TT matrix: TT-SVD reconstructs the matrix it factorises to float tolerance, a train of known
low rank is recovered at that rank, parameter counts follow sum r_{i-1}·k_i·r_i, dimensions are
factorised as documented. Both forms start at the base model, hold fewer trainable tensors than
LoRA at the same r, and through the Trainer: the loss falls (Adam, and MeZO with --trainer zo),
the adapter reloads onto a fresh base to identical logits, loretta_rep merges into plain weights
and loretta_adp into a folder that load_model (and so the evaluate stage) scores identically.
ZO-Adam: its first step is Adam's on the SPSA estimate, it fits a regression, lr = 0 undoes the
perturbation, and it resumes bit for bit. Bad settings are one clear error.
"""

from __future__ import annotations

import io
import json
import math

from methods import loretta
from methods import tensor_train as tt
from methods.zeroth_order import ZOAdam
from stages.core import adapters
from stages.core.batches import response_loss
from stages.core.errors import AdaptlabError
from stages.core.models import load_model
from stages.core.sft import Trainer, build_config, count_parameters, weight_decay_groups

import pytest
import torch
from conftest import ROOT, assert_help_lists, logits, probe_batch, run_summary, tiny_params, write_params
from test_methods import load_method
from test_zeroth_order import mlp, mse_closure, regression

LORETTA = {"tuning_type": "loretta_rep", "trainer": "adam", "tt_rank": 5, "tt_shapes": [], "r": 8, "lora_alpha": 16,
           "lora_dropout": 0.05, "target_modules": ["q_proj", "v_proj"], "bottleneck": 16, "non_linearity": "relu",
           "adapter_scaling": 1.0, "adapter_modules": ["o_proj", "down_proj"], "zo_eps": 1e-2}
ADAPTER = {k: v for k, v in LORETTA.items() if k in loretta.CONFIG_KEYS}


# ----------------------------------------------------------------------------- the TT matrix

@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_tt_svd_reconstructs_the_matrix(dtype, atol):
    generator = torch.Generator().manual_seed(0)
    matrix = torch.randn(48, 36, generator=generator, dtype=torch.float64).to(dtype)
    train = tt.TTMatrix.from_matrix(matrix, [4, 12], [6, 6])  # full TT-ranks: exact
    assert train.modes == [4, 12, 6, 6] and train.ranks == [1, 4, 36, 6, 1]
    assert train.full().dtype == dtype
    torch.testing.assert_close(train.full(), matrix, atol=atol, rtol=0)
    assert train.num_parameters() == sum(p.numel() for p in train.parameters()) == 4 * 4 + 4 * 12 * 36 + 36 * 6 * 6 + 6 * 6
    truncated = tt.TTMatrix.from_matrix(matrix, [4, 12], [6, 6], rank=3)
    assert truncated.ranks == [1, 3, 3, 3, 1] and (truncated.full() - matrix).abs().max() > 0.1


def test_a_low_rank_train_is_recovered_at_its_rank():
    generator = torch.Generator().manual_seed(1)
    modes, ranks = [4, 6, 5, 3], [1, 3, 2, 3, 1]
    cores = [torch.randn(ranks[i], k, ranks[i + 1], generator=generator, dtype=torch.float64) for i, k in enumerate(modes)]
    matrix = tt.contract(cores).reshape(24, 15)
    train = tt.TTMatrix.from_matrix(matrix, [4, 6], [5, 3], rank=3)
    torch.testing.assert_close(train.full(), matrix, atol=1e-10, rtol=0)


def test_tt_matrix_shapes_counts_and_init():
    torch.manual_seed(0)
    q = tt.TTMatrix(576, 576, rank=5, std=0.02)  # SmolLM2's q_proj: 8·8·9 | 8·8·9
    assert q.modes == [8, 8, 9, 8, 8, 9] and q.ranks == [1, 5, 5, 5, 5, 5, 1]
    assert q.num_parameters() == sum(p.numel() for p in q.parameters()) == 40 + 200 + 225 + 200 + 200 + 45
    assert 0.01 < q.full().std().item() < 0.03  # the cores' scale gives the dense entries' std (in expectation)
    assert tt.tt_ranks([8, 8], 5) == [1, 5, 1] and tt.tt_ranks([2, 16, 2], 5) == [1, 2, 2, 1]
    up = tt.TTMatrix(64, 16, rank=5, zero_last=True)
    assert up.full().abs().max() == 0 and up.cores[0].abs().max() > 0


def test_factorize():
    expected = {576: [8, 8, 9], 1536: [8, 12, 16], 192: [12, 16], 4096: [16, 16, 16], 8: [8], 64: [8, 8], 17: [17], 1: [1]}
    assert {n: tt.factorize(n) for n in expected} == expected
    assert all(math.prod(tt.factorize(n)) == n for n in range(1, 400))
    assert tt.parse_shapes(["576:8x8x9", "64:4x16"]) == {576: [8, 8, 9], 64: [4, 16]}
    assert tt.factors_for(64, {64: [4, 16]}) == [4, 16] and tt.factors_for(32) == [4, 8]


@pytest.mark.parametrize("call, message", [
    (lambda: tt.parse_shapes(["576:8x8x8"]), "--tt_shapes entry '576:8x8x8': 8x8x8 = 512, expected a factorisation of 576"),
    (lambda: tt.parse_shapes(["576=8x8x9"]), "--tt_shapes entry '576=8x8x9' is not valid: expected DIM:K1xK2x..."),
    (lambda: tt.TTMatrix(64, 64, [8, 4], [8, 8]), "TT factorisation 8x4 of the out dimension multiplies to 32, expected 64"),
    (lambda: tt.factorize(0), "cannot factorise 0"),
])
def test_bad_factorisations_are_one_line_errors(call, message):
    with pytest.raises(AdaptlabError) as error:
        call()
    assert message in str(error.value) and "\n" not in str(error.value)


# ----------------------------------------------------------------------------- the layers

@pytest.fixture(scope="module")
def loretta_project(project):
    params = tiny_params(methods={"loretta": LORETTA}, sequences={"default": ["mc", "gen"], "one": ["mc"]})
    write_params(project / "params_loretta.yaml", params)
    return project


@pytest.fixture(scope="module")
def probe(loretta_project):
    return probe_batch(loretta_project)


def test_both_forms_start_at_the_base_model_and_train_fewer_tensors_than_lora(tiny_base, probe):
    from peft import LoraConfig, get_peft_model

    _, _, batch = probe
    base = logits(load_model(tiny_base), batch)
    lora = get_peft_model(load_model(tiny_base), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    lora_count = count_parameters(lora)[0]
    assert lora_count == 2 * (8 * (64 + 64) + 8 * (64 + 32))
    rep = loretta.attach(load_model(tiny_base), ADAPTER)
    adp = loretta.attach(load_model(tiny_base), dict(ADAPTER, tuning_type="loretta_adp"))
    for model in (rep, adp):
        torch.testing.assert_close(logits(model, batch), base, atol=0, rtol=0)  # B's / Up's last core is zero
        assert {n for n, p in model.named_parameters() if p.requires_grad} == loretta.adapter_names(model)
    assert count_parameters(rep)[0] < lora_count / 1.5
    norms = {n for n in loretta.adapter_names(adp) if "norm" in n}
    assert len(norms) == 2 * 2 + 1  # input and post-attention norm of each block, the final norm
    wrapped = sorted(name.rsplit(".", 1)[-1] for name, m in adp.named_modules() if isinstance(m, loretta.TTAdapterLinear))
    assert wrapped == ["down_proj", "down_proj", "o_proj", "o_proj"]
    # the factorisation of every dimension is recorded, so a reload rebuilds the same shapes
    assert rep.adaptlab_adapter["config"]["tt_shapes"] == ["8:8", "32:4x8", "64:8x8"]


def test_loretta_rep_is_lora_with_tt_factors(tiny_base, probe):
    """W0·x + (α / r)·B·A·x with B, A the TT matrices' full(): delta_weight folds it."""
    _, _, batch = probe
    model = loretta.attach(load_model(tiny_base), ADAPTER)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name in sorted(loretta.adapter_names(model)):
            param = model.get_parameter(name)
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    layer = model.model.layers[1].self_attn.v_proj
    x = torch.randn(3, 64, generator=generator)
    layer.eval()
    expected = layer.base_layer(x) + 2.0 * x @ layer.lora_A.full().T @ layer.lora_B.full().T
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    merged = loretta.merge(model)
    assert not any(isinstance(m, loretta.TTLoRALinear) for m in merged.modules())
    torch.testing.assert_close(logits(merged, batch), logits(model, batch), atol=2e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- through the Trainer

def run_args(tag: str, *extra: str) -> list[str]:
    return ["--params", "params_loretta.yaml", "--sequence", "one", "--eval_limit", "4", "--output_dir", f"runs/{tag}",
            "--results_dir", f"results/train/{tag}", "--work_dir", f"checkpoints/{tag}", *extra]


@pytest.mark.parametrize("tuning_type", ["loretta_rep", "loretta_adp"])
def test_trains_saves_reloads_and_merges(tuning_type, loretta_project, probe, monkeypatch):
    from stages.core.evaluation import Evaluator

    from stages.merge import merge

    monkeypatch.chdir(loretta_project)
    tokenizer, encoded, batch = probe
    tag = f"loretta-{tuning_type}"
    method = load_method("loretta")
    cfg = build_config(method, run_args(tag, "--tuning_type", tuning_type, "--steps_per_task", "12", "--lr", "1e-2"))
    base_loss = response_loss(load_model("models/base"), encoded, tokenizer.pad_token_id)
    trainer = Trainer(method, cfg)
    trainer.run()
    expected = logits(trainer.unwrapped, batch)

    final = loretta_project / "runs" / tag / "final"
    saved = json.loads((final / adapters.ADAPTER_CONFIG).read_text())
    assert saved["kind"] == "loretta" and saved["config"]["tuning_type"] == tuning_type
    reloaded = adapters.load_adapter(load_model("models/base"), final)
    torch.testing.assert_close(logits(reloaded, batch), expected, atol=2e-5, rtol=1e-5)
    trained_loss = response_loss(reloaded, encoded, tokenizer.pad_token_id)
    assert trained_loss < base_loss - 0.1, f"{tuning_type}: loss {base_loss:.3f} -> {trained_loss:.3f}"

    merged_dir = merge("models/base", str(final), str(loretta_project / "merged" / tag))
    merged = load_model(merged_dir)
    torch.testing.assert_close(logits(merged, batch), expected, atol=2e-4, rtol=1e-4)
    metrics = run_summary(loretta_project / "results" / "train" / tag)
    if tuning_type == "loretta_rep":  # folded: a plain transformers folder
        assert not (merged_dir / adapters.ADAPTER_CONFIG).exists()
        assert not any(isinstance(m, loretta.TTLoRALinear) for m in merged.modules())
    else:  # base weights + the adapter, attached again by load_model; scored as in training
        assert (merged_dir / adapters.ADAPTER_CONFIG).is_file()
        assert sum(isinstance(m, loretta.TTAdapterLinear) for m in merged.modules()) == 4
        scores = Evaluator(["mc"], "data/tasks", 16, max_length=96, limit=4).score(merged, tokenizer).scores
        assert scores == metrics["final"]
    names = loretta.adapter_names(reloaded)
    assert 0 < metrics["trainable_params"] == sum(p.numel() for n, p in reloaded.named_parameters() if n in names)


def test_zeroth_order_trainer_lowers_the_loss(loretta_project, monkeypatch):
    """--trainer zo: MeZO (methods/zeroth_order.py) through zeroth_order_step, no gradients.
    loretta_adp: its up-projection bias has a gradient from the start; loretta_rep's zero-started
    B core gives MeZO little to find in 16 steps (10.87 -> 10.85 at lr 1e-1 on this model)."""
    monkeypatch.chdir(loretta_project)
    method = load_method("loretta")
    cfg = build_config(method, run_args("loretta-zo", "--tuning_type", "loretta_adp", "--trainer", "zo", "--lr", "3e-2",
                                        "--steps_per_task", "16", "--batch_size", "4", "--checkpoint_every", "100"))
    trainer = Trainer(method, cfg)
    tokenizer, rows = trainer.tokenizer, trainer.encoded[0][:16]
    before = response_loss(trainer.unwrapped, rows, tokenizer.pad_token_id)
    trainer.train_task(0)
    after = response_loss(trainer.unwrapped, rows, tokenizer.pad_token_id)
    assert after < before - 0.05, f"zo: {before:.3f} -> {after:.3f}"
    assert all(p.grad is None for p in trainer.unwrapped.parameters())
    assert type(trainer.method.optimizer(trainer.unwrapped, cfg, None)).__name__ == "MeZO"


# ----------------------------------------------------------------------------- ZO-Adam

def test_zo_adam_first_step_is_adam_on_the_spsa_estimate():
    """Step 1: m̂ = ĝ, v̂ = ĝ², so θ moves by −lr·ĝ/(|ĝ| + δ), ĝ = g·z with g = ∇f·z (a quadratic)."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(6, 6, generator=generator, dtype=torch.float64)
    a = a @ a.T / 6 + torch.eye(6, dtype=torch.float64)
    w0 = torch.randn(6, generator=generator, dtype=torch.float64)
    w = torch.nn.Parameter(w0.clone())
    seen = []
    opt = ZOAdam([w], lr=0.1, eps=1e-4, seed=0)
    opt.step(lambda: seen.append(w.detach().clone()) or 0.5 * w @ a @ w)
    z = (seen[0] - w0) / 1e-4
    g = opt.projected_grad
    assert g == pytest.approx(((a @ w0) @ z).item(), rel=1e-6)
    estimate = g * z
    torch.testing.assert_close(w.detach() - w0, -0.1 * estimate / (estimate.abs() + 1e-8), atol=1e-9, rtol=1e-7)


def test_zo_adam_fits_a_regression_and_undoes_its_perturbation():
    x, y, model, best = regression(0)
    closure = mse_closure(model, x, y)
    with torch.no_grad():
        start = closure().item()
    opt = ZOAdam(weight_decay_groups(model, 0.0), lr=2e-2, eps=1e-3, seed=0)
    for _ in range(400):
        opt.step(closure)
    with torch.no_grad():
        end = closure().item()
    assert end - best < 0.1 * (start - best), f"{start:.3f} -> {end:.3f} (optimum {best:.3f})"

    net = mlp()
    before = [p.detach().clone() for p in net.parameters()]
    still = ZOAdam(weight_decay_groups(net, 0.0), lr=0.0, eps=1e-3, seed=3)
    for _ in range(3):
        still.step(mse_closure(net, torch.randn(8, 16), torch.randn(8, 1)))
    for b, p in zip(before, net.parameters()):
        torch.testing.assert_close(p.detach(), b, atol=1e-7, rtol=1e-6)


def test_zo_adam_resumes_bit_for_bit():
    data = [(torch.randn(8, 16), torch.randn(8, 1)) for _ in range(8)]
    torch.manual_seed(7)
    straight = mlp(1)
    opt = ZOAdam(weight_decay_groups(straight, 0.1), lr=1e-2, weight_decay=0.1)
    for x, y in data:
        opt.step(mse_closure(straight, x, y))
    torch.manual_seed(7)
    resumed = mlp(1)
    first = ZOAdam(weight_decay_groups(resumed, 0.1), lr=1e-2, weight_decay=0.1)
    for x, y in data[:4]:
        first.step(mse_closure(resumed, x, y))
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    torch.manual_seed(99)
    second = ZOAdam(weight_decay_groups(resumed, 0.1), lr=1e-2, weight_decay=0.1)
    buffer.seek(0)
    second.load_state_dict(torch.load(buffer, weights_only=False))
    for x, y in data[4:]:
        second.step(mse_closure(resumed, x, y))
    assert all(torch.equal(a, b) for a, b in zip(straight.parameters(), resumed.parameters()))


# ----------------------------------------------------------------------------- settings

@pytest.mark.parametrize("change, message", [
    ({"tuning_type": "loretta"}, "--tuning_type 'loretta' is not valid: expected one of loretta_rep, loretta_adp"),
    ({"tt_shapes": ["64:8x4"]}, "--tt_shapes entry '64:8x4': 8x4 = 32, expected a factorisation of 64"),
    ({"tt_rank": -1}, "--tt_rank must be an integer >= 0 (0: dense matrices), got -1"),
    ({"non_linearity": "swish"}, "--non_linearity 'swish' is not valid"),
    ({"tuning_type": "loretta_adp", "adapter_modules": ["out_proj"]}, "--adapter_modules out_proj matched no linear layer"),
])
def test_bad_settings_are_one_line_errors(change, message, tiny_base):
    with pytest.raises(AdaptlabError) as error:
        loretta.attach(load_model(tiny_base), dict(ADAPTER, **change))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_bad_trainer_exits_with_one_line(loretta_project, monkeypatch, capsys):
    from stages.core.sft import main

    monkeypatch.chdir(loretta_project)
    with pytest.raises(SystemExit) as exit_info:
        main(load_method("loretta"), run_args("loretta-bad", "--trainer", "sgd"))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == \
        "error: loretta4sft.py: argument --trainer: must be one of adam, zo, zo_adam, got 'sgd' (see --help)"


def test_help_lists_the_params(loretta_project, capsys, monkeypatch):
    monkeypatch.chdir(loretta_project)
    assert_help_lists(load_method("loretta"), "params_loretta.yaml", LORETTA, capsys)
    monkeypatch.chdir(ROOT)  # the repository's params.yaml
    config = loretta.config_from(build_config(load_method("loretta"), []))
    assert (config["tuning_type"], config["tt_rank"], config["r"], config["lora_alpha"], config["bottleneck"]) == \
        ("loretta_rep", 5, 8, 16.0, 64)
    assert tt.parse_shapes(config["tt_shapes"]) == {576: [8, 8, 9], 192: [12, 16], 1536: [8, 12, 16]}
    # the adapter form's row: methods.loretta_adp, a section naming loretta4sft.py (the same settings but the form)
    adp = build_config(load_method("loretta"), ["--method", "loretta_adp"])
    assert (adp.method, adp.tuning_type) == ("loretta_adp", "loretta_adp")
    assert {k: v for k, v in loretta.config_from(adp).items() if k != "tuning_type"} == \
        {k: v for k, v in config.items() if k != "tuning_type"}


def test_tt_rank_zero_is_the_dense_baseline(tiny_base, probe):
    """tt_rank 0 holds the same layers' matrices densely: loretta_rep is then LoRA (peft's count
    of trainable numbers, and its function: W0·x + (α / r)·B·A·x), loretta_adp a plain bottleneck
    adapter (Houlsby's) with the norms trainable; both start at the base model."""
    from peft import LoraConfig, get_peft_model

    _, _, batch = probe
    base = logits(load_model(tiny_base), batch)
    lora = get_peft_model(load_model(tiny_base), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    dense = loretta.attach(load_model(tiny_base), dict(ADAPTER, tt_rank=0))
    assert count_parameters(dense)[0] == count_parameters(lora)[0]
    torch.testing.assert_close(logits(dense, batch), base, atol=0, rtol=0)
    layer = next(m for m in dense.modules() if isinstance(m, loretta.TTLoRALinear))
    assert isinstance(layer.lora_A, loretta.DenseMatrix) and layer.lora_A.full().shape == (8, 64)
    adp = loretta.attach(load_model(tiny_base), dict(ADAPTER, tuning_type="loretta_adp", tt_rank=0))
    bottleneck = ADAPTER["bottleneck"]
    adapters = [m for m in adp.modules() if isinstance(m, loretta.TTAdapterLinear)]
    dense_numbers = sum(2 * bottleneck * m.base_layer.out_features + bottleneck + m.base_layer.out_features for m in adapters)
    norms = sum(p.numel() for n, p in adp.named_parameters() if n in loretta.norm_parameter_names(adp))
    assert count_parameters(adp)[0] == dense_numbers + norms
    torch.testing.assert_close(logits(adp, batch), base, atol=0, rtol=0)
