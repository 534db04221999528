"""LoRA fine-tuning of the student (the injection step), one readable loop.

Defaults follow the paper: rank 16, alpha 16, dropout 0.05, lr 3e-4, 3 epochs, effective batch
64, 3% warmup then linear decay, answer-only loss, cutoff 2048.

A run may instead be given its optimizer steps outright (`steps`), and `checkpoints`: the steps at
which its adapter is kept, so a dose-response over steps is read from ONE run (the learning-rate
schedule is the whole run's: the adapter at step 8 of a 128-step run is not an 8-step run's).
"""
from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field

import torch

from .data import IGNORE
from .progress import Progress

@dataclass(frozen=True)
class TrainParams:
    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.05
    lr: float = 3e-4
    epochs: float = 3.0
    batch_size: int = 64  # effective batch
    micro_batch: int = 8
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_length: int = 2048
    n_train: int | None = None  # None: every training sample
    seed: int = 0
    modules: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down", "embed", "lm_head")
    steps: int | None = None  # optimizer steps; None: epochs x the batches of the training set
    checkpoints: tuple[int, ...] = ()  # steps at which the adapter is also kept (the last step always is)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["modules"] = list(self.modules)
        d["checkpoints"] = list(self.checkpoints)
        # fields added later stay out of the dict at their defaults: an adapter's key is unchanged
        return {k: v for k, v in d.items() if k not in LATER_FIELDS or v != LATER_FIELDS[k]}

    def total_steps(self, n_samples: int) -> int:
        """Optimizer steps of a run on n_samples: `steps`, or epochs x batches per epoch."""
        if self.steps is not None:
            return self.steps
        return max(1, math.ceil(max(1, math.ceil(n_samples / self.batch_size)) * self.epochs))

    @classmethod
    def from_dict(cls, d: dict) -> "TrainParams":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        for name in ("modules", "checkpoints"):
            if name in known:
                known[name] = tuple(known[name])
        return cls(**known)


LATER_FIELDS = {"steps": None, "checkpoints": []}  # as_dict leaves these out at these values


@dataclass
class TrainLog:
    losses: list[float] = field(default_factory=list)  # one per optimizer step
    steps: int = 0


