"""Per-document metrics lm-eval has no built-in name for (ROUGE-L via the rouge-score package)."""
from rouge_score import rouge_scorer

_SCORER = rouge_scorer.RougeScorer(["rougeL"])


def em_and_rouge_l(doc, results):
    prediction = results[0].strip()
    reference = doc["messages"][-1]["content"].strip()
    rouge = _SCORER.score(reference, prediction)["rougeL"].fmeasure  # word-level, as Super-NI reports
    return {"exact_match": float(prediction == reference), "rougeL": rouge}
