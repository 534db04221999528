"""How a store's bad days end (issue 19, item 6): a first run killed before its first record, a
full disk, a read-only store whose trees are built outside it."""
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from pathlib import Path

from pkt.artifacts.store import Store
from pkt.flows.cli import main

REPO = os.path.dirname(os.path.dirname(__file__))

KILLED_FIRST_RUN = textwrap.dedent("""
    import os, signal, sys
    from pkt.artifacts.store import Store
    store = Store(sys.argv[1])
    with open(store.tmp_dir() / "half-written.safetensors", "wb") as f:
        f.write(os.urandom(1 << 20) * 113)  # the 113 MB of a model being stored
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_gc_and_verify_work_on_a_store_whose_first_run_was_killed(tmp_path, capsys):
    """Replays 'a killed first run's 113 MB temp file cannot be reclaimed (gc/verify: "not a pkt store")'."""
    root = tmp_path / "store"
    proc = subprocess.run([sys.executable, "-c", KILLED_FIRST_RUN, str(root)], cwd=REPO)
    assert proc.returncode == -signal.SIGKILL
    # killed before any record or blob (a new store root is made whole, with empty keys/ and blobs/)
    assert not any(p.is_file() for sub in ("keys", "blobs") for p in (root / sub).rglob("*"))
    assert sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) >= 113 << 20
    assert main(["store", "verify", "--store", str(root)]) == 0
    assert "0 artifacts checked, 0 problems" in capsys.readouterr().out
    assert main(["store", "gc", "--store", str(root)]) == 0
    assert "removed" in capsys.readouterr().out
    assert sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) == 0  # the 113 MB are reclaimed
    assert Store(root).verify() == []


# ---- a full disk -------------------------------------------------------------------------------
def safetensors_disk_full(*a, **kw):
    """What safetensors raises on a full disk: its own error type, not an OSError."""
    from safetensors import SafetensorError

    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def test_a_full_disk_under_safetensors_names_the_store_and_the_space_needed(tmp_path, monkeypatch):
    import torch

    import pkt.artifacts.store as store_module
    from pkt.artifacts.store import StoreError

    monkeypatch.setattr(store_module, "save_file", safetensors_disk_full)
    store = Store(tmp_path / "store")
    with pytest.raises(StoreError, match=r"store root .*store: the disk is full \(.* free, 4.0 MB needed\); nothing "
                                         r"was stored.*--store"):
        store.put_tensors("extraction", "e" * 64, {"x": torch.zeros(1_000_000)}, params={}, inputs={})
    assert store.records() == [] and [p for p in store.root.rglob("*") if p.is_file() and "tmp/proc-" in str(p)
                                      and not p.name.endswith(".lock")] == []


def test_a_full_disk_while_a_node_writes_its_files_is_one_sentence(tmp_path):
    from dataclasses import dataclass

    from pkt.artifacts.store import StoreError
    from pkt.tasks.node import Node, build

    @dataclass(frozen=True)
    class HalfWritten(Node):
        KIND = "residual_model"

        def compute(self, store, inputs, out):
            (out / "config.json").write_bytes(b"x" * 5000)
            safetensors_disk_full()

    store = Store(tmp_path / "store")
    with pytest.raises(StoreError, match=r"the disk is full \(.* free, more than 5.0 kB needed\)"):
        build(HalfWritten(), {}, store)
    assert store.records() == []


