"""The accuracy matrix's scorer (stages/core/scoring.py) against lm-eval's, per-item outcomes, the
sparse matrix and the peak memory of each phase.

Equality: the same tasks are scored through lm-eval with its HFLM and with FastLM, recording every
request's result: the log-likelihood of every choice agrees to float tolerance, its greedy flag
exactly, every row's outcome exactly; a generation is lm-eval's own or, where FastLM stopped at a
settled exact match, the start of it. On the tiny random model (every task kind: choices of one
token and of several, with shared first tokens, one choice the start of another, a prompt cut to
max_length, generation by exact match and by ROUGE; with and without the chat template) and, where
the repository holds it (models/base, data/tasks), on SmolLM2 with the real tasks.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

from stages.core.evaluation import items_of

import pytest
from conftest import ROOT, TASKS, check, make_workspace, read_json, run_script, tiny_params

LL_TOLERANCE = 1e-4  # fp32 on CPU, other batch shapes: measured up to 2.5e-5 on SmolLM2


def run_summary(folder: Path) -> dict:
    """A training run's whole summary: its summary metrics and the rest (details.json)."""
    return {**read_json(folder / "metrics.json"), **read_json(folder / "details.json")}


def recorder(lm) -> dict:
    """Record every request ``lm`` answers: {(kind, *args): result}."""
    log = {}
    loglikelihood, generate_until = lm.loglikelihood, lm.generate_until

    def record_loglikelihood(requests, disable_tqdm: bool = False):
        out = loglikelihood(requests, disable_tqdm)
        log.update({("loglikelihood", *r.args): o for r, o in zip(requests, out)})
        return out

    def record_generate(requests, disable_tqdm: bool = False):
        out = generate_until(requests, disable_tqdm)
        log.update({("generate_until", r.args[0]): o for r, o in zip(requests, out)})
        return out

    lm.loglikelihood, lm.generate_until = record_loglikelihood, record_generate
    return log


def score_both(tasks: list[str], tasks_dir: Path, model, tokenizer, **settings) -> dict:
    """Every task scored with each scorer: {scorer: (Scored, recorded requests)}."""
    from stages.core.evaluation import Evaluator

    out = {}
    for scorer in ("lm_eval", "fast"):
        evaluator = Evaluator(tasks, tasks_dir, scorer=scorer, **settings)
        lm = evaluator.language_model(model, tokenizer)
        log = recorder(lm)
        out[scorer] = (evaluator._run(lm), log)
    return out


def assert_same(both: dict) -> dict:
    """The two scorings agree (see the module docstring); returns what was compared."""
    (reference, ref_log), (fast, fast_log) = both["lm_eval"], both["fast"]
    assert ref_log.keys() == fast_log.keys()  # the very same requests: lm-eval built both
    lls = [k for k in ref_log if k[0] == "loglikelihood"]
    gens = [k for k in ref_log if k[0] == "generate_until"]
    worst = max([abs(ref_log[k][0] - fast_log[k][0]) for k in lls], default=0.0)
    assert worst < LL_TOLERANCE
    assert all(ref_log[k][1] == fast_log[k][1] for k in lls)
    assert all(ref_log[k].startswith(fast_log[k]) for k in gens)
    assert fast.items == reference.items and fast.scores == reference.scores
    return {"max_ll_difference": worst, "loglikelihoods": len(lls), "generations": len(gens),
            "same_generations": sum(ref_log[k] == fast_log[k] for k in gens),
            "rows": sum(len(v) for v in reference.items.values())}


# ----------------------------------------------------------------------------- tiny model

def choice_rows() -> list[dict]:
    """Multiple choice with choices of several tokens: a shared first word, one choice the start
    of another, lengths that differ."""
    rows = []
    for i, noun in enumerate(["plot", "acting", "music", "ending", "script", "cast", "pacing", "story"]):
        choices = ["very good indeed", "very bad", "very", f"not about the {noun} at all"]
        rows.append({"id": f"ch-{i}", "prompt": f"Review: the {noun} was something else.\nVerdict:",
                     "answer": choices[i % 4], "choices": choices, "label": i % 4})
    return rows


