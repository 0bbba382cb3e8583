"""Robustness: a diverging run, a full disk, a method the model cannot take, interruptions of
training, merging and scoring (SIGINT and SIGKILL at a chosen point), and fuzzed task rows and
command-line values. Each ends in one ``error:`` line and a non-zero exit, with nothing published
that DVC could cache. (Bad input per stage: test_errors.py and test_data.py; kill and resume with
identical results, which is also the determinism check: test_resume.py.)"""

from __future__ import annotations

import dataclasses
import errno
import json
import random
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from stages.core.errors import AdaptlabError

import pytest
import torch
from conftest import (
    LORA,
    PYTHON,
    ROOT,
    ROW,
    TRAIN,
    check,
    last_line,
    make_workspace,
    run_dirs,
    run_script,
    run_summary,
    tiny_params,
    train_args,
)
from test_methods import load_method


def run_main(method, argv: list[str], capsys) -> tuple[int, str]:
    """A method script's entry point in this process: (exit code, stderr)."""
    from stages.core.sft import main

    with pytest.raises(SystemExit) as exit_info:
        main(method, argv)
    return exit_info.value.code, capsys.readouterr().err


def assert_one_error_line(stderr: str, *names: str) -> None:
    line = last_line(stderr)
    assert line.startswith("error: ") and "Traceback" not in stderr, stderr[-2000:]
    for name in names:
        assert name in line, f"{name!r} not in: {line}"


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("bad_loss", [float("nan"), 1e6])
def test_a_diverging_run_stops_at_its_step_and_keeps_the_last_checkpoint(project, tmp_path, monkeypatch, capsys, bad_loss):
    """Step 6 of task 1 returns NaN (or a loss 10⁶, far over 10× the first step's): the run stops
    with the step named, the checkpoint of step 4 stays for a resume, nothing is published."""
    from stages.core.sft import first_order_step

    lora = load_method("lora")
    calls = []

    def step(inputs):
        calls.append(1)
        loss = first_order_step(inputs)
        return bad_loss if len(calls) == 6 else loss

    workspace = make_workspace(tmp_path / "ws", project)
    monkeypatch.chdir(workspace)
    code, err = run_main(dataclasses.replace(lora, train_step=step), train_args("diverge", "--checkpoint_every", "4"), capsys)
    assert code == 2
    assert_one_error_line(err, "training diverged", f"loss {bad_loss:.4g} at step 6 of task 'mc'", "checkpoint is kept")
    run = run_dirs(workspace, "diverge")
    (state,) = run.work_dir.glob("*/state/state.pt")
    assert torch.load(state, weights_only=False)["step"] == 4
    assert not run.output_dir.exists() and not run.results_dir.exists()


def test_a_full_disk_on_save_is_one_line_and_publishes_nothing(project, tmp_path, monkeypatch, capsys):
    """Saving task 1's weights hits ENOSPC: exit 1, one line naming the file, no output folders
    and no temporary folder left beside the task's checkpoint."""
    import stages.core.sft as sft

    def full_disk(tensors, filename, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(filename))

    monkeypatch.setattr(sft, "save_file", full_disk)
    workspace = make_workspace(tmp_path / "ws", project)
    monkeypatch.chdir(workspace)
    code, err = run_main(load_method("lora"), train_args("full"), capsys)
    assert code == 1
    assert_one_error_line(err, "disk full writing", "tuned.safetensors", "No space left on device")
    run = run_dirs(workspace, "full")
    assert not run.output_dir.exists() and not run.results_dir.exists()
    assert not list(run.work_dir.glob("*/.*.tmp")) and not list(run.work_dir.glob("*/task0"))


def test_a_method_the_model_cannot_take_is_one_error_line(project, tmp_path, monkeypatch, capsys):
    """RoAd pairs outputs within groups: a group size that does not divide q_proj's 64 outputs."""
    road = {"variant": "road_1", "group_size": 48, "target_modules": ["q_proj"], "lr": 1e-3}
    workspace = make_workspace(tmp_path / "ws", project, tiny_params(methods={"road": road}))
    monkeypatch.chdir(workspace)
    code, err = run_main(load_method("road"), train_args("road"), capsys)
    assert code == 2
    assert_one_error_line(err, "method 'road' cannot be applied to 'models/base'", "group_size (48)")
    assert not (workspace / "runs").exists()


