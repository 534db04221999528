import json
import os
import shutil
import stat
import subprocess
import time
import sys

import pytest
import torch
from hypothesis import given, settings, strategies as st

from pkt.artifacts.keys import artifact_key
from pkt.artifacts.store import Store, StoreError, check_relpath


def put(store, kind="sensitivity", params=None, inputs=None, value=1.0):
    params = params or {"k": 32}
    inputs = inputs or {"teacher": "a" * 64}
    key = store.key(kind, params, inputs)
    return store.put_tensors(kind, key, {"w": torch.full((3, 2), value)}, params=params, inputs=inputs)


def leftovers(root):
    """Files in the store's temp space, apart from the live process's area lock."""
    return [p for p in (root / "tmp").rglob("*") if p.is_file() and p.suffix != ".lock"]


def test_roundtrip_and_self_describing_header(tmp_store):
    store = Store(tmp_store)
    ref = put(store)
    assert store.lookup(ref.kind, ref.key) == ref
    assert torch.equal(store.tensors(ref)["w"], torch.full((3, 2), 1.0))
    header = store.header(ref)
    assert header["kind"] == "sensitivity" and header["key"] == ref.key and json.loads(header["params"]) == {"k": 32}
    rec = store.record(ref.kind, ref.key)
    assert rec["digest"] == ref.digest and rec["inputs"] == {"teacher": "a" * 64}
    assert leftovers(tmp_store) == []  # no temp files left behind


def test_corrupt_blob_is_a_miss_and_verify_names_it(tmp_store):
    store = Store(tmp_store)
    ref = put(store)
    blob = store.blob_path(ref.digest)
    os.chmod(blob, stat.S_IWUSR | stat.S_IRUSR)
    blob.write_bytes(blob.read_bytes()[:-3] + b"xyz")
    fresh = Store(tmp_store)
    assert fresh.lookup(ref.kind, ref.key) is None
    assert "does not match its digest" in fresh.misses[0]
    problems = fresh.verify()
    assert len(problems) == 1 and ref.key in problems[0] and "sensitivity" in problems[0]


def test_tree_roundtrip_and_gc(tmp_store, tmp_path):
    store = Store(tmp_store)
    d = tmp_path / "adapter"
    (d / "sub").mkdir(parents=True)
    (d / "adapter_config.json").write_text("{}")
    (d / "sub" / "x.bin").write_bytes(b"\x00" * 10)
    ref = store.put_tree("adapter", "k" * 64, d, params={}, inputs={})
    tree = store.tree(ref)
    assert (tree / "sub" / "x.bin").read_bytes() == b"\x00" * 10
    orphan = store.put_bytes(b"nobody references me")
    assert store.gc(dry_run=True) == [store.blob_path(orphan)]
    assert store.blob_path(orphan).exists()
    store.gc()
    assert not store.blob_path(orphan).exists() and store.verify() == []
    assert (tree / "adapter_config.json").exists()


@pytest.mark.parametrize("bad", ["../etc/passwd", "/abs/path", "a/../../b"])
def test_manifest_paths_cannot_escape(bad):
    with pytest.raises(ValueError, match="escape the store"):
        check_relpath(bad)


def test_unwritable_root_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # a root below a plain file can never be created, even as root
    with pytest.raises(StoreError, match="not writable.*--store"):
        put(Store(blocker / "store"))
    assert blocker.read_text() == ""


def test_keys_identical_across_fresh_interpreters():
    code = ("from pkt.artifacts.keys import artifact_key;"
            "print(artifact_key('extraction', 1, {'b': [1, 2.5], 'a': {'y': None, 'x': 'z'}}, {'t': 'd'}))")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            for _ in range(2)}
    assert len(outs) == 1
    assert outs.pop().strip() == artifact_key("extraction", 1, {"a": {"x": "z", "y": None}, "b": [1, 2.5]}, {"t": "d"})


params_st = st.dictionaries(st.text(min_size=1, max_size=8),
                            st.one_of(st.integers(), st.text(max_size=8), st.booleans(),
                                      st.floats(allow_nan=False, allow_infinity=False)), max_size=6)


@settings(max_examples=100, deadline=None)
@given(params=params_st, data=st.data())
def test_key_ignores_dict_order(params, data):
    shuffled = dict(data.draw(st.permutations(list(params.items()))))
    assert artifact_key("k", 1, params, {"a": "x"}) == artifact_key("k", 1, shuffled, {"a": "x"})


