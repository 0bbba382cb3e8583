"""Scoring with lm-evaluation-harness, offline, on local task files.

Each task folder (data/tasks/<name>) becomes an lm-eval task YAML written at run time with
absolute paths (a relative path would resolve against whatever directory lm-eval runs in). The
TaskManager is built once per Evaluator, so scoring after every task of a sequence does not
re-index tasks.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

import yaml

from .errors import fail

# A trained model folder records how its prompts must be written (stages/merge.py writes it).
PROMPT_FORMAT_FILE = "prompt_format.json"

# The score each task reports, by its metric (meta.json): lm-eval's key in its results dict.
PRIMARY_METRIC = {"acc": "acc,none", "exact_match": "exact_match,strip", "rouge": "rougeL,none"}
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
METRICS_MODULE = "adaptlab_metrics"  # lm_eval_metrics.py, copied beside the YAMLs (lm-eval's !function)


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


def task_metric(meta: dict) -> str:
    """A task's metric from its meta.json (task folders written before metrics existed: by kind)."""
    return meta.get("metric") or ("acc" if meta["kind"] == "multiple_choice" else "exact_match")


class Evaluator:
    """Scores models on a fixed list of tasks; reuse one instance for a whole sequence.
    ``chat_template``: each prompt is the user turn of the tokenizer's chat template, the choice or
    generation the assistant turn (lm-eval's apply_chat_template), as chat-trained models saw them."""

    def __init__(self, task_names: list[str], tasks_dir: str | Path = "data/tasks",
                 batch_size: int = 32, max_length: int = 512, limit: int | None = None,
                 chat_template: bool = False):
        import datasets
        from lm_eval.tasks import TaskManager  # lm-eval is slow to import; only evaluators need it

        self.task_names, self.batch_size, self.max_length, self.limit = list(task_names), batch_size, max_length, limit
        self.chat_template = chat_template
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

    def _run(self, lm) -> dict[str, float]:
        import lm_eval

        results = lm_eval.simple_evaluate(
            model=lm, tasks=[f"adaptlab_{n}" for n in self.task_names], task_manager=self.task_manager,
            limit=self.limit, log_samples=False, verbosity="ERROR", bootstrap_iters=0,
            apply_chat_template=self.chat_template,
        )["results"]
        return {n: float(results[f"adaptlab_{n}"][PRIMARY_METRIC[self.metrics[n]]]) for n in self.task_names}

    def score(self, model, tokenizer) -> dict[str, float]:
        """Score an in-memory transformers model (eval mode, no gradients)."""
        from lm_eval.models.huggingface import HFLM

        if self.chat_template and not getattr(tokenizer, "chat_template", None):
            fail("chat_template is set but the tokenizer has no chat template: score with --no-chat_template")
        was_training = model.training
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=self.batch_size, max_length=self.max_length)
        try:
            return self._run(lm)
        finally:
            model.train(was_training)