def test_a_prompt_longer_than_the_context_is_cut_from_the_left_and_a_long_answer_is_an_error(project):
    """The answer is what is learned: a prompt too long for max_length loses its start; an answer
    that alone fills the context is one error naming the row."""
    from stages.core.batches import IGNORE_INDEX, encode_example
    from stages.core.models import load_tokenizer

    tokenizer = load_tokenizer(project / "models" / "base")
    row = {"id": "long", "prompt": "the plot was superb and " * 40 + "Sentiment:", "answer": "positive"}
    encoded = encode_example(row, tokenizer, 32, "task 'mc' row long")
    assert len(encoded["input_ids"]) == len(encoded["labels"]) == 32
    learned = [token for token, label in zip(encoded["input_ids"], encoded["labels"]) if label != IGNORE_INDEX]
    assert learned[-1] == tokenizer.eos_token_id and tokenizer.decode(learned[:-1]).strip() == "positive"
    assert tokenizer.decode(encoded["input_ids"]).removesuffix(tokenizer.eos_token).endswith("Sentiment: positive")
    with pytest.raises(AdaptlabError, match=r"task 'mc' row long: answer is \d+ tokens, longer than max_length 32"):
        encode_example({**row, "answer": "positive " * 39 + "positive"}, tokenizer, 32, "task 'mc' row long")


# ----------------------------------------------------------------------------- one writer, room to write


