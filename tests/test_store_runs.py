"""The store's promises through real Prefect runs (issue 14): a repaired blob is served, not the
edited copy; gc at any moment loses nothing; a model's tokenizer is part of its identity; a
repaired node recomputes alone; a complete read-only store answers a run."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading

import pandas as pd
import pytest

from pkt.artifacts.store import CorruptBlob, Store
from pkt.flows.demo import demo
from pkt.flows.extract import extract_teacher
from pkt.flows.sweep import sweep

REPO = os.path.dirname(os.path.dirname(__file__))


def small_sweep(family, tmp_path, variants=("lora",), **over):
    return {"teacher": str(family / "teacher"), "students": [str(family / "student")],
            "tasks": [{"name": "gsm", "dir": str(family / "tasks/gsm"), "benchmark": "gsm"}],
            "variants": list(variants), "seeds": [0], "benchmarks": [], "eval_limit": 4,
            "train": {"rank": 2, "alpha": 2.0, "epochs": 1, "batch_size": 8, "micro_batch": 8, "n_train": 8},
            "store": str(tmp_path / "store"), "report_dir": str(tmp_path / "report"), **over}


def extract_args(family, tmp_path, teacher=None):
    return dict(teacher=str(teacher or family / "teacher"), seeds=str(family / "tasks/gsm/seeds.jsonl"),
                students=[str(family / "student")], rank=2, alpha=2.0, store=str(tmp_path / "store"))


def statuses(out, key="_ledger"):
    return {kind: status for kind, _, status in out[key]}


def test_an_edited_report_blob_is_recomputed_and_its_tree_rebuilt(prefect_env, mini_family, tmp_path):
    """Case 1 as filed: an in-place byte change to the report's blob; the next run recomputes it
    and writes the true report, and verify agrees with the truth at every step."""
    config = small_sweep(mini_family, tmp_path)
    sweep(config)
    report_md = tmp_path / "report" / "report.md"
    truth = report_md.read_text()
    store = Store(tmp_path / "store")
    rec = next(r for r in store.records() if r["kind"] == "report")
    blob = store.blob_path(store.manifest(rec)["report.md"])
    os.chmod(blob, 0o644)
    forged = truth.replace("lora", "LORA", 1)
    blob.write_text(forged)  # in place: the tree's hard link shows the forgery too
    assert forged != truth and (store.root / "trees" / rec["digest"] / "report.md").read_text() == forged
    with pytest.raises(CorruptBlob):
        Store(store.root).tree(rec)  # never served
    assert any("does not match its digest" in p for p in Store(store.root).verify())
    again = sweep(config)
    assert ("report", "computed") in {(k, s) for k, _, s in again["nodes"]}
    assert report_md.read_text() == truth
    assert Store(store.root).verify() == []


def gc_in_a_loop(root):
    """Store.gc() over and over in a thread until stopped; returns (stop, thread, rounds, errors)."""
    stop, rounds, errors = threading.Event(), [0], []

    def loop():
        while not stop.is_set():
            try:
                if os.path.isdir(os.path.join(root, "keys")):
                    Store(root).gc()
                    rounds[0] += 1
            except Exception as e:  # noqa: BLE001 - asserted empty by the test
                errors.append(e)
                return
    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return stop, thread, rounds, errors


def test_gc_in_a_tight_loop_during_a_run_loses_nothing(prefect_env, mini_family, tmp_path):
    """Case 2: gc runs back to back while a sweep (extraction chain, two trainings, scores, report)
    writes; the run succeeds, the store verifies, and a rerun finds every node."""
    config = small_sweep(mini_family, tmp_path, variants=("lora", "transfer"))
    stop, thread, rounds, errors = gc_in_a_loop(config["store"])
    try:
        first = sweep(config)
    finally:
        stop.set()
        thread.join()
    assert errors == [] and rounds[0] > 5
    assert first["computed"] == len(first["nodes"])
    assert Store(config["store"]).verify() == []
    assert sweep(config)["computed"] == 0


@pytest.mark.slow
def test_gc_in_a_tight_loop_during_the_test_demo_loses_nothing(prefect_env, tmp_path):
    """Case 2 as filed: `pkt demo --size test` with Store.gc() running back to back."""
    store = tmp_path / "store"
    store.mkdir()
    (store / "keys").mkdir()
    stop, thread, rounds, errors = gc_in_a_loop(str(store))
    try:
        first = demo(size="test", seeds=[0], store=str(store), report_dir=str(tmp_path / "report"))
    finally:
        stop.set()
        thread.join()
    assert errors == [] and rounds[0] > 5
    assert Store(store).verify() == []
    second = demo(size="test", seeds=[0], store=str(store), report_dir=str(tmp_path / "report"))
    assert second["computed"] == 0
    pd.testing.assert_frame_equal(pd.DataFrame(second["table"]), pd.DataFrame(first["table"]))


def test_a_permuted_tokenizer_reuses_no_extraction_node(prefect_env, mini_family, tmp_path):
    """Case 3 as filed: a teacher dir with the same weights and a permuted tokenizer."""
    from test_model_id import permute_vocab

    extract_teacher(**extract_args(mini_family, tmp_path))
    permuted = shutil.copytree(mini_family / "teacher", tmp_path / "teacher-permuted")
    permute_vocab(permuted)
    out = extract_teacher(**extract_args(mini_family, tmp_path, teacher=permuted))
    assert statuses(out) == {"sensitivity": "computed", "layer_plan": "computed", "extraction": "computed",
                             "lora_init": "computed", "residual_model": "computed"}


def test_a_repaired_node_recomputes_alone(prefect_env, mini_family, tmp_path):
    """Case 4 as filed: one flipped bit in the sensitivity blob recomputes that node only (same
    bytes, so every key downstream is unchanged); a deleted layer_plan record recomputes it alone."""
    args = extract_args(mini_family, tmp_path)
    first = extract_teacher(**args)
    store = Store(args["store"])
    keys = {kind: key for kind, key, _ in first["_ledger"]}
    sens = store.record("sensitivity", keys["sensitivity"])
    blob = store.blob_path(sens["digest"])
    os.chmod(blob, 0o644)
    data = bytearray(blob.read_bytes())
    data[-5] ^= 0x01
    blob.write_bytes(bytes(data))
    again = extract_teacher(**args)
    assert statuses(again) == {"sensitivity": "computed", "layer_plan": "reused", "extraction": "reused",
                               "lora_init": "reused", "residual_model": "reused"}
    assert Store(args["store"]).record("sensitivity", keys["sensitivity"])["digest"] == sens["digest"]
    store.record_path("layer_plan", keys["layer_plan"]).unlink()
    third = extract_teacher(**args)
    assert statuses(third) == {"sensitivity": "reused", "layer_plan": "computed", "extraction": "reused",
                               "lora_init": "reused", "residual_model": "reused"}
    assert {k for _, k, _ in third["_ledger"]} == set(keys.values())
    assert len(Store(args["store"]).records()) == 5 and Store(args["store"]).verify() == []


READ_ONLY_RUN = textwrap.dedent("""
    import json, sys
    from pkt.flows.cli import main
    store, config, prefix, extract = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
    try:
        open(store + "/probe", "w")
        sys.exit("the store is writable: the test would prove nothing")
    except OSError:
        pass
    for cmd in (["ls"], ["verify"], ["show", prefix], ["gc", "--dry-run"]):
        assert main(["store", *cmd, "--store", store]) == 0, cmd
    from pkt.flows.sweep import sweep
    out = sweep(config)
    print("COMPUTED", out["computed"], len(out["nodes"]), flush=True)
    print("EXTRACT", main(extract), flush=True)
