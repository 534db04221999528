import json
import os
import stat
import subprocess
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


def test_roundtrip_and_self_describing_header(tmp_store):
    store = Store(tmp_store)
    ref = put(store)
    assert store.lookup(ref.kind, ref.key) == ref
    assert torch.equal(store.tensors(ref)["w"], torch.full((3, 2), 1.0))
    header = store.header(ref)
    assert header["kind"] == "sensitivity" and header["key"] == ref.key and json.loads(header["params"]) == {"k": 32}
    rec = store.record(ref.kind, ref.key)
    assert rec["digest"] == ref.digest and rec["inputs"] == {"teacher": "a" * 64}
    assert not list((tmp_store / "tmp").iterdir())  # no temp files left behind


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
    with pytest.raises(StoreError, match="disk is full; nothing was stored.*--store"):
        put(store)
    assert store.records() == [] and not list((tmp_store / "tmp").iterdir())
