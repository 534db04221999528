"""pkt ui and pkt deploy: the Prefect server and UI, and prefect.yaml's deployments."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path



def ui_command(port: int) -> list[str]:
    """The Prefect of pkt's own interpreter: works from any venv, on PATH or not."""
    return [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]



def cmd_ui(args) -> int:
    from pkt.core.inputs import check_port

    args.port = check_port(args.port)
    print(f"Prefect UI on http://127.0.0.1:{args.port} (bound to 127.0.0.1 only; see README before exposing it)")
    print(f"point runs at it with: export PREFECT_API_URL=http://127.0.0.1:{args.port}/api", flush=True)
    # the UI's browser code calls the API at PREFECT_UI_API_URL, which defaults to port 4200
    env = {**os.environ, "PREFECT_UI_API_URL": os.environ.get("PREFECT_UI_API_URL")
           or f"http://127.0.0.1:{args.port}/api"}
    server = subprocess.Popen(ui_command(args.port), env=env)
    try:
        return server.wait()
    finally:
        if server.poll() is None:  # pkt was stopped (SIGTERM, Ctrl-C): so is its server
            server.terminate()
            try:
                server.wait(15)
            except subprocess.TimeoutExpired:
                server.kill()



def cmd_deploy(args) -> int:
    from .deploy import deploy

    deploy(Path(args.checkout), args.name, size=args.size, notify=args.notify)
    return 0
