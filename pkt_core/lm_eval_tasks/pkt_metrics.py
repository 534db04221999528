"""Prompt formatting, answer extraction and per-document metrics for pkt's lm-eval tasks (ROUGE-L via
rouge-score). pkt's evaluate() replaces doc_to_text with the model's own format at run time."""
import re

from rouge_score import rouge_scorer

from pkt.core.data import format_prompt

_SCORER = rouge_scorer.RougeScorer(["rougeL"])
_NUMBER = r"-?\$?\s*[0-9][0-9,]*(?:\.[0-9]+)?"
# where a solution states its final answer, the field's ways in order: GSM8K's own "#### N", a LaTeX
# \boxed{N} (what instruct models write), the chain-of-thought "The answer is N"
STATED = (re.compile(rf"####\s*({_NUMBER})"), re.compile(rf"\\boxed\{{\s*({_NUMBER})\s*\}}"),
          re.compile(rf"[Tt]he (?:final )?answer is:?\s*({_NUMBER})"))
ANY_NUMBER = re.compile(_NUMBER)


def normalise(number: str) -> str:
    """'$1,234.00' -> '1234', '-7.50' -> '-7.5': thousands separators, currency and a zero fraction dropped."""
    n = re.sub(r"[\s$,]", "", number).rstrip(".")
    if "." in n:
        n = n.rstrip("0").rstrip(".")
    return "0" if n in ("-0", "") else n


def extract_answer(text: str, flexible: bool = False) -> str | None:
    """The final answer a solution states (#### N, \\boxed{N}, "The answer is N": the first of these that
    occurs), normalised; flexible: else the last number in the text. None when there is none."""
    for pattern in STATED:
        found = pattern.search(text)
        if found:
            return normalise(found.group(1))
    numbers = ANY_NUMBER.findall(text) if flexible else []
    return normalise(numbers[-1]) if numbers else None


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
