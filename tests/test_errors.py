"""Bad input ends a script with exit code 2 and one line on stderr, ``error: ...``, naming the bad
value, with no traceback and no output left behind.

Every case runs the real script in a throw-away workspace that uses the session project's data
and model. The cases are independent and each spends seconds importing torch, so they are all
run up front, a few at a time, and each test then checks one case's outcome."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import LORA, ROW, last_line, make_workspace, run_script, tiny_params

LORA_SCRIPT = "methods/lora4sft.py"


def damage_train_rows(damage: Callable[[list[str]], list[str]]) -> Callable[[Path, Path], None]:
    def prepare(workspace: Path, project: Path) -> None:
        path = workspace / "data" / "tasks" / "mc" / "train.jsonl"
        path.write_text("\n".join(damage(path.read_text().splitlines())) + "\n")
    return prepare


def truncated_model(workspace: Path, project: Path) -> None:
    """broken-model/: a copy of the base model whose model.safetensors lost its second half."""
    shutil.copytree(project / "models" / "base", workspace / "broken-model")
    weights = workspace / "broken-model" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:len(data) // 2])


def truncated_model_and_adapter(workspace: Path, project: Path) -> None:
    truncated_model(workspace, project)
    (workspace / "adapter").symlink_to(project / "runs" / ROW / "final", target_is_directory=True)


def link_encoder(workspace: Path, project: Path) -> None:
    """encoder/: the MiniLM-L6 encoder folder of its package (an encoder, not a causal LM)."""
    from stages.core.models import EMBEDDED_ENCODER, encoder_path

    (workspace / "encoder").symlink_to(encoder_path(EMBEDDED_ENCODER), target_is_directory=True)


def blocking_file(workspace: Path, project: Path) -> None:
    (workspace / "blocked").write_text("a file where --results_dir needs a folder\n")


def write_plan(workspace: Path) -> None:
    """plan.yaml of the workspace's params, as `make plan` writes it."""
    from stages.core.config import load_params

    from stages.plan import build_plan, dump

    (workspace / "plan.yaml").write_text(dump(build_plan(load_params(workspace / "params.yaml"))))


def corrupt_results(workspace: Path) -> None:
    """The default table's inputs, the LoRA run's cut off mid-write."""
    write_plan(workspace)
    runs = workspace / "results" / "tables" / "default" / "runs"
    runs.mkdir(parents=True)
    (runs / "base-default.json").write_text('{"kind": "base", "scores": {"mc": 0.5, "gen": 0.5}}')
    (runs / "lora-default-s0.json").write_text('{"kind": "run", "method": "lora", "AP": 0.5')


@dataclass
class Case:
    script: str
    args: tuple[str, ...]
    names: tuple[str, ...]  # what the error line must name
    params: dict | None = None  # replaces the workspace's params.yaml
    copy_data: bool = False  # the workspace gets its own copy of data/ (to damage it)
    prepare: Callable[[Path, Path], None] | None = None  # (workspace, project): damage something


