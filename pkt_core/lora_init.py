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


SVD_METHODS = ("auto", "gram", "full", "lowrank")
OVERSAMPLE = 10  # extra directions torch.svd_lowrank samples beyond the rank
POWER_ITERS = 4  # its subspace iterations: NOT enough where the top of the spectrum is flat (issue 20)
LOWRANK_SEED = 0  # its random sketch is seeded: an init's bytes depend on its inputs only
GRAM_BLOCK = 8192  # rows converted to float64 at a time in gram_svd's Rayleigh-Ritz passes
GRAM_OVERSAMPLE = 8  # eigenvectors taken beyond the rank (the Rayleigh-Ritz subspace)
GRAM_RESIDUAL = 1e-5  # relative residual of the triplets below which gram_svd stops refining
GRAM_MAX_ITERS = 4

# The bound the default ('auto' = 'gram') meets, against the exact rank-r SVD W_r of the same fp32 piece
# (computed in float64): ||X - W_r||_F <= EXACT_TOL * ||W_r||_F for the applied update X whenever
# sigma_r - sigma_{r+1} >= TIE_GAP * sigma_1. Closer than that, W_r is not unique to fp32 precision (a
# tie: any rotation inside the tied singular subspace is as good); there X is still an optimal rank-r
# approximation: ||W - X||_F^2 <= ||W - W_r||_F^2 + EXACT_TOL^2 * ||W_r||_F^2. tests/test_exact_init.py
# checks both on weight-like spectra; bench/svd_exact.py measures the errors at real sizes.
EXACT_TOL = 1e-3
TIE_GAP = 1e-6


