"""CIMEO (methods/cimeo.py, methods/cimeo4*.py, methods/build_cimeo_masks.py, stages/analysis).

SparseAdamW touches only the masked entries and equals AdamW on them; its state is |I|-sized and
round-trips; gradient-frequency masks pick the expected entries on crafted gradients; set overlaps
and principal angles have their textbook values; masks round-trip through the builder script;
through the core's Trainer on the tiny Llama both forms lower the loss over a two-task sequence
while every entry outside the task's mask stays bit for bit; the analyses write their files.
"""

from __future__ import annotations

import importlib.util
import io
import json
import math
from pathlib import Path
from types import SimpleNamespace

from methods import cimeo
from stages.core.errors import AdaptlabError

import pytest
import torch
from conftest import ROOT, tiny_params, write_params

TARGETS = list(cimeo.DEFAULT_TARGETS)
TINY_CIMEO = {"strategy": "max", "density": 0.1, "masks": "", "mask_batches": 2, "mask_batch_size": 8,
              "masked": "all", "dense": "none", "adam_eps": 1e-5, "target_modules": TARGETS}


def load_script(relative: str):
    path = ROOT / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_main(relative: str, argv: list[str], capsys=None) -> str:
    """A script's main() in-process; returns its stderr; SystemExit 2 (one-line error) is re-raised."""
    load_script(relative).main([str(a) for a in argv])
    return capsys.readouterr().err if capsys else ""


# ----------------------------------------------------------------------------- SparseAdamW

def masked_linear(seed: int = 0):
    torch.manual_seed(seed)
    layer = torch.nn.Linear(16, 12)
    index = torch.randperm(layer.weight.numel())[:30].sort().values
    return layer, index


def test_sparse_adamw_touches_only_the_mask_and_equals_adamw_there():
    layer, index = masked_linear()
    before = layer.weight.detach().clone()
    opt = cimeo.SparseAdamW([{"params": [layer.weight], "weight_decay": 0.1}, {"params": [layer.bias], "weight_decay": 0.0}],
                            masks={layer.weight: index}, lr=1e-2)
    # Reference: torch's AdamW on the gathered entries alone, fed the same gathered gradients.
    ref = torch.nn.Parameter(before.view(-1)[index].clone())
    ref_opt = torch.optim.AdamW([ref], lr=1e-2, weight_decay=0.1)
    x = torch.randn(32, 16)
    for step in range(5):
        loss = (layer(x + step) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        ref.grad = layer.weight.grad.view(-1)[index].clone()
        opt.step()
        ref_opt.step()
    outside = torch.ones(before.numel(), dtype=torch.bool)
    outside[index] = False
    assert torch.equal(layer.weight.detach().view(-1)[outside], before.view(-1)[outside])  # bit for bit
    assert bool((layer.weight.detach().view(-1)[index] != before.view(-1)[index]).all())
    torch.testing.assert_close(layer.weight.detach().view(-1)[index], ref.detach(), rtol=1e-6, atol=1e-7)
    # Moments: |I| per masked matrix, the full size for the dense bias.
    assert opt.state_numel() == 2 * (index.numel() + layer.bias.numel())
    assert opt.state[layer.weight]["exp_avg"].shape == (index.numel(),)


def test_sparse_adamw_state_dict_round_trip():
    def batches():
        g = torch.Generator().manual_seed(3)
        return [torch.randn(8, 16, generator=g) for _ in range(6)]

    def run(layer, opt, xs):
        for x in xs:
            opt.zero_grad()
            (layer(x) ** 2).mean().backward()
            opt.step()

    straight, index = masked_linear(1)
    run(straight, cimeo.SparseAdamW(straight.parameters(), masks={straight.weight: index}, lr=1e-2), batches())
    resumed, _ = masked_linear(1)
    first = cimeo.SparseAdamW(resumed.parameters(), masks={resumed.weight: index}, lr=1e-2)
    run(resumed, first, batches()[:3])
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    second = cimeo.SparseAdamW(resumed.parameters(), masks={resumed.weight: index}, lr=1e-2)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    second.load_state_dict(saved)
    run(resumed, second, batches()[3:])
    assert torch.equal(straight.weight, resumed.weight) and torch.equal(straight.bias, resumed.bias)
    other = cimeo.SparseAdamW(resumed.parameters(), masks={resumed.weight: index[:-1]}, lr=1e-2)
    with pytest.raises(AdaptlabError, match="other CIMEO masks"):
        other.load_state_dict(saved)


# ----------------------------------------------------------------------------- masks

class CraftedModel(torch.nn.Module):
    """loss = Σ W ⊙ C with C carried by the batch: ∂loss/∂W = C, exactly the crafted gradient."""

    def __init__(self, shape=(2, 5)):
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.Module()])
        self.layers[0].q_proj = torch.nn.Linear(shape[1], shape[0], bias=False)

    def forward(self, input_ids, attention_mask=None, labels=None):
        return SimpleNamespace(loss=(self.layers[0].q_proj.weight * input_ids).sum())


