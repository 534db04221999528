"""Prompt formatting, answer extraction and per-document metrics for pkt's lm-eval tasks (ROUGE-L via
rouge-score). pkt's evaluate() replaces doc_to_text with the model's own format at run time."""
from rouge_score import rouge_scorer

from pkt.core.answers import extract_answer
from pkt.core.data import format_prompt

_SCORER = rouge_scorer.RougeScorer(["rougeL"])
def gsm_target(doc) -> str:
    """The reference solution's answer (GSM8K's "#### 72", "The answer is 72.", or its last number)."""
    return extract_answer(doc["messages"][-1]["content"], flexible=True) or ""


def _answers(resps, flexible: bool):
    # lm-eval compares strings: a response with no answer becomes one that matches no reference
    return [[extract_answer(r, flexible) or "[no answer]" for r in rs] for rs in resps]


def strict_answers(resps, docs):
    return _answers(resps, flexible=False)


def flexible_answers(resps, docs):
    return _answers(resps, flexible=True)


def em_and_rouge_l(doc, results):
    prediction = results[0].strip()
    reference = doc["messages"][-1]["content"].strip()
    rouge = _SCORER.score(reference, prediction)["rougeL"].fmeasure  # word-level, as Super-NI reports
    return {"exact_match": float(prediction == reference), "rougeL": rouge}


def doc_to_text(doc) -> str:
    """The prompt in the paper's format (every turn before the answer); pkt passes the model's own format."""
    return format_prompt(doc["messages"])
