"""Parameter sensitivity S = sum_i |theta * dL_i/dtheta| over seed samples (Zhong et al., eq. 2).

Each parameter's |theta * grad| is added to an fp32 accumulator by a post-accumulate-grad hook
the moment its gradient is ready, and the gradient is freed right there: peak memory is
weights + activations + one accumulator, never a second full gradient copy.
"""
from __future__ import annotations

from typing import Iterable

import torch

from . import arch
from .progress import track


def compute_sensitivity(
    model,
    samples: Iterable[dict[str, torch.Tensor]],
    *,
    accumulate_dtype: torch.dtype = torch.float32,
    accumulator_device: str | None = None,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Sum over samples of |theta * dL/dtheta| for every parameter.

    samples: dicts with input_ids and labels, each 1 x T, labels -100 off the answer.
    Returns {parameter name: accumulate_dtype tensor of the parameter's shape}, on
    accumulator_device (default: each parameter's own device).
    """
    params = dict(model.named_parameters())
    _require_resident(params)
    acc = {n: torch.zeros(p.shape, dtype=accumulate_dtype, device=accumulator_device or p.device)
           for n, p in params.items()}
    was_training = model.training
    model.eval()  # no dropout: the score should not depend on a random mask
    flags = {n: p.requires_grad for n, p in params.items()}
    handles = []
    for n, p in params.items():
        p.requires_grad_(True)
        handles.append(p.register_post_accumulate_grad_hook(_accumulator(acc[n])))
    samples = list(samples) if not hasattr(samples, "__len__") else samples
    try:
        for s in track(samples, "sensitivity", "sample", enabled=progress):
            dev = model.get_input_embeddings().weight.device
            out = model(input_ids=s["input_ids"].to(dev), labels=s["labels"].to(dev))
            out.loss.backward()
    finally:
        for h in handles:
            h.remove()
        for n, p in params.items():
            p.requires_grad_(flags[n])
            p.grad = None
        model.train(was_training)
    return acc


def _require_resident(params: dict[str, torch.Tensor]) -> None:
    """Offloaded weights (device_map put them on disk or the CPU's meta stand-ins) get no gradient
    of their own: their sensitivity would silently be zero."""
    offloaded = [n for n, p in params.items() if p.device.type == "meta"]
    if offloaded:
        raise ValueError(f"sensitivity needs every teacher weight on a device, but {len(offloaded)} parameters are "
                         f"offloaded (e.g. {offloaded[0]}); give device_map='auto' enough memory (more GPUs, or "
                         "dtype bfloat16), or run the teacher on one device (device='cuda' or 'cpu')")


def _accumulator(buf: torch.Tensor):
    def hook(p: torch.Tensor) -> None:
        # in place on the gradient: no temporaries of the parameter's size
        g = p.grad.mul_(p.detach()).abs_()
        buf.add_(g.to(device=buf.device))  # add_ promotes bf16/fp16 into the fp32 accumulator
        p.grad = None

    return hook


STORAGE_DTYPE = torch.float32


def to_storage_dtype(sens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The map as stored, in place, one tensor at a time: float32, the dtype it was accumulated in, so
    that every window and layer plan cut from the store is the one the computed sums give (issue 20).

    bfloat16 halved the store (a 1.5B teacher's map: 3.55 GB instead of 7.1 GB) but its 8-bit mantissa
    rounds each entry by up to 0.4%, and window sums of a flat map differ by less: it changed the chosen
    window in 3 of 200 random maps (tests/test_real_size.py replays near-ties). The rounding's bound can
    tell when a bf16 choice is safe, not repair it when it is not, so the map is kept as computed; it is
    stored once per (teacher, seed file) and shared by every student, rank and variant."""
    for name in list(sens):
        sens[name] = sens[name].to(STORAGE_DTYPE)
    return sens


def layer_totals(sens: dict[str, torch.Tensor], config) -> torch.Tensor:
    """Total sensitivity of every decoder layer (all its parameters), shape [num_layers], fp64."""
    d = arch.dims(config)
    totals = torch.zeros(d.layers, dtype=torch.float64)
    for layer in range(d.layers):
        prefix = arch.layer_prefix(config, layer)
        # summed in name order: a map read back from safetensors (sorted names) gives the same bits
        totals[layer] = sum(float(sens[n].double().sum()) for n in sorted(sens) if n.startswith(prefix))
    return totals


def layer_groups(names, config) -> dict[str, list[str]]:
    """Parameter names grouped by decoder layer ('layer.N'), the rest under 'global': the unit in
    which a sensitivity map is written when host RAM must never hold it whole."""
    from . import arch

    d = arch.dims(config)
    groups: dict[str, list[str]] = {f"layer.{i}": [] for i in range(d.layers)}
    groups["global"] = []
    prefixes = [(arch.layer_prefix(config, i), f"layer.{i}") for i in range(d.layers)]
    for n in names:
        groups[next((g for p, g in prefixes if n.startswith(p)), "global")].append(n)
    return groups