@pytest.fixture
def tiny_disk(tmp_path):
    """A real 96 kB filesystem (tmpfs), where this machine lets a test mount one."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    yield mount
    subprocess.run(["umount", str(mount)])


@pytest.mark.slow
@pytest.mark.ci
def test_a_real_full_disk_is_one_sentence_and_leaves_nothing_half_written(mini_family, tiny_disk, tmp_path):
    """Replays 'disk full prints 3 tracebacks (SafetensorError ... No space left on device)'."""
    store = tiny_disk / "store"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect")
    out = subprocess.run([sys.executable, "-m", "pkt.flows.cli", "extract", "--teacher", str(mini_family / "teacher"),
                          "--seeds", str(mini_family / "tasks/gsm/seeds.jsonl"), "--student",
                          str(mini_family / "student"), "--rank", "2", "--store", str(store)],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr + out.stdout and "SafetensorError" not in out.stderr
    [line] = [x for x in out.stderr.splitlines() if x.startswith("pkt ")]
    assert line.startswith(f"pkt extract: error: store root {store}: the disk is full (") and "needed" in line
    assert not list(store.rglob("*.tmp"))  # no half-written memo or record
    assert Store(store).verify() == []  # what was recorded before the disk filled is whole


# ---- a read-only store without trees -----------------------------------------------------------
SHOW_PATH = textwrap.dedent("""
    import sys
    from pkt.artifacts.store import Ref, Store
    print(Store(sys.argv[1]).path(Ref("lora_init", sys.argv[2], sys.argv[3])))
""")


def test_a_folder_printed_from_a_read_only_store_outlives_the_command(tmp_path):
    """Replays 'on a read-only store without trees the printed base/init folders are deleted when
    the command exits'."""
    from test_store_runs import read_only_command

    store = Store(tmp_path / "store")
    src = tmp_path / "init"
    src.mkdir()
    (src / "adapter_config.json").write_text('{"r": 2}')
    (src / "adapter_model.safetensors").write_bytes(b"weights")
    ref = store.put_tree("lora_init", "i" * 64, src, params={}, inputs={})
    assert not (store.root / "trees").exists()  # a store without trees (built on first use)
    prefix = read_only_command(str(store.root))
    if prefix is None:
        pytest.skip("root without unshare: no way to make the store read-only here")
    before = sorted(str(p) for p in store.root.rglob("*"))
    env = {**os.environ, "PKT_TREE_CACHE": str(tmp_path / "cache")}
    try:
        out = subprocess.run(prefix + [sys.executable, "-c", SHOW_PATH, str(store.root), ref.key, ref.digest],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(store.root)])
    assert out.returncode == 0, out.stderr
    printed = Path(out.stdout.strip())
    assert printed.parent == tmp_path / "cache"  # outside the store, which it left untouched
    assert sorted(p.name for p in printed.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert (printed / "adapter_model.safetensors").read_bytes() == b"weights"  # still there after the exit
    assert sorted(str(p) for p in store.root.rglob("*")) == before
    assert Store(store.root).path(ref) == store.root / "trees" / ref.digest  # a writable store: its own tree


@pytest.mark.slow
@pytest.mark.ci
def test_pkt_extract_on_a_read_only_store_prints_folders_that_stay(prefect_env, mini_family, tmp_path):
    """The case as filed, through `pkt extract`: its printed base model and LoRA init folders."""
    import shutil

    from prefect.settings import PREFECT_API_URL
    from test_store_runs import read_only_command

    store = tmp_path / "store"
    argv = ["extract", "--teacher", str(mini_family / "teacher"), "--seeds", str(mini_family / "tasks/gsm/seeds.jsonl"),
            "--student", str(mini_family / "student"), "--rank", "2", "--store", str(store)]
    assert main(argv) == 0
    shutil.rmtree(store / "trees")
    prefix = read_only_command(str(store))
    if prefix is None:
        pytest.skip("root without unshare: no way to make the store read-only here")
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PKT_TREE_CACHE": str(tmp_path / "cache")}
    try:
        out = subprocess.run(prefix + [sys.executable, "-m", "pkt.flows.cli", *argv], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=600)
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(store)])
    assert out.returncode == 0, out.stderr[-3000:]
    printed = {label: Path(line.split(label, 1)[1].strip()) for line in out.stdout.splitlines()
               for label in ("base model:", "LoRA init:") if line.strip().startswith(label)}
    assert (printed["base model:"] / "config.json").is_file()  # after the command exited
    assert (printed["LoRA init:"] / "adapter_config.json").is_file()
    assert not (store / "trees").exists()  # built outside the read-only store
