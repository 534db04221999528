"""Evaluation through lm-evaluation-harness, on local chat jsonl or lm-eval's own tasks.

pkt ships task YAMLs (lm_eval_tasks/) for GSM-style numeric exact match, MMLU-style multiple
choice, Super-NI-style generation (EM, ROUGE-L) and the answer log-likelihood; their
data_files are filled in at run time. Any other name (gsm8k, mmlu, ...) goes to lm-eval as is.
"""
from __future__ import annotations

import functools
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from . import answers, data, stop
from .errors import UserError

TASK_DIR = Path(__file__).parent / "lm_eval_tasks"
BENCHMARKS = {  # pkt name -> lm-eval task, the per-example metric to keep, and its summary name
    "gsm": ("pkt_gsm", "exact_match", "strict-match"),
    "mmlu": ("pkt_mmlu", "acc", "none"),
    "sni": ("pkt_sni", "exact_match", "none"),
    "answer_nll": ("pkt_answer_nll", None, "none"),
}


CHECKED = {"gsm": True, "sni": False}  # generated benchmarks the pre-scoring check reads: needs a number?


class BrokenAnswers(UserError, RuntimeError):
    pass


@dataclass(frozen=True)
class EvalResult:
    summary: dict[str, float]  # metric -> value over the split
    per_example: dict[str, torch.Tensor]  # metric -> [n] values in document order
    outputs: tuple[str, ...] = ()  # generated texts (generation tasks, stop sequence cut), document order
    docs: tuple[dict, ...] = ()  # the documents, document order


def task_config(benchmark: str, data_dir: str | Path, split: str = "test", num_fewshot: int = 0, tokenizer=None,
                prompt_format: str = "paper", max_gen_toks: int | None = None, context: int | None = None) -> dict:
    """The shipped YAML as a dict, pointed at data_dir/{train,<split>}.jsonl, its prompts rendered by
    pkt.core.data.render in prompt_format ("paper" or "chat", the tokenizer's template), generation
    stopping at that format's end of turn, with max_gen_toks new tokens (None: the YAML's), at most half
    of a model context of `context` tokens (lm-eval leaves the rest to the prompt)."""
    from lm_eval.tasks._yaml_loader import load_yaml as load_yaml_config  # resolves !function tags

    name = BENCHMARKS[benchmark][0]
    cfg = load_yaml_config(str(TASK_DIR / f"{name}.yaml"))
    data_dir = Path(data_dir)
    files = {"test": str(data_dir / f"{split}.jsonl")}
    if (data_dir / "train.jsonl").exists():
        files["train"] = str(data_dir / "train.jsonl")
    for f in files.values():
        if not Path(f).exists():
            raise FileNotFoundError(f"benchmark {benchmark!r}: {f} does not exist; a task directory holds "
                                    "train.jsonl and test.jsonl (and val.jsonl) in the chat format")
    cfg["dataset_kwargs"] = {"data_files": files}
    cfg["task"] = f"{name}_{split}_{num_fewshot}shot_{prompt_format}"
    cfg["num_fewshot"] = num_fewshot
    if num_fewshot and "train" not in files:
        raise FileNotFoundError(f"{num_fewshot}-shot {benchmark} needs {data_dir}/train.jsonl for the shots")
    cfg["doc_to_text"] = functools.partial(_prompt, tokenizer=tokenizer, fmt=prompt_format)
    if benchmark == "answer_nll":  # the answer as training sees it (in the chat format, with its end of turn)
        cfg["doc_to_target"] = functools.partial(_answer, tokenizer=tokenizer, fmt=prompt_format)
    gen = cfg.get("generation_kwargs")
    if gen is not None:
        if prompt_format == "chat":
            gen["until"] = [data.end_of_turn(tokenizer, "chat")]
        gen["max_gen_toks"] = min(max_gen_toks or gen["max_gen_toks"], context // 2 if context else 10**9)
    return cfg


def _prompt(doc: dict, tokenizer, fmt: str) -> str:
    return data.render(doc["messages"], tokenizer, fmt)[0]


def _answer(doc: dict, tokenizer, fmt: str) -> str:
    return data.render(doc["messages"], tokenizer, fmt)[1]


def evaluate(model, tokenizer, benchmark: str, data_dir: str | Path | None = None, *, split: str = "test",
             num_fewshot: int = 0, batch_size: int = 64, limit: int | None = None,
             judge: str | Path | None = None, prompt_format: str = "paper",
             max_gen_toks: int | None = None) -> EvalResult:
    """Score a loaded model (merge a LoRA into it first) on one benchmark.

    benchmark: gsm | mmlu | sni | answer_nll over data_dir, or any lm-eval task name (hub data, rendered
    with lm-eval's own apply_chat_template in the chat format); winrate (instruction following) needs
    judge=<path of a local judge model>. prompt_format: "paper" or "chat" (data.resolve_format).
    max_gen_toks: new tokens a generation task may write (None: the task's YAML, 512 for gsm), at most
    half the model's context (lm-eval leaves the rest to the prompt).
    """
    prompt_format = data.resolve_format(prompt_format, tokenizer)
    if benchmark == "winrate":
        return instruction_win_rate(model, tokenizer, data_dir, judge, split=split, limit=limit,
                                    batch_size=batch_size, prompt_format=prompt_format)
    from lm_eval import evaluator

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    # HFLM warns on every in-memory model ("not of type str"): passing one is what pkt means to do
    logging.getLogger("lm_eval.models.huggingface").setLevel(logging.ERROR)
    # lm-eval records `git describe` of the working directory, and git prints "fatal: not a git
    # repository" for every evaluation run outside a checkout; pkt keeps no git hash
    evaluator.get_git_commit_hash = lambda: None
    device = str(next(model.parameters()).device)
    lm = _hflm_class()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    ours = benchmark in BENCHMARKS
    task = (task_config(benchmark, data_dir, split, num_fewshot, tokenizer, prompt_format, max_gen_toks, lm.max_length)
            if ours else benchmark)
    with stop.on_every_forward(model):  # lm-eval's batch loops are not ours: stop at its next model call
        out = _lm_eval(lm, task, None if ours else num_fewshot, limit, include_defaults=not ours,
                       chat=prompt_format == "chat" and not ours)
    name = next(iter(out["results"]))
    kept_filter = BENCHMARKS[benchmark][2] if ours else None
    result = _collect(benchmark, out["results"][name], out["samples"][name], kept_filter)
    return _per_token(result, tokenizer, prompt_format) if benchmark == "answer_nll" else result


def _per_token(result: EvalResult, tokenizer, fmt: str) -> EvalResult:
    """answer_nll also per answer token (the sum mostly measures how long an answer is), the tokens
    counted as lm-eval splits context and continuation (data.encode's split)."""
    lengths = []
    for doc in result.docs:
        prompt, answer = data.render(doc["messages"], tokenizer, fmt)
        lengths.append(len(data.tokenize(tokenizer, prompt + answer)) - len(data.tokenize(tokenizer, prompt)))
    per_token = result.per_example["answer_nll"] / torch.tensor(lengths, dtype=torch.float64).clamp(min=1)
    summary = {**result.summary, "answer_nll_per_token": float(per_token.mean())}
    return EvalResult(summary, {**result.per_example, "answer_nll_per_token": per_token}, result.outputs, result.docs)


@functools.lru_cache(maxsize=1)
def _hflm_class():
    """lm-eval's HF model, drawing its request bars only on a terminal (it passes disable=False to
    tqdm explicitly, which no environment variable overrides)."""
    from lm_eval.models.huggingface import HFLM

    from .progress import on_terminal

    class HFLMBarsOnTerminal(HFLM):
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not on_terminal())

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm or not on_terminal())

        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm=disable_tqdm or not on_terminal())

    return HFLMBarsOnTerminal


