"""The step benchmark (stages/bench.py) runs every entry in its own process and reports ratios to
the floors, to LoRA and to the peft + Trainer peer; here on the tiny model, one timed step each (the numbers are not checked,
only that each entry was really built and stepped)."""

from __future__ import annotations

import json

from conftest import LORA, check, markdown_rows, run_script, tiny_params, write_params

MEZO = dict(LORA, tuning="full", zo_eps=1e-3, lr=1e-4, lora_dropout=0.0)


def test_bench_reports_floors_lora_and_methods(project, script_env, tmp_path):
    write_params(project / "params_bench.yaml", tiny_params(methods={"lora": dict(LORA), "mezo": MEZO}))
    out = tmp_path / "bench"
    check(run_script("stages/bench.py", "--params", "params_bench.yaml", "--methods", "lora", "mezo",
                     "--repeats", "1", "--warmup", "0", "--batch_size", "4", "--out", str(out),
                     "--scratch", str(tmp_path / "scratch"), cwd=project, env=script_env))
    results = {r["entry"]: r for r in json.loads((out / "bench.json").read_text())["results"]}
    assert list(results) == ["forward", "forward+backward", "peft+Trainer", "lora", "mezo"]
    assert all(r["step_s"] > 0 and r["peak_memory_mb"] > 0 for r in results.values())
    assert results["mezo"]["optimizer_state_mb"] == 0  # z is regenerated, never stored
    assert results["lora"]["optimizer_state_mb"] > 0 and 0 < results["lora"]["trainable_params"] < results["mezo"]["trainable_params"]
    # the peer trains the same LoRA: same trainable parameters, same AdamW state (m and v)
    assert results["peft+Trainer"]["trainable_params"] == results["lora"]["trainable_params"]
    assert results["peft+Trainer"]["optimizer_state_mb"] >= results["lora"]["optimizer_state_mb"] * 0.99
    table = (out / "bench.md").read_text()
    rows = markdown_rows(table)
    assert "× LoRA" in rows[0] and "× peft+Trainer" in rows[0] and any(row[0] == "mezo" for row in rows)
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_rejects_an_unknown_method(project, script_env, tmp_path):
    proc = run_script("stages/bench.py", "--methods", "nosuch", "--repeats", "1", "--out", str(tmp_path / "b"),
                      cwd=project, env=script_env)
    assert proc.returncode == 2 and "error: unknown methods.nosuch" in proc.stderr
    assert not (tmp_path / "b").exists()


def test_scoring_bench_times_both_scorers_on_one_call(project, script_env, tmp_path):
    """--scoring: one scoring call of a sequence with lm-eval's HFLM and with the fast scorer, in one
    process; the same outcome on every row (the times are not checked, only that both ran)."""
    out = tmp_path / "scoring"
    check(run_script("stages/bench.py", "--scoring", "--sequences", "default", "--limit", "4", "--out", str(out),
                     cwd=project, env=script_env))
    (result,) = json.loads((out / "scoring.json").read_text())["results"]
    assert result["sequence"] == "default" and result["rows"] == 8 and result["same_outcomes"] == 8
    assert result["lm_eval_s"] > 0 and result["fast_s"] > 0 and result["speedup"] == result["lm_eval_s"] / result["fast_s"]
    assert result["lm_eval_peak_memory_mb"] > 0 and result["fast_peak_memory_mb"] > 0
    assert "| default | 8 |" in (out / "scoring.md").read_text()


def test_gpu_check_runs_rows_merges_evaluates_and_benches_on_the_cpu_path(project, script_env, tmp_path):
    """`make gpu-check`'s script on the CPU (--device cpu): each row trains a few steps, LoRA is
    merged and scored by lm-eval, the bench runs; a failing row is reported, not fatal to the others."""
    broken = dict(LORA, target_modules=["no_such_layer"])
    write_params(project / "params_gpu.yaml", tiny_params(methods={"lora": dict(LORA), "mezo": MEZO, "dora": broken}))
    out = tmp_path / "gpu"
    proc = run_script("stages/gpu_check.py", "--params", "params_gpu.yaml", "--device", "cpu", "--rows", "lora", "mezo", "dora",
                      "--steps", "1", "--eval_limit", "2", "--out", str(out), "--scratch", str(tmp_path / "scratch"),
                      cwd=project, env=script_env, timeout=900)
    assert proc.returncode == 1, proc.stderr[-3000:]  # dora failed, the rest ran
    assert "failed: dora" in proc.stdout and "[5/5] bench: ran" in proc.stdout
    report = json.loads((out / "gpu.json").read_text())
    rows = {r["row"]: r for r in report["rows"]}
    assert rows["lora"]["status"] == rows["mezo"]["status"] == "ran"
    assert rows["lora"]["step_s"] > 0 and rows["lora"]["peak_memory_mb"] > 0 and 0 <= rows["lora"]["ap"] <= 1
    assert rows["dora"]["status"] == "failed" and "no_such_layer" in rows["dora"]["error"]
    (merged,) = report["merged"]
    assert merged["row"] == "lora" and merged["status"] == "ran" and set(merged["scores"]) == {"mc", "gen"}
    assert report["bench"]["status"] == "ran" and report["device"].startswith("CPU")
    table = markdown_rows((out / "gpu.md").read_text())
    assert ["lora", "ran"] == table[2][:2] and (out / "bench.md").is_file()
    assert not list((tmp_path / "scratch").iterdir())  # the throw-away runs are gone


def test_gpu_check_refuses_bad_input_before_any_work(project, script_env, tmp_path):
    out = tmp_path / "gpu"
    for args, message in [(["--rows", "nosuch"], "error: --rows: 'nosuch' is not a section of params.yaml methods"),
                          (["--device", "cuda"], "error: --device cuda: torch sees no CUDA device"),
                          (["--steps", "0"], "error: --steps, --eval_limit and --timeout must be at least 1")]:
        proc = run_script("stages/gpu_check.py", *args, "--out", str(out), "--scratch", str(tmp_path / "scratch"),
                          cwd=project, env=script_env)
        assert proc.returncode == 2 and proc.stderr.strip().startswith(message), proc.stderr
        assert not out.exists() and not (tmp_path / "scratch").exists()
