"""Reducers from the weight-inheritance literature: one consistent set of teacher indices per
dimension, instead of one window per matrix.

- `weight-selection` (Xu et al., "Initializing Models with Larger Ones", ICLR 2024): evenly spaced
  indices (index j of n out of N is floor(j * N / n)), the same in every layer, no data.
- `subcloning` (Samragh et al., "Weight subcloning", 2023): the indices of the largest mean
  activation magnitudes on the seed samples (pkt_core/activations.py): one ranking of the residual
  dimensions, summed over the residual stream's L+1 positions and shared by every layer and the
  embeddings; per layer one ranking of the FFN neurons and one of the attention heads.

Both keep the residual stream aligned: the hidden indices that are the columns of q/k/v/gate/up and
the embeddings are the rows of o and down. Attention keeps whole heads when it can: it picks the
student's kv groups among the teacher's (a teacher with fewer kv heads than the student first has
them repeated, one per query head, as grouped-query attention computes), the student's query heads
of each group among that group's heads, and one set of head dimensions shared by every head of the
layer; query/key dimensions go in RoPE pairs (i, i + head_dim/2), so a kept dimension rotates with
its partner. When the student's heads do not fit the teacher's that way (more query heads than the
teacher's, say), the q/o and k/v channels are picked flat, without head structure.
Subcloning's weight rescaling is not applied: the LoRA init's scale is the grid's `init_scale`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

from . import arch

REDUCERS = ("weight-selection", "subcloning")


def evenly_spaced(total: int, n: int) -> torch.Tensor:
    """n of range(total), evenly spaced from 0: floor(j * total / n), j = 0..n-1 (ascending)."""
    return torch.arange(n, dtype=torch.int64) * total // n


def largest(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the n largest scores, ascending; ties go to the earlier index."""
    return torch.sort(torch.sort(-scores.double(), stable=True).indices[:n]).values


@dataclass
class IndexPlan:
    """Which teacher rows and columns make every student matrix.

    pick(score, total, n) returns n ascending indices of range(total); score() gives the scores it
    ranks (called only by a reducer that reads data)."""

    t: arch.Dims
    s: arch.Dims
    layers: list[int]
    pick: Callable[[Callable[[], torch.Tensor], int, int], torch.Tensor]
    stats: Mapping[str, torch.Tensor] | None = None
    hidden: torch.Tensor = field(init=False)

    def __post_init__(self):
        self.hidden = self.pick(lambda: self.stats["hidden"].sum(0), self.t.hidden, self.s.hidden)
        self._attn = {layer: self._attention(layer) for layer in self.layers}

    def expand_kv(self, layer: int) -> bool:
        """Whether this layer's k/v rows are indices into the kv heads repeated per query head."""
        return self._attn[layer]["expand"]

    def indices(self, module: str, layer: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, cols) of the teacher matrix that make the student's (module, layer) matrix."""
        h = self.hidden
        if module in ("embed", "lm_head"):
            return torch.arange(self.t.vocab), h  # one shared vocabulary: every row
        if module in ("gate", "up", "down"):
            stats = self.stats
            inter = self.pick(lambda: stats["intermediate"][layer], self.t.intermediate, self.s.intermediate)
            return (inter, h) if module != "down" else (h, inter)
        a = self._attn[layer]
        return {"q": (a["q"], h), "k": (a["k"], h), "v": (a["v"], h), "o": (h, a["q_vo"])}[module]

    def _attention(self, layer: int) -> dict:
        t, s, stats, pick = self.t, self.s, self.stats, self.pick
        expand = s.kv_heads > t.kv_heads
        kv_heads = t.heads if expand else t.kv_heads
        group_t, group_s = t.heads // kv_heads, s.heads // s.kv_heads
        if s.kv_heads > kv_heads or group_s > group_t or s.head_dim > t.head_dim:
            return self._flat(layer, expand or s.kv_width > t.kv_width)
        head_score = lambda: stats["attn"][layer].view(t.heads, t.head_dim).sum(1)  # noqa: E731
        groups = pick(lambda: head_score().view(kv_heads, group_t).sum(1), kv_heads, s.kv_heads)
        heads = torch.cat([g * group_t + pick(lambda g=g: head_score()[g * group_t:(g + 1) * group_t], group_t, group_s)
                           for g in groups.tolist()])
        qk = self._qk_dims(layer)
        vo = pick(lambda: stats["attn"][layer].view(t.heads, t.head_dim).sum(0), t.head_dim, s.head_dim)
        rows = lambda units, dims: torch.cat([u * t.head_dim + dims for u in units.tolist()])  # noqa: E731
        return {"expand": expand, "q": rows(heads, qk), "q_vo": rows(heads, vo), "k": rows(groups, qk),
                "v": rows(groups, vo)}

    def _qk_dims(self, layer: int) -> torch.Tensor:
        t, s, stats = self.t, self.s, self.stats

        def channel_score():  # query and key magnitude of each head dimension, summed over heads
            return (stats["q"][layer].view(t.heads, t.head_dim).sum(0)
                    + stats["k"][layer].view(t.kv_heads, t.head_dim).sum(0))

        if t.head_dim % 2 or s.head_dim % 2:
            return self.pick(channel_score, t.head_dim, s.head_dim)
        half_t, half_s = t.head_dim // 2, s.head_dim // 2
        pairs = self.pick(lambda: channel_score()[:half_t] + channel_score()[half_t:], half_t, half_s)
        return torch.cat([pairs, pairs + half_t])

    def _flat(self, layer: int, expand: bool) -> dict:
        t, s, stats = self.t, self.s, self.stats
        kv_width = t.q_width if expand else t.kv_width
        qo = self.pick(lambda: stats["attn"][layer], t.q_width, s.q_width)
        k_score = lambda: (stats["k"][layer].view(t.kv_heads, 1, t.head_dim)  # noqa: E731
                           .expand(t.kv_heads, t.heads // t.kv_heads, t.head_dim).reshape(-1) if expand
                           else stats["k"][layer])
        kv = self.pick(k_score, kv_width, s.kv_width)
        return {"expand": expand, "q": qo, "q_vo": qo, "k": kv, "v": kv}


def index_plan(teacher_config, student_config, layers: list[int], reducer: str,
               stats: Mapping[str, torch.Tensor] | None = None) -> IndexPlan:
    """The reducer's plan for a teacher/student pair and layer plan; subcloning needs the teacher's
    activation statistics (activations.activation_stats)."""
    if reducer == "weight-selection":
        pick = lambda score, total, n: evenly_spaced(total, n)  # noqa: E731
    elif reducer == "subcloning":
        if stats is None:
            raise ValueError("the subcloning reducer ranks by activation statistics: give stats")
        pick = lambda score, total, n: largest(score(), n)  # noqa: E731
    else:
        raise ValueError(f"unknown reducer {reducer!r}; choose one of {', '.join(REDUCERS)}")
    return IndexPlan(arch.dims(teacher_config), arch.dims(student_config), sorted(set(layers)), pick, stats)
