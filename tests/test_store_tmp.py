"""A process that wrote into the store and ended normally leaves no temp area (tmp/proc-*) behind: the
main process, a spawned pool process and a forked one; one that is killed leaves it for gc, and a forked
child never removes its parent's area."""
import subprocess
import sys

import pytest

WRITE = """
import multiprocessing as mp, sys
from pkt.artifacts.store import Store

def write(root, data):
    Store(root).put_bytes(data)

if __name__ == "__main__":
    root, how = sys.argv[1], sys.argv[2]
    Store(root).put_bytes(b"main")
    if how in ("spawn", "fork"):
        with mp.get_context(how).Pool(1) as pool:
            pool.apply(write, (root, how.encode()))
            pool.close()
            pool.join()
    print(sorted(p.name for p in (Store(root).root / "tmp").iterdir()), flush=True)  # the parent's, still alive
    if how == "kill":
        import os, signal
        os.kill(os.getpid(), signal.SIGKILL)
"""


def areas(root):
    return sorted(p.name for p in (root / "tmp").glob("proc-*"))


def run(tmp_path, how):
    script = tmp_path / "write.py"  # a file, so that a spawned process can import its function
    script.write_text(WRITE)
    return subprocess.run([sys.executable, str(script), str(tmp_path / "store"), how], capture_output=True, text=True,
                          timeout=600)


@pytest.mark.parametrize("how", ["main", "spawn", "fork"])
def test_no_temp_area_is_left_after_a_normal_exit(tmp_path, how):
    out = run(tmp_path, how)
    assert out.returncode == 0, out.stderr
    assert any(name.startswith("proc-") for name in eval(out.stdout))  # there was one while the process lived
    assert areas(tmp_path / "store") == []


def test_a_killed_process_leaves_its_area_to_gc(tmp_path):
    from pkt.artifacts.store import Store

    out = run(tmp_path, "kill")
    assert out.returncode == -9
    assert areas(tmp_path / "store")
    Store(tmp_path / "store").gc()
    assert areas(tmp_path / "store") == []
