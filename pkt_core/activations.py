"""Activation statistics of a model on seed samples: forward passes only, streamed by hooks.

What the activation-based selectors and reducers read (pkt_core/inherit.py, align.select_layers):
- `hidden` [L+1, hidden]: mean |h| of the residual stream at the input of layer 0 (the
  embeddings) and at the output of every decoder layer (before the final norm);
- `block_influence` [L]: mean over tokens of 1 - cos(h_in, h_out) of each decoder layer
  (ShortGPT's Block Influence, on the raw residual stream);
- `intermediate` [L, intermediate]: mean |x| at the input of down_proj (the FFN neurons);
- `attn` [L, q_width]: mean |x| at the input of o_proj (each head's value-side channels);
- `q` [L, q_width], `k` [L, kv_width]: mean |x| at the outputs of q_proj and k_proj (before RoPE).

Every token of every sample counts (prompt and answer; one sample at a time, so no padding).
Hooks add each layer's sums into small accumulators the moment it runs: nothing of a
layer's activations outlives its forward, and the base model is called without the LM head,
so no tokens x vocabulary logits are ever formed.
"""
from __future__ import annotations

from typing import Iterable

import torch

from . import arch
from .progress import track

STATS = ("hidden", "block_influence", "intermediate", "attn", "q", "k")


def activation_stats(model, samples: Iterable[dict[str, torch.Tensor]], *, progress: bool = True) -> dict[str, torch.Tensor]:
    """Token means of the statistics above (fp32 tensors on the CPU), plus `tokens` (a 1-element count)."""
    config = model.config
    d = arch.dims(config)
    sums = {"hidden": torch.zeros(d.layers + 1, d.hidden, dtype=torch.float64),
            "block_influence": torch.zeros(d.layers, dtype=torch.float64),
            "intermediate": torch.zeros(d.layers, d.intermediate, dtype=torch.float64),
            "attn": torch.zeros(d.layers, d.q_width, dtype=torch.float64),
            "q": torch.zeros(d.layers, d.q_width, dtype=torch.float64),
            "k": torch.zeros(d.layers, d.kv_width, dtype=torch.float64)}
    handles = []
    layers = model.get_submodule(arch.architecture(config).layers_prefix)
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(_residual_hook(sums, i), with_kwargs=True))
        for module, stat, side in (("down", "intermediate", "in"), ("o", "attn", "in"), ("q", "q", "out"),
                                   ("k", "k", "out")):
            sub = model.get_submodule(arch.module_path(config, module, i))
            handles.append(sub.register_forward_hook(_channel_hook(sums[stat][i], side)))
    base = model.base_model  # the decoder without the LM head: no logits over the vocabulary
    tokens = 0
    was_training = model.training
    model.eval()
    samples = list(samples) if not hasattr(samples, "__len__") else samples
    try:
        with torch.no_grad():
            for s in track(samples, "activations", "sample", enabled=progress):
                ids = s["input_ids"].to(model.get_input_embeddings().weight.device)
                base(input_ids=ids)
                tokens += ids.numel()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    out = {name: (t / max(tokens, 1)).float() for name, t in sums.items()}
    out["tokens"] = torch.tensor([tokens], dtype=torch.int64)
    return out


def _flat(x: torch.Tensor) -> torch.Tensor:
    """[tokens, channels] in fp32 (bf16 activations summed in fp32)."""
    return x.detach().reshape(-1, x.shape[-1]).float()


def _channel_hook(acc: torch.Tensor, side: str):
    def hook(module, args, output):
        x = args[0] if side == "in" else output
        acc.add_(_flat(x).abs().sum(0).to(device="cpu", dtype=acc.dtype))

    return hook


def _residual_hook(sums: dict[str, torch.Tensor], layer: int):
    def hook(module, args, kwargs, output):
        h_in = _flat(args[0] if args else kwargs["hidden_states"])
        h_out = _flat(output[0] if isinstance(output, tuple) else output)
        if layer == 0:
            sums["hidden"][0].add_(h_in.abs().sum(0).cpu().double())
        sums["hidden"][layer + 1].add_(h_out.abs().sum(0).cpu().double())
        cos = torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1)
        sums["block_influence"][layer] += float((1 - cos).double().sum())

    return hook
