"""A command's start-up overlaps its server's (flows/server.py): the server's process imports before it
is told to go and touches no database until then; the command's flow module is imported while the
server starts; a server that fails is still reported at once, not after those imports."""
import os
import sys
import threading
import time

import pytest

from pkt.flows import server


def test_a_spawned_server_touches_no_database_until_told_to_go_and_leaves_when_not(tmp_path, monkeypatch):
    home = tmp_path / "prefect"
    monkeypatch.setenv("PREFECT_HOME", str(home))
    s = server.TemporaryServer().spawn()
    time.sleep(1)
    s.process.stdin.close()  # what stop() does to a server it never needed: no go
    assert s.process.wait(300) == 0  # it left by itself, cleanly
    assert not list(home.glob("*.db*")) and not s.port_file.exists()
    s.stop()


def test_a_server_told_to_go_after_its_imports_serves(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    s = server.TemporaryServer().spawn()
    try:
        time.sleep(2)  # it imports meanwhile
        s.start(300)
        import httpx

        assert httpx.get(f"{s.api_url}/health", timeout=10).status_code == 200
        assert (tmp_path / "prefect" / "prefect.db").exists()
    finally:
        s.stop()
    assert s.process is None


@pytest.fixture
def slow_module(tmp_path, monkeypatch):
    """A module whose import sets `started` and then blocks until `release` (or 60 s), on sys.path."""
    name = f"pkt_slow_import_{os.getpid()}_{time.monotonic_ns()}"
    started, release = threading.Event(), threading.Event()
    (tmp_path / f"{name}.py").write_text("import builtins\nbuiltins._pkt_slow_import()\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    def hook():
        started.set()
        release.wait(60)

    monkeypatch.setattr("builtins._pkt_slow_import", hook, raising=False)
    yield name, started, release
    release.set()
    sys.modules.pop(name, None)


def fake_server(monkeypatch, start):
    """prefect_api() with no user server and a TemporaryServer whose start is `start` (no process)."""
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setattr(server, "configured_api_url", lambda: None)
    monkeypatch.setattr(server.TemporaryServer, "spawn", lambda self: self)
    monkeypatch.setattr(server.TemporaryServer, "start", start)
    monkeypatch.setattr(server, "_wait_for_records", lambda patience: None)


def test_the_flow_module_is_imported_while_the_server_starts(slow_module, tmp_path, monkeypatch):
    name, started, release = slow_module
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    seen = []

    def start(self, timeout):  # the server comes up only once the import has begun: concurrent, or never
        seen.append(started.wait(60))
        self.port = 1
        release.set()

    fake_server(monkeypatch, start)
    server.import_while_starting(name)
    with server.prefect_api():
        assert name in sys.modules  # joined before the body: the flow's import finds it done
    assert seen == [True]


def test_a_failing_server_is_reported_at_once_not_after_the_imports(slow_module, tmp_path, monkeypatch):
    name, started, release = slow_module
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))

    def start(self, timeout):
        started.wait(60)  # the import is under way, and blocks for a minute
        raise server.PrefectUnavailable("the server exited while starting")

    fake_server(monkeypatch, start)
    server.import_while_starting(name)
    t0 = time.monotonic()
    with pytest.raises(server.PrefectUnavailable, match="exited while starting"):
        with server.prefect_api():
            pytest.fail("the body ran without a server")
    assert time.monotonic() - t0 < 30
