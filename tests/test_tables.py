"""stages/tables.py on collected records written here (no training): a table whose rows or base
line were scored in different prompt formats is refused in one line; the trained-numbers column
is over the base model's size; a sequence's held-out tasks get a column for every row and the
base line. And the core's side of held-out tasks: a run scores them after its last task, the
evaluate stage apart from the sequence's tasks; a held-out task the sequence trains is refused.
"""

from __future__ import annotations

import csv as csv_module
import json

from stages.core.errors import AdaptlabError
from stages.core.sft import build_config

import pytest
import yaml
from conftest import ROOT, check, make_workspace, read_json, run_script, run_summary, tiny_params, train_args
from test_methods import load_method

from stages.plan import build_plan, dump

TASKS = ["mc", "gen"]


def run_record(row: str, chat_template: bool = False, merged_chat: bool | None = None, **extra) -> dict:
    """A collected run (stages/collect.py's layout) with made-up scores."""
    matrix = {f"after_{t}": {u: 0.5 for u in TASKS} for t in TASKS}
    merged = None if merged_chat is None else {"chat_template": merged_chat, "scores": {t: 0.6 for t in TASKS}}
    return {"kind": "run", "run": f"{row}-default-s0", "method": row, "sequence": "default", "tasks": TASKS,
            "chat_template": chat_template, "trainable_params": 10, "total_params": 1000, "peak_memory_mb": 1.0,
            "step_time_s": 0.1, "AP": 0.5, "BWT": 0.0, "final": {t: 0.5 for t in TASKS}, "matrix": matrix,
            "loss_curve": [[1, 1.0], [2, 0.5]], "merged": merged, **extra}


def base_record(chat_template: bool = False, **extra) -> dict:
    return {"kind": "base", "model": "models/base", "sequence": "default", "chat_template": chat_template,
            "scores": {t: 0.4 for t in TASKS}, **extra}


def outcomes(score: float, n: int = 40) -> dict[str, float]:
    """n test rows' 0/1 outcomes whose mean is ``score`` (to 1/n)."""
    return {str(i): float(i < round(score * n)) for i in range(n)}


def with_items(record: dict) -> dict:
    """The record with per-row outcomes (collect.py's "items") matching its scores, unless it has them."""
    if "items" in record:
        return record
    if record["kind"] == "base":
        return {**record, "items": {t: outcomes(v) for t, v in {**record["scores"], **record.get("held_out", {})}.items()}}
    items = {after: {t: outcomes(v) for t, v in cells.items()} for after, cells in record["matrix"].items()}
    items[f"after_{record['tasks'][-1]}"].update({t: outcomes(v) for t, v in record.get("held_out", {}).items()})
    merged = record["merged"] and {**record["merged"], "items": {
        t: outcomes(v) for t, v in {**record["merged"]["scores"], **record["merged"].get("held_out", {})}.items()}}
    return {**record, "items": items, "merged": merged}


@pytest.fixture()
def table_dir(tmp_path, monkeypatch):
    """A folder with params.yaml (one table: lora and dora on the default sequence, merged), its
    plan.yaml and the table's collected records; returns a function writing them."""
    params = tiny_params(methods={"lora": {"r": 2}, "dora": {"r": 2}},
                         tables={"default": {"sequences": ["default"], "rows": ["lora", "dora"], "reference": "lora",
                                             "seeds": [0], "merged": True}})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (tmp_path / "plan.yaml").write_text(dump(build_plan(params, ROOT)))
    runs = tmp_path / "results" / "tables" / "default" / "runs"
    runs.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)

    def write(base: dict, lora: dict, dora: dict):
        for name, record in (("base-default", base), ("lora-default-s0", lora), ("dora-default-s0", dora)):
            (runs / f"{name}.json").write_text(json.dumps(with_items(record)))
        return tmp_path
    return write


def render(folder, capsys) -> tuple[int, str]:
    from stages.tables import main

    try:
        main(["--table", "default", "--params", str(folder / "params.yaml"), "--results", str(folder / "results" / "tables")])
    except SystemExit as exit_info:
        return exit_info.code, capsys.readouterr().err.strip()
    return 0, (folder / "results" / "tables" / "default" / "table.md").read_text()