def test_a_second_run_on_a_folder_in_use_stops_at_once_naming_the_first(project, tmp_path, script_env):
    """Two runs on one output folder: the first, paused mid-training (tests/pause_in.py), holds its
    folders; a second with the same --output_dir (its other folders its own) exits 2 at once, with
    one line naming the first's pid, and writes nothing. SIGKILLed, the first leaves its lock file
    but not its lock: the same command then takes it over and resumes the first's checkpoint."""
    workspace = make_workspace(tmp_path / "ws", project)
    command = ["methods/lora4sft.py", *train_args("shared", "--checkpoint_every", "4")]
    first = subprocess.Popen([PYTHON, ROOT / "tests" / "pause_in.py", "stages.core.sft:Trainer._save_state", *command],
                             cwd=workspace, env=script_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert any(line.strip() == "PAUSED" for line in first.stdout), first.stderr.read()[-3000:]
        second = run_script("methods/lora4sft.py", "--params", "params.yaml", "--output_dir", "runs/shared",
                            "--results_dir", "results/train/other", "--work_dir", "checkpoints/other", cwd=workspace, env=script_env)
        assert second.returncode == 2, second.stderr[-3000:]
        assert_one_error_line(second.stderr, "--output_dir 'runs/shared' is in use by another run", f"pid {first.pid} (lora4sft.py")
        assert not (workspace / "results" / "train" / "other").exists() and not (workspace / "checkpoints" / "other").exists()
    finally:
        first.kill()
        first.communicate()
    assert (workspace / "runs" / ".shared.lock").is_file()  # what SIGKILL leaves: the file, not the lock
    proc = check(run_script(*command, cwd=workspace, env=script_env))
    assert "resumed task 1 from step 4" in proc.stdout + proc.stderr
    assert not list(workspace.rglob(".*.lock"))  # a run that ends removes its lock files


def test_too_little_disk_space_is_one_line_before_training(project, tmp_path, monkeypatch, capsys):
    """1 MB free where the run writes its checkpoints and models: one line with what is free and
    what the run needs, before the first step, and nothing left behind."""
    import stages.core.outputs as outputs
    from stages.core.sft import Trainer

    def full(path):
        return shutil._ntuple_diskusage(10**12, 10**12 - 2**20, 2**20)

    def no_training(*args):
        raise AssertionError("training started")

    monkeypatch.setattr(outputs.shutil, "disk_usage", full)
    monkeypatch.setattr(Trainer, "train_task", no_training)
    workspace = make_workspace(tmp_path / "ws", project)
    monkeypatch.chdir(workspace)
    code, err = run_main(load_method("lora"), train_args("space"), capsys)
    assert code == 2
    assert_one_error_line(err, "not enough disk space", "1.0 MB free", "--output_dir runs/space", "--work_dir checkpoints/space",
                          "MB there")
    assert sorted(p.name for p in workspace.iterdir()) == ["data", "models", "params.yaml"]


FULL_WEIGHT_ROWS = {"mezo": "mezo", "galore": "galore", "adarankgrad": "adarankgrad", "adalomo": "adalomo", "cimeo": "cimeo",
                    "cimeo_pretrain": "cimeo", "gorp": "gorp", "o_lora": "o_lora"}


@pytest.mark.parametrize("row", FULL_WEIGHT_ROWS)
def test_full_weight_rows_keep_only_the_final_model_by_default(row):
    """Rows whose model is the full weights (~540 MB a copy for SmolLM2) keep the final model only
    (save_every_task false in their params section); adapter rows keep one per task."""
    from stages.core.sft import build_config

    params = str(ROOT / "params.yaml")
    assert build_config(load_method(FULL_WEIGHT_ROWS[row]), ["--params", params, "--method", row]).save_every_task is False
    assert build_config(load_method("lora"), ["--params", params]).save_every_task is True


# ----------------------------------------------------------------------------- interruptions

# stage -> (the point to pause at, the script and its arguments, the output it must not publish)
STAGES = {
    "train": ("stages.core.sft:Trainer._save_state", ["methods/lora4sft.py", *train_args("cut", "--checkpoint_every", "4")],
              ["runs/cut", "results/train/cut"]),
    "merge": ("stages.core.io:atomic_dir",
              ["stages/merge.py", "--base_model", "models/base", "--adapter", "adapter", "--output_path", "merged/cut"],
              ["merged/cut"]),
    "evaluate": ("stages.core.evaluation:Evaluator.score",
                 ["stages/evaluate.py", "--model", "models/base", "--sequence", "default", "--out", "results/base/cut.json"],
                 ["results/base/cut.json"]),
}
CASES = [(stage, sig) for stage in STAGES for sig in ("SIGINT", "SIGKILL")]


def process_state(pid: int) -> str:
    """What a process that should have exited is doing: its signal masks (is SIGINT ignored,
    blocked, caught?) and each thread's name, state and the kernel function it waits in."""
    proc = Path(f"/proc/{pid}")
    try:
        lines = [line for line in (proc / "status").read_text().splitlines() if line.startswith(("State", "Threads", "Sig", "Shd"))]
        for task in sorted((proc / "task").iterdir()):
            stat = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
            lines.append(f"thread {task.name} {(task / 'comm').read_text().strip()}: {stat} in {(task / 'wchan').read_text() or '-'}")
        mine = Path("/proc/self/status").read_text().splitlines()
        lines += [f"test process {line}" for line in mine if line.startswith(("SigIgn", "SigCgt"))]
    except OSError as err:
        lines = [f"cannot read /proc/{pid}: {err}"]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, project, reference_run, script_env) -> dict:
    """Every (stage, signal) case run at once, three at a time: each stage is started under
    tests/pause_in.py, and the signal sent once it reports PAUSED. stderr goes to a file, not a
    pipe nobody reads until the end (a chatty stage would fill it and block before pausing). A case
    still running 300 s after its signal is killed and reported with what it was doing."""
    def run(case):
        stage, sig = case
        point, command, _ = STAGES[stage]
        workspace = make_workspace(tmp_path_factory.mktemp(f"{stage}-{sig}") / "ws", project)
        (workspace / "adapter").symlink_to(project / "runs" / ROW / "final", target_is_directory=True)
        log = workspace.parent / "stderr.txt"
        with open(log, "w") as err:
            proc = subprocess.Popen([PYTHON, ROOT / "tests" / "pause_in.py", point, *command], cwd=workspace, env=script_env,
                                    stdout=subprocess.PIPE, stderr=err, text=True)
            paused = False
            for line in proc.stdout:
                if line.strip() == "PAUSED":
                    paused = True
                    proc.send_signal(getattr(signal, sig))
                    break
            hung = None
            try:
                proc.communicate(timeout=300)
            except subprocess.TimeoutExpired:
                hung = process_state(proc.pid)
                proc.kill()
                proc.communicate()
        return case, workspace, paused, proc.returncode, log.read_text(), hung

    with ThreadPoolExecutor(max_workers=3) as pool:
        return {case: outcome for case, *outcome in pool.map(run, CASES)}