def summary_rows() -> list[dict]:
    return [{"id": f"su-{i}", "prompt": f"Article: the {w} council met on day {i} and agreed.\nSummary:",
             "answer": f"the {w} council agreed"} for i, w in enumerate(["town", "city", "county", "village", "port", "island"])]


@pytest.fixture(scope="module")
def tiny_tasks(project, tmp_path_factory) -> Path:
    """The tiny project's tasks (mc, gen) and two more: choices of several tokens, ROUGE."""
    from stages.core.io import atomic_write_json, write_jsonl

    root = tmp_path_factory.mktemp("scoring-tasks")
    for name in TASKS:
        shutil.copytree(project / "data" / "tasks" / name, root / name)
    for name, kind, rows, meta in (("choices", "multiple_choice", choice_rows(), {}),
                                   ("summ", "generate", summary_rows(), {"metric": "rouge"})):
        write_jsonl(root / name / "train.jsonl", rows)
        write_jsonl(root / name / "test.jsonl", rows)
        atomic_write_json(root / name / "meta.json", {"name": name, "kind": kind, "source": "tests", **meta})
    return root


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat"])
def test_fast_scorer_equals_lm_eval_on_the_tiny_model(project, tiny_tasks, chat):
    from stages.core.models import load_model, load_tokenizer

    model, tokenizer = load_model(project / "models" / "base"), load_tokenizer(project / "models" / "base")
    tasks = ["mc", "choices", "gen", "summ"]
    compared = assert_same(score_both(tasks, tiny_tasks, model, tokenizer, batch_size=4, max_length=64,
                                      limit=8, chat_template=chat))
    assert compared["rows"] == 8 + 8 + 8 + 6 and compared["loglikelihoods"] == 8 * 2 + 8 * 4
    # lm-eval's context of at most max_length tokens: a context cut from the left, the same in both
    cut = assert_same(score_both(["choices"], tiny_tasks, model, tokenizer, batch_size=3, max_length=12, limit=4,
                                 chat_template=chat))
    assert cut["loglikelihoods"] == 16


def test_settled_exact_match_is_decided_by_its_start():
    """exact_match_settled(answer, start) claims the outcome is 0 for any generation that starts
    with ``start``: checked against lm-eval's own filter (strip) and metric (case ignored) on random
    texts, including characters whose lower case is longer or depends on what follows."""
    from stages.core.evaluation import exact_match_settled
    from stages.core.scoring import fixed_prefix

    from lm_eval.api.metrics import exact_match_hf_evaluate

    assert exact_match_settled("Paris", "The") and not exact_match_settled("Paris", "  par")
    assert not exact_match_settled("Paris", "PARIS ") and exact_match_settled("Paris", "Paris x")
    # 'İ' lowers to two characters, 'Σ' to 'ς' at a word's end but 'σ' inside it ("aΣb" -> "aσb")
    assert not exact_match_settled("istanbul", "İ") and not exact_match_settled("aσb", "aΣ")
    assert fixed_prefix("Paris <|im", ["\n", "<|im_end|>"]) == "Paris " and fixed_prefix("a\ufffd", ["\n"]) == "a"
    rng = random.Random(0)
    claimed = 0
    for trial in range(20000):
        alphabet = "aAbB \tİiΣσς." if trial % 2 else "aΣσς b"
        answer = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 3)))
        start = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 4)))
        if exact_match_settled(answer, start):
            claimed += 1
            rest = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 3)))
            generated = (start + rest).strip()  # the task's remove_whitespace filter
            assert exact_match_hf_evaluate([generated], [answer], ignore_case=True)["exact_match"] == 0, (answer, start, rest)
    assert claimed > 1000


# ----------------------------------------------------------------------------- SmolLM2

