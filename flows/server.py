"""The Prefect API a pkt command talks to: the user's server (PREFECT_API_URL), or one temporary
server that this process starts, owns and stops.

Left alone, Prefect starts a temporary server on first use with a 20 s start-up limit (a busy
machine misses it) and stops it at exit while its services are still writing events (tracebacks
after a successful run). pkt instead starts one server per command, waits for it generously,
writes its output to a log file instead of the terminal, stops it when the command ends (also on
SIGTERM/SIGINT), and the server stops itself when its parent dies, even by SIGKILL.

A task run reaches the server as events, which its task-run recorder writes to the database in
batches, seconds or (on a busy machine) minutes later. A command therefore ends only once the API
shows every task run it made in a final state (on a temporary server and on the user's alike):
stopped earlier, a temporary server loses the backlog, and the UI would show part of the run. A
command stopped by Ctrl-C or SIGTERM ends its flow runs Cancelled on the way out (Prefect's engine leaves
them Crashed).

A cached rerun is mostly start-up: this process's imports (torch, transformers, Prefect) and the
server's (Prefect's server package: seconds on 2 cores). They overlap: prefect_api() starts the server's
process first, which imports while this process learns whether the user has a server and imports the
command's flow module (import_while_starting), and touches the database only once told to go.

    python -m pkt.flows.server --parent PID --port-file FILE    (the server process itself)
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from pkt.core import stop
from pkt.core.errors import UserError

TIMEOUT_VAR = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
DEFAULT_STARTUP_TIMEOUT = 300.0  # Prefect's own default is 20 s: too short on a loaded 2-core machine
WATCH_INTERVAL = 0.5  # how often the server checks that its parent is alive
STOP_GRACE = 10.0  # seconds a stopping server gets before it is killed
# Automations (their triggers and actions services) off on a temporary server, unless the environment says
# otherwise: it lives for one command, runs no deployment (pkt deploy's automation watches deployments' runs,
# on the server a worker polls), and the two services cost its start-up ~1.5 s on a loaded 2-core machine
TRIGGERS_VAR = "PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED"
GO = b"go\n"  # what a spawned server waits for on its stdin before it opens the database and serves
UI_HINT = "start a server with `pkt ui` in another terminal and `export PREFECT_API_URL=http://127.0.0.1:4200/api`"


RECORD_PATIENCE = 120.0  # seconds the wait for the server's records goes on without any progress
_MADE: list = []  # ids of the task runs this command made (flows/graph.py notes each one)
_UNRECORDED: list = [0]  # how many of them the server had not recorded when the command's wait ended
_FLOW_RUNS: list = []  # ids of the flow runs this command made (each flow's Graph notes its own)
_MEANWHILE: list = []  # modules the next prefect_api() imports while its server starts (import_while_starting)


class PrefectUnavailable(UserError):
    pass


def note_task_run(task_run_id) -> None:
    """A task run this command made: the command waits until the server has recorded it."""
    _MADE.append(task_run_id)


def note_flow_run() -> None:
    """The flow run now running (if any) is this command's: a Ctrl-C or SIGTERM on the command ends it Cancelled."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    if ctx is not None and ctx.flow_run is not None and ctx.flow_run.id not in _FLOW_RUNS:
        _FLOW_RUNS.append(ctx.flow_run.id)


