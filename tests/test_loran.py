"""LoRAN (methods/loran.py, methods/loran4sft.py) on the tiny Llama.

With A_amp = 0 LoRAN is LoRA: the same B, A give peft LoRA's logits. The update starts at zero
(the base model), folds exactly into the weights for every form (plain, use_b, use_P chain), and
with use_P every factor gets a gradient from the first step. Through the Trainer: the loss falls,
the saved adapter reloads onto a fresh base (adapters.load_adapter) and merges (stages/merge.py)
to identical logits, and the trainable count equals LoRA's at the same rank. Bad settings are one
clear error.
"""

from __future__ import annotations

import json

from methods import loran
from stages.core import adapters
from stages.core.batches import response_loss
from stages.core.errors import AdaptlabError
from stages.core.models import load_model
from stages.core.sft import Trainer, build_config

import pytest
import torch
from conftest import ROOT, assert_help_lists, logits, probe_batch, run_summary, tiny_params, write_params
from test_methods import load_method

# r = [rank, in_features]: 0 stands for each layer's own in_features (q_proj and v_proj read 64).
LORAN = {"r": [8, 0], "alpha": 16, "dropout": 0.2, "A_amp": 5e-5, "omega": 1e4, "use_P": False, "use_b": False,
         "layers_to_transform": [], "target_modules": ["q_proj", "v_proj"]}
TAG = "loran-one"


@pytest.fixture(scope="module")
def loran_project(project):
    params = tiny_params(methods={"loran": LORAN}, sequences={"default": ["mc", "gen"], "one": ["mc"]})
    write_params(project / "params_loran.yaml", params)
    return project


@pytest.fixture(scope="module")
def probe(loran_project):
    return probe_batch(loran_project)


