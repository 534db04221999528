"""LoRA initialization from extracted teacher tensors, as a stock peft adapter folder.

B = U_r diag(S_r), A = V_r^T (paper), with B divided by peft's scaling alpha/r (as peft's own
PiSSA init divides by it), so the *applied* delta (alpha/r) * B @ A is exactly `scale` times the
best rank-r approximation of the extracted matrix (Eckart-Young) for every (rank, alpha); the
paper has alpha = r, where nothing is divided. The delta step subtracts that product from the
student's base weights, so training starts from the student's own function (the move peft's
PiSSA/OLoRA inits make too).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import arch
from .errors import UserError
from .progress import track

PEFT_PREFIX = "base_model.model."
SPLITS = ("paper", "sqrt")


class RankTooLarge(UserError, ValueError):
    pass


SVD_METHODS = ("auto", "full", "lowrank")
OVERSAMPLE = 10  # extra directions torch.svd_lowrank samples beyond the rank
POWER_ITERS = 4  # its subspace iterations: enough for the decaying spectra of trained weights
LOWRANK_SEED = 0  # its random sketch is seeded: an init's bytes depend on its inputs only


def svd_factors(weight: torch.Tensor, rank: int, split: str = "paper",
                method: str = "full") -> tuple[torch.Tensor, torch.Tensor]:
    """(B [out x r], A [r x in]) with B @ A the rank-r truncated SVD of weight, in fp32 on its device.

    split='paper': B = U S, A = V^T; split='sqrt': B = U sqrt(S), A = sqrt(S) V^T.
    method='lowrank' uses torch.svd_lowrank (randomized, much faster when rank << size; its error
    against the full SVD is measured by bench/svd_lowrank.py); 'auto' picks it for large pieces.
    """
    if rank < 1:
        raise RankTooLarge(f"rank {rank}: a LoRA rank must be at least 1")
    if rank > min(weight.shape):
        raise RankTooLarge(f"rank {rank} is above {min(weight.shape)}, the short side of a {tuple(weight.shape)} "
                           f"matrix; choose a rank of at most {min(weight.shape)}")
    u, s, vh = truncated_svd(weight.float(), rank, method)
    if split == "paper":
        return (u * s).contiguous(), vh.contiguous()
    if split == "sqrt":
        r = s.sqrt()
        return (u * r).contiguous(), (r[:, None] * vh).contiguous()
    raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")


def svd_method(shape, rank: int, method: str = "auto") -> str:
    """'auto': the randomized SVD when the matrix's short side is at least 8x its sketch (rank +
    oversampling), where it is many times faster than the full SVD; the full SVD otherwise."""
    if method == "auto":
        return "lowrank" if 8 * (rank + OVERSAMPLE) <= min(shape) else "full"
    if method not in SVD_METHODS:
        raise ValueError(f"unknown SVD method {method!r}; choose one of {', '.join(SVD_METHODS)}")
    return method


def truncated_svd(w: torch.Tensor, rank: int, method: str = "full"):
    method = svd_method(w.shape, rank, method)
    if method == "full":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank]
    devices = [w.device] if w.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(LOWRANK_SEED)
        u, s, v = torch.svd_lowrank(w, q=min(rank + OVERSAMPLE, min(w.shape)), niter=POWER_ITERS)
    return u[:, :rank], s[:rank], v[:, :rank].T


def relative_error(w: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> float:
    """||W - B A||_F / ||W||_F without forming B A (a vocabulary-sized piece would need a second copy):
    with B A = U S V^T (U, V orthonormal), ||W - B A||^2 = ||W||^2 - 2 sum_i s_i u_i^T W v_i + sum_i s_i^2."""
    w = w.float()
    qb, rb = torch.linalg.qr(b.float())
    qa, ra = torch.linalg.qr(a.float().T)
    core = rb @ ra.T  # B A = qb core qa^T
    cross = (qb.T @ (w @ qa) * core).sum()  # <W, B A>
    total = w.pow(2).sum()
    err2 = total - 2 * cross + core.pow(2).sum()
    return float(err2.clamp(min=0).sqrt() / total.sqrt()) if total > 0 else 0.0


def leaf(module: str) -> str:
    path = arch.LAYER_MODULES.get(module) or arch.GLOBAL_MODULES[module]
    return path.rsplit(".", 1)[-1]


def peft_keys(config, module: str, layer: int | None) -> tuple[str, str]:
    """(A key, B key) under which peft saves this module's LoRA factors."""
    base = PEFT_PREFIX + arch.module_path(config, module, layer)
    if module == "embed":
        return base + ".lora_embedding_A", base + ".lora_embedding_B"
    return base + ".lora_A.weight", base + ".lora_B.weight"


def peft_orientation(module: str, weight: torch.Tensor) -> torch.Tensor:
    """The matrix that peft's B @ A stands for: the weight itself, transposed for embeddings
    (peft's embedding delta is (B @ A)^T with B: hidden x r, A: r x vocab)."""
    return weight.T if module == "embed" else weight


