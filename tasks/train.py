"""The node kinds that train the student: an adapter from an init (the parametric arms and the
baselines), one checkpoint of it, the data route's distillation (logit KD, and seq-kd's teacher
completions), and the step-0 diagnostic of an init against the student's task gradient."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pkt.artifacts.store import Ref, Store
from pkt.core import arch, data, diagnose, distill, finetune, lora_init

from .node import SOURCE_KINDS, Node, Tensors, execution, keyed_if_set, log
from .sources import load_model_input, prompt_format, read_source


def init_size(store: Store, adapter: dict) -> dict:
    """An adapter's init size at step 0 (top_sv, top_sv_ratio; empty for a version-1 adapter)."""
    from safetensors import safe_open

    with safe_open(str(store.tree(Ref.of(adapter)) / "adapter_model.safetensors"), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("init_size", "{}"))


def train_losses(store: Store, adapter: dict) -> list[float]:
    return json.loads((store.tree(Ref.of(adapter)) / "pkt_train_log.json").read_text())["losses"]


INITS_FROM_FOLDER = ("extracted", "added")  # Adapter.init values that read an `init` input (a LoRA-init folder)


@dataclass(frozen=True)
class Adapter(Node):
    """The student fine-tuned from an init (an extracted LoRA init, subtracted or added, or peft's
    lora/pissa): a stock peft folder for the *unmodified* student, with its loss curve; with checkpoint
    steps in `train`, each checkpoint's adapter too (step_NNN/, read out by AdapterCheckpoint)."""

    KIND = "adapter"
    VERSION = 2  # records the init's effective size at step 0
    INPUTS = ("student", "train")
    variant: str = "lora"
    init: str = "lora"  # "extracted" / "added" (then an `init` input), "lora" or "pissa"
    train: dict | None = None  # TrainParams.as_dict()
    chat_template: bool = keyed_if_set(False)  # the samples in the student's chat template (else the paper's layout)
    dtype: str = "float32"
    device: str = execution(default="cpu")

    def compute(self, store, inputs, out):
        tp = finetune.TrainParams.from_dict(self.train or {})
        student, tok = load_model_input(store, inputs["student"], self.dtype, self.device)
        init_dir = store.tree(Ref.of(inputs["init"])) if self.init in INITS_FROM_FOLDER else None
        samples = data.load_encoded(train_path(store, inputs["train"]), tok, tp.max_length,
                                    fmt=prompt_format(self.chat_template))[: tp.n_train]
        result = finetune.train_adapter(student, samples, tp, tok.pad_token_id, self.init, init_dir)
        save_trained(out, result, student, tp, self.variant)


def train_path(store: Store, ref: dict) -> str:
    """The chat jsonl an adapter trains on: a data file, or the train.jsonl of a node that wrote one
    (the teacher's completions, for seq-kd)."""
    if ref["kind"] in SOURCE_KINDS:
        return read_source(store, ref)
    return str(store.tree(Ref.of(ref)) / "train.jsonl")


def save_trained(out, result: finetune.TrainedAdapter, student, tp: finetune.TrainParams, variant: str) -> None:
    """A trained adapter's folder: the final adapter and loss log at the top, each checkpoint's in step_NNN/."""
    cfg = arch.config_from_shape(arch.shape_of(student.config))
    meta = {"pkt_kind": "adapter", "variant": variant, "init_size": json.dumps(result.init_size, sort_keys=True)}
    lora_init.save_adapter(out, result.state, cfg, result.rank, result.alpha, tp.dropout, meta)
    Path(out, "pkt_train_log.json").write_text(json.dumps({"losses": result.log.losses, "steps": result.log.steps}))
    for step, state in result.checkpoints.items():
        if step == result.log.steps:
            continue  # the final adapter is the folder itself
        sub = Path(out, checkpoint_dir(step))
        lora_init.save_adapter(sub, state, cfg, result.rank, result.alpha, tp.dropout, {**meta, "step": str(step)})
        (sub / "pkt_train_log.json").write_text(json.dumps({"losses": result.log.losses[:step], "steps": step}))


def checkpoint_dir(step: int) -> str:
    return f"step_{step:05d}"


ADAPTER_KINDS = ("adapter", "adapter_checkpoint", "kd_adapter")  # trees holding a trained adapter and its loss log


@dataclass(frozen=True)
class AdapterCheckpoint(Node):
    """One checkpoint of a trained adapter (its state after `step` optimizer steps of the same run), as an
    adapter folder of its own, so Scores reads it as it reads any adapter."""

    KIND = "adapter_checkpoint"
    INPUTS = ("adapter",)
    step: int = 1

    def compute(self, store, inputs, out):
        tree = store.tree(Ref.of(inputs["adapter"]))
        steps = json.loads((tree / "pkt_train_log.json").read_text())["steps"]
        src = tree if self.step == steps else tree / checkpoint_dir(self.step)
        if not src.is_dir():
            raise ValueError(f"adapter {inputs['adapter']['key'][:12]} kept no checkpoint at step {self.step}; "
                             "add it to train.checkpoints")
        for name in ("adapter_config.json", "adapter_model.safetensors", "pkt_train_log.json"):
            Path(out, name).write_bytes((src / name).read_bytes())