SMOLLM2 = ROOT / "models" / "base"
TASKS_DIR = ROOT / "data" / "tasks"
# (tasks, chat template, rows per task): choices of one token (sst2, cl_reviews) and of several
# (cl_intent: 7 choices; wikihow_step: 4 sentences), generation by exact match (arithmetic,
# qa_wikidata) and by ROUGE (xsum); rows kept few so that the test takes about a minute.
SMOLLM2_CASES = [(["sst2", "arithmetic"], False, 16), (["cl_intent"], False, 8), (["wikihow_step"], True, 12),
                 (["cl_reviews", "qa_wikidata"], True, 16), (["xsum"], False, 4)]


@pytest.mark.skipif(not (SMOLLM2 / "config.json").is_file() or not (TASKS_DIR / "xsum" / "meta.json").is_file(),
                    reason="needs SmolLM2 in models/base and the tasks in data/tasks (stages/build_base.py, stages/fetch_data.py)")
@pytest.mark.parametrize(("tasks", "chat", "limit"), SMOLLM2_CASES, ids=["-".join(c[0]) + ("-chat" * c[1]) for c in SMOLLM2_CASES])
def test_fast_scorer_equals_lm_eval_on_smollm2(tasks, chat, limit):
    from stages.core.models import load_model, load_tokenizer

    model, tokenizer = load_model(SMOLLM2), load_tokenizer(SMOLLM2)
    compared = assert_same(score_both(tasks, TASKS_DIR, model, tokenizer, batch_size=32, max_length=512, limit=limit,
                                      chat_template=chat))
    assert compared["rows"] == limit * len(tasks)
    print(f"\n{tasks} chat={chat}: {compared}")


# ----------------------------------------------------------------------------- per-item outcomes

def test_every_scoring_keeps_its_row_outcomes(reference_run, pipeline_results, project):
    """The training run's matrix (items.json) and the evaluate stage's scores hold every scored
    row's outcome by the row's id; each score is the mean of its outcomes."""
    test_ids = {t: [json.loads(line)["id"] for line in (project / "data" / "tasks" / t / "test.jsonl").read_text().splitlines()]
                for t in TASKS}
    metrics = run_summary(reference_run.results_dir)
    items = read_json(reference_run.results_dir / "items.json")
    assert list(items) == [f"after_{t}" for t in TASKS]
    for after, cells in items.items():
        for task, outcomes in cells.items():
            assert sorted(outcomes) == sorted(test_ids[task])
            assert metrics["matrix"][after][task] == pytest.approx(sum(outcomes.values()) / len(outcomes), abs=1e-12)
    for name in ("base/default.json", "eval/lora-default.json"):
        scored = read_json(pipeline_results / name)
        for task, outcomes in items_of(scored["items"]).items():  # [task, row id, outcome] rows
            assert set(outcomes.values()) <= {0.0, 1.0} and sorted(outcomes) == sorted(test_ids[task])
            assert scored["scores"][task] == pytest.approx(sum(outcomes.values()) / len(outcomes), abs=1e-12)
    collected = read_json(pipeline_results / "tables" / "default" / "runs" / "lora-default-s0.json")
    assert collected["items"] == items and collected["merged"]["items"] == items_of(read_json(pipeline_results / "eval/lora-default.json")["items"])


# ----------------------------------------------------------------------------- the sparse matrix

def test_sparse_cells_are_what_ap_bwt_and_fwt_read():
    from stages.core.continual import average_performance, backward_transfer, forward_transfer, scored_tasks

    rng = random.Random(0)
    for n in range(1, 9):
        full = [[rng.random() for _ in range(n)] for _ in range(n)]
        cells = [scored_tasks(n, t, full=False) for t in range(n)]
        assert sum(map(len, cells)) == (n * n if n < 4 else 3 * n - 2)
        assert all(scored_tasks(n, t, full=True) == list(range(n)) for t in range(n))
        sparse = [[value if i in cells[t] else None for i, value in enumerate(row)] for t, row in enumerate(full)]
        zero = [rng.random() for _ in range(n)]
        assert average_performance(sparse) == average_performance(full)
        assert backward_transfer(sparse) == backward_transfer(full)
        assert forward_transfer(sparse, zero) == forward_transfer(full, zero)


