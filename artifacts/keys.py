"""Artifact identity: the key (input address) and the digest (content address)."""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

CHUNK = 1 << 22


def canonical_json(obj) -> str:
    """One spelling per value: sorted keys, no spaces, finite floats only."""
    _check_finite(obj)
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _check_finite(obj) -> None:
    if isinstance(obj, float) and not math.isfinite(obj):
        raise ValueError(f"parameter value {obj} is not finite; keys need finite numbers")
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"parameter names must be strings, got {k!r}")
            _check_finite(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _check_finite(v)


def artifact_key(kind: str, kind_version: int, params: dict, inputs: dict[str, str]) -> str:
    """sha256 of {kind, kind_version, params, inputs: {name: digest}}: known before any work."""
    doc = {"kind": kind, "kind_version": kind_version, "params": params, "inputs": inputs}
    return hashlib.sha256(canonical_json(doc).encode()).hexdigest()


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()
