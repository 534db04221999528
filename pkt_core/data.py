"""The chat jsonl format of the paper's release, the one renderer (the paper's layout or the model's chat
template), answer-only labels, seed choice.

One sample a line: {"messages": [{"role": "user", "content": ...}, {"role": "assistant",
"content": ...}]}, an optional leading system turn; other fields are kept but unused.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from . import inputs
from .errors import UserError

IGNORE = -100
ROLES = ("system", "user", "assistant")


class DataError(UserError, ValueError):
    pass


@dataclass(frozen=True)
class Sample:
    prompt: str  # everything before the answer, formatted
    answer: str  # the assistant turn's text (in the chat format, with the template's end of turn)
    raw: dict
    fmt: str = "paper"  # "paper" or "chat" (resolve_format)


def read_jsonl(path: str | Path) -> list[dict]:
    """Parse and validate a chat jsonl file (UTF-8, a leading byte-order mark allowed); errors name
    the file, line, field and fix."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a directory; give the .jsonl file itself (e.g. {path / 'seeds.jsonl'})")
    rows = []
    try:
        for n, raw in inputs.lines(path, "a .jsonl file with one chat sample per line"):  # bounded: no device, FIFO
            line = _decode(raw[3:] if n == 1 and raw.startswith(BOM) else raw, path, n)
            if line.strip():
                row = _parse(line, path, n)
                validate_sample(row, f"{path} line {n}")
                rows.append(row)
    except inputs.InputError as e:
        raise DataError(str(e)) from None
    if not rows:
        raise DataError(f"{path}: no samples; the file is empty. Add one JSON chat sample per line")
    return rows


BOM = b"\xef\xbb\xbf"


def _decode(raw: bytes, path: Path, n: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} line {n}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                        "save the file as UTF-8") from None


def _parse(line: str, path: Path, n: int):
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{path} line {n}: not valid JSON ({e.msg}); each line must be one JSON object") from None
    except RecursionError:
        raise DataError(f"{path} line {n}: JSON nested too deeply to read; a sample is "
                        '{"messages": [{"role": ..., "content": ...}, ...]}') from None
    except ValueError as e:  # a number of more than 4300 digits, in any field, used or not
        raise DataError(f"{path} line {n}: a number too long to read ({str(e).split(':')[0]}); give numbers of at "
                        "most a few digits") from None


def validate_sample(row, where: str) -> None:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object with a \"messages\" list, got {type(row).__name__}")
    msgs = row.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: \"messages\" is missing or empty; give a list of {{role, content}} turns")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(
                f"{where}: messages[{i}] must be {{\"role\": one of {list(ROLES)}, \"content\": a string}}"
            )
    if msgs[-1]["role"] != "assistant":
        raise DataError(f"{where}: \"messages\" has no assistant turn at the end; each sample needs one answer")
    if not msgs[-1]["content"].strip():
        raise DataError(f"{where}: the assistant answer is empty, so the sample would train on the end-of-text token "
                        "alone; give every sample a non-empty answer or drop it")
    if not any(m["role"] == "user" for m in msgs):
        raise DataError(f"{where}: \"messages\" has no user turn; each sample needs a question")


PROMPT_FORMATS = ("auto", "paper", "chat")


def resolve_format(fmt: str, tokenizer) -> str:
    """The format a model's samples are rendered in: "chat" (its tokenizer's chat template) or "paper"
    (the paper's <|role|> layout). auto: the template when the tokenizer carries one, else the paper's."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if fmt == "auto":
        return "chat" if has_template else "paper"
    if fmt not in PROMPT_FORMATS:
        raise DataError(f"prompt format {fmt!r}: choose one of {', '.join(PROMPT_FORMATS)}")
    if fmt == "chat" and not has_template:
        raise DataError("--prompt-format chat: the tokenizer has no chat template; use --prompt-format paper (or auto)")
    return fmt


def format_prompt(messages: list[dict], tokenizer=None, fmt: str = "paper") -> str:
    """The text before the answer: every turn before it (system and earlier turns included) in the paper's
    <|role|> tags, or for fmt "chat" the tokenizer's chat template with its generation prompt."""
    history = messages[:-1]
    if fmt == "chat":
        return tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
    parts = []
    for m in history:
        parts.append(f"<|{m['role']}|>\n{m['content']}\n\n")
    return "".join(parts) + "<|assistant|>\n"


_PROBE = "\x00pkt-answer\x00"


