"""The data route: what a practitioner with the teacher in hand would do instead of moving weights.

- `kd` (Hinton, Vinyals, Dean 2015): the student's LoRA is trained to match the teacher's next-token
  distribution, KL(teacher || student) at every position of unlabeled prompts;
- `seq-kd` (Kim & Rush, EMNLP 2016): the student's LoRA is trained on the teacher's own greedy
  completions of the same prompts, as ordinary answer-only fine-tuning.

Both read the teacher's outputs, never its weights, and never an answer: the prompts are user turns
only (a task's prompts.jsonl, or the user turns of its train.jsonl), so what reaches the student is
what the teacher says about them. They run at the same rank and optimizer steps as the parametric arms
(pkt_core/finetune.py's loop, with this module's objective for kd).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .data import DataError, format_prompt, read_jsonl, tokenize, validate_sample

PROMPTS_FILE = "prompts.jsonl"  # one {"messages": [user (and system) turns]} a line, no assistant turn


def prompt_file(task_dir: str | Path) -> str:
    """The file of a task directory the data route reads its prompts from: prompts.jsonl, or else
    train.jsonl (whose answers are dropped)."""
    return PROMPTS_FILE if (Path(task_dir) / PROMPTS_FILE).exists() else "train.jsonl"


def prompt_rows(rows: list[dict]) -> list[dict]:
    """Chat rows without their answers: every turn before the last assistant turn (prompts.jsonl's lines)."""
    out = []
    for r in rows:
        msgs = r["messages"]
        out.append({"messages": msgs[:-1] if msgs[-1]["role"] == "assistant" else list(msgs)})
    return out


def write_prompts(path: str | Path, rows: list[dict]) -> Path:
    """prompts.jsonl of chat rows (their answers dropped), each distinct prompt once, in order."""
    seen, lines = set(), []
    for r in prompt_rows(rows):
        line = json.dumps(r)
        if line not in seen:
            seen.add(line)
            lines.append(line)
    Path(path).write_text("".join(f"{x}\n" for x in lines))
    return Path(path)


def read_prompts(task_dir: str | Path) -> list[list[dict]]:
    """The turns of every prompt the data route reads (no assistant turn at the end of any)."""
    path = Path(task_dir) / prompt_file(task_dir)
    if path.name != PROMPTS_FILE:
        return [r["messages"] for r in prompt_rows(read_jsonl(path))]
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        msgs = json.loads(line).get("messages")
        # the same checks as a chat sample's, with a placeholder answer where a prompt has none
        validate_sample({"messages": [*(msgs or []), {"role": "assistant", "content": "-"}]}, f"{path} line {n}")
        if msgs[-1]["role"] == "assistant":
            raise DataError(f"{path} line {n}: a prompt ends with an assistant turn (an answer); drop it: the data "
                            "route reads prompts only")
        rows.append(msgs)
    if not rows:
        raise DataError(f"{path}: no prompts; give one {{\"messages\": [user turns]}} a line")
    return rows


def prompt_texts(turns: list[list[dict]], tokenizer=None, fmt: str = "paper") -> list[str]:
    """Each prompt formatted exactly as training and scoring format the text before an answer (data.render's fmt)."""
    return [format_prompt([*t, {"role": "assistant", "content": ""}], tokenizer, fmt) for t in turns]


def encode_prompts(texts: list[str], tokenizer, max_length: int) -> list[dict[str, torch.Tensor]]:
    """1 x T input ids per prompt (its last max_length tokens: the end is where an answer would start);
    labels mark every position kd distills (all of them)."""
    out = []
    for t in texts:
        ids = torch.tensor([tokenize(tokenizer, t)[-max_length:]])
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def kd_objective(teacher, temperature: float = 1.0):
    """finetune()'s objective for logit distillation: the mean over the batch's prompt positions of
    KL(teacher || student) between next-token distributions at `temperature` (times T^2, Hinton's
    scaling, so the gradient's size does not shrink with T). It calls backward itself."""
    from .finetune import collate

    teacher.eval()

    def objective(model, batch, micro: int, pad_id: int, device) -> float:
        n_positions = sum(int(s["input_ids"].shape[1]) for s in batch)
        total = 0.0
        for i in range(0, len(batch), micro):
            mb = {k: v.to(device) for k, v in collate(batch[i:i + micro], pad_id).items()}
            with torch.no_grad():
                t_logits = teacher(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits.float()
            s_logits = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits.float()
            if t_logits.shape[-1] != s_logits.shape[-1]:
                raise ValueError(f"teacher vocabulary {t_logits.shape[-1]} != student's {s_logits.shape[-1]}: "
                                 "distillation needs one token -> id map")
            kl = torch.nn.functional.kl_div(torch.log_softmax(s_logits / temperature, -1),
                                            torch.log_softmax(t_logits / temperature, -1), log_target=True,
                                            reduction="none").sum(-1)
            kl_sum = (kl * mb["attention_mask"]).sum() * temperature ** 2
            (kl_sum / n_positions).backward()
            total += kl_sum.item()
        return total / max(n_positions, 1)

    return objective


def kd_loss(student, teacher, samples: list[dict[str, torch.Tensor]], pad_id: int, micro: int = 32) -> float:
    """The kd objective's value (mean KL per prompt position, nats) with no training: its own loss."""
    from .finetune import collate

    device = next(student.parameters()).device
    kl_total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(samples), micro):
            mb = {k: v.to(device) for k, v in collate(samples[i:i + micro], pad_id).items()}
            s, t = (torch.log_softmax(m(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits.float(),
                                      -1) for m in (student, teacher))
            kl_total += float(((t.exp() * (t - s)).sum(-1) * mb["attention_mask"]).sum())
            n += int(mb["attention_mask"].sum())
    return kl_total / max(n, 1)


def greedy_completions(teacher, tokenizer, texts: list[str], max_new_tokens: int = 32,
                       end_of_turn: str | None = None) -> list[str]:
    """The teacher's greedy continuation of each prompt text, up to its end-of-text token, the prompt
    format's end of turn (data.end_of_turn: a chat template's <|im_end|>; not kept) or max_new_tokens,
    decoded without special tokens. One prompt at a time: no padding to get wrong."""
    device = next(teacher.parameters()).device
    stops = [tokenizer.eos_token_id]
    if end_of_turn and (eot := tokenizer.convert_tokens_to_ids(end_of_turn)) not in (None, tokenizer.unk_token_id):
        stops.append(eot)  # a special token of its own: generation stops on it
    out = []
    teacher.eval()
    for text in texts:
        ids = torch.tensor([tokenize(tokenizer, text)], device=device)
        with torch.no_grad():
            gen = teacher.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                   max_new_tokens=max_new_tokens, eos_token_id=stops,
                                   pad_token_id=tokenizer.pad_token_id)
        completion = tokenizer.decode(gen[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
        out.append(completion.split(end_of_turn, 1)[0] if end_of_turn else completion)  # an end of turn in words
    return out


def completion_rows(turns: list[list[dict]], completions: list[str]) -> list[dict]:
    """Chat rows (prompt turns + the teacher's completion as the answer) for finetune, leaving out
    completions that are empty once stripped (nothing to train on but the end-of-text token)."""
    return [{"messages": [*t, {"role": "assistant", "content": c}]} for t, c in zip(turns, completions, strict=True)
            if c.strip()]

