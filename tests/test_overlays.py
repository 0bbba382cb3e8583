"""The papers' params overlays (overlays/<paper>.yaml, applied by stages/overlay.py).

Table-driven over every overlay file:
(a) it merges over the repository's params.yaml and passes every check stages/overlay.py runs (the
    plan builds, every row of its tables reads its settings on every one of its sequences), its
    table names the paper's rows and reference, and every task it adds is an hf task read from the
    hub (a hub id, or remote data files);
(b) the data path: for every hf task of the overlay, a tiny local copy of the hub dataset in the
    hub's own schema (the same column names, label values and split names, a README.md declaring
    the configs as a hub repository does; the file format its data_files name) is read by the real
    loader (stages/core/tasks.py build_task) with everything in the task's spec unchanged but where
    it reads from and how many rows it takes; the rows come out in the row schema, from the splits
    the spec names, with the prompt, answer and choices the spec says;
(c) a bad overlay is one error line naming the bad value, exit 2, and leaves params.yaml and
    plan.yaml as they were; a good one is written as dvc writes params.yaml (comments kept), with a
    current plan.yaml, and applying it twice changes nothing.

No hub is reachable here: nothing checks that a hub id exists, only that the spec matches the
schema its dataset card describes (the SCHEMAS table below, one entry per dataset).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from stages.core.config import load_params
from stages.core.tasks import build_task

import pytest
from conftest import PYTHON, ROOT, run_cmd

from stages.overlay import load_overlay, merged_text, validate

OVERLAYS = sorted((ROOT / "overlays").glob("*.yaml"))
BASE = load_params(ROOT / "params.yaml")

# Each paper's tables: (rows, reference). The rows are the paper's that the project has.
PAPERS = {
    "cimeo": {"cimeo": (["cimeo", "lora", "dora", "pissa", "olora", "eva", "bone", "miss", "road", "shira", "lorafa", "galore",
                         "adalomo", "adarankgrad", "zoadamu", "zoadamu_full"], "lora")},
    "corda": {"corda": (["lora", "corda_kpa", "corda_ipa"], "lora")},
    "gorp": {"gorp": (["gorp", "o_lora", "lora", "galore"], "o_lora")},
    "loran": {"loran": (["lora_qv", "loran"], "lora_qv")},
    "loretta": {"loretta": (["loretta", "loretta_adp", "lora_qv"], "lora_qv"),
                "loretta_encoder": (["enc_full", "enc_lora", "enc_adapters", "enc_loretta_adp", "enc_loretta_rep"], "enc_lora")},
}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def overlay_tasks(path: Path) -> dict:
    return load_overlay(path).get("tasks") or {}


def test_every_paper_has_an_overlay():
    assert sorted(p.stem for p in OVERLAYS) == sorted(PAPERS)


# ----------------------------------------------------------------------------- (a) merge and validate


@pytest.mark.parametrize("path", OVERLAYS, ids=lambda p: p.stem)
def test_overlay_merges_and_validates(path):
    overlay = load_overlay(path)
    params, plan, checked = validate(merged_text(ROOT / "params.yaml", overlay), overlay)
    header = path.read_text(encoding="utf-8").split("\n\n")[0]
    assert header.startswith("#") and "differs from the paper" in header and "ESTIMATE" in header
    assert HUB_ID.match(params["base_model"]["source"]), "the paper's model is a hub id"
    for table, (rows, reference) in PAPERS[path.stem].items():
        spec = params["tables"][table]
        assert (spec["rows"], spec["reference"]) == (rows, reference)
        for sequence in spec["sequences"]:
            assert sequence in overlay["sequences"], f"{table} runs on the overlay's own sequences"
            for row in rows:
                assert f"{row}-{sequence}-s0" in plan["runs"]
    assert checked == sum(len(params["tables"][t]["rows"]) * len(params["tables"][t]["sequences"]) for t in PAPERS[path.stem])
    for name, task in overlay["tasks"].items():
        assert name not in BASE["tasks"], f"{name} would merge into params.yaml's own task"
        assert task["source"] == "hf"
        files = task.get("data_files")
        if files:  # a generic builder over remote files (a pinned hub revision or O-LoRA's repository)
            assert task["path"] in ("json", "parquet")
            assert all(re.match(r"^(hf|https)://", url) for url in files.values())
        else:
            assert HUB_ID.match(task["path"]), f"{name}: {task['path']} is not a hub id"
    if path.stem == "cimeo":  # Figures 2 and 4 follow the table's CIMEO run
        assert list(plan["cimeo_analyses"]) == ["cimeo-cognition_hub-s0"]


# ----------------------------------------------------------------------------- (b) the data path

# The hub datasets the overlays read, as their dataset cards describe them: splits, columns, the
# label column's real values (a ClassLabel's indices with their names, or the strings themselves)
# and the value a split without labels holds. "text" columns get distinct strings that carry a
# row marker; "list" columns a list of them.
T, L = "text", "list"


def schema(splits, columns, label=None, classes=None, unlabelled=None, fmt="parquet"):
    return {"splits": splits, "columns": columns, "label": label, "classes": classes, "unlabelled": unlabelled or {},
            "fmt": fmt}


GLUE = {
    "cola": ({"sentence": T}, ["unacceptable", "acceptable"]),
    "sst2": ({"sentence": T}, ["negative", "positive"]),
    "mrpc": ({"sentence1": T, "sentence2": T}, ["not_equivalent", "equivalent"]),
    "qqp": ({"question1": T, "question2": T}, ["not_duplicate", "duplicate"]),
    "mnli": ({"premise": T, "hypothesis": T}, ["entailment", "neutral", "contradiction"]),
    "qnli": ({"question": T, "sentence": T}, ["entailment", "not_entailment"]),
    "rte": ({"sentence1": T, "sentence2": T}, ["entailment", "not_entailment"]),
}
SUPER_GLUE = {
    "boolq": ({"question": T, "passage": T}, ["False", "True"]),
    "cb": ({"premise": T, "hypothesis": T}, ["entailment", "contradiction", "neutral"]),
    "copa": ({"premise": T, "choice1": T, "choice2": T, "question": lambda s, i: ["cause", "effect"][i % 2]}, ["choice1", "choice2"]),
    "multirc": ({"paragraph": T, "question": T, "answer": T,
                 "idx": lambda s, i: {"paragraph": i, "question": i, "answer": i}}, ["False", "True"]),
    "rte": ({"premise": T, "hypothesis": T}, ["entailment", "not_entailment"]),
    "wic": ({"word": T, "sentence1": T, "sentence2": T, "start1": 0, "start2": 0, "end1": 3, "end2": 3}, ["False", "True"]),
    "wsc.fixed": ({"text": T, "span1_index": 0, "span2_index": 5, "span1_text": T, "span2_text": T}, ["False", "True"]),
}
NEWSGROUPS = ["alt.atheism", "comp.graphics", "comp.os.ms-windows.misc", "comp.sys.ibm.pc.hardware", "comp.sys.mac.hardware",
              "comp.windows.x", "misc.forsale", "rec.autos", "rec.motorcycles", "rec.sport.baseball", "rec.sport.hockey",
              "sci.crypt", "sci.electronics", "sci.med", "sci.space", "soc.religion.christian", "talk.politics.guns",
              "talk.politics.mideast", "talk.politics.misc", "talk.religion.misc"]
STARS = ["very negative", "negative", "neutral", "positive", "very positive"]

SCHEMAS = {
    **{("nyu-mll/glue", config): schema(("train", "validation", "test") if config != "mnli" else
                                        ("train", "validation_matched", "validation_mismatched", "test_matched", "test_mismatched"),
                                        {**columns, "idx": lambda s, i: i}, "label", classes,
                                        {"test": -1, "test_matched": -1, "test_mismatched": -1})
       for config, (columns, classes) in GLUE.items()},
    **{("aps/super_glue", config): schema(("train", "validation", "test"), {**columns, **({} if "idx" in columns else {"idx": lambda s, i: i})},
                                          "label", classes, {"test": -1})
       for config, (columns, classes) in SUPER_GLUE.items()},
    ("openai/gsm8k", "main"): schema(("train", "test"), {"question": T, "answer": lambda s, i: f"Add {i} and 2.\n#### {i + 2}"}),
    ("meta-math/MetaMathQA", None): schema(("train", "test"), {"type": lambda s, i: "GSM_AnsAug", "query": T, "original_question": T,
                                                         "response": lambda s, i: f"We add.\nThe answer is: {i}"}, fmt="json"),
    ("Dahoas/MATH", None): schema(("train", "test"), {"problem": T, "level": lambda s, i: "Level 1", "type": lambda s, i: "Algebra",
                                                      "solution": lambda s, i: f"So $x = \\boxed{{{i}}}$."}),
    ("stanfordnlp/imdb", "plain_text"): schema(("train", "test", "unsupervised"), {"text": T}, "label", ["neg", "pos"],
                                               {"unsupervised": -1}),
    ("Yelp/yelp_review_full", None): schema(("train", "test"), {"text": T}, "label",
                                            ["1 star", "2 star", "3 stars", "4 stars", "5 stars"]),
    ("fancyzhx/dbpedia_14", None): schema(("train", "test"), {"title": T, "content": T}, "label",
                                          ["Company", "EducationalInstitution", "Artist", "Athlete", "OfficeHolder",
                                           "MeanOfTransportation", "Building", "NaturalPlace", "Village", "Animal", "Plant",
                                           "Album", "Film", "WrittenWork"]),
    ("fancyzhx/ag_news", None): schema(("train", "test"), {"text": T}, "label", ["World", "Sports", "Business", "Sci/Tech"]),
    ("community-datasets/yahoo_answers_topics", None): schema(
        ("train", "test"), {"id": lambda s, i: i, "question_title": T, "question_content": T, "best_answer": T}, "topic",
        ["Society & Culture", "Science & Mathematics", "Health", "Education & Reference", "Computers & Internet", "Sports",
         "Business & Finance", "Entertainment & Music", "Family & Relationships", "Politics & Government"]),
    # O-LoRA's own benchmark file: {"label": <label word>, "sentence": ...}, a JSON array
    ("cmnfriend/O-LoRA", "CL_Benchmark/SC/amazon"): schema(("train", "test"), {"sentence": T}, "label", {"strings": STARS},
                                                          fmt="json"),
    ("allenai/sciq", None): schema(("train", "validation", "test"), {"question": T, "distractor3": T, "distractor1": T,
                                                                     "distractor2": T, "correct_answer": T, "support": T}),
    ("ybisk/piqa", None): schema(("train", "validation"), {"goal": T, "sol1": T, "sol2": T}, "label", [0, 1]),
    ("facebook/anli", None): schema(("train_r1", "dev_r1", "test_r1", "train_r2", "dev_r2", "test_r2"),
                                    {"uid": T, "premise": T, "hypothesis": T, "reason": T}, "label",
                                    ["entailment", "neutral", "contradiction"]),
    ("allenai/common_gen", None): schema(("train", "validation", "test"), {"concept_set_idx": lambda s, i: i, "concepts": L,
                                                                           "target": lambda s, i: "" if s == "test" else f"A sentence {i}."}),
    ("Samsung/samsum", None): schema(("train", "validation", "test"), {"id": T, "dialogue": T, "summary": T}),
    ("SetFit/20_newsgroups", None): schema(("train", "test"), {"text": T}, "label_text", {"strings": NEWSGROUPS}, fmt="jsonl"),
}
ROWS_PER_SPLIT = 8


def dataset_of(spec: dict) -> tuple[str, str | None]:
    """The hub dataset a task reads: (repository, config), from its path or its remote data files."""
    if HUB_ID.match(spec["path"]):
        return spec["path"], spec.get("name")
    url = next(iter(spec["data_files"].values()))
    if match := re.match(r"hf://datasets/([^/@]+/[^/@]+)", url):
        return match.group(1), None
    match = re.match(r"https://raw\.githubusercontent\.com/([^/]+/[^/]+)/[0-9a-f]{40}/(.+)/[^/]+$", url)
    assert match, f"no fixture for data files {url}"
    return match.group(1), match.group(2)


def fixture_record(entry: dict, split: str, i: int) -> dict:
    """Row ``i`` of ``split``: every text carries the marker [split#i], the label cycles through
    the dataset's classes (or holds the unlabelled value)."""
    record = {}
    for column, kind in entry["columns"].items():
        if kind == T:
            record[column] = f"{column} {i} [{split}#{i}]"
        elif kind == L:
            record[column] = [f"word{k} [{split}#{i}]" for k in range(3)]
        else:
            record[column] = kind(split, i) if callable(kind) else kind
    if entry["label"]:
        classes = entry["classes"]
        if split in entry["unlabelled"]:
            record[entry["label"]] = entry["unlabelled"][split]
        elif isinstance(classes, dict):  # label words stored as strings
            record[entry["label"]] = classes["strings"][i % len(classes["strings"])]
        else:  # a ClassLabel: the index
            record[entry["label"]] = i % len(classes)
    return record


def write_fixture(entry: dict, folder: Path, config: str | None, files: dict | None) -> dict:
    """The dataset's splits under ``folder``: as a hub repository (README.md configs over parquet
    or jsonl files) when the task names a hub id, else as the files its data_files name, under
    the same split keys. Returns the split -> records written."""
    import pandas as pd

    splits = entry["splits"] if files is None else list(files)  # remote files: the spec's own split keys
    records = {split: [fixture_record(entry, split, i) for i in range(ROWS_PER_SPLIT)] for split in splits}

    def write(path: Path, rows: list[dict], fmt: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if fmt == "parquet":
            pd.DataFrame(rows).to_parquet(path)
        elif fmt == "jsonl":
            path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        else:  # a JSON array, as MetaMathQA's and O-LoRA's files are
            path.write_text(json.dumps(rows), encoding="utf-8")

    if files is None:
        ext, name = {"parquet": "parquet", "jsonl": "jsonl", "json": "json"}[entry["fmt"]], config or "default"
        lines = ["---", "configs:", f"- config_name: {name}", "  data_files:"]
        for split, rows in records.items():
            write(folder / name / f"{split}-00000-of-00001.{ext}", rows, entry["fmt"])
            lines += [f"  - split: {split}", f"    path: {name}/{split}-*"]
        (folder / "README.md").write_text("\n".join(lines + ["---", ""]), encoding="utf-8")
        return records
    for split, url in files.items():
        write(folder / split / Path(url).name, records[split], "parquet" if url.endswith(".parquet") else "json")
    return records


HF_TASKS = [(path, name) for path in OVERLAYS for name, spec in overlay_tasks(path).items() if spec.get("source") == "hf"]


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def test_every_dataset_an_overlay_reads_has_a_fixture():
    missing = sorted({dataset_of(spec) for path in OVERLAYS for spec in overlay_tasks(path).values()} - set(SCHEMAS))
    assert not missing


@pytest.mark.parametrize("path, name", HF_TASKS, ids=[f"{p.stem}-{n}" for p, n in HF_TASKS])
def test_data_path_reads_the_hub_schema(path, name, tmp_path, hf_cache):
    spec = overlay_tasks(path)[name]
    repo, config = dataset_of(spec)
    entry = SCHEMAS[(repo, config)]
    folder = tmp_path / repo.replace("/", "--")
    local = dict(spec, train_size=6, test_size=4)  # everything else as the overlay has it
    if "data_files" in spec:
        records = write_fixture(entry, folder, config, spec["data_files"])
        local["data_files"] = {split: str(folder / split / Path(url).name) for split, url in spec["data_files"].items()}
    else:
        records = write_fixture(entry, folder, config, None)
        local["path"] = str(folder)
    train, test, meta = build_task(name, local, seed=0)

    label_column, answer_column = spec.get("label_column"), spec.get("answer_column")
    kind = spec.get("kind") or ("multiple_choice" if label_column else "generate")
    assert (meta["kind"], meta["metric"]) == (kind, spec.get("metric", "acc" if kind == "multiple_choice" else "exact_match"))
    assert (len(train), len(test)) == (6, 4)
    choices = [str(c) for c in spec.get("choices") or []]
    if label_column:  # the spec's choices cover exactly the dataset's classes, in index order or by name
        classes = entry["classes"]
        if isinstance(classes, dict):
            assert set(classes["strings"]) <= set(choices)
        else:
            assert len(choices) == len(classes), f"{name}: {len(choices)} choices for {len(classes)} classes {classes}"
    for role, rows in (("train", train), ("test", test)):
        split = spec.get(f"{role}_split", role)
        for row in rows:
            found = re.search(r"\[([\w]+)#(\d+)\]", row["prompt"])
            assert found, f"{name}: no row marker in prompt {row['prompt']!r}"
            assert found.group(1) == split, f"{name}: a {role} row from split {found.group(1)}, the spec names {split}"
            record = records[split][int(found.group(2))]
            assert row["prompt"] == spec["prompt"].format(**record).strip()
            if label_column:
                value = record[label_column]
                assert row["choices"] == choices
                assert row["answer"] == (choices[value] if isinstance(value, int) else value)
            else:
                assert list(row) == ["id", "prompt", "answer"] and row["answer"] == str(record[answer_column]).strip()


# ----------------------------------------------------------------------------- (c) the command


@pytest.fixture
def workspace(tmp_path) -> Path:
    """A copy of the repository's params.yaml and plan.yaml to apply overlays to."""
    for name in ("params.yaml", "plan.yaml"):
        shutil.copy(ROOT / name, tmp_path / name)
    return tmp_path


def apply(workspace: Path, overlay: Path, script_env: dict, *extra: str):
    return run_cmd([PYTHON, ROOT / "stages/overlay.py", overlay, "--params", workspace / "params.yaml", *extra],
                   workspace, script_env)


GSM8K = {"source": "hf", "path": "openai/gsm8k", "name": "main", "prompt": "{question}", "answer_column": "answer",
         "train_size": 8, "test_size": 8}
BAD = {
    "unknown task key": ({"tasks": {"gsm": {**GSM8K, "promt": "{question}"}}},
                         "tasks.gsm.promt is not a known key: did you mean 'prompt'?"),
    "row not in methods": ({"tables": {"corda": {"title": "t", "sequences": ["default"], "rows": ["lora", "lorra"],
                                                 "reference": "lora", "seeds": [0]}}},
                           "unknown methods.lorra: 'lorra' is not in methods: did you mean 'lora'?"),
    "unknown section": ({"task": {"gsm": GSM8K}}, "unknown section 'task': did you mean 'tasks'?"),
    "indexed prompt field": ({"tasks": {"gsm": {**GSM8K, "prompt": "{question[0]}"}}},
                             "task 'gsm': prompt field {question[0]} is not a column name"),
    "bad sequence setting": ({"tasks": {"gsm": GSM8K}, "sequences": {"math": {"tasks": ["gsm"], "steps_per_task": "many"}},
                              "tables": {"math": {"title": "t", "sequences": ["math"], "rows": ["lora"], "reference": "lora",
                                                  "seeds": [0]}}},
                             "sequences.math.steps_per_task"),
}


@pytest.mark.parametrize("case", BAD)
def test_a_bad_overlay_is_one_error_line_and_writes_nothing(case, workspace, script_env):
    overlay, expected = BAD[case]
    (workspace / "bad.yaml").write_text(json.dumps(overlay), encoding="utf-8")  # JSON is YAML
    before = {name: (workspace / name).read_bytes() for name in ("params.yaml", "plan.yaml")}
    proc = apply(workspace, workspace / "bad.yaml", script_env)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: {workspace / 'bad.yaml'}: ") and expected in lines[0]
    assert {name: (workspace / name).read_bytes() for name in before} == before
    assert sorted(p.name for p in workspace.iterdir()) == ["bad.yaml", "params.yaml", "plan.yaml"]


def test_an_overlay_is_written_with_its_plan_and_applies_once(workspace, script_env):
    overlay = ROOT / "overlays" / "loran.yaml"
    check = apply(workspace, overlay, script_env, "--check")
    assert check.returncode == 0 and "nothing written" in check.stderr
    assert (workspace / "params.yaml").read_bytes() == (ROOT / "params.yaml").read_bytes()
    proc = apply(workspace, overlay, script_env)
    assert proc.returncode == 0, proc.stderr
    text = (workspace / "params.yaml").read_text(encoding="utf-8")
    assert text.startswith("# adaptlab parameters") and "# The tables." in text  # comments kept
    params = load_params(workspace / "params.yaml")
    assert params["base_model"]["source"] == "meta-llama/Llama-2-7b-hf"
    assert params["methods"]["loran"]["r"] == [64, 4096] and params["methods"]["loran"]["alpha"] == 16  # merged, not replaced
    assert params["tables"]["quick"] == BASE["tables"]["quick"]
    plan = run_cmd([PYTHON, ROOT / "stages/plan.py", "--check", "--params", workspace / "params.yaml"], workspace, script_env)
    assert plan.returncode == 0, plan.stderr
    assert "loran-loran_samsum-s0" in (workspace / "plan.yaml").read_text(encoding="utf-8")
    again = apply(workspace, overlay, script_env)
    assert again.returncode == 0 and (workspace / "params.yaml").read_text(encoding="utf-8") == text
