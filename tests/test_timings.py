"""results/timings.md (stages/repro.py): the cost of each kind of stage and of each table, summed from
the recorded stage times, with untimed stages counted as the median of their kind on their sequence."""

from __future__ import annotations

from stages.repro import table_stages, timings_table


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


def test_the_cpu_record_names_the_bf16_unit_that_decides_rounding(monkeypatch):
    from stages.repro import cpu

    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    amx = "model name\t: Intel(R) Xeon(R) Processor\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16\n"
    assert cpu(amx) == "Intel(R) Xeon(R) Processor (amx_bf16)"
    assert cpu(amx.replace(" amx_bf16", "")) == "Intel(R) Xeon(R) Processor (avx512_bf16)"
    assert cpu("model name\t: Old\nflags\t\t: fpu avx2\n") == "Old (avx2)"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    assert cpu(amx) == "Intel(R) Xeon(R) Processor (amx_bf16, oneDNN AVX512_CORE_BF16)"
