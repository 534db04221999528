"""Nothing lost, nothing half-written: SIGKILL mid-write, two processes on one node, pickles refused."""
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from pkt.artifacts.store import Store
from pkt.core import models

WRITER = textwrap.dedent("""
    import sys, time, torch, safetensors.torch as st
    from pkt.artifacts.store import Store
    real = st.save_file
    def slow_save(tensors, path, metadata=None):
        real(tensors, path, metadata=metadata)
        print("WRITING", flush=True)
        time.sleep(60)  # killed here: the blob is written but not yet published
    import pkt.artifacts.store as s
    s.save_file = slow_save
    store = Store(sys.argv[1])
    key = store.key("sensitivity", {}, {})
    store.put_tensors("sensitivity", key, {"x": torch.ones(1000)}, params={}, inputs={})
""")


def test_sigkill_mid_write_leaves_nothing_valid(tmp_path):
    root = tmp_path / "store"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(root)], stdout=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.stdout.readline().strip() == "WRITING"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    store = Store(root)
    key = store.key("sensitivity", {}, {})
    assert store.lookup("sensitivity", key) is None and store.records() == []
    assert list((root / "tmp").iterdir())  # the half-finished temp file is there...
    store.put_tensors("sensitivity", key, {"x": torch.ones(1000)}, params={}, inputs={})  # ...the next run recomputes
    assert store.lookup("sensitivity", key) is not None and store.verify() == []


COMPUTE_ONCE = textwrap.dedent("""
    import sys, time, torch
    from pkt.artifacts.store import Store
    store = Store(sys.argv[1])
    key = store.key("extraction", {"n": 1}, {})
    with store.lock("extraction", key):
        if store.lookup("extraction", key) is None:
            time.sleep(1.0)  # a slow computation; the other process waits on the lock
            store.put_tensors("extraction", key, {"x": torch.ones(3)}, params={"n": 1}, inputs={})
            print("computed", flush=True)
        else:
            print("reused", flush=True)
""")


def test_two_processes_compute_one_node_once(tmp_path):
    root = str(tmp_path / "store")
    cwd = os.path.dirname(os.path.dirname(__file__))
    procs = [subprocess.Popen([sys.executable, "-c", COMPUTE_ONCE, root], stdout=subprocess.PIPE, text=True, cwd=cwd)
             for _ in range(2)]
    outs = sorted(p.communicate(timeout=120)[0].strip() for p in procs)
    assert all(p.returncode == 0 for p in procs)
    assert outs == ["computed", "reused"]
    store = Store(root)
    assert len(store.records()) == 1 and store.verify() == []


