"""The teacher side: sensitivity -> layer plan -> extraction -> LoRA init, per student shape.

Nothing here depends on a student's weights, so every student of one shape shares the chain.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from prefect import flow
from prefect.futures import PrefectFuture

from pkt.artifacts.store import Store
from pkt.core import align, arch, data, models
from pkt.tasks import extract as extract_nodes

from .config import SweepConfig, TaskSpec
from .graph import Graph, source_name, task_runner
from .names import run_name
from .summary import publish
from .variants import Variant


@dataclass(frozen=True)
class ChainOptions:
    """How a teacher chain is cut (the parts of the sweep config it reads)."""

    k: int | None = None
    sample_seed: int = 0
    selector: str = "sensitivity"
    reducer: str = "submatrix"
    max_length: int = 2048
    dtype: str = "float32"
    device: str = "cpu"
    modules: tuple[str, ...] = arch.ALL_MODULE_TYPES
    layout: str = "single"
    draw_seed: int = 0  # seed of a random layer selector or reducer
    chat_template: bool = False  # the seeds in the teacher's chat template (chat_template())


@functools.lru_cache(maxsize=64)
def chat_template(prompt_format: str, model: str) -> bool:
    """Whether a model's samples are rendered in its own chat template: prompt format "chat", or "auto"
    and its tokenizer carries one. Resolved per model, so a teacher and a student with different
    templates each get their own, and a model without one keeps the paper's layout (and its keys)."""
    try:
        return data.resolve_format(prompt_format, models.load_tokenizer(model)) == "chat"
    except data.DataError as e:
        raise data.DataError(f"{model}: {e}") from None


def extraction_chain(graph: Graph, teacher: PrefectFuture, seeds: str, shape: dict, opts: ChainOptions,
                     teacher_name: str) -> dict[str, PrefectFuture]:
    """Futures of the sensitivity, layer plan and extraction nodes for one teacher (a model source,
    or a model the store builds), seed file and student shape."""
    tag = f"teacher={teacher_name}, seeds={source_name(seeds)}"
    seeds = graph.source("file", seeds)
    reads = {align.SELECTOR_READS[opts.selector], align.REDUCER_READS[opts.reducer]}
    scores = {"teacher": teacher}  # what a selector or reducer may read: only those it needs are submitted
    if "sensitivity" in reads:
        scores["sensitivity"] = graph.submit(
            extract_nodes.Sensitivity(k=opts.k, sample_seed=opts.sample_seed, max_length=opts.max_length,
                                      dtype=opts.dtype, device=opts.device, layout=opts.layout,
                                      chat_template=opts.chat_template),
            {"teacher": teacher, "seeds": seeds}, f"{tag}, k={opts.k or 'all'}")
    if "activations" in reads:
        scores["activations"] = graph.submit(
            extract_nodes.Activations(k=opts.k, sample_seed=opts.sample_seed, max_length=opts.max_length,
                                      dtype=opts.dtype, device=opts.device, chat_template=opts.chat_template),
            {"teacher": teacher, "seeds": seeds}, f"{tag}, k={opts.k or 'all'}")
    layers = shape["num_hidden_layers"]
    drawn = f" seed={opts.draw_seed}" if opts.selector == "random" else ""
    spec = extract_nodes.LayerPlan(student_layers=layers, selector=opts.selector,
                                   seed=opts.draw_seed if opts.selector == "random" else 0)
    plan = graph.submit(spec, {name: scores[name] for name in spec.INPUTS}, f"{tag}, {opts.selector}{drawn}, layers={layers}")
    drawn += f" seed={opts.draw_seed}" if opts.reducer == "random" else ""
    spec = extract_nodes.Extraction(student_shape=shape, reducer=opts.reducer, modules=tuple(opts.modules),
                                    seed=opts.draw_seed if opts.reducer == "random" else 0)
    ext = graph.submit(spec, {name: plan if name == "plan" else scores[name] for name in spec.INPUTS},
                       f"{tag}, {opts.selector}, {opts.reducer}{drawn}, hidden={shape['hidden_size']}")
    return {**{k: v for k, v in scores.items() if k != "teacher"}, "plan": plan, "extraction": ext, "tag": f"{tag}, {opts.selector}, {opts.reducer}{drawn}"}


def prompt_formats(prompt_format: str, teacher: str, students: list[str]) -> str:
    """One line that says which format each model's samples are rendered in (templates may differ)."""
    own = models.load_tokenizer(teacher).chat_template

    def one(model: str) -> str:
        if not chat_template(prompt_format, model):
            return "the paper's <|user|>/<|assistant|> layout"
        differs = model != teacher and models.load_tokenizer(model).chat_template != own
        return "its own chat template (not the teacher's)" if differs else "its chat template"

    said = [f"teacher {source_name(teacher)}: {one(teacher)}"] + [f"student {source_name(s)}: {one(s)}"
                                                                  for s in students]
    return f"prompt format {prompt_format}: " + "; ".join(said)


