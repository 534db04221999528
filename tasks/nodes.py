"""The node specs, one per artifact kind: parameters as typed fields, named inputs, kind version,
and the computation that calls into pkt_core. tasks/node.py runs, stores and records them.

Inputs are refs: store artifacts {kind, key, digest} or sources {kind: model|file|dir|table,
key: path or name, digest}. Only digests enter a key, so moving a model directory reuses everything.
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE
from safetensors.torch import save_file

from pkt.artifacts.keys import InputChanged, stamped_file_digest
from pkt.artifacts import model_id
from pkt.artifacts.model_id import model_digest
from pkt.artifacts.store import Ref, Store
from pkt.core import (activations, align, arch, data, diagnose, distill, evaluate, finetune, fresh, laten, lora_init,
                      models, report, sensitivity)
from pkt.core.inputs import check_folder
from pkt.core.mini import family

from .node import SOURCE_KINDS, Node, Tensors, execution, keyed_if_set, log, opaque


# ---- sources: inputs that are not nodes ----------------------------------------------------------
def model_source(path: str, store: Store, names: list[str] | None = None) -> dict:
    """names: files a node reads beyond the forward pass (model_id.GENERATION_FILES for a score)."""
    return {"kind": "model", "key": str(path), "digest": _model_digest(path, store, {}, tuple(names or ()))}


def file_source(path: str) -> dict:
    return {"kind": "file", "key": str(path), "digest": _file_digest(path, {})}


def dir_source(path: str, names: list[str] | None = None) -> dict:
    """A task directory: digest over the named jsonl files (default: all), names and contents, so a
    score depends on the files it reads and not on, say, the seed file beside them."""
    return {"kind": "dir", "key": str(path), "digest": _dir_digest(path, names, {})}


def _model_digest(path: str, store: Store, files: dict, extra: tuple[str, ...] = ()) -> str:
    store.writable()  # a new store root is made whole (atomically) before its memo goes in
    return model_digest(path, memo_dir=store.root / "memo", files=files, extra=extra)


def _file_digest(path: str, files: dict) -> str:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file")
    digest, stamp = stamped_file_digest(path)
    files[str(path)] = (stamp, digest)
    return digest


def _dir_files(path: str, names: list[str] | None) -> list[Path]:
    check_folder(path, "the task directory")  # a FIFO among its files: one sentence, not a wait
    found = sorted(Path(path) / n for n in names) if names else sorted(Path(path).glob("*.jsonl"))
    found = [f for f in found if f.exists()]
    if not found:
        raise FileNotFoundError(f"{path}: no *.jsonl files; a task directory holds train/seeds/val/test.jsonl")
    return found


def _dir_combine(entries: list[tuple[str, str]]) -> str:
    h = hashlib.sha256()
    for name, digest in entries:
        h.update(f"{name}\0{digest}\0".encode())
    return h.hexdigest()


def _dir_digest(path: str, names: list[str] | None, files: dict) -> str:
    return _dir_combine([(f.name, _file_digest(str(f), files)) for f in _dir_files(path, names)])


def read_source(store: Store, ref: dict, names: list[str] | None = None, extra: tuple[str, ...] = ()) -> str:
    """Where a node reads a source input (a model, file or task directory): a private, read-only
    snapshot of it (store.snapshot) holding exactly the bytes of the digest its key was computed
    from; the snapshot's digest is taken of the very bytes the node then parses, so a source
    rewritten during the run is refused, never read torn. A hub model (no local files) is taken as
    named. extra: a model's files beyond the forward pass that this node reads (as its source named)."""
    path, kind = ref["key"], ref["kind"]
    if kind == "model" and not Path(path).exists():
        return path
    if kind == "model":
        known: dict = {}
        _model_digest(path, store, known, extra)  # which files, and their digests as memoized by stamp
        entries = [(Path(f).relative_to(path).as_posix(), Path(f), d) for f, (_, d) in known.items()]
    else:
        entries = [(f.name, f, None) for f in ([Path(path)] if kind == "file" else _dir_files(path, names))]
    snap, got = store.snapshot(entries)
    digest = {"model": model_id.combine, "file": lambda g: g[0][1], "dir": _dir_combine}[kind](got)
    if digest != ref["digest"]:
        raise InputChanged(f"{path} changed after this run took its digest ({ref['digest'][:12]}, now "
                           f"{digest[:12]}), so a node keyed by the old contents would read the new ones; nothing "
                           "was computed from it. Leave the inputs alone while pkt runs, then run again")
    return str(snap / Path(path).name) if kind == "file" else str(snap)