def crafted_batches(grads: list[list[float]]) -> list[dict]:
    return [{"input_ids": torch.tensor(g).view(2, 5), "attention_mask": torch.ones(1), "labels": torch.zeros(1)} for g in grads]


def test_max_and_min_masks_on_crafted_gradients():
    # density 0.2 of 10 entries: 2 per batch, 2 kept. Signs must not matter (|grad|).
    grads = [[9, -8, 1, 1, 1, 1, 1, 1, 0.5, 0.1],
             [-9, 1, 8, 1, 1, 1, 1, 1, 0.1, 0.5],
             [9, 1, 1, -12, 1, 1, 1, 1, 0.5, 0.1]]
    model = CraftedModel()
    before = model.layers[0].q_proj.weight.detach().clone()
    top = cimeo.gradient_masks(model, crafted_batches(grads), "max", 0.2, ["q_proj"])["layers.0.q_proj.weight"]
    # entry 0 is in the top 2 three times; 1, 2, 3 once each: the tie goes to the largest summed
    # |grad| (3: 14, against 10 and 10).
    assert top.tolist() == [0, 3]
    bottom = cimeo.gradient_masks(model, crafted_batches(grads), "min", 0.2, ["q_proj"])["layers.0.q_proj.weight"]
    # entries 8 and 9 are the bottom two every time.
    assert bottom.tolist() == [8, 9]
    assert torch.equal(model.layers[0].q_proj.weight, before) and model.layers[0].q_proj.weight.grad is None
    rand = cimeo.gradient_masks(model, [], "random", 0.2, ["q_proj"], seed=1, task="t")["layers.0.q_proj.weight"]
    assert rand.numel() == 2 and rand.unique().numel() == 2


def test_overlap_is_a_set_overlap():
    shapes = {"layers.0.q_proj.weight": (256, 256), "layers.1.q_proj.weight": (256, 128)}
    a = cimeo.random_masks(shapes, 0.1, seed=0, task="a")
    b = cimeo.random_masks(shapes, 0.1, seed=0, task="b")
    assert cimeo.overall_overlap(a, a) == 1.0
    assert set(cimeo.layer_overlap(a, a).values()) == {1.0}
    assert abs(cimeo.overall_overlap(a, b) - 0.1) < 0.01  # independent random masks: ≈ density
    # Order does not matter: a permuted copy overlaps fully (a position-by-position count would not).
    name = "layers.0.q_proj.weight"
    shuffled = {**a, name: a[name][torch.randperm(a[name].numel())]}
    assert cimeo.overall_overlap(shuffled, a) == 1.0
    small_a, small_b = torch.tensor([1, 5, 7, 9]), torch.tensor([0, 5, 9, 11, 12])
    assert cimeo.set_overlap(small_a, small_b) == (2, 4)