@pytest.mark.parametrize("stage, sig", CASES)
def test_an_interrupted_stage_exits_non_zero_and_publishes_nothing(interrupted, stage, sig):
    workspace, paused, code, stderr, hung = interrupted[(stage, sig)]
    assert paused, stderr[-3000:]
    assert hung is None, f"still running 300 s after {sig}:\n{hung}\n{stderr[-3000:]}"
    if sig == "SIGINT":
        assert code == 130, stderr[-3000:]
        assert_one_error_line(stderr, "interrupted")
    else:
        assert code == -signal.SIGKILL
    for output in STAGES[stage][2]:
        assert not (workspace / output).exists(), output
    published = [p for p in workspace.rglob("cut*") if "checkpoints" not in p.relative_to(workspace).parts]
    assert published == [], published


def test_a_stage_run_again_after_sigkill_finishes_and_clears_the_leftovers(interrupted, script_env):
    """SIGKILL leaves the temporary folders of the writes it cut short (never the output itself);
    the next run of the stage removes them: merge, and training, which resumes its checkpoint."""
    merge_ws = interrupted[("merge", "SIGKILL")][0]
    assert list((merge_ws / "merged").glob(".cut.*.tmp"))  # what the kill left
    check(run_script(*STAGES["merge"][1], cwd=merge_ws, env=script_env))
    assert (merge_ws / "merged" / "cut" / "config.json").is_file()
    assert not list((merge_ws / "merged").glob(".cut.*"))

    train_ws = interrupted[("train", "SIGINT")][0]
    proc = check(run_script(*STAGES["train"][1], cwd=train_ws, env=script_env))
    assert "resumed task 1 from step 4" in proc.stdout + proc.stderr
    assert run_summary(train_ws / "results" / "train" / "cut")["tasks"] == ["mc", "gen"]


# ----------------------------------------------------------------------------- fuzzing

VALID_MC = {"id": "mc-1", "prompt": "Review: the plot was superb.\nSentiment:", "answer": "positive",
            "choices": ["negative", "positive"], "label": 1}
VALID_GEN = {"id": "gen-1", "prompt": "Q: What colour is the lime?\nA:", "answer": "green"}
JUNK = [None, 0, -3, 2.5, float("nan"), True, [], ["x"], {}, {"a": 1}, "", " ", "\t", "x" * 3]


def malformed(rng: random.Random, kind: str) -> bytes:
    """One JSONL line that is invalid for ``kind``, by one random kind of damage."""
    row = dict(VALID_MC if kind == "multiple_choice" else VALID_GEN)
    damage = rng.choice(["truncate", "drop", "retype", "label", "choices", "not-object", "bytes", "whitespace", "extra"])
    if damage == "truncate":
        text = json.dumps(row)
        return text[:rng.randrange(1, len(text) - 1)].encode()
    if damage == "drop":
        row.pop(rng.choice([k for k in row if kind == "multiple_choice" or k not in ("choices", "label")]))
    elif damage == "retype":
        row[rng.choice(["id", "prompt", "answer"])] = rng.choice([j for j in JUNK if not (isinstance(j, str) and j.strip())])
    elif damage == "label" and kind == "multiple_choice":
        row["label"] = rng.choice([-1, 2, 99, 1.0, "1", None, True, [1]])
    elif damage == "choices" and kind == "multiple_choice":
        row["choices"] = rng.choice([["positive"], ["positive", "positive"], "positive", [1, 2], ["", "positive"], None])
    elif damage == "not-object":
        return json.dumps(rng.choice([[row], "row", 3, None, []])).encode()
    elif damage == "bytes":
        return b"\xff" + bytes(rng.randrange(256) for _ in range(rng.randrange(0, 20)))
    elif damage == "whitespace":
        row[rng.choice(["prompt", "answer"])] += rng.choice([" ", "\n", "\t"])
    else:  # a multiple-choice field in a generate row, or a generate-only damage for mc: the answer is not the label's choice
        if kind == "multiple_choice":
            row["answer"] = "neutral"
        else:
            row[rng.choice(["choices", "label"])] = ["a", "b"] if rng.random() < 0.5 else 0
    return json.dumps(row).encode()


