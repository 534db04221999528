"""Real Prefect runs (test harness): caching, sharing, invalidation and corruption recovery."""
import json
import os
import shutil

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from pkt.flows.extract import extract_teacher
from pkt.flows.sweep import sweep
from pkt.core import align, sensitivity
from prefect_api import task_graph


@pytest.fixture
def calls(monkeypatch):
    """Count calls into pkt_core's expensive functions."""
    counts = {"sensitivity": 0, "extract": 0}

    def counting(name, fn):
        def wrapper(*a, **kw):
            counts[name] += 1
            return fn(*a, **kw)
        return wrapper

    monkeypatch.setattr(sensitivity, "compute_sensitivity", counting("sensitivity", sensitivity.compute_sensitivity))
    monkeypatch.setattr(align, "extract", counting("extract", align.extract))
    return counts


def task_states(flow_state):
    """State of every node task run (sources, which only name their input's digest, left out)."""
    return {name: state for name, (state, _) in task_graph(flow_state).items()
            if not name.startswith(("model[", "file[", "dir["))}


def twin_student(src, dst, seed=5):
    """Same shape, different weights (a 'chat' variant of the base student)."""
    shutil.copytree(src, dst)
    w = load_file(str(dst / "model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    save_file({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in w.items()}, str(dst / "model.safetensors"),
              metadata={"format": "pt"})
    return dst


def test_repeated_extract_computes_nothing_and_shows_cached(prefect_env, mini_family, tmp_path, calls):
    args = dict(teacher=str(mini_family / "teacher"), seeds=str(mini_family / "tasks/gsm/seeds.jsonl"),
                students=[str(mini_family / "student")], rank=2, alpha=2.0, store=str(tmp_path / "store"))
    first = extract_teacher(**args)
    assert calls == {"sensitivity": 1, "extract": 1}
    assert {s for _, _, s in first["_ledger"]} == {"computed"}
    state = extract_teacher(**args, return_state=True)
    assert calls == {"sensitivity": 1, "extract": 1}
    assert set(task_states(state).values()) == {"Cached"}, task_states(state)
    out = state.result()
    assert {s for _, _, s in out["_ledger"]} == {"reused"}
    assert os.path.exists(os.path.join(out[args["students"][0]]["init_path"], "adapter_config.json"))


def test_a_second_store_never_gets_refs_from_the_first(prefect_env, mini_family, tmp_path):
    """Prefect's cache is shared by every store on the machine: a node that another store holds
    under the same key but other bytes must come back with *this* store's digest."""
    from pkt.artifacts.store import Store

    args = dict(teacher=str(mini_family / "teacher"), seeds=str(mini_family / "tasks/gsm/seeds.jsonl"),
                students=[str(mini_family / "student")], rank=2, alpha=2.0)
    first = extract_teacher(**args, store=str(tmp_path / "a"))[args["students"][0]]
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    b = Store(tmp_path / "b")
    plan = first["plan"]  # rebuild b's plan: same key, same layers, other bytes (one more header field)
    rebuilt = b.put_tensors("layer_plan", plan["key"], b.tensors(plan), params=b.record("layer_plan", plan["key"])["params"],
                            inputs={}, metadata={**b.header(plan), "rebuilt": "yes"})
    b.gc()  # a's plan bytes are gone from b
    out = extract_teacher(**args, store=str(tmp_path / "b"))[args["students"][0]]
    assert out["plan"]["digest"] == rebuilt.digest != plan["digest"]


def test_two_students_of_one_shape_share_teacher_work(prefect_env, mini_family, tmp_path, calls):
    twin = twin_student(mini_family / "student", tmp_path / "student-chat")
    out = extract_teacher(teacher=str(mini_family / "teacher"), seeds=str(mini_family / "tasks/gsm/seeds.jsonl"),
                          students=[str(mini_family / "student"), str(twin)], rank=2, alpha=2.0,
                          store=str(tmp_path / "store"))
    assert calls == {"sensitivity": 1, "extract": 1}
    kinds = [k for k, _, _ in out["_ledger"]]
    assert kinds.count("sensitivity") == kinds.count("extraction") == kinds.count("lora_init") == 1


def test_corrupt_blob_is_reported_and_recomputed(prefect_env, mini_family, tmp_path, calls, caplog):
    from pkt.artifacts.store import Store

    args = dict(teacher=str(mini_family / "teacher"), seeds=str(mini_family / "tasks/gsm/seeds.jsonl"),
                students=[str(mini_family / "student")], rank=2, alpha=2.0, store=str(tmp_path / "store"))
    out = extract_teacher(**args)
    store = Store(tmp_path / "store")
    ext = store.record("extraction", next(k for kind, k, _ in out["_ledger"] if kind == "extraction"))
    blob = store.blob_path(ext["digest"])
    os.chmod(blob, 0o644)
    with open(blob, "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\xff\xff\xff\xff")
    again = extract_teacher(**args)
    status = {kind: s for kind, _, s in again["_ledger"]}
    assert status["extraction"] == "computed" and status["sensitivity"] == "reused"
    assert calls == {"sensitivity": 1, "extract": 2}
    assert "does not match its digest" in caplog.text
    assert store.verify() == []


def test_changing_seeds_recomputes_only_downstream(prefect_env, mini_family, tmp_path):
    from pkt.artifacts.store import Store

    task_dir = tmp_path / "gsm"
    shutil.copytree(mini_family / "tasks/gsm", task_dir)
    config = {"teacher": str(mini_family / "teacher"), "students": [str(mini_family / "student")],
              "tasks": [{"name": "gsm", "dir": str(task_dir), "benchmark": "gsm"}],
              "variants": ["lora", "transfer"], "seeds": [0], "benchmarks": [], "eval_limit": 4,
              "train": {"rank": 2, "alpha": 2.0, "epochs": 1, "batch_size": 8, "micro_batch": 8, "n_train": 8},
              "store": str(tmp_path / "store"), "report_dir": str(tmp_path / "report")}
    first = sweep(config)
    assert first["computed"] == len(first["nodes"])
    shutil.copy(mini_family / "tasks/sni/seeds.jsonl", task_dir / "seeds.jsonl")  # other seed samples
    second = sweep(config)
    by_kind = {}
    for kind, key, s in second["nodes"]:
        by_kind.setdefault(kind, []).append((key, s))
    # the teacher chain depends on the seeds: all new
    for kind in ("sensitivity", "layer_plan", "extraction", "lora_init"):
        assert [s for _, s in by_kind[kind]] == ["computed"], kind
    # nothing else is recomputed except what trains from a changed init: the lora baseline is reused
    first_keys = {key for _, key, _ in first["nodes"]}
    reused = [(k, key) for k, key, s in second["nodes"] if s == "reused"]
    assert all(key in first_keys for _, key in reused)
    assert [k for k, _ in reused].count("adapter") >= 1 and [k for k, _ in reused].count("scores") >= 1
    store = Store(tmp_path / "store")
    init_digests = [store.record("lora_init", key)["digest"] for kind, key, _ in first["nodes"] + second["nodes"]
                    if kind == "lora_init"]
    transfer_adapter_recomputed = sum(s == "computed" for _, s in by_kind["adapter"]) == 1
    assert transfer_adapter_recomputed == (init_digests[0] != init_digests[1])


def test_a_crashed_sweep_resumes_where_it_stopped(prefect_env, mini_family, tmp_path, monkeypatch):
    from pkt.artifacts.store import Store
    from pkt.core import finetune

    config = {"teacher": str(mini_family / "teacher"), "students": [str(mini_family / "student")],
              "tasks": [{"name": "gsm", "dir": str(mini_family / "tasks/gsm"), "benchmark": "gsm"}],
              "variants": ["lora", "transfer"], "seeds": [0, 1], "benchmarks": [], "eval_limit": 4,
              "train": {"rank": 2, "alpha": 2.0, "epochs": 1, "batch_size": 8, "micro_batch": 8, "n_train": 8},
              "store": str(tmp_path / "store"), "report_dir": str(tmp_path / "report")}
    real, calls = finetune.finetune, []

    def crash_on_third(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated crash mid-sweep")
        return real(*a, **kw)

    monkeypatch.setattr(finetune, "finetune", crash_on_third)
    with pytest.raises(RuntimeError, match="simulated crash"):
        sweep(config)
    finished = len(Store(tmp_path / "store").records())
    monkeypatch.setattr(finetune, "finetune", real)
    resumed = sweep(config)
    total = len(resumed["nodes"])
    assert 0 < finished < total
    assert resumed["computed"] == total - finished  # only the unfinished nodes ran


def test_per_layer_sensitivity_gives_the_same_extraction(prefect_env, mini_family, tmp_path):
    from pkt.artifacts.store import Ref, Store

    args = dict(teacher=str(mini_family / "teacher"), seeds=str(mini_family / "tasks/gsm/seeds.jsonl"),
                students=[str(mini_family / "student")], rank=2, alpha=2.0, store=str(tmp_path / "store"))
    single = extract_teacher(**args)
    # the layout is how a map is stored, not what it is: same key, so a second store shows it
    layered = extract_teacher(**{**args, "store": str(tmp_path / "layered")}, sensitivity_layout="per_layer")
    assert layered["_ledger"][0][:2] == single["_ledger"][0][:2] and single["_ledger"][0][0] == "sensitivity"
    store = Store(tmp_path / "layered")
    key = lambda out, kind: next(k for kd, k, _ in out["_ledger"] if kd == kind)
    sens_tree = store.tree(Ref.of(store.record("sensitivity", key(layered, "sensitivity"))))
    depth = json.loads((mini_family / "teacher" / "config.json").read_text())["num_hidden_layers"]
    assert sorted(p.name for p in sens_tree.glob("*.safetensors")) == sorted(
        ["global.safetensors"] + [f"layer.{i}.safetensors" for i in range(depth)])
    s = args["students"][0]
    assert single[s]["layers"] == layered[s]["layers"]
    first = Store(tmp_path / "store")
    a = first.tensors(first.record("extraction", key(single, "extraction")))
    b = store.tensors(store.record("extraction", key(layered, "extraction")))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sweep_scores_instruction_following_with_a_judge(prefect_env, mini_family, tmp_path):
    config = {"teacher": str(mini_family / "teacher"), "students": [str(mini_family / "student")],
              "tasks": [{"name": "sni", "dir": str(mini_family / "tasks/sni"), "benchmark": "sni"}],
              "variants": ["vanilla"], "benchmarks": ["winrate"], "judge": str(mini_family / "teacher"),
              "eval_limit": 3, "store": str(tmp_path / "store"), "report_dir": str(tmp_path / "report")}
    out = sweep(config)
    metrics = {r["metric"] for r in out["table"]}
    assert {"exact_match", "rougeL", "winrate"} <= metrics
    assert [k for k, _, _ in out["nodes"]].count("scores") == 2


def _forged_result(marker) -> bytes:
    """A Prefect result record whose pickled payload, if ever deserialized, creates `marker`."""
    import base64
    import json
    import pickle

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    data = base64.b64encode(pickle.dumps(Payload())).decode()
    return json.dumps({"metadata": {"storage_key": "x", "expiration": None, "serializer": {"type": "pickle"},
                                    "prefect_version": "3.9.1", "storage_block_id": None}, "result": data}).encode()


def test_no_prefect_result_file_is_written_or_read(prefect_env, mini_family, tmp_path):
    """The store is the only cache: pkt's tasks keep no Prefect result files, so a file planted in the
    results directory (here a pickle that would run code) is never deserialized."""
    from pkt.artifacts.store import Store
    from pkt.flows.graph import source_task
    from pkt.tasks.node import node_task, run_node
    from pkt.tasks.sources import source

    for t in (run_node, source, node_task("adapter"), source_task("model")):  # the per-kind tasks too
        assert t.persist_result is False and t.cache_policy.__class__.__name__ == "_None"
    results = prefect_env / "results"
    results.mkdir(exist_ok=True)
    before = set(results.rglob("*"))
    args = dict(teacher=str(mini_family / "teacher"), seeds=str(mini_family / "tasks/gsm/seeds.jsonl"),
                students=[str(mini_family / "student")], rank=2, alpha=2.0, store=str(tmp_path / "store"))
    out = extract_teacher(**args)
    assert set(results.rglob("*")) == before
    # plant a forged record under every name a cache of these nodes could use: key, kind-key, and
    # the names pkt used before (pkt-<kind>-<key>-<store>)
    store_tag = __import__("hashlib").sha256(str(Store(args["store"]).root.resolve()).encode()).hexdigest()[:12]
    marker = tmp_path / "pwned"
    for kind, key, _ in out["_ledger"]:
        for name in (key, f"{kind}-{key}", f"pkt-{kind}-{key}-{store_tag}"):
            (results / name).write_bytes(_forged_result(marker))
    again = extract_teacher(**args)
    assert {s for _, _, s in again["_ledger"]} == {"reused"}
    assert not marker.exists()


@pytest.mark.slow  # about 4 min on 2 shared cores: a grid sweep of 8 variants x (2 selection + 2 test seeds)
def test_controls_are_drawn_per_training_seed_and_settings_chosen_on_val(prefect_env, mini_family, tmp_path):
    """Each control's random draw comes from the training seed (recorded in its node), so seeds draw
    differently; vanilla is one run (n=1); a grid (of equal size for every variant) is trained on the
    selection seeds and scored on val, and each variant's chosen setting is trained on fresh test
    seeds and scored on test; the report has training curves."""
    from pkt.artifacts.store import Store
    from pkt.core import report

    controls = ["spectrum-matched", "shuffled", "random-submatrix", "random-layers", "untrained-teacher"]
    config = {"teacher": str(mini_family / "teacher"), "students": [str(mini_family / "student")],
              "tasks": [{"name": "gsm", "dir": str(mini_family / "tasks/gsm"), "benchmark": "gsm"}],
              "variants": ["vanilla", "lora", "transfer", *controls], "seeds": [0, 1], "selection_seeds": [10, 11],
              "benchmarks": [], "eval_limit": 4, "train_grid": {"lr": [1e-2, 1e-3], "init_scale": [1.0, 2.0]},
              "variant_grid": {"lora": {"alpha": [2.0, 8.0]}}, "select_on": "answer_nll",
              "train": {"rank": 2, "alpha": 4.0, "epochs": 1, "batch_size": 8, "micro_batch": 8, "n_train": 8},
              "store": str(tmp_path / "store"), "report_dir": str(tmp_path / "report")}
    out = sweep(config)
    store = Store(tmp_path / "store")
    adapters = {store.record("adapter", key)["digest"]: store.record("adapter", key)
                for kind, key, _ in out["nodes"] if kind == "adapter"}
    inits = {}
    for a in adapters.values():
        if "init" in a["inputs"]:
            tp = a["params"]["train"]
            inits.setdefault(a["params"]["variant"], {}).setdefault(tp["seed"], set()).add(a["inputs"]["init"])
    for variant in controls:
        by_seed = inits[variant]
        assert by_seed[0].isdisjoint(by_seed[1]), variant  # other seed, other draw
    drawn = {kind: [store.record(kind, key)["params"] for k, key, _ in out["nodes"] if k == kind]
             for kind in ("random_model", "lora_init", "layer_plan", "extraction")}
    assert sorted(p["seed"] for p in drawn["random_model"]) == [0, 1, 10, 11]
    assert {p["transform_seed"] for p in drawn["lora_init"] if p["transform"] != "none"} == {0, 1, 10, 11}
    assert {p["seed"] for p in drawn["layer_plan"] if p["selector"] == "random"} == {0, 1, 10, 11}
    assert {p["seed"] for p in drawn["extraction"] if p["reducer"] == "random"} == {0, 1, 10, 11}

    # selection apart from test: what was scored on val was trained on the selection seeds only
    split_seeds = {"val": set(), "test": set()}
    for kind, key, _ in out["nodes"]:
        rec = store.record(kind, key) if kind == "scores" else None
        if rec and "adapter" in rec["inputs"]:
            split_seeds[rec["params"]["split"]].add(adapters[rec["inputs"]["adapter"]]["params"]["train"]["seed"])
    assert split_seeds == {"val": {10, 11}, "test": {0, 1}}

    table = pd.DataFrame(out["table"])
    assert table.loc[table["variant"] == "vanilla", "n"].eq(1).all()
    runs = report.read_csv(out["report"]["runs"])
    assert not runs["variant"].str.contains("@").any()  # no X@transfer-setting rows
    for variant, g in runs.groupby("variant"):
        assert g["setting"].nunique() == 1, variant  # one chosen setting per variant on test
    selection = report.read_csv(out["report"]["selection"])
    assert selection.groupby("variant")["setting"].nunique().eq(4).all()  # equal grids: 4 settings each
    assert {"curves", "curves_chart"} <= set(out["report"])
    assert set(report.read_csv(out["report"]["curves"])["variant"]) >= {"lora", "transfer"}