CASES = {
    # methods/lora4sft.py: the command line and params.yaml
    "unknown-sequence": Case(LORA_SCRIPT, ("--sequence", "nope"), ("'nope'", "sequences")),
    "unknown-task-in-sequence": Case(LORA_SCRIPT, ("--sequence", "broken"), ("unknown task 'nope'", "gen, mc"),
                                     params=tiny_params(sequences={"default": ["mc", "gen"], "broken": ["mc", "nope"]})),
    "bad-parameter-type": Case(LORA_SCRIPT, ("--r", "abc"), ("--r", "'abc'")),
    "negative-lr": Case(LORA_SCRIPT, ("--lr", "-0.001"), ("--lr", "-0.001")),
    "unknown-flag": Case(LORA_SCRIPT, ("--bogus", "1"), ("--bogus",)),
    "missing-base-model": Case(LORA_SCRIPT, ("--base_model", "/nonexistent"), ("'/nonexistent'",)),
    "no-methods-section": Case(LORA_SCRIPT, (), ("methods.lora",), params=tiny_params(methods={"dora": {"r": 8}})),
    # params.yaml values are typed by their settings, and a section's keys are checked
    "params-value-of-wrong-type": Case(LORA_SCRIPT, (), ("methods.lora.r must be an integer, got 'abc'",),
                                       params=tiny_params(methods={"lora": dict(LORA, r="abc")})),
    "params-unknown-key": Case(LORA_SCRIPT, (), ("methods.lora.lora_alpah", "did you mean 'lora_alpha'"),
                               params=tiny_params(methods={"lora": {**LORA, "lora_alpah": 64}})),
    "decompose-unknown-arg": Case("stages/decompose.py", ("--method", "corda_kpa", "--out", "init/corda_kpa"),
                                  ("unrecognized arguments: --bogus 1",),
                                  params=tiny_params(methods={"lora": LORA, "corda_kpa": {
                                      "script": "corda4sft.py", "decompose": {"script": "build_corda.py",
                                                                              "args": {"r": 8, "bogus": 1}}}})),
    "encoder-as-base-model": Case(LORA_SCRIPT, ("--base_model", "encoder"),
                                  ("'encoder' is not a causal language model", "BertModel", "encoder4cls.py"),
                                  prepare=link_encoder),
    # an output folder that cannot be written: found before training, not at the end (as root too: sysfs
    # refuses new files to everyone)
    "results-dir-unwritable": Case(LORA_SCRIPT, ("--results_dir", "/sys/adaptlab-results"),
                                   ("--results_dir '/sys/adaptlab-results' cannot be written",)),
    "results-dir-under-a-file": Case(LORA_SCRIPT, ("--results_dir", "blocked/lora"), ("--results_dir 'blocked/lora'", "'blocked'"),
                                     prepare=blocking_file),
    # methods/lora4sft.py: the task data (every kind of bad row is covered in test_data.py; here:
    # the trainer reports it as one line too)
    "broken-json-row": Case(LORA_SCRIPT, (), ("data/tasks/mc/train.jsonl line 3", "not valid JSON"), copy_data=True,
                            prepare=damage_train_rows(lambda rows: rows[:2] + ['{"id": "mc-x", "prompt": "Rev'] + rows[3:])),
    # stages/evaluate.py and stages/merge.py
    "evaluate-truncated-model": Case("stages/evaluate.py", ("--model", "broken-model", "--out", "scores.json"),
                                     ("cannot load model 'broken-model'",), prepare=truncated_model),
    "merge-truncated-base-model": Case("stages/merge.py", ("--base_model", "broken-model", "--adapter", "adapter",
                                                           "--output_path", "merged-model"),
                                       ("cannot load model 'broken-model'",), prepare=truncated_model_and_adapter),
    # stages/plan.py, collect.py, tables.py and build_base.py
    "tables-without-plan": Case("stages/tables.py", ("--table", "default"), ("plan.yaml does not exist", "make plan")),
    "tables-unknown-table": Case("stages/tables.py", ("--table", "nope"), ("'nope'", "tables", "default")),
    "tables-missing-run": Case("stages/tables.py", ("--table", "default"),
                               ("results/tables/default/runs/base-default.json does not exist", "dvc repro"),
                               prepare=lambda ws, project: write_plan(ws)),
    "tables-corrupt-run": Case("stages/tables.py", ("--table", "default"), ("lora-default-s0.json: not valid JSON",),
                               prepare=lambda ws, project: corrupt_results(ws)),
    "plan-reference-not-a-row": Case("stages/plan.py", (), ("tables.default.reference 'dora'", "lora"),
                                     params=tiny_params(tables={"default": {"sequences": ["default"], "rows": ["lora"],
                                                                            "reference": "dora", "seeds": [0]}})),
    "plan-unknown-row": Case("stages/plan.py", (), ("'dora'", "methods"),
                             params=tiny_params(tables={"default": {"sequences": ["default"], "rows": ["lora", "dora"],
                                                                    "reference": "lora", "seeds": [0]}})),
    "plan-local-file-outside-data-local": Case("stages/plan.py", (), ("task 'mc'", "'elsewhere/mc.jsonl'", "data/local"),
                                               params=tiny_params(tasks={**tiny_params()["tasks"], "mc": {
                                                   "source": "jsonl", "train": "elsewhere/mc.jsonl", "test": "data/local/mc/test.jsonl",
                                                   "train_size": 100, "test_size": 20}})),
    "plan-missing-local-base-model": Case("stages/plan.py", (), ("base_model.source './no-such-model'", "not a folder"),
                                          params=tiny_params(base_model={"source": "./no-such-model", "path": "models/base"})),
    "collect-missing-run": Case("stages/collect.py", ("--inputs", "results/train/nope", "--out", "collected.json"),
                                ("results/train/nope does not exist",)),
    "build-base-missing-source": Case("stages/build_base.py", ("--source", "/nonexistent-model", "--out", "built"),
                                      ("'/nonexistent-model'",)),
    "build-base-from-an-encoder": Case("stages/build_base.py", ("--source", "encoder", "--out", "built"),
                                       ("'encoder' is not a causal language model", "BertModel"), prepare=link_encoder),
    "merge-missing-adapter": Case("stages/merge.py", ("--base_model", "models/base", "--adapter", "runs/nope/final",
                                                      "--output_path", "merged-model"), ("'runs/nope/final'",)),
}


def snapshot(folder: Path) -> list[str]:
    """Every path under ``folder`` (symlinked data and model folders are not entered)."""
    return sorted(str(Path(top, name).relative_to(folder)) for top, dirs, files in os.walk(folder) for name in dirs + files)


@dataclass
class Outcome:
    proc: subprocess.CompletedProcess
    workspace: Path
    before: list[str]  # the workspace's contents before the run


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, project, reference_run, script_env) -> dict[str, Outcome]:
    def run(name: str, case: Case) -> Outcome:
        workspace = make_workspace(tmp_path_factory.mktemp(name) / "ws", project, case.params, case.copy_data)
        if case.prepare:
            case.prepare(workspace, project)
        before = snapshot(workspace)
        return Outcome(run_script(case.script, *case.args, cwd=workspace, env=script_env), workspace, before)

    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {name: pool.submit(run, name, case) for name, case in CASES.items()}
    return {name: future.result() for name, future in futures.items()}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_fails_with_one_error_line_naming_it(outcomes, case):
    outcome = outcomes[case]
    stderr = outcome.proc.stderr
    assert outcome.proc.returncode == 2, f"exit {outcome.proc.returncode}\n{stderr[-3000:]}"
    line = last_line(stderr)
    assert line.startswith("error: "), stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    for name in CASES[case].names:
        assert name in line, f"{name!r} not named in: {line}"


@pytest.mark.parametrize("case", CASES)
def test_bad_input_leaves_no_output_behind(outcomes, case):
    outcome = outcomes[case]
    assert outcome.proc.returncode != 0
    assert snapshot(outcome.workspace) == outcome.before
