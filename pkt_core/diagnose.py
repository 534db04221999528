"""The transferability diagnostic: before any training, does an init point where the student's own
task gradient says to go, and how much of that gradient can the first LoRA step follow?

For each LoRA module (weight W, init factors B [out x r], A [r x in], scaling s = alpha/r), with G
the gradient of the fine-tuning loss (mean answer-token NLL) with respect to W at step 0, where the
wrapped model computes the student's own function for every init:

- cos = cos(dW, -G) = -<dW, G> / (||dW|| ||G||), dW = s B A in W's shape (peft's get_delta_weight;
  an embedding's delta is (B A)^T). Positive: the update the init carries points downhill (to first
  order, adding more of it lowers the loss). Undefined (nan) when dW = 0 (standard LoRA, B = 0).
- share = ||proj(G)||^2 / ||G||^2, proj the orthogonal projection on the tangent space of the LoRA
  parametrization at its init, T = {X A + B Y}: every first-order weight change a step on (B, A)
  can make. With P_B, P_A the projectors on col(B) and row(A), T's complement is
  {(I - P_B) M (I - P_A)}, so proj(G) = G - (I - P_B) G (I - P_A) = P_B G + (I - P_B) G P_A, and
  ||proj(G)||^2 = ||P_B G||^2 + ||(I - P_B) G P_A||^2 (orthogonal parts). Standard LoRA has B = 0,
  P_B = 0: share = ||G P_A||^2 / ||G||^2, the part of G in A's row space. share is the squared
  cosine between -G and the best direction any first step can take; plain SGD's own first step,
  dW = -lr s^2 (G A^T A + B B^T G), lies in T, and equals -lr s^2 G P_A (cos^2 = share) when B = 0
  and A has orthonormal rows (tests/test_diagnose.py checks both against a real peft step).

Totals treat every module's weights as one vector: cos over the concatenation, share as the sum of
projected over the sum of full squared norms. A target module the init leaves without LoRA (PiSSA's
embedding) counts with its gradient and nothing followed. Cosine and share are invariant to the
init's scale.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from . import arch, lora_init
from .finetune import TrainParams, _accumulate, peft_model

COLUMNS = ["name", "module", "layer", "inner", "delta_norm2", "grad_norm2", "proj_norm2", "cos", "share"]


def step0_gradients(model, samples: list[dict], pad_id: int, modules: tuple[str, ...],
                    micro_batch: int = 8) -> dict[str, torch.Tensor]:
    """weight name -> dL/dW (fp32, W's shape) of the fine-tuning loss over `samples` taken as one batch
    (mean over their answer tokens), for every weight of `modules`; the model's grads are left cleared."""
    names = arch.transferable_weights(model.config, tuple(modules))
    params = dict(model.named_parameters())
    previous = {n: p.requires_grad for n, p in params.items()}
    for n, p in params.items():
        p.requires_grad_(n in names)
        p.grad = None
    model.eval()  # no dropout: the gradient of the function training starts from
    try:
        _accumulate(model, samples, micro_batch, pad_id, next(model.parameters()).device)
        return {n: params[n].grad.detach().float().clone() for n in names}
    finally:
        for n, p in params.items():
            p.grad = None
            p.requires_grad_(previous[n])


def update_cosine(delta: torch.Tensor, grad: torch.Tensor) -> float:
    """cos(delta, -grad); nan when either is zero."""
    d, g = delta.double().flatten(), grad.double().flatten()
    den = float(d.norm() * g.norm())
    return float(-(d @ g) / den) if den > 0 else float("nan")


def range_basis(m: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis [rows x k] of m's column space (k = its numerical rank; 0 columns for m = 0)."""
    u, s, _ = torch.linalg.svd(m.double(), full_matrices=False)
    tol = (s.max() if s.numel() else 0) * max(m.shape) * torch.finfo(torch.float32).eps
    return u[:, s > tol]


def tangent_norm2(grad: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> float:
    """||P_B G + (I - P_B) G P_A||^2 for G in B @ A's orientation [out x in]; thin products only (an
    embedding's vocabulary side is never squared into a projector)."""
    g = grad.double()
    qb, qa = range_basis(b), range_basis(a.T)
    in_b = qb.T @ g  # [kb x in]
    gqa = g @ qa  # [out x ka]
    beside_b = gqa - qb @ (in_b @ qa)  # (I - P_B) G Q_a
    return float(in_b.pow(2).sum() + beside_b.pow(2).sum())


def tangent_share(grad: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> float:
    """Share of ||G||^2 in the tangent space of (B, A) -> B A at (B, A); nan when G = 0."""
    total = float(grad.double().pow(2).sum())
    return tangent_norm2(grad, b, a) / total if total > 0 else float("nan")


def lora_factors(layer, adapter: str = "default") -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(B, A, transposed) of a peft LoRA layer: delta = s * (B @ A), transposed into the weight's shape
    for an embedding (peft keeps lora_embedding_B [hidden x r], lora_embedding_A [r x vocab])."""
    if adapter in getattr(layer, "lora_embedding_A", {}):
        return layer.lora_embedding_B[adapter].detach(), layer.lora_embedding_A[adapter].detach(), True
    return (layer.lora_B[adapter].weight.detach(), layer.lora_A[adapter].weight.detach(),
            bool(getattr(layer, "fan_in_fan_out", False)))


def module_row(lora, grad: torch.Tensor, adapter: str = "default") -> dict[str, float]:
    """inner = -<dW, G>, the squared norms of dW, G and proj(G), for one weight's gradient G and its peft
    LoRA layer (None, or a layer without this adapter: no update, nothing of G followed)."""
    g = grad.double()
    row = {"grad_norm2": float(g.pow(2).sum()), "inner": 0.0, "delta_norm2": 0.0, "proj_norm2": 0.0}
    if lora is None or adapter not in getattr(lora, "scaling", {}):
        return row
    with torch.no_grad():
        delta = lora.get_delta_weight(adapter).double().reshape(g.shape)
    b, a, transposed = lora_factors(lora, adapter)
    return {**row, "inner": -float((delta * g).sum()), "delta_norm2": float(delta.pow(2).sum()),
            "proj_norm2": tangent_norm2(g.T if transposed else g, b, a)}


def module_rows(peft, grads: dict[str, torch.Tensor], adapter: str = "default") -> pd.DataFrame:
    """One row per weight of `grads` (student weight names): the init's update against the gradient."""
    from peft.tuners.lora import LoraLayer

    names = arch.transferable_weights(peft.base_model.model.config)
    rows = []
    for name, g in grads.items():
        module, layer = names[name]
        try:
            lora = peft.get_submodule(lora_init.PEFT_PREFIX + name.removesuffix(".weight"))
        except AttributeError:
            lora = None
        lora = lora if isinstance(lora, LoraLayer) else None
        rows.append({"name": name, "module": module, "layer": layer, **module_row(lora, g, adapter)})
    return finish(pd.DataFrame(rows, columns=COLUMNS[:-2]))


def finish(rows: pd.DataFrame) -> pd.DataFrame:
    """cos and share from the sums of rows (a module, a module type, or everything)."""
    den = np.sqrt(rows["delta_norm2"] * rows["grad_norm2"])
    cos = np.where(den > 0, rows["inner"] / den.where(den > 0, 1.0), np.nan)
    share = np.where(rows["grad_norm2"] > 0, rows["proj_norm2"] / rows["grad_norm2"].where(rows["grad_norm2"] > 0, 1),
                     np.nan)
    return rows.assign(cos=cos, share=share)


SUMS = ["inner", "delta_norm2", "grad_norm2", "proj_norm2"]


def by_module(rows: pd.DataFrame) -> pd.DataFrame:
    """Per module type (q, k, ..., embed, lm_head) over layers, and a 'total' row over everything."""
    per = rows.groupby("module", sort=False)[SUMS].sum().reset_index()
    total = pd.DataFrame([{"module": "total", **rows[SUMS].sum().to_dict()}])
    return finish(pd.concat([per, total], ignore_index=True))


@dataclass
class Diagnosis:
    modules: pd.DataFrame  # one row per weight: COLUMNS
    n_samples: int
    n_tokens: int

    @property
    def totals(self) -> dict[str, float]:
        t = by_module(self.modules).iloc[-1]
        return {"cos": float(t["cos"]), "share": float(t["share"])}

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The sums per weight as float64 tensors, names and totals in the header (safetensors)."""
        m = self.modules
        tensors = {c: torch.tensor(m[c].to_numpy(float), dtype=torch.float64) for c in SUMS}
        tensors["layer"] = torch.tensor(m["layer"].fillna(-1).to_numpy(int))
        meta = {"names": json.dumps(list(m["name"])), "module_types": json.dumps(list(m["module"])),
                "totals": json.dumps(self.totals), "n_samples": str(self.n_samples), "n_tokens": str(self.n_tokens)}
        return tensors, meta

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> "Diagnosis":
        layers = [None if x < 0 else int(x) for x in tensors["layer"].tolist()]
        rows = pd.DataFrame({"name": json.loads(meta["names"]), "module": json.loads(meta["module_types"]),
                             "layer": layers, **{c: tensors[c].numpy() for c in SUMS}})
        return cls(finish(rows), int(meta["n_samples"]), int(meta["n_tokens"]))


def diagnose(student, samples: list[dict], pad_id: int, params: TrainParams, init: str = "lora", init_dir=None,
             micro_batch: int | None = None) -> Diagnosis:
    """The diagnostic of one init on the student (modified in place: wrapped as for training), from the
    gradient over `samples` (the first training samples; the flow decides how many)."""
    grads = step0_gradients(student, samples, pad_id, params.modules, micro_batch or params.micro_batch)
    model, _, _ = peft_model(student, params, init, init_dir)
    n_tokens = sum(int((s["labels"] != -100).sum()) for s in samples)
    return Diagnosis(module_rows(model, grads), len(samples), n_tokens)


# ---- how well it predicts the measured gain ------------------------------------------------------
FIELDS = ("diag_cos", "diag_share")
BASELINE, NO_INIT = "lora", ("vanilla",)
FIELLER = 1.06  # var(atanh(Spearman rho)) ~ 1.06 / (n - 3) (Fieller, Hartley & Pearson 1957)


def spearman(x, y) -> float:
    """Spearman's rank correlation: Pearson's r of the average ranks (ties share their mean rank)."""
    from scipy.stats import rankdata

    rx, ry = rankdata(np.asarray(x, float)), rankdata(np.asarray(y, float))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = np.sqrt((rx ** 2).sum() * (ry ** 2).sum())
    return float((rx * ry).sum() / den) if den > 0 else float("nan")


def fisher_interval(rho: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """Two-sided interval for a Spearman correlation from n pairs: tanh(atanh(rho) +- z sqrt(1.06/(n-3)))."""
    from scipy import stats

    if n < 4 or not np.isfinite(rho):
        return float("nan"), float("nan")
    half = stats.norm.ppf(0.5 + level / 2) * np.sqrt(FIELLER / (n - 3))
    z = np.arctanh(np.clip(rho, -1 + 1e-12, 1 - 1e-12))
    return float(np.tanh(z - half)), float(np.tanh(z + half))


def spearman_p(rho: float, n: int) -> float:
    """Two-sided p of rho = 0 from the t approximation (scipy.stats.spearmanr's asymptotic p)."""
    from scipy import stats

    if n < 3 or not np.isfinite(rho):
        return float("nan")
    if abs(rho) >= 1:
        return 0.0
    t = rho * np.sqrt((n - 2) / (1 - rho ** 2))
    return float(2 * stats.t.sf(abs(t), n - 2))


def cluster_bootstrap(cells: pd.DataFrame, field: str, cluster: str = "student", draws: int = 2000,
                      level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile interval of Spearman(field, gain) resampling whole clusters (families) with replacement,
    so cells that share a family (and its lora baseline) move together."""
    members = list(cells.groupby(cluster).indices.values())  # positions of each cluster's cells
    xs, gains = cells[field].to_numpy(float), cells["gain"].to_numpy(float)
    rng = np.random.default_rng(seed)
    rhos = []
    for _ in range(draws):
        rows = np.concatenate([members[i] for i in rng.integers(0, len(members), len(members))])
        rhos.append(spearman(xs[rows], gains[rows]))
    rhos = np.asarray(rhos)
    rhos = rhos[np.isfinite(rhos)]
    if rhos.size == 0:
        return float("nan"), float("nan")
    return float(np.quantile(rhos, (1 - level) / 2)), float(np.quantile(rhos, (1 + level) / 2))


def paired_gains(runs: pd.DataFrame, metric: str, lower_is_better: bool = False) -> pd.DataFrame:
    """One row per run of a variant with an init (lora and untrained variants left out): its gain, the
    run minus lora's run of the same seed (sign: positive = better), beside its diagnostic values."""
    keys = ["student", "task", "benchmark"]
    r = runs[runs["metric"] == metric]
    base = r[r["variant"] == BASELINE][keys + ["seed", "value"]].rename(columns={"value": "lora"})
    if base.duplicated(keys + ["seed"]).any():
        raise ValueError(f"metric {metric}: lora has several runs for one seed (a grid pooled?); give one setting "
                         "per variant and seed")
    others = r[~r["variant"].isin([BASELINE, *NO_INIT]) & r[list(FIELDS)].notna().any(axis=1)]
    paired = others.merge(base, on=keys + ["seed"])
    sign = -1.0 if lower_is_better else 1.0
    return paired.assign(gain=sign * (paired["value"] - paired["lora"]))


def gain_cells(runs: pd.DataFrame, metric: str, lower_is_better: bool = False) -> pd.DataFrame:
    """One row per student x task x benchmark x variant (lora and untrained variants left out): the
    mean over seeds of the gain, variant minus lora paired by seed (sign: positive = better), beside the
    mean diagnostic values of the variant's inits."""
    keys = ["student", "task", "benchmark"]
    paired = paired_gains(runs, metric, lower_is_better)
    return (paired.groupby(keys + ["variant"], sort=False)
            .agg(gain=("gain", "mean"), pairs=("gain", "size"), **{f: (f, "mean") for f in FIELDS})
            .reset_index())


def predictive_power(runs: pd.DataFrame, metric: str, lower_is_better: bool = False, level: float = 0.95,
                     min_clusters: int = 5) -> dict:
    """How well each diagnostic ranks the measured gain across families (students) x tasks x variants:
    Spearman's rho over the gain cells, a Fisher-z interval (Fieller's variance; treats cells as
    independent) and, with at least min_clusters families, a cluster bootstrap over families."""
    cells = gain_cells(runs, metric, lower_is_better) if set(FIELDS) <= set(runs.columns) else pd.DataFrame()
    out = {"metric": metric, "cells": len(cells), "families": int(cells["student"].nunique()) if len(cells) else 0,
           "interval": f"Fisher z (var 1.06/(n-3)), {level:.0%}"}
    for field in FIELDS:
        c = cells.dropna(subset=[field]) if len(cells) else cells
        n = len(c)
        rho = spearman(c[field], c["gain"]) if n >= 3 else float("nan")
        lo, hi = fisher_interval(rho, n, level)
        res = {"rho": rho, "ci_low": lo, "ci_high": hi, "p": spearman_p(rho, n), "n": n}
        if n and c["student"].nunique() >= min_clusters:
            res["boot_low"], res["boot_high"] = cluster_bootstrap(c, field, level=level)
        out[field] = res
    return out


def split_half_reliability(runs: pd.DataFrame, metric: str, lower_is_better: bool = False,
                           level: float = 0.95) -> dict:
    """Does the gain replicate? Each gain cell (gain_cells) is computed twice, from alternate seeds of
    the cell (its 1st, 3rd, ... and 2nd, 4th, ... in seed order); Spearman's rho between the halves
    across cells, stepped up to the full seed count by Spearman-Brown (2r / (1 + r)), with the
    half correlation's Fisher-z interval stepped up the same way. A correlation of the diagnostic with
    the gain cannot exceed about sqrt(reliability) (attenuation): where the reliability's interval
    includes 0, the gain does not replicate and no correlation with it is evidence either way.
    n: cells with at least one seed in each half; nan below 4 cells."""
    paired = paired_gains(runs, metric, lower_is_better)
    keys = ["student", "task", "benchmark", "variant"]
    half = paired.groupby(keys, sort=False)["seed"].rank(method="first").sub(1).mod(2)
    cells = paired.assign(half=half).pivot_table(index=keys, columns="half", values="gain", aggfunc="mean").dropna()
    n = len(cells) if cells.shape[1] == 2 else 0
    rho = spearman(cells.iloc[:, 0], cells.iloc[:, 1]) if n >= 4 else float("nan")
    lo, hi = fisher_interval(rho, n, level)
    step = (lambda r: 2 * r / (1 + r) if r > -1 else -1.0)  # Spearman-Brown, two halves to the whole
    return {"metric": metric, "n": n, "rho_half": rho, "reliability": step(rho) if np.isfinite(rho) else rho,
            "ci_low": step(lo) if np.isfinite(lo) else lo, "ci_high": step(hi) if np.isfinite(hi) else hi}


RANDOM_DIRECTIONS = ("spectrum-matched", "shuffled")  # inits with transfer's spectrum and random directions


def levels(runs: pd.DataFrame) -> pd.DataFrame:
    """Per variant with an init, the diagnostic's levels: mean and SD of diag_cos and diag_share over
    its inits (one per family x task x seed: the runs' metrics repeat them), the range of its per-task
    mean share, and whether it is a random direction of transfer's size (RANDOM_DIRECTIONS)."""
    keys = [k for k in ("student", "family", "task", "variant", "seed") if k in runs]
    inits = runs.dropna(subset=list(FIELDS), how="all").drop_duplicates(keys)
    inits = inits[~inits["variant"].isin(NO_INIT)]
    rows = []
    for v, g in inits.groupby("variant", sort=False):
        per_task = g.groupby("task", sort=False)["diag_share"].mean()
        rows.append({"variant": v, "inits": len(g), "cos_mean": g["diag_cos"].mean(), "cos_sd": g["diag_cos"].std(),
                     "share_mean": g["diag_share"].mean(), "share_sd": g["diag_share"].std(),
                     "share_task_min": per_task.min(), "share_task_max": per_task.max(),
                     "random_direction": v in RANDOM_DIRECTIONS})
    return pd.DataFrame(rows)
