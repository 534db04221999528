"""Window search: pkt's summed-area table vs the reference implementation's Python loop.

(a) Small cases: both searches in full, same window checked, speed ratio printed.
(b) Llama-2 13B -> 7B shapes: pkt on the full matrices, the reference loop timed on a sample of
    positions and extrapolated to all of them; then both extrapolated to the whole model
    (32 layers x 7 matrices). The last number printed is the whole-model ratio.

    python bench/align_speed.py [--sample 200]
"""
from __future__ import annotations

import argparse
import time

import torch

from pkt.core.align import max_sum_window

LAYERS = 32
# 13B -> 7B: (teacher shape, student shape) per matrix type; q,k,v,o share the attention shape
ATTN = ((5120, 5120), (4096, 4096))
MLP_UP = ((13824, 5120), (11008, 4096))  # gate, up
MLP_DOWN = ((5120, 13824), (4096, 11008))  # down


def reference_window(sens: torch.Tensor, rows: int, cols: int, positions=None) -> tuple[tuple[int, int], int]:
    """The reference implementation's loop: sum the window at every top-left corner.
    With positions, only those corners are visited (for timing a sample)."""
    R, C = sens.shape
    best, where, visited = None, None, 0
    corners = positions if positions is not None else ((r, c) for r in range(R - rows + 1) for c in range(C - cols + 1))
    for r, c in corners:
        s = sens[r:r + rows, c:c + cols].sum().item()
        visited += 1
        if best is None or s > best:
            best, where = s, (r, c)
    return where, visited


def timed(fn, *a):
    t0 = time.perf_counter()
    out = fn(*a)
    return out, time.perf_counter() - t0


def small_cases() -> None:
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
    n_r, n_c = t_shape[0] - s_shape[0] + 1, t_shape[1] - s_shape[1] + 1
    g = torch.Generator().manual_seed(2)
    positions = list(zip(torch.randint(n_r, (sample,), generator=g).tolist(),
                         torch.randint(n_c, (sample,), generator=g).tolist()))
    _, t_sample = timed(reference_window, sens, *s_shape, positions)
    t_ref = t_sample / sample * n_r * n_c
    print(f"(b) {t_shape}->{s_shape}: {n_r * n_c} windows; pkt {t_fast:.2f}s; reference {t_sample / sample * 1e3:.2f} "
          f"ms/window -> {t_ref:.0f}s extrapolated; ratio {t_ref / t_fast:.0f}x")
    return t_fast, t_ref


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sample", type=int, default=200, help="reference windows timed per big matrix")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    small_cases()
    attn = big_case(*ATTN, args.sample)
    up = big_case(*MLP_UP, args.sample)
    down = big_case(*MLP_DOWN, args.sample)
    fast = LAYERS * (4 * attn[0] + 2 * up[0] + down[0])
    ref = LAYERS * (4 * attn[1] + 2 * up[1] + down[1])
    print(f"whole 13B->7B alignment ({LAYERS} layers x 7 matrices): pkt {fast:.1f}s, reference {ref / 3600:.1f}h "
          f"(extrapolated), ratio {ref / fast:.0f}")


if __name__ == "__main__":
    main()
