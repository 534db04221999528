"""Caching pays: first run vs repeated run, and a second student of the same shape.

Prints, measured in one run on a fresh store:
  - `pkt extract` first vs repeated, on a synthetic ~150M-parameter teacher (a real extraction is
    dominated by the sensitivity pass; Prefect's fixed cost per flow run is about half a second)
    (target: repeated <= 5% of first)
  - the demo's sweep over the miniature family (every variant, its seeds), first vs repeated
    (target: repeated <= 5% of first); the family is built before the clock starts
  - adding a second student of the same shape: seconds of teacher work (target: 0)
  - (--part nodes) seconds of each extraction node on a synthetic teacher/student pair with a
    128k-token vocabulary (real models' size of embed and lm_head), the LoRA init with the default
    SVD (randomized for large pieces) and with --svd full side by side

    python bench/pipeline.py [--part all|cache|nodes] [--size demo|test] [--teacher-hidden 1024 --teacher-layers 12]
                             [--vocab 128000 --vocab-hidden 1024 --vocab-layers 4]

--size demo (the default) takes about 12 minutes on 2 CPU cores; --size test about 3; --part nodes about 5.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TEACHER_KINDS = {"sensitivity", "layer_plan", "extraction"}


def timed(fn, **kw):
    t0 = time.perf_counter()
    out = fn(**kw)
    return out, time.perf_counter() - t0


def teacher_seconds(store, nodes) -> float:
    """Seconds the store records for teacher-side nodes that this run computed."""
    return sum(store.record(kind, key)["seconds"] for kind, key, status in nodes
               if kind in TEACHER_KINDS and status == "computed")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="demo", choices=["demo", "test"], help="miniature family for the sweep")
    ap.add_argument("--teacher-hidden", type=int, default=1024)
    ap.add_argument("--teacher-layers", type=int, default=12)
    ap.add_argument("--part", default="all", choices=["all", "cache", "nodes"])
    ap.add_argument("--vocab", type=int, default=128_000)
    ap.add_argument("--vocab-hidden", type=int, default=1024)
    ap.add_argument("--vocab-layers", type=int, default=4)
    ap.add_argument("--seeds-k", type=int, default=8, help="seed samples in the node timing (paper: 32)")
    args = ap.parse_args()
    if args.part in ("all", "nodes"):
        node_seconds(args)
    if args.part in ("all", "cache"):
        caching(args)


def node_seconds(args) -> None:
    """Seconds of each node of `pkt extract` on a vocabulary-sized pair, from the store's records."""
    from pkt.artifacts.store import Store
    from pkt.core.mini.tasks import write_task
    from pkt.flows.extract import extract_teacher

    work = Path(tempfile.mkdtemp(prefix="pkt-bench-nodes-"))
    teacher = synthetic_llama(work / "teacher", args.vocab_hidden, args.vocab_layers, args.vocab)
    student = synthetic_llama(work / "student", args.vocab_hidden // 2, args.vocab_layers // 2, args.vocab)
    write_task(work / "gsm", "gsm", n_train=64, n_val=0, n_test=0, n_seeds=32)
    store = Store(work / "store")
    seconds = {}
    for svd in ("auto", "full"):  # the second run recomputes the LoRA init only (svd is its parameter)
        out = extract_teacher(teacher=str(teacher), seeds=str(work / "gsm/seeds.jsonl"), students=[str(student)],
                              rank=16, alpha=16.0, k=args.seeds_k, store=str(store.root), svd=svd)
        for kind, key, status in out["_ledger"]:
            if status == "computed":
                seconds[(kind, svd)] = store.record(kind, key)["seconds"]
    print(f"nodes of `pkt extract`, teacher {args.vocab_hidden}x{args.vocab_layers} and student "
          f"{args.vocab_hidden // 2}x{args.vocab_layers // 2}, vocabulary {args.vocab:,}, {args.seeds_k} seed "
          f"samples, rank 16:")
    for kind in ("sensitivity", "layer_plan", "extraction", "lora_init"):
        full = f", --svd full {seconds[(kind, 'full')]:.1f}s" if (kind, "full") in seconds else ""
        print(f"  {kind:12s} {seconds[(kind, 'auto')]:7.1f}s{full}")
    print(f"  lora_init --svd full / default: {seconds[('lora_init', 'full')] / seconds[('lora_init', 'auto')]:.1f}x",
          flush=True)
    shutil.rmtree(work, ignore_errors=True)


def caching(args) -> None:

    from pkt.artifacts.store import Store
    from pkt.flows.demo import build_family, demo_config
    from pkt.flows.extract import extract_teacher
    from pkt.flows.sweep import sweep
    from pkt.core.mini.tasks import write_task

    work = Path(tempfile.mkdtemp(prefix="pkt-bench-"))
    store = str(work / "store")
    fam = Path(build_family(size=args.size, store=store)["root"])  # also warms Prefect's ephemeral server
    twin = work / "student-chat"
    shutil.copytree(fam / "student", twin)
    _perturb(twin)  # same shape, different weights: a "chat" variant of the base student

    big_teacher = synthetic_llama(work / "big-teacher", args.teacher_hidden, args.teacher_layers)
    big_student = synthetic_llama(work / "big-student", args.teacher_hidden // 2, args.teacher_layers // 2)
    seeds = work / "seeds.jsonl"
    write_task(work / "gsm", "gsm", n_train=64, n_val=0, n_test=0, n_seeds=32)
    shutil.copy(work / "gsm" / "seeds.jsonl", seeds)
    ex = {"teacher": str(big_teacher), "seeds": str(seeds), "students": [str(big_student)], "rank": 16,
          "alpha": 16.0, "store": store}
    print(f"family size {args.size}; store {store}", flush=True)
    _, t_first = timed(extract_teacher, **ex)
    _, t_again = timed(extract_teacher, **ex)
    print(f"pkt extract ({args.teacher_hidden}x{args.teacher_layers} teacher): first {t_first:.1f}s, repeated "
          f"{t_again:.2f}s, ratio {t_again / t_first:.3f} (target <= 0.05)", flush=True)

    seed_list = [0, 1, 2] if args.size == "demo" else [0, 1]
    config = demo_config(str(fam), args.size, seed_list, store, str(work / "report"))
    first, s_first = timed(sweep, config=config)
    again, s_again = timed(sweep, config=config)
    print(f"sweep ({len(config['variants'])} variants x {len(seed_list)} seeds): first {s_first:.1f}s "
          f"({first['computed']} nodes), repeated {s_again:.2f}s ({again['computed']} computed), "
          f"ratio {s_again / s_first:.3f} (target <= 0.05)", flush=True)

    # the twin joins for one transfer run: its teacher chain (same shape) must come from the store
    added, _ = timed(sweep, config=dict(config, students=[str(twin)], variants=["transfer"], seeds=[0]))
    print(f"second student of the same shape: {added['computed']} nodes computed, teacher work "
          f"{teacher_seconds(Store(store), added['nodes']):.2f}s (target 0)", flush=True)
    shutil.rmtree(work, ignore_errors=True)


def synthetic_llama(path: Path, hidden: int, layers: int, vocab: int | None = None) -> Path:
    """A random Llama with the miniature tokenizer (its vocabulary padded to `vocab` tokens), saved as
    an HF model dir."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = padded_tokenizer(vocab)
    torch.manual_seed(hidden + layers)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=int(hidden * 2.6875),
                      num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                      num_key_value_heads=max(1, hidden // 128), max_position_embeddings=256)
    LlamaForCausalLM(cfg).save_pretrained(str(path), safe_serialization=True)
    tok.save_pretrained(str(path))
    return path


def padded_tokenizer(vocab: int | None):
    """The miniature tokenizer; with vocab, its word-level vocabulary padded with unused tokens to that
    size (a real model's embedding and lm_head size, same ids for the text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from pkt.core.mini.tokenizer import build_tokenizer

    base = build_tokenizer()
    if vocab is None or vocab <= len(base):
        return base
    ids = dict(base.get_vocab())
    ids.update({f"<unused{i}>": i for i in range(len(ids), vocab)})
    core = Tokenizer(models.WordLevel(vocab=ids, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens(base.all_special_tokens)
    core.add_tokens([t for t in base.get_added_vocab() if t not in base.all_special_tokens])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", padding_side="left")


def _perturb(model_dir: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    w = load_file(str(model_dir / "model.safetensors"))
    g = torch.Generator().manual_seed(7)
    save_file({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in w.items()},
              str(model_dir / "model.safetensors"), metadata={"format": "pt"})


if __name__ == "__main__":
    main()
