"""Window search: pkt's sliding sums vs the reference implementation's search, as it actually runs.

The reference (ParaKnowTransfer, extract_lora_with_sensitivity.py: max_sens_submatrix) builds a
summed-area table once (two cumsums) and then, in a Python double loop over every window's
bottom-right corner, reads four entries of it as 0-d tensors, combines them and compares the
result with the best so far. That per-window Python work (tens of microseconds) is what it costs.

(a) Small cases: both searches in full, same window checked, speed ratio printed.
(b) Llama-2 13B -> 7B shapes: pkt on the full matrices; the reference's loop timed over its first
    --sample windows (the table built once, as it does) and extrapolated to all of them; then both
    extrapolated to the whole model (32 student layers x 7 matrices, plus embed and lm_head). The
    last number printed is the whole-model ratio.

    python bench/align_speed.py [--sample 5000]
"""
from __future__ import annotations

import argparse
import math
import time

import torch

from pkt.core.align import max_sum_window

LAYERS = 32  # the student's (7B) layers: one window search per matrix per student layer
VOCAB = 32000
# 13B -> 7B: (teacher shape, student shape) per matrix type; q,k,v,o share the attention shape
ATTN = ((5120, 5120), (4096, 4096))
MLP_UP = ((13824, 5120), (11008, 4096))  # gate, up
MLP_DOWN = ((5120, 13824), (4096, 11008))  # down
EMBED = ((5120, VOCAB), (4096, VOCAB))  # embed (transposed) and lm_head: one window position per row offset


def summed_area_table(sens: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(torch.cumsum(sens, dim=0), dim=1)


def reference_window(sens: torch.Tensor, rows: int, cols: int, limit: int | None = None, sat=None):
    """The reference's search, re-implemented op for op: the summed-area table once, then four table
    reads per window in a Python double loop. With limit, stops after that many windows (timing);
    sat: the table, if already built."""
    sat = summed_area_table(sens) if sat is None else sat
    R, C = sens.shape
    best, where, visited = -math.inf, (0, 0), 0
    for i in range(rows - 1, R):
        for j in range(cols - 1, C):
            top, left = i - rows + 1, j - cols + 1
            total = sat[i, j]
            up = sat[top - 1, j] if top > 0 else 0
            side = sat[i, left - 1] if left > 0 else 0
            corner = sat[top - 1, left - 1] if top > 0 and left > 0 else 0
            current = total - up - side + corner
            if current > best:
                best, where = current, (top, left)
            visited += 1
            if limit is not None and visited >= limit:
                return where, visited
    return where, visited


def timed(fn, *a):
    t0 = time.perf_counter()
    out = fn(*a)
    return out, time.perf_counter() - t0


def small_cases() -> None:
    max_sum_window(torch.rand(64, 64), 32, 32)  # first call's one-time costs outside the clock
    for name, (t_shape, s_shape) in {"640x640->512x512": ((640, 640), (512, 512)),
                                     "1728x640->1376x512": ((1728, 640), (1376, 512))}.items():
        sens = torch.rand(t_shape, generator=torch.Generator().manual_seed(0))
        fast, t_fast = timed(max_sum_window, sens, *s_shape)
        (slow, n), t_slow = timed(reference_window, sens, *s_shape)
        assert fast == slow, (fast, slow)
        print(f"(a) {name}: {n} windows, same window {fast}; pkt {t_fast:.4f}s, reference {t_slow:.2f}s, "
              f"ratio {t_slow / t_fast:.0f}x")


def big_case(t_shape, s_shape, sample: int) -> tuple[float, float]:
    sens = torch.rand(t_shape, generator=torch.Generator().manual_seed(1))
    _, t_fast = timed(max_sum_window, sens, *s_shape)
    n = (t_shape[0] - s_shape[0] + 1) * (t_shape[1] - s_shape[1] + 1)
    sat, t_table = timed(summed_area_table, sens)  # built once per matrix, as the reference does
    (_, visited), t_loop = timed(reference_window, sens, *s_shape, min(sample, n), sat)
    per_window = t_loop / visited
    t_ref = t_table + per_window * n
    print(f"(b) {t_shape}->{s_shape}: {n} windows; pkt {t_fast:.2f}s; reference {per_window * 1e6:.1f} us/window "
          f"-> {t_ref:.0f}s extrapolated; ratio {t_ref / t_fast:.0f}x", flush=True)
    return t_fast, t_ref


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sample", type=int, default=5000, help="reference windows timed per big matrix")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    small_cases()
    attn = big_case(*ATTN, args.sample)
    up = big_case(*MLP_UP, args.sample)
    down = big_case(*MLP_DOWN, args.sample)
    embed = big_case(*EMBED, args.sample)
    fast = LAYERS * (4 * attn[0] + 2 * up[0] + down[0]) + 2 * embed[0]
    ref = LAYERS * (4 * attn[1] + 2 * up[1] + down[1]) + 2 * embed[1]
    print(f"whole 13B->7B alignment ({LAYERS} layers x 7 matrices, embed, lm_head): pkt {fast:.1f}s, reference "
          f"{ref / 3600:.2f}h (extrapolated), ratio {ref / fast:.0f}")


if __name__ == "__main__":
    main()
