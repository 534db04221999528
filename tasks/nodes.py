"""One Prefect task per artifact kind: read inputs from the store, call pkt_core, store the result.

Inputs are refs: store artifacts {kind, key, digest} or sources {kind: model|file|dir, key: path,
digest}. Only digests enter the artifact key, so moving a model directory reuses everything.
"""
from __future__ import annotations

import hashlib
import io
import json
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import save_file

from pkt.artifacts.keys import file_digest
from pkt.artifacts.model_id import model_digest
from pkt.artifacts.store import Ref, Store
from pkt.core import align, arch, data, evaluate, finetune, lora_init, models, report, sensitivity
from pkt.core.mini import family

from .node import artifact_task, digests


# ---- sources ---------------------------------------------------------------------------------
def model_source(path: str, store: Store) -> dict:
    return {"kind": "model", "key": str(path), "digest": model_digest(path, memo_dir=store.root / "memo")}


def file_source(path: str) -> dict:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file")
    return {"kind": "file", "key": str(path), "digest": file_digest(path)}


def dir_source(path: str, names: list[str] | None = None) -> dict:
    """A task directory: digest over the named jsonl files (default: all), names and contents, so a
    score depends on the files it reads and not on, say, the seed file beside them."""
    files = sorted(Path(path) / n for n in names) if names else sorted(Path(path).glob("*.jsonl"))
    files = [f for f in files if f.exists()]
    if not files:
        raise FileNotFoundError(f"{path}: no *.jsonl files; a task directory holds train/seeds/val/test.jsonl")
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}\0{file_digest(f)}\0".encode())
    return {"kind": "dir", "key": str(path), "digest": h.hexdigest()}


def table_source(store: Store, table: pd.DataFrame, name: str) -> dict:
    """A table the flow assembled (the sweep's runs), stored as a CSV blob so that a node can
    depend on its content."""
    return {"kind": "table", "key": name, "digest": store.put_bytes(table.to_csv(index=False).encode())}


# ---- computations ---------------------------------------------------------------------------
def compute_family(store: Store, key: str, params: dict, inputs: dict) -> Ref:
    with tempfile.TemporaryDirectory(dir=store.root / "tmp") as tmp:
        t0 = time.time()
        stats = family.build_family(tmp, params["size"], log=_log, seed=params.get("seed"))
        Path(tmp, "family_stats.json").write_text(json.dumps(stats, indent=1))
        return store.put_tree("family", key, tmp, params=params, inputs={}, seconds=time.time() - t0)


def compute_random_model(store: Store, key: str, params: dict, inputs: dict) -> Ref:
    """A randomly initialized model with the config (and tokenizer) of another: the untrained-teacher control."""
    from transformers import AutoModelForCausalLM

    src = inputs["like"]["key"]
    torch.manual_seed(params["seed"])
    model = AutoModelForCausalLM.from_config(models.load_config(src), dtype=torch.float32)
    with tempfile.TemporaryDirectory(dir=store.root / "tmp") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        models.load_tokenizer(src).save_pretrained(tmp)
        return store.put_tree("random_model", key, tmp, params=params, inputs=digests(inputs))


def compute_sensitivity(store: Store, key: str, params: dict, inputs: dict) -> Ref:
    t0 = time.time()
    src = inputs["teacher"]["key"]
    model = models.load_model(src, dtype=params["dtype"], device=params["device"])
    tok = models.load_tokenizer(src)
    samples = data.load_encoded(inputs["seeds"]["key"], tok, params["max_length"], params["k"], params["sample_seed"],
                                params["chat_template"])
    sens = sensitivity.compute_sensitivity(model, samples)
    totals = sensitivity.layer_totals(sens, model.config).tolist()
    meta = {"layer_totals": json.dumps(totals), "teacher_config": model.config.to_json_string(),
            "n_samples": str(len(samples))}
    if params.get("layout", "single") == "single":
        return store.put_tensors("sensitivity", key, sens, params=params, inputs=digests(inputs),
                                 seconds=time.time() - t0, metadata=meta)
    # per_layer: one file per decoder layer, each moved off the device only when written, so host
    # RAM holds one layer of the map at a time (the accumulators stay on the GPU until then)
    with tempfile.TemporaryDirectory(dir=store.root / "tmp") as tmp:
        for group, names in sensitivity.layer_groups(list(sens), model.config).items():
            save_file({n: sens.pop(n).cpu() for n in names}, f"{tmp}/{group}.safetensors",
                      metadata={"format": "pt", **meta})
        Path(tmp, "layer_totals.json").write_text(json.dumps(totals))
        return store.put_tree("sensitivity", key, tmp, params=params, inputs=digests(inputs), seconds=time.time() - t0)


