"""How a store's bad days end (issue 19, item 6): a first run killed before its first record, a
full disk, a read-only store whose trees are built outside it."""
import os
import signal
import subprocess
import sys
import textwrap

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
    assert not (root / "keys").exists() and not (root / "blobs").exists()  # killed before any record
    assert sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) >= 113 << 20
    assert main(["store", "verify", "--store", str(root)]) == 0
    assert "0 artifacts checked, 0 problems" in capsys.readouterr().out
    assert main(["store", "gc", "--store", str(root)]) == 0
    assert "removed" in capsys.readouterr().out
    assert sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) == 0  # the 113 MB are reclaimed
    assert Store(root).verify() == []
