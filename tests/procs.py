"""`pkt` as a subprocess under test: its own store and Prefect home in the test's folder, started and read
until it prints a line that says its slow node is under way (then a test signals it)."""
import contextlib
import os
import signal
import subprocess
import sys

import pytest


def pkt_env(tmp_path) -> dict:
    """The environment of a `pkt` subprocess: this one's, with the store and PREFECT_HOME in tmp_path and no
    PREFECT_API_* (the command starts its own temporary server)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PKT_STORE=str(tmp_path / "store"), PREFECT_HOME=str(tmp_path / "prefect"))
    return env


@contextlib.contextmanager
def pkt_until(argv: list[str], tmp_path, ready: str, what: str = "its slow node", own_group: bool = False):
    """Run `pkt argv` in tmp_path (stdout and stderr as one text stream) and read its output until a line
    holding `ready`; fails the test if the command ends first ("ended before WHAT started"). Yields
    (process, the lines read so far). On the way out a process still running is killed (own_group: it was
    started in a process group of its own, and the whole group is killed) and waited for."""
    p = subprocess.Popen([sys.executable, "-m", "pkt.flows.cli", *argv], env=pkt_env(tmp_path), cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=own_group)
    try:
        out = []
        for line in p.stdout:
            out.append(line)
            if ready in line:
                break
        else:
            pytest.fail(f"the command ended before {what} started:\n" + "".join(out))
        yield p, out
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL) if own_group else p.kill()
            p.wait()