def svd_factors(weight: torch.Tensor, rank: int, split: str = "paper",
                method: str = "auto", info: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B [out x r], A [r x in]) with B @ A the rank-r truncated SVD of weight, in fp32 on its device.

    split='paper': B = U S, A = V^T; split='sqrt': B = U sqrt(S), A = sqrt(S) V^T.
    method: 'auto'/'gram' (default) the exact top-r SVD through the float64 Gram matrix of the short side
    (within EXACT_TOL of the exact SVD, above); 'full' LAPACK's full SVD; 'lowrank' torch.svd_lowrank
    (randomized: fast, but on flat spectra its directions are not the top ones: bench/svd_exact.py).
    info, if given, receives the singular values ('s', r of them) and, where the method knows it, the
    (r+1)-th ('s_next').
    """
    if rank < 1:
        raise RankTooLarge(f"rank {rank}: a LoRA rank must be at least 1")
    if rank > min(weight.shape):
        raise RankTooLarge(f"rank {rank} is above {min(weight.shape)}, the short side of a {tuple(weight.shape)} "
                           f"matrix; choose a rank of at most {min(weight.shape)}")
    u, s, vh = truncated_svd(weight.detach().float(), rank, method, info)
    if split == "paper":
        return (u * s).contiguous(), vh.contiguous()
    if split == "sqrt":
        r = s.sqrt()
        return (u * r).contiguous(), (r[:, None] * vh).contiguous()
    raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")


def svd_method(shape, rank: int, method: str = "auto") -> str:
    """'auto' is the exact route ('gram') for every piece: it costs about what the randomized SVD did on
    real sizes (bench/svd_exact.py) and, unlike it, gives the top-r directions on flat spectra."""
    if method not in SVD_METHODS:
        raise ValueError(f"unknown SVD method {method!r}; choose one of {', '.join(SVD_METHODS)}")
    return "gram" if method == "auto" else method


def truncated_svd(w: torch.Tensor, rank: int, method: str = "auto", info: dict | None = None):
    """(U [m x r], S [r], V^T [r x n]) of w (fp32), by svd_method(method)."""
    method = svd_method(w.shape, rank, method)
    if method == "gram":
        return gram_svd(w, rank, info)
    if method == "full":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        if info is not None:
            info["s"], info["s_next"] = s[:rank], (s[rank] if rank < s.numel() else None)
        return u[:, :rank], s[:rank], vh[:rank]
    devices = [w.device] if w.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(LOWRANK_SEED)
        u, s, v = torch.svd_lowrank(w, q=min(rank + OVERSAMPLE, min(w.shape)), niter=POWER_ITERS)
    if info is not None:
        info["s"] = s[:rank]
    return u[:, :rank], s[:rank], v[:, :rank].T


def gram_svd(w: torch.Tensor, rank: int, info: dict | None = None):
    """The exact top-`rank` singular triplets of w (fp32, m x n), through the Gram matrix of its short
    side: X^T X with X = w or w^T (n' x n', n' = min(m, n)).

    1. G = X^T X in fp32 (one BLAS pass, m n'^2 flops: the main cost, about what torch.svd_lowrank with
       4 power iterations costs at LoRA targets' short sides, and unlike it independent of the
       spectrum); its top k = rank + GRAM_OVERSAMPLE eigenvectors V by LAPACK's MRRR (scipy).
    2. Rayleigh-Ritz with X itself: Q = orth(X V), the SVD of Q^T X in float64 (blocks of rows converted
       at a time: no float64 copy of a vocabulary-sized piece). fp32 rounding of G moves V by about
       1e-7 sigma_1^2 / (sigma_r^2 - sigma_{k+1}^2), k = rank + oversampling: a gap much wider than the
       one at sigma_r, so the top-r subspace lies in span(V) to ~1e-6 even on a flat top, and the small
       float64 SVD resolves near-ties inside it (errors second order in that angle).
    3. Check: the residual ||X V_r - U_r S_r||_F / ||S_r||_F (zero for exact triplets; X^T U_r = V_r S_r
       holds by construction); above GRAM_RESIDUAL, one more subspace iteration (V <- the Ritz right
       vectors) and Rayleigh-Ritz, at most GRAM_MAX_ITERS times.
    info receives 's', 's_next' (sigma_{r+1}'s Ritz value) and 'residual'."""
    import scipy.linalg

    w = w.detach()
    tall = w if w.shape[0] >= w.shape[1] else w.T
    n = tall.shape[1]
    k = min(n, rank + GRAM_OVERSAMPLE)
    from threadpoolctl import threadpool_limits

    gram = _gram(w, tall is w)
    with threadpool_limits(1, user_api="blas"):  # n' x n' MRRR is sequential; idle BLAS threads only spin
        _, vec = scipy.linalg.eigh(gram, lower=False, subset_by_index=[n - k, n - 1], driver="evr")
    v = torch.from_numpy(vec[:, ::-1].copy()).to(w.device)  # n x k, descending
    for _ in range(GRAM_MAX_ITERS):
        u, s, vh = _rayleigh_ritz(tall, v)
        # in fp32 (an m x n x r pass): its rounding, ~1e-7, is far below GRAM_RESIDUAL
        residual = float((tall @ vh[:rank].T.float() - (u[:, :rank] * s[:rank]).float()).norm()
                         / s[:rank].norm().clamp(min=1e-300))
        if residual <= GRAM_RESIDUAL:
            break
        v = vh.T.contiguous()
    # a sign convention (largest entry of each right vector positive): the same bytes on every LAPACK
    sign = torch.sign(vh.gather(1, vh.abs().argmax(1, keepdim=True)))
    u, vh = u * sign.T, vh * sign
    if info is not None:
        info["s"], info["residual"] = s[:rank].float(), residual
        info["s_next"] = float(s[rank]) if rank < s.numel() else None
    u, s, vh = u[:, :rank].float(), s[:rank].float(), vh[:rank].float()
    if tall is w:
        return u, s, vh
    return vh.T.contiguous(), s, u.T.contiguous()


def _gram(w: torch.Tensor, tall_is_w: bool):
    """X^T X (fp32 numpy, its upper triangle at least) for X = w if tall_is_w else w^T. On the CPU BLAS's
    symmetric rank-k update (half a matrix product's flops) on w's own memory, no copy; elsewhere torch."""
    if w.device.type != "cpu":
        x = w if tall_is_w else w.T
        return (x.T @ x).cpu().numpy()
    from scipy.linalg import blas
    from threadpoolctl import threadpool_limits

    a = w.numpy().T  # Fortran-ordered view: ssyrk reads it in place
    with threadpool_limits(torch.get_num_threads(), user_api="blas"):  # as many threads as torch uses
        return blas.ssyrk(1.0, a, trans=0 if tall_is_w else 1, lower=0)


def _rayleigh_ritz(x: torch.Tensor, v: torch.Tensor):
    """The SVD of x restricted to span(x v): (U m x k, S k, V^T k x n), S descending, float64. The span
    (Q = orth(x v)) needs only fp32 (its error enters squared); Q^T x, where near-ties are resolved,
    is float64 (GRAM_BLOCK rows of x converted at a time)."""
    q, _ = torch.linalg.qr((x @ v.to(x.dtype)).double())  # Householder: orthonormal even if rank(x) < k
    b = sum(q_b.T @ x_b.double() for q_b, x_b in zip(q.split(GRAM_BLOCK), x.split(GRAM_BLOCK)))  # k x n
    ub, s, vh = torch.linalg.svd(b, full_matrices=False)
    return q @ ub, s, vh


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
                    split: str = "paper", scale: float = 1.0, method: str = "auto",
                    errors: dict[str, float] | None = None,
                    pieces: dict[str, dict] | None = None) -> dict[str, torch.Tensor]:
    """peft adapter tensors for every extracted weight, stored so that the delta peft applies,
    (alpha/rank) * B @ A, equals scale * (the rank-r approximation of the extracted matrix).

    split='paper' divides B by alpha/rank (A keeps orthonormal rows); split='sqrt' divides each
    factor by sqrt(alpha/rank), as peft's PiSSA does. errors, if given, receives each piece's
    relative reconstruction error ||W - B A||_F / ||W||_F (before scaling), keyed by weight name;
    pieces receives piece_report() of each."""
    names = arch.transferable_weights(student_config)
    scaling = alpha / rank
    b_div, a_div = (scaling, 1.0) if split == "paper" else (scaling ** 0.5, scaling ** 0.5)
    out = {}
    for name, weight in track(extracted.items(), "lora init (SVD)", "piece", total=len(extracted)):
        module, layer = names[name]
        w = peft_orientation(module, weight)
        info: dict = {}
        b, a = svd_factors(w, rank, split, method, info)
        if errors is not None or pieces is not None:
            err = relative_error(w, b, a)
            if errors is not None:
                errors[name] = err
            if pieces is not None:
                pieces[name] = {"module": module, **piece_report(w, info, err)}
        key_a, key_b = peft_keys(student_config, module, layer)
        out[key_a], out[key_b] = a / a_div, b * (scale / b_div)
    return out


def piece_report(w: torch.Tensor, info: dict, err: float) -> dict:
    """What a piece's rank-r init keeps: energy_kept = ||B A||_F^2 / ||W||_F^2 (the share of the piece's
    squared norm; 1 - energy_kept is what fine-tuning starts without; for an exact SVD it equals
    1 - relative_error^2, and a small share is what the rank-r truncation of a flat spectrum keeps,
    not a factorization error) and gap = (sigma_r - sigma_{r+1}) / sigma_1 (below TIE_GAP the rank-r
    update is not unique)."""
    s = info["s"].double()
    total = float(w.double().pow(2).sum()) if w.numel() else 0.0
    out = {"relative_error": err, "energy_kept": float(s.pow(2).sum()) / total if total > 0 else 0.0}
    if info.get("s_next") is not None and float(s[0]) > 0:
        out["gap"] = (float(s[-1]) - float(info["s_next"])) / float(s[0])
    if "residual" in info:  # gram_svd's check: ||W V_r - U_r S_r||_F / ||S_r||_F
        out["residual"] = info["residual"]
    return out


def energy_by_module(pieces: dict[str, dict]) -> dict[str, dict]:
    """Per module type: pieces, mean/min/max energy kept (piece_report), for the init's header and
    `pkt extract`'s summary."""
    by: dict[str, list[float]] = {}
    for p in pieces.values():
        by.setdefault(p["module"], []).append(p["energy_kept"])
    return {m: {"pieces": len(v), "mean": sum(v) / len(v), "min": min(v), "max": max(v)} for m, v in sorted(by.items())}


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


def add_delta(student, init_dir: str | Path):
    """The student with the init's applied delta ADDED to its weights (W + (alpha/r) B @ A), as a plain
    transformers model (the transfer-add variant: the extracted piece given a direct route into the
    function, where the paper's delta step subtracts it). Modifies student in place."""
    from peft import PeftModel

    return PeftModel.from_pretrained(student, str(init_dir)).merge_and_unload()


def fold_added(trained: dict[str, torch.Tensor], added: dict[str, torch.Tensor], ratio: float = 1.0
               ) -> dict[str, torch.Tensor]:
    """A rank-2r adapter equal to (trained + added) for the *unmodified* student: [B | ratio B0] [A ; A0],
    ratio = the added init's alpha/r over the trained adapter's (1 when both share rank and alpha)."""
    missing = sorted(set(added) - set(trained))
    if missing:
        raise ValueError(f"the added init covers {missing[0]} (and {len(missing) - 1} more), which the trained "
                         "adapter does not: train the same module types the init was extracted for")
    return fold_init(trained, {k: -ratio * v if not k.endswith(A_SUFFIXES) else v for k, v in added.items()})


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
