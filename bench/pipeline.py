"""Caching pays: first run vs repeated run, and a second student of the same shape.

Prints, measured in one run on a fresh store:
  - `pkt extract` first vs repeated, on a synthetic ~150M-parameter teacher (a real extraction is
    dominated by the sensitivity pass; Prefect's fixed cost per flow run is about half a second)
    (target: repeated <= 5% of first)
  - the demo's sweep over the miniature family (every variant, its seeds), first vs repeated
    (target: repeated <= 5% of first); the family is built before the clock starts
  - adding a second student of the same shape: seconds of teacher work (target: 0)

    python bench/pipeline.py [--size demo|test] [--teacher-hidden 1024 --teacher-layers 12]

--size demo (the default) takes about 12 minutes on 2 CPU cores; --size test about 3.
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
    args = ap.parse_args()

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


def synthetic_llama(path: Path, hidden: int, layers: int) -> Path:
    """A random Llama with the miniature tokenizer, saved as an HF model dir."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pkt.core.mini.tokenizer import build_tokenizer, vocab_size

    torch.manual_seed(hidden + layers)
    cfg = LlamaConfig(vocab_size=vocab_size(), hidden_size=hidden, intermediate_size=int(hidden * 2.6875),
                      num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                      num_key_value_heads=max(1, hidden // 128), max_position_embeddings=256)
    LlamaForCausalLM(cfg).save_pretrained(str(path), safe_serialization=True)
    build_tokenizer().save_pretrained(str(path))
    return path


def _perturb(model_dir: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    w = load_file(str(model_dir / "model.safetensors"))
    g = torch.Generator().manual_seed(7)
    save_file({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in w.items()},
              str(model_dir / "model.safetensors"), metadata={"format": "pt"})


if __name__ == "__main__":
    main()