@dataclass(frozen=True)
class KdAdapter(Node):
    """The data route's logit distillation: the student's LoRA (peft's B = 0 init) trained to match the
    teacher's next-token distributions on the task's prompts (no answers; pkt_core/distill.py), at the
    training parameters of the parametric arms. The same folder as Adapter's."""

    KIND = "kd_adapter"
    INPUTS = ("student", "teacher", "prompts")
    variant: str = "kd"
    train: dict | None = None  # TrainParams.as_dict()
    temperature: float = 1.0
    dtype: str = "float32"
    device: str = execution(default="cpu")
    # the prompts in the student's chat template (else the paper's layout); the teacher reads the same tokens
    chat_template: bool = keyed_if_set(False)

    def compute(self, store, inputs, out):
        tp = finetune.TrainParams.from_dict(self.train or {})
        student, tok = load_model_input(store, inputs["student"], self.dtype, self.device)
        teacher, _ = load_model_input(store, inputs["teacher"], self.dtype, self.device)
        turns = distill.read_prompts(read_prompt_source(store, inputs["prompts"]))
        texts = distill.prompt_texts(turns, tok, prompt_format(self.chat_template))
        samples = distill.encode_prompts(texts, tok, tp.max_length)[: tp.n_train]
        before = distill.kd_loss(student, teacher, samples, tok.pad_token_id)
        log(f"kd: {len(samples)} prompts, KL(teacher || student) {before:.4f} nats a position before training")
        result = finetune.train_adapter(student, samples, tp, tok.pad_token_id, "lora",
                                        objective=distill.kd_objective(teacher, self.temperature))
        save_trained(out, result, student, tp, self.variant)


def read_prompt_source(store: Store, ref: dict) -> str:
    """The task directory of a prompts source (a `dir` source naming the one file the data route reads)."""
    return read_source(store, ref, [distill.prompt_file(ref["key"])])


@dataclass(frozen=True)
class TeacherCompletions(Node):
    """The teacher's greedy completions of the task's prompts (no answers read), as a chat train.jsonl:
    what seq-kd fine-tunes the student on (an Adapter whose `train` input is this node)."""

    KIND = "teacher_completions"
    INPUTS = ("teacher", "prompts")
    max_new_tokens: int = 32
    dtype: str = "float32"
    device: str = execution(default="cpu")
    chat_template: bool = keyed_if_set(False)  # the prompts in the teacher's chat template (else the paper's layout)

    def compute(self, store, inputs, out):
        teacher, tok = load_model_input(store, inputs["teacher"], self.dtype, self.device)
        turns = distill.read_prompts(read_prompt_source(store, inputs["prompts"]))
        prompts = distill.prompt_texts(turns, tok, prompt_format(self.chat_template))
        texts = distill.completion_rows(turns, distill.greedy_completions(teacher, tok, prompts, self.max_new_tokens,
                                                                          data.end_of_turn(tok, prompt_format(self.chat_template))))
        if not texts:
            raise ValueError("the teacher completed every prompt with nothing (end-of-text at once); seq-kd has no "
                             "data: check the prompts' format against the teacher's")
        log(f"seq-kd: {len(texts)} of {len(turns)} prompts completed by the teacher")
        Path(out, "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in texts))


@dataclass(frozen=True)
class Diagnostic(Node):
    """Before any training, per weight: the init's applied update against the student's step-0 task
    gradient (cos, positive = downhill) and the share of that gradient the first LoRA step can follow
    (pkt.core.diagnose). Inputs: student, train data, and for an extracted init its `init` folder."""

    KIND = "diagnostic"
    INPUTS = ("student", "train")
    variant: str = "lora"  # as Adapter's: a fresh sweep computes each of its nodes (no reuse across variants)
    init: str = "lora"  # as Adapter.init: "extracted" (then an `init` input), "lora" or "pissa"
    rank: int = 16
    alpha: float = 16.0
    modules: tuple[str, ...] = finetune.TrainParams.modules
    seed: int = 0  # peft's lora_A draw (init "lora"); 0 for inits that draw nothing
    batches: int = 4  # G is taken over the first batches x batch_size training samples
    batch_size: int = 64
    n_train: int | None = None
    max_length: int = 2048
    micro_batch: int = 8
    chat_template: bool = keyed_if_set(False)  # as Adapter's
    dtype: str = "float32"
    device: str = execution(default="cpu")

    def compute(self, store, inputs, out):
        student, tok = load_model_input(store, inputs["student"], self.dtype, self.device)
        samples = data.load_encoded(read_source(store, inputs["train"]), tok, self.max_length,
                                    fmt=prompt_format(self.chat_template))[: self.n_train]
        samples = samples[: self.batches * self.batch_size]
        params = finetune.TrainParams(rank=self.rank, alpha=self.alpha, modules=tuple(self.modules), seed=self.seed,
                                      micro_batch=self.micro_batch)
        init_dir = store.tree(Ref.of(inputs["init"])) if self.init in INITS_FROM_FOLDER else None
        found = diagnose.diagnose(student, samples, tok.pad_token_id, params, self.init, init_dir)
        log(f"diagnostic ({self.init}): cos {found.totals['cos']:+.4f}, share {found.totals['share']:.4f} over "
            f"{found.n_samples} samples ({found.n_tokens} answer tokens)")
        return Tensors(*found.to_tensors())


def diagnosis(store: Store, ref: dict) -> diagnose.Diagnosis:
    return diagnose.Diagnosis.from_tensors(store.tensors(ref), store.header(ref))