def sensitivity_map(store: Store, ref: dict) -> models.LazyWeights:
    """A lazy name -> tensor view of a stored sensitivity map, in either layout."""
    if store.record("sensitivity", ref["key"]).get("layout") == "tree":
        return models.LazyWeights(sorted(store.tree(Ref.of(ref)).glob("*.safetensors")))
    return models.LazyWeights([store.blob_path(ref["digest"])])


def sensitivity_totals(store: Store, ref: dict) -> list[float]:
    if store.record("sensitivity", ref["key"]).get("layout") == "tree":
        return json.loads((store.tree(Ref.of(ref)) / "layer_totals.json").read_text())
    return json.loads(store.header(ref)["layer_totals"])


def compute_layer_plan(store: Store, key: str, params: dict, inputs: dict) -> Ref:
    totals = sensitivity_totals(store, inputs["sensitivity"])
    layers = align.select_layers(totals, params["student_layers"], params["selector"], params["seed"])
    meta = {"layers": json.dumps(layers), "layer_totals": json.dumps(totals)}
    return store.put_tensors("layer_plan", key, {"layers": torch.tensor(layers)}, params=params, inputs=digests(inputs),
                             metadata=meta)


def compute_extraction(store: Store, key: str, params: dict, inputs: dict) -> Ref:
    t0 = time.time()
    teacher_cfg = models.load_config(inputs["teacher"]["key"])
    student_cfg = arch.config_from_shape(params["student_shape"])
    layers = json.loads(store.header(inputs["plan"])["layers"])
    weights = models.LazyWeights.from_model_dir(inputs["teacher"]["key"])
    sens = sensitivity_map(store, inputs["sensitivity"])
    out = align.extract(teacher_cfg, student_cfg, weights, sens, layers, reducer=params["reducer"],
                        modules=tuple(params["modules"]), seed=params["seed"])
    return store.put_tensors("extraction", key, out, params=params, inputs=digests(inputs), seconds=time.time() - t0,
                             metadata={"layers": json.dumps(layers)})


def compute_lora_init(store: Store, key: str, params: dict, inputs: dict) -> Ref:
    extraction = inputs["extraction"]
    shape = store.record("extraction", extraction["key"])["params"]["student_shape"]
    cfg = arch.config_from_shape(shape)
    rank, alpha = params["rank"], params["alpha"]
    state = lora_init.init_state_dict(store.tensors(extraction), cfg, rank, alpha=alpha, split=params["split"],
                                      scale=params["scale"], method=params["svd"])
    if params["transform"] == "spectrum-matched":
        state = lora_init.spectrum_matched(state, params["transform_seed"])
    elif params["transform"] == "shuffled":
        state = lora_init.shuffled(state, params["transform_seed"])
    meta = {"top_singular_values": json.dumps(lora_init.top_singular_values(state, alpha / rank)),
            "scaling": lora_init.scaling_note(rank, alpha, params["split"], params["scale"]),
            "transform_seed": str(params["transform_seed"]), "pkt_kind": "lora_init"}
    with tempfile.TemporaryDirectory(dir=store.root / "tmp") as tmp:
        lora_init.save_adapter(tmp, state, cfg, params["rank"], params["alpha"], params["dropout"], meta)
        return store.put_tree("lora_init", key, tmp, params=params, inputs=digests(inputs))


def compute_residual_model(store: Store, key: str, params: dict, inputs: dict) -> Ref:
    """The student minus its init's applied delta, an HF model dir: with the init adapter on top
    it is the student at step 0, so a user's own trainer starts where pkt's does."""
    t0 = time.time()
    src = inputs["student"]["key"]
    student = models.load_model(src, dtype=params["dtype"], device="cpu")
    residual = lora_init.residual_model(student, store.tree(Ref.of(inputs["init"])))
    with tempfile.TemporaryDirectory(dir=store.root / "tmp") as tmp:
        residual.save_pretrained(tmp, safe_serialization=True)
        models.load_tokenizer(src).save_pretrained(tmp)
        return store.put_tree("residual_model", key, tmp, params=params, inputs=digests(inputs),
                              seconds=time.time() - t0)