@pytest.fixture(scope="module")
def four_task_runs(project, script_env, tmp_path_factory) -> dict:
    """One LoRA run over a 4-task sequence (the tiny tasks twice) with each setting of full_matrix."""
    params = tiny_params(sequences={"default": list(TASKS), "four": ["mc", "gen", "mc2", "gen2"]})
    params["train"] |= {"steps_per_task": 4, "checkpoint_every": 4}
    work = make_workspace(tmp_path_factory.mktemp("four") / "ws", project, params, copy_data=True)
    for name in TASKS:
        shutil.copytree(work / "data" / "tasks" / name, work / "data" / "tasks" / f"{name}2")
    runs = {}
    for full in (True, False):
        tag = f"four-{'full' if full else 'sparse'}"
        check(run_script("methods/lora4sft.py", "--sequence", "four", "--eval_limit", "6", "--output_dir", f"runs/{tag}",
                         "--results_dir", f"results/train/{tag}", "--work_dir", f"checkpoints/{tag}",
                         *(["--full_matrix"] if full else []), cwd=work, env=script_env))
        runs[full] = {"metrics": run_summary(work / "results" / "train" / tag),
                      "items": read_json(work / "results" / "train" / tag / "items.json")}
    return runs


def test_sparse_matrix_is_the_default_and_its_metrics_equal_the_full_ones(four_task_runs):
    from stages.core.continual import forward_transfer

    from stages.tables import matrix_of

    full, sparse = four_task_runs[True], four_task_runs[False]
    tasks = full["metrics"]["tasks"]
    assert tasks == ["mc", "gen", "mc2", "gen2"]
    for t, after in enumerate(tasks):
        for i, task in enumerate(tasks):
            cell = sparse["metrics"]["matrix"][f"after_{after}"][task]
            if i in (t, t + 1) or t == len(tasks) - 1:
                assert cell == full["metrics"]["matrix"][f"after_{after}"][task]
                assert sparse["items"][f"after_{after}"][task] == full["items"][f"after_{after}"][task]
            else:
                assert cell is None and task not in sparse["items"][f"after_{after}"]
    assert sum(v is not None for row in sparse["metrics"]["matrix"].values() for v in row.values()) == 3 * 4 - 2
    for key in ("AP", "BWT", "final"):
        assert sparse["metrics"][key] == full["metrics"][key]
    zero = [0.25, 0.0, 0.5, 0.1]
    assert forward_transfer(matrix_of(sparse["metrics"]), zero) == forward_transfer(matrix_of(full["metrics"]), zero)


def test_matrix_plot_leaves_unscored_cells_blank(four_task_runs, tmp_path):
    from stages.tables import plot_matrices, row_summary

    lines = [row_summary(name, [four_task_runs[full]["metrics"]], None) for name, full in (("full", True), ("sparse", False))]
    assert lines[1]["matrix"][0][3] is None and lines[0]["matrix"][0][3] is not None
    plot_matrices(lines, tmp_path / "matrix.png")
    assert (tmp_path / "matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- peak memory

def test_peak_memory_is_per_phase():
    """After a reset the peak is the phase's own: a freed 400 MB tensor no longer counts."""
    from stages.core.sft import peak_memory_mb, reset_peak_memory

    import torch

    if not Path("/proc/self/clear_refs").exists() or torch.cuda.is_available():
        pytest.skip("resets the resident high-water mark of Linux (/proc/self/clear_refs)")
    reset_peak_memory()
    big = torch.ones(100_000_000)
    del big
    high = peak_memory_mb()
    reset_peak_memory()
    assert high - peak_memory_mb() > 300


def test_run_reports_training_and_scoring_peaks(reference_run):
    metrics = run_summary(reference_run.results_dir)
    assert metrics["peak_memory_mb"] > 0 and metrics["scoring_peak_memory_mb"] > 0
