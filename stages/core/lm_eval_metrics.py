"""Metrics that lm-eval 0.4 does not register, for task YAMLs (``process_results: !function``).

lm-eval resolves ``!function adaptlab_metrics.rouge_scores`` to a file beside the YAML, so the
Evaluator copies this module there; it imports nothing from adaptlab.
"""

from __future__ import annotations

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
_scorer = None


def rouge_scores(doc: dict, results: list[str]) -> dict[str, float]:
    """ROUGE-1/2/L F-measures (Google's rouge_score, Porter stemming, as for XSum) of the first
    generated line against the reference ``answer``."""
    global _scorer
    if _scorer is None:
        from rouge_score import rouge_scorer

        _scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    prediction = results[0].strip().split("\n")[0] if results else ""
    scores = _scorer.score(doc["answer"], prediction)
    return {key: scores[key].fmeasure for key in ROUGE_TYPES}