def score_data_files(split: str) -> list[str]:
    """The files of a task directory a score reads (the split and the few-shot pool)."""
    return [f"{split}.jsonl", "train.jsonl"]


def table_source(store: Store, table: pd.DataFrame, name: str) -> dict:
    """A table the flow assembled (the sweep's runs), stored as a CSV artifact (a record, so gc keeps
    it until the node that reads it has run) so that a node can depend on its content."""
    data = table.to_csv(index=False).encode()
    params, inputs = {"name": name}, {"csv": hashlib.sha256(data).hexdigest()}
    return store.put_blob("table", store.key("table", params, inputs), data, params=params, inputs=inputs).as_dict()


SOURCE_RETRIES, SOURCE_RETRY_DELAY = 2, [5, 30]  # seconds before the 1st and 2nd retry
# a wrong input: retrying cannot help, and the user should hear at once
PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, InputChanged)


def transient(task, task_run, state) -> bool:
    """Retry a source read that failed on I/O that may pass (a network filesystem's EIO or stale handle,
    a hub's timeout), never one whose input is wrong (missing, unreadable, not what the config said)."""
    from pkt.core.errors import UserError

    exc = state.data
    return isinstance(exc, (OSError, TimeoutError, ConnectionError)) and not isinstance(exc, (*PERMANENT, UserError))


@task(name="source", cache_policy=NO_CACHE, persist_result=False, task_run_name="{label}", retries=SOURCE_RETRIES,
      retry_delay_seconds=SOURCE_RETRY_DELAY, retry_condition_fn=transient)
def source(kind: str, path: str, store_root: str, label: str, names: list[str] | None = None) -> dict:
    """An input that is not a node, as a ref named by its content: a model ("model"), a data file
    ("file") or the named files of a task directory ("dir"). A task of its own, so the graph shows
    which model and which data each node read."""
    if kind == "model":
        return opaque(model_source(path, Store(store_root), names))
    if kind == "file":
        return opaque(file_source(path))
    if kind == "dir":
        return opaque(dir_source(path, names))
    raise ValueError(f"unknown source kind {kind!r}")


def model_path(store: Store, ref: dict, extra: tuple[str, ...] = ()) -> str:
    """Where a model input's files are: a snapshot of its own directory (read_source), or the tree of
    a model the store built."""
    return read_source(store, ref, extra=extra) if ref["kind"] == "model" else str(store.tree(Ref.of(ref)))


def prompt_format(chat_template: bool) -> str:
    """A node's chat_template field (True: the model's own chat template) as data.render's format."""
    return "chat" if chat_template else "paper"


def load_model_input(store: Store, ref: dict, dtype: str, device: str, extra: tuple[str, ...] = ()):
    """(model, tokenizer) of a model input; extra: model_id.GENERATION_FILES for a node that generates."""
    src = model_path(store, ref, extra)
    return models.load_model(src, dtype=dtype, device=device), models.load_tokenizer(src)


# ---- the nodes -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Family(Node):
    """The miniature teacher/student family, pretrained (a tree: teacher/, student/, tasks/, stats)."""

    KIND = "family"
    VERSION = 2  # teacher-only facts, gate/val/test splits, quality gates in family_stats.json
    size: str = "demo"
    recipe: dict | None = None  # family.recipe_params(size): a changed recipe is a new family

    def compute(self, store, inputs, out):
        r = self.recipe or {}
        stats = family.build_family(out, self.size, log=log, seed=r.get("seed"), testbed=r.get("testbed", 1),
                                    twin=r.get("twin", False))
        # the artifact's bytes are a function of its key: the build's duration goes in the record only
        for who in ("teacher", "student"):
            stats[who] = {k: v for k, v in stats[who].items() if k != "seconds"}
        Path(out, "family_stats.json").write_text(json.dumps(stats, indent=1, sort_keys=True))


