"""LoRA fine-tuning of the student (the injection step), one readable loop.

Defaults follow the paper: rank 16, alpha 16, dropout 0.05, lr 3e-4, 3 epochs, effective batch
64, 3% warmup then linear decay, answer-only loss, cutoff 2048.
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

    def as_dict(self) -> dict:
        d = asdict(self)
        d["modules"] = list(self.modules)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainParams":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if "modules" in known:
            known["modules"] = tuple(known["modules"])
        return cls(**known)


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
             progress: bool = True) -> TrainLog:
    """Train the model's trainable parameters (the LoRA factors) in place; returns the loss curve.

    Loss is the mean over answer tokens of each effective batch (micro-batches weighted by
    their answer-token counts), so gradient accumulation does not change the objective.
    """
    from transformers import get_scheduler

    torch.manual_seed(params.seed)
    rng = random.Random(params.seed)
    device = next(model.parameters()).device
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters; wrap it with a LoRA adapter first")
    opt = torch.optim.AdamW(trainable, lr=params.lr, weight_decay=params.weight_decay)
    per_epoch = max(1, math.ceil(len(samples) / params.batch_size))
    total = max(1, math.ceil(per_epoch * params.epochs))
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
        loss = _accumulate(model, batch, params.micro_batch, pad_id, device)
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        log.losses.append(loss)
        log.steps += 1
        bar.update()
        bar.set_postfix(loss=f"{loss:.4f}")
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


def train_adapter(student, samples: list[dict[str, torch.Tensor]], params: TrainParams, pad_id: int,
                  init: str = "lora", init_dir=None, progress: bool = True) -> TrainedAdapter:
    """Fine-tune a LoRA on the student from an init: "lora" (peft's B = 0), "pissa" (the student's own
    principal directions) or "extracted" (the LoRA-init folder init_dir, delta subtracted).

    Inits that moved the base weights (pissa, extracted) are folded back in: the result is a
    rank-2r adapter equal to (trained - init), for the student as it was loaded."""
    from peft import get_peft_model_state_dict

    from . import lora_init

    model, rank, alpha = peft_model(student, params, init, init_dir)
    init_state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model, save_embedding_layers=False).items()}
    size = lora_init.init_size(model)  # at step 0, from peft's applied deltas
    log = finetune(model, samples, params, pad_id, progress=progress)
    trained = get_peft_model_state_dict(model, save_embedding_layers=False)
    if init == "lora":
        return TrainedAdapter(trained, rank, alpha, log, size)
    return TrainedAdapter(lora_init.fold_init(trained, init_state), 2 * rank, 2 * alpha, log, size)


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
    if init in ("lora", "pissa"):
        modules = [m for m in params.modules if init != "pissa" or m != "embed"]  # no PiSSA for embeddings
        cfg = lora_init.lora_config(modules, params.rank, params.alpha, params.dropout)
        cfg.init_lora_weights = True if init == "lora" else "pissa"
        torch.manual_seed(params.seed)  # peft draws lora_A here: from the run's seed, not the process's history
        return get_peft_model(student, cfg), params.rank, params.alpha
    raise ValueError(f"unknown init {init!r}; choose lora, pissa or extracted")