def init_state_dict(extracted: dict[str, torch.Tensor], student_config, rank: int, *, alpha: float,
                    split: str = "paper", scale: float = 1.0, method: str = "full",
                    errors: dict[str, float] | None = None) -> dict[str, torch.Tensor]:
    """peft adapter tensors for every extracted weight, stored so that the delta peft applies,
    (alpha/rank) * B @ A, equals scale * (the rank-r approximation of the extracted matrix).

    split='paper' divides B by alpha/rank (A keeps orthonormal rows); split='sqrt' divides each
    factor by sqrt(alpha/rank), as peft's PiSSA does. errors, if given, receives each piece's
    relative reconstruction error ||W - B A||_F / ||W||_F (before scaling), keyed by weight name."""
    names = arch.transferable_weights(student_config)
    scaling = alpha / rank
    b_div, a_div = (scaling, 1.0) if split == "paper" else (scaling ** 0.5, scaling ** 0.5)
    out = {}
    for name, weight in track(extracted.items(), "lora init (SVD)", "piece", total=len(extracted)):
        module, layer = names[name]
        w = peft_orientation(module, weight)
        b, a = svd_factors(w, rank, split, method)
        if errors is not None:
            errors[name] = relative_error(w, b, a)
        key_a, key_b = peft_keys(student_config, module, layer)
        out[key_a], out[key_b] = a / a_div, b * (scale / b_div)
    return out


def scaling_note(rank: int, alpha: float, split: str, scale: float) -> str:
    """How an init was sized, for its header: a reader of the file knows what B @ A stands for."""
    how = "B divided by alpha/r" if split == "paper" else "B and A each divided by sqrt(alpha/r)"
    return (f"applied delta (alpha/r) * B @ A = {scale:g} x the rank-{rank} SVD approximation of the extracted "
            f"matrix; alpha/r = {alpha:g}/{rank} = {alpha / rank:g}; stored with {how}")


def lora_config(modules, rank: int, alpha: float, dropout: float = 0.05, base_model: str | None = None):
    from peft import LoraConfig

    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=sorted(leaf(m) for m in modules),
        init_lora_weights=True,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model,
    )


def modules_in(state: dict[str, torch.Tensor], config) -> list[str]:
    """The module types a peft state dict covers."""
    found = set()
    for module, layer in arch.transferable_weights(config).values():
        if peft_keys(config, module, layer)[0] in state:
            found.add(module)
    return sorted(found)


