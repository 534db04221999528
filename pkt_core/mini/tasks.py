"""Synthetic tasks in the shapes of the paper's benchmarks, as chat jsonl, fully deterministic.

The testbed is built so that knowledge transfer is measurable:

- facts: made-up entities, each with a number ("The number of the kalomi is 4."). The *teacher's*
  pretraining corpus states the teacher-only facts; the student's never does. Both corpora state
  the shared facts. Fine-tuning (train.jsonl) asks the question "What is the number of the X?" about
  *other* facts than the scored ones, so it teaches the question, not the scored answers. Scored on
  `facts-teacher-only` (moves only if knowledge arrives from the teacher: the student's corpus and its
  fine-tuning data never hold these facts) and on `facts-shared` (facts both models saw).
  Testbed v1 (tokenizer.py: one token per name) fine-tunes both facts tasks on the shared-knowledge
  finetune pool; v2 (names spelled in shared syllables) fine-tunes `facts-teacher-only`, and draws
  its sensitivity seeds, from a pool of teacher-only facts of its own ("teacher-only/train": the
  teacher's corpus states them, the student's does not) apart from the scored ones. v3 is v1 (names,
  facts, tasks) whose corpora both also name every fact's entity without its number, in word-reversal
  documents (name_phrases): each name's token trains in the student too, only the association does not.
- gsm: two-digit addition worked digit by digit, ending "The answer is N." (the skill task).
- mmlu: four-way multiple choice about the shared facts (kept for the MMLU-style scorer).
- sni: an instruction task (reverse the order of words), scored by exact match and ROUGE-L;
  its seed samples are the cross-task control's.

Every task has a `gate` split for the family's quality gates, apart from `val` (setting selection)
and `test` (reporting): gate, val and test share no item and no fact (an unordered addition pair,
an entity, a phrase), and none of them is in train or in any pretraining text.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, replace
from pathlib import Path

from .tokenizer import entity_names

TASKS = ("gsm", "facts-teacher-only", "facts-shared", "mmlu", "sni")
HELD_SPLITS = ("gate", "val", "test")  # the splits no training or pretraining text touches
LETTERS = "ABCD"
COLORS = ["red", "blue", "green", "pink", "gray", "gold", "teal", "plum"]
SYLLABLES = ["ka", "lo", "mi", "zu", "ra", "te", "no", "vi", "sa", "pu", "de", "fo"]
NUMBERS = range(10, 100)  # the two-digit addend of the skill task
DIGITS = range(10)  # its one-digit addend
VALUES = range(10)  # a fact's value: one digit, one token (a fact is one association), chance 10%


@dataclass(frozen=True)
class TaskSizes:
    """Items per split; `facts_format` facts are asked in the question format *in pretraining*
    (both corpora), so an untrained model already answers questions about facts it knows."""
    n_train: int = 128
    n_gate: int = 32
    n_val: int = 32
    n_test: int = 96
    n_seeds: int = 32
    facts_format: int = 64

    def held(self, split: str) -> int:
        return {"gate": self.n_gate, "val": self.n_val, "test": self.n_test}[split]


def chat(task: str, i: int, user: str, answer: str) -> dict:
    return {"dataset": task, "id": f"{task}-{i}",
            "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def as_text(row: dict) -> str:
    """A chat sample as one pretraining document (prompt and answer in the paper's format)."""
    from ..data import format_prompt

    return format_prompt(row["messages"]) + row["messages"][-1]["content"]


# ---- gsm: addition ---------------------------------------------------------------------------
def _held_out(a: int, b: int) -> bool:
    """A fixed 20% of the (two-digit, one-digit) pairs, never trained on in either order."""
    big, small = max(a, b), min(a, b)
    return (big * 7 + small * 3) % 5 == 0


def gsm_sample(a: int, b: int, i: int) -> dict:
    """Worked digit by digit (units with their carry, then tens), ending as GSM solutions end
    ("The answer is N.")."""
    units = a % 10 + b % 10
    tens = a // 10 + b // 10 + units // 10
    return chat("gsm", i, f"What is {a}+{b}?", f"{a % 10}+{b % 10}={units}, {a // 10}+{b // 10}+{units // 10}={tens}. "
                f"The answer is {a + b}.")


def _pairs(held_out: bool) -> list[tuple[int, int]]:
    """(two-digit, one-digit) pairs, in sorted order."""
    return [(a, b) for a in NUMBERS for b in DIGITS if _held_out(a, b) == held_out]


def gsm_train_pairs(seed: int) -> list[tuple[int, int]]:
    """Every pair that is not held out, in both orders, shuffled."""
    pairs = [p for a, b in _pairs(False) for p in ((a, b), (b, a))]
    random.Random(f"gsm-train:{seed}").shuffle(pairs)
    return pairs


def gsm_held_pairs(seed: int) -> list[tuple[int, int]]:
    """One item per held-out pair (its order drawn), shuffled: no two items share a fact."""
    rng = random.Random(f"gsm-held:{seed}")
    pairs = [(a, b) if rng.random() < 0.5 else (b, a) for a, b in _pairs(True)]
    rng.shuffle(pairs)
    return pairs


# ---- facts: entity -> number -------------------------------------------------------------------
FACT_POOLS = ("teacher-only", "shared")  # scored pools, each cut into gate/val/test


def fact_sentence(name: str, value: int) -> str:
    return f"The number of the {name} is {value}."


def fact_sample(task: str, name: str, value: int, i: int) -> dict:
    return chat(task, i, f"What is the number of the {name}?", f"The answer is {value}.")


def fact_book(sizes: TaskSizes, seed: int, testbed: int = 1) -> dict[str, list[tuple[str, int]]]:
    """The family's facts, pool -> [(entity, number)], pools disjoint in entities:
    "teacher-only/<split>" and "shared/<split>" for split in HELD_SPLITS, "finetune" (asked in
    train.jsonl) and "format" (asked in pretraining); testbed 2 adds "teacher-only/train" (asked in
    facts-teacher-only's train.jsonl)."""
    rng = random.Random(f"facts:{seed}")
    sizes_by_pool = {f"{p}/{s}": sizes.held(s) for p in FACT_POOLS for s in HELD_SPLITS}
    sizes_by_pool |= {"finetune": sizes.n_train, "format": sizes.facts_format}
    if testbed == 2:
        sizes_by_pool["teacher-only/train"] = sizes.n_train
    names = list(entity_names(testbed))
    need = sum(sizes_by_pool.values())
    if need > len(names):
        raise ValueError(f"the fact book needs {need} entities but only {len(names)} names exist; "
                         "lower the task sizes")
    names = rng.sample(names, need)
    book, at = {}, 0
    for pool, n in sizes_by_pool.items():
        book[pool] = [(name, rng.choice(VALUES)) for name in names[at:at + n]]
        at += n
    return book


def known_pools(member: str, testbed: int = 1) -> list[str]:
    """The fact pools a member's pretraining corpus states: the teacher's adds the teacher-only pools."""
    pools = ["finetune", "format"] + [f"shared/{s}" for s in HELD_SPLITS]
    if member == "teacher":
        return pools + [f"teacher-only/{s}" for s in HELD_SPLITS] + (["teacher-only/train"] if testbed == 2 else [])
    if member != "student":
        raise ValueError(f"unknown family member {member!r}; choose teacher or student")
    return pools


def known_facts(book: dict, member: str, testbed: int = 1) -> list[tuple[str, int]]:
    """The facts stated in a member's pretraining corpus."""
    return [f for p in known_pools(member, testbed) for f in book[p]]


def mmlu_sample(name: str, value: int, i: int, rng: random.Random) -> dict:
    options = [value] + rng.sample([v for v in VALUES if v != value], 3)
    rng.shuffle(options)
    body = "\n".join(f"{L}. {o}" for L, o in zip(LETTERS, options))
    return chat("mmlu", i, f"What is the number of the {name}?\n{body}\nAnswer:", LETTERS[options.index(value)])


# ---- sni: reverse the order of words -----------------------------------------------------------
def random_phrase(rng: random.Random) -> str:
    return " ".join(rng.choice(COLORS + SYLLABLES) for _ in range(rng.randint(3, 5)))


def sni_sample(phrase: str, i: int) -> dict:
    return chat("sni", i, f"Reverse the order of the words: {phrase}", " ".join(reversed(phrase.split())))


NAME_MENTIONS = 4  # testbed 3: the word-reversal phrases each fact's name is in, in each corpus


def name_phrases(book: dict, seed: int, mentions: int = NAME_MENTIONS) -> list[str]:
    """Testbed 3's name mentions: word-reversal phrases of 3-5 names (the last may hold fewer) that hold
    every name of the fact book `mentions` times and no number. Reversal rather than a sentence frame such
    as "Here is the X.": a name in a phrase costs about two tokens where a frame of character tokens costs a
    dozen (at four mentions the study's student gets 5.12 epochs of its corpus, 4.70 with the frame, 5.53 in
    v1), and copying a name back asks its token to say which name it is, where a frame asks only for the "."
    every name shares. What the mentions cost the student's gates: family.py, above DEFAULT_TESTBED."""
    names = sorted(n for facts in book.values() for n, _ in facts)
    rng = random.Random(f"names:{seed}")
    pool = names * mentions
    rng.shuffle(pool)
    phrases = []
    while pool:
        k = rng.randint(3, 5)
        phrases.append(" ".join(pool[:k]))
        pool = pool[k:]
    return phrases


# ---- splits --------------------------------------------------------------------------------
def make_splits(task: str, sizes: TaskSizes = TaskSizes(), seed: int = 0, testbed: int = 1) -> dict[str, list[dict]]:
    """train, gate, val and test rows of one task (seeds are drawn from train by write_task)."""
    if task == "gsm":
        held = gsm_held_pairs(seed)
        cuts = _cuts(sizes, len(held), "held-out addition pairs")
        out = {"train": [gsm_sample(a, b, i) for i, (a, b) in enumerate(gsm_train_pairs(seed)[:sizes.n_train])]}
        out |= {s: [gsm_sample(a, b, i) for i, (a, b) in enumerate(held[lo:hi])] for s, (lo, hi) in cuts.items()}
        return out
    if task in ("facts-teacher-only", "facts-shared", "mmlu"):
        book = fact_book(sizes, seed, testbed)
        pool = "shared" if task in ("facts-shared", "mmlu") else "teacher-only"
        if task == "mmlu":
            rng = random.Random(f"mmlu:{seed}")
            return {s: [mmlu_sample(n, v, i, rng) for i, (n, v) in enumerate(facts)]
                    for s, facts in [("train", book["finetune"])] + [(s, book[f"{pool}/{s}"]) for s in HELD_SPLITS]}
        # v1: train (and so seeds) is the same file for both facts tasks: their adapters are shared nodes.
        # v2: the teacher-only task trains on (and draws its seeds from) teacher-only facts it never scores
        tuned = "teacher-only/train" if testbed == 2 and pool == "teacher-only" else "finetune"
        out = {"train": [fact_sample("facts", n, v, i) for i, (n, v) in enumerate(book[tuned])]}
        return out | {s: [fact_sample(task, n, v, i) for i, (n, v) in enumerate(book[f"{pool}/{s}"])]
                      for s in HELD_SPLITS}
    if task == "sni":
        rng = random.Random(f"sni:{seed}")
        total = sizes.n_train + sizes.n_gate + sizes.n_val + sizes.n_test
        phrases = sorted({random_phrase(rng) for _ in range(4 * total)})
        rng.shuffle(phrases)
        cuts = {"train": (0, sizes.n_train)} | {s: (lo + sizes.n_train, hi + sizes.n_train)
                                                 for s, (lo, hi) in _cuts(sizes, len(phrases), "phrases").items()}
        return {s: [sni_sample(p, i) for i, p in enumerate(phrases[lo:hi])] for s, (lo, hi) in cuts.items()}
    raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")


def _cuts(sizes: TaskSizes, available: int, what: str) -> dict[str, tuple[int, int]]:
    """Consecutive, disjoint [lo, hi) ranges of the held-out items for gate, val and test."""
    cuts, at = {}, 0
    for s in HELD_SPLITS:
        cuts[s] = (at, at + sizes.held(s))
        at += sizes.held(s)
    if at > available:
        raise ValueError(f"gate+val+test need {at} {what} but only {available} exist; lower the task sizes")
    return cuts


def item_facts(task: str, row: dict) -> set[str]:
    """What a row asks about (an entity, an unordered addition pair, a phrase): two splits that share
    one of these share a fact, even if the rows differ."""
    question = next(m["content"] for m in row["messages"] if m["role"] == "user")
    if task == "gsm":
        a, b = map(int, re.fullmatch(r"What is (\d+)\+(\d+)\?", question).groups())
        return {f"{min(a, b)}+{max(a, b)}"}
    if task in ("facts-teacher-only", "facts-shared", "mmlu"):
        return {re.search(r"the number of the (\w+)\?", question).group(1)}
    if task == "sni":
        return {question.split(": ", 1)[1]}
    raise ValueError(f"unknown task {task!r}")


def write_task(directory: str | Path, task: str, sizes: TaskSizes = TaskSizes(), seed: int = 0, testbed: int = 1,
               **counts) -> Path:
    """Write train/seeds/gate/val/test jsonl for a task; seeds are k samples drawn from train.
    counts: TaskSizes fields to override, e.g. n_train=64, n_seeds=8 (benches and tests)."""
    from ..data import choose_seeds
    from ..distill import write_prompts

    sizes = replace(sizes, **counts)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    splits = make_splits(task, sizes, seed, testbed)
    splits["seeds"] = [splits["train"][i] for i in choose_seeds(len(splits["train"]), sizes.n_seeds, seed)]
    for name, rows in splits.items():
        with open(directory / f"{name}.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    # the data route's prompts (pkt_core/distill.py): the user turns naming the fine-tuning pool's and the
    # scored pools' entities, without their answers
    write_prompts(directory / "prompts.jsonl", splits["train"] + splits["val"] + splits["test"])
    return directory


def fact_repeats_of(book: dict, member: str, fact_repeats: int, shared_repeats: tuple[int, ...] = (),
                    testbed: int = 1) -> list[int]:
    """How often the member's corpus states each of known_facts(book, member): `fact_repeats`, except
    that with `shared_repeats` the i-th fact of each shared split is stated shared_repeats[i % len]
    times. Graded exposure makes the share of shared facts a small model knows a smooth function of
    its training (with one count, it knows almost none or almost all, depending on the seed), and
    every split holds the same mix of counts."""
    counts = {f"shared/{s}": [shared_repeats[i % len(shared_repeats)] for i in range(len(book[f"shared/{s}"]))]
              for s in HELD_SPLITS} if shared_repeats else {}
    return [r for p in known_pools(member, testbed) for r in counts.get(p, [fact_repeats] * len(book[p]))]


def pretraining_texts(member: str, sizes: TaskSizes, seed: int = 0, fact_repeats: int = 8,
                      n_gsm: int = 4000, n_sni: int = 200, shared_repeats: tuple[int, ...] = (),
                      testbed: int = 1) -> list[str]:
    """A member's pretraining corpus (shuffled documents): addition worked in the chat format (never a
    held-out pair), every fact the member knows stated `fact_repeats` times (the shared facts
    `shared_repeats` times, see fact_repeats_of), the format pool's facts also asked in the question
    format, and some word reversal (testbed 3: also the reversal of every fact's name, name_phrases). The
    student's corpus is the teacher's minus the teacher-only facts: everything else is the same text."""
    rng = random.Random(f"pretrain:{seed}")
    book = fact_book(sizes, seed, testbed)
    pairs = gsm_train_pairs(seed + 1)
    docs = [as_text(gsm_sample(a, b, 0)) for a, b in (pairs * (1 + n_gsm // len(pairs)))[:n_gsm]]
    facts = known_facts(book, member, testbed)
    docs += [fact_sentence(n, v) for (n, v), r in zip(facts, fact_repeats_of(book, member, fact_repeats, shared_repeats,
                                                                              testbed))
             for _ in range(r)]
    docs += [as_text(fact_sample("facts", n, v, 0)) for n, v in book["format"]] * fact_repeats
    srng = random.Random(f"sni-pretrain:{seed}")
    held = {r["messages"][0]["content"] for s in HELD_SPLITS for r in make_splits("sni", sizes, seed)[s]}
    sni = [sni_sample(random_phrase(srng), 0) for _ in range(2 * n_sni)]
    docs += [as_text(r) for r in sni if r["messages"][0]["content"] not in held][:n_sni]
    if testbed == 3:  # (never a held-out phrase: those are colors and two-letter syllables, names are six letters)
        docs += [as_text(sni_sample(p, 0)) for p in name_phrases(book, seed)]
    rng.shuffle(docs)
    return docs


STUDY_TASKS = (("facts-teacher-only", "gsm"), ("facts-shared", "gsm"), ("gsm", "gsm"))  # (task, benchmark)


def study_tasks(family_root: str | Path) -> list[dict]:
    """The study's tasks of a built family, as sweep-config task entries {name, dir, benchmark}:
    the teacher-only facts (the knowledge endpoint: only knowledge from the teacher moves it), the
    shared facts, and the addition skill; all scored by GSM-style exact match of "The answer is N"."""
    root = Path(family_root) / "tasks"
    return [{"name": name, "dir": str(root / name), "benchmark": bench} for name, bench in STUDY_TASKS]
