"""Layer selection and dimension reduction: cut student-shaped tensors out of the teacher.

The paper's reducer takes, from each teacher matrix, the contiguous student-shaped window of
maximal summed sensitivity. A summed-area table gives every window's sum in one vectorized
pass, instead of the reference implementation's Python loop over every top-left corner.
"""
from __future__ import annotations

import math
import random
import zlib
from typing import Mapping

import torch

from . import arch, inherit
from .errors import UserError
from .progress import track

LAYER_SELECTORS = ("sensitivity", "first", "last", "random", "evenly-spaced", "block-influence")
REDUCERS = ("submatrix", "rowcol", "random", *inherit.REDUCERS)
# what each one reads: a sensitivity map, the teacher's activation statistics, or nothing but shapes
SELECTOR_READS = {"sensitivity": "sensitivity", "first": "sensitivity", "last": "sensitivity",
                  "random": "sensitivity", "evenly-spaced": None, "block-influence": "activations"}
REDUCER_READS = {"submatrix": "sensitivity", "rowcol": "sensitivity", "random": "sensitivity",
                 "weight-selection": None, "subcloning": "activations"}


class ShapeMismatch(UserError, ValueError):
    pass


def select_layers(layer_scores, n: int, strategy: str = "sensitivity", seed: int = 0) -> list[int]:
    """Indices of n teacher layers, ascending (the teacher's order is kept). layer_scores: per teacher
    layer, its total sensitivity, its block influence (block-influence), or anything of the teacher's
    length (evenly-spaced reads only the count).

    "random" draws uniformly among the plans *other than* the sensitivity plan (transfer's): a
    control that may draw transfer's own plan is partly the subject itself (3 teacher layers and a
    2-layer student have 3 plans, and 2 of 5 seeds drew transfer's). With one plan only, it refuses."""
    scores = torch.as_tensor(layer_scores, dtype=torch.float64)
    total = scores.numel()
    if n > total:
        raise ShapeMismatch(f"the teacher has {total} layers, fewer than the student's {n}; "
                            "pick a deeper teacher or a shallower student")
    if strategy == "sensitivity":
        # stable sort: among equal totals the earlier layer wins
        chosen = torch.sort(-scores, stable=True).indices[:n]
    elif strategy == "first":
        chosen = torch.arange(n)
    elif strategy == "last":
        chosen = torch.arange(total - n, total)
    elif strategy == "random":
        return _random_plan(total, n, select_layers(scores, n, "sensitivity"), seed)
    elif strategy == "evenly-spaced":  # weight selection's layers (Xu et al.): no data
        chosen = inherit.evenly_spaced(total, n)
    elif strategy == "block-influence":  # ShortGPT: keep the layers that change the residual most
        chosen = torch.sort(-scores, stable=True).indices[:n]
    else:
        raise ValueError(f"unknown layer selector {strategy!r}; choose one of {', '.join(LAYER_SELECTORS)}")
    return sorted(int(i) for i in chosen)


def _random_plan(total: int, n: int, avoid: list[int], seed: int) -> list[int]:
    """A uniform draw among the C(total, n) ascending plans except `avoid`: a random rank, skipping
    avoid's, unranked in the combinatorial number system (exact for any teacher depth)."""
    plans = math.comb(total, n)
    if plans < 2:
        raise ShapeMismatch(f"random layers: a {total}-layer teacher and a {n}-layer student have one layer plan "
                            "only, transfer's own; the random-layers control cannot differ from transfer here")
    rank = random.Random(f"random-layers:{seed}").randrange(plans - 1)
    skip = _plan_rank(avoid, total)
    return _unrank_plan(rank + (rank >= skip), total, n)


def _plan_rank(plan: list[int], total: int) -> int:
    """The position of an ascending plan in the lexicographic order of all plans of its size."""
    rank, prev, n = 0, -1, len(plan)
    for i, layer in enumerate(plan):
        rank += sum(math.comb(total - j - 1, n - i - 1) for j in range(prev + 1, layer))
        prev = layer
    return rank


