"""A table's runs spread over workers (stages/repro.py --executor submitit): on this machine,
submitit's local cluster stands in for Slurm (the same code path: one job per stage, results on
the shared filesystem, each stage recorded in dvc.lock by the submitting process). One worker is
killed mid-training; its stage runs again and nothing is lost."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time

import yaml
from conftest import PYTHON, ROOT, check, run_cmd, write_params
from test_pipeline import TINY_TABLES, dvc, dvc_repo, ran_stages  # noqa: F401  (dvc_repo: the fixture)


def test_table_over_two_workers_survives_a_killed_worker(dvc_repo, tmp_path):  # noqa: F811  (the fixture)
    repo, env = dvc_repo
    params = yaml.safe_load((repo / "params.yaml").read_text())
    write_params(repo / "params.yaml", dict(params, tables={"main": TINY_TABLES["main"]}))
    check(run_cmd([PYTHON, "stages/plan.py"], repo, env))
    marker = tmp_path / "paused.pid"
    paused = dict(env, PYTHONPATH=str(ROOT / "tests" / "pause_hook"), ADAPTLAB_TEST_PAUSE="stages.core.sft:Trainer.train_task",
                  ADAPTLAB_TEST_PAUSE_ONCE=str(marker))
    log = tmp_path / "repro.log"
    with open(log, "w") as out:
        runner = subprocess.Popen([PYTHON, "stages/repro.py", "-j", "2", "--executor", "submitit-local", "tables@main"],
                                  cwd=repo, env=paused, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 900
        # until a training stage has finished its first task and paused there (it writes its pid)
        while not (marker.is_file() and marker.read_text().strip()) and runner.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert marker.is_file(), log.read_text()[-3000:]
        os.kill(int(marker.read_text()), signal.SIGKILL)  # the worker's stage dies as on a lost node
        assert runner.wait(timeout=1200) == 0, log.read_text()[-5000:]
    finally:
        if runner.poll() is None:
            runner.kill()
    output = log.read_text()
    assert "lost its worker" in output and "running it again" in output, output[-3000:]
    train = {"train@lora-default-s0", "train@dora-default-s0"}
    assert train <= ran_stages(output) and "tables@main" in ran_stages(output)
    # The same lock and outputs as dvc repro would leave: nothing left to run, the table has both rows.
    assert "up to date" in dvc(repo, env, "status", "tables@main").stdout
    table = (repo / "results" / "tables" / "main" / "table.md").read_text()
    assert "lora" in table and "dora" in table


def test_fresh_clone_continues_the_recorded_table_with_allow_missing(dvc_repo, tmp_path):  # noqa: F811  (the fixture)
    """A clone holds the table's records (dvc.lock, results/) but none of its models. With
    --allow-missing nothing recorded runs again; when a stage must run (its code changed) and reads
    an output the clone lacks, the recorded stages that make it run again and remake it exactly."""
    repo, env = dvc_repo
    shutil.copy(ROOT / ".gitignore", repo / ".gitignore")  # what git keeps: the project's own rules (no merged/)
    targets = ["tables@quick", "cimeo_overlap@cimeo-chat-s0"]  # a merged row, and a decomposition's analysis
    check(run_cmd([PYTHON, "stages/repro.py", "-j", "2", *targets], repo, env, timeout=1800))
    check(run_cmd(["git", "add", "-A"], repo, env))
    check(run_cmd(["git", "commit", "-q", "-m", "quick table"], repo, env))
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    clone = tmp_path / "clone"
    check(run_cmd(["git", "clone", "-q", str(repo), str(clone)], tmp_path, env))
    assert not any((clone / folder / "lora-default-s0").exists() for folder in ("runs", "merged"))
    assert not (clone / "models" / "base").exists()

    everything = check(run_cmd([PYTHON, "stages/repro.py", "--dry", *targets], clone, env)).stdout
    assert "0 stages" not in everything  # plain DVC semantics: missing outputs mean run again
    recorded = check(run_cmd([PYTHON, "stages/repro.py", "--dry", "--allow-missing", *targets], clone, env)).stdout
    assert "0 stages to run (none)" in recorded, recorded

    for script in ("evaluate.py", "analysis/overlap_count.py"):  # the scorer's and an analysis's code change
        with open(clone / "stages" / script, "a") as code:
            code.write("# changed\n")
    result = check(run_cmd([PYTHON, "stages/repro.py", "-j", "2", "--allow-missing", *targets], clone, env, timeout=1800))
    ran = ran_stages(result.stdout)
    # evaluate reads the merged model, merge the trained run, training the data and the base model,
    # the analysis the decomposition's masks: all remade, in other processes than the recorded ones
    remade = {"merge@lora-default-s0", "train@lora-default-s0", "decompose@cimeo-chat", "build_base", "fetch_data"}
    assert {"evaluate@lora-default-s0", "evaluate_base@default", "cimeo_overlap@cimeo-chat-s0"} | remade <= ran, \
        result.stdout[-3000:]
    after = yaml.safe_load((clone / "dvc.lock").read_text())["stages"]
    for stage in remade:  # remade byte for byte: the record stands
        assert after[stage]["outs"] == lock[stage]["outs"], stage
    assert "up to date" in dvc(clone, env, "status", *targets).stdout


def test_sigusr1_lets_running_stages_finish_and_the_same_command_goes_on(dvc_repo, tmp_path):  # noqa: F811
    """SIGUSR1 to stages/repro.py: the stages already running finish and are recorded, none starts
    after it, the exit is clean; running the same command again runs only the rest."""
    repo, env = dvc_repo
    command = [PYTHON, "stages/repro.py", "-j", "2", "tables@quick"]
    log = tmp_path / "repro.log"
    with open(log, "w") as out:
        runner = subprocess.Popen(command, cwd=repo, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 900
        while "Running stage 'train@" not in log.read_text() and runner.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert runner.poll() is None, log.read_text()[-3000:]
        runner.send_signal(signal.SIGUSR1)
        assert runner.wait(timeout=1200) == 0, log.read_text()[-3000:]
    finally:
        if runner.poll() is None:
            runner.kill()
    first = log.read_text()
    started, finished = ran_stages(first), set(re.findall(r"Finished stage '([^']+)'", first))
    assert "stopped on request" in first and "train@lora-default-s0" in finished, first[-3000:]
    assert started == finished and "tables@quick" not in started  # nothing left half-done, the table not reached
    again = check(run_cmd(command, repo, env, timeout=1800)).stdout
    assert "tables@quick" in ran_stages(again) and not ran_stages(again) & finished, again[-3000:]
    assert "up to date" in dvc(repo, env, "status", "tables@quick").stdout
