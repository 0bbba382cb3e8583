"""Every method on the tiny model. The contract, once per decoder row of the repository's
params.yaml (the quick tier, `make test-quick`): the row's decomposition if it has one, a couple
of training steps, the saved adapter or model reloads to the trained logits, and stages/merge.py
--run writes a plain model with the same logits. Then the adapter methods' own checks: the loss
falls, LoRA-FA keeps A frozen, every script's --help, the response-only loss, bf16, sequences,
the chat template and ROUGE scoring.

Each method runs in-process through the same Trainer its script uses, on one task, so the whole
file stays within a few minutes.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

from stages.core.adapters import is_saved_adapter, load_adapter
from stages.core.batches import response_loss
from stages.core.errors import AdaptlabError
from stages.core.models import load_model
from stages.core.sft import Trainer, build_config, script_of

import pytest
import torch
import yaml
from conftest import LORA, ROOT, TRAIN, logits, probe_batch, run_summary, tiny_params, write_params

# The tiny Llama's layers are 64 wide (k/v: 32, MLP: 128): block and group sizes must divide them.
TARGETS = ["q_proj", "v_proj", "up_proj"]
TINY_METHODS = {
    "lora": dict(LORA, target_modules=TARGETS),
    "dora": dict(LORA, target_modules=TARGETS),
    "pissa": dict(LORA, lora_alpha=8, lora_dropout=0.0, svd_niter=4, target_modules=TARGETS),
    "olora": dict(LORA, target_modules=TARGETS),
    "eva": dict(LORA, rho=2.0, tau=0.99, calib_samples=32, calib_batch_size=8, target_modules=TARGETS),
    "bone": {"r": 16, "target_modules": TARGETS},
    "miss": {"r": 16, "miss_dropout": 0.0, "target_modules": TARGETS},
    "road": {"variant": "road_1", "group_size": 16, "target_modules": TARGETS},
    "shira": {"r": 8, "target_modules": TARGETS},
    "lorafa": dict(LORA, target_modules=TARGETS),
}
# Learning rates that move the tiny random model visibly in a dozen steps.
TINY_LR = {"road": 5e-2, "shira": 5e-2}


def load_method(name: str):
    """The Method of methods/<name>4sft.py."""
    return importlib.import_module(f"methods.{name}4sft").METHOD


@pytest.fixture(scope="module")
def methods_project(project):
    params = tiny_params(methods=TINY_METHODS, sequences={"default": ["mc", "gen"], "one": ["mc"]})
    write_params(project / "params_methods.yaml", params)
    return project


@pytest.fixture()
def probe(methods_project):
    """A fixed batch of the task's training rows, and their encoding for the loss."""
    return probe_batch(methods_project)


# ----------------------------------------------------------------------------- every row's contract

REPOSITORY_METHODS = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))["methods"]
# The rows that train the decoder (the encoder table's rows start from MiniLM: tests/test_encoder.py).
DECODER_ROWS = sorted(name for name, section in REPOSITORY_METHODS.items() if section.get("base") != "encoder_model")
# Where a row's params.yaml section does not fit the tiny Llama (64 wide; k/v 32, MLP 128) or its
# two made-up tasks (mc, gen); merged into the section (decompose args included).
TINY_ROWS = {
    "bone": {"r": 16}, "miss": {"r": 16}, "road": {"group_size": 16},
    "loran": {"r": [8, 0]},  # 0: each layer's own in_features
    "loretta": {"tt_shapes": []}, "loretta_adp": {"tt_shapes": []},  # []: factorised from each layer's shape
    "corda_kpa": {"decompose": {"args": {"calib_dataset": "gen", "calib_loader_size": 8}}},
    "corda_ipa": {"decompose": {"args": {"calib_dataset": "mc", "calib_loader_size": 8}}},
    "cimeo": {"mask_batches": 2, "decompose": {"args": {"threads": 1}}},
    "cimeo_pretrain": {"mask_batches": 2, "decompose": {"args": {"threads": 1}}},
}


