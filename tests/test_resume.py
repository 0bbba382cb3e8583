"""Killed runs resume from their checkpoints and end exactly where an uninterrupted run ends; the
same script runs data-parallel under ``accelerate launch``."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    PYTHON,
    ROOT,
    TASKS,
    TRAIN,
    VENV_BIN,
    adapter_tensors,
    check,
    loss_curve,
    read_json,
    run_cmd,
    run_dirs,
    run_summary,
    train_args,
)

ADAPTERS = ("after_1_mc", "after_2_gen", "final")


def start(cmd: list, cwd: Path, env: dict, logs: Path) -> subprocess.Popen:
    """``cmd`` in the background, its output to files in ``logs`` (a full pipe would stall it)."""
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / "stdout", "w") as out, open(logs / "stderr", "w") as err:
        # A session of its own: signals go to the process group (accelerate's workers included).
        return subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=env, stdout=out, stderr=err, start_new_session=True)


def signal_group(proc: subprocess.Popen, sig: int) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, sig)


def start_training(cwd: Path, tag: str, env: dict, logs: Path, *extra: str) -> subprocess.Popen:
    return start([PYTHON, ROOT / "methods" / "lora4sft.py", *train_args(tag, *extra)], cwd, env, logs)


def wait_for(condition, proc: subprocess.Popen, logs: Path, timeout: float = 300) -> None:
    """Poll ``condition()`` every 10 ms while ``proc`` runs; fail if it ends or time runs out first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before the awaited checkpoint:\n"
                        + (logs / "stderr").read_text()[-3000:])
        if time.monotonic() > deadline:
            pytest.fail("timed out waiting for a checkpoint")
        time.sleep(0.01)


def kill_when(condition, proc: subprocess.Popen, logs: Path) -> None:
    """SIGKILL ``proc`` at the first moment ``condition()`` holds. The process is frozen
    (SIGSTOP) while the condition is checked, so it cannot move on to a later checkpoint."""
    def frozen_check() -> bool:
        signal_group(proc, signal.SIGSTOP)
        if condition():
            return True
        signal_group(proc, signal.SIGCONT)
        return False

    try:
        wait_for(frozen_check, proc, logs)
    finally:
        signal_group(proc, signal.SIGKILL)  # no cleanup of any kind (and no stopped process left behind)
        proc.wait(timeout=60)


def saved_state(work_dir: Path) -> dict | None:
    """The checkpoint of the task in progress (work_dir/<fingerprint>/state/state.pt), if any."""
    for path in work_dir.glob("*/state/state.pt"):
        try:
            return torch.load(path, weights_only=False)
        except (OSError, RuntimeError, EOFError):
            return None  # being replaced right now
    return None


def assert_same_results(run, reference) -> None:
    """Scores, loss curve and every adapter tensor equal the reference run's."""
    ours, theirs = run_summary(run.results_dir), run_summary(reference.results_dir)
    for key in ("tasks", "matrix", "final", "AP", "BWT", "trainable_params"):
        assert ours[key] == theirs[key], key
    assert loss_curve(run.results_dir) == loss_curve(reference.results_dir)
    for name in ADAPTERS:
        mine, ref = adapter_tensors(run.output_dir / name), adapter_tensors(reference.output_dir / name)
        assert mine.keys() == ref.keys()
        assert all(torch.equal(mine[k], ref[k]) for k in ref), f"{name} differs from the uninterrupted run"


def fingerprint_dir(work_dir: Path) -> Path:
    """work_dir/<fingerprint>: the one folder of a run's checkpoints."""
    (folder,) = [p for p in work_dir.iterdir() if p.is_dir()]
    return folder


def assert_nothing_published(run) -> None:
    assert not run.output_dir.exists() and not run.results_dir.exists()
    # no temp folders either (only the killed run's lock file, which holds no lock any more)
    assert [p.name for p in run.output_dir.parent.iterdir() if p.name.startswith(".")] in ([], [f".{run.output_dir.name}.lock"])