def compute_adapter(store: Store, key: str, params: dict, inputs: dict) -> Ref:
    """Fine-tune the student from an init (or peft's lora/pissa init) and store a stock peft adapter
    for the *unmodified* student (the delta step folded in)."""
    from peft import get_peft_model, get_peft_model_state_dict

    t0 = time.time()
    tp = finetune.TrainParams.from_dict(params["train"])
    src = inputs["student"]["key"]
    student = models.load_model(src, dtype=params["dtype"], device=params["device"])
    tok = models.load_tokenizer(src)
    init_kind = params["init"]
    if init_kind == "extracted":
        init_dir = store.tree(Ref.of(inputs["init"]))
        model = lora_init.trainable_from_init(student, init_dir)
        rank, alpha = (json.loads((init_dir / "adapter_config.json").read_text())[k] for k in ("r", "lora_alpha"))
    else:  # peft's own inits: "lora" (B = 0) or "pissa" (the student's own principal directions)
        modules = [m for m in tp.modules if init_kind != "pissa" or m != "embed"]  # no PiSSA for embeddings
        cfg = lora_init.lora_config(modules, tp.rank, tp.alpha, tp.dropout)
        cfg.init_lora_weights = True if init_kind == "lora" else "pissa"
        model = get_peft_model(student, cfg)
        rank, alpha = tp.rank, tp.alpha
    init_state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model, save_embedding_layers=False).items()}
    size = lora_init.init_size(model)  # at step 0, from peft's applied deltas
    samples = data.load_encoded(inputs["train"]["key"], tok, tp.max_length)[: tp.n_train]
    log = finetune.finetune(model, samples, tp, tok.pad_token_id)
    trained = get_peft_model_state_dict(model, save_embedding_layers=False)
    subtracted = init_kind != "lora"  # these inits moved the base weights: fold the init back in
    state = lora_init.fold_init(trained, init_state) if subtracted else trained
    factor = 2 if subtracted else 1
    cfg = arch.config_from_shape(arch.shape_of(student.config))
    with tempfile.TemporaryDirectory(dir=store.root / "tmp") as tmp:
        lora_init.save_adapter(tmp, state, cfg, factor * rank, factor * alpha, tp.dropout,
                               {"pkt_kind": "adapter", "variant": params["variant"],
                                "init_size": json.dumps(size)})
        Path(tmp, "pkt_train_log.json").write_text(json.dumps({"losses": log.losses, "steps": log.steps}))
        return store.put_tree("adapter", key, tmp, params=params, inputs=digests(inputs), seconds=time.time() - t0)


def compute_scores(store: Store, key: str, params: dict, inputs: dict) -> Ref:
    from peft import PeftModel

    t0 = time.time()
    src = inputs["student"]["key"]
    model = models.load_model(src, dtype=params["dtype"], device=params["device"])
    tok = models.load_tokenizer(src)
    if "adapter" in inputs:
        model = PeftModel.from_pretrained(model, str(store.tree(Ref.of(inputs["adapter"])))).merge_and_unload()
    res = evaluate.evaluate(model, tok, params["benchmark"], inputs["data"]["key"], split=params["split"],
                            num_fewshot=params["num_fewshot"], limit=params.get("limit"),
                            judge=inputs.get("judge", {}).get("key"))
    return store.put_tensors("scores", key, res.per_example, params=params, inputs=digests(inputs),
                             seconds=time.time() - t0, metadata={"summary": json.dumps(res.summary)})


def compute_report(store: Store, key: str, params: dict, inputs: dict) -> Ref:
    """The report files (markdown, csv, chart) of a runs table: drawn once per distinct table."""
    t0 = time.time()
    runs = report.read_csv(io.BytesIO(store.read_bytes(inputs["runs"]["digest"])))
    curves = report.read_csv(io.BytesIO(store.read_bytes(inputs["curves"]["digest"]))) if "curves" in inputs else None
    with tempfile.TemporaryDirectory(dir=store.root / "tmp") as tmp:
        report.write_report(runs, tmp, params["primary"], curves)
        return store.put_tree("report", key, tmp, params=params, inputs=digests(inputs), seconds=time.time() - t0)


def _log(msg: str) -> None:
    from .node import _logger

    _logger().info(msg)


# ---- the Prefect tasks (run names are what a person scanning the UI reads) --------------------
family_task = artifact_task("family", compute_family, "family[{label}]")
random_model_task = artifact_task("random_model", compute_random_model, "random_model[{label}]")
sensitivity_task = artifact_task("sensitivity", compute_sensitivity, "sensitivity[{label}]")
layer_plan_task = artifact_task("layer_plan", compute_layer_plan, "layer_plan[{label}]")
extraction_task = artifact_task("extraction", compute_extraction, "extraction[{label}]")
lora_init_task = artifact_task("lora_init", compute_lora_init, "lora_init[{label}]")
residual_model_task = artifact_task("residual_model", compute_residual_model, "residual_model[{label}]")
adapter_task = artifact_task("adapter", compute_adapter, "adapter[{label}]")
scores_task = artifact_task("scores", compute_scores, "scores[{label}]")
report_task = artifact_task("report", compute_report, "report[{label}]")
