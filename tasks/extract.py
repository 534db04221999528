"""The teacher-side node kinds, what `pkt extract` computes: the teacher's sensitivity and activation
statistics on the seed samples, the layer plan, the student-shaped extraction, its LoRA init, the residual
model a user's own trainer starts from, and the random teacher of the untrained-teacher control."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from pkt.artifacts.store import Ref, Store
from pkt.core import activations, align, arch, data, lora_init, models, sensitivity

from .node import Node, Tensors, execution, log
from .sources import load_model_input, model_path, prompt_format, read_source


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
