"""Flow run names a person scanning the UI can read: the command and the parameters that tell its runs
apart (`demo[size=test]`, `sweep[config=mine]`), instead of Prefect's random two words."""
from __future__ import annotations

from pathlib import Path
from typing import Callable


def _short(value) -> str:
    """A parameter as a short token: a path by its last part, a list joined by commas."""
    if isinstance(value, (list, tuple)):
        return ",".join(_short(v) for v in value)
    text = str(value)
    return Path(text).name if "/" in text else text


def describe(command: str, params: dict, fields: tuple[str, ...], extra: dict | None = None) -> str:
    """'command[field=value, ...]' over the fields that are set (and `extra`, already worked out)."""
    parts = [f"{f}={_short(params[f])}" for f in fields if params.get(f) is not None]
    parts += [f"{k}={v}" for k, v in (extra or {}).items()]
    return f"{command}[{', '.join(parts)}]"


def run_name(command: str, *fields: str, extra: Callable[[dict], dict] | None = None) -> Callable[[], str]:
    """A flow's `flow_run_name`: called by Prefect when the run starts, with the run's parameters."""

    def name() -> str:
        from prefect.runtime import flow_run

        params = dict(flow_run.parameters or {})
        return describe(command, params, fields, extra(params) if extra else None)

    return name