def randomize(model: torch.nn.Module, std: float = 0.1, seed: int = 1) -> None:
    """Every LoRAN tensor drawn at random (B starts at zero: the update would be zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in sorted(loran.adapter_names(model)):
            param = model.get_parameter(name)
            param.copy_(torch.randn(param.shape, generator=generator) * std)


def test_zero_amplitude_is_lora(tiny_base, probe):
    """f(u) = u when A_amp = 0: LoRAN with peft LoRA's B and A gives peft LoRA's logits; with the
    Sin term on, it does not."""
    from peft import LoraConfig, get_peft_model

    _, _, batch = probe
    model = loran.attach(load_model(tiny_base), dict(LORAN, A_amp=0.0))
    randomize(model)
    lora = get_peft_model(load_model(tiny_base), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.2,
                                                            target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if ".lora_A.default." in name or ".lora_B.default." in name:
                ours = name.removeprefix("base_model.model.").replace(".lora_A.default.weight", ".loran_A")
                param.copy_(model.get_parameter(ours.replace(".lora_B.default.weight", ".loran_B")))
    expected = logits(lora, batch)
    assert not torch.allclose(expected, logits(load_model(tiny_base), batch), atol=1e-3)
    torch.testing.assert_close(logits(model, batch), expected, atol=1e-5, rtol=1e-5)

    sin_on = loran.attach(load_model(tiny_base), dict(LORAN, A_amp=0.5, omega=20.0))
    randomize(sin_on)
    assert not torch.allclose(logits(sin_on, batch), expected, atol=1e-3)


def test_sin_activation():
    u = torch.linspace(-1, 1, 101, dtype=torch.float64)
    torch.testing.assert_close(loran.sin_activation(u, 0.3, 7.0), u + 0.3 * u * torch.sin(7.0 * u))
    assert loran.sin_activation(torch.zeros(3), 5e-5, 1e4).abs().max() == 0


@pytest.mark.parametrize("r, use_P, use_b", [([8, 0], False, False), ([8, 64, 0], False, True), ([4, 16, 8], True, True)])
def test_starts_at_base_and_merges_exactly(r, use_P, use_b, tiny_base, probe):
    _, _, batch = probe
    base = logits(load_model(tiny_base), batch)
    model = loran.attach(load_model(tiny_base), dict(LORAN, r=r, use_P=use_P, use_b=use_b, A_amp=0.05, omega=30.0))
    torch.testing.assert_close(logits(model, batch), base, atol=0, rtol=0)  # B = 0 and f(0) = 0
    if use_P:  # with B = 0 the gradient reaches B only through P: P must not start at zero
        model.train()
        model(**batch).loss.backward()
        assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in loran.adapter_names(model) if "loran_B" in n)
    randomize(model)
    layer = model.model.layers[0].self_attn.q_proj
    if not use_P and not use_b:  # the update is (α / r0)·f(BA), f elementwise
        expected = 2.0 * loran.sin_activation(layer.loran_B @ layer.loran_A, 0.05, 30.0)
        torch.testing.assert_close(layer.delta_weight(), expected)
    trained = logits(model, batch)
    assert not torch.allclose(trained, base, atol=1e-3)
    merged = loran.merge(model)
    assert not any(isinstance(m, loran.LoRANLinear) for m in merged.modules())
    assert isinstance(model.model.layers[0].self_attn.q_proj, loran.LoRANLinear)  # the input is untouched
    torch.testing.assert_close(logits(merged, batch), trained, atol=2e-5, rtol=1e-5)


def test_layers_to_transform_and_trainable_tensors(tiny_base):
    model = loran.attach(load_model(tiny_base), dict(LORAN, layers_to_transform=[1]))
    wrapped = sorted(name for name, m in model.named_modules() if isinstance(m, loran.LoRANLinear))
    assert wrapped == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == loran.adapter_names(model) and all(".loran_" in n for n in trainable)


@pytest.fixture(scope="module")
def loran_run(loran_project, probe):
    """One LoRAN run through the Trainer on task mc, as methods/loran4sft.py runs it."""
    tokenizer, encoded, batch = probe
    method = load_method("loran")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(loran_project)
        cfg = build_config(method, ["--params", "params_loran.yaml", "--sequence", "one", "--steps_per_task", "12",
                                    "--lr", "1e-2", "--eval_limit", "4", "--output_dir", f"runs/{TAG}",
                                    "--results_dir", f"results/train/{TAG}", "--work_dir", f"checkpoints/{TAG}"])
        base_loss = response_loss(load_model("models/base"), encoded, tokenizer.pad_token_id)
        trainer = Trainer(method, cfg)
        trainer.run()
    return {"trainer": trainer, "base_loss": base_loss, "logits": logits(trainer.unwrapped, batch),
            "final": loran_project / "runs" / TAG / "final"}


def test_trains_saves_reloads_and_merges(loran_run, loran_project, probe):
    from stages.merge import merge

    tokenizer, encoded, batch = probe
    final = loran_run["final"]
    saved = json.loads((final / adapters.ADAPTER_CONFIG).read_text())
    assert saved["kind"] == "loran" and saved["config"]["r"] == [8, 0]
    reloaded = adapters.load_adapter(load_model(loran_project / "models" / "base"), final)
    torch.testing.assert_close(logits(reloaded, batch), loran_run["logits"], atol=2e-5, rtol=1e-5)

    merged_dir = merge(str(loran_project / "models" / "base"), str(final), str(loran_project / "merged" / TAG))
    assert not (merged_dir / adapters.ADAPTER_CONFIG).exists()  # folded: a plain transformers folder
    merged = load_model(merged_dir)
    assert not any(isinstance(m, loran.LoRANLinear) for m in merged.modules())
    torch.testing.assert_close(logits(merged, batch), loran_run["logits"], atol=2e-4, rtol=1e-4)

    trained_loss = response_loss(reloaded, encoded, tokenizer.pad_token_id)
    assert trained_loss < loran_run["base_loss"] - 0.1, f"loss {loran_run['base_loss']:.3f} -> {trained_loss:.3f}"


def test_trainable_count_equals_loras(loran_run, loran_project):
    """B (out x r) + A (r x in) per layer: LoRA's count at the same rank."""
    metrics = run_summary(loran_project / "results" / "train" / TAG)
    per_layer = 8 * (64 + 64) + 8 * (32 + 64)  # q_proj 64x64, v_proj 32x64
    assert metrics["trainable_params"] == 2 * per_layer


@pytest.mark.parametrize("change, message", [
    ({"r": [8, 100]}, "without --use_P every entry after the rank must be the layer's in_features"),
    ({"r": [0, 64]}, "--r 0 64 is not valid"),
    ({"r": [8]}, "--r 8 is not valid"),
    ({"target_modules": ["qq_proj"]}, "--target_modules qq_proj matched no linear layer"),
    ({"layers_to_transform": ["x"]}, "--layers_to_transform ['x'] is not valid"),
    ({"dropout": 1.0}, "--dropout must be in [0, 1)"),
])
def test_bad_settings_are_one_line_errors(change, message, tiny_base):
    with pytest.raises(AdaptlabError) as error:
        loran.attach(load_model(tiny_base), dict(LORAN, **change))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_help_lists_the_params(loran_project, capsys, monkeypatch):
    monkeypatch.chdir(loran_project)
    assert_help_lists(load_method("loran"), "params_loran.yaml", LORAN, capsys)
    monkeypatch.chdir(ROOT)  # the repository's params.yaml: the released config scaled to SmolLM2
    cfg = build_config(load_method("loran"), [])
    config = loran.config_from(cfg)
    assert (config["r"], config["alpha"], config["dropout"], config["A_amp"], config["omega"]) == ([8, 576], 16.0, 0.2, 5e-5, 1e4)
    assert config["target_modules"] == ["q_proj", "v_proj"] and not config["use_P"] and not config["use_b"]
