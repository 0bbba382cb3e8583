"""Launch ways (stages/core/strategies.py): which method runs under one process, DDP, FSDP and
DeepSpeed, refusals as one line before any work, and LoRA trained under FSDP2 on 2 CPU processes
(tests/fsdp_on_cpu.py: accelerate's own FSDP2 path; accelerate offers it on accelerators only),
ending where DDP ends and resuming bit-identically after a kill."""

from __future__ import annotations

import fcntl
import importlib
import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace

from stages.core.errors import AdaptlabError
from stages.core.outputs import lock_path
from stages.core.strategies import STRATEGIES, check, refusal

import pytest
import torch
from conftest import (
    LORA,
    PYTHON,
    ROOT,
    TASKS,
    VENV_BIN,
    adapter_tensors,
    last_line,
    loss_curve,
    run_cmd,
    run_dirs,
    run_summary,
    tiny_params,
    train_args,
    write_params,
)
from test_resume import signal_group, start, wait_for

SCRIPTS = sorted(p.name for p in (ROOT / "methods").glob("*4*.py"))
# What each method must declare, written out independently of the modules: the methods whose
# update reads whole weights or gradients cannot be sharded; those that add a LoRA per task cannot
# be wrapped at all; the encoder has its own loop; DeepSpeed is refused for all.
NO_FSDP = {"mezo4sft.py", "zoadamu4sft.py", "galore4sft.py", "adarankgrad4sft.py", "adalomo4sft.py",
           "cimeo4sft.py", "gorp4sft.py", "o_lora4sft.py", "loretta4sft.py", "encoder4cls.py"}
NO_DDP = {"gorp4sft.py", "o_lora4sft.py", "encoder4cls.py"}


def method_of(script: str):
    return importlib.import_module(f"methods.{script.removesuffix('.py')}").METHOD


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_method_declares_what_it_can_run_under(script):
    method = method_of(script)
    expected = {"one process": True, "DDP": script not in NO_DDP, "FSDP": script not in NO_FSDP, "DeepSpeed": False}
    for strategy in STRATEGIES:
        why = refusal(method, strategy)
        assert (why is None) == expected[strategy], (script, strategy, why)
        assert why is None or (why and "\n" not in why)


def fake_accelerator(kind: str, processes: int = 2, fsdp_version: int = 2, mixed_precision: str = "no"):
    from accelerate.utils import DistributedType

    plugin = SimpleNamespace(fsdp_version=fsdp_version) if kind == "FSDP" else None
    return SimpleNamespace(distributed_type=getattr(DistributedType, kind), num_processes=processes,
                           state=SimpleNamespace(fsdp_plugin=plugin), mixed_precision=mixed_precision)


@pytest.mark.parametrize("kind, settings, message", [
    ("FSDP", {"fsdp_version": 1}, "FSDP version 1 is not supported"),
    ("FSDP", {"mixed_precision": "fp16"}, "fp16 under FSDP"),
    ("DEEPSPEED", {}, "its engine replaces the optimizer"),
])
def test_check_refuses_in_one_line(kind, settings, message):
    with pytest.raises(AdaptlabError, match=f"method 'lora' cannot run under .*{message}"):
        check(method_of("lora4sft.py"), fake_accelerator(kind, **settings))


def test_check_names_the_launch_way():
    lora, gorp = method_of("lora4sft.py"), method_of("gorp4sft.py")
    assert check(lora, fake_accelerator("NO", processes=1)) == "one process"
    assert check(lora, fake_accelerator("MULTI_CPU")) == "DDP"
    assert check(lora, fake_accelerator("FSDP")) == "FSDP"
    assert check(gorp, fake_accelerator("MULTI_GPU", processes=1)) == "one process"  # one process is no DDP
    with pytest.raises(AdaptlabError, match="method 'gorp' cannot run under DDP: it trains a new LoRA per task"):
        check(gorp, fake_accelerator("MULTI_GPU"))


# ----------------------------------------------------------------------------- real launches

GALORE = {"rank": 4, "update_proj_gap": 4, "scale": 0.25, "proj_type": "std", "target_modules": ["q_proj", "v_proj"]}


@pytest.fixture(scope="module")
def fsdp_project(project):
    write_params(project / "params_fsdp.yaml", tiny_params(methods={"lora": dict(LORA), "galore": GALORE}))
    return project


def fsdp_launch(tag: str, script: str = "lora4sft.py", *extra) -> list:
    """2 CPU processes of accelerate's FSDP2, each decoder layer its own shard unit; batch 4 per
    process = the reference's global batch of 8."""
    args = train_args(tag, "--batch_size", "4", *extra)
    args[1] = "params_fsdp.yaml"
    return [VENV_BIN / "accelerate", "launch", "--use_fsdp", "--fsdp_version", "2", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
            "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP", "--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer",
            "--fsdp_reshard_after_forward", "true", "--fsdp_cpu_ram_efficient_loading", "false",
            ROOT / "tests" / "fsdp_on_cpu.py", ROOT / "methods" / script, *args]


