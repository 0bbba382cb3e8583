"""Scoring with lm-evaluation-harness, offline, on local task files.

Each task folder (data/tasks/<name>) becomes an lm-eval task YAML written at run time with
absolute paths (a relative path would resolve against whatever directory lm-eval runs in). The
TaskManager is built once per Evaluator, so scoring after every task of a sequence does not
re-index tasks.

A scoring gives, per task, the aggregate score and every row's outcome (``Scored``): the number
lm-eval averages into the score (acc: 1.0 or 0.0; exact_match: 1.0 or 0.0; ROUGE-L F in [0, 1]),
keyed by the row's ``id``, so later statistics (bootstrap intervals, paired tests) need no
re-scoring. Two scorers run the model: ``lm_eval`` (lm-eval's HFLM, the field's reference, used by
the evaluate stage) and ``fast`` (stages/core/scoring.py: the same requests, metrics and outcomes;
each question's context run once and a KV-cached greedy loop), the default for the accuracy matrix.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from .errors import fail

# A trained model folder records how its prompts must be written (stages/merge.py writes it).
PROMPT_FORMAT_FILE = "prompt_format.json"

# The score each task reports, by its metric (meta.json): lm-eval's key in its results dict.
PRIMARY_METRIC = {"acc": "acc,none", "exact_match": "exact_match,strip", "rouge": "rougeL,none"}
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
METRICS_MODULE = "adaptlab_metrics"  # lm_eval_metrics.py, copied beside the YAMLs (lm-eval's !function)
SCORERS = ("fast", "lm_eval")
ITEMS_FILE = "items.json"  # a training run's row outcomes, beside its metrics.json: {after_<task>: {task: {id: outcome}}}


@dataclass
class Scored:
    """One scoring: ``scores[task]`` is lm-eval's aggregate (its primary metric), ``items[task]``
    maps each scored row's id to its outcome; the score is the mean of the outcomes."""

    scores: dict[str, float]
    items: dict[str, dict[str, float]]


def item_rows(items: dict[str, dict[str, float]]) -> list[list]:
    """Outcomes as [task, row id, outcome] rows: what a metrics file holds (DVC lists a metrics
    file's numbers, and a list is not one: `dvc metrics show` stays one column per score)."""
    return [[task, row, outcome] for task, outcomes in items.items() for row, outcome in outcomes.items()]


def items_of(rows: list[list]) -> dict[str, dict[str, float]]:
    """``item_rows`` read back: {task: {row id: outcome}}."""
    items: dict[str, dict[str, float]] = {}
    for task, row, outcome in rows:
        items.setdefault(task, {})[row] = outcome
    return items


def max_answer_tokens(task_dir: Path) -> int:
    """A generation budget from the data: a token spans at least one character, so the longest
    answer in characters (+2 for a leading space and the stop) bounds what greedy decoding needs."""
    answers = [json.loads(line)["answer"] for split in ("train.jsonl", "test.jsonl")
               for line in (task_dir / split).read_text(encoding="utf-8").splitlines() if line.strip()]
    return max(len(a) for a in answers) + 2


def lm_eval_task_config(name: str, task_dir: Path, kind: str, metric: str | None = None) -> dict:
    """The lm-eval task for one of our task folders (row schema: prompt, answer, choices, label).
    A ``rouge`` task's ``process_results`` is a function that YAML names with lm-eval's
    ``!function`` tag: ``task_yaml`` writes it."""
    config = {
        "task": f"adaptlab_{name}",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str((task_dir / "test.jsonl").resolve())}},
        "test_split": "test",
        "doc_to_text": "{{prompt}}",
        "target_delimiter": " ",
    }
    if kind == "multiple_choice":
        config |= {
            "output_type": "multiple_choice",
            "doc_to_choice": "{{choices}}",
            "doc_to_target": "{{label}}",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        }
    elif kind == "generate":
        config |= {
            "output_type": "generate_until",
            "doc_to_target": "{{answer}}",
            "generation_kwargs": {"until": ["\n"], "max_gen_toks": max_answer_tokens(task_dir), "do_sample": False},
            # The model writes " 109" after "A:"; compare the stripped first line.
            "filter_list": [{"name": "strip", "filter": [{"function": "remove_whitespace"}, {"function": "take_first"}]}],
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                             "ignore_case": True, "ignore_punctuation": False}],
        }
        if metric == "rouge":  # summaries: ROUGE F-measures of the first generated line (rouge_score)
            del config["filter_list"]
            config["metric_list"] = [{"metric": key, "aggregation": "mean", "higher_is_better": True}
                                     for key in ROUGE_TYPES]
    else:
        fail(f"task '{name}' has unknown kind '{kind}': expected one of multiple_choice, generate")
    return config


def task_yaml(config: dict, metric: str) -> str:
    """The task's YAML text; a ROUGE task gets ``process_results: !function ...``."""
    text = yaml.safe_dump(config)
    if metric == "rouge":
        text += f"process_results: !function {METRICS_MODULE}.rouge_scores\n"
    return text


