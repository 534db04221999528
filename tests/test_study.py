"""The study flow end to end at the smallest size (two test-size families, a few variants, 2 test
seeds, 1 selection seed, 2 settings a variant), through Prefect: the protocol holds in the store and
the report says what the data say."""
import json

import pandas as pd
import pytest

from pkt.artifacts.store import Store
from pkt.core import report
from pkt.tasks.train import ADAPTER_KINDS

VARIANTS = ["vanilla", "lora", "transfer", "spectrum-matched", "shuffled"]
TINY = {"epochs": 1, "batch_size": 16, "micro_batch": 16, "n_train": 16, "max_length": 64}


@pytest.mark.slow  # a few minutes on 2 shared cores: two families, ~200 nodes
def test_a_tiny_study_keeps_selection_apart_from_test_and_reports_over_families(prefect_env, tmp_path, monkeypatch):
    from pkt.flows import study as study_flow

    real_stats = study_flow.family_stats

    def family_1_fails_a_gate(store, ref):  # the inclusion rule: a family failing a gate is left out
        stats = real_stats(store, ref)
        if store.record("family", ref["key"])["params"]["recipe"]["seed"] == 1:
            stats["gates"]["headroom/gsm"]["passed"] = False
        return stats

    monkeypatch.setattr(study_flow, "family_stats", family_1_fails_a_gate)
    real_finish, submitted = study_flow.Sweep.finish_report, []

    def finish_report(self, *args):  # the report nodes in the graph when a family's report is first waited for
        submitted.append(sum(kind == "report" for kind in self.graph.kinds.values()))
        return real_finish(self, *args)

    monkeypatch.setattr(study_flow.Sweep, "finish_report", finish_report)
    store, out_dir = tmp_path / "store", tmp_path / "study"
    out = study_flow.study(store=str(store), report_dir=str(out_dir), family_seeds=[0, 1, 2], n_families=2,
                           seeds=[0, 1], selection_seeds=[100], lrs=[1e-2, 3e-2], scales=[1.0], alphas=[2.0],
                           family_size="test", variants=VARIANTS, train=TINY, runner="threads", workers=1, n_twins=0)
    assert set(out["families"]) == {"family-0", "family-2"}
    st = Store(store)
    # selection apart from test: the adapters scored on val are never scored on test, and vice versa
    # (a score reads an adapter or one of its checkpoints: followed to the adapter that trained it)
    trained = {st.record(kind, key)["digest"]: (kind, st.record(kind, key)) for kind, key, _ in out["nodes"]
               if kind in ADAPTER_KINDS}

    def training(digest: str) -> dict:
        kind, rec = trained[digest]
        return training(rec["inputs"]["adapter"]) if kind == "adapter_checkpoint" else rec

    seeds = {"val": set(), "test": set()}
    for kind, key, _ in out["nodes"]:
        if kind == "scores" and "adapter" in (rec := st.record("scores", key))["inputs"]:
            seeds[rec["params"]["split"]].add(training(rec["inputs"]["adapter"])["params"]["train"]["seed"])
    assert seeds == {"val": {100}, "test": {0, 1}}
    # in stages: every family's selection runs were submitted before any family's test runs (out["nodes"]
    # is in submission order), so no worker waited on one family's choice while another's could run
    splits = [st.record("scores", key)["params"]["split"] for kind, key, _ in out["nodes"] if kind == "scores"]
    assert max(i for i, s in enumerate(splits) if s == "val") < min(i for i, s in enumerate(splits) if s == "test")
    # and every family's report was submitted before the first was waited for (they run side by side)
    assert submitted == [2, 2]

    runs = report.read_csv(out_dir / "runs.csv")
    assert set(runs["family"]) == {"family-0", "family-2"}
    report.check_runs(runs)  # one run per variant, seed and family
    trained = runs[runs["variant"] != "vanilla"]
    assert trained.groupby(["family", "task", "variant"])["setting"].nunique().eq(1).all()
    assert (trained["steps"] > 0).all() and (runs["n_items"] > 0).all()

    # per-item scores: their mean is the run's value
    items = report.read_csv(out_dir / "items.csv")
    metric = json.loads((out_dir / "protocol.json").read_text())["endpoint"]["metric"]
    means = items.groupby(["family", "task", "variant", "seed"])["value"].mean()
    values = runs[runs["metric"] == metric].set_index(["family", "task", "variant", "seed"])["value"]
    assert means.to_numpy() == pytest.approx(values.loc[means.index].to_numpy())

    summary = report.read_csv(out_dir / "summary.csv")
    assert report.POOLED in set(summary["student"])
    text = (out_dir / "report.md").read_text()
    assert text.startswith("# pkt report\n\n") and "## Primary endpoint (declared in the config before the data)" in text
    assert "2 families" in text.split("## Protocol")[0] and "Scale: miniature models" in text
    assert "test set:" in text and "optimizer steps per training run:" in text
    assert "every trained variant has 2 settings" in text and "test runs use seeds [0, 1], which chose nothing" in text
    assert "power (transfer − shuffled" in text and "## What survives correction" in text
    assert "1 candidate family was left out: family-1 (headroom/gsm)" in text
    assert not (out_dir / "family-1").exists()
    for fam in ("family-0", "family-2"):  # every included family's report too
        assert (out_dir / fam / "report.md").read_text().startswith("# pkt report")
    assert {p.name for p in out_dir.iterdir()} >= {"report.md", "report.png", "curves.png", "items.csv",
                                                   "selection.csv", "protocol.json"}
    sel = pd.read_csv(out_dir / "selection.csv")
    assert set(sel["seed"]) == {100} and sel.groupby(["family", "task", "variant"])["setting"].nunique().eq(2).all()