def test_principal_angles():
    eye = torch.eye(6, dtype=torch.float64)
    assert float(cimeo.principal_angles(eye[:, :2], eye[:, :2]).max()) < 1e-6
    torch.testing.assert_close(cimeo.principal_angles(eye[:, :2], eye[:, 2:4]), torch.full((2,), 90.0, dtype=torch.float64))
    a = math.radians(30)
    tilted = torch.stack([eye[:, 0] * math.cos(a) + eye[:, 1] * math.sin(a), eye[:, 2]], 1)
    torch.testing.assert_close(cimeo.principal_angles(eye[:, [0, 2]], tilted),
                               torch.tensor([0.0, 30.0], dtype=torch.float64), atol=1e-6, rtol=0)
    w = torch.randn(40, 24, generator=torch.Generator().manual_seed(0))
    same = cimeo.subspace_metrics(w, w.clone(), (8,))[8]
    assert same["max_angle"] < 1e-3 and same["overlap"] == pytest.approx(1.0)
    assert same["energy_ratio"] == pytest.approx(same["base_energy_ratio"])
    moved = cimeo.subspace_metrics(w, w + torch.randn(40, 24, generator=torch.Generator().manual_seed(1)), (8,))[8]
    assert moved["max_angle"] > 1.0 and moved["overlap"] < 1.0


# ----------------------------------------------------------------------------- encodings