@dataclass(frozen=True)
class RandomModel(Node):
    """A randomly initialized model with the config (and tokenizer) of another: the untrained-teacher control."""

    KIND = "random_model"
    INPUTS = ("like",)
    seed: int = 0

    def compute(self, store, inputs, out):
        from transformers import AutoModelForCausalLM

        src = model_path(store, inputs["like"])
        torch.manual_seed(self.seed)
        model = AutoModelForCausalLM.from_config(models.load_config(src), dtype=torch.float32)
        model.save_pretrained(out, safe_serialization=True)
        models.load_tokenizer(src).save_pretrained(out)


@dataclass(frozen=True)
class Sensitivity(Node):
    """S = sum over seed samples of |theta * dL/dtheta|, the loss on answer tokens only."""

    KIND = "sensitivity"
    VERSION = 3  # stored in float32, as accumulated (v2: bfloat16, which could move a window)
    INPUTS = ("teacher", "seeds")
    k: int | None = None
    sample_seed: int = 0
    max_length: int = 2048
    chat_template: bool = False
    loss: str = "answer_tokens"
    dtype: str = "float32"
    device: str = execution(default="cpu")
    layout: str = execution(default="single")  # "per_layer": one file per decoder layer

    def compute(self, store, inputs, out):
        model, tok = load_model_input(store, inputs["teacher"], self.dtype, self.device)
        samples = data.load_encoded(read_source(store, inputs["seeds"]), tok, self.max_length, self.k, self.sample_seed,
                                    prompt_format(self.chat_template))
        sens = sensitivity.compute_sensitivity(model, samples)
        totals = sensitivity.layer_totals(sens, model.config).tolist()  # from the fp32 sums, before rounding
        sensitivity.to_storage_dtype(sens)
        meta = {"layer_totals": json.dumps(totals), "teacher_config": model.config.to_json_string(),
                "n_samples": str(len(samples))}
        if self.layout == "single":
            return Tensors(sens, meta)
        # one file per decoder layer, each moved off the device only when written, so host RAM
        # holds one layer of the map at a time (the accumulators stay on the GPU until then)
        for group, names in sensitivity.layer_groups(list(sens), model.config).items():
            save_file({n: sens.pop(n).cpu() for n in names}, f"{out}/{group}.safetensors",
                      metadata={"format": "pt", **meta})
        Path(out, "layer_totals.json").write_text(json.dumps(totals))


def sensitivity_map(store: Store, ref: dict) -> models.LazyWeights:
    """A lazy name -> tensor view of a stored sensitivity map, in either layout."""
    if store.record("sensitivity", ref["key"]).get("layout") == "tree":
        return models.LazyWeights(sorted(store.tree(Ref.of(ref)).glob("*.safetensors")))
    return models.LazyWeights([store.blob_path(ref["digest"])])


def sensitivity_totals(store: Store, ref: dict) -> list[float]:
    if store.record("sensitivity", ref["key"]).get("layout") == "tree":
        return json.loads((store.tree(Ref.of(ref)) / "layer_totals.json").read_text())
    return json.loads(store.header(ref)["layer_totals"])


@dataclass(frozen=True)
class LayerPlan(Node):
    """The teacher layers a student of student_layers layers takes, in the teacher's order."""

    KIND = "layer_plan"
    VERSION = 2  # the random selector never draws the sensitivity plan
    student_layers: int = 0
    selector: str = "sensitivity"
    seed: int = 0

    @property
    def INPUTS(self) -> tuple[str, ...]:  # what the selector reads (align.SELECTOR_READS); else the teacher's depth
        return (align.SELECTOR_READS.get(self.selector, "sensitivity") or "teacher",)

    def compute(self, store, inputs, out):
        totals = layer_scores(store, inputs, self.selector)
        layers = align.select_layers(totals, self.student_layers, self.selector, self.seed)
        return Tensors({"layers": torch.tensor(layers)},
                       {"layers": json.dumps(layers), "layer_totals": json.dumps(totals)})


def layer_scores(store: Store, inputs: dict, selector: str) -> list[float]:
    """The per-teacher-layer scores a selector ranks: total sensitivity, block influence, or zeros of the
    teacher's depth (a selector that reads only the layer count)."""
    reads = align.SELECTOR_READS.get(selector, "sensitivity")
    if reads is None:
        return [0.0] * models.load_config(model_path(store, inputs["teacher"])).num_hidden_layers
    if reads == "activations":
        return json.loads(store.header(inputs["activations"])["block_influence"])
    return sensitivity_totals(store, inputs["sensitivity"])