def kill_processes_of(tag: str) -> None:
    """SIGKILL every process of the run ``tag``: torchrun starts its workers in sessions of their
    own, out of reach of a signal to the launcher's process group."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if f"runs/{tag}\0".encode() in cmdline.read_bytes():
                os.kill(int(cmdline.parent.name), signal.SIGKILL)
        except (OSError, ValueError):
            pass  # it ended meanwhile


def wait_until_unlocked(folder: Path, timeout: float = 300) -> None:
    """Until no process holds ``folder``'s run lock (killed workers let go when they are gone)."""
    deadline = time.monotonic() + timeout
    while True:
        fd = os.open(lock_path(folder), os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            assert time.monotonic() < deadline, f"{folder} still locked {timeout} s after its run was killed"
        finally:
            os.close(fd)
        time.sleep(0.05)


@pytest.fixture(scope="module")
def fsdp_run(fsdp_project, script_env):
    proc = run_cmd(fsdp_launch("fsdp"), fsdp_project, dict(script_env, ACCELERATE_USE_CPU="true"), timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return run_dirs(fsdp_project, "fsdp")


@pytest.fixture(scope="module")
def ddp_run(fsdp_project, script_env):
    """The same run data-parallel: 2 CPU processes of DDP, the same per-process batches."""
    cmd = [VENV_BIN / "accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           ROOT / "methods" / "lora4sft.py", *train_args("ddp", "--batch_size", "4")]
    cmd[cmd.index("params.yaml")] = "params_fsdp.yaml"
    proc = run_cmd(cmd, fsdp_project, dict(script_env, ACCELERATE_USE_CPU="true"), timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return run_dirs(fsdp_project, "ddp")


def test_fsdp_trains_lora_as_ddp_does(fsdp_run, ddp_run, reference_run):
    """Sharding changes where the numbers live, not what is computed: the FSDP run ends with DDP's
    adapter (each process draws the same dropout masks in both) and scores, and it exports whole
    tensors (the single-process run's shapes), not one process's slices."""
    metrics, ddp = run_summary(fsdp_run.results_dir), run_summary(ddp_run.results_dir)
    assert metrics["tasks"] == list(TASKS) and metrics["matrix"] == ddp["matrix"]
    assert metrics["trainable_params"] == run_summary(reference_run.results_dir)["trainable_params"]
    curve, expected = loss_curve(fsdp_run.results_dir), loss_curve(ddp_run.results_dir)
    assert [s for s, _ in curve] == [s for s, _ in expected]
    assert max(abs(a - b) for (_, a), (_, b) in zip(curve, expected)) < 1e-4, list(zip(curve, expected))
    mine, theirs = adapter_tensors(fsdp_run.output_dir / "final"), adapter_tensors(ddp_run.output_dir / "final")
    single = adapter_tensors(reference_run.output_dir / "final")
    assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in single.items()}
    drift = max(((mine[k] - theirs[k]).norm() / theirs[k].norm()).item() for k in mine)
    assert drift < 1e-3, drift  # the order of the sums across processes differs: float rounding


def test_fsdp_run_killed_mid_task_resumes_bit_identically(fsdp_project, fsdp_run, script_env, tmp_path):
    env, tag = dict(script_env, ACCELERATE_USE_CPU="true"), "fsdp-killed"
    run = run_dirs(fsdp_project, tag)
    proc = start(fsdp_launch(tag), fsdp_project, env, tmp_path / "logs")
    try:
        # Both processes' parts of a checkpoint (rank 1's optimizer slice included) are written.
        wait_for(lambda: any(run.work_dir.glob("*/state/process1.pt")), proc, tmp_path / "logs")
    finally:
        signal_group(proc, signal.SIGKILL)
        kill_processes_of(tag)
    proc.wait()
    wait_until_unlocked(run.output_dir)
    assert any(run.work_dir.glob("*/state/process1.pt"))  # the killed run left its checkpoint
    # Resumed by another number of processes: one line, and the checkpoint is kept for the right one.
    alone = run_cmd([PYTHON, ROOT / "methods" / "lora4sft.py", *fsdp_launch(tag)[-len(train_args(tag, "--batch_size", "4")):]],
                    fsdp_project, script_env)
    assert alone.returncode == 2 and "was written by 2 process(es), this run has 1" in last_line(alone.stderr), alone.stderr[-2000:]
    assert any(run.work_dir.glob("*/state/process1.pt"))
    resumed = run_cmd(fsdp_launch(tag), fsdp_project, env, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-5000:]
    assert "resumed task" in resumed.stdout + resumed.stderr
    mine, theirs = adapter_tensors(run.output_dir / "final"), adapter_tensors(fsdp_run.output_dir / "final")
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert loss_curve(run.results_dir) == loss_curve(fsdp_run.results_dir)


def test_fsdp_refuses_galore_in_one_line_before_any_work(fsdp_project, script_env):
    tag = "fsdp-galore"
    proc = run_cmd(fsdp_launch(tag, "galore4sft.py", "--method", "galore"), fsdp_project,
                   dict(script_env, ACCELERATE_USE_CPU="true"), timeout=600)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors and set(errors) == {errors[0]}, errors  # the same one line from each process
    assert errors[0].startswith("error: method 'galore' cannot run under FSDP: it projects each weight matrix's "
                                "whole gradient"), last_line(proc.stderr)
    run = run_dirs(fsdp_project, tag)
    assert not run.output_dir.exists() and not run.results_dir.exists() and not run.work_dir.exists()