@settings(max_examples=100, deadline=None)
@given(params=params_st, name=st.text(min_size=1, max_size=8), value=st.integers())
def test_key_changes_with_any_param_or_input(params, name, value):
    base = artifact_key("k", 1, params, {"a": "x"})
    changed = {**params, name: value}
    if changed != params:
        assert artifact_key("k", 1, changed, {"a": "x"}) != base
    assert artifact_key("k", 1, params, {"a": "y"}) != base
    assert artifact_key("k", 2, params, {"a": "x"}) != base


def test_full_disk_is_a_clear_error_and_leaves_nothing(tmp_store, monkeypatch):
    import errno

    import pkt.artifacts.store as store_module

    def no_space(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_module, "save_file", no_space)
    store = Store(tmp_store)
    with pytest.raises(StoreError, match=r"disk is full \(.* free, .* needed\); nothing was stored.*--store"):
        put(store)
    assert store.records() == [] and leftovers(tmp_store) == []


# ---- trees: checked when used and by verify, rebuilt from verified blobs (issue 14, case 1) ----
def report_tree(store, tmp_path, text="transfer beats lora by 0.12\n"):
    d = tmp_path / "report-src"
    d.mkdir(exist_ok=True)
    (d / "report.md").write_text(text)
    (d / "summary.csv").write_text("variant,mean\nlora,0.5\n")
    return store.put_tree("report", "r" * 64, d, params={}, inputs={}), d


def edit_in_place(path, offset, data):
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_a_repaired_blob_does_not_leave_the_edited_inode_in_its_tree(tmp_store, tmp_path):
    """The replay: an in-place edit of a report blob, a run that recomputes it, then the tree."""
    store = Store(tmp_store)
    ref, src = report_tree(store, tmp_path)
    tree = store.tree(ref)
    edit_in_place(store.blob_path(store.manifest(ref)["report.md"]), 25, b"9")  # 0.12 -> 0.92, tree too (hard link)
    assert (tree / "report.md").read_text() == "transfer beats lora by 0.92\n"
    fresh = Store(tmp_store)
    assert fresh.lookup("report", ref.key) is None and "does not match its digest" in fresh.misses[0]
    again = fresh.put_tree("report", ref.key, src, params={}, inputs={})  # the next run recomputes the node
    assert again == ref
    problems = Store(tmp_store).verify()  # the blob is whole again; the tree still holds the edited inode
    assert len(problems) == 1 and "report " + ref.key in problems[0] and "report.md differing" in problems[0]
    served = Store(tmp_store).tree(ref)
    assert (served / "report.md").read_text() == "transfer beats lora by 0.12\n"
    assert Store(tmp_store).verify() == []


def test_a_tree_file_replaced_by_other_bytes_is_rebuilt(tmp_store, tmp_path):
    store = Store(tmp_store)
    ref, _ = report_tree(store, tmp_path)
    tree = store.tree(ref)
    os.unlink(tree / "report.md")  # an editor that writes a new file: a new inode, same size
    (tree / "report.md").write_text("transfer beats lora by 0.92\n")
    assert "report.md differing" in Store(tmp_store).verify()[0]
    assert (Store(tmp_store).tree(ref) / "report.md").read_text() == "transfer beats lora by 0.12\n"


@pytest.mark.parametrize("tamper", ["symlink", "foreign_dir", "extra_file", "missing_file", "file_symlink", "plain_file"])
def test_foreign_tree_entries_are_refused_and_rebuilt(tmp_store, tmp_path, tamper):
    store = Store(tmp_store)
    ref, _ = report_tree(store, tmp_path)
    tree = store.tree(ref)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "report.md").write_text("not the report\n")
    (outside / "summary.csv").write_text("not the summary\n")
    if tamper == "symlink":
        shutil.rmtree(tree)
        os.symlink(outside, tree)
    elif tamper == "foreign_dir":
        shutil.rmtree(tree)
        shutil.copytree(outside, tree)
    elif tamper == "extra_file":
        (tree / "extra.py").write_text("print('hi')")
    elif tamper == "missing_file":
        os.unlink(tree / "summary.csv")
    elif tamper == "file_symlink":
        os.unlink(tree / "report.md")
        os.symlink(outside / "report.md", tree / "report.md")
    else:
        shutil.rmtree(tree)
        tree.write_text("a file")
    problems = Store(tmp_store).verify()
    assert len(problems) == 1 and str(tree) in problems[0], problems
    served = Store(tmp_store).tree(ref)
    assert served == tree and not served.is_symlink()
    assert sorted(p.name for p in served.iterdir()) == ["report.md", "summary.csv"]
    assert (served / "report.md").read_text() == "transfer beats lora by 0.12\n"
    assert not (served / "report.md").is_symlink()
    assert (outside / "report.md").read_text() == "not the report\n"  # the symlink's target is untouched
    assert Store(tmp_store).verify() == []


