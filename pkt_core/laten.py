"""LaTen (Locate-Then-Align, "Neural Incompatibility", Tan et al., ACL 2025): the pre-align method.

Three steps, as the authors' code does them (github Trae1ounG/Neural_Incompatibility @ bba32ea;
method card shared/methods/laten.md), with what pkt does differently said where it happens:

1. locate (`attribute`, `locate`): on one sample, the logit-lens gain of every layer's attention
   and FFN output and of every neuron (FFN intermediate neurons; attention o_proj input channels)
   toward the answer's target token, for teacher and student separately;
2. align (`train_translator`): one two-layer MLP per module type maps the teacher's top-attributed
   rows/columns (width d_t) to student width d_s; trained against the student's answer loss with
   the translated rows added into the student, plus a size penalty;
3. inject (`make_delta`, `apply_delta`): the translated rows are ADDED to the student's own
   top-attributed rows/columns, explicitly (W[idx] += T(teacher rows)), so a saved model carries
   them (the released script saves the unchanged student).

Everything here is plain torch on models and tensors: no Prefect, no store.
"""
from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from . import arch
from .data import IGNORE, Sample, tokenize
from .errors import UserError
from .progress import Progress

# module type -> (which attribution locates it, the axis of the weight its neurons index):
# rows (axis 0) of up/v, columns (axis 1) of down/o. Architecture as data, not branches.
MODULES: dict[str, tuple[str, int]] = {"up": ("ffn", 0), "down": ("ffn", 1), "v": ("attn", 0), "o": ("attn", 1)}
# the GQA port's choice (Qwen2.5, rebuttal/LaTen_qwen): no v_proj, whose rows are kv channels
DEFAULT_MODULES = ("up", "down", "o")
STRIP = '.") \n,]'  # trailing characters dropped from the answer before its last token is the target
NORMS = ("authors", "rms")


class LatenError(UserError, ValueError):
    pass


# ---- step A: locate ---------------------------------------------------------------------------
def target_example(sample: Sample, tokenizer) -> tuple[torch.Tensor, int]:
    """(1 x T prefix ids, target id): the answer without trailing punctuation/space, the whole text
    tokenized, its last token the target and everything before it the input (knowledge_neurons.py:99-104)."""
    answer = sample.answer.rstrip(STRIP)
    if not answer:
        raise LatenError(f"sample answer {sample.answer!r} is only punctuation/space: LaTen needs a target token")
    ids = tokenize(tokenizer, sample.prompt + answer)
    if len(ids) < 2:
        raise LatenError(f"sample {sample.prompt[:40]!r}: fewer than 2 tokens, no prefix to attribute from")
    return torch.tensor([ids[:-1]]), ids[-1]


