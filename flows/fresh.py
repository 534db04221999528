"""The fresh-student arms in a sweep (variants ws-student, subclone-student, random-student): a model made
from the teacher by weight selection or subcloning (or a random init), pretrained on the miniature
family's student corpus for the student's budget, then scored as a model, as vanilla is. The nodes
read no task: one fresh student per (student, variant) serves every task of the sweep.
"""
from __future__ import annotations

from prefect.futures import PrefectFuture

from pkt.core.mini import family
from pkt.tasks import fresh as fresh_nodes

from .config import SweepConfig, TaskSpec
from .graph import Graph, source_name
from .variants import Variant


def corpus_of(cfg: SweepConfig) -> tuple[dict, dict]:
    """(corpus spec, its recipe params) of the sweep's miniature family."""
    spec = cfg.family.model_dump()
    return spec, family.recipe_params(**spec)


def family_of(record: dict) -> dict:
    """A family node's record as the config's family field: {size, seed, testbed, twin} (its recipe's)."""
    params = record["params"]
    recipe = params.get("recipe") or {}
    return {"size": params["size"], "seed": recipe.get("seed"), "testbed": recipe.get("testbed", 1),  # v1 leaves it out
            "twin": recipe.get("twin", False)}


def fresh_chain(graph: Graph, cfg: SweepConfig, v: Variant, teacher: PrefectFuture, student: PrefectFuture,
                train: PrefectFuture, task: TaskSpec, shape: dict, seed: int, setting: dict,
                label: str) -> PrefectFuture:
    """The future of the run's fresh student (a fresh_student node), for the Scores node's `student` input."""
    corpus, recipe = corpus_of(cfg)
    name = source_name(graph.path_of(student))
    inputs = {"student": student}
    if v.fresh != "random":
        calibrated = v.fresh == "subcloning"  # ranks neurons on the student corpus; weight selection reads no data
        inputs["init"] = graph.submit(
            fresh_nodes.FreshInit(method=v.fresh, corpus=corpus if calibrated else None,
                                  recipe=recipe if calibrated else None),
            {"teacher": teacher, "student": student}, f"{source_name(cfg.teacher)} -> {name} shape, {v.fresh}")
    spec = fresh_nodes.FreshStudent(init=v.fresh, corpus=corpus, recipe=recipe)
    return graph.submit(spec, inputs, f"{name}, {v.name}, pretrained on the student corpus")


def curve_rows(store, student: str, variant: str, ref: dict) -> list[dict]:
    """The pretraining curve of one fresh student: one row per fixed step (probe loss)."""
    found = fresh_nodes.pretrain_log(store, ref)
    return [{"student": student, "variant": variant, "step": int(step), "probe_loss": loss}
            for step, loss in found["loss_at"].items()]
