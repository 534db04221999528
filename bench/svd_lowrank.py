"""torch.svd_lowrank vs the full SVD for LoRA inits: time and reconstruction error, side by side.

    python bench/svd_lowrank.py [--size 2048] [--rank 16]
"""
from __future__ import annotations

import argparse
import time

import torch

from pkt.core.lora_init import svd_factors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--rank", type=int, default=16)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    n = args.size
    # a weight-like spectrum: power-law decay, as trained matrices have
    u, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    w = (u * (torch.arange(1, n + 1, dtype=torch.float32) ** -0.7)) @ v.T
    out = {}
    for method in ("full", "lowrank"):
        t0 = time.perf_counter()
        b, a = svd_factors(w, args.rank, method=method)
        out[method] = (time.perf_counter() - t0, torch.linalg.norm(w - b @ a).item())
    best = out["full"][1]
    print(f"{n}x{n}, rank {args.rank}, {torch.get_num_threads()} threads")
    for method, (sec, err) in out.items():
        print(f"  {method:8s} {sec:7.2f}s  ||W - BA||_F = {err:.5f}  ({err / best - 1:+.2%} vs full)")
    print(f"speed-up {out['full'][0] / out['lowrank'][0]:.1f}x")


if __name__ == "__main__":
    main()