def _cancel_stopped_flow_runs() -> None:
    """After a Ctrl-C or SIGTERM on the command: its flow runs end Cancelled, as the user asked, not in the
    Crashed state Prefect's engine gives any run a KeyboardInterrupt leaves (its nodes already ended
    Cancelled). Forced: Crashed is final, and Prefect's rules let no state follow it otherwise."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.states import Cancelled

    ids, _FLOW_RUNS[:] = list(_FLOW_RUNS), []
    try:
        with get_client(sync_client=True) as client:
            for run_id in ids:
                state = client.read_flow_run(run_id).state
                if state is None or state.type in (StateType.CRASHED, StateType.RUNNING, StateType.PENDING):
                    client.set_flow_run_state(run_id, Cancelled(message=f"{stop.reason()}; the running nodes "
                                                                        "were stopped, nothing half-done was stored"),
                                              force=True)
    except Exception as e:  # the command stops anyway: say what the UI shows instead
        print(f"pkt: could not mark this command's flow run Cancelled ({e}); the UI shows it Crashed",
              file=sys.stderr)


# what transformers imports on a flow's first tokenizer or config load (the model type's config module pulls
# in torch.distributed.tensor): 2-3 s of a cached demo's 6 s flow, paid in the flow's thread otherwise
MODEL_LOADING = ("transformers.models.auto.tokenization_auto", "transformers.core_model_loading")


def import_while_starting(*modules: str) -> None:
    """Modules the command's flow needs (its flow module: torch, transformers, the node kinds; and
    MODEL_LOADING): the next prefect_api() imports them while the server starts instead of after it."""
    _MEANWHILE[:] = [*modules, *MODEL_LOADING]


def wait_until_recorded(ids: list, patience: float = RECORD_PATIENCE, poll: float = 0.2) -> tuple[int, int]:
    """Wait until the API returns every task run of `ids` in its last state (written with its edges:
    they come in the same event), or until `patience` seconds pass with none newly recorded.
    Returns (recorded, made)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter

    pending, made = set(ids), len(set(ids))
    last = time.monotonic()
    with get_client(sync_client=True) as client:
        while pending:
            before = len(pending)
            todo = sorted(pending)
            for i in range(0, len(todo), 200):
                runs = client.read_task_runs(task_run_filter=TaskRunFilter(id={"any_": todo[i:i + 200]}), limit=200)
                pending -= {r.id for r in runs if r.state is not None and _last_state(r.state)}
            if len(pending) < before:
                last = time.monotonic()
            elif time.monotonic() - last > patience:
                break
            if pending:
                time.sleep(poll)
    return made - len(pending), made


def _last_state(state) -> bool:
    """A state a task run ends in: a final one, or NotReady (Pending: an upstream node failed or was
    cancelled, so it never runs, and Prefect writes nothing after it)."""
    return state.is_final() or (state.is_pending() and state.name == "NotReady")


def unrecorded() -> int:
    """How many task runs of the last command the server had not recorded when it ended (0: all)."""
    return _UNRECORDED[0]


def _wait_for_records(patience: float) -> None:
    """The end of a command: its logs and events sent, then every task run it made recorded."""
    _flush_client()
    ids, _MADE[:] = list(_MADE), []
    _UNRECORDED[0] = len(set(ids))
    if not ids:
        return
    try:
        recorded, made = wait_until_recorded(ids, patience)
    except Exception as e:  # the run itself is done: say what the UI may lack, do not fail the command
        print(f"pkt: could not check the Prefect server's records of this command's {len(ids)} task runs ({e})",
              file=sys.stderr)
        return
    _UNRECORDED[0] = made - recorded
    if recorded < made:
        print(f"pkt: the Prefect server recorded {recorded} of this command's {made} task runs within "
              f"{patience:.0f} s of its last progress; the UI shows only those", file=sys.stderr)


def startup_timeout() -> float:
    """The user's PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, else pkt's generous default."""
    raw = os.environ.get(TIMEOUT_VAR)
    if raw is None:
        return DEFAULT_STARTUP_TIMEOUT
    try:
        value = int(raw.strip())  # Prefect's own setting is a whole number: anything else breaks its import
    except ValueError:
        value = -1
    if not value > 0:
        raise PrefectUnavailable(f"{TIMEOUT_VAR}={raw!r} is not a positive number of seconds (a whole number); "
                                 f"set it to e.g. {DEFAULT_STARTUP_TIMEOUT:.0f} or unset it")
    return float(value)


def configured_api_url() -> str | None:
    """The API URL the user configured (environment, Prefect profile or temporary settings), if any."""
    from prefect.settings import get_current_settings

    return get_current_settings().api.url or None