def end_of_turn(tokenizer, fmt: str = "paper") -> str:
    """The text that closes an assistant turn: what the chat template writes after the answer (Qwen's
    <|im_end|>, Llama-3's <|eot_id|>), or in the paper's format the end-of-text token. Generation stops there."""
    if fmt != "chat":
        return tokenizer.eos_token if tokenizer is not None else "</s>"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "?"}, {"role": "assistant", "content": _PROBE}],
                                         tokenize=False)
    return text.split(_PROBE, 1)[1].strip() or tokenizer.eos_token


def render(messages: list[dict], tokenizer=None, fmt: str = "paper") -> tuple[str, str]:
    """(prompt, answer): the one renderer of every sample pkt reads (sensitivity seeds, training data,
    LaTen's samples, evaluation prompts). In the chat format the answer is what the template writes for
    the assistant turn, up to and including its end-of-turn text, so prompt + answer is the template's
    whole conversation (less any whitespace after the end of turn)."""
    prompt, content = format_prompt(messages, tokenizer, fmt), messages[-1]["content"]
    if fmt != "chat":
        return prompt, content
    whole = tokenizer.apply_chat_template(messages, tokenize=False)
    if not whole.startswith(prompt):
        raise DataError("the tokenizer's chat template renders a conversation that does not start with its own "
                        "prompt for the answer (it rewrites earlier turns); use --prompt-format paper")
    answer, eot = whole[len(prompt):], end_of_turn(tokenizer, fmt)
    cut = answer.rfind(eot)
    return prompt, answer[: cut + len(eot)] if cut >= 0 else answer.rstrip()


def to_samples(rows: list[dict], tokenizer=None, fmt: str = "paper") -> list[Sample]:
    return [Sample(*render(r["messages"], tokenizer, fmt), r, fmt) for r in rows]


def tokenize(tokenizer, text: str) -> list[int]:
    """Token ids as lm-eval's HFLM makes them for a causal LM: the tokenizer's own default
    special-token handling (a BOS added by add_bos_token or by a post-processor alike), except for
    a text that already starts with the BOS text (a chat template's), which gets no second one."""
    bos = getattr(tokenizer, "bos_token", None)
    special = not (bos and text.startswith(bos))
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def encode(sample: Sample, tokenizer, max_length: int = 2048, where: str = "sample") -> dict[str, torch.Tensor]:
    """input_ids/labels, each 1 x T; labels are IGNORE outside the answer (+ eos, or the chat template's
    end of turn).

    The one formatting path of sensitivity, training and evaluation: the prompt's ids are the
    context lm-eval scores or generates from, and the answer's are the whole text's ids after the
    prompt's (lm-eval splits a context/continuation pair the same way).
    Truncation keeps the start; an answer cut away entirely is an error, not a silent zero loss.
    """
    prompt_ids = tokenize(tokenizer, sample.prompt)
    answer_ids = tokenize(tokenizer, sample.prompt + sample.answer)[len(prompt_ids):]
    # the paper's format ends an answer with eos; a chat template's answer already ends with its end of turn
    if sample.fmt != "chat" and (not answer_ids or answer_ids[-1] != tokenizer.eos_token_id):
        answer_ids = answer_ids + [tokenizer.eos_token_id]
    ids = (prompt_ids + answer_ids)[:max_length]
    if len(prompt_ids) >= max_length:
        raise DataError(
            f"{where}: the prompt alone is {len(prompt_ids)} tokens, so the cutoff of {max_length} tokens removes the "
            "whole answer; shorten the prompt, or raise max_length (a sweep config field)"
        )
    labels = [IGNORE] * len(prompt_ids) + ids[len(prompt_ids):]
    return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels])}


def load_encoded(path: str | Path, tokenizer, max_length: int = 2048, k: int | None = None, seed: int = 0,
                 fmt: str = "paper") -> list[dict[str, torch.Tensor]]:
    rows = read_jsonl(path)
    idx = list(range(len(rows))) if k is None else choose_seeds(len(rows), k, seed)
    samples = to_samples([rows[i] for i in idx], tokenizer, fmt)
    return [encode(s, tokenizer, max_length, f"{path} line {i + 1}") for s, i in zip(samples, idx)]


def choose_seeds(n: int, k: int, seed: int = 0) -> list[int]:
    """k distinct indices out of n, the same for the same (n, k, seed) on any machine."""
    if k < 1:
        raise DataError(f"k={k} seed samples: k must be at least 1 (leave it unset to use every sample)")
    if k > n:
        raise DataError(f"asked for {k} seed samples but the file has only {n}; lower k or add samples")
    return sorted(random.Random(seed).sample(range(n), k))
