"""The miniature model family: a teacher and a student (Llama architecture, the teacher deeper and
wider) pretrained on one mixture with one tokenizer, the way a real model family is.

Equal step budgets do not give a better teacher (the small model learns addition first), so the
teacher trains to a quality gate (held-out exact match) under a step cap; the student gets a
fixed, smaller budget.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from .. import stop
from ..data import format_prompt
from ..progress import Progress
from . import tasks
from .tokenizer import build_tokenizer, vocab_size


@dataclass(frozen=True)
class ModelRecipe:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    lr: float
    steps: int  # fixed budget, or the cap when gate_em is set
    gate_em: float | None = None
    check_every: int = 250
    early_step: int | None = None  # also save the weights at this step (a weaker checkpoint)


@dataclass(frozen=True)
class FamilyRecipe:
    teacher: ModelRecipe
    student: ModelRecipe
    batch: int = 32
    task_fraction: float = 0.8
    n_texts: int = 20000
    block: int = 40  # packed sequence length: about one worked addition
    seed: int = 0


SIZES = {
    "demo": FamilyRecipe(
        teacher=ModelRecipe(layers=4, hidden=128, intermediate=344, heads=4, kv_heads=4, lr=3e-3, steps=1200,
                            gate_em=0.7, check_every=200, early_step=500),
        student=ModelRecipe(layers=2, hidden=64, intermediate=172, heads=4, kv_heads=4, lr=3e-3, steps=600),
    ),
    # the study's families (two of them, built with different seeds): small enough that every variant
    # over a grid of lr x scale x 5 seeds x 2 tasks runs in well under an hour on 2 shared cores
    "study": FamilyRecipe(
        teacher=ModelRecipe(layers=3, hidden=64, intermediate=160, heads=4, kv_heads=2, lr=3e-3, steps=700,
                            gate_em=0.5, check_every=100, early_step=250),
        student=ModelRecipe(layers=2, hidden=32, intermediate=88, heads=4, kv_heads=4, lr=3e-3, steps=300),
        n_texts=12000,
    ),
    # seconds, for tests: a GQA teacher so the kv-head path is exercised end to end
    "test": FamilyRecipe(
        teacher=ModelRecipe(layers=2, hidden=32, intermediate=64, heads=4, kv_heads=2, lr=3e-3, steps=40,
                            early_step=20),
        student=ModelRecipe(layers=1, hidden=16, intermediate=32, heads=2, kv_heads=2, lr=3e-3, steps=30),
        n_texts=600, batch=16,
    ),
}


def recipe(size: str, seed: int | None = None) -> FamilyRecipe:
    """The recipe of a size; another seed builds an independent family of the same size (other
    initial weights, data order and task samples)."""
    if size not in SIZES:
        raise ValueError(f"unknown family size {size!r}; choose one of {', '.join(SIZES)}")
    return SIZES[size] if seed is None else replace(SIZES[size], seed=seed)


def recipe_params(size: str, seed: int | None = None) -> dict:
    return asdict(recipe(size, seed))


def llama_config(r: ModelRecipe):
    from transformers import LlamaConfig

    tok = build_tokenizer()
    return LlamaConfig(
        vocab_size=vocab_size(), hidden_size=r.hidden, intermediate_size=r.intermediate, num_hidden_layers=r.layers,
        num_attention_heads=r.heads, num_key_value_heads=r.kv_heads, max_position_embeddings=256,
        tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def exact_match(model, tokenizer, rows: list[dict], max_new_tokens: int = 24, batch: int = 64) -> float:
    """Greedy generation (transformers' generate) vs the reference answer, stripped."""
    hits = 0
    model.eval()
    for i in range(0, len(rows), batch):
        chunk = rows[i:i + batch]
        prompts = [format_prompt(r["messages"]) for r in chunk]
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad(), stop.on_every_forward(model):  # generation's token loop is transformers'
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        hits += sum(t.strip() == r["messages"][-1]["content"].strip() for t, r in zip(texts, chunk))
    return hits / max(len(rows), 1)


def pretrain(r: ModelRecipe, family: FamilyRecipe, out_dir: Path, name: str, log=print,
             progress: bool = True) -> dict:
    """Pretrain one member; writes out_dir (and out_dir-early when early_step is set). Returns stats."""
    from transformers import LlamaForCausalLM, get_cosine_schedule_with_warmup

    tok = build_tokenizer()
    torch.manual_seed(family.seed)
    model = LlamaForCausalLM(llama_config(r))
    blocks = packed_blocks(tok, tasks.pretraining_texts(family.n_texts, family.task_fraction, family.seed),
                           family.block)
    held = tasks.make_splits("gsm", n_train=0, n_val=100, n_test=0, seed=family.seed)["val"]
    opt = torch.optim.AdamW(model.parameters(), lr=r.lr, weight_decay=0.01)
    sched = get_cosine_schedule_with_warmup(opt, max(1, r.steps // 20), r.steps)
    g = torch.Generator().manual_seed(family.seed)
    em, step, t0 = float("nan"), 0, time.time()
    bar = Progress(r.steps, f"pretrain {name}", "step", enabled=progress)
    for step in range(1, r.steps + 1):
        model.train()
        batch = blocks[torch.randint(len(blocks), (family.batch,), generator=g)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if r.early_step == step:
            _save(model, tok, Path(str(out_dir) + "-early"))
        if r.gate_em is not None and step % r.check_every == 0:
            em = exact_match(model, tok, held)
            log(f"{name}: step {step}, held-out gsm exact match {em:.1%}")
            if em >= r.gate_em:
                break
    bar.close()
    if math.isnan(em) or r.gate_em is None or step % r.check_every:
        em = exact_match(model, tok, held)
    if r.gate_em is not None and em < r.gate_em:
        log(f"WARNING {name}: step cap {r.steps} reached at {em:.1%} held-out exact match, below the gate "
            f"{r.gate_em:.0%}; the family is usable but the teacher is weaker than intended (raise steps)")
    _save(model, tok, out_dir)
    return {"name": name, "steps": step, "gsm_em": em, "seconds": round(time.time() - t0, 1),
            "params": sum(p.numel() for p in model.parameters())}


def packed_blocks(tok, texts: list[str], block: int) -> torch.Tensor:
    """Documents joined by eos and cut into equal blocks: no padding, every token trains."""
    stream = []
    for t in texts:
        stream += tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    n = len(stream) // block
    return torch.tensor(stream[: n * block]).view(n, block)


def _save(model, tok, path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path), safe_serialization=True)
    tok.save_pretrained(str(path))


TASK_SIZES = {"demo": dict(n_train=1000, n_val=100, n_test=200), "study": dict(n_train=512, n_val=64, n_test=128),
              "test": dict(n_train=64, n_val=16, n_test=16, n_seeds=8)}


def build_family(out: str | Path, size: str = "demo", log=print, progress: bool = True, seed: int | None = None) -> dict:
    """Write teacher/, teacher-early/, student/ and tasks/<task>/*.jsonl under out; returns stats."""
    fam = recipe(size, seed)
    out = Path(out)
    stats = {"teacher": pretrain(fam.teacher, fam, out / "teacher", "teacher", log, progress),
             "student": pretrain(fam.student, fam, out / "student", "student", log, progress)}
    for t in tasks.TASKS:
        tasks.write_task(out / "tasks" / t, t, seed=fam.seed, **TASK_SIZES[size])
    return stats