def exact_match_settled(answer: str, start: str) -> bool:
    """Whether every generation starting with ``start`` fails to match ``answer`` (the exact-match
    task above: whitespace stripped, case ignored): its stripped start is not the start of the
    answer. Decided only where lower() maps every character to one character on its own (not 'İ',
    whose lower case is two, nor 'Σ', whose lower case depends on what follows), so the lower
    case of a longer text starts with the lower case of its start, in Python as in numpy's
    np.char.lower that lm-eval's exact_match uses."""
    head = start.strip()
    plain = all(len(c.lower()) == 1 and c != "Σ" for c in head + answer)
    return plain and not answer.lower().startswith(head.lower())


def task_metric(meta: dict) -> str:
    """A task's metric from its meta.json (task folders written before metrics existed: by kind)."""
    return meta.get("metric") or ("acc" if meta["kind"] == "multiple_choice" else "exact_match")


class Evaluator:
    """Scores models on a fixed list of tasks; reuse one instance for a whole sequence.
    ``chat_template``: each prompt is the user turn of the tokenizer's chat template, the choice or
    generation the assistant turn (lm-eval's apply_chat_template), as chat-trained models saw them.
    ``scorer``: ``lm_eval`` runs the model through lm-eval's HFLM, ``fast`` through FastLM (same
    outcomes, faster forwards)."""

    def __init__(self, task_names: list[str], tasks_dir: str | Path = "data/tasks",
                 batch_size: int = 32, max_length: int = 512, limit: int | None = None,
                 chat_template: bool = False, scorer: str = "lm_eval"):
        import datasets
        from lm_eval.tasks import TaskManager  # lm-eval is slow to import; only evaluators need it

        self.task_names, self.batch_size, self.max_length, self.limit = list(task_names), batch_size, max_length, limit
        self.chat_template = chat_template
        if scorer not in SCORERS:
            fail(f"scorer '{scorer}' is not valid: expected one of {', '.join(SCORERS)}")
        self.scorer = scorer
        self.metrics: dict[str, str] = {}
        self._yaml_dir = tempfile.TemporaryDirectory(prefix="adaptlab-lm-eval-")
        shutil.copy(Path(__file__).with_name("lm_eval_metrics.py"), Path(self._yaml_dir.name, f"{METRICS_MODULE}.py"))
        for name in self.task_names:
            task_dir = Path(tasks_dir) / name
            meta_file = task_dir / "meta.json"
            if not meta_file.is_file():
                fail(f"unknown task '{name}': {meta_file} does not exist (run stages/fetch_data.py)")
            meta = json.loads(meta_file.read_text())
            self.metrics[name] = task_metric(meta)
            config = lm_eval_task_config(name, task_dir, meta["kind"], self.metrics[name])
            Path(self._yaml_dir.name, f"{name}.yaml").write_text(task_yaml(config, self.metrics[name]))
        for name in ("lm_eval", "lm-eval"):  # its per-call notices drown the training log
            logging.getLogger(name).setLevel(logging.ERROR)
        datasets.disable_progress_bars()
        self.task_manager = TaskManager(include_path=self._yaml_dir.name, include_defaults=False)

    def _run(self, lm, tasks: list[str] | None = None) -> Scored:
        """Score ``tasks`` (default: all of this evaluator's) with the lm-eval model ``lm``."""
        import lm_eval

        tasks = self.task_names if tasks is None else list(tasks)
        unknown = [t for t in tasks if t not in self.metrics]
        if unknown:
            fail(f"task '{unknown[0]}' is not one of this evaluator's tasks ({', '.join(self.task_names)})")
        out = lm_eval.simple_evaluate(
            model=lm, tasks=[f"adaptlab_{n}" for n in tasks], task_manager=self.task_manager,
            limit=self.limit, log_samples=True, verbosity="ERROR", bootstrap_iters=0,
            apply_chat_template=self.chat_template,
        )
        scores, items = {}, {}
        for name in tasks:
            key = PRIMARY_METRIC[self.metrics[name]]
            scores[name] = float(out["results"][f"adaptlab_{name}"][key])
            metric, filter_name = key.split(",")
            # a logged sample holds the very values lm-eval aggregates, once per filter
            items[name] = {str(s["doc"]["id"]): float(s[metric]) for s in out["samples"][f"adaptlab_{name}"]
                           if s["filter"] == filter_name}
        return Scored(scores, items)

    def _settled(self, request, start: str) -> bool:
        """FastLM's early stop: the generation's outcome is known from its start (exact match only)."""
        name = request.task_name.removeprefix("adaptlab_")
        return self.metrics.get(name) == "exact_match" and exact_match_settled(str(request.doc["answer"]), start)

    def language_model(self, model, tokenizer):
        """The lm-eval model that scores ``model`` with this evaluator's scorer (puts it in eval mode)."""
        if self.scorer == "fast":
            from .scoring import FastLM

            return FastLM(pretrained=model, tokenizer=tokenizer, batch_size=self.batch_size, max_length=self.max_length,
                          settled=self._settled)
        from lm_eval.models.huggingface import HFLM

        return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=self.batch_size, max_length=self.max_length)

    def score(self, model, tokenizer, tasks: list[str] | None = None) -> Scored:
        """Score an in-memory transformers model (eval mode, no gradients) on ``tasks`` (default: all)."""
        if self.chat_template and not getattr(tokenizer, "chat_template", None):
            fail("chat_template is set but the tokenizer has no chat template: score with --no-chat_template")
        was_training = model.training
        try:
            return self._run(self.language_model(model, tokenizer), tasks)
        finally:
            model.train(was_training)