def _lm_eval(lm, task, num_fewshot: int | None, limit: int | None, include_defaults: bool, chat: bool = False) -> dict:
    """lm-eval's simple_evaluate, seeded the same way, minus what it adds after scoring: its
    environment report runs `pip list` and `git` in subprocesses, ~0.8 s per call, which dominated
    a score of the miniature family (lm-eval documents evaluate() as the core for such callers)."""
    import random

    import numpy as np
    from lm_eval import evaluator

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    loaded = _task_manager(include_defaults).load([task])
    for obj in loaded["tasks"].values():  # simple_evaluate's num_fewshot rule: a YAML's explicit 0 stays
        if num_fewshot is not None and obj.get_config("num_fewshot") != 0:
            obj.set_config(key="num_fewshot", value=num_fewshot)
        elif obj.get_config("num_fewshot") is None:
            obj.set_config(key="num_fewshot", value=0)
        obj.set_fewshot_seed(seed=0)
    return evaluator.evaluate(lm=lm, task_dict=loaded, limit=limit, log_samples=True, bootstrap_iters=0,
                              apply_chat_template=chat)


def lm_eval_task_names() -> set[str]:
    """Every task and group name lm-eval knows here (indexing takes ~20 s; the index is kept for the run)."""
    return set(_task_manager(True).all_tasks)


