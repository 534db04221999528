"""The GPU path end to end (run by bench/gpu_check.sh): `pkt extract` on a ~1B synthetic Llama pair in bf16
(sensitivity, layer plan, extraction, the exact LoRA init, the residual base), then a few hundred LoRA
steps of the transfer variant and its evaluation, through the same flows a user runs. Prints each node's
seconds, peak GPU memory, and achieved TFLOP/s where the work is a known number of flops (sensitivity:
6 x params x tokens, forward and backward; training: 6 x student params x tokens) against the card's
dense bf16 peak.

    python bench/gpu_pipeline.py [--device cuda] [--tiny]   # --tiny: a seconds-sized pair (a smoke run on CPU)
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

# dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by a substring of torch.cuda.get_device_name()
PEAK_TFLOPS = {"H200": 989, "H100": 989, "A100": 312, "L40S": 362, "L4": 121, "A10": 125, "4090": 165, "V100": 125}
SIZES = {  # teacher and student shapes: ~1.0B -> ~0.18B, vocabulary 32,000
    "1b": ({"hidden": 2048, "intermediate": 5632, "layers": 20, "heads": 16, "kv": 4},
           {"hidden": 1024, "intermediate": 2816, "layers": 10, "heads": 8, "kv": 4}, 32_000),
    "tiny": ({"hidden": 128, "intermediate": 352, "layers": 4, "heads": 4, "kv": 2},
             {"hidden": 64, "intermediate": 176, "layers": 2, "heads": 2, "kv": 1}, 512),
}


def llama(path: Path, s: dict, vocab: int, seed: int, dtype) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline import padded_tokenizer

    tok = padded_tokenizer(vocab)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                      num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv"],
                      max_position_embeddings=1024)
    model = LlamaForCausalLM(cfg).to(dtype)
    model.save_pretrained(str(path), safe_serialization=True)
    tok.save_pretrained(str(path))
    return sum(p.numel() for p in model.parameters())


def instrument(log: list, device: str):
    """Seconds and peak device memory of every node computation (compute and write)."""
    import torch

    from pkt.tasks import node

    inner = node._compute
    cuda = device.startswith("cuda")

    def measured(store, spec, key, inputs):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        ref = inner(store, spec, key, inputs)
        if cuda:
            torch.cuda.synchronize()
        log.append({"kind": spec.KIND, "seconds": time.perf_counter() - t0,
                    "peak": torch.cuda.max_memory_allocated() if cuda else 0})
        return ref

    node._compute = measured


def tokens(path: Path, tok, n: int | None = None) -> int:
    from pkt.core import data

    return sum(s["input_ids"].numel() for s in data.load_encoded(path, tok, 2048)[:n])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--steps", type=int, default=300, help="LoRA optimizer steps (batch 8)")
    args = ap.parse_args()
    import torch

    from pkt.core import models
    from pkt.core.mini.tasks import write_task
    from pkt.flows.extract import extract_teacher
    from pkt.flows.server import prefect_api
    from pkt.flows.sweep import sweep

    t_shape, s_shape, vocab = SIZES["tiny" if args.tiny else "1b"]
    dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    work = Path(tempfile.mkdtemp(prefix="pkt-gpu-"))
    n_t = llama(work / "teacher", t_shape, vocab, 0, getattr(torch, dtype))
    n_s = llama(work / "student", s_shape, vocab, 1, getattr(torch, dtype))
    batch, epochs = 8, 1
    write_task(work / "gsm", "gsm", n_train=args.steps * batch, n_val=16, n_test=64, n_seeds=32)
    tok = models.load_tokenizer(work / "teacher")
    seed_tokens, train_tokens = tokens(work / "gsm/seeds.jsonl", tok), tokens(work / "gsm/train.jsonl", tok)
    print(f"teacher {n_t / 1e9:.2f}B params, student {n_s / 1e9:.2f}B, {dtype} on {args.device}; "
          f"32 seed samples ({seed_tokens} tokens), {args.steps} LoRA steps of {batch} ({train_tokens} tokens)",
          flush=True)
    log: list = []
    instrument(log, args.device)
    store = str(work / "store")
    config = {"teacher": str(work / "teacher"), "students": [str(work / "student")],
              "tasks": [{"name": "gsm", "dir": str(work / "gsm"), "benchmark": "gsm"}], "variants": ["transfer"],
              "seeds": [0], "train": {"rank": 16, "alpha": 16.0, "epochs": epochs, "batch_size": batch,
                                      "micro_batch": batch, "lr": 3e-4},
              "eval_limit": 64, "store": store, "dtype": dtype, "device": args.device,
              "report_dir": str(work / "report")}
    with prefect_api():  # as `pkt extract` runs it (a temporary server, patient on a busy machine)
        t0 = time.perf_counter()
        extract_teacher(teacher=str(work / "teacher"), seeds=str(work / "gsm/seeds.jsonl"),
                        students=[str(work / "student")], rank=16, alpha=16.0, store=store, dtype=dtype,
                        device=args.device)
        t_extract = time.perf_counter() - t0
        sweep(config)
    wall = time.perf_counter() - t0
    flops = {"sensitivity": 6 * n_t * seed_tokens, "adapter": 6 * n_s * train_tokens * epochs}
    name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    print(f"\n{'node':16s} {'seconds':>8s} {'peak GPU mem':>13s} {'TFLOP/s':>8s}   (card: {name}, dense bf16 peak "
          f"{peak or '?'} TFLOP/s)")
    for row in log:
        f = flops.get(row["kind"])
        rate = f"{f / row['seconds'] / 1e12:8.1f}" + (f" = {f / row['seconds'] / 1e12 / peak:.1%} of peak" if peak else "") \
            if f else "     n/a"
        print(f"{row['kind']:16s} {row['seconds']:8.1f} {row['peak'] / 2**30:11.2f}GiB {rate}")
    print(f"pkt extract {t_extract:.0f} s; extract + {args.steps} LoRA steps + evaluation {wall:.0f} s", flush=True)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
