"""Grow a trained model into a larger one that computes the same function (the twin families' teacher).

Width as HyperCloning grows it (Samragh et al. 2024, "Scaling Smart"): every hidden, head, kv-head
and intermediate dimension is repeated m times, so the big model's hidden state is the small one's
repeated m times. A linear map whose input grew is tiled and divided by m (the m copies of its input
sum back to one); embeddings, norm gains and biases are tiled. Heads keep their head_dim (RoPE and the
1/sqrt(head_dim) scale are unchanged) and come in m copies, each kv head's copy serving its query
heads' copies, so grouped-query attention stays exact. RMSNorm of a repeated vector is the norm of the
vector. Depth as Net2Net's identity layers (Chen et al. 2016): each student layer is followed by copies
of itself whose output projections (o and down) are zero, so they add nothing to the residual stream
until training moves them.
"""
from __future__ import annotations

import re

import torch

from . import arch
from .errors import UserError

OUTPUT_PROJECTIONS = (arch.LAYER_MODULES["o"], arch.LAYER_MODULES["down"])  # what a layer adds to the residual


class NotAGrowth(UserError, ValueError):
    pass


def width_factor(small: arch.Dims, big: arch.Dims) -> int:
    """m such that big is small with every width repeated m times; raises NotAGrowth naming the field."""
    m = big.hidden // small.hidden
    wanted = {"model_type": small.model_type, "hidden_size": m * small.hidden,
              "intermediate_size": m * small.intermediate, "num_attention_heads": m * small.heads, "num_key_value_heads": m * small.kv_heads,
              "head_dim": small.head_dim, "vocab_size": small.vocab}
    got = {"model_type": big.model_type, "hidden_size": big.hidden, "intermediate_size": big.intermediate,
           "num_attention_heads": big.heads, "num_key_value_heads": big.kv_heads, "head_dim": big.head_dim,
           "vocab_size": big.vocab}
    bad = [f"{k} {got[k]} (needs {v})" for k, v in wanted.items() if got[k] != v]
    if m < 1 or bad:
        raise NotAGrowth(f"teacher config: {', '.join(bad) or 'hidden_size smaller than the student'}; a grown model "
                         f"repeats every width of the student a whole number of times (here {max(m, 1)}x) and keeps "
                         "its head_dim and vocabulary")
    if big.layers < small.layers:
        raise NotAGrowth(f"teacher config: num_hidden_layers {big.layers} is below the student's {small.layers}; "
                         "growth only adds layers")
    if big.tied and m > 1:
        raise NotAGrowth("teacher config: tie_word_embeddings is true; a widened lm_head is the tiled embedding "
                         "divided by m, so set tie_word_embeddings=False")
    return m


def layer_plan(small: int, big: int) -> list[tuple[int, bool]]:
    """For each layer of the big model: (the student layer it copies, whether it is an identity copy).
    The student's layers keep their order, spread evenly; the copies follow the layer they copy."""
    starts = [i * big // small for i in range(small)]
    plan = []
    for i, start in enumerate(starts):
        end = starts[i + 1] if i + 1 < small else big
        plan += [(i, j > start) for j in range(start, end)]
    return plan


def _tile(w: torch.Tensor, shape: torch.Size, split_input: bool) -> torch.Tensor:
    reps = [b // s for b, s in zip(shape, w.shape)]
    out = w.repeat(*reps)
    return out / reps[1] if split_input else out


def grow(student, teacher_config):
    """A model of teacher_config whose logits equal the student's (up to float rounding): see the module
    docstring. student: a causal LM of a Llama-named architecture (arch.ARCHITECTURES)."""
    from transformers import AutoModelForCausalLM

    small, big = arch.dims(student.config), arch.dims(teacher_config)
    width_factor(small, big)
    prefix = arch.architecture(student.config).layers_prefix
    plan = layer_plan(small.layers, big.layers)
    embed = student.get_input_embeddings().weight
    src = student.state_dict()
    embed_name = next(k for k, v in src.items() if v is embed or v.data_ptr() == embed.data_ptr())
    grown = AutoModelForCausalLM.from_config(teacher_config, dtype=embed.dtype)
    layer = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.+)$")
    state = {}
    for name, target in grown.state_dict().items():
        source, copy = name, False
        if m := layer.match(name):
            i, copy = plan[int(m.group(1))]
            source = f"{prefix}.{i}.{m.group(2)}"
        w = src[source].detach()
        linear = w.dim() == 2 and source != embed_name
        w = _tile(w, target.shape, split_input=linear and target.shape[1] != w.shape[1])
        if copy and any(f".{p}." in name for p in OUTPUT_PROJECTIONS):
            w = torch.zeros_like(w)
        state[name] = w
    grown.load_state_dict(state)
    return grown.eval()
