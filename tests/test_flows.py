"""Real Prefect runs (test harness): caching, sharing, invalidation and corruption recovery."""
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from flows.pipeline import extract_teacher, sweep
from pkt_core import align, sensitivity


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
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [flow_state.state_details.flow_run_id]}))
    return {r.name: r.state.name for r in runs}


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


def test_two_students_of_one_shape_share_teacher_work(prefect_env, mini_family, tmp_path, calls):
    twin = twin_student(mini_family / "student", tmp_path / "student-chat")
    out = extract_teacher(teacher=str(mini_family / "teacher"), seeds=str(mini_family / "tasks/gsm/seeds.jsonl"),
                          students=[str(mini_family / "student"), str(twin)], rank=2, alpha=2.0,
                          store=str(tmp_path / "store"))
    assert calls == {"sensitivity": 1, "extract": 1}
    kinds = [k for k, _, _ in out["_ledger"]]
    assert kinds.count("sensitivity") == kinds.count("extraction") == kinds.count("lora_init") == 1


def test_corrupt_blob_is_reported_and_recomputed(prefect_env, mini_family, tmp_path, calls, caplog):
    from artifacts.store import Store

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
    task_dir = tmp_path / "gsm"
    shutil.copytree(mini_family / "tasks/gsm", task_dir)
    config = {"teacher": str(mini_family / "teacher"), "students": [str(mini_family / "student")],
              "tasks": [{"name": "gsm", "dir": str(task_dir), "benchmark": "gsm"}],
              "variants": ["lora", "transfer"], "seeds": [0], "benchmarks": [], "eval_limit": 4,
              "train": {"rank": 2, "alpha": 2.0, "epochs": 1, "batch_size": 8, "micro_batch": 8, "n_train": 8},
              "store": str(tmp_path / "store"), "report_dir": str(tmp_path / "report")}
    first = sweep(config)
    assert first["computed"] == len(first["nodes"])
    lines = (task_dir / "seeds.jsonl").read_text().splitlines()
    (task_dir / "seeds.jsonl").write_text("\n".join(lines[1:]) + "\n")  # drop one seed sample
    second = sweep(config)
    status = {}
    for kind, key, s in second["nodes"]:
        status.setdefault(kind, set()).add(s)
    # the teacher chain and everything trained from it is new; the lora baseline is untouched
    assert status["sensitivity"] == status["layer_plan"] == status["extraction"] == status["lora_init"] == {"computed"}
    assert status["adapter"] == {"computed", "reused"} and "reused" in status["scores"]
    # sensitivity, plan, extraction, init, adapter (+ its score, unless the retrained adapter's bytes
    # came out identical: scores are keyed by the adapter's content digest)
    assert second["computed"] in (5, 6)