def test_a_table_scored_in_one_prompt_format_renders(table_dir, capsys):
    code, page = render(table_dir(base_record(), run_record("lora", merged_chat=False), run_record("dora", merged_chat=False)), capsys)
    assert code == 0 and "| lora" in page and "| dora" in page


@pytest.mark.parametrize("base, lora, dora, what, expected", [
    # a row trained and scored through the chat template in a plain-prompt table (CIMEO's old default rows)
    (base_record(), run_record("lora", merged_chat=False), run_record("dora", True, merged_chat=True),
     "row dora-default-s0 is scored with the chat template", "the base model's line (default) with plain prompts"),
    # a base line in another format than every row
    (base_record(True), run_record("lora", merged_chat=False), run_record("dora", merged_chat=False),
     "row lora-default-s0 is scored with plain prompts", "the base model's line (default) with the chat template"),
    # a merged model scored in another format than its run was trained and scored in
    (base_record(), run_record("lora", merged_chat=True), run_record("dora", merged_chat=False),
     "row lora-default-s0 (merged model) is scored with the chat template", "with plain prompts"),
])
def test_rows_or_base_line_in_another_prompt_format_are_one_line_errors(base, lora, dora, what, expected, table_dir, capsys):
    folder = table_dir(base, lora, dora)
    code, err = render(folder, capsys)
    assert code == 2 and err.startswith("error:") and "\n" not in err
    assert what in err and expected in err and "table 'default', sequence 'default'" in err
    assert not (folder / "results" / "tables" / "default" / "table.md").exists()


def test_a_record_without_its_prompt_format_is_refused(table_dir, capsys):
    lora = run_record("lora", merged_chat=False)
    del lora["chat_template"]
    code, err = render(table_dir(base_record(), lora, run_record("dora", merged_chat=False)), capsys)
    assert code == 2 and "lora-default-s0 does not record its prompt format" in err


def test_trained_numbers_column_is_over_the_base_model(table_dir, capsys):
    """The size columns say what they count: numbers trained over the whole run, as a share of the
    base model's size (the records' total_params), not of the model with a method's additions."""
    lora = run_record("lora", merged_chat=False, trainable_params=25, total_params=1000)
    code, page = render(table_dir(base_record(), lora, run_record("dora", merged_chat=False)), capsys)
    assert code == 0 and "trained numbers (whole run)" in page and "% of base model" in page
    line = next(line for line in page.splitlines() if line.startswith("| lora"))
    assert "| 25 " in line and "| 2.500 " in line


# ----------------------------------------------------------------------------- held-out tasks

def test_held_out_column_for_every_row_and_the_base_line(table_dir, capsys):
    """A sequence's held-out tasks (never trained on it) get a column for every row, the base
    model's zero-shot line included, from the merged model's scores in a merged table."""
    base = base_record(held_out={"knowledge": 0.25})
    lora = run_record("lora", merged_chat=False, held_out={"knowledge": 0.9})  # in training: not what a merged table shows
    lora["merged"]["held_out"] = {"knowledge": 0.2}
    dora = run_record("dora", merged_chat=False)
    dora["merged"]["held_out"] = {"knowledge": 0.125}
    folder = table_dir(base, lora, dora)
    code, page = render(folder, capsys)
    assert code == 0 and "knowledge (held out)" in page
    cells = {line.split("|")[1].strip(): line for line in page.splitlines() if line.startswith("| ")}
    assert "| 0.250 " in cells["base model (zero-shot)"] and "| 0.200 " in cells["lora"] and "| 0.125 " in cells["dora"]
    assert "0.900" not in cells["lora"]
    csv = (folder / "results" / "tables" / "default" / "table.csv").read_text()
    assert "default,lora,knowledge (held out),0.2" in csv


def test_records_that_scored_other_held_out_tasks_are_refused(table_dir, capsys):
    dora = run_record("dora", merged_chat=False)
    dora["merged"]["held_out"] = {"knowledge": 0.1}
    lora = run_record("lora", merged_chat=False)
    lora["merged"]["held_out"] = {}
    code, err = render(table_dir(base_record(held_out={"knowledge": 0.2}), lora, dora), capsys)
    assert code == 2 and "\n" not in err
    assert "row lora-default-s0 scored the held-out tasks none but the base model's line ['knowledge']" in err