def save_adapter(directory: str | Path, state: dict[str, torch.Tensor], config, rank: int, alpha: float,
                 dropout: float = 0.05, metadata: dict[str, str] | None = None) -> Path:
    """Write a peft adapter folder (adapter_config.json + adapter_model.safetensors)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = lora_config(modules_in(state, config), rank, alpha, dropout, getattr(config, "_name_or_path", None))
    cfg.save_pretrained(str(directory))
    _sort_sets(cfg, directory / "adapter_config.json")
    meta = {"format": "pt", **(metadata or {})}
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "adapter_model.safetensors"), metadata=meta)
    return directory


def _sort_sets(cfg, path: Path) -> None:
    """peft keeps target_modules (and other module lists) as sets and writes them in set order,
    which changes between processes with the string hash seed: sort them, so one adapter has one
    set of bytes (the store's digest, and every key downstream, depend on them)."""
    saved = json.loads(path.read_text())
    for name, value in vars(cfg).items():
        if isinstance(value, (set, frozenset)) and isinstance(saved.get(name), list):
            saved[name] = sorted(saved[name])
    path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")


def read_adapter(directory: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    directory = Path(directory)
    cfg = json.loads((directory / "adapter_config.json").read_text())
    return cfg, load_file(str(directory / "adapter_model.safetensors"))


def subtract_delta(peft_model, adapter_name: str = "default") -> None:
    """The paper's delta step, in place: W_base <- W_base - scale * B @ A for every LoRA layer,
    so the wrapped model computes exactly the student's function before training."""
    from peft.tuners.lora import LoraLayer

    with torch.no_grad():
        for module in peft_model.modules():
            if isinstance(module, LoraLayer) and adapter_name in module.scaling:
                base = module.get_base_layer()
                delta = module.get_delta_weight(adapter_name)
                base.weight.sub_(delta.to(base.weight.dtype))


def trainable_from_init(student, init_dir: str | Path, subtract: bool = True):
    """A ready-to-train PeftModel: the student (modified in place, no second copy) wrapped with
    the init adapter, delta subtracted so step 0 computes the student's function."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(student, str(init_dir), is_trainable=True)
    if subtract:
        subtract_delta(model)
    return model


def residual_model(student, init_dir: str | Path):
    """The student with each init module's applied delta subtracted (W - (alpha/r) B @ A), as a
    plain transformers model: the base that the init adapter at init_dir trains on. Loaded as
    PeftModel.from_pretrained(residual, init_dir), it computes the student's function at step 0
    (peft's PiSSA path writes the same residual base). Modifies student in place."""
    return trainable_from_init(student, init_dir).unload()


def fold_init(trained: dict[str, torch.Tensor], init: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A rank-2r adapter equal to (trained - init) for use on the *unmodified* student.

    delta = B A - B0 A0 = [B | -B0] [A ; A0]. peft's save_pretrained(path_initial_model_for_weight_conversion)
    does the same but drops embedding factors (lora_embedding_A/B), so pkt does it here.
    """
    out = {}
    for k, v in trained.items():
        if k.endswith(A_SUFFIXES):
            out[k] = torch.cat([v, init[k]], dim=0)
        elif k.endswith(("lora_B.weight", "lora_embedding_B")):
            out[k] = torch.cat([v, -init[k]], dim=1)
        else:
            out[k] = v
    return out


A_SUFFIXES = ("lora_A.weight", "lora_embedding_A")


def factor_pairs(state: dict[str, torch.Tensor]) -> list[tuple[str, str]]:
    """(A key, B key) of every module in a peft state dict."""
    return [(k, k.replace("lora_A", "lora_B").replace("lora_embedding_A", "lora_embedding_B"))
            for k in state if k.endswith(A_SUFFIXES)]


def factor_singular_values(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Singular values of B @ A from the factors alone: with B = Q_b R_b and A^T = Q_a R_a, B A and
    the r x r matrix R_b R_a^T have the same singular values (no SVD of the full-size product)."""
    _, rb = torch.linalg.qr(b.float())
    _, ra = torch.linalg.qr(a.float().T)
    return torch.linalg.svdvals(rb @ ra.T)


def top_singular_values(state: dict[str, torch.Tensor], scaling: float, k: int = 3) -> list[float]:
    """Mean over modules of the top-k singular values of the applied delta scaling * B @ A
    (scaling = alpha/r): the init's effective size."""
    tops = []
    for key_a, key_b in factor_pairs(state):
        s = scaling * factor_singular_values(state[key_b], state[key_a])[:k]
        tops.append(torch.nn.functional.pad(s, (0, k - s.numel())))
    return torch.stack(tops).mean(0).tolist() if tops else []


def init_size(peft_model, adapter_name: str = "default") -> dict[str, float]:
    """The step-0 init's effective size, from peft's own applied deltas (alpha/r included):
    top_sv, the mean over LoRA modules of the delta's top singular value, and top_sv_ratio, the
    mean of its ratio to the top singular value of the student's own weight for that module.

    Call it at step 0 (before training): the model then computes the student's function, so the
    student's weight is base + delta for every init (lora: delta 0; PiSSA and the delta step:
    base = W - delta)."""
    from peft.tuners.lora import LoraLayer

    tops, ratios = [], []
    with torch.no_grad():
        for module in peft_model.modules():
            if isinstance(module, LoraLayer) and adapter_name in module.scaling:
                delta = module.get_delta_weight(adapter_name).float()
                base = module.get_base_layer().weight.float()
                student = base + delta.reshape(base.shape)
                top = float(torch.linalg.matrix_norm(delta, ord=2))
                tops.append(top)
                ratios.append(top / max(float(torch.linalg.matrix_norm(student, ord=2)), 1e-30))
    if not tops:
        return {}
    return {"top_sv": sum(tops) / len(tops), "top_sv_ratio": sum(ratios) / len(ratios)}


def _orthonormal(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(rows, cols, generator=g))
    return q * torch.sign(torch.diagonal(r))


def spectrum_matched(state: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """Control: each module keeps its init's singular values, with random orthonormal directions."""
    g = torch.Generator().manual_seed(seed)
    out = dict(state)
    for key_a, key_b in factor_pairs(state):
        b, a = state[key_b].float(), state[key_a].float()
        s = factor_singular_values(b, a)
        out[key_b] = _orthonormal(b.shape[0], a.shape[0], g) * s
        out[key_a] = _orthonormal(a.shape[1], a.shape[0], g).T.contiguous()
    return out


def shuffled(state: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """Control: the init with its rows and columns permuted (same spectrum, no teacher alignment).
    Embedding and lm_head are permuted along the vocabulary axis only."""
    g = torch.Generator().manual_seed(seed)
    out = dict(state)
    for key_a, key_b in factor_pairs(state):
        b, a = state[key_b], state[key_a]
        is_embed, is_head = key_a.endswith("lora_embedding_A"), ".lm_head." in key_a
        if not is_embed:  # B's rows are the output axis (the vocabulary for lm_head)
            out[key_b] = b[torch.randperm(b.shape[0], generator=g)]
        if not is_head:  # A's columns are the input axis (the vocabulary for embeddings)
            out[key_a] = a[:, torch.randperm(a.shape[1], generator=g)]
    return out
