"""The node kinds at the end of a run: a model's per-example scores on a benchmark split, and the
report drawn from the runs table (with the tables the flow assembled, stored so the report depends on
their content)."""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pkt.artifacts import model_id
from pkt.artifacts.store import Ref, Store
from pkt.core import evaluate, fresh, laten, models, report

from .node import Node, Tensors, execution, keyed_if_set
from .sources import load_model_input, model_path, prompt_format, read_source


def score_data_files(split: str) -> list[str]:
    """The files of a task directory a score reads (the split and the few-shot pool)."""
    return [f"{split}.jsonl", "train.jsonl"]


def table_source(store: Store, table: pd.DataFrame, name: str) -> dict:
    """A table the flow assembled (the sweep's runs), stored as a CSV artifact (a record, so gc keeps
    it until the node that reads it has run) so that a node can depend on its content."""
    data = table.to_csv(index=False).encode()
    params, inputs = {"name": name}, {"csv": hashlib.sha256(data).hexdigest()}
    return store.put_blob("table", store.key("table", params, inputs), data, params=params, inputs=inputs).as_dict()


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
    # screen (every arm on the endpoint, the positive controls), comparisons.md the full listing; v6: report.png's
    # chance line and dose-response panel (the dose table)
    VERSION = 6
    INPUTS = ("runs", "scores")  # optional: "curves" (training losses), "selection" (val runs), "items" (per item),
    # and BESIDE_REPORT's tables
    primary: str = "exact_match/strict-match"
    protocol: dict | None = None  # report.write_report's protocol: endpoint, grids, seeds, caveat, gates

    def compute(self, store, inputs, out):
        tables = {name: report.read_csv(io.BytesIO(store.read_bytes(inputs[name]["digest"])))
                  for name in ("runs", "curves", "selection", "items", "dose") if name in inputs}
        report.write_report(tables.pop("runs"), out, self.primary, tables.get("curves"),
                            selection=tables.get("selection"), items=tables.get("items"), protocol=self.protocol,
                            dose=tables.get("dose"))
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
