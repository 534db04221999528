"""What a record claims is checked against the bytes it points at (issue 26, case 3): a safetensors
header and a manifest name the node they were written for; trees are read-only to everyone; a
store root appears whole or not at all (case 8)."""
import json
import os
import signal
import stat
import subprocess
import sys

import torch

from pkt.artifacts.store import CorruptBlob, Ref, Store
from pkt.flows.cli import main


def put_sens(store, k, value):
    params, inputs = {"k": k}, {"teacher": "a" * 64}
    key = store.key("sensitivity", params, inputs)
    return store.put_tensors("sensitivity", key, {"w": torch.full((3, 2), value)}, params=params, inputs=inputs)


def put_dir(store, tmp_path, kind, text):
    d = tmp_path / kind
    (d / "sub").mkdir(parents=True)
    (d / "adapter_config.json").write_text(text)
    (d / "sub" / "w.bin").write_bytes(b"\x01" * 8)
    params, inputs = {"kind": kind}, {"student": "b" * 64}
    return store.put_tree(kind, store.key(kind, params, inputs), d, params=params, inputs=inputs)


def point(store, ref, digest):
    path = store.record_path(ref.kind, ref.key)
    path.write_text(json.dumps({**json.loads(path.read_text()), "digest": digest}))


def test_a_record_pointed_at_another_sensitivity_blob_is_a_miss_and_verify_names_it(tmp_store, capsys):
    store = Store(tmp_store)
    a, b = put_sens(store, 8, 1.0), put_sens(store, 16, 2.0)
    point(store, a, b.digest)  # an intact blob whose header names b's key
    fresh = Store(tmp_store)
    assert fresh.lookup(a.kind, a.key) is None
    assert f"holds sensitivity {b.key[:12]}, not sensitivity {a.key[:12]}" in fresh.misses[0]
    assert fresh.lookup(b.kind, b.key) == b  # the blob itself is fine for the node it names
    problems = fresh.verify()
    assert len(problems) == 1 and a.key in problems[0] and "holds sensitivity" in problems[0]
    assert main(["store", "verify", "--store", str(tmp_store)]) == 1
    assert "1 problems" in capsys.readouterr().out
    again = put_sens(fresh, 8, 1.0)  # the recomputed node repairs the record
    assert again == a and Store(tmp_store).lookup(a.kind, a.key) == a and Store(tmp_store).verify() == []


def test_a_record_pointed_at_another_kinds_manifest_is_a_miss(tmp_store, tmp_path):
    store = Store(tmp_store)
    init = put_dir(store, tmp_path, "lora_init", '{"r": 2}')
    residual = put_dir(store, tmp_path, "residual_model", '{"r": 3}')
    point(store, init, residual.digest)
    fresh = Store(tmp_store)
    assert fresh.lookup(init.kind, init.key) is None
    assert f"holds residual_model {residual.key[:12]}" in fresh.misses[0]
    try:
        fresh.tree(Ref(init.kind, init.key, residual.digest))
    except CorruptBlob as e:
        assert "holds residual_model" in str(e)
    else:
        raise AssertionError("the tree of a record pointed at another node's manifest was served")
    problems = fresh.verify()
    assert len(problems) == 1 and init.key in problems[0]
    fresh.gc()  # a wrong claim does not stop gc, nor lose a blob in use
    assert fresh.lookup(residual.kind, residual.key) == residual


def test_equal_folders_of_two_nodes_are_two_manifests_sharing_blobs(tmp_store, tmp_path):
    store = Store(tmp_store)
    a = put_dir(store, tmp_path / "a", "lora_init", "{}")
    d = tmp_path / "b" / "lora_init"
    d.parent.mkdir()
    os.rename(tmp_path / "a" / "lora_init", d)
    b = store.put_tree("lora_init", "c" * 64, d, params={}, inputs={})
    assert a.digest != b.digest and store.manifest(a) == store.manifest(b)


def test_trees_are_read_only_to_everyone(tmp_store, tmp_path):
    store = Store(tmp_store)
    ref = put_dir(store, tmp_path, "adapter", "{}")
    tree = store.tree(ref)
    modes = {p.relative_to(tree).as_posix(): stat.S_IMODE(p.lstat().st_mode) for p in [tree, *tree.rglob("*")]}
    assert modes == {".": 0o555, "sub": 0o555, "adapter_config.json": 0o444, "sub/w.bin": 0o444}
    # a tree pkt must replace (damaged, or gc'd) is still removed and rebuilt
    os.chmod(tree / "sub", 0o755)
    (tree / "sub" / "extra").write_text("x")
    assert store.tree(ref) == tree and not (tree / "sub" / "extra").exists()
    assert stat.S_IMODE((tree / "sub").stat().st_mode) == 0o555
    store.record_path(ref.kind, ref.key).unlink()
    assert tree in store.gc() and not tree.exists()


KILL_WHEN_ROOT_APPEARS = """
import os, signal, sys
from pathlib import Path
root = sys.argv[1]
def killing(call):
    def wrapped(*a, **kw):
        out = call(*a, **kw)
        if os.path.lexists(root):
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    return wrapped
os.mkdir, os.rename, os.makedirs = killing(os.mkdir), killing(os.rename), killing(os.makedirs)
from pkt.artifacts.store import Store
from pkt.tasks import sources
store = Store(root)
sources.model_source(sys.argv[2], store)  # what a run does first
store.put_bytes(b"x")
"""


def test_a_run_killed_as_the_store_root_appears_leaves_a_store(mini_family, tmp_path, capsys):
    root = tmp_path / "store"
    proc = subprocess.run([sys.executable, "-c", KILL_WHEN_ROOT_APPEARS, str(root), str(mini_family / "teacher")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL and root.is_dir(), proc.stderr[-2000:]
    for cmd in (["verify"], ["gc"], ["ls"]):
        assert main(["store", *cmd, "--store", str(root)]) == 0, capsys.readouterr().err
    assert "not a pkt store" not in capsys.readouterr().err