@contextlib.contextmanager
def prefect_api():
    """Run the body against the user's Prefect API if one is configured (checked first), otherwise
    against a temporary server owned by this process and stopped on the way out. The modules of
    import_while_starting are imported meanwhile."""
    _MADE.clear()
    _FLOW_RUNS.clear()
    modules, _MEANWHILE[:] = list(_MEANWHILE), []
    # the server's process imports while this one does: without a URL in the environment one is likely needed
    timeout = None if os.environ.get("PREFECT_API_URL") else startup_timeout()
    server = None if timeout is None else TemporaryServer().spawn()
    try:
        url = configured_api_url()
    except BaseException:
        if server is not None:
            server.stop()
        raise
    import httpx

    httpx.Client().close()  # its transport's own imports (httpcore, h11, anyio ...) here, before _Imports' thread
    if url:
        if server is not None:  # a URL from the user's Prefect profile: their server, not this one
            server.stop()
        importing = _Imports(modules)
        _check_reachable(url)
        importing.join()
        with _records_waited():
            yield url
        return
    from prefect.context import refresh_global_settings_context
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if server is None:  # PREFECT_API_URL set but empty: no server configured
        timeout = startup_timeout()
        server = TemporaryServer().spawn()
    importing = _Imports(modules)
    server.start(timeout)  # failing, it stops its process and keeps its log for the message
    try:
        importing.join()
        # for anything this command starts, and for this process's other threads: a thread that does not
        # inherit the settings context (Prefect's own background waiters) reads the global one, and
        # without a URL there it started a second temporary server of its own (20% of a core in the study)
        os.environ["PREFECT_API_URL"] = server.api_url
        refresh_global_settings_context()
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}), _records_waited():
            yield server.api_url
    finally:
        os.environ.pop("PREFECT_API_URL", None)
        refresh_global_settings_context()
        server.stop()


class _Imports:
    """Modules imported in a thread of their own while the server starts. join() waits for them before
    this process imports anything else (two threads importing the same package at once can deadlock).
    An import that fails here is left to fail where the flow imports it, with its traceback. A server
    that fails to start (or a URL that does not answer) is reported at once, and the process exits
    after the imports: the thread is not a daemon, since a daemon torn down inside torch's import at
    interpreter exit aborts the process (SIGABRT: exit code 134, not pkt's 2)."""

    def __init__(self, modules: list[str]):
        self.thread = None
        if modules:
            self.thread = threading.Thread(target=self._run, args=(modules,), name="pkt-imports")
            self.thread.start()

    @staticmethod
    def _run(modules: list[str]) -> None:
        import importlib

        for module in modules:
            try:
                importlib.import_module(module)
            except BaseException:  # noqa: BLE001 (the flow's own import raises it again, in its thread)
                return

    def join(self) -> None:
        if self.thread is not None:
            self.thread.join()


@contextlib.contextmanager
def _records_waited():
    """On the way out, wait for the server's records; briefly after an error, Ctrl-C or SIGTERM."""
    try:
        yield
    except BaseException as e:  # a failed flow leaves never-started task runs that will never be final: no long wait
        if _is_stop(e):
            _cancel_stopped_flow_runs()
        _wait_for_records(patience=2.0)
        raise
    _wait_for_records(RECORD_PATIENCE)


def _is_stop(e: BaseException) -> bool:
    """Ctrl-C or SIGTERM: pkt's handler (flows/cli.py) or a runner's exit asked the nodes to stop, or the
    signal landed where neither looks (Prefect's own SIGTERM handler raises TerminationSignal in a flow)."""
    from prefect.exceptions import TerminationSignal

    return stop.requested() or isinstance(e, (KeyboardInterrupt, TerminationSignal))


def _check_reachable(url: str) -> None:
    import httpx

    try:
        httpx.get(f"{url.rstrip('/')}/health", timeout=10).raise_for_status()
    except httpx.HTTPError as e:
        raise PrefectUnavailable(f"the Prefect API at PREFECT_API_URL={url} does not answer ({e}); start that server "
                                 f"(`pkt ui` serves http://127.0.0.1:4200/api), or unset PREFECT_API_URL so that pkt "
                                 "starts a temporary one") from None