def test_pretrain_encode_labels_every_token_and_sft_masks_the_prompt(tiny_base):
    from stages.core.batches import IGNORE_INDEX
    from stages.core.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_base)
    row = {"prompt": "Q: What colour is the ripe banana?\nA:", "answer": "yellow"}
    plain = cimeo.encode_pretrain(row, tokenizer, 64)
    assert plain["labels"] == plain["input_ids"]
    assert tokenizer.decode(plain["input_ids"]) == row["prompt"] + " " + row["answer"] + tokenizer.eos_token
    chat = cimeo.encode_chat(row, tokenizer, 64)
    n_prompt = sum(label == IGNORE_INDEX for label in chat["labels"])
    assert chat["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt and IGNORE_INDEX not in chat["labels"][n_prompt:]
    assert tokenizer.decode(chat["input_ids"][n_prompt:]) == "yellow" + tokenizer.eos_token
    assert row["prompt"] in tokenizer.decode(chat["input_ids"][:n_prompt])
    assert tokenizer.decode(chat["input_ids"][:n_prompt]).endswith("assistant\n")
    short = cimeo.encode_chat(row, tokenizer, 8)  # the prompt is cut from the left, the answer kept
    learned = [t for t, label in zip(short["input_ids"], short["labels"]) if label != IGNORE_INDEX]
    assert len(short["input_ids"]) == 8 and tokenizer.decode(learned) == "yellow" + tokenizer.eos_token


# ----------------------------------------------------------------------------- the builder script

@pytest.fixture(scope="module")
def built_masks(project, tmp_path_factory):
    out = tmp_path_factory.mktemp("cimeo-masks") / "masks"
    load_script("methods/build_cimeo_masks.py").main(
        ["--params", str(project / "params.yaml"), "--model_id", str(project / "models" / "base"),
         "--tasks_dir", str(project / "data" / "tasks"), "--sequence", "default", "--batches", "2",
         "--batch_size", "8", "--objective", "pretrain", "--max_length", "64", "--out_dir", str(out)])
    return out


def test_masks_round_trip_through_the_builder(built_masks, project):
    from stages.core.batches import encode_rows
    from stages.core.models import load_model, load_tokenizer
    from stages.core.tasks import load_task

    meta = json.loads((built_masks / "masks.json").read_text())
    assert list(meta["tasks"]) == ["mc", "gen"] and meta["strategy"] == "max" and meta["objective"] == "pretrain"
    model, tokenizer = load_model(project / "models" / "base"), load_tokenizer(project / "models" / "base")
    weights = cimeo.masked_parameters(model)
    shapes = {n: w.shape for n, w in weights.items()}
    loaded = cimeo.load_task_masks(built_masks, "mc", shapes, cimeo.model_fingerprint(model))
    rows = encode_rows(load_task("mc", project / "data" / "tasks").train, tokenizer, 64, "mc", cimeo.encode_pretrain)
    direct = cimeo.gradient_masks(model, cimeo.mask_batches(rows, tokenizer.pad_token_id, 8, 2), "max", 0.1)
    assert set(loaded) == set(weights) and all(torch.equal(loaded[n], direct[n]) for n in direct)
    assert all(loaded[n].numel() == cimeo.keep_count(weights[n].numel(), 0.1) for n in weights)
    # As the authors' code: every parameter but the embedding / LM head is masked, the norms too,
    # each to floor(0.1 x size) entries (int(0.1 * numel)).
    hidden = model.config.hidden_size
    assert "model.embed_tokens.weight" not in loaded and "lm_head.weight" not in loaded
    assert {"model.norm.weight", "model.layers.0.input_layernorm.weight", "model.layers.1.self_attn.q_proj.weight"} <= set(loaded)
    assert loaded["model.norm.weight"].numel() == int(0.1 * hidden) == cimeo.keep_count(hidden, 0.1)
    assert set(cimeo.masked_parameters(model, masked="matrices")) == set(cimeo.target_weights(model))
    with pytest.raises(AdaptlabError, match="another model"):
        cimeo.load_task_masks(built_masks, "mc", shapes, "0" * 20)
    with pytest.raises(AdaptlabError, match="no CIMEO mask for task 'nope'"):
        cimeo.load_task_masks(built_masks, "nope", shapes)


@pytest.mark.parametrize("flag, value, message", [("--strategy", "top", "--strategy 'top' is not valid"),
                                                  ("--density", "0", "--density must be in"),
                                                  ("--objective", "chat", "--objective 'chat' is not valid")])
def test_builder_rejects_bad_values_in_one_line(flag, value, message, project, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_script("methods/build_cimeo_masks.py").main(
            ["--params", str(project / "params.yaml"), "--tasks", "mc", flag, value, "--out_dir", str(tmp_path / "m")])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.startswith("error:") and message in err and "\n" not in err
    assert not (tmp_path / "m").exists()


# ----------------------------------------------------------------------------- through the Trainer

@pytest.fixture(scope="module")
def cimeo_project(project):
    methods = {"cimeo": dict(TINY_CIMEO, objective="sft"),
               "cimeo_pretrain": dict(TINY_CIMEO, script="cimeo4sft.py", objective="pretrain", masked="matrices", dense="all")}
    write_params(project / "params_cimeo.yaml", tiny_params(methods=methods, sequences={"default": ["mc", "gen"]}))
    return project


def trainer_for(name: str, project: Path, monkeypatch, *extra: str):
    from stages.core.sft import Trainer, build_config

    monkeypatch.chdir(project)
    method = load_script("methods/cimeo4sft.py").METHOD  # both forms: --method picks the section, its objective the form
    cfg = build_config(method, ["--params", "params_cimeo.yaml", "--method", name, "--sequence", "default", "--eval_limit", "2",
                                "--output_dir", f"runs/{name}-t", "--results_dir", f"results/{name}-t",
                                "--work_dir", f"checkpoints/{name}-t", "--lr", "3e-2", "--steps_per_task", "6",
                                "--batch_size", "8", "--checkpoint_every", "100", "--mixed_precision", "no", *extra])
    return Trainer(method, cfg)


def weights_of(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name, extra", [("cimeo", ["--chat_template"]), ("cimeo_pretrain", ["--masks", "MATRICES"])])
def test_trainer_learns_on_the_mask_and_nowhere_else(name, extra, cimeo_project, matrix_masks, monkeypatch):
    from stages.core.batches import response_loss

    extra = [str(matrix_masks) if e == "MATRICES" else e for e in extra]
    trainer = trainer_for(name, cimeo_project, monkeypatch, *extra)
    model, pad = trainer.unwrapped, trainer.tokenizer.pad_token_id
    targets = cimeo.masked_parameters(model, TARGETS, trainer.cfg.masked)
    assert ("model.norm.weight" in targets) == (trainer.cfg.masked == "all")
    folder = trainer.context.cimeo["folder"]
    assert (Path(folder) == matrix_masks) == (name == "cimeo_pretrain")
    for index in range(2):
        rows = trainer.encoded[index][:16]
        start, loss_before = weights_of(model), response_loss(model, rows, pad)
        history = trainer.train_task(index)
        loss_after = response_loss(model, rows, pad)
        assert loss_after < loss_before - 0.05, f"{name} task {index}: {loss_before:.3f} -> {loss_after:.3f}"
        assert all(math.isfinite(loss) for _, loss in history["loss"])
        task = trainer.tasks[index].name
        masks = cimeo.load_task_masks(folder, task)
        for weight_name, weight in targets.items():
            flat, old = weight.detach().view(-1), start[weight_name].view(-1)
            outside = torch.ones_like(flat, dtype=torch.bool)
            outside[masks[weight_name]] = False
            assert torch.equal(flat[outside], old[outside]), f"{weight_name} changed outside the mask of {task}"
            assert (flat[masks[weight_name]] != old[masks[weight_name]]).float().mean() > 0.5
        now = weights_of(model)
        for dense_name in ("model.embed_tokens.weight", "model.norm.weight"):
            if dense_name not in targets:  # not masked: trained densely or frozen by --dense
                assert (not torch.equal(now[dense_name], start[dense_name])) == (trainer.cfg.dense == "all"), dense_name
    # The two tasks' masks are different sets.
    assert cimeo.overall_overlap(cimeo.load_task_masks(folder, "mc"), cimeo.load_task_masks(folder, "gen")) < 0.9
    # What the run can change: the union of the tasks' masked entries plus what trains densely,
    # not every parameter that requires grad (the masked tensors do, whole).
    union = sum(int(torch.unique(torch.cat([cimeo.load_task_masks(folder, t)[n] for t in ("mc", "gen")])).numel())
                for n in targets)
    dense = sum(p.numel() for n, p in model.named_parameters() if n not in targets and p.requires_grad)
    assert trainer.trainable == union + dense < sum(p.numel() for p in model.parameters())
    assert trainer.total == sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def matrix_masks(project, tmp_path_factory):
    """Masks of the pretraining form on the target matrices only (--masked matrices)."""
    out = tmp_path_factory.mktemp("cimeo-matrix-masks") / "masks"
    load_script("methods/build_cimeo_masks.py").main(
        ["--params", str(project / "params.yaml"), "--model_id", str(project / "models" / "base"),
         "--tasks_dir", str(project / "data" / "tasks"), "--sequence", "default", "--batches", "2",
         "--batch_size", "8", "--objective", "pretrain", "--masked", "matrices", "--max_length", "64", "--out_dir", str(out)])
    return out


def test_sft_form_trains_in_the_sequence_prompt_format(cimeo_project, monkeypatch):
    """The SFT form learns the answer in the run's prompt format, like every other row of its
    table: the chat template's assistant turn on a chat sequence, the plain prompt's answer on a
    plain one; the pretraining form (every token of the plain text) has no chat form."""
    from stages.core.batches import IGNORE_INDEX

    for flag, chat in (("--chat_template", True), ("--no-chat_template", False)):
        trainer = trainer_for("cimeo", cimeo_project, monkeypatch, flag)
        row, encoded = trainer.tasks[0].train[0], trainer.encoded[0][0]
        text = trainer.tokenizer.decode(encoded["input_ids"])
        assert ("<|im_start|>" in text) == chat and row["prompt"] in text
        learned = [t for t, label in zip(encoded["input_ids"], encoded["labels"]) if label != IGNORE_INDEX]
        assert row["answer"] in trainer.tokenizer.decode(learned)
        assert read_masks_setting(trainer, "chat_template") is chat  # the in-process masks were ranked on it
    with pytest.raises(AdaptlabError, match="does not fit CIMEO's pretrain form"):
        trainer_for("cimeo_pretrain", cimeo_project, monkeypatch, "--chat_template")


def read_masks_setting(trainer, key: str):
    return cimeo.read_masks_meta(trainer.context.cimeo["folder"])[key]


def test_trainer_refuses_masks_of_another_objective_format_or_set(cimeo_project, built_masks, matrix_masks, monkeypatch):
    with pytest.raises(AdaptlabError, match="objective pretrain but this run uses sft"):
        trainer_for("cimeo", cimeo_project, monkeypatch, "--masks", str(built_masks))
    with pytest.raises(AdaptlabError, match="masked matrices but this run uses all"):
        trainer_for("cimeo_pretrain", cimeo_project, monkeypatch, "--masked", "all", "--masks", str(matrix_masks))
    chat_masks = built_masks.parent / "chat"
    load_script("methods/build_cimeo_masks.py").main(
        ["--params", str(cimeo_project / "params_cimeo.yaml"), "--method", "cimeo", "--model_id", str(cimeo_project / "models" / "base"),
         "--tasks_dir", str(cimeo_project / "data" / "tasks"), "--sequence", "default", "--chat_template", "--out_dir", str(chat_masks)])
    with pytest.raises(AdaptlabError, match="chat_template True but this run uses False"):
        trainer_for("cimeo", cimeo_project, monkeypatch, "--no-chat_template", "--masks", str(chat_masks))


# ----------------------------------------------------------------------------- analyses

def test_analyses_write_markdown_and_png(built_masks, project, tmp_path, capsys):
    from stages.core.models import load_model

    out = tmp_path / "results"
    run_main("stages/analysis/overlap_count.py", ["--masks", built_masks, "--out_dir", out, "--labels", "MC", "GEN"])
    run_main("stages/analysis/overlap_count_by_layer.py", ["--masks", built_masks, "--out_dir", out])
    run_main("stages/analysis/overlap_count_by_layer_by_cognition.py", ["--masks", built_masks, "--pair", "mc", "gen", "--out_dir", out])
    tuned = load_model(project / "models" / "base")
    with torch.no_grad():
        tuned.model.layers[1].self_attn.q_proj.weight.add_(0.05 * torch.randn_like(tuned.model.layers[1].self_attn.q_proj.weight))
    tuned.save_pretrained(tmp_path / "tuned")
    run_main("stages/analysis/singular_value_plot.py", ["--base", project / "models" / "base", "--tuned", tmp_path / "tuned",
                                                        "--ks", "4", "8", "--out_dir", out])
    for stem in ("overlap_count", "overlap_count_by_layer", "overlap_count_by_layer_mc__gen", "principal_angles_q_proj"):
        assert (out / f"{stem}.png").read_bytes()[:4] == b"\x89PNG", stem
        assert "|---" in (out / f"{stem}.md").read_text(), stem
    matrix = json.loads((out / "overlap_count.json").read_text())
    assert matrix["matrix"][0][0] == 1.0 and matrix["random_expectation"] == 0.1 and "MC" in (out / "overlap_count.md").read_text()
    angles = json.loads((out / "principal_angles_q_proj.json").read_text())["layers"]
    assert angles["0"]["8"]["max_angle"] < 1e-3 < angles["1"]["8"]["max_angle"]  # only layer 1 was changed
    with pytest.raises(SystemExit):
        run_main("stages/analysis/overlap_count_by_layer_by_cognition.py", ["--masks", built_masks, "--pair", "mc", "zz", "--out_dir", out])
    assert "no CIMEO mask for task 'zz'" in capsys.readouterr().err
