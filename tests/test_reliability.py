"""Nothing lost, nothing half-written: SIGKILL mid-write, two processes on one node, pickles refused."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from artifacts.store import Store
from pkt_core import models

WRITER = textwrap.dedent("""
    import sys, time, torch, safetensors.torch as st
    from artifacts.store import Store
    real = st.save_file
    def slow_save(tensors, path, metadata=None):
        real(tensors, path, metadata=metadata)
        print("WRITING", flush=True)
        time.sleep(60)  # killed here: the blob is written but not yet published
    import artifacts.store as s
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
    from artifacts.store import Store
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