def test_run_killed_mid_task_resumes_from_its_checkpoint_with_identical_results(project, script_env, reference_run, tmp_path):
    tag = "killed-mid-task"
    run = run_dirs(project, tag)
    # checkpoint_every changes how a run is saved, not what it computes: every 3 steps here (the
    # reference: 4) puts checkpoints between two loss logs (every 2 steps), mid logging window.
    proc = start_training(project, tag, script_env, tmp_path / "logs", "--checkpoint_every", "3")

    def in_task_2_between_logs() -> bool:
        state = saved_state(run.work_dir)
        return state is not None and state["history"]["task"] == 1 and state["step"] % TRAIN["log_every"] != 0

    kill_when(in_task_2_between_logs, proc, tmp_path / "logs")
    assert_nothing_published(run)
    step = saved_state(run.work_dir)["step"]

    resumed = check(run_cmd([PYTHON, ROOT / "methods" / "lora4sft.py", *train_args(tag, "--checkpoint_every", "3")],
                            project, script_env))
    assert "task 1 (mc) already finished: reusing it" in resumed.stdout
    assert f"resumed task 2 from step {step}" in resumed.stdout
    assert_same_results(run, reference_run)
    assert not any(run.work_dir.iterdir()), "the checkpoints of a finished run are removed"


def test_run_killed_between_tasks_resumes_with_identical_results(project, script_env, reference_run, tmp_path):
    tag = "killed-between-tasks"
    run = run_dirs(project, tag)
    proc = start_training(project, tag, script_env, tmp_path / "logs")
    kill_when(lambda: any(run.work_dir.glob("*/task0/record.json")), proc, tmp_path / "logs")
    assert_nothing_published(run)
    # Exactly what a kill before task 2's first checkpoint leaves: task 1's record, no state.
    folder = fingerprint_dir(run.work_dir)
    shutil.rmtree(folder / "state", ignore_errors=True)
    assert (folder / "task0" / "record.json").is_file() and not (folder / "task1").exists()

    resumed = check(run_cmd([PYTHON, ROOT / "methods" / "lora4sft.py", *train_args(tag)], project, script_env))
    assert "task 1 (mc) already finished: reusing it" in resumed.stdout and "resumed task" not in resumed.stdout
    assert_same_results(run, reference_run)


def test_accelerate_launch_trains_data_parallel_on_two_cpu_processes(project, script_env, reference_run, tmp_path):
    """accelerate 1.15 on CPU: ``--cpu --num_processes 2`` starts ONE process unless mpirun is
    installed; torchrun (``--multi_gpu``) with ACCELERATE_USE_CPU=true starts two gloo processes."""
    tag = "accelerate"
    run = run_dirs(project, tag)
    logs = tmp_path / "logs"
    # batch_size is per process: 2 x 4 = the reference's global batch of 8, the same examples.
    cmd = [VENV_BIN / "accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           ROOT / "methods" / "lora4sft.py", *train_args(tag, "--batch_size", "4")]
    proc = start(cmd, project, dict(script_env, ACCELERATE_USE_CPU="true"), logs)
    try:
        # Every process saves its own RNG state with a checkpoint: rank 1's file proves a second process.
        wait_for(lambda: any(run.work_dir.glob("*/state/process1.pt")), proc, logs)
        assert proc.wait(timeout=600) == 0, (logs / "stderr").read_text()[-5000:]
    finally:
        signal_group(proc, signal.SIGKILL)  # only if a check failed while it still ran

    assert sorted(p.name for p in run.output_dir.iterdir()) == sorted(p.name for p in reference_run.output_dir.iterdir())
    metrics, reference = run_summary(run.results_dir), run_summary(reference_run.results_dir)
    assert metrics["tasks"] == list(TASKS) and metrics["matrix"].keys() == reference["matrix"].keys()
    assert all(0.0 <= v <= 1.0 for row in metrics["matrix"].values() for v in row.values())
    assert read_json(run.output_dir / "train_config.json")["batch_size"] == 4
    # The two processes share each global batch of the single-process reference, so the loss
    # curves agree: exactly but for dropout masks on task 1, whose answers are all one token long
    # (the mean of the two halves' mean losses is the whole batch's), loosely on task 2.
    curve, expected = loss_curve(run.results_dir), loss_curve(reference_run.results_dir)
    assert [s for s, _ in curve] == [s for s, _ in expected]
    gaps = [abs(a - b) for (_, a), (_, b) in zip(curve, expected)]
    first_task = len(gaps) // len(TASKS)
    assert max(gaps[:first_task]) < 0.02 and max(gaps) < 0.1, list(zip(curve, expected))
    assert not any(run.work_dir.iterdir())
