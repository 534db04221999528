"""Weight selection and subcloning as their papers run them: the selected teacher weights BECOME a
model of the student's shape, which is then pretrained like any fresh model (no Prefect, no store).

- `weight-selection` (Xu et al., "Initializing Models with Larger Ones", ICLR 2024): the first N
  teacher layers (the paper's first-N layer selection; `layers="evenly-spaced"` takes them evenly
  spaced) and, in every matrix, evenly spaced indices, one set per dimension shared by every layer,
  so the residual stream stays aligned; no data.
- `subcloning` (Samragh et al., "Weight subcloning", 2023): neurons ranked by mean activation
  magnitude on a little data (one ranking of the residual dimensions for every layer, per layer one of
  the FFN neurons and one of the heads); the layers kept are those that change the residual most
  (block influence, 1 - cos(h_in, h_out): the middle layers that change it least go first); and the
  RMSNorm gains are multiplied by sqrt(d_t / d_s) (`rescale`), so that a pre-norm layer's input keeps
  its scale when the residual keeps d_s of d_t dimensions (RMS over the kept, largest coordinates is
  about sqrt(d_t/d_s) times the full RMS of what they carry). The paper rescales for the same reason;
  its exact rule was not re-read here.

Both reuse pkt_core/inherit.py's index plans (the reducers that cut transfer's window, align.extract)
for every linear weight and the embeddings; this module adds the norms, the layer choice, and the
model. `pretrain` is the miniature family's own loop (mini/family.py pretrain): same optimizer,
schedule, clipping, seed and data order, from any init, with the loss on a fixed probe of blocks at
fixed steps (the papers' claim is a lower loss at equal steps).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

import torch

from . import align, arch, inherit
from .errors import UserError

METHODS = ("weight-selection", "subcloning")
# the teacher layers each method keeps by default (align.select_layers' strategies)
LAYERS = {"weight-selection": "first", "subcloning": "block-influence"}
NORMS = ("input_layernorm", "post_attention_layernorm")  # a decoder layer's RMSNorm gains (over hidden)


class FreshInitError(UserError, ValueError):
    pass


def teacher_layers(method: str, teacher_config, student_config, activations=None,
                   layers: str | None = None) -> list[int]:
    """The teacher layers that become student layers 0..L_s-1, ascending."""
    strategy = layers or LAYERS[method]
    n_t, n_s = arch.dims(teacher_config).layers, arch.dims(student_config).layers
    if align.SELECTOR_READS.get(strategy) == "activations":
        if activations is None:
            raise FreshInitError(f"{method}: the {strategy} layer choice reads the teacher's activation statistics")
        scores = activations["block_influence"].tolist()
    else:
        scores = [0.0] * n_t
    return align.select_layers(scores, n_s, strategy)


def inherited_state(teacher_weights: Mapping[str, torch.Tensor], teacher_config, student_config, method: str,
                    activations: Mapping[str, torch.Tensor] | None = None, layers: str | None = None,
                    rescale: bool | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict of a student-shaped model, info): every student weight a selection of the teacher's.

    teacher_weights: name -> tensor (lazy is fine). activations: activations.activation_stats of the
    teacher (subcloning). layers: an align.select_layers strategy (default LAYERS[method]). rescale:
    multiply the norm gains by sqrt(d_t/d_s) (default: subcloning yes, weight selection no).
    info: {"layers", "method", "norm_scale"}."""
    if method not in METHODS:
        raise FreshInitError(f"unknown fresh-init method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "subcloning" and activations is None:
        raise FreshInitError("subcloning ranks neurons by activation magnitude: give the teacher's activation stats")
    t, s = arch.dims(teacher_config), arch.dims(student_config)
    chosen = teacher_layers(method, teacher_config, student_config, activations, layers)
    state = align.extract(teacher_config, student_config, teacher_weights, None, chosen, reducer=method,
                          activations=activations)
    plan = inherit.index_plan(teacher_config, student_config, chosen, method, activations)
    rescale = method == "subcloning" if rescale is None else rescale
    gain = math.sqrt(t.hidden / s.hidden) if rescale else 1.0
    t_pre, s_pre = arch.architecture(teacher_config), arch.architecture(student_config)
    for s_layer, t_layer in enumerate(chosen):
        for norm in NORMS:
            w = teacher_weights[f"{arch.layer_prefix(teacher_config, t_layer)}{norm}.weight"]
            state[f"{arch.layer_prefix(student_config, s_layer)}{norm}.weight"] = w.float()[plan.hidden] * gain
    state[f"{s_pre.final_norm}.weight"] = teacher_weights[f"{t_pre.final_norm}.weight"].float()[plan.hidden] * gain
    if s.tied:
        state[arch.weight_name(student_config, "lm_head")] = state[arch.weight_name(student_config, "embed")]
    return state, {"method": method, "layers": chosen, "norm_scale": gain}


def inherited_model(teacher_weights, teacher_config, student_config, method: str, activations=None,
                    layers: str | None = None, rescale: bool | None = None):
    """(model, info): a causal LM of student_config (an HF config) whose weights are inherited_state's.
    Every parameter is set from the teacher: a student weight nothing selects (a norm this module does
    not know, a bias) is refused, not left at its random init."""
    from transformers import AutoModelForCausalLM

    state, info = inherited_state(teacher_weights, teacher_config, student_config, method, activations, layers, rescale)
    model = AutoModelForCausalLM.from_config(student_config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and arch.dims(student_config).tied)]
    if missing or unexpected:
        raise FreshInitError(f"{method}: the student's weights {missing or unexpected} have no selection rule here "
                             f"({'not set' if missing else 'not in the student'}); pkt_core/fresh.py knows Llama-style "
                             "decoders (q,k,v,o,gate,up,down, two RMSNorms a layer, a final norm)")
    return model, info


