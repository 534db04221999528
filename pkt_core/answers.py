"""Reading the answer a generated solution states, as the field scores GSM8K: "#### N", "\\boxed{N}", "The
answer is N", else (flexible) the last number; and telling when a handful of answers look broken."""
from __future__ import annotations

import re

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


REFUSAL = re.compile(r"\b(I'm sorry|I am sorry|I apologi[sz]e|I can(?:no|')t (?:help|assist|answer|provide)|"
                     r"I cannot|I'm unable|I am unable|[Aa]s an AI)\b")


def broken(outputs: list[str], needs_number: bool) -> str | None:
    """Why these generated answers cannot be what a benchmark means to score (a phrase), or None: every one
    empty, all the same, all refusals, or (needs_number) no number to read an answer from in any."""
    texts = [o.strip() for o in outputs]
    if not texts:
        return None
    if not any(texts):
        return "are all empty"
    if len(texts) > 1 and len(set(texts)) == 1:
        return f"are all the same ({texts[0][:60]!r})"
    if all(REFUSAL.search(t) for t in texts):
        return f"are refusals ({texts[0][:60]!r})"
    if needs_number and not any(extract_answer(t, flexible=True) for t in texts):
        return f"state no answer in any of them (first: {texts[0][:60]!r})"
    return None