def test_fuzzed_task_rows_always_give_one_clean_error(tmp_path):
    """Random damage to one row among valid ones, 400 times within a few seconds: read_rows
    (what fetch_data and every trainer read task files with) raises AdaptlabError naming the
    file and the damaged line, never another exception and never accepts the row."""
    from stages.core.tasks import read_rows

    rng = random.Random(0)
    path = tmp_path / "train.jsonl"
    deadline = time.monotonic() + 20
    for trial in range(400):
        kind = rng.choice(["multiple_choice", "generate"])
        valid = json.dumps(VALID_MC if kind == "multiple_choice" else VALID_GEN).encode()
        position = rng.randrange(3)
        lines = [valid] * 3
        lines[position] = malformed(rng, kind)
        path.write_bytes(b"\n".join(lines) + b"\n")
        with pytest.raises(AdaptlabError) as err:
            read_rows(path, kind)
        assert f"{path} line {position + 1}" in str(err.value) or f"{path}: no rows" in str(err.value), (trial, lines, err.value)
        assert "\n" not in str(err.value)
        assert time.monotonic() < deadline, f"{trial} cases took over 20 s"


FLAG_VALUES = ["abc", "-1", "0", "nan", "inf", "-inf", "1e999", "", "[1, 2]", "0x10", "1.5", "ünïcode", "--", "true"]


def test_fuzzed_command_line_values_are_parsed_or_one_clean_error(project, monkeypatch, capsys):
    """Random values for random flags of lora4sft.py, 300 times: build_config either accepts them
    (and then every checked number is finite and in range) or exits 2 with one line naming the flag."""
    from stages.core.sft import build_config

    monkeypatch.chdir(project)
    lora = load_method("lora")
    flags = sorted(set(TRAIN) | set(LORA) | {"seed", "eval_limit", "sequence"})
    rng = random.Random(1)
    for _ in range(300):
        chosen = rng.sample(flags, rng.randint(1, 3))
        argv = ["--params", "params.yaml"]
        for flag in chosen:
            argv += [f"--{flag}", rng.choice(FLAG_VALUES)] if rng.random() < 0.9 else [f"--{flag}"]
        try:
            cfg = build_config(lora, argv)
        except SystemExit as exit_info:
            assert exit_info.code == 2, argv
            assert_one_error_line(capsys.readouterr().err)
            continue
        except AdaptlabError as err:
            assert "\n" not in str(err) and any(f in str(err) for f in chosen), (argv, err)
            continue
        assert_checked(cfg, argv)


def assert_checked(cfg, case) -> None:
    """What a config that build_config accepted always holds."""
    for name in ("lr", "batch_size", "grad_accum", "steps_per_task", "max_length", "checkpoint_every", "log_every", "r"):
        assert getattr(cfg, name) > 0, (case, name)
    assert all(v == v and abs(v) != float("inf") for v in vars(cfg).values() if isinstance(v, float)), case
    assert 0 <= cfg.warmup_ratio < 1 and cfg.weight_decay >= 0 and cfg.max_grad_norm >= 0, case
    assert 0 <= cfg.lora_dropout < 1 and cfg.target_modules and all(isinstance(t, str) for t in cfg.target_modules), case
    assert cfg.mixed_precision in ("bf16", "fp16", "no") and isinstance(cfg.chat_template, bool), case


PARAM_VALUES = FLAG_VALUES + [None, True, False, 0, -2, 3, 0.5, 1e-05, float("nan"), [], ["x"], [1, 2], {"a": 1}, "no", "1e-05"]


def test_fuzzed_params_values_are_read_or_one_clean_error(tmp_path, monkeypatch):
    """Random values (strings, numbers, booleans, lists, mappings, null) for random keys of train:
    and methods.lora in params.yaml, 300 times: build_config reads them by their declared types or
    raises one line naming the key where the value was (the same conversion as for flags)."""
    from stages.core.sft import build_config

    import yaml

    monkeypatch.chdir(tmp_path)
    lora = load_method("lora")
    rng = random.Random(2)
    keys = [("train", k) for k in TRAIN] + [("methods.lora", k) for k in LORA]
    for _ in range(300):
        chosen = rng.sample(keys, rng.randint(1, 3))
        params = tiny_params(methods={"lora": dict(LORA)})
        for where, key in chosen:
            (params["train"] if where == "train" else params["methods"]["lora"])[key] = rng.choice(PARAM_VALUES)
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        case = [(f"{where}.{key}", params["train"].get(key) if where == "train" else params["methods"]["lora"][key])
                for where, key in chosen]
        try:
            cfg = build_config(lora, [])
        except AdaptlabError as err:
            assert "\n" not in str(err) and any(f"{where}.{key} " in str(err) or f"--{key} " in str(err)
                                                for where, key in chosen), (case, err)
            continue
        assert_checked(cfg, case)