class Lens:
    """LL(v) = log softmax(lm_head(norm(v)))[target], over the vocabulary in chunks, fp32.

    norm "authors": g * v / sqrt(s), s the std of the last layer's output at the last position
    (knowledge_neurons/utils.py:13-18, knowledge_neurons.py:111): one constant for every candidate,
    a temperature rather than the model's RMSNorm. "rms": the model's own final RMSNorm per
    candidate (LL of the last layer's output is then the model's own target log-prob).
    Peak memory: chunk rows x vocab_chunk floats, whatever the vocabulary."""

    def __init__(self, lm_head: torch.Tensor, gain: torch.Tensor, target: int, *, norm: str, last: torch.Tensor,
                 eps: float, vocab_chunk: int = 16384):
        if norm not in NORMS:
            raise ValueError(f"unknown lens norm {norm!r}; choose one of {', '.join(NORMS)}")
        self.w, self.gain, self.target, self.norm = lm_head, gain.float(), target, norm
        self.eps, self.chunk = eps, vocab_chunk
        last = last.float()
        std = torch.sqrt(last.var(unbiased=False) + 1e-5)
        self.scale = torch.rsqrt(std + 1e-6)

    def _normed(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.norm == "authors":
            return x * self.scale * self.gain
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.gain

    def logprob(self, x: torch.Tensor) -> torch.Tensor:
        """[n, d] -> [n] target log-probabilities."""
        y = self._normed(x)
        lse = torch.full((y.shape[0],), -math.inf, device=y.device)
        for c0 in range(0, self.w.shape[0], self.chunk):
            logits = y @ self.w[c0:c0 + self.chunk].float().T
            lse = torch.logaddexp(lse, torch.logsumexp(logits, -1))
        return y @ self.w[self.target].float() - lse


@dataclass
class _Capture:
    """Last-position vectors of one decoder layer: what a forward hook keeps (never all positions)."""

    h_in: torch.Tensor | None = None
    attn_in: torch.Tensor | None = None  # o_proj input: per query-head channel, attention-weighted values
    attn_out: torch.Tensor | None = None
    ffn_in: torch.Tensor | None = None  # down_proj input: act(gate) * up
    ffn_out: torch.Tensor | None = None


def _last(t: torch.Tensor) -> torch.Tensor:
    return t[0, -1].detach().float().clone()


def _hooks(model, config, caps: list[_Capture], final: dict) -> list:
    handles = []
    for layer, cap in enumerate(caps):
        block = model.get_submodule(arch.layer_prefix(config, layer).rstrip("."))
        o = model.get_submodule(arch.module_path(config, "o", layer))
        down = model.get_submodule(arch.module_path(config, "down", layer))

        def pre_block(mod, args, kwargs, cap=cap):
            cap.h_in = _last(args[0] if args else kwargs["hidden_states"])

        handles += [
            block.register_forward_pre_hook(pre_block, with_kwargs=True),
            o.register_forward_pre_hook(lambda m, a, cap=cap: setattr(cap, "attn_in", _last(a[0]))),
            o.register_forward_hook(lambda m, a, out, cap=cap: setattr(cap, "attn_out", _last(out))),
            down.register_forward_pre_hook(lambda m, a, cap=cap: setattr(cap, "ffn_in", _last(a[0]))),
            down.register_forward_hook(lambda m, a, out, cap=cap: setattr(cap, "ffn_out", _last(out))),
        ]
    norm = model.get_submodule(arch.architecture(config).final_norm)
    handles.append(norm.register_forward_pre_hook(lambda m, a: final.__setitem__("h", _last(a[0]))))
    return handles


def _neuron_scores(lens: Lens, base: torch.Tensor, coeff: torch.Tensor, w: torch.Tensor, base_ll: torch.Tensor,
                   chunk: int) -> torch.Tensor:
    """LL(base + coeff_j * w[:, j]) - LL(base) for every column j of w ([d, n]), n in chunks."""
    out = torch.empty(w.shape[1])
    for j0 in range(0, w.shape[1], chunk):
        cols = w[:, j0:j0 + chunk].float().T * coeff[j0:j0 + chunk, None]  # [c, d]
        out[j0:j0 + chunk] = (lens.logprob(base + cols) - base_ll).cpu()
    return out


@torch.no_grad()
def attribute(model, input_ids: torch.Tensor, target: int, *, norm: str = "authors", vocab_chunk: int = 16384,
              neuron_chunk: int = 512) -> dict[str, torch.Tensor]:
    """Logit-lens attribution of one sample's last position toward `target`.

    Returns fp32 tensors: attn_layer [L] = LL(h_in + attn_out) - LL(h_in); ffn_layer [L] =
    LL(h_mid + ffn_out) - LL(h_mid); ffn_neuron [L, f]: LL(h_mid + m_j W_down[:, j]) - LL(h_mid);
    attn_channel [L, heads*head_dim]: LL(h_in + z_c W_o[:, c]) - LL(h_in), z the o_proj input
    (sum over positions of attention weight x value, per query-head channel: knowledge_neurons.py:218-283).
    One forward pass; hooks keep only last-position vectors; the lens works layer by layer, in
    chunks of neurons and of the vocabulary, so memory is bounded whatever V and f are.
    Scores are not rounded (the authors round to 4 decimals before ranking)."""
    config = model.config
    d = arch.dims(config)
    caps = [_Capture() for _ in range(d.layers)]
    final: dict = {}
    handles = _hooks(model, config, caps, final)
    was_training = model.training
    model.eval()
    try:
        model(input_ids=input_ids.to(model.device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    dev = model.device
    norm_mod = model.get_submodule(arch.architecture(config).final_norm)
    lm_head = model.get_submodule(arch.module_path(config, "lm_head")).weight
    lens = Lens(lm_head, norm_mod.weight.detach(), target, norm=norm, last=final["h"].to(dev),
                eps=getattr(norm_mod, "variance_epsilon", 1e-6), vocab_chunk=vocab_chunk)
    out = {"attn_layer": torch.zeros(d.layers), "ffn_layer": torch.zeros(d.layers),
           "ffn_neuron": torch.zeros(d.layers, d.intermediate), "attn_channel": torch.zeros(d.layers, d.q_width)}
    for layer, c in enumerate(caps):
        h_in, h_mid = c.h_in.to(dev), (c.h_in + c.attn_out).to(dev)
        ll = lens.logprob(torch.stack([h_in, h_mid, h_mid + c.ffn_out.to(dev)]))
        out["attn_layer"][layer], out["ffn_layer"][layer] = float(ll[1] - ll[0]), float(ll[2] - ll[1])
        w_o = model.get_submodule(arch.module_path(config, "o", layer)).weight
        w_down = model.get_submodule(arch.module_path(config, "down", layer)).weight
        out["attn_channel"][layer] = _neuron_scores(lens, h_in, c.attn_in.to(dev), w_o, ll[0], neuron_chunk)
        out["ffn_neuron"][layer] = _neuron_scores(lens, h_mid, c.ffn_in.to(dev), w_down, ll[1], neuron_chunk)
    return out


@dataclass(frozen=True)
class Pair:
    """One paired layer of one module type: teacher layer/indices -> student layer/indices."""

    module: str
    t_layer: int
    s_layer: int
    t_idx: torch.Tensor
    s_idx: torch.Tensor


def _top_layers(scores: torch.Tensor, n: int) -> list[int]:
    return sorted(torch.topk(scores, n).indices.tolist())  # top n by score, then in depth order


def counts(student_config, rate: float) -> dict[str, int]:
    """Neurons per paired layer: int(rate x f_s) FFN neurons, int(rate x heads*head_dim) attention
    channels (train_LaTen.py:156-157, where heads*head_dim = d_s for Llama-2-7B)."""
    d = arch.dims(student_config)
    k = {"ffn": int(rate * d.intermediate), "attn": int(rate * d.q_width)}
    if min(k.values()) < 1:
        raise LatenError(f"rate {rate}: selects no neuron of the student (f={d.intermediate}, "
                         f"heads*head_dim={d.q_width}); raise the rate")
    return k


def locate(t_attr: dict, s_attr: dict, k: dict[str, int], modules=DEFAULT_MODULES,
           n_layers: int | None = None) -> list[Pair]:
    """The paired layers and indices: the top n_layers teacher layers (default: the student's
    depth) of each side (attention, FFN) by layer score, in depth order, the i-th one paired with
    the i-th of the student's top layers; in each, the top-k neurons by score on both sides."""
    n = n_layers or len(s_attr["ffn_layer"])
    if n > len(t_attr["ffn_layer"]) or n > len(s_attr["ffn_layer"]):
        raise LatenError(f"{n} paired layers: the teacher has {len(t_attr['ffn_layer'])} and the student "
                         f"{len(s_attr['ffn_layer'])}; LaTen pairs at most the smaller depth")
    pairs = []
    for m in modules:
        side, _ = MODULES[m]
        neuron = "ffn_neuron" if side == "ffn" else "attn_channel"
        width = min(t_attr[neuron].shape[1], s_attr[neuron].shape[1])
        if k[side] > width:
            raise LatenError(f"{k[side]} {side} neurons per layer: a model has only {width}; lower the rate")
        for tl, sl in zip(_top_layers(t_attr[f"{side}_layer"], n), _top_layers(s_attr[f"{side}_layer"], n)):
            pairs.append(Pair(m, tl, sl, torch.topk(t_attr[neuron][tl], k[side]).indices.sort().values,
                              torch.topk(s_attr[neuron][sl], k[side]).indices.sort().values))
    return pairs


def check_modules(modules, teacher_config, student_config) -> None:
    """v_proj rows are kv channels: indexing them by query channels needs heads == kv_heads."""
    bad = [m for m in modules if m not in MODULES]
    if bad:
        raise LatenError(f"LaTen modules {bad}: choose from {', '.join(MODULES)}")
    if "v" in modules:
        for who, cfg in (("teacher", teacher_config), ("student", student_config)):
            d = arch.dims(cfg)
            if d.kv_heads != d.heads:
                raise LatenError(f"LaTen module v: the {who} uses grouped-query attention ({d.heads} query heads, "
                                 f"{d.kv_heads} kv heads), so v_proj rows cannot be indexed by query channels; "
                                 "leave v out (the authors' GQA port keeps o_proj only)")


def teacher_vectors(weights, teacher_config, pairs: list[Pair]) -> list[torch.Tensor]:
    """Each pair's teacher rows (up, v) or columns (down, o) as [K, d_t] fp32, read one weight at a time
    from a name -> tensor mapping (a LazyWeights, or a state dict)."""
    out = []
    for p in pairs:
        w = weights[arch.weight_name(teacher_config, p.module, p.t_layer)]
        axis = MODULES[p.module][1]
        out.append(w.index_select(axis, p.t_idx).float().T.contiguous() if axis else
                   w.index_select(0, p.t_idx).float())
    return out


# ---- step B: the translator ---------------------------------------------------------------------
class Translator(nn.Module):
    """One MLP per module type, d_t -> d_t -> d_s, ReLU, no bias, fp32, weights N(0, 1e-5) (std),
    shared by every layer (knowledge_translator.py:25-38). Acts on each d_t vector."""

    def __init__(self, modules, d_t: int, d_s: int, seed: int = 0, init_std: float = 1e-5):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.net = nn.ModuleDict({m: nn.Sequential(nn.Linear(d_t, d_t, bias=False), nn.ReLU(),
                                                   nn.Linear(d_t, d_s, bias=False)) for m in modules})
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * init_std)

    def forward(self, pairs: list[Pair], vectors: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.net[p.module](v) for p, v in zip(pairs, vectors)]


@dataclass(frozen=True)
class LatenParams:
    """The authors' hyperparameters (train_LaTen.sh / train_LaTen.py) unless said otherwise."""

    rate: float = 0.1  # transfer rate while training
    modules: tuple[str, ...] = DEFAULT_MODULES
    n_layers: int | None = None  # paired layers; None: the student's depth (N_LAYERS)
    lr: float = 3e-4  # the .sh's value (README and default: 3e-5)
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    mse_weight: float = 1000.0
    pct_start: float = 0.1
    div_factor: float = 25.0
    final_div_factor: float = 1.0
    align_per_step: int = 15
    norm: str = "authors"
    seed: int = 0
    init_std: float = 1e-5  # N(0, init_std) translator weights (knowledge_translator.py:36-38)
    # (d_t, d_s) that init_std and lr were set for: None, used as given; (5120, 4096), the authors' 13B -> 7B
    reference_width: tuple[int, int] | None = None
    # train until the val answer CE moves: beyond the extract samples (cycled in order) until it differs from
    # its step-0 value by more than until_moved nats, at most max_steps steps (None: 8 x the extract samples);
    # the OneCycle schedule then spans max_steps. None: the authors' one pass over the extract samples
    until_moved: float | None = None
    max_steps: int | None = None

    def as_dict(self) -> dict:
        d = asdict(self)
        d["modules"], d["betas"] = list(self.modules), list(self.betas)
        if self.reference_width is not None:
            d["reference_width"] = list(self.reference_width)
        # fields added later stay out at their defaults, so a translator's key is unchanged
        return {k: v for k, v in d.items() if k not in LATER_FIELDS or v != LATER_FIELDS[k]}

    def at_width(self, d_t: int, d_s: int) -> tuple[float, float]:
        """(init std, lr) of a d_t -> d_t -> d_s translator, carried from reference_width. Its first output
        has size ~ std^2 sqrt(d_t d_s) |u| (two layers of Gaussian weights), so std x (ref_t ref_s / d_t d_s)^(1/4)
        keeps the authors' initial output; an Adam step moves each weight ~ lr and a layer's output ~ lr x
        fan-in, so lr x ref_t / d_t keeps their per-step change (muP's hidden-layer rule)."""
        if self.reference_width is None:
            return self.init_std, self.lr
        ref_t, ref_s = self.reference_width
        return self.init_std * ((ref_t * ref_s) / (d_t * d_s)) ** 0.25, self.lr * ref_t / d_t

    def step_budget(self, n_extract: int) -> int:
        """Optimizer steps the translator may take: one per extract sample, or with until_moved up to the cap."""
        if self.until_moved is None:
            return n_extract
        return self.max_steps or 8 * n_extract

    @classmethod
    def from_dict(cls, d: dict) -> "LatenParams":
        d = dict(d)
        for name in ("modules", "betas", "reference_width"):
            if d.get(name) is not None:
                d[name] = tuple(d[name])
        return cls(**d)


LATER_FIELDS = {"init_std": 1e-5, "reference_width": None, "until_moved": None, "max_steps": None}


def delta_rows(pairs: list[Pair], rows: list[torch.Tensor], student_config) -> dict[str, list]:
    """weight name -> [(axis, student indices, rows [K, len of the other axis])]."""
    out: dict[str, list] = {}
    for p, r in zip(pairs, rows):
        out.setdefault(arch.weight_name(student_config, p.module, p.s_layer), []).append(
            (MODULES[p.module][1], p.s_idx, r))
    return out


def injected(params: dict[str, torch.Tensor], delta: dict[str, list]) -> dict[str, torch.Tensor]:
    """{name: W + delta} for the weights the delta touches, differentiable in the delta's rows:
    W.index_add along the selected rows/columns, no dense delta of W's size."""
    out = {}
    for name, parts in delta.items():
        w = params[name]
        for axis, idx, rows in parts:
            w = w.index_add(axis, idx.to(w.device), (rows.T if axis else rows).to(device=w.device, dtype=w.dtype))
        out[name] = w
    return out


def translator_loss(student, translator: Translator, pairs: list[Pair], vectors: list[torch.Tensor],
                    batch: list[dict[str, torch.Tensor]], mse_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, summed answer CE): sum over samples of [mean answer-token CE of the student with the
    translated rows added + mse_weight x sum over module types of mean(T(x)^2)]: the authors' loss
    with micro-batch 1, gradients summed over the batch (train_LaTen.py:264-323). The translator runs
    once here (the authors rerun it per micro-batch: same maths, more work)."""
    from torch.func import functional_call

    rows = translator(pairs, vectors)
    by_module: dict[str, list[torch.Tensor]] = {}
    for p, r in zip(pairs, rows):
        by_module.setdefault(p.module, []).append(r)
    mse = sum(torch.cat([r.flatten() for r in rs]).pow(2).mean() for rs in by_module.values())
    params = dict(student.named_parameters())
    new = injected(params, delta_rows(pairs, rows, student.config))
    ce_total = torch.zeros(())
    for s in batch:
        ids, labels = s["input_ids"].to(student.device), s["labels"].to(student.device)
        logits = functional_call(student, {**params, **new}, (ids,)).logits.float()
        ce_total = ce_total + nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=IGNORE).cpu()
    return ce_total + len(batch) * mse_weight * mse.cpu(), ce_total


def align_batch(n_align: int, per_step: int, seed: int, step: int) -> list[int]:
    """The align samples of one step, drawn under the training seed (the authors draw with random.seed(step))."""
    return random.Random(f"laten-align:{seed}:{step}").sample(range(n_align), min(per_step, n_align))


def one_cycle(opt, params: LatenParams, total_steps: int):
    """The authors' OneCycle schedule (cosine, `pct_start` warm-up). torch peaks at step
    pct_start x total_steps - 1 and divides by zero when that is step 0 exactly (10% of 10 steps): a
    hair less warm-up keeps its convention, max_lr at step 0 (to 1e-9), then the anneal."""
    pct = params.pct_start * (1 - 1e-9) if math.isclose(params.pct_start * total_steps, 1.0) else params.pct_start
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=params.lr, total_steps=total_steps, pct_start=pct,
                                               anneal_strategy="cos", div_factor=params.div_factor,
                                               final_div_factor=params.final_div_factor)


def train_translator(teacher_weights, teacher_config, student, extract: list[dict], align: list[dict],
                     params: LatenParams, on_step=None, progress: bool = True, val: list[dict] | None = None,
                     report: dict | None = None) -> list[dict]:
    """One optimizer step per extract sample (each {"encoded", "t_attr", "s_attr"}): locate on it,
    batch = `align_per_step` align samples + it, AdamW + OneCycle (cosine, 10% warm-up).
    on_step(step (1-based: optimizer steps taken), translator state dict) after every step.
    Returns the per-step log (loss, answer CE). Teacher and student stay frozen. Its progress bar
    checks pkt's stop flag every step (pkt_core/progress.py).

    With params.until_moved, training goes on past the extract samples (taken again in order) until the
    val answer CE (`val`: encoded samples; `val_ce`) differs from its step-0 value by more than
    until_moved nats, or params.step_budget steps are taken; each step's log then holds its val_ce, and
    `report` (a dict, if given) receives {"val_start", "moved_at" (None: never moved), "threshold",
    "steps"}."""
    d_t, d_s = arch.dims(teacher_config).hidden, arch.dims(student.config).hidden
    check_modules(params.modules, teacher_config, student.config)
    k = counts(student.config, params.rate)
    init_std, lr = params.at_width(d_t, d_s)
    translator = Translator(params.modules, d_t, d_s, params.seed, init_std).to(student.device)
    student.eval()
    student.requires_grad_(False)
    opt = torch.optim.AdamW(translator.parameters(), lr=lr, weight_decay=params.weight_decay,
                            betas=tuple(params.betas))
    budget = params.step_budget(len(extract))
    sched = one_cycle(opt, replace(params, lr=lr), budget)
    until = params.until_moved
    if until is not None and not val:
        raise LatenError("LaTen until_moved: training until the val loss moves needs val samples")
    probe = _val_probe(teacher_weights, teacher_config, extract[0], k, params) if until is not None else None
    start = val_ce(student, translator, *probe, val) if until is not None else None
    moved_at = None
    log, bar = [], Progress(budget, "laten translator", "step", enabled=progress)
    for step in range(budget):
        ex = extract[step % len(extract)]
        pairs = locate(ex["t_attr"], ex["s_attr"], k, params.modules, params.n_layers)
        vectors = [v.to(student.device) for v in teacher_vectors(teacher_weights, teacher_config, pairs)]
        batch = [align[i] for i in align_batch(len(align), params.align_per_step, params.seed, step)] + [ex["encoded"]]
        loss, ce = translator_loss(student, translator, pairs, vectors, batch, params.mse_weight)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        log.append({"loss": loss.item(), "answer_ce": ce.item() / len(batch)})
        if until is not None:
            log[-1]["val_ce"] = val_ce(student, translator, *probe, val)
        if on_step is not None:
            on_step(step + 1, {n: t.detach().cpu().clone() for n, t in translator.state_dict().items()})
        bar.update()
        bar.set_postfix(loss=f"{log[-1]['loss']:.4f}")
        if until is not None and abs(log[-1]["val_ce"] - start) > until:
            moved_at = step + 1
            break
    bar.close()
    if report is not None and until is not None:
        report.update({"val_start": start, "moved_at": moved_at, "threshold": until, "steps": len(log)})
    return log


def _val_probe(teacher_weights, teacher_config, ex: dict, k: dict[str, int], params: LatenParams):
    """The pairs and teacher vectors the val loss is measured through: located on the first extract sample,
    the same at every step, so val_ce changes only with the translator."""
    pairs = locate(ex["t_attr"], ex["s_attr"], k, params.modules, params.n_layers)
    return pairs, teacher_vectors(teacher_weights, teacher_config, pairs)


def val_ce(student, translator: Translator, pairs: list[Pair], vectors: list[torch.Tensor],
           val: list[dict]) -> float:
    """Mean answer-token CE (nats) over the val samples of the student with the translator's rows added."""
    with torch.no_grad():
        vectors = [v.to(student.device) for v in vectors]
        _, ce = translator_loss(student, translator, pairs, vectors, val, 0.0)
    return ce.item() / len(val)


def load_translator(state: dict[str, torch.Tensor], modules) -> Translator:
    m0 = modules[0]
    d_t, d_s = state[f"net.{m0}.0.weight"].shape[1], state[f"net.{m0}.2.weight"].shape[0]
    t = Translator(modules, d_t, d_s)
    t.load_state_dict(state)
    return t


# ---- step C: inject -----------------------------------------------------------------------------
CONTROLS = ("translated", "zero", "random")


@torch.no_grad()
def make_delta(translator: Translator, pairs: list[Pair], vectors: list[torch.Tensor], student_config,
               control: str = "translated", draw_seed: int = 0) -> dict[str, torch.Tensor]:
    """The sparse update as tensors: '<weight>.idx' (int64 [n]) and '<weight>.rows' ([n, width], the
    values added to those rows, or to those columns for down/o, transposed). control "zero": the
    same support, values 0 (the whole path, nothing injected); "random": Gaussian rows rescaled to
    the translated rows' norms, drawn under draw_seed (the training seed)."""
    if control not in CONTROLS:
        raise ValueError(f"unknown LaTen control {control!r}; choose one of {', '.join(CONTROLS)}")
    rows = translator(pairs, vectors)
    if control == "zero":
        rows = [torch.zeros_like(r) for r in rows]
    elif control == "random":
        g = torch.Generator().manual_seed(draw_seed)
        rand = [torch.randn(r.shape, generator=g) for r in rows]
        rows = [x * (r.norm(dim=1, keepdim=True) / x.norm(dim=1, keepdim=True).clamp_min(1e-30))
                for x, r in zip(rand, rows)]
    out = {}
    for name, parts in delta_rows(pairs, rows, student_config).items():
        axis = parts[0][0]
        idx = torch.cat([i for _, i, _ in parts])
        if idx.unique().numel() != idx.numel():
            raise LatenError(f"{name}: two paired layers selected one index twice")
        out[f"{name}.idx"] = idx.long()
        out[f"{name}.rows"] = torch.cat([r for _, _, r in parts]).float().contiguous()
        out[f"{name}.axis"] = torch.tensor([axis])
    return out


def delta_weights(delta: dict[str, torch.Tensor]) -> list[str]:
    return sorted(n[: -len(".idx")] for n in delta if n.endswith(".idx"))


@torch.no_grad()
def apply_delta(model, delta: dict[str, torch.Tensor]):
    """W[idx] += rows (or W[:, idx] += rows.T) in place on the model's own weights: what is saved or
    scored afterwards carries the transfer. Returns the model."""
    params = dict(model.named_parameters())
    for name in delta_weights(delta):
        if name not in params:
            raise LatenError(f"the LaTen update names {name}, which this student does not have; "
                             "was it made for another student?")
        w, idx, rows = params[name], delta[f"{name}.idx"].to(params[name].device), delta[f"{name}.rows"]
        axis = int(delta[f"{name}.axis"][0])
        w.index_add_(axis, idx, (rows.T if axis else rows).to(device=w.device, dtype=w.dtype))
    return model


def delta_stats(delta: dict[str, torch.Tensor]) -> dict:
    """Size of an update: entries, Frobenius norm, largest row norm."""
    rows = [delta[f"{n}.rows"] for n in delta_weights(delta)]
    if not rows:
        return {"entries": 0, "norm": 0.0, "max_row_norm": 0.0}
    return {"entries": sum(r.numel() for r in rows), "norm": float(torch.sqrt(sum(r.pow(2).sum() for r in rows))),
            "max_row_norm": float(max(r.norm(dim=1).max() for r in rows))}


def update_size(delta: dict[str, torch.Tensor], weights) -> dict[str, float]:
    """The update's size against the weights it lands on, per module type: sqrt(sum ||delta||^2 / sum ||W||^2)
    over that type's touched weights (Frobenius norms), e.g. {"up": 3e-4, "down": 1e-4}. weights: name ->
    tensor (the student's; a LazyWeights view is enough)."""
    sums: dict[str, list[float]] = {}
    for name in delta_weights(delta):
        module = next((m for m in MODULES if name.endswith(f"{arch.LAYER_MODULES[m]}.weight")), name)
        acc = sums.setdefault(module, [0.0, 0.0])
        acc[0] += float(delta[f"{name}.rows"].double().pow(2).sum())
        acc[1] += float(weights[name].double().pow(2).sum())
    return {m: (d / w) ** 0.5 if w > 0 else float("nan") for m, (d, w) in sorted(sums.items())}


INERT_NLL = 1e-3  # nats: an update that moves the student's mean val answer NLL by less is "inert at this width"


def splits(n_rows: int, n_extract: int, n_align: int, seed: int = 0) -> tuple[list[int], list[int], list[int]]:
    """(extract, align, pool) line indices of a training file: disjoint, drawn once under `seed`; the
    seed sample of a transfer is drawn from the pool. Only the training file is read, so the
    study's val and test stay unseen."""
    if n_extract + n_align >= n_rows:
        raise LatenError(f"LaTen needs {n_extract} extract + {n_align} align samples and at least one more for the "
                         f"transfer's seed sample, but the training file has {n_rows}; lower laten.n_extract/n_align")
    order = list(range(n_rows))
    random.Random(f"laten-splits:{seed}").shuffle(order)
    return order[:n_extract], order[n_extract:n_extract + n_align], order[n_extract + n_align:]


def seed_sample(pool: list[int], seed: int) -> int:
    """The transfer's one seed sample (a seeded hyperparameter: results depend on it)."""
    return random.Random(f"laten-sample:{seed}").choice(pool)


def val_lines(pool: list[int], seed: int, n: int) -> list[int]:
    """The samples whose answer CE tells whether the translator has moved (until_moved): n of the pool
    (the training file's lines that are neither extract nor align), the seed's transfer sample left out."""
    rest = [i for i in pool if i != seed_sample(pool, seed)]
    if not rest:
        raise LatenError("LaTen until_moved needs val samples: the training file has no line beyond the extract "
                         "and align samples and the seed sample; lower laten.n_extract/n_align")
    return rest[:n]