def _flush_client() -> None:
    """Send the run's last logs and events while the server is still up (Prefect would try at exit,
    after pkt stopped it)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        try:
            worker.drain_all(timeout=10)
        except Exception:  # best effort: a lost log line is not worth failing a finished command
            pass


class TemporaryServer:
    """A Prefect API server in a child process on a free port of 127.0.0.1, logging to a file. spawn()
    starts the process, which imports Prefect's server and builds its app, then waits; start() tells it
    to go on (open its database, serve) and waits until it answers."""

    def __init__(self):
        self.process: subprocess.Popen | None = None
        self.port: int | None = None
        home = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()
        (home / "logs").mkdir(parents=True, exist_ok=True)
        self.setup_lock = home / "pkt-server-setup.lock"
        fd, log = tempfile.mkstemp(prefix="pkt-server-", suffix=".log", dir=home / "logs")
        os.close(fd)
        self.log = Path(log)
        self.port_file = self.log.with_suffix(".port")

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def command(self, port_file: Path) -> list[str]:
        return [sys.executable, "-m", "pkt.flows.server", "--parent", str(os.getpid()), "--port-file", str(port_file)]

    def spawn(self) -> TemporaryServer:
        """Start the server's process; it touches nothing of PREFECT_HOME's database until start()."""
        if self.process is None:
            with self.log.open("ab") as log:
                # its own session: a Ctrl-C meant for pkt must not kill the server pkt still reports to
                self.process = subprocess.Popen(self.command(self.port_file), stdin=subprocess.PIPE, stdout=log,
                                                stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def start(self, timeout: float) -> None:
        """Start the server and wait until it answers. Servers of one PREFECT_HOME start one at a time:
        each creates or migrates Prefect's database on start-up, and two at once on a fresh home
        fail ("table block_type already exists"); the lock is released once the server answers."""
        fd = os.open(self.setup_lock, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._start(timeout)
        finally:
            os.close(fd)

    def _start(self, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        try:
            self.spawn()
            with contextlib.suppress(OSError):  # a process that already exited: said below
                self.process.stdin.write(GO)
                self.process.stdin.close()
            with httpx.Client(timeout=5) as client:
                while time.monotonic() < deadline:
                    if self.process.poll() is not None:
                        raise PrefectUnavailable(f"Prefect's temporary API server exited with code "
                                                 f"{self.process.returncode} while starting; its log {self.log} says "
                                                 f"why (its last line: {_last_line(self.log)!r})")
                    if self.port is None and self.port_file.exists():
                        self.port = int(self.port_file.read_text())
                    if self.port is not None:
                        with contextlib.suppress(httpx.HTTPError):
                            if client.get(f"{self.api_url}/health").status_code == 200:
                                return
                    time.sleep(0.05 if self.port is None else 0.1)
            raise PrefectUnavailable(
                f"Prefect's temporary API server did not answer within {timeout:.0f} s (a busy machine starts it "
                f"slowly; its log: {self.log}); rerun with {TIMEOUT_VAR}={max(2 * timeout, 600):.0f}, or {UI_HINT}")
        except BaseException:
            self.stop(keep_log=True)
            raise
        finally:
            self.port_file.unlink(missing_ok=True)

    def stop(self, keep_log: bool = False) -> None:
        if self.process is not None:
            with contextlib.suppress(OSError):  # a server not told to go exits when its stdin closes
                self.process.stdin.close()
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        self.port_file.unlink(missing_ok=True)
        if not keep_log:
            self.log.unlink(missing_ok=True)


def _last_line(path: Path) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1][:200] if lines else ""


# ---- the server process ----------------------------------------------------------------------
def serve(parent: int, port_file: Path) -> None:
    """Serve Prefect's API (no UI, the ephemeral set of services) until SIGTERM/SIGINT or until the
    parent process is gone. Its imports and app come first; its database and port only once the
    parent writes GO to its stdin (it exits if the parent closes stdin without)."""
    import socket

    import uvicorn
    from prefect.server.api.server import create_app

    server = uvicorn.Server(uvicorn.Config(create_app(ephemeral=True, final=True), log_level="error",
                                           lifespan="on"))
    threading.Thread(target=_watch_parent, args=(parent, server), daemon=True).start()
    if sys.stdin.buffer.readline() != GO:
        return
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))  # the kernel picks a free port: no race with other servers
    tmp = port_file.with_suffix(".tmp")
    tmp.write_text(str(sock.getsockname()[1]))
    os.replace(tmp, port_file)
    server.run(sockets=[sock])


def _watch_parent(parent: int, server) -> None:
    while os.getppid() == parent:
        time.sleep(WATCH_INTERVAL)
    server.should_exit = True  # the orphaned server shuts down cleanly ...
    time.sleep(STOP_GRACE)
    os._exit(1)  # ... or is gone anyway after the grace period


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="pkt's temporary Prefect API server (started by pkt commands)")
    ap.add_argument("--parent", type=int, required=True, help="process id whose exit stops this server")
    ap.add_argument("--port-file", type=Path, required=True, help="where to write the chosen port")
    args = ap.parse_args(argv)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault(TRIGGERS_VAR, "false")
    serve(args.parent, args.port_file)


if __name__ == "__main__":
    main()