def test_runs_and_the_base_line_score_the_held_out_tasks(project, script_env, tmp_path):
    """A run of a sequence with held_out scores those tasks after its last task (metrics.json
    "held_out"), apart from the accuracy matrix; the evaluate stage (base line, merged models)
    scores them apart from the sequence's tasks."""
    params = tiny_params(sequences={"default": ["mc", "gen"], "one": {"tasks": ["mc"], "held_out": ["gen"]}})
    ws = make_workspace(tmp_path / "ws", project, params)
    args = [a if a != "default" else "one" for a in train_args("held")]
    check(run_script("methods/lora4sft.py", *args, "--steps_per_task", "2", "--eval_limit", "4", cwd=ws, env=script_env))
    metrics = run_summary(ws / "results" / "train" / "held")
    assert set(metrics["held_out"]) == {"gen"} and 0 <= metrics["held_out"]["gen"] <= 1
    assert set(metrics["final"]) == {"mc"} and metrics["matrix"] == {"after_mc": {"mc": metrics["final"]["mc"]}}
    check(run_script("stages/evaluate.py", "--model", "models/base", "--sequence", "one", "--limit", "4",
                     "--out", "base.json", cwd=ws, env=script_env))
    base = read_json(ws / "base.json")
    assert set(base["scores"]) == {"mc"} and set(base["held_out"]) == {"gen"}


def test_a_held_out_task_the_sequence_trains_on_is_a_one_line_error(project, tmp_path, monkeypatch):
    params = tiny_params(sequences={"default": {"tasks": ["mc", "gen"], "held_out": ["gen"]}})
    monkeypatch.chdir(make_workspace(tmp_path / "ws", project, params))
    with pytest.raises(AdaptlabError, match="held_out names gen, which the sequence trains on"):
        build_config(load_method("lora"), ["--params", "params.yaml"])


def test_repository_default_table_holds_out_the_knowledge_corda_kpa_calibrates_on():
    """CorDA's comparison: KPA's covariance comes from questions of a knowledge task that the
    default sequence never trains, and every row of the default table (and its base line) is
    scored on that task's test rows."""
    from stages.core.config import load_params, sequence_held_out, sequence_tasks

    params = load_params(ROOT / "params.yaml")
    held_out = sequence_held_out(params, "default")
    calib = params["methods"]["corda_kpa"]["decompose"]["args"]["calib_dataset"]
    assert held_out == [calib] and calib not in sequence_tasks(params, "default")
    assert params["tasks"][calib]["train_size"] >= params["methods"]["corda_kpa"]["decompose"]["args"]["calib_loader_size"]
    assert params["tasks"][calib]["kind"] == "multiple_choice"
    assert all(table["sequences"] == ["default"] for name, table in params["tables"].items() if name in ("quick", "default"))


# ----------------------------------------------------------------------------- how sure

def cells_of(page: str) -> dict[str, list[str]]:
    return {cells[0]: cells for cells in ([c.strip() for c in line.split("|")[1:-1]] for line in page.splitlines()
                                          if line.startswith("| ") and not line.startswith("| method"))}


