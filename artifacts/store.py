"""The content-addressed store.

Four rooms, as git splits objects, refs and the working tree: blobs.py (write, read, digest),
records.py (keys, lookup, search), trees.py (materialize, verify a tree) and maintenance.py (verify,
gc, temp reaping). Store is the façade the tasks use. Layout under the root:
  blobs/sha256/ab/<digest>      immutable bytes, named by their sha256
  keys/<kind>/<key>.json        record: digest, layout, params, inputs, pkt version, seconds, peak RSS, host, created
  trees/<digest>/...            a directory artifact as hard links to its blobs: a cache, checked when used
  locks/<kind>/<key>.lock       held while one process computes that node
  locks/gc.lock                 shared by every write from its first blob to its record; gc takes it alone
  tmp/proc-<host>-<pid>-<x>/    one live process's in-flight writes (its .lock beside it is held while it lives)
A directory artifact's digest is that of its manifest blob {"kind", "key", "files": {relpath: digest}}.
Every write goes to a temp file, is fsynced and renamed: a reader sees all or nothing. Reading needs
no write access: lookups, ls, show and verify take no lock and create nothing.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from .blobs import SHA256, _VERIFIED, Blobs, CorruptBlob, Ref, StoreError, safetensors_header, sort_safetensors_metadata
from .keys import canonical_json
from .maintenance import TMP_MAX_AGE, Maintenance
from .records import LAYOUTS, Records, pkt_version, record_problem
from .trees import Trees, check_relpath, lasting_root

__all__ = ["DEFAULT_ROOT", "LAYOUTS", "SHA256", "TMP_MAX_AGE", "CorruptBlob", "Ref", "Store", "StoreError",
           "check_relpath", "default_root", "lasting_root", "pkt_version", "record_problem", "safetensors_header",
           "sort_safetensors_metadata"]

DEFAULT_ROOT = Path(".pkt") / "store"


def default_root() -> Path:
    return Path(os.environ.get("PKT_STORE") or DEFAULT_ROOT).expanduser()



class Store(Blobs, Records, Trees, Maintenance):
    """The store of one root: the rooms' methods over one root, one memo of verified blobs and one
    list of misses; writing an artifact (its blobs, then its record) is done here."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root).expanduser() if root is not None else default_root()  # a quoted ~ is home
        self._verified = _VERIFIED.setdefault(str(self.root.absolute()), {})
        self.misses: list[str] = []  # human-readable notes of corrupt entries met (and repaired trees)
        self._writable = False  # probed on the first write, not on every one


    # ---- writing an artifact: its blobs, then its record, under one lease ----------------------
    def put_blob(self, kind: str, key: str, data: bytes, *, params: dict, inputs: dict[str, str],
                 seconds: float = 0.0) -> Ref:
        """Store bytes as an artifact (layout 'blob'). Storing what the store already holds writes
        nothing, so a run on a complete read-only store can record the same table again."""
        digest = hashlib.sha256(data).hexdigest()
        if self._same_record(kind, key, digest, "blob", params, inputs) and self._blob_ok(digest):
            return Ref(kind, key, digest)
        with self._lease():
            digest = self._write_blob(data)
            return self._write_record(kind, key, digest, params, inputs, seconds, "blob")

    def put_tensors(self, kind: str, key: str, tensors: dict[str, torch.Tensor], *, params: dict,
                    inputs: dict[str, str], seconds: float = 0.0, metadata: dict[str, str] | None = None,
                    execution: dict | None = None, description: dict | None = None,
                    measured: dict | None = None) -> Ref:
        """Store tensors as one safetensors blob whose header names kind, key and params."""
        meta = {"kind": kind, "key": key, "params": canonical_json(params), **(metadata or {})}
        with self._lease():
            tmp = self._tmp(".safetensors")
            with self._cleanup_on_failure(tmp, needed=sum(t.nelement() * t.element_size() for t in tensors.values())):
                save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=meta)
                sort_safetensors_metadata(tmp)
                digest = self._publish_blob(tmp)
            return self._write_record(kind, key, digest, params, inputs, seconds, "safetensors", execution,
                                      description, measured)

    def put_tree(self, kind: str, key: str, directory: str | Path, *, params: dict, inputs: dict[str, str],
                 seconds: float = 0.0, execution: dict | None = None, description: dict | None = None,
                 measured: dict | None = None) -> Ref:
        """Store every file of a directory (a peft adapter, an HF model dir) and a manifest of them.
        safetensors headers are stored with sorted metadata: the library writes them in hash order."""
        directory = Path(directory)
        files = {}
        total = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
        with self._lease():  # from the first blob to the record: gc waits
            for p in sorted(directory.rglob("*")):
                if p.is_file():
                    tmp = self._tmp()
                    with self._cleanup_on_failure(tmp, needed=total):
                        shutil.copyfile(p, tmp)
                        if p.suffix == ".safetensors":
                            sort_safetensors_metadata(tmp)
                        files[p.relative_to(directory).as_posix()] = self._publish_blob(tmp)
            if not files:
                raise StoreError(f"{directory}: nothing to store, the directory is empty")
            digest = self._write_blob(canonical_json({"kind": kind, "key": key, "files": files}).encode())
            return self._write_record(kind, key, digest, params, inputs, seconds, "tree", execution, description,
                                      measured)
