"""Instruction following as a pairwise win rate against reference answers, judged by a local model.

The paper used AlpacaFarm's GPT-4 judge; offline, pkt asks a local causal LM (given by path)
which of two answers is better and reads its log-likelihood of "A" vs "B". Each pair is judged
in both orders to cancel position bias: the candidate scores 1 (preferred both times), 0.5
(split) or 0. Optional: a weak judge gives a weak signal, so treat it as one.
"""
from __future__ import annotations

import torch

TEMPLATE = ("<|user|>\nQuestion: {question}\n\nAnswer A: {a}\n\nAnswer B: {b}\n\n"
            "Which answer is better? Reply with A or B.\n\n<|assistant|>\n")


def prefers_a(judge, tokenizer, question: str, a: str, b: str) -> bool:
    """True when the judge gives the token 'A' a higher log-probability than 'B' after the prompt."""
    ids = tokenizer(TEMPLATE.format(question=question, a=a, b=b), return_tensors="pt",
                    add_special_tokens=False)["input_ids"].to(next(judge.parameters()).device)
    tok_a, tok_b = (tokenizer(x, add_special_tokens=False)["input_ids"][0] for x in ("A", "B"))
    with torch.no_grad():
        logits = judge(input_ids=ids).logits[0, -1].float()
    return bool(logits[tok_a] > logits[tok_b])


def win_rates(judge, tokenizer, questions: list[str], candidates: list[str], references: list[str]) -> torch.Tensor:
    """Per example: 1 if the candidate beats the reference in both orders, 0.5 if split, 0 if neither."""
    wins = []
    for q, c, r in zip(questions, candidates, references, strict=True):
        first = prefers_a(judge, tokenizer, q, c, r)  # candidate shown as A
        second = not prefers_a(judge, tokenizer, q, r, c)  # candidate shown as B
        wins.append((first + second) / 2)
    return torch.tensor(wins, dtype=torch.float64)
