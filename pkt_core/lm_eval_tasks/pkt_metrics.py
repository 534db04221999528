"""Prompt formatting and per-document metrics for pkt's lm-eval tasks (ROUGE-L via rouge-score)."""
from rouge_score import rouge_scorer

from pkt.core.data import format_prompt

_SCORER = rouge_scorer.RougeScorer(["rougeL"])


def em_and_rouge_l(doc, results):
    prediction = results[0].strip()
    reference = doc["messages"][-1]["content"].strip()
    rouge = _SCORER.score(reference, prediction)["rougeL"].fmeasure  # word-level, as Super-NI reports
    return {"exact_match": float(prediction == reference), "rougeL": rouge}


def doc_to_text(doc) -> str:
    """The prompt exactly as training and sensitivity format it (every turn before the answer)."""
    return format_prompt(doc["messages"])
