"""Synthetic tasks in the shapes of the paper's benchmarks, as chat jsonl, fully deterministic.

- gsm: two-digit addition worked digit by digit, ending "The answer is N."
- mmlu: four-way multiple choice over generated facts (the facts appear in pretraining text)
- sni: an instruction task (reverse the order of words), scored by exact match and ROUGE-L
Held-out problems (val/test) never appear in pretraining or training data.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

TASKS = ("gsm", "mmlu", "sni")
LETTERS = "ABCD"
COLORS = ["red", "blue", "green", "pink", "gray", "gold", "teal", "plum"]
SYLLABLES = ["ka", "lo", "mi", "zu", "ra", "te", "no", "vi", "sa", "pu", "de", "fo"]


def chat(task: str, i: int, user: str, answer: str) -> dict:
    return {"dataset": task, "id": f"{task}-{i}",
            "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


# ---- gsm: addition ---------------------------------------------------------------------------
def _held_out(a: int, b: int) -> bool:
    return (a * 7 + b * 13) % 10 == 0  # a fixed 10% of pairs, never trained on


def gsm_sample(a: int, b: int, i: int) -> dict:
    """Worked digit by digit, then the final answer, as GSM solutions end ("The answer is N.")."""
    units = a % 10 + b % 10
    tens = a // 10 + b // 10 + units // 10
    return chat("gsm", i, f"What is {a}+{b}?", f"{a % 10}+{b % 10}={units}, {a // 10}+{b // 10}+{units // 10}={tens}. "
                f"The answer is {a + b}.")


def gsm_pairs(held_out: bool, seed: int) -> list[tuple[int, int]]:
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100) if _held_out(a, b) == held_out]
    random.Random(seed).shuffle(pairs)
    return pairs


# ---- mmlu: facts ---------------------------------------------------------------------------
def entities(n: int = 120) -> list[tuple[str, str]]:
    """(made-up name, color) facts, the same on every machine."""
    rng = random.Random(1234)
    names: set[str] = set()
    while len(names) < n:
        names.add("".join(rng.choice(SYLLABLES) for _ in range(3)))
    return [(name, rng.choice(COLORS)) for name in sorted(names)]


def mmlu_sample(name: str, color: str, i: int, rng: random.Random) -> dict:
    options = [color] + rng.sample([c for c in COLORS if c != color], 3)
    rng.shuffle(options)
    body = "\n".join(f"{L}. {o}" for L, o in zip(LETTERS, options))
    return chat("mmlu", i, f"What color is the {name}?\n{body}\nAnswer:", LETTERS[options.index(color)])


def fact_sentence(name: str, color: str) -> str:
    return f"The {name} is {color}."


# ---- sni: reverse the order of words -----------------------------------------------------------
def random_word(rng: random.Random) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 7)))


def random_phrase(rng: random.Random) -> str:
    return " ".join(rng.choice(COLORS + SYLLABLES) for _ in range(rng.randint(3, 5)))


def sni_sample(phrase: str, i: int) -> dict:
    return chat("sni", i, f"Reverse the order of the words: {phrase}", " ".join(reversed(phrase.split())))


# ---- splits --------------------------------------------------------------------------------
def make_splits(task: str, n_train: int = 1000, n_val: int = 100, n_test: int = 200, seed: int = 0) -> dict[str, list[dict]]:
    rng = random.Random(f"{task}:{seed}")
    if task == "gsm":
        train_pairs, held = gsm_pairs(False, seed), gsm_pairs(True, seed)
        train = [gsm_sample(a, b, i) for i, (a, b) in enumerate(train_pairs[:n_train])]
        val = [gsm_sample(a, b, i) for i, (a, b) in enumerate(held[:n_val])]
        test = [gsm_sample(a, b, i) for i, (a, b) in enumerate(held[n_val:n_val + n_test])]
    elif task == "mmlu":
        ents = entities()
        # train on questions about some facts; test on the others, whose facts only pretraining saw
        cut = len(ents) // 2
        train = [mmlu_sample(*ents[i % cut], i, rng) for i in range(n_train)]
        held = ents[cut:]
        val = [mmlu_sample(*held[i % len(held)], i, rng) for i in range(n_val)]
        test = [mmlu_sample(*held[(i + n_val) % len(held)], i, rng) for i in range(n_test)]
    elif task == "sni":
        words = sorted({random_phrase(rng) for _ in range(4 * (n_train + n_val + n_test))})
        rng.shuffle(words)
        train = [sni_sample(w, i) for i, w in enumerate(words[:n_train])]
        val = [sni_sample(w, i) for i, w in enumerate(words[n_train:n_train + n_val])]
        test = [sni_sample(w, i) for i, w in enumerate(words[n_train + n_val:n_train + n_val + n_test])]
    else:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    return {"train": train, "val": val, "test": test}


def write_task(directory: str | Path, task: str, n_train: int = 1000, n_val: int = 100, n_test: int = 200,
               n_seeds: int = 32, seed: int = 0) -> Path:
    """Write train/seeds/val/test jsonl for a task; seeds are k samples drawn from train."""
    from ..data import choose_seeds

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    splits = make_splits(task, n_train, n_val, n_test, seed)
    splits["seeds"] = [splits["train"][i] for i in choose_seeds(len(splits["train"]), n_seeds, seed)]
    for name, rows in splits.items():
        with open(directory / f"{name}.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return directory


def pretraining_texts(n: int, task_fraction: float = 0.6, seed: int = 0) -> list[str]:
    """The family's shared mixture: task samples in the paper's chat format plus filler (facts, words).
    Held-out gsm pairs are excluded; all mmlu facts appear as plain sentences."""
    from ..data import format_prompt

    rng = random.Random(f"pretrain:{seed}")
    # every non-held-out addition pair (~7300): coverage is what lets the teacher generalize
    train = {t: make_splits(t, n_train=10000, n_val=0, n_test=0, seed=seed + 1)["train"] for t in TASKS}
    ents = entities()
    weights = {"gsm": 0.8, "mmlu": 0.1, "sni": 0.1}
    texts = []
    for _ in range(n):
        if rng.random() < task_fraction:
            task = rng.choices(TASKS, weights=[weights[t] for t in TASKS])[0]
            row = rng.choice(train[task])
            texts.append(format_prompt(row["messages"]) + row["messages"][-1]["content"])
        else:
            facts = fact_sentence(*rng.choice(ents))
            words = " ".join(random_word(rng) for _ in range(2))
            texts.append(facts + " " + words)
    return texts