def init_node(graph: Graph, chain: dict, *, rank: int, alpha: float, dropout: float = 0.05, split: str = "paper",
              scale: float = 1.0, svd: str = "auto", transform: str = "none", transform_seed: int = 0,
              variant: str = "") -> PrefectFuture:
    """variant: the sweep variant the init is for, named first in its label (store ls, the UI)."""
    how = "" if transform == "none" else f", {transform} seed={transform_seed}"
    return graph.submit(extract_nodes.LoraInit(rank=rank, alpha=alpha, dropout=dropout, split=split, scale=scale,
                                               svd=svd, transform=transform, transform_seed=transform_seed),
                        {"extraction": chain["extraction"]},
                        f"{variant + ': ' if variant else ''}{chain['tag']}, rank={rank}, scale={scale}{how}")


def variant_init(graph: Graph, cfg: SweepConfig, v: Variant, teacher: PrefectFuture, task: TaskSpec, shape: dict, tp,
                 scale: float) -> PrefectFuture:
    """The future of the LoRA init a variant with a teacher trains from."""
    draw = tp.seed if v.drawn else 0
    seeds = cfg.cross_task_seeds if v.seeds == "cross-task" else str(Path(task.dir) / "seeds.jsonl")
    name = source_name(cfg.teacher)
    templated = chat_template(cfg.prompt_format, cfg.teacher)  # an untrained teacher has the teacher's tokenizer
    if v.teacher == "untrained":
        teacher = graph.submit(extract_nodes.RandomModel(seed=draw), {"like": teacher}, f"like={name}, seed={draw}")
        name = f"untrained {name} seed={draw}"
    elif v.teacher == "early":
        teacher, name = graph.source("model", cfg.early_teacher), source_name(cfg.early_teacher)
        templated = chat_template(cfg.prompt_format, cfg.early_teacher)
    opts = ChainOptions(k=cfg.k, sample_seed=cfg.sample_seed, selector=v.selector or cfg.selector,
                        reducer=v.reducer or cfg.reducer, max_length=cfg.max_length, dtype=cfg.dtype,
                        device=cfg.device, modules=tp.modules, draw_seed=draw, chat_template=templated)
    chain = extraction_chain(graph, teacher, seeds, shape, opts, name)
    return init_node(graph, chain, rank=tp.rank, alpha=tp.alpha, dropout=tp.dropout, split=cfg.split, scale=scale,
                     svd=cfg.svd, transform=v.transform, transform_seed=draw, variant=v.name)


@flow(name="extract-teacher", log_prints=True, flow_run_name=run_name("extract", "teacher", "students"))
def extract_teacher(teacher: str, seeds: str, students: list[str], rank: int = 16, alpha: float = 16.0,
                    k: int | None = None, selector: str = "sensitivity", reducer: str = "submatrix",
                    store: str | None = None, dtype: str = "float32", device: str = "cpu",
                    sensitivity_layout: str = "single", svd: str = "auto", max_length: int = 2048,
                    prompt_format: str = "auto") -> dict:
    """Sensitivity, layer plans, extractions and LoRA inits for each student shape (computed once),
    and for each student the residual base (its weights minus the init's delta) that the init
    adapter trains on: that pair, loaded with stock peft, is the student at step 0.

    sensitivity_layout='per_layer' writes the map one decoder layer at a time (host RAM holds one
    layer of it; with device='cuda' the accumulators stay on the GPU). svd: the LoRA init's SVD,
    'auto' (the exact top-r SVD, through the float64 Gram matrix), 'gram', 'full' or 'lowrank'.
    prompt_format: auto (the teacher's chat template when its tokenizer has one), chat or paper."""
    st = Store(store)
    opts = ChainOptions(k=k, selector=selector, reducer=reducer, dtype=dtype, device=device, layout=sensitivity_layout,
                        max_length=max_length, chat_template=chat_template(prompt_format, teacher))
    print(prompt_formats(prompt_format, teacher, students))
    with task_runner() as runner:
        graph = Graph(st, runner)
        t_src = graph.source("model", teacher)
        chains = {}
        for student in students:
            shape = arch.shape_of(models.load_config(student))
            chain = extraction_chain(graph, t_src, seeds, shape, opts, source_name(teacher))
            init = init_node(graph, chain, rank=rank, alpha=alpha, svd=svd)
            residual = graph.submit(extract_nodes.ResidualModel(dtype=dtype),
                                    {"student": graph.source("model", student), "init": init},
                                    f"student={source_name(student)}, rank={rank}, alpha={alpha}")
            chains[student] = {**chain, "lora_init": init, "residual_model": residual}
        results = graph.results()
    out = {}
    for student, chain in chains.items():
        refs = {name: chain[name].result()
                for name in ("sensitivity", "activations", "plan", "extraction", "lora_init", "residual_model")
                if name in chain}
        out[student] = {**refs, "layers": extract_nodes.plan_layers(st, refs["plan"]),
                        "init_path": str(st.path(refs["lora_init"])),  # paths a person uses after the run
                        "base_path": str(st.path(refs["residual_model"]))}
    publish(st, "extract-teacher", results, plans={s: v["layers"] for s, v in out.items()})
    out["_ledger"] = [(r["kind"], r["key"], r["status"]) for r in results]
    return out
