"""results/timings.md (stages/repro.py): the cost of each kind of stage and of each table, summed from
the recorded stage times, with untimed stages counted as the median of their kind on their sequence."""

from __future__ import annotations

from stages.repro import estimate, table_stages, timings_table


def entry(seconds: float) -> dict:
    return {"seconds": seconds, "finished": "2026-12-04 12:00:00", "cores": 2, "load_average_1min": 2.0,
            "omp_wait_policy": "PASSIVE", "threads": 1}


def run(sequence: str, start: str = "models/base") -> dict:
    return {"row": "x", "script": "x4sft.py", "sequence": sequence, "seed": 0, "start": start}


PLAN = {
    "runs": {"a-short-s0": run("short"), "b-short-s0": run("short", "models/init/b"), "a-long-s0": run("long")},
    "merged": {"a-short-s0": {}, "b-short-s0": {}},
    "collected": {
        "merged.base-short": {"table": "merged", "name": "base-short", "inputs": ["results/base/short.json"] * 2},
        "merged.a-short-s0": {"table": "merged", "name": "a-short-s0",
                              "inputs": ["results/train/a-short-s0", "results/eval/a-short-s0.json"]},
        "merged.b-short-s0": {"table": "merged", "name": "b-short-s0",
                              "inputs": ["results/train/b-short-s0", "results/eval/b-short-s0.json"]},
        "plain.a-short-s0": {"table": "plain", "name": "a-short-s0", "inputs": ["results/train/a-short-s0"] * 2},
        "plain.a-long-s0": {"table": "plain", "name": "a-long-s0", "inputs": ["results/train/a-long-s0"] * 2},
    },
}


def test_each_table_needs_its_runs_and_only_merged_tables_their_evaluations():
    needs = table_stages(PLAN)
    assert needs["merged"] == {"fetch_data", "build_base", "tables@merged", "evaluate_base@short", "decompose@b",
                               "collect@merged.base-short", "collect@merged.a-short-s0", "collect@merged.b-short-s0",
                               "train@a-short-s0", "train@b-short-s0", "merge@a-short-s0", "merge@b-short-s0",
                               "evaluate@a-short-s0", "evaluate@b-short-s0"}
    assert needs["plain"] == {"fetch_data", "build_base", "tables@plain", "collect@plain.a-short-s0",
                              "collect@plain.a-long-s0", "train@a-short-s0", "train@a-long-s0"}


def test_table_costs_sum_recorded_times_and_estimate_the_rest_from_like_stages():
    stages = {name: entry(seconds) for name, seconds in {
        "fetch_data": 0, "build_base": 0, "tables@plain": 0, "collect@plain.a-short-s0": 0, "collect@plain.a-long-s0": 0,
        "train@a-short-s0": 3600, "train@b-short-s0": 5400, "train@x-long-s0": 36000}.items()}
    text = timings_table({"stages": stages}, PLAN | {"runs": PLAN["runs"] | {"x-long-s0": run("long")}})
    rows = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
            for line in text.splitlines() if line.startswith("| ")}
    # plain: a-short timed (1 h); a-long untimed, counted as the only long run timed (10 h), not the
    # median over every training run (1.5 h)
    assert rows["plain"] == ["7", "6", "2026-12-04", "11.0", "5.5"]
    assert rows["train"][:6] == ["3", "15000", "3600", "36000", "750", "1"]


def test_the_progress_estimate_counts_an_untimed_run_like_the_timed_runs_of_its_sequence():
    """The estimate printed before a run and after each stage, as in results/timings.md: an untimed
    long run and its collect stage count as the long runs timed, not as the median of every run."""
    stages = {name: entry(seconds) for name, seconds in {
        "train@a-short-s0": 60, "train@b-short-s0": 60, "train@x-long-s0": 1200, "collect@plain.a-short-s0": 1}.items()}
    plan = PLAN | {"runs": PLAN["runs"] | {"x-long-s0": run("long")}}
    assert estimate(["train@a-long-s0", "collect@plain.a-long-s0"], {"stages": stages}, plan) == 1200 + 1
    assert estimate(["train@c-other-s0"], {"stages": stages}, plan) == 60  # no sequence known: every run's median


def test_the_cpu_record_names_the_bf16_unit_that_decides_rounding(monkeypatch):
    from stages.repro import cpu

    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    amx = "model name\t: Intel(R) Xeon(R) Processor\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16\n"
    assert cpu(amx) == "Intel(R) Xeon(R) Processor (amx_bf16)"
    assert cpu(amx.replace(" amx_bf16", "")) == "Intel(R) Xeon(R) Processor (avx512_bf16)"
    assert cpu("model name\t: Old\nflags\t\t: fpu avx2\n") == "Old (avx2)"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    assert cpu(amx) == "Intel(R) Xeon(R) Processor (amx_bf16, oneDNN AVX512_CORE_BF16)"


def test_a_failed_stage_stops_the_run_or_with_keep_going_only_what_needs_it(tmp_path, monkeypatch, capsys):
    """stages/repro.py -j N after a stage fails: by default nothing more starts; with --keep-going
    (DVC's flag) every stage that does not need the failed one still runs and is recorded, and the
    closing line names the failure and what was not run."""
    import shlex
    import sys

    import yaml
    from dvc.repo import Repo

    import stages.repro as repro

    monkeypatch.setattr(repro, "record", lambda *args: None)  # no project params here to tabulate
    stages = {
        "bad": {"cmd": f"{shlex.quote(sys.executable)} -c 'raise SystemExit(3)'", "outs": ["bad.txt"]},
        "after_bad": {"cmd": "cp bad.txt after_bad.txt", "deps": ["bad.txt"], "outs": ["after_bad.txt"]},
        "good": {"cmd": "echo ok > good.txt", "outs": ["good.txt"]},
        "after_good": {"cmd": "cp good.txt after_good.txt", "deps": ["good.txt"], "outs": ["after_good.txt"]},
    }
    for keep_going in (False, True):
        project = tmp_path / str(keep_going)
        project.mkdir()
        Repo.init(str(project), no_scm=True).close()
        (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
        monkeypatch.chdir(project)
        assert repro.run_parallel([], 1, {}, {"runs": {}}, keep_going=keep_going) == 1
        error = capsys.readouterr().err
        assert "ERROR: stage 'bad' failed with exit code 3" in error and "1 stage(s) failed (bad)" in error, error
        assert not (project / "after_bad.txt").exists()
        recorded = yaml.safe_load((project / "dvc.lock").read_text())["stages"] if (project / "dvc.lock").exists() else {}
        if keep_going:  # the independent branch ran and is recorded; the failed one's child did not run
            assert (project / "after_good.txt").read_text() == "ok\n" and set(recorded) == {"good", "after_good"}
            assert "1 not run because they need a failed one" in error and "not started" not in error, error
        else:  # stopped at the failure: what had not started stays for the same command to run
            assert "after_good" not in recorded and "not started" in error, error