def _unrank_plan(rank: int, total: int, n: int) -> list[int]:
    plan, layer = [], 0
    for i in range(n):
        while (below := math.comb(total - layer - 1, n - i - 1)) <= rank:
            rank -= below
            layer += 1
        plan.append(layer)
        layer += 1
    return plan


def window_sums(sens: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Sum of every rows x cols window, indexed by its top-left corner: (R-rows+1, C-cols+1), fp64.

    Separable sliding sums: the first window along an axis is one reduction, each next one adds
    the entering line and drops the leaving one (a cumsum of differences). That reads the matrix
    about once; fp64 keeps ties of equal windows exact.
    """
    R, C = sens.shape
    if rows > R or cols > C:
        raise ShapeMismatch(f"window {rows}x{cols} does not fit in a {R}x{C} matrix")
    # along the contiguous axis first: the large pass needs no transposed copies
    return _sliding_sums(_sliding_sums(sens, cols, 1), rows, 0)


def _sliding_sums(x: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    length = x.shape[dim]
    # the first window: sums over blocks of 256 lines in the input dtype (exact for integer-valued
    # scores), then fp64 across blocks: several times faster than an fp64 sum of the whole block
    first = torch.stack([b.sum(dim) for b in x.narrow(dim, 0, n).split(256, dim)]).to(torch.float64).sum(0)
    first = first.unsqueeze(dim)
    if length == n:
        return first
    steps = x.narrow(dim, n, length - n).to(torch.float64) - x.narrow(dim, 0, length - n).to(torch.float64)
    # a cumsum along the contiguous axis is several times faster on CPU
    steps = steps.movedim(dim, -1).contiguous().cumsum(-1).movedim(-1, dim)
    return torch.cat([first, first + steps], dim)


def max_sum_window(sens: torch.Tensor, rows: int, cols: int) -> tuple[int, int]:
    """Top-left corner of the rows x cols window of maximal sum; ties: first in row-major order."""
    sums = window_sums(sens, rows, cols)
    flat = int(torch.argmax(sums.flatten()))  # argmax returns the first maximum
    return flat // sums.shape[1], flat % sums.shape[1]


def reduce_indices(sens: torch.Tensor, rows: int, cols: int, reducer: str = "submatrix",
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Which teacher rows and columns make the student-shaped matrix (ascending indices)."""
    R, C = sens.shape
    if rows > R or cols > C:
        raise ShapeMismatch(f"cannot cut {rows}x{cols} out of {R}x{C}")
    if reducer == "submatrix":
        r, c = max_sum_window(sens, rows, cols)
        return torch.arange(r, r + rows), torch.arange(c, c + cols)
    if reducer == "rowcol":
        s = sens.to(torch.float64)
        top_rows = torch.sort(-s.mean(1), stable=True).indices[:rows]
        top_cols = torch.sort(-s.mean(0), stable=True).indices[:cols]
        return top_rows.sort().values, top_cols.sort().values
    if reducer == "random":
        g = torch.Generator().manual_seed(seed)
        return torch.randperm(R, generator=g)[:rows].sort().values, torch.randperm(C, generator=g)[:cols].sort().values
    raise ValueError(f"unknown reducer {reducer!r}; choose one of {', '.join(REDUCERS)}")


def repeat_kv(weight: torch.Tensor, kv_heads: int, heads: int) -> torch.Tensor:
    """Expand a k/v projection from kv_heads to heads heads, as grouped-query attention does."""
    head_dim = weight.shape[0] // kv_heads
    w = weight.reshape(kv_heads, head_dim, weight.shape[1])
    return w.repeat_interleave(heads // kv_heads, dim=0).reshape(heads * head_dim, weight.shape[1])


def _teacher_tensor(weights: Mapping[str, torch.Tensor], config, module: str, layer: int | None) -> torch.Tensor:
    name = arch.weight_name(config, module, layer)
    if name not in weights and module == "lm_head" and arch.dims(config).tied:
        name = arch.weight_name(config, "embed")  # a tied lm_head is the embedding
    return weights[name]


def extract(
    teacher_config,
    student_config,
    teacher_weights: Mapping[str, torch.Tensor],
    sens: Mapping[str, torch.Tensor] | None,
    layers: list[int],
    *,
    reducer: str = "submatrix",
    modules: tuple[str, ...] = arch.ALL_MODULE_TYPES,
    seed: int = 0,
    activations: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Student-shaped fp32 tensors cut out of the teacher, keyed by the student's weight names.

    layers: the teacher layers that become student layers 0..L_s-1 (from select_layers).
    teacher_weights and sens may be lazy mappings: one tensor is read at a time. The reducers of
    pkt_core/inherit.py read no sensitivity (sens may be None); subcloning reads `activations`.
    """
    t, s = arch.dims(teacher_config), arch.dims(student_config)
    check_compatible(t, s, modules)
    if len(layers) != s.layers:
        raise ShapeMismatch(f"layer plan has {len(layers)} layers but the student has {s.layers}")
    out = {}
    pieces = arch.transferable_weights(student_config, modules)
    plan = inherit.index_plan(teacher_config, student_config, layers, reducer, activations) \
        if reducer in inherit.REDUCERS else None
    for name, (module, s_layer) in track(pieces.items(), "extraction", "piece", total=len(pieces)):
        t_layer = None if s_layer is None else layers[s_layer]
        w = _teacher_tensor(teacher_weights, teacher_config, module, t_layer).float()
        if plan is not None:  # one consistent set of indices per dimension
            if module in ("k", "v") and plan.expand_kv(t_layer):
                w = repeat_kv(w, t.kv_heads, t.heads)
            r_idx, c_idx = plan.indices(module, t_layer)
            if len(r_idx) < w.shape[0]:  # every row (a vocabulary) is taken without a copy of the matrix
                w = w.index_select(0, r_idx)
            out[name] = w.index_select(1, c_idx)
            continue
        sv = _teacher_tensor(sens, teacher_config, module, t_layer).float()
        if module in ("k", "v") and t.kv_width < s.kv_width:
            w, sv = repeat_kv(w, t.kv_heads, t.heads), repeat_kv(sv, t.kv_heads, t.heads)
        rows, cols = arch.module_shape(s, module)
        if w.shape[0] < rows or w.shape[1] < cols:
            raise ShapeMismatch(f"{name}: the teacher's {tuple(w.shape)} is narrower than the student's "
                                f"{(rows, cols)}; the teacher must be at least as wide in every dimension")
        seed_m = zlib.crc32(f"{seed}:{name}".encode())
        r_idx, c_idx = reduce_indices(sv, rows, cols, reducer, seed_m)
        out[name] = w[r_idx][:, c_idx].contiguous()
    return out


def check_compatible(t: arch.Dims, s: arch.Dims, modules: tuple[str, ...] = arch.ALL_MODULE_TYPES) -> None:
    """Clear errors for pairs no extraction can serve."""
    if t.layers < s.layers:
        raise ShapeMismatch(f"the teacher has {t.layers} layers, fewer than the student's {s.layers}; "
                            "the teacher must be at least as deep")
    if any(m in modules for m in ("embed", "lm_head")) and t.vocab != s.vocab:
        raise ShapeMismatch(f"the embedding tables differ in size (teacher {t.vocab} rows, student {s.vocab}); "
                            "transferring embed and lm_head needs one shared vocabulary: use a teacher and student "
                            "of one family")
    for dim in ("hidden", "intermediate", "q_width"):
        if getattr(t, dim) < getattr(s, dim):
            raise ShapeMismatch(f"the teacher is narrower than the student in {dim} ({getattr(t, dim)} < "
                                f"{getattr(s, dim)}); the teacher must be at least as wide in every dimension")
    if max(t.kv_width, t.q_width) < s.kv_width:
        raise ShapeMismatch(f"the teacher's k/v width {t.q_width} (heads repeated) is below the student's "
                            f"{s.kv_width}")