def test_gc_never_follows_a_symlink(tmp_store, tmp_path):
    store = Store(tmp_store)
    ref, _ = report_tree(store, tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep me")
    shutil.rmtree(store.tree(ref))
    os.symlink(outside, tmp_store / "trees" / ref.digest)  # a referenced tree name -> a folder outside
    os.symlink(outside, tmp_store / "trees" / ("0" * 64))  # an unreferenced one
    os.symlink(outside, tmp_store / "blobs" / "sha256" / "zz")  # a blob folder -> outside
    os.symlink(outside / "precious", tmp_store / "blobs" / "sha256" / ref.digest[:2] / ("f" * 64))
    removed = Store(tmp_store).gc()
    assert (outside / "precious").read_text() == "keep me" and sorted(os.listdir(outside)) == ["precious"]
    assert {tmp_store / "trees" / ("0" * 64), tmp_store / "trees" / ref.digest} <= set(removed)
    assert tmp_store / "blobs" / "sha256" / ref.digest[:2] / ("f" * 64) in removed
    assert not os.path.lexists(tmp_store / "trees" / ("0" * 64))
    assert (Store(tmp_store).tree(ref) / "report.md").read_text() == "transfer beats lora by 0.12\n"


# ---- gc at any moment (issue 14, case 2) -------------------------------------------------------
def test_gc_in_a_tight_loop_loses_nothing_being_written(tmp_store, tmp_path):
    """put_tree publishes its blobs before its record: gc running meanwhile must not take them."""
    import threading

    store = Store(tmp_store)
    store.put_bytes(b"an orphan, so every gc has something to remove")
    stop, errors, rounds = threading.Event(), [], [0]

    def collect():
        while not stop.is_set():
            try:
                Store(tmp_store).gc()
                rounds[0] += 1
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)

    collector = threading.Thread(target=collect)
    collector.start()
    refs = []
    try:
        for i in range(24):
            d = tmp_path / f"adapter{i}"
            d.mkdir()
            for j in range(8):
                (d / f"f{j}.bin").write_bytes(f"{i}-{j}".encode() * 100)
            refs.append(store.put_tree("adapter", f"{i:064x}", d, params={"i": i}, inputs={}))
            refs.append(put(store, params={"i": i}, value=float(i)))
    finally:
        stop.set()
        collector.join()
    assert errors == [] and rounds[0] > 10
    fresh = Store(tmp_store)
    assert all(fresh.lookup(r.kind, r.key) == r for r in refs)
    assert fresh.verify() == []


def test_gc_spares_a_live_writers_temp_area_and_reaps_a_dead_ones(tmp_store):
    store = Store(tmp_store)
    put(store)
    old = time.time() - 2 * 3600
    mine = store.tmp_dir() / "half-written"  # a long computation's working file: hours old, still in use
    mine.write_bytes(b"x")
    os.utime(mine, (old, old))
    code = ("import sys, os, signal; from pkt.artifacts.store import Store; "
            "(Store(sys.argv[1]).tmp_dir() / 'partial').write_bytes(b'y'); os.kill(os.getpid(), signal.SIGKILL)")
    subprocess.run([sys.executable, "-c", code, str(tmp_store)])
    stray = tmp_store / "tmp" / "tmpabc.safetensors"  # left by an older pkt outside any area
    stray.write_bytes(b"z")
    os.utime(stray, (old, old))
    areas = {p.name for p in (tmp_store / "tmp").iterdir() if p.is_dir()}
    assert len(areas) == 2
    removed = Store(tmp_store).gc()
    assert mine.exists() and store.tmp_dir().name in os.listdir(tmp_store / "tmp")
    dead = (areas - {store.tmp_dir().name}).pop()
    assert {p.name for p in removed} == {dead, dead + ".lock", stray.name}
    assert Store(tmp_store).verify() == []


# ---- tampered records, manifests and blobs: reported, never a crash (issue 14, case 6) -----------
RECORD_TAMPERS = {
    "not json": lambda rec: b"{not json",
    "a list": lambda rec: b"[1, 2]",
    "no digest": lambda rec: json.dumps({k: v for k, v in rec.items() if k != "digest"}).encode(),
    "digest a number": lambda rec: json.dumps({**rec, "digest": 7}).encode(),
    "digest not sha256": lambda rec: json.dumps({**rec, "digest": "../../etc/passwd"}).encode(),
    "params a list": lambda rec: json.dumps({**rec, "params": [1]}).encode(),
    "another key's record": lambda rec: json.dumps({**rec, "key": "e" * 64}).encode(),
    "deeply nested": lambda rec: b"[" * 100000 + b"]" * 100000,
    "not utf-8": lambda rec: b"\xff\xfe\x00garbage",
}


