"""The store's refs: records that name an artifact by (kind, key) and point at its digest (keys,
lookup, search), and the per-node locks.

  keys/<kind>/<key>.json        record: digest, layout, params, inputs, pkt version, seconds, peak RSS, host, created
  locks/<kind>/<key>.lock       held while one process computes that node
Reading needs no write access: lookups, ls, show and find take no lock and create nothing.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from .blobs import SHA256, CorruptBlob, Ref, StoreError, _flock, _fsync, _fsync_dir, safetensors_header
from .keys import artifact_key, canonical_json

LAYOUTS = ("safetensors", "tree", "blob")


def pkt_version() -> str:
    from pkt.core import __version__

    return __version__


def record_problem(rec, kind: str, key: str) -> str | None:
    """Why a parsed record cannot be used (None if it can): every field a reader relies on, typed,
    and naming the kind and key it is stored under (a record copied to another key is foreign)."""
    if not isinstance(rec, dict):
        return "is not a JSON object"
    for name, typ in (("kind", str), ("key", str), ("digest", str), ("layout", str), ("params", dict),
                      ("inputs", dict)):
        if not isinstance(rec.get(name), typ):
            return f'has no "{name}" {typ.__name__}'
    if (rec["kind"], rec["key"]) != (kind, key):
        return f"names {rec['kind']} {rec['key'][:12]} but is stored as {kind} {key[:12]}"
    if not SHA256.match(rec["digest"]):
        return f'has a "digest" that is not a sha256 ({rec["digest"][:20]!r})'
    if rec["layout"] not in LAYOUTS:
        return f'has an unknown "layout" {rec["layout"][:20]!r}'
    return None



class Records:
    """Find, read and write records; root and misses are the façade's (store.Store)."""

    def record_path(self, kind: str, key: str) -> Path:
        return self.root / "keys" / kind / f"{key}.json"

    # ---- keys and records --------------------------------------------------------------
    @staticmethod
    def key(kind: str, params: dict, inputs: dict[str, str], kind_version: int = 1) -> str:
        return artifact_key(kind, kind_version, params, inputs)

    def record(self, kind: str, key: str) -> dict | None:
        """The record of (kind, key), or None if absent or unusable (noted in misses)."""
        p = self.record_path(kind, key)
        try:
            rec = json.loads(p.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError, RecursionError) as e:
            problem = f"is unreadable ({type(e).__name__})"
        else:
            problem = record_problem(rec, kind, key)
        if problem:
            self.misses.append(f"{kind} {key[:12]}: record {p} {problem}; recomputing")
            return None
        return rec

    def lookup(self, kind: str, key: str) -> Ref | None:
        """The stored artifact for this key, if present and intact; a corrupt one is a miss (noted)."""
        rec = self.record(kind, key)
        if rec is None:
            return None
        ref = Ref(kind, key, rec["digest"])
        try:
            self._verify_artifact(ref, rec["layout"])
        except CorruptBlob as e:
            self.misses.append(f"{kind} {key[:12]}: {e}; recomputing")
            return None
        return ref

    def verify_ref(self, ref: Ref) -> None:
        rec = self.record(ref.kind, ref.key)
        self._verify_artifact(ref, rec["layout"] if rec and rec["digest"] == ref.digest else "blob")

    def _verify_artifact(self, ref: Ref, layout: str) -> None:
        self._verify_blob(ref.digest)
        if layout == "tree":
            for digest in self.manifest(ref).values():
                self._verify_blob(digest)
        elif layout == "safetensors":
            safetensors_header(self.blob_path(ref.digest))
        problem = self.claim_problem(ref, layout)
        if problem:
            raise CorruptBlob(problem)

    def claim_problem(self, ref: Ref, layout: str) -> str | None:
        """Why the artifact's own bytes say they are not ref's (None if they agree): a safetensors
        header and a manifest name the kind and key they were written for, so a record pointed at
        another node's blob is a miss, never that node's artifact. CorruptBlob if unreadable."""
        if layout == "safetensors":
            named = self.header(ref)
        elif layout == "tree":
            named = self.manifest_doc(ref.digest)
        else:
            return None  # a plain blob (a table) names nothing
        kind, key = named.get("kind"), named.get("key")
        if (kind, key) == (ref.kind, ref.key):
            return None
        if kind is None:
            return f"blob {ref.digest[:12]} names no kind and key (written by an older pkt)"
        return f"blob {ref.digest[:12]} holds {str(kind)[:20]} {str(key)[:12]}, not {ref.kind} {ref.key[:12]}"

    def _is_manifest(self, ref: Ref) -> bool:
        rec = self.record(ref.kind, ref.key)
        return bool(rec and rec["layout"] == "tree")

    def _same_record(self, kind: str, key: str, digest: str, layout: str, params: dict, inputs: dict) -> bool:
        rec = self.record(kind, key)
        return bool(rec) and (rec["digest"], rec["layout"], rec["params"], rec["inputs"]) == (
            digest, layout, json.loads(canonical_json(params)), inputs)

    def _write_record(self, kind: str, key: str, digest: str, params: dict, inputs: dict, seconds: float,
                      layout: str, execution: dict | None = None, description: dict | None = None,
                      measured: dict | None = None) -> Ref:
        """Publish the record (call under _lease, after its blobs). When (seconds, host, created) is
        all that would change, the existing record stays: they describe a run, not the artifact.
        description: what a person searches by (label, about, sources; artifacts/catalog.py)."""
        if self._same_record(kind, key, digest, layout, params, inputs):
            return Ref(kind, key, digest)
        rec = {"kind": kind, "key": key, "digest": digest, "layout": layout, "params": params, "inputs": inputs,
               "execution": execution or {}, "pkt_version": pkt_version(), "seconds": round(seconds, 3), "host": socket.gethostname(),
               "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **(description or {}), **(measured or {})}
        dest = self.record_path(kind, key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._tmp(".json")
        with self._cleanup_on_failure(tmp):
            tmp.write_text(json.dumps(rec, indent=1, sort_keys=True))
            _fsync(tmp)
            os.replace(tmp, dest)  # the record is published last: it only ever names finished blobs
        _fsync_dir(dest.parent)
        return Ref(kind, key, digest)

    # ---- concurrency -----------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, kind: str, key: str):
        """Exclusive while one process computes a node; others wait, then find it stored."""
        try:
            self._ensure_writable()
        except StoreError as e:
            raise StoreError(f"{kind} {key[:12]} is not in the store and must be computed, but {e}") from None
        with _flock(self.root / "locks" / kind / f"{key}.lock", fcntl.LOCK_EX):
            yield

    # ---- inspection and maintenance --------------------------------------------------------
    def records(self) -> list[dict]:
        """Every record; an unusable one as {kind, key, digest: '?', broken_record: path, problem}."""
        out = []
        for p in sorted((self.root / "keys").glob("*/*.json")):
            kind, key = p.parent.name, p.stem
            try:
                rec = json.loads(p.read_bytes())
            except (OSError, ValueError, RecursionError) as e:
                problem = f"is unreadable ({type(e).__name__})"
            else:
                problem = record_problem(rec, kind, key)
            out.append(rec if problem is None else
                       {"kind": kind, "key": key, "digest": "?", "broken_record": str(p), "problem": problem})
        return out

    def find(self, key_prefix: str) -> dict | None:
        hits = [r for r in self.records() if r["key"].startswith(key_prefix)]
        if len(hits) > 1:
            raise StoreError(f"key prefix {key_prefix!r} matches {len(hits)} artifacts; give more characters")
        return hits[0] if hits else None

    def matching(self, prefix: str) -> list[dict]:
        """The records whose key or digest starts with prefix (records cite their inputs by digest;
        several records can share one digest when their bytes are equal)."""
        prefix = prefix.strip().lower()
        if not prefix:
            return []
        return [r for r in self.records() if r["key"].startswith(prefix) or r["digest"].startswith(prefix)]