def plan_layers(store: Store, ref: dict) -> list[int]:
    return json.loads(store.header(ref)["layers"])


@dataclass(frozen=True)
class Extraction(Node):
    """Student-shaped pieces of the planned teacher layers' matrices (depends on the student's shape only)."""

    KIND = "extraction"
    student_shape: dict | None = None
    reducer: str = "submatrix"
    modules: tuple[str, ...] = arch.ALL_MODULE_TYPES
    seed: int = 0

    @property
    def INPUTS(self) -> tuple[str, ...]:  # and what the reducer reads (align.REDUCER_READS), if anything
        return ("teacher", "plan", *filter(None, [align.REDUCER_READS.get(self.reducer, "sensitivity")]))

    def compute(self, store, inputs, out):
        src = model_path(store, inputs["teacher"])
        layers = plan_layers(store, inputs["plan"])
        sens = sensitivity_map(store, inputs["sensitivity"]) if "sensitivity" in inputs else None
        stats = store.tensors(inputs["activations"]) if "activations" in inputs else None
        pieces = align.extract(models.load_config(src), arch.config_from_shape(self.student_shape),
                               models.LazyWeights.from_model_dir(src), sens, layers, reducer=self.reducer,
                               modules=tuple(self.modules), seed=self.seed, activations=stats)
        return Tensors(pieces, {"layers": json.dumps(layers)})


@dataclass(frozen=True)
class LoraInit(Node):
    """A peft adapter folder holding the rank-r SVD factors of the extracted pieces (or a control's
    transform of them)."""

    KIND = "lora_init"
    # v2: top singular values from the factors, the svd method's random sketch seeded, and B stored
    # divided by alpha/r so that the applied delta is scale x the extracted piece's approximation
    # v3: svd 'auto' is the exact top-r SVD (the float64 Gram route), no longer torch.svd_lowrank; the
    # header says per piece and per module type how much of the piece the init keeps
    VERSION = 3
    INPUTS = ("extraction",)
    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.05
    split: str = "paper"
    scale: float = 1.0
    svd: str = "auto"  # lora_init.SVD_METHODS: auto = the exact top-r SVD (gram)
    transform: str = "none"
    transform_seed: int = 0

    def compute(self, store, inputs, out):
        extraction = inputs["extraction"]
        cfg = arch.config_from_shape(store.record("extraction", extraction["key"])["params"]["student_shape"])
        errors: dict[str, float] = {}
        pieces: dict[str, dict] = {}
        state = lora_init.init_state_dict(store.tensors(extraction), cfg, self.rank, alpha=self.alpha, split=self.split,
                                          scale=self.scale, method=self.svd, errors=errors, pieces=pieces)
        kept = lora_init.energy_by_module(pieces)
        if errors:
            log(f"SVD ({self.svd}) relative reconstruction error ||W - BA||/||W||: max {max(errors.values()):.4f}, "
                f"mean {sum(errors.values()) / len(errors):.4f} over {len(errors)} pieces (what rank {self.rank} "
                "cannot hold, not a factorization error); share of each piece's squared norm the init keeps: "
                + ", ".join(f"{m} {v['mean']:.1%}" for m, v in kept.items()))
        if self.transform == "spectrum-matched":
            state = lora_init.spectrum_matched(state, self.transform_seed)
        elif self.transform == "shuffled":
            state = lora_init.shuffled(state, self.transform_seed)
        meta = {"top_singular_values": json.dumps(lora_init.top_singular_values(state, self.alpha / self.rank)),
                "scaling": lora_init.scaling_note(self.rank, self.alpha, self.split, self.scale),
                "transform_seed": str(self.transform_seed), "pkt_kind": "lora_init",
                "svd_relative_errors": json.dumps(errors, sort_keys=True),
                "svd_pieces": json.dumps(pieces, sort_keys=True), "energy_kept_by_module": json.dumps(kept, sort_keys=True)}
        lora_init.save_adapter(out, state, cfg, self.rank, self.alpha, self.dropout, meta)


