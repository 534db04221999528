"""LaTen as a sweep variant through real Prefect runs: its nodes, its grid chosen on val, and the
zero-update control scoring exactly as the untrained student."""
import json

import pandas as pd
import pytest
import torch

from pkt.artifacts.store import Ref, Store
from pkt.core import laten, models
from pkt.flows.config import ConfigError, parse_config
from pkt.flows.sweep import sweep
from prefect_api import task_graph

LATEN = {"n_extract": 2, "n_align": 4, "align_per_step": 2, "grid": {"step": [1, 2], "rate": [0.2]}}


def laten_config(family, tmp_path, variants, **kw):
    return {"teacher": str(family / "teacher"), "students": [str(family / "student")],
            "tasks": [{"name": "gsm", "dir": str(family / "tasks/gsm"), "benchmark": "gsm"}],
            "variants": variants, "seeds": [0, 1], "benchmarks": ["answer_nll"], "eval_limit": 6,
            "select_on": "answer_nll", "max_length": 64, "laten": LATEN,
            "train": {"rank": 2, "alpha": 4.0, "epochs": 1, "batch_size": 8, "micro_batch": 8, "n_train": 8},
            "store": str(tmp_path / "store"), "report_dir": str(tmp_path / "report"), **kw}


@pytest.mark.slow
def test_laten_variants_in_a_sweep(prefect_env, mini_family, tmp_path):
    from test_demo import check_edges

    cfg = laten_config(mini_family, tmp_path, ["vanilla", "lora", "laten", "laten-zero", "laten-random"])
    state = sweep(cfg, return_state=True)
    out = state.result()
    store = Store(tmp_path / "store")
    kinds = [k for k, _, _ in out["nodes"]]
    # attribution: per model and sample, shared by every seed, control and setting (2 extract samples
    # x 2 models, + each seed's sample x 2 models, at most)
    assert 4 < kinds.count("laten_attribution") <= 8
    assert kinds.count("laten_translator") == 2  # one per seed: shared by laten, laten-zero, laten-random
    assert kinds.count("laten_delta") == 3 * 2 * 2  # 3 variants x 2 steps x 2 seeds
    tr = [store.record("laten_translator", key) for k, key, _ in out["nodes"] if k == "laten_translator"][0]
    tree = store.tree(Ref.of({"kind": "laten_translator", "key": tr["key"], "digest": tr["digest"]}))
    assert sorted(p.name for p in tree.glob("step_*.safetensors")) == ["step_001.safetensors", "step_002.safetensors"]
    runs = pd.read_csv(out["report"]["runs"])
    for variant in ("laten", "laten-zero", "laten-random"):
        assert runs.loc[runs["variant"] == variant, "setting"].nunique() == 1  # chosen on val
    # the zero-update control scores exactly as the untrained student, example by example
    scores = {}
    for kind, key, _ in out["nodes"]:
        rec = store.record(kind, key)
        if kind == "scores" and rec["params"]["split"] == "test":
            scores.setdefault(rec["params"]["benchmark"], []).append(rec)
    for bench, recs in scores.items():
        vanilla = [r for r in recs if set(r["inputs"]) == {"student", "data"}]
        zero = [r for r in recs if "delta" in r["inputs"]
                and store.record("laten_delta", _key_of(store, r["inputs"]["delta"]))["params"]["control"] == "zero"]
        assert len(vanilla) == 1 and zero
        v = store.tensors({"kind": "scores", "key": vanilla[0]["key"], "digest": vanilla[0]["digest"]})
        for z in zero:
            zt = store.tensors({"kind": "scores", "key": z["key"], "digest": z["digest"]})
            assert v.keys() == zt.keys() and all(torch.equal(v[k], zt[k]) for k in v), bench
    # the real update is not zero, and the random control has its norms
    deltas = {store.record("laten_delta", key)["params"]["control"]: store.tensors(
        {"kind": "laten_delta", "key": key, "digest": store.record("laten_delta", key)["digest"]})
        for k, key, _ in out["nodes"] if k == "laten_delta"}
    assert laten.delta_stats(deltas["translated"])["norm"] > 0
    check_edges(task_graph(state), cfg["variants"])


def _key_of(store, digest):
    return next(r["key"] for r in store.records() if r.get("digest") == digest and r.get("kind") == "laten_delta")


def test_laten_config_errors(mini_family, tmp_path):
    base = laten_config(mini_family, tmp_path, ["vanilla", "lora", "laten"])
    with pytest.raises(ConfigError, match="laten.grid.step"):
        parse_config({**base, "laten": {**LATEN, "grid": {"step": [3]}}})
    with pytest.raises(ConfigError, match="rates in"):
        parse_config({**base, "laten": {**LATEN, "grid": {"rate": [1.5]}}})
    with pytest.raises(ConfigError, match="modules"):
        parse_config({**base, "laten": {**LATEN, "modules": ["gate"]}})


def test_variant_names_accepted_by_transfer_and_sweep_configs(mini_family, tmp_path):
    """The names a user types: `pkt transfer --variants` and a sweep config take the three LaTen variants."""
    from pkt.flows.cli import parser, transfer_config
    from pkt.flows.sweep import selection_runs

    args = parser().parse_args(["transfer", "--teacher", str(mini_family / "teacher"), "--student",
                                str(mini_family / "student"), "--task-dir", str(mini_family / "tasks/gsm"),
                                "--variants", "vanilla,lora,laten,laten-zero,laten-random"])
    assert transfer_config(args).variants[-3:] == ["laten", "laten-zero", "laten-random"]
    cfg = parse_config(laten_config(mini_family, tmp_path, ["lora", "laten", "laten-random"],
                                    train_grid={"lr": [1e-3, 1e-2]}, variant_grid={"lora": {"alpha": [2.0, 4.0]}},
                                    selection_seeds=[100],
                                    laten={**LATEN, "grid": {"step": [1, 2], "rate": [0.1, 0.2]}}))
    settings = {}
    for v, setting, seed in selection_runs(cfg):
        settings.setdefault(v.name, []).append(json.dumps(setting, sort_keys=True))
    assert sorted(set(settings["laten"])) == sorted(json.dumps({"rate": r, "step": s}, sort_keys=True)
                                                    for s in (1, 2) for r in (0.1, 0.2))
    assert len(settings["laten"]) == 4 and len(set(settings["lora"])) == 4  # equal grids, 1 selection seed
