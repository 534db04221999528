"""Artifact identity: the key (input address) and the digest (content address)."""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

from pkt.core.errors import UserError

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


class InputChanged(UserError):
    """A file changed between the moment its digest was taken and the moment it was read."""


def file_stamp(path: str | Path) -> tuple[int, int, int, int, int]:
    """(device, inode, size, mtime_ns, ctime_ns): every write changes it. A user can restore an mtime
    (touch -d, os.utime) but not a ctime, and replacing a file changes its inode."""
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def stamped_file_digest(path: str | Path, tries: int = 3) -> tuple[str, tuple]:
    """The file's digest and the stamp it had throughout the hashing (taken again until the file
    holds still): the digest is of exactly the bytes that stamp names."""
    for _ in range(tries):
        before = file_stamp(path)
        digest = file_digest(path)
        if file_stamp(path) == before:
            return digest, before
    raise InputChanged(f"{path} kept changing while pkt hashed it; wait until whatever writes it has finished, "
                       "then run again")
