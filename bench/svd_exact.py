"""The LoRA init's SVD at the shapes of a real 0.5B student (Qwen2.5-0.5B: hidden 896, intermediate 4864,
2 KV heads x 64, vocabulary 151,936), on weight-like spectra: time and error of each method against the
exact rank-r SVD (LAPACK in float64), measured side by side in one run.

Methods: lowrank (torch.svd_lowrank, 4 power iterations: the default before issue 20), auto (now the
default: the Gram route of pkt_core/lora_init.gram_svd), full (LAPACK's fp32 SVD, --full). Error: the
applied update's ||X - W_r||_F / ||W_r||_F; gap: (sigma_r - sigma_{r+1}) / sigma_1. Projected node time:
24 layers x (q, k, v, o, gate, up, down) + embed + lm_head, from the per-piece CPU seconds.

    python bench/svd_exact.py [--rank 16] [--spectrum flat_top|heavy_tailed|both] [--no-vocab] [--full]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_exact_init import flat_top, heavy_tailed  # noqa: E402  (the spectra the tests use)

from pkt.core import lora_init  # noqa: E402

# student pieces in peft's orientation (embed: hidden x vocab), and how many a 24-layer student has
PIECES = {"q": ((896, 896), 24), "k": ((128, 896), 24), "v": ((128, 896), 24), "o": ((896, 896), 24),
          "gate": ((4864, 896), 24), "up": ((4864, 896), 24), "down": ((896, 4864), 24),
          "embed": ((896, 151936), 1), "lm_head": ((151936, 896), 1)}


def timed(fn):
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w0, time.process_time() - c0


def oracle(w: torch.Tensor, rank: int):
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank], s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--spectrum", default="both", choices=["flat_top", "heavy_tailed", "both"])
    ap.add_argument("--no-vocab", action="store_true", help="skip embed and lm_head (151,936 x 896)")
    ap.add_argument("--full", action="store_true", help="also time LAPACK's fp32 SVD")
    args = ap.parse_args()
    methods = ["lowrank", "auto"] + (["full"] if args.full else [])
    spectra = ["flat_top", "heavy_tailed"] if args.spectrum == "both" else [args.spectrum]
    print(f"rank {args.rank}, torch {torch.__version__}, {torch.get_num_threads()} threads; seconds are wall / CPU")
    for spectrum in spectra:
        make = {"flat_top": flat_top, "heavy_tailed": heavy_tailed}[spectrum]
        total = {m: [0.0, 0.0] for m in methods}
        print(f"\n{spectrum}:")
        for module, (shape, count) in PIECES.items():
            if args.no_vocab and module in ("embed", "lm_head"):
                continue
            w = make(*shape, seed=len(module))
            exact, s = oracle(w, args.rank)
            gap = float((s[args.rank - 1] - s[args.rank]) / s[0])
            row = [f"  {module:8s} {str(shape):15s} gap {gap:.1e}"]
            for m in methods:
                (b, a), wall, cpu = timed(lambda: lora_init.svd_factors(w, args.rank, method=m))
                err = float((b.double() @ a.double() - exact).norm() / exact.norm())
                total[m][0] += count * wall
                total[m][1] += count * cpu
                row.append(f"{m} {wall:6.3f}/{cpu:6.3f}s err {err:.1e}")
            print(" | ".join(row), flush=True)
        print(f"  projected node SVD time, 24-layer student{'' if args.no_vocab else ' + embed + lm_head'}: "
              + ", ".join(f"{m} {w:.1f}/{c:.1f}s" for m, (w, c) in total.items())
              + f"; auto / lowrank: wall {total['auto'][0] / total['lowrank'][0]:.2f}x, "
                f"CPU {total['auto'][1] / total['lowrank'][1]:.2f}x", flush=True)


if __name__ == "__main__":
    main()