@dataclass(frozen=True)
class ResidualModel(Node):
    """The student minus its init's applied delta, an HF model dir: with the init adapter on top it is
    the student at step 0, so a user's own trainer starts where pkt's does (what `pkt extract` hands out)."""

    KIND = "residual_model"
    INPUTS = ("student", "init")
    dtype: str = "float32"

    def compute(self, store, inputs, out):
        src = model_path(store, inputs["student"])
        student = models.load_model(src, dtype=self.dtype, device="cpu")
        residual = lora_init.residual_model(student, store.tree(Ref.of(inputs["init"])))
        residual.save_pretrained(out, safe_serialization=True)
        models.load_tokenizer(src).save_pretrained(out)


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
class Scores(Node):
    """Per-example scores of the student (+ adapter) on one benchmark split, with a summary header."""

    KIND = "scores"
    VERSION = 2
    INPUTS = ("student", "data")
    benchmark: str = "gsm"
    task_definition: str = ""  # digest of the task YAML: a changed scorer is a new score
    split: str = "test"
    num_fewshot: int = 0
    limit: int | None = None
    chat_template: bool = keyed_if_set(False)  # prompts in the student's chat template (else the paper's layout)
    max_gen_toks: int | None = keyed_if_set(None)  # generation budget; None: the task YAML's
    dtype: str = "float32"
    device: str = execution(default="cpu")

    def compute(self, store, inputs, out):
        # generation reads the model's generation defaults: the flow names them in the student's source
        model, tok = load_model_input(store, inputs["student"], self.dtype, self.device, model_id.GENERATION_FILES)
        if "adapter" in inputs:
            model = models.with_adapter(model, store.tree(Ref.of(inputs["adapter"])))
        if "delta" in inputs:  # a LaTen update, added into the student's own rows/columns
            laten.apply_delta(model, store.tensors(inputs["delta"]))
        judge = model_path(store, inputs["judge"], model_id.GENERATION_FILES) if "judge" in inputs else None
        data_dir = read_source(store, inputs["data"], score_data_files(self.split))
        res = evaluate.evaluate(model, tok, self.benchmark, data_dir, split=self.split, num_fewshot=self.num_fewshot,
                                limit=self.limit, judge=judge, prompt_format=prompt_format(self.chat_template),
                                max_gen_toks=self.max_gen_toks)
        return Tensors(res.per_example, {"summary": json.dumps(res.summary, sort_keys=True)})


def score_summary(store: Store, ref: dict) -> dict:
    return json.loads(store.header(ref)["summary"])


@dataclass(frozen=True)
class Report(Node):
    """The report files (markdown, csv, chart) of a runs table, drawn once per distinct table; its
    inputs also name every scores node the table was read from."""

    KIND = "report"
    # v4: the declared endpoint first, corrected verdicts (Holm/BH), families as units, item bootstrap,
    # power, the protocol (grids, selection apart from test) and the scale caveat in report.md; v5: report.md one
    # screen (every arm on the endpoint, the positive controls), comparisons.md the full listing
    VERSION = 5
    INPUTS = ("runs", "scores")  # optional: "curves" (training losses), "selection" (val runs), "items" (per item),
    # and BESIDE_REPORT's tables
    primary: str = "exact_match/strict-match"
    protocol: dict | None = None  # report.write_report's protocol: endpoint, grids, seeds, caveat, gates

    def compute(self, store, inputs, out):
        tables = {name: report.read_csv(io.BytesIO(store.read_bytes(inputs[name]["digest"])))
                  for name in ("runs", "curves", "selection", "items") if name in inputs}
        report.write_report(tables.pop("runs"), out, self.primary, tables.get("curves"),
                            selection=tables.get("selection"), items=tables.get("items"), protocol=self.protocol)
        for name, file in BESIDE_REPORT.items():  # tables the report reads, kept beside it as given
            if name in inputs:
                Path(out, file).write_bytes(store.read_bytes(inputs[name]["digest"]))
        if "pretraining" in inputs:  # the fresh students' loss by step, a small table at the page's end
            page = Path(out, report.REPORT_FILES["markdown"])
            table = report.read_csv(io.BytesIO(store.read_bytes(inputs["pretraining"]["digest"])))
            page.write_text(page.read_text() + "\n" + fresh.pretraining_section(table))