def merged_section(section: dict, changes: dict) -> dict:
    out = dict(section)
    for key, value in changes.items():
        out[key] = merged_section(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


@pytest.fixture(scope="module")
def rows_project(project, tmp_path_factory):
    """A workspace on the session's model and data whose params.yaml holds every decoder row of
    the repository's params.yaml (the decompose stage reads params.yaml)."""
    root = tmp_path_factory.mktemp("rows")
    (root / "models").mkdir()
    (root / "models" / "base").symlink_to(project / "models" / "base", target_is_directory=True)
    (root / "data").symlink_to(project / "data", target_is_directory=True)
    methods = {row: merged_section(REPOSITORY_METHODS[row], TINY_ROWS.get(row, {})) for row in DECODER_ROWS}
    write_params(root / "params.yaml", tiny_params(methods=methods, sequences={"one": ["mc"]}))
    return root


def reload(base_model: str, saved: Path) -> torch.nn.Module:
    """A run's saved model as a user loads it: a peft adapter with peft, an adaptlab adapter with
    stages/core/adapters.py, full weights with transformers."""
    from peft import PeftModel

    if (saved / "adapter_config.json").is_file():
        return PeftModel.from_pretrained(load_model(base_model), str(saved))
    if is_saved_adapter(saved):
        return load_adapter(load_model(base_model), saved)
    return load_model(saved)


@pytest.mark.quick
@pytest.mark.parametrize("row", DECODER_ROWS)
def test_row_trains_saves_reloads_and_merges(row, rows_project, monkeypatch):
    from stages import decompose, merge

    monkeypatch.chdir(rows_project)
    _, _, batch = probe_batch(rows_project)
    section = REPOSITORY_METHODS[row]
    start = "models/base"
    if "decompose" in section:  # as dvc.yaml's decompose stage runs it
        start = f"models/init/{row}"
        decompose.main(["--method", row, "--sequence", "one", "--out", start])
    method = importlib.import_module(f"methods.{Path(script_of(row, section)).stem}").METHOD
    cfg = build_config(method, ["--method", row, "--sequence", "one", "--base_model", start, "--steps_per_task", "2",
                                "--eval_limit", "2", "--output_dir", f"runs/{row}", "--results_dir", f"results/train/{row}",
                                "--work_dir", f"checkpoints/{row}"])
    trainer = Trainer(method, cfg)
    before = logits(trainer.unwrapped, batch)
    trainer.run()
    expected = logits(trainer.unwrapped, batch)
    assert not torch.equal(expected, before), f"{row}: two steps changed nothing"

    torch.testing.assert_close(logits(reload(cfg.base_model, rows_project / "runs" / row / "final"), batch), expected,
                               atol=2e-4, rtol=1e-4)
    merge.main(["--run", f"runs/{row}", "--output_path", f"merged/{row}"])
    torch.testing.assert_close(logits(load_model(f"merged/{row}"), batch), expected, atol=2e-4, rtol=1e-4)

    metrics = run_summary(rows_project / "results" / "train" / row)
    assert 0 < metrics["trainable_params"] <= metrics["total_params"]


# ----------------------------------------------------------------------------- adapter methods


@pytest.mark.parametrize("name", sorted(TINY_METHODS))
def test_adapter_method_lowers_the_loss(name, methods_project, probe, monkeypatch):
    monkeypatch.chdir(methods_project)
    tokenizer, encoded, _ = probe
    method = load_method(name)
    tag = f"method-{name}"
    cfg = build_config(method, ["--params", "params_methods.yaml", "--sequence", "one", "--steps_per_task", "12",
                                "--lr", str(TINY_LR.get(name, 1e-2)), "--eval_limit", "4",
                                "--output_dir", f"runs/{tag}", "--results_dir", f"results/train/{tag}",
                                "--work_dir", f"checkpoints/{tag}"])
    base_loss = response_loss(load_model("models/base"), encoded, tokenizer.pad_token_id)
    trainer = Trainer(method, cfg)
    trainer.run()
    trained_loss = response_loss(trainer.unwrapped, encoded, tokenizer.pad_token_id)
    assert trained_loss < base_loss - 0.1, f"{name}: loss {base_loss:.3f} -> {trained_loss:.3f}"
    metrics = run_summary(methods_project / "results" / "train" / tag)
    assert 0 < metrics["trainable_params"] < metrics["total_params"] == sum(p.numel() for p in load_model("models/base").parameters())
    assert metrics["chat_template"] is False  # the prompt format every score of the run used (tables check it)


def test_lorafa_trains_b_only(methods_project, monkeypatch):
    """LoRA-FA freezes A at its random init: A after training equals A at init."""
    monkeypatch.chdir(methods_project)
    method = load_method("lorafa")
    cfg = build_config(method, ["--params", "params_methods.yaml", "--sequence", "one", "--steps_per_task", "3",
                                "--eval_limit", "2", "--output_dir", "runs/fa", "--results_dir", "results/train/fa",
                                "--work_dir", "checkpoints/fa"])
    trainer = Trainer(method, cfg)
    before = {n: p.detach().clone() for n, p in trainer.unwrapped.named_parameters() if "lora_" in n}
    trainer.run()
    after = dict(trainer.unwrapped.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before if "lora_A" in n)
    assert any(not torch.equal(before[n], after[n]) for n in before if "lora_B" in n)
    a_params = sum(p.numel() for n, p in after.items() if "lora_A" in n)
    metrics = run_summary(methods_project / "results" / "train" / "fa")
    lora_total = sum(p.numel() for n, p in after.items() if "lora_" in n)
    assert metrics["trainable_params"] == lora_total - a_params


@pytest.mark.parametrize("name", sorted(TINY_METHODS))
def test_method_help_lists_its_params(name, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # the repository's params.yaml supplies the defaults
    with pytest.raises(SystemExit) as exit_info:
        build_config(load_method(name), ["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for key in list(TINY_METHODS[name]) + ["lr", "steps_per_task", "sequence"]:
        assert f"--{key}" in out, f"{name}: --{key} missing from --help"
    assert "Update rule" in out  # the script's docstring heads its help


def test_help_shows_the_method_override_as_default(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit):
        build_config(load_method("pissa"), ["--help"])
    lr_line = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("--lr"))
    assert "(default: 5e-05)" in lr_line, lr_line  # methods.pissa.lr, not train.lr


def test_response_only_loss_equals_the_models_own(methods_project, probe):
    from stages.core.batches import causal_lm_loss

    _, _, batch = probe
    model = load_model(methods_project / "models" / "base")
    with torch.no_grad():
        torch.testing.assert_close(causal_lm_loss(model, batch), model(**batch).loss, atol=1e-6, rtol=1e-6)


@pytest.fixture()
def fresh_accelerate_state():
    """accelerate keeps one process-wide state: a bf16 Trainer after fp32 ones needs it reset."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_bf16_training_scores_in_full_precision(methods_project, probe, monkeypatch, fresh_accelerate_state):
    """--mixed_precision bf16 trains under autocast, but lm-eval scores (and merges) the model in
    fp32: what is scored in training equals what the evaluate stage scores."""
    from stages.core.sft import mergeable_copy

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    monkeypatch.chdir(methods_project)
    _, encoded, batch = probe
    tokenizer = probe[0]
    method = load_method("lora")
    cfg = build_config(method, ["--params", "params_methods.yaml", "--sequence", "one", "--steps_per_task", "8",
                                "--lr", "1e-2", "--mixed_precision", "bf16", "--eval_limit", "2",
                                "--output_dir", "runs/bf16", "--results_dir", "results/train/bf16", "--work_dir", "checkpoints/bf16"])
    trainer = Trainer(method, cfg)
    before = response_loss(trainer.unwrapped, encoded, tokenizer.pad_token_id)
    trainer.train_task(0)
    assert response_loss(trainer.unwrapped, encoded, tokenizer.pad_token_id) < before - 0.1
    scored = logits(mergeable_copy(trainer.unwrapped), batch)
    reference = logits(copy_without_autocast(trainer.unwrapped).merge_and_unload(), batch)
    torch.testing.assert_close(scored, reference, atol=2e-5, rtol=1e-5)

    # A full-weight model prepared for bf16: the scored copy runs the fp32 forward, the original
    # keeps training under autocast.
    AcceleratorState._reset_state(reset_partial_state=True)
    full = Accelerator(mixed_precision="bf16").prepare(load_model("models/base"))
    plain = logits(load_model("models/base"), batch)
    assert not torch.allclose(logits(full, batch), plain, atol=1e-4)
    torch.testing.assert_close(logits(mergeable_copy(full), batch), plain, atol=0, rtol=0)
    assert not torch.allclose(logits(full, batch), plain, atol=1e-4)


def copy_without_autocast(model):
    """A deep copy of a prepared peft model with its class forward back (the reference)."""
    import copy

    clone = copy.deepcopy(model)
    clone.__dict__.pop("forward", None)
    clone.__dict__.pop("_original_forward", None)
    return clone


# ----------------------------------------------------------------------------- sequence settings, chat template

def sequence_params(project: Path, sequence) -> str:
    params = tiny_params(methods={"lora": dict(LORA, target_modules=TARGETS), "pissa": dict(TINY_METHODS["pissa"], lr=1e-3)},
                         sequences={"default": ["mc", "gen"], "s": sequence})
    write_params(project / "params_sequence.yaml", params)
    return "params_sequence.yaml"


def test_a_sequence_mapping_sets_its_tasks_and_settings_and_a_method_section_wins(methods_project, monkeypatch):
    monkeypatch.chdir(methods_project)
    params = sequence_params(methods_project, {"tasks": ["gen", "mc"], "steps_per_task": 3, "lr": 5e-3})
    lora = build_config(load_method("lora"), ["--params", params, "--sequence", "s"])
    assert (lora.tasks, lora.steps_per_task, lora.lr) == (["gen", "mc"], 3, 5e-3)
    assert build_config(load_method("pissa"), ["--params", params, "--sequence", "s"]).lr == 1e-3  # methods.pissa.lr
    assert build_config(load_method("lora"), ["--params", params, "--sequence", "s", "--lr", "7e-3"]).lr == 7e-3
    assert build_config(load_method("lora"), ["--params", params, "--sequence", "default"]).steps_per_task == TRAIN["steps_per_task"]


@pytest.mark.parametrize("sequence, message", [
    ({"tasks": ["mc"], "stepz_per_task": 3}, "sequences.s.stepz_per_task is not a known key: did you mean 'steps_per_task'?"),
    ({"steps_per_task": 3}, "sequences.s must be a non-empty list of task names or a mapping with 'tasks:'"),
    ([], "sequences.s must be a non-empty list"),
])
def test_a_bad_sequence_is_one_clear_error(sequence, message, methods_project, monkeypatch):
    monkeypatch.chdir(methods_project)
    params = sequence_params(methods_project, sequence)
    with pytest.raises(AdaptlabError, match=re.escape(message)):
        build_config(load_method("lora"), ["--params", params, "--sequence", "s"])


def test_chat_template_trains_on_the_assistant_turn_and_scores_through_the_template(methods_project, monkeypatch):
    """--chat_template: rows go through the tokenizer's chat template, the loss sees only the
    assistant turn (answer + end of turn), and the evaluator prompts the same way."""
    monkeypatch.chdir(methods_project)
    cfg = build_config(load_method("lora"), ["--params", "params_methods.yaml", "--sequence", "one", "--chat_template",
                                             "--steps_per_task", "2", "--eval_limit", "2", "--output_dir", "runs/chat",
                                             "--results_dir", "results/train/chat", "--work_dir", "checkpoints/chat"])
    trainer = Trainer(load_method("lora"), cfg)
    row, example = trainer.tasks[0].train[0], trainer.encoded[0][0]
    text = trainer.tokenizer.decode(example["input_ids"])
    learned = trainer.tokenizer.decode([t for t, label in zip(example["input_ids"], example["labels"]) if label != -100])
    assert "<|im_start|>user" in text and row["prompt"] in text
    assert learned == row["answer"] + trainer.tokenizer.eos_token
    assert trainer.evaluator.chat_template
    trainer.run()
    assert json.loads((methods_project / "runs" / "chat" / "train_config.json").read_text())["chat_template"] is True


# ----------------------------------------------------------------------------- ROUGE scoring

def test_rouge_task_scores_generations_with_rouge_score(tmp_path):
    """A task whose meta.json says metric rouge is scored by lm-eval with ROUGE-L F (the function
    copied beside the task YAML): the mean over rows of rouge_score's ROUGE-L of each
    generation's first line. The generations come from a stand-in lm-eval LM (the tiny random
    model writes punctuation, which ROUGE ignores)."""
    from stages.core.evaluation import Evaluator
    from stages.core.io import atomic_write_json, write_jsonl
    from stages.core.lm_eval_metrics import rouge_scores

    from lm_eval.api.model import LM
    from rouge_score import rouge_scorer

    assert rouge_scores({"answer": "the cat sat"}, ["the cat sat\nmore"]) == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    assert rouge_scores({"answer": "the cat sat"}, [""])["rougeL"] == 0.0
    answers = ["the plot was good", "a dull film indeed", "the cast shines", "nothing happens at all"]
    written = {f"Review {i}. Summary:": text for i, text in enumerate(
        ["the plot was good", "a dull film indeed\nsecond line", "cast", "something else entirely"])}

    class Writer(LM):
        def generate_until(self, requests):
            return [written[request.args[0]] for request in requests]

        def loglikelihood(self, requests):
            raise NotImplementedError

        def loglikelihood_rolling(self, requests):
            raise NotImplementedError

    rows = [{"id": f"s-{i}", "prompt": prompt, "answer": answer} for i, (prompt, answer) in enumerate(zip(written, answers))]
    task = tmp_path / "tasks" / "summ"
    write_jsonl(task / "train.jsonl", rows)
    write_jsonl(task / "test.jsonl", rows)
    atomic_write_json(task / "meta.json", {"name": "summ", "kind": "generate", "metric": "rouge", "source": "tests"})
    score = Evaluator(["summ"], tmp_path / "tasks")._run(Writer()).scores["summ"]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    expected = [scorer.score(answer, text.split("\n")[0])["rougeL"].fmeasure for answer, text in zip(answers, written.values())]
    assert expected[0] == expected[1] == 1.0 and 0 < expected[2] < 1 and expected[3] == 0
    assert score == pytest.approx(sum(expected) / len(expected), abs=1e-9)