def test_pickled_checkpoints_are_refused_without_flag(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (d / "pytorch_model.bin").write_bytes(b"not really")
    with pytest.raises(ValueError, match="no \\*.safetensors.*--allow-bin"):
        models.load_model(d)


def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(models.ModelNotFound, match="does not exist"):
        models.load_model(str(tmp_path / "nowhere"))


SWEEP = textwrap.dedent("""
    import json, os, sys
    from pkt.core import sensitivity, finetune
    log = sys.argv[2]
    def counting(name, fn):
        def wrapper(*a, **kw):
            with open(log, "a") as f:
                f.write(name + "\\n")
            return fn(*a, **kw)
        return wrapper
    sensitivity.compute_sensitivity = counting("sensitivity", sensitivity.compute_sensitivity)
    finetune.finetune = counting("finetune", finetune.finetune)
    from pkt.flows.sweep import sweep
    out = sweep(json.loads(sys.argv[1]))
    print("RESULT", out["computed"], len(out["nodes"]))
""")


def test_two_sweeps_at_once_on_one_store(mini_family, tmp_path):
    """Two real processes (each with its own Prefect) run the same sweep on one store: both succeed,
    every node is computed once, and the store verifies."""
    config = {"teacher": str(mini_family / "teacher"), "students": [str(mini_family / "student")],
              "tasks": [{"name": "gsm", "dir": str(mini_family / "tasks/gsm"), "benchmark": "gsm"}],
              "variants": ["lora", "transfer"], "seeds": [0], "benchmarks": [], "eval_limit": 4,
              "train": {"rank": 2, "alpha": 2.0, "epochs": 1, "batch_size": 8, "micro_batch": 8, "n_train": 8},
              "store": str(tmp_path / "store")}
    log = tmp_path / "calls.log"
    cwd = os.path.dirname(os.path.dirname(__file__))
    procs = []
    for i in range(2):
        env = {**os.environ, "PREFECT_HOME": str(tmp_path / f"prefect{i}"), "PREFECT_API_URL": "",
               "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
               "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(tmp_path / f"results{i}")}
        cfg = dict(config, report_dir=str(tmp_path / f"report{i}"))
        procs.append(subprocess.Popen([sys.executable, "-c", SWEEP, json.dumps(cfg), str(log)], cwd=cwd, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        assert "RESULT" in out
    calls = log.read_text().split()
    assert calls.count("sensitivity") == 1 and calls.count("finetune") == 2  # lora + transfer, once each
    store = Store(tmp_path / "store")
    assert store.verify() == []
    assert len({(r["kind"], r["key"]) for r in store.records()}) == len(store.records())


BUILD_CHAIN = textwrap.dedent("""
    import sys
    import pandas as pd
    from pkt.artifacts.store import Store
    from pkt.core import arch, finetune, models
    from pkt.tasks import extract as extract_nodes
    from pkt.tasks import scores as score_nodes
    from pkt.tasks import sources
    from pkt.tasks import train as train_nodes
    from pkt.tasks.node import build
    import torch
    fam, store = sys.argv[1], Store(sys.argv[2])
    teacher, student = sources.model_source(fam + "/teacher", store), sources.model_source(fam + "/student", store)
    shape = arch.shape_of(models.load_config(fam + "/student"))
    sens = build(extract_nodes.Sensitivity(max_length=64), {"teacher": teacher,
                 "seeds": sources.file_source(fam + "/tasks/gsm/seeds.jsonl")}, store)
    plan = build(extract_nodes.LayerPlan(student_layers=shape["num_hidden_layers"]), {"sensitivity": sens}, store)
    ext = build(extract_nodes.Extraction(student_shape=shape), {"teacher": teacher, "sensitivity": sens, "plan": plan},
                store)
    init = build(extract_nodes.LoraInit(rank=2, alpha=2.0), {"extraction": ext}, store)
    torch.rand(int(sys.argv[3]))  # what else this process drew before: a worker that ran other nodes
    tp = finetune.TrainParams(rank=2, alpha=2.0, epochs=1, batch_size=4, micro_batch=4, n_train=8, max_length=64)
    train = sources.file_source(fam + "/tasks/gsm/train.jsonl")
    build(train_nodes.Adapter(variant="lora", init="lora", train=tp.as_dict()), {"student": student, "train": train},
          store)
    build(train_nodes.Adapter(variant="transfer", init="extracted", train=tp.as_dict()),
          {"student": student, "train": train, "init": init}, store)
    runs = pd.DataFrame([{"student": "s", "task": "gsm", "benchmark": "gsm", "metric": "exact_match/strict-match",
                          "variant": v, "seed": s, "setting": "{}", "value": 0.1 * s + (v == "transfer") * 0.05,
                          "top_sv": None} for v in ("lora", "transfer") for s in range(3)])
    build(score_nodes.Report(primary="exact_match/strict-match"),
          {"runs": score_nodes.table_source(store, runs, "runs.csv"), "scores": []}, store)
""")


def test_every_node_has_the_same_bytes_when_built_in_another_process(mini_family, tmp_path):
    """Safetensors metadata, adapter_config.json's module sets, peft's random lora_A, the report: two
    interpreters with different string hash seeds, and different random draws made before, build
    the same nodes, byte for byte."""
    cwd = os.path.dirname(os.path.dirname(__file__))
    stores = [Store(tmp_path / f"store{seed}") for seed in ("1", "2")]
    procs = [subprocess.Popen([sys.executable, "-c", BUILD_CHAIN, str(mini_family), str(store.root), draws], cwd=cwd,
                              env={**os.environ, "PYTHONHASHSEED": seed}, stderr=subprocess.PIPE, text=True)
             for seed, draws, store in zip(("1", "2"), ("0", "1000"), stores)]
    for p in procs:
        err = p.communicate(timeout=300)[1]
        assert p.returncode == 0, err[-3000:]
    recs = [{(r["kind"], r["key"]): r["digest"] for r in s.records()} for s in stores]
    kinds = {kind for kind, _ in recs[0]}
    assert kinds == {"sensitivity", "layer_plan", "extraction", "lora_init", "adapter", "table", "report"}
    assert recs[0] == recs[1]
    blobs = [{p.name: p.read_bytes() for p in s.root.glob("blobs/sha256/*/*")} for s in stores]
    assert blobs[0] == blobs[1]
