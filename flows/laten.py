"""LaTen's chain in a sweep: attribution (per model and sample) -> translator (per pair, splits,
hyperparameters, seed) -> update (per translator step, rate, seed sample, control). The update is
scored on the student directly: LaTen does not fine-tune.

Its extract/align samples and each run's seed sample come from the task's train.jsonl alone
(pkt_core.laten.splits), so val (which chooses the step and rate) and test stay unseen.
"""
from __future__ import annotations

from pathlib import Path

from prefect.futures import PrefectFuture

from pkt.core import data, laten
from pkt.tasks import laten as laten_nodes

from .config import SweepConfig, TaskSpec
from .extract import chat_template
from .graph import Graph
from .variants import Variant


def laten_chain(graph: Graph, cfg: SweepConfig, v: Variant, teacher: PrefectFuture, student: PrefectFuture,
                train: PrefectFuture, task: TaskSpec, shape: dict, seed: int, setting: dict,
                label: str) -> PrefectFuture:
    """The future of one run's LaTen update (a laten_delta node), for the Scores node's `delta` input."""
    spec = cfg.laten
    n_rows = len(data.read_jsonl(Path(task.dir) / "train.jsonl"))
    extract, align, pool = laten.splits(n_rows, spec.n_extract, spec.n_align, spec.split_seed)
    who = {"teacher": (teacher, "teacher"), "student": (student, label.split(", ")[0])}
    # each model reads its samples in its own format (a teacher and a student may have different templates)
    templated = {role: chat_template(cfg.prompt_format, graph.path_of(f)) for role, (f, _) in who.items()}

    def attribution(role: str, line: int) -> PrefectFuture:
        model, name = who[role]
        spec_ = laten_nodes.LatenAttribution(index=line, max_length=cfg.max_length, norm=spec.norm, dtype=cfg.dtype,
                                             device=cfg.device, chat_template=templated[role])
        return graph.submit(spec_, {"model": model, "data": train}, f"{name}, {task.name} train line {line + 1}")

    # trained until its val loss moves: watched on train lines outside extract/align (never the task's val/test)
    val = tuple(laten.val_lines(pool, seed, spec.n_val)) if spec.until_moved is not None else ()
    translator = graph.submit(
        laten_nodes.LatenTranslator(extract=tuple(extract), align=tuple(align), hparams=spec.hparams(seed),
                                    max_length=cfg.max_length, dtype=cfg.dtype, device=cfg.device,
                                    chat_template=templated["student"], val=val),
        {"teacher": teacher, "student": student, "data": train,
         "teacher_attr": [attribution("teacher", i) for i in extract],
         "student_attr": [attribution("student", i) for i in extract]},
        f"{who['student'][1]}, {task.name}, seed={seed}, steps={len(extract)}, rate={spec.rate}")
    line = laten.seed_sample(pool, seed)
    delta = laten_nodes.LatenDelta(step=setting["step"], rate=setting["rate"], control=v.update,
                                   draw_seed=seed if v.drawn else 0, student_shape=shape)
    return graph.submit(delta, {"teacher": teacher, "translator": translator,
                                "teacher_attr": attribution("teacher", line),
                                "student_attr": attribution("student", line)}, f"{label}, sample line {line + 1}")