# ---- pretraining from a given init --------------------------------------------------------------
@dataclass(frozen=True)
class PretrainParams:
    """A member's pretraining budget (mini/family.py's ModelRecipe + FamilyRecipe fields)."""

    lr: float
    steps: int
    batch: int
    seed: int
    weight_decay: float = 0.01
    probe_blocks: int = 64  # the fixed blocks the loss at fixed steps is measured on
    loss_at: tuple[int, ...] = field(default_factory=tuple)  # steps to measure; empty: probe_steps(steps)


def probe_steps(steps: int) -> tuple[int, ...]:
    """0, 1/8, 1/4, 1/2 and all of the budget (the papers plot loss against steps from the init)."""
    return tuple(sorted({0, steps // 8, steps // 4, steps // 2, steps}))


def probe_loss(model, probe: torch.Tensor, batch: int = 16) -> float:
    """Mean next-token loss over the probe blocks (every token of every block, equal weight)."""
    was = model.training
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(probe), batch):
            x = probe[i:i + batch].to(model.device)
            total += model(input_ids=x, labels=x).loss.item() * len(x)
            n += len(x)
    model.train(was)
    return total / max(n, 1)


def pretrain(model, blocks: torch.Tensor, p: PretrainParams, progress: bool = True) -> dict:
    """Pretrain `model` in place on packed blocks [n, block] exactly as mini/family.py pretrain() does
    (AdamW, cosine with 5% warm-up, clip 1.0, epochs over the blocks in a permutation drawn from
    p.seed), so a random init seeded with the family's seed reproduces the family's student.
    Returns {"losses": per-step train loss, "loss_at": {step: probe loss}, "probe_blocks"}."""
    from .mini.family import pretrain_loop

    at = set(p.loss_at or probe_steps(p.steps))
    probe = blocks[torch.randperm(len(blocks), generator=torch.Generator().manual_seed(p.seed + 1))[:p.probe_blocks]]
    loss_at = {0: probe_loss(model, probe)} if 0 in at else {}

    def measure(step: int) -> None:
        if step in at:
            loss_at[step] = probe_loss(model, probe)

    losses = pretrain_loop(model, blocks, p.lr, p.steps, p.batch, p.seed, "pretrain fresh student", progress,
                           p.weight_decay, after_step=measure)
    return {"losses": losses, "loss_at": {str(k): v for k, v in sorted(loss_at.items())},
            "probe_blocks": len(probe)}


def random_model(config, seed: int):
    """The random init the family's own pretraining starts from (torch.manual_seed(seed), then the model)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def pretraining_section(table) -> str:
    """report.md's section on the fresh students: probe loss at each fixed step, one row per (student,
    variant); table: rows of student, variant, step, probe_loss (the sweep's pretraining.csv)."""
    if table is None or len(table) == 0:
        return ""
    wide = table.pivot_table(index=["student", "variant"], columns="step", values="probe_loss", aggfunc="first")
    steps = list(wide.columns)
    lines = ["## Fresh students: pretraining loss from each init",
             "",
             "The teacher's weights made into a student (weight selection, subcloning) and a random init, each "
             "pretrained on the student's corpus for the student's budget (pkt_core/fresh.py); the next-token loss "
             f"on {PretrainParams.probe_blocks} fixed blocks of that corpus at fixed steps (pretraining.csv). The "
             "papers' claim is a lower loss at equal steps; their scores on the endpoint are in the runs above.",
             "",
             "| student | variant | " + " | ".join(f"step {s}" for s in steps) + " |",
             "|" + "---|" * (len(steps) + 2)]
    for (student, variant), row in wide.iterrows():
        lines.append(f"| {student} | {variant} | " + " | ".join(f"{row[s]:.3f}" for s in steps) + " |")
    return "\n".join(lines) + "\n"