def collate(batch: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of 1 x T samples into a batch with an attention mask."""
    T = max(s["input_ids"].shape[1] for s in batch)
    ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), T), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), T), dtype=torch.long)
    for i, s in enumerate(batch):
        n = s["input_ids"].shape[1]
        ids[i, :n], labels[i, :n], mask[i, :n] = s["input_ids"][0], s["labels"][0], 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def finetune(model, samples: list[dict[str, torch.Tensor]], params: TrainParams, pad_id: int,
             progress: bool = True, on_checkpoint=None, objective=None) -> TrainLog:
    """Train the model's trainable parameters (the LoRA factors) in place; returns the loss curve.

    Loss is the mean over answer tokens of each effective batch (micro-batches weighted by
    their answer-token counts), so gradient accumulation does not change the objective.
    on_checkpoint(step) is called after each optimizer step in params.checkpoints. objective(model,
    batch, micro, pad_id, device) -> loss replaces the answer-token loss (it calls backward itself:
    pkt_core/distill.py's logit distillation is one).
    """
    from transformers import get_scheduler

    torch.manual_seed(params.seed)
    rng = random.Random(params.seed)
    device = next(model.parameters()).device
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters; wrap it with a LoRA adapter first")
    opt = torch.optim.AdamW(trainable, lr=params.lr, weight_decay=params.weight_decay)
    total = params.total_steps(len(samples))
    late = [c for c in params.checkpoints if not 1 <= c <= total]
    if late:
        raise ValueError(f"checkpoints {late}: the run takes {total} optimizer steps; give checkpoints in 1..{total}")
    objective = objective or _accumulate
    sched = get_scheduler("linear", opt, num_warmup_steps=int(params.warmup_ratio * total), num_training_steps=total)
    log = TrainLog()
    model.train()
    order: list[int] = []
    bar = Progress(total, "finetune", "step", enabled=progress)
    for _ in range(total):
        if len(order) < params.batch_size:
            fresh = list(range(len(samples)))
            rng.shuffle(fresh)
            order += fresh
        batch = [samples[i] for i in order[: params.batch_size]]
        del order[: params.batch_size]
        loss = objective(model, batch, params.micro_batch, pad_id, device)
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        log.losses.append(loss)
        log.steps += 1
        bar.update()
        bar.set_postfix(loss=f"{loss:.4f}")
        if on_checkpoint is not None and log.steps in params.checkpoints:
            on_checkpoint(log.steps)
    bar.close()
    model.eval()
    return log


def _accumulate(model, batch, micro: int, pad_id: int, device) -> float:
    n_tokens = sum(int((s["labels"] != IGNORE).sum()) for s in batch)
    total = 0.0
    for i in range(0, len(batch), micro):
        mb = collate(batch[i:i + micro], pad_id)
        mb = {k: v.to(device) for k, v in mb.items()}
        logits = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits
        loss_sum = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), mb["labels"][:, 1:].flatten(), ignore_index=IGNORE, reduction="sum")
        (loss_sum / n_tokens).backward()
        total += loss_sum.item()
    return total / max(n_tokens, 1)


def answer_loss(model, samples: list[dict[str, torch.Tensor]], pad_id: int, micro: int = 32) -> torch.Tensor:
    """Per-sample mean answer-token NLL (nats), shape [n]: the steadier signal at small scale."""
    device = next(model.parameters()).device
    out = []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(samples), micro):
            mb = {k: v.to(device) for k, v in collate(samples[i:i + micro], pad_id).items()}
            logits = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits.float()
            labels = mb["labels"][:, 1:]
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=IGNORE,
                                                    reduction="none")
            mask = labels != IGNORE
            out.append((nll * mask).sum(1) / mask.sum(1).clamp(min=1))
    return torch.cat(out).cpu()


@dataclass
class TrainedAdapter:
    """A trained LoRA as a stock peft state for the *unmodified* student, and how it was trained."""

    state: dict[str, torch.Tensor]
    rank: int
    alpha: float
    log: TrainLog
    init_size: dict = field(default_factory=dict)  # lora_init.init_size at step 0: top_sv, top_sv_ratio
    checkpoints: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # step -> state, as `state`


INITS = ("lora", "pissa", "extracted", "added")


def train_adapter(student, samples: list[dict[str, torch.Tensor]], params: TrainParams, pad_id: int,
                  init: str = "lora", init_dir=None, progress: bool = True, objective=None) -> TrainedAdapter:
    """Fine-tune a LoRA on the student from an init: "lora" (peft's B = 0), "pissa" (the student's own
    principal directions), "extracted" (the LoRA-init folder init_dir, delta subtracted) or "added"
    (init_dir's delta added to the student's weights, then peft's B = 0 LoRA on top).

    Inits that moved the base weights are folded back in: the result is a rank-2r adapter equal to
    (trained - init) for pissa/extracted, (trained + added delta) for added, for the student as it was
    loaded. The states at params.checkpoints are kept the same way. objective: see finetune()."""
    from peft import get_peft_model_state_dict

    from . import lora_init

    added, ratio = None, 1.0
    if init == "added":  # the init's own alpha/r, against the adapter trained on top of it
        cfg, added = lora_init.read_adapter(init_dir)
        ratio = (cfg["lora_alpha"] / cfg["r"]) / (params.alpha / params.rank)
    model, rank, alpha = peft_model(student, params, init, init_dir)
    init_state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model, save_embedding_layers=False).items()}
    size = lora_init.init_size(model) if init != "added" else _added_size(added, ratio * params.alpha / params.rank)

    def result(trained: dict) -> dict:
        if init == "lora":
            return trained
        if init == "added":
            return lora_init.fold_added(trained, added, ratio)
        return lora_init.fold_init(trained, init_state)

    kept = {}
    save = lambda step: kept.__setitem__(step, result(  # noqa: E731
        {k: v.detach().clone() for k, v in get_peft_model_state_dict(model, save_embedding_layers=False).items()}))
    log = finetune(model, samples, params, pad_id, progress=progress, on_checkpoint=save, objective=objective)
    trained = result(get_peft_model_state_dict(model, save_embedding_layers=False))
    if init == "lora":
        return TrainedAdapter(trained, rank, alpha, log, size, kept)
    return TrainedAdapter(trained, 2 * rank, 2 * alpha, log, size, kept)


def _added_size(added: dict, scaling: float) -> dict:
    """top_sv of the delta an "added" init put into the weights (the LoRA on top starts at 0)."""
    from . import lora_init

    tops = lora_init.top_singular_values(added, scaling, k=1)
    return {"top_sv": tops[0]} if tops else {}


def peft_model(student, params: TrainParams, init: str = "lora", init_dir=None):
    """(model, rank, alpha): the student wrapped with its LoRA init, exactly as training starts from it
    (modifies student in place). One place, so the transferability diagnostic sees the init training sees."""
    import json
    from pathlib import Path

    from peft import get_peft_model

    from . import lora_init

    if init == "extracted":
        model = lora_init.trainable_from_init(student, init_dir)
        cfg = json.loads((Path(init_dir) / "adapter_config.json").read_text())
        return model, cfg["r"], cfg["lora_alpha"]
    if init == "added":  # the piece merged into the weights; training then starts as lora's does
        student = lora_init.add_delta(student, init_dir)
        init = "lora"
    if init in ("lora", "pissa"):
        modules = [m for m in params.modules if init != "pissa" or m != "embed"]  # no PiSSA for embeddings
        cfg = lora_init.lora_config(modules, params.rank, params.alpha, params.dropout)
        cfg.init_lora_weights = True if init == "lora" else "pissa"
        torch.manual_seed(params.seed)  # peft draws lora_A here: from the run's seed, not the process's history
        return get_peft_model(student, cfg), params.rank, params.alpha
    raise ValueError(f"unknown init {init!r}; choose {', '.join(INITS)}")