# dose: every run's scores at its checkpoint steps (the dose-response over steps); matched: the endpoint's
# controls at the subject's own chosen setting, with their top singular value against the subject's
# pretraining: the fresh students' probe loss at fixed steps (pkt_core/fresh.py), also a table in report.md
BESIDE_REPORT = {"dose": "dose.csv", "matched": "matched.csv", "pretraining": "pretraining.csv"}


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


@dataclass(frozen=True)
class LatenAttribution(Node):
    """LaTen's logit-lens attribution of one model on one sample (a line of a jsonl file): layer scores
    (attention, FFN), FFN-neuron and attention-channel scores. Depends on neither a student nor the
    rate, so every pair, rate, seed and translator reading this model and sample shares it."""

    KIND = "laten_attribution"
    INPUTS = ("model", "data")
    index: int = 0  # the sample's line in the data file (0-based, blank lines skipped)
    max_length: int = 2048  # the prefix keeps its last max_length tokens
    norm: str = "authors"  # laten.NORMS
    vocab_chunk: int = 16384  # the lens sums the vocabulary in this order: it is part of the bytes
    chat_template: bool = keyed_if_set(False)  # the sample in this model's chat template (else the paper's layout)
    dtype: str = "float32"
    device: str = execution(default="cpu")

    def compute(self, store, inputs, out):
        model, tok = load_model_input(store, inputs["model"], self.dtype, self.device)
        row = data.read_jsonl(read_source(store, inputs["data"]))[self.index]
        # the target is the answer's own last token, not the chat template's end of turn after it
        prompt, _ = data.render(row["messages"], tok, prompt_format(self.chat_template))
        sample = data.Sample(prompt, row["messages"][-1]["content"], row)
        ids, target = laten.target_example(sample, tok)
        ids = ids[:, -self.max_length:]
        scores = laten.attribute(model, ids, target, norm=self.norm, vocab_chunk=self.vocab_chunk)
        return Tensors(scores, {"target": str(target), "tokens": str(ids.shape[1]),
                                "model_config": model.config.to_json_string()})


@dataclass(frozen=True)
class LatenTranslator(Node):
    """LaTen's per-module translators, trained one optimizer step per extract sample (in order); a
    tree with every step's weights (step_NNN.safetensors, NNN = optimizer steps taken) and the loss
    log. Inputs teacher_attr / student_attr: the attributions of the extract samples, in step order."""

    KIND = "laten_translator"
    INPUTS = ("teacher", "student", "data", "teacher_attr", "student_attr")
    extract: tuple[int, ...] = ()  # line indices of the extract samples
    align: tuple[int, ...] = ()  # line indices of the align samples
    hparams: dict | None = None  # laten.LatenParams.as_dict()
    max_length: int = 2048
    chat_template: bool = keyed_if_set(False)  # the samples in the student's chat template (else the paper's layout)
    val: tuple[int, ...] = keyed_if_set(())  # line indices whose answer CE says when it moved (hparams until_moved)
    dtype: str = "float32"
    device: str = execution(default="cpu")

    def compute(self, store, inputs, out):
        hp = laten.LatenParams.from_dict(self.hparams or {})
        t_src = model_path(store, inputs["teacher"])
        student, tok = load_model_input(store, inputs["student"], self.dtype, self.device)
        rows = data.read_jsonl(read_source(store, inputs["data"]))
        path = inputs["data"]["key"]
        fmt = prompt_format(self.chat_template)
        encode = lambda i: data.encode(data.to_samples([rows[i]], tok, fmt)[0], tok, self.max_length,  # noqa: E731
                                       f"{path} line {i + 1}")
        extract = [{"encoded": encode(i), "t_attr": store.tensors(t), "s_attr": store.tensors(s)}
                   for i, t, s in zip(self.extract, inputs["teacher_attr"], inputs["student_attr"], strict=True)]
        save = lambda k, state: save_file(state, f"{out}/step_{k:03d}.safetensors",  # noqa: E731
                                          metadata={"format": "pt", "step": str(k)})
        moved: dict = {}
        steps = laten.train_translator(models.LazyWeights.from_model_dir(t_src), models.load_config(t_src), student,
                                       extract, [encode(i) for i in self.align], hp, on_step=save,
                                       val=[encode(i) for i in self.val], report=moved)
        if moved:
            log(f"laten translator: val answer CE {moved['val_start']:.4f} at step 0; moved by more than "
                f"{moved['threshold']:g} at step {moved['moved_at']}" if moved["moved_at"] else
                f"laten translator: val answer CE never moved by more than {moved['threshold']:g} in "
                f"{moved['steps']} steps (the cap)")
        Path(out, "translator_log.json").write_text(json.dumps({"steps": steps, "modules": list(hp.modules),
                                                                **({"val": moved} if moved else {})}))