def test_every_number_has_an_interval_and_only_clear_differences_are_marked(table_dir, capsys):
    """On 40 test rows a gain of 0.5 -> 0.9 on every task is far outside the noise (▲ and a ΔAP
    interval above zero); the base line is not compared; the CSV holds every interval."""
    lora = run_record("lora", merged_chat=False)
    lora["merged"]["scores"] = {t: 0.5 for t in TASKS}
    dora = run_record("dora", merged_chat=False)
    dora["merged"]["scores"] = {t: 0.9 for t in TASKS}
    folder = table_dir(base_record(), lora, dora)
    code, page = render(folder, capsys)
    assert code == 0, page
    cells = cells_of(page)
    header = [c.strip() for c in next(line for line in page.splitlines() if line.startswith("| method")).split("|")[1:-1]]
    ap = header.index("AP")
    assert cells["lora"][ap].startswith("0.500 ± ") and "▲" not in cells["lora"][ap] and "▼" not in cells["lora"][ap]
    assert cells["dora"][ap].startswith("0.900 ± ") and cells["dora"][ap].endswith("▲")
    delta = cells["dora"][header.index("ΔAP vs lora")]
    low = float(delta.split("[")[1].split(",")[0])
    assert delta.startswith("+0.400 [") and delta.endswith("▲") and low > 0
    assert cells["lora"][header.index("ΔAP vs lora")] == "–"
    assert "▲" not in "".join(cells["base model (zero-shot)"])
    assert "cannot be told from noise" in page
    rows = list(csv_module.DictReader((folder / "results" / "tables" / "default" / "table.csv").read_text().splitlines()))
    dora_ap = next(r for r in rows if r["method"] == "dora" and r["column"] == "AP")
    assert float(dora_ap["low"]) < 0.9 < float(dora_ap["high"]) and dora_ap["vs_reference"] == "1"
    assert (folder / "results" / "tables" / "default" / "plots" / "pareto_default.png").read_bytes().startswith(b"\x89PNG")


def test_the_same_scores_are_not_marked(table_dir, capsys):
    code, page = render(table_dir(base_record(), run_record("lora", merged_chat=False),
                                  run_record("dora", merged_chat=False)), capsys)
    assert code == 0
    cells = "".join(c for line in cells_of(page).values() for c in line)
    assert cells and "▲" not in cells and "▼" not in cells


def test_rows_scored_on_other_test_rows_are_refused(table_dir, capsys):
    """A paired comparison needs the same items: a row scored on fewer test rows is one line."""
    dora = with_items(run_record("dora", merged_chat=False))
    dora["merged"]["items"] = {t: outcomes(0.5, n=20) for t in TASKS}
    code, err = render(table_dir(base_record(), run_record("lora", merged_chat=False), dora), capsys)
    assert code == 2 and "\n" not in err and "20 test rows of 'mc'" in err and "same test rows" in err


def test_pareto_front_keeps_what_nothing_cheaper_beats():
    from stages.tables import pareto_front

    points = [(100, 0.5), (50, 0.4), (200, 0.45), (300, 0.7), (50, 0.3)]
    assert pareto_front(points) == [1, 0, 3]


def test_fewer_test_rows_detect_only_larger_differences(table_dir, capsys):
    """stages/analysis/detectable.py: the same runs restricted to each task's first 10 of 40 test
    rows (what test_size: 10 would have drawn) give a wider ΔAP interval; a bad --first is one line."""
    import random

    from stages.analysis.detectable import main as detectable_main

    rng = random.Random(0)

    def shuffled(record: dict) -> dict:  # the same scores, the right rows spread over the 40
        record = with_items(record)
        for cells in [*record["items"].values(), record["merged"]["items"]]:
            for task, outcomes in cells.items():
                values = list(outcomes.values())
                rng.shuffle(values)
                cells[task] = dict(zip(outcomes, values))
        return record

    lora, dora = run_record("lora", merged_chat=False), run_record("dora", merged_chat=False)
    dora["merged"]["scores"] = {t: 0.7 for t in TASKS}
    folder = table_dir(base_record(), shuffled(lora), shuffled(dora))
    assert render(folder, capsys)[0] == 0
    for task in TASKS:
        (folder / "data" / "tasks" / task).mkdir(parents=True)
        (folder / "data" / "tasks" / task / "test.jsonl").write_text("".join(json.dumps({"id": i}) + "\n" for i in range(40)))
    args = ["--table", "default", "--params", str(folder / "params.yaml"), "--results", str(folder / "results" / "tables"),
            "--tasks_dir", str(folder / "data" / "tasks")]
    detectable_main([*args, "--first", "mc=10", "gen=10"])
    line = capsys.readouterr().out.strip()
    full, fewer = (float(part.split("±")[1].split(" ")[0].rstrip(";")) for part in line.split("detectable ΔAP")[1].split("; "))
    assert 0 < full < fewer, line
    with pytest.raises(SystemExit):
        detectable_main([*args, "--first", "mc=ten"])
    assert "--first 'mc=ten' is not valid" in capsys.readouterr().err