""")


def read_only_command(store: str) -> list[str] | None:
    """A command prefix that runs with `store` mounted read-only (even for root), or None."""
    probe = ["unshare", "-rm", "sh", "-c", f"mount --bind -o ro {store} {store} && ! touch {store}/x 2>/dev/null"]
    if shutil.which("unshare") and subprocess.run(probe, capture_output=True).returncode == 0:
        return ["unshare", "-rm", "sh", "-c", f'mount --bind -o ro {store} {store} && exec "$@"', "sh"]
    if os.geteuid() != 0:  # an ordinary user: permissions are enough
        subprocess.run(["chmod", "-R", "a-w", store], check=True)
        return []
    return None


def test_a_complete_read_only_store_answers_a_run(prefect_env, mini_family, tmp_path):
    """Case 6: ls, show, verify and a run whose nodes are all present work on a read-only store
    (one tree removed beforehand is built outside it); a node it lacks is one clear error."""
    from prefect.settings import PREFECT_API_URL

    config = small_sweep(mini_family, tmp_path)
    sweep(config)
    store = Store(config["store"])
    report = next(r for r in store.records() if r["kind"] == "report")
    shutil.rmtree(store.root / "trees" / report["digest"])
    before = sorted(str(p) for p in store.root.rglob("*"))
    prefix = read_only_command(str(store.root))
    if prefix is None:
        pytest.skip("root without unshare: no way to make the store read-only here")
    extract = ["extract", "--teacher", config["teacher"], "--student", config["students"][0], "--seeds",
               f"{mini_family}/tasks/gsm/seeds.jsonl", "--rank", "3", "--store", config["store"]]
    ro_config = {**config, "report_dir": str(tmp_path / "report-ro")}
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(),
           "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(tmp_path / "results-ro")}
    done = subprocess.run(prefix + [sys.executable, "-c", READ_ONLY_RUN, config["store"], json.dumps(ro_config),
                                    report["key"][:12], json.dumps(extract)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    subprocess.run(["chmod", "-R", "u+w", config["store"]])
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    computed, total = (int(x) for x in done.stdout.split("COMPUTED ")[1].split()[:2])
    assert computed == 0 and total > 0
    assert "EXTRACT 2" in done.stdout
    assert "is not in the store and must be computed" in done.stderr and "not writable" in done.stderr
    assert (tmp_path / "report-ro" / "report.md").read_text() == (tmp_path / "report" / "report.md").read_text()
    assert sorted(str(p) for p in store.root.rglob("*")) == before