@functools.lru_cache(maxsize=2)
def _task_manager(include_defaults: bool):
    """Indexing lm-eval's thousands of built-in tasks takes ~20 s: skip it for pkt's own, do it once."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=include_defaults)


def _collect(benchmark: str, results: dict, samples: list[dict], kept_filter: str | None) -> EvalResult:
    """Summary metrics, and per-example values for one filter (lm-eval logs a sample per filter)."""
    if kept_filter is not None:
        samples = [s for s in samples if s.get("filter", "none") == kept_filter]
    samples = sorted(samples, key=lambda s: s["doc_id"])
    summary = {k.split(",")[0] + ("" if k.endswith(",none") else "/" + k.split(",")[1]): float(v)
               for k, v in results.items() if "," in k and "_stderr" not in k and isinstance(v, (int, float))}
    per = {}
    if benchmark == "answer_nll":
        # lm-eval's perplexity and greedy-acc over a summed log-likelihood are not what pkt reports
        per["answer_nll"] = torch.tensor([-float(s["resps"][0][0][0]) for s in samples], dtype=torch.float64)
        summary = {"answer_nll": float(per["answer_nll"].mean())}
    else:
        for metric in ("exact_match", "acc", "rougeL"):
            rows = [s for s in samples if metric in s]
            if rows and len(rows) == len(samples):
                per[metric] = torch.tensor([float(s[metric]) for s in rows], dtype=torch.float64)
    per["doc_id"] = torch.tensor([s["doc_id"] for s in samples], dtype=torch.int64)
    # the generated text as written (a filter's output is the answer read from it, e.g. "72")
    outputs = tuple(s["resps"][0][0] for s in samples if isinstance(s["resps"][0][0], str))
    return EvalResult(summary, per, outputs, tuple(s["doc"] for s in samples))


def instruction_win_rate(model, tokenizer, data_dir, judge: str | Path | None, *, split: str = "test",
                         limit: int | None = None, batch_size: int = 64, prompt_format: str = "paper") -> EvalResult:
    """Generate answers (lm-eval, the Super-NI-style YAML), then judge each against the reference
    with a local model in both orders (pkt_core.judge). Optional: needs a judge model path."""
    from . import judge as judging
    from .models import load_model, load_tokenizer

    if judge is None:
        raise ValueError("benchmark 'winrate' needs a judge model: set judge: PATH in the sweep config "
                         "(a local causal LM that reads the same chat format)")
    gen = evaluate(model, tokenizer, "sni", data_dir, split=split, limit=limit, batch_size=batch_size,
                   prompt_format=prompt_format)
    questions = [next(m["content"] for m in d["messages"] if m["role"] == "user") for d in gen.docs]
    references = [d["messages"][-1]["content"] for d in gen.docs]
    with stop.on_every_forward(load_model(judge)) as judge_model:
        wins = judging.win_rates(judge_model, load_tokenizer(judge), questions, list(gen.outputs), references)
    return EvalResult({"winrate": float(wins.mean())}, {"winrate": wins, "doc_id": gen.per_example["doc_id"]},
                      gen.outputs, gen.docs)


def check_answers(model, tokenizer, benchmark: str, data_dir: str | Path, *, prompt_format: str, n: int = 5,
                  max_gen_toks: int | None = None, who: str = "the student") -> None:
    """Greedy answers to the first n val items (test.jsonl when there is no val.jsonl) of a generated
    benchmark; raises BrokenAnswers, one sentence naming the prompt format and the fix, when they look
    broken for it (answers.broken: all empty, all the same, refusals, or no answer stated in any)."""
    prompt_format = data.resolve_format(prompt_format, tokenizer)
    split = "val" if (Path(data_dir) / "val.jsonl").exists() else "test"
    outputs = evaluate(model, tokenizer, benchmark, data_dir, split=split, limit=n, prompt_format=prompt_format,
                       max_gen_toks=max_gen_toks).outputs
    problem = answers.broken(list(outputs), needs_number=CHECKED[benchmark])
    if problem is None:
        return
    if prompt_format == "chat":
        fix = "check its chat template (tokenizer_config.json or chat_template.jinja), or try --prompt-format paper"
    elif getattr(tokenizer, "chat_template", None):
        fix = "score it in its own chat template (--prompt-format chat, or auto)"
    else:
        fix = ("give it a chat template (an instruct model) or use a model trained on the paper's "
               "<|user|>/<|assistant|> layout")
    raise BrokenAnswers(f"{who}: its {benchmark} answers to {len(outputs)} {split} items in the {prompt_format} "
                        f"prompt format {problem}, so its scores would measure nothing; {fix}, or pass --no-check "
                        "(check: false in a sweep config) to score it anyway")


def task_digest(benchmark: str) -> str:
    """sha256 of the shipped YAML (and metric or judging code) behind a benchmark: part of a score's
    identity, so editing a task definition re-scores instead of reusing stale numbers."""
    if benchmark == "winrate":  # the generation YAML + the judging code
        judge_code = (Path(__file__).parent / "judge.py").read_bytes()
        return hashlib.sha256(task_digest("sni").encode() + judge_code).hexdigest()
    if benchmark not in BENCHMARKS:
        import lm_eval

        return f"lm-eval=={lm_eval.__version__}:{benchmark}"
    h = hashlib.sha256()
    # the YAML, its functions, data.py, whose render builds every prompt, and answers.py, which reads answers
    for f in (TASK_DIR / f"{BENCHMARKS[benchmark][0]}.yaml", TASK_DIR / "pkt_metrics.py",
              Path(__file__).parent / "data.py", Path(__file__).parent / "answers.py"):
        h.update(f.read_bytes())
    return h.hexdigest()


def primary_metric(benchmark: str) -> str:
    return {"gsm": "exact_match/strict-match", "mmlu": "acc", "sni": "exact_match", "answer_nll": "answer_nll",
            "winrate": "winrate"}.get(
        benchmark, "acc")