@pytest.mark.parametrize("tamper", sorted(RECORD_TAMPERS))
def test_a_tampered_record_is_a_miss_and_every_tool_reports_it(tmp_store, tmp_path, tamper, capsys):
    from pkt.flows.cli import main

    store = Store(tmp_store)
    ref = put(store)
    path = store.record_path(ref.kind, ref.key)
    path.write_bytes(RECORD_TAMPERS[tamper](json.loads(path.read_text())))
    fresh = Store(tmp_store)
    assert fresh.lookup(ref.kind, ref.key) is None and str(path) in fresh.misses[0]
    problems = fresh.verify()
    assert len(problems) == 1 and ref.key in problems[0] and str(path) in problems[0]
    with pytest.raises(StoreError, match="removed nothing"):
        fresh.gc()
    assert fresh.blob_path(ref.digest).exists()
    root = str(tmp_store)
    assert main(["store", "ls", "--store", root]) == 0
    assert "UNUSABLE" in capsys.readouterr().out
    assert main(["store", "verify", "--store", root]) == 1
    assert main(["store", "show", ref.key[:10], "--store", root]) == 1
    assert main(["store", "gc", "--store", root]) == 2
    assert "delete those record files" in capsys.readouterr().err
    put(fresh)  # the next run recomputes the node and the store is whole again
    assert Store(tmp_store).verify() == [] and Store(tmp_store).gc() == []


MANIFEST_TAMPERS = {
    "not json": b"{",
    "files a list": b'{"files": ["x"]}',
    "no files": b'{"other": {}}',
    "digest not sha256": b'{"files": {"a.json": "xyz"}}',
    "escaping path": ('{"files": {"../../evil": "%s"}}' % ("a" * 64)).encode(),
    "file and folder": ('{"files": {"a": "%s", "a/b": "%s"}}' % ("a" * 64, "b" * 64)).encode(),
}


@pytest.mark.parametrize("tamper", sorted(MANIFEST_TAMPERS))
def test_a_tampered_manifest_is_a_miss_and_every_tool_reports_it(tmp_store, tmp_path, tamper, capsys):
    from pkt.artifacts.store import CorruptBlob, Ref
    from pkt.flows.cli import main

    store = Store(tmp_store)
    ref, _ = report_tree(store, tmp_path)
    forged = store.put_bytes(MANIFEST_TAMPERS[tamper])  # a blob that verifies, but is no manifest
    path = store.record_path(ref.kind, ref.key)
    path.write_text(json.dumps({**json.loads(path.read_text()), "digest": forged}))
    fresh = Store(tmp_store)
    assert fresh.lookup(ref.kind, ref.key) is None and "manifest" in fresh.misses[0]
    with pytest.raises(CorruptBlob):
        fresh.tree(Ref(ref.kind, ref.key, forged))
    assert not (tmp_path / "evil").exists()
    problems = fresh.verify()
    assert len(problems) == 1 and ref.key in problems[0] and "manifest" in problems[0]
    with pytest.raises(StoreError, match="removed nothing"):
        fresh.gc()
    root = str(tmp_store)
    assert main(["store", "ls", "--store", root]) == 0
    assert main(["store", "verify", "--store", root]) == 1
    assert main(["store", "show", ref.key[:10], "--store", root]) == 1
    assert "manifest" in capsys.readouterr().out


def test_a_truncated_blob_is_reported_by_show_and_verify(tmp_store, capsys):
    from pkt.flows.cli import main

    store = Store(tmp_store)
    ref = put(store)
    blob = store.blob_path(ref.digest)
    os.chmod(blob, 0o644)
    os.truncate(blob, 100)
    root = str(tmp_store)
    assert main(["store", "show", ref.key[:10], "--store", root]) == 1
    assert "does not match its digest" in capsys.readouterr().out
    assert main(["store", "verify", "--store", root]) == 1
    assert main(["store", "ls", "--store", root]) == 0
    os.truncate(blob, 0)
    assert main(["store", "show", ref.key[:10], "--store", root]) == 1
    assert Store(tmp_store).lookup(ref.kind, ref.key) is None


@pytest.mark.parametrize("cmd", [["verify"], ["ls"], ["gc"], ["gc", "--dry-run"], ["show", "abc"]])
def test_a_path_that_is_not_a_store_is_an_error(tmp_path, capsys, cmd):
    from pkt.flows.cli import main

    (tmp_path / "somedir").mkdir()
    for root in (tmp_path / "typo", tmp_path / "somedir"):
        assert main(["store", *cmd, "--store", str(root)]) == 2
        err = capsys.readouterr().err
        assert f"{root} is not a pkt store" in err and "--store" in err
    assert os.listdir(tmp_path / "somedir") == [] and not (tmp_path / "typo").exists()