def translator_steps(store: Store, ref: dict) -> int:
    return len(json.loads((store.tree(Ref.of(ref)) / "translator_log.json").read_text())["steps"])


@dataclass(frozen=True)
class LatenDelta(Node):
    """The LaTen update for one student shape: the translated teacher rows/columns of one translator
    step, at one rate, located on one seed sample (teacher_attr, student_attr), as sparse tensors
    ('<weight>.idx', '.rows', '.axis') that Scores adds into the student. control 'zero' keeps the
    support with values 0; 'random' draws norm-matched Gaussian rows under draw_seed."""

    KIND = "laten_delta"
    INPUTS = ("teacher", "translator", "teacher_attr", "student_attr")
    step: int = 1  # 0: the translator's last step (one trained until its val loss moved)
    rate: float = 0.1
    control: str = "translated"  # laten.CONTROLS
    draw_seed: int = 0
    student_shape: dict | None = None

    def compute(self, store, inputs, out):
        tr = inputs["translator"]
        hp = laten.LatenParams.from_dict(store.record("laten_translator", tr["key"])["params"]["hparams"] or {})
        modules, n_steps = hp.modules, translator_steps(store, tr)
        step = self.step or n_steps
        if not 1 <= step <= n_steps:
            raise laten.LatenError(f"LaTen step {self.step}: the translator has steps 1..{n_steps}; "
                                   "choose a laten.grid step in that range")
        t_src = model_path(store, inputs["teacher"])
        s_cfg = arch.config_from_shape(self.student_shape)
        state = _load_safetensors(store.tree(Ref.of(tr)) / f"step_{step:03d}.safetensors")
        pairs = laten.locate(store.tensors(inputs["teacher_attr"]), store.tensors(inputs["student_attr"]),
                             laten.counts(s_cfg, self.rate), modules, hp.n_layers)
        vectors = laten.teacher_vectors(models.LazyWeights.from_model_dir(t_src), models.load_config(t_src), pairs)
        delta = laten.make_delta(laten.load_translator(state, modules), pairs, vectors, s_cfg, self.control,
                                 self.draw_seed)
        layers = [(p.module, p.t_layer, p.s_layer) for p in pairs]
        moved = json.loads((store.tree(Ref.of(tr)) / "translator_log.json").read_text()).get("val")
        return Tensors(delta, {"stats": json.dumps(laten.delta_stats(delta)), "pairs": json.dumps(layers),
                               **({"translator": json.dumps({**moved, "step_used": step})} if moved else {})})


def _load_safetensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


@dataclass(frozen=True)
class Activations(Node):
    """Mean activation magnitudes and block influence of the teacher on the seed samples (forward passes
    only; pkt_core/activations.py): what subcloning and the block-influence selector read. Independent
    of the student, so every student and variant shares it."""

    KIND = "activations"
    INPUTS = ("teacher", "seeds")
    k: int | None = None
    sample_seed: int = 0
    max_length: int = 2048
    chat_template: bool = False
    dtype: str = "float32"
    device: str = execution(default="cpu")

    def compute(self, store, inputs, out):
        model, tok = load_model_input(store, inputs["teacher"], self.dtype, self.device)
        samples = data.load_encoded(read_source(store, inputs["seeds"]), tok, self.max_length, self.k, self.sample_seed,
                                    prompt_format(self.chat_template))
        stats = activations.activation_stats(model, samples)
        return Tensors(stats, {"block_influence": json.dumps(stats["block_influence"].tolist()),
                               "n_samples": str(len(samples)), "n_tokens": str(int(stats["tokens"]))})
