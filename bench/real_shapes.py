"""`pkt extract` on synthetic models with the shapes of a real 1.5B -> 0.5B pair (Qwen2.5-1.5B -> 0.5B:
hidden 1536 / 896, intermediate 8960 / 4864, 28 / 24 layers, 12 / 14 heads, 2 KV heads, head_dim 128 / 64,
q/k/v biases, untied head, vocabulary 151,936), fp32 on the CPU: every node's seconds and peak resident
set beside the floor (teacher weights + one fp32 accumulator + the student), and the LoRA init with the
default (exact) SVD beside the randomized one it replaced, measured in one run.

    python bench/real_shapes.py [--layers N] [--seeds-k 8] [--rank 16]

--layers N keeps the real widths and vocabulary but gives the teacher N layers and the student
round(N * 24 / 28) (full size: --layers 28; its teacher alone is ~6 GB fp32 and the run needs ~19 GB).
Each node's peak is the process's peak resident set while it ran (reset at its start, Linux only).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

GB = 1e9
TEACHER = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
               num_key_value_heads=2, head_dim=128)
STUDENT = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
               num_key_value_heads=2, head_dim=64)
VOCAB = 151_936


def status(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    return 0


def qwen2(path: Path, shape: dict, layers: int, seed: int) -> int:
    """A random Qwen2 (q/k/v biases, untied head) of this shape with the vocabulary-padded miniature
    tokenizer, saved as an HF model dir; returns its parameter count."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from pipeline import padded_tokenizer

    tok = padded_tokenizer(VOCAB)
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=len(tok), **{**shape, "num_hidden_layers": layers}, tie_word_embeddings=False,
                      max_position_embeddings=512)
    model = Qwen2ForCausalLM(cfg)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(str(path), safe_serialization=True)
    tok.save_pretrained(str(path))
    del model
    return n


def instrument(log: list):
    """Time and peak-RSS every node computation (compute and write), resetting the peak at its start."""
    from pkt.tasks import node

    inner = node._compute

    def measured(store, spec, key, inputs):
        open("/proc/self/clear_refs", "w").write("5")
        t0 = time.perf_counter()
        ref = inner(store, spec, key, inputs)
        log.append({"kind": spec.KIND, "svd": getattr(spec, "svd", None), "seconds": time.perf_counter() - t0,
                    "peak": status("VmHWM:")})
        return ref

    node._compute = measured


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=TEACHER["num_hidden_layers"])
    ap.add_argument("--seeds-k", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--work", default=None, help="working directory (default: a temporary one, removed)")
    args = ap.parse_args()
    t_layers, s_layers = args.layers, max(1, round(args.layers * 24 / 28))
    work = Path(args.work or tempfile.mkdtemp(prefix="pkt-real-shapes-"))
    work.mkdir(parents=True, exist_ok=True)
    from pkt.core.mini.tasks import write_task

    n_t = qwen2(work / "teacher", TEACHER, t_layers, 0)
    n_s = qwen2(work / "student", STUDENT, s_layers, 1)
    write_task(work / "gsm", "gsm", n_train=64, n_val=0, n_test=0, n_seeds=32)
    floor = 4 * (2 * n_t + n_s)  # fp32 teacher + fp32 accumulator + fp32 student
    print(f"teacher {n_t / 1e6:.0f}M params ({t_layers} layers at real widths, vocab {VOCAB:,}), student "
          f"{n_s / 1e6:.0f}M ({s_layers} layers); floor = teacher + accumulator + student = {floor / GB:.2f} GB; "
          f"{args.seeds_k} seed samples, rank {args.rank}, torch threads: default", flush=True)

    from pkt.flows.extract import extract_teacher
    from pkt.flows.server import prefect_api

    log: list = []
    instrument(log)
    runtime = status("VmRSS:")
    t0 = time.perf_counter()
    with prefect_api():  # as `pkt extract` runs it (a temporary server, patient on a busy machine)
        for svd in ("auto", "lowrank"):  # the second run recomputes the LoRA init (and the residual base) only
            extract_teacher(teacher=str(work / "teacher"), seeds=str(work / "gsm/seeds.jsonl"),
                            students=[str(work / "student")], rank=args.rank, alpha=float(args.rank),
                            k=args.seeds_k, store=str(work / "store"), svd=svd)
    wall = time.perf_counter() - t0
    print(f"python + torch + prefect before the run: {runtime / GB:.2f} GB resident")
    print(f"{'node':16s} {'seconds':>8s} {'peak RSS':>9s} {'/ floor':>8s}")
    for row in log:
        name = row["kind"] + (f" ({row['svd']})" if row["svd"] else "")
        print(f"{name:16s} {row['seconds']:8.1f} {row['peak'] / GB:8.2f}G {row['peak'] / floor:8.2f}")
    inits = {r["svd"]: r["seconds"] for r in log if r["kind"] == "lora_init"}
    if {"auto", "lowrank"} <= set(inits):
        print(f"lora_init exact (auto) / randomized (lowrank): {inits['auto'] / inits['lowrank']:.2f}x")
    print(f"peak RSS of the whole run {max(r['peak'] for r in log) / GB:.2f} GB = "
          f"{max(r['peak'] for r in log) / floor:.2f}x the floor; wall {wall:.0f} s")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
