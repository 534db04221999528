"""The content-addressed store.

Layout under the root:
  blobs/sha256/ab/<digest>      immutable bytes, named by their sha256
  keys/<kind>/<key>.json        record: digest, params, inputs, pkt version, seconds, host, created
  trees/<digest>/...            a directory artifact materialized as hard links to its blobs
  locks/<kind>/<key>.lock       held while one process computes that node
A directory artifact's digest is that of its manifest blob {"files": {relpath: digest}}.
Every write goes to a temp file, is fsynced and renamed: a reader sees all or nothing.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch
from safetensors.torch import load_file, save_file

from .keys import artifact_key, canonical_json, file_digest

DEFAULT_ROOT = Path(".pkt") / "store"


class StoreError(RuntimeError):
    pass


class CorruptBlob(StoreError):
    pass


def default_root() -> Path:
    return Path(os.environ.get("PKT_STORE") or DEFAULT_ROOT)


def pkt_version() -> str:
    from pkt.core import __version__

    return __version__


@dataclass(frozen=True)
class Ref:
    """What tasks pass around: small, JSON-friendly, enough to find the bytes."""

    kind: str
    key: str
    digest: str

    def as_dict(self) -> dict:
        return {"kind": self.kind, "key": self.key, "digest": self.digest}

    @classmethod
    def of(cls, d) -> "Ref":
        return d if isinstance(d, Ref) else cls(d["kind"], d["key"], d["digest"])


# digest -> (size, mtime_ns) of blobs this process has hashed, per store root: a flow and its
# tasks open their own Store objects but should hash a (possibly many-GB) blob once, not twice
_VERIFIED: dict[str, dict[str, tuple[int, int]]] = {}


class Store:
    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else default_root()
        self._verified = _VERIFIED.setdefault(str(self.root.absolute()), {})
        self.misses: list[str] = []  # human-readable notes of corrupt entries met
        self._writable = False  # probed on the first write, not on every one

    # ---- paths -------------------------------------------------------------------------
    def blob_path(self, digest: str) -> Path:
        return self.root / "blobs" / "sha256" / digest[:2] / digest

    def record_path(self, kind: str, key: str) -> Path:
        return self.root / "keys" / kind / f"{key}.json"

    def _ensure_writable(self) -> None:
        if self._writable:
            return
        try:
            (self.root / "tmp").mkdir(parents=True, exist_ok=True)
            probe = tempfile.NamedTemporaryFile(dir=self.root / "tmp", delete=True)
            probe.close()
        except OSError as e:
            raise StoreError(f"store root {self.root} is not writable ({e.strerror}); pass --store DIR or set "
                             "PKT_STORE to a directory you can write") from None

    # ---- keys and records --------------------------------------------------------------
    @staticmethod
    def key(kind: str, params: dict, inputs: dict[str, str], kind_version: int = 1) -> str:
        return artifact_key(kind, kind_version, params, inputs)

    def record(self, kind: str, key: str) -> dict | None:
        p = self.record_path(kind, key)
        try:
            return json.loads(p.read_text())
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError):
            self.misses.append(f"{kind} {key[:12]}: unreadable record {p}; recomputing")
            return None

    def lookup(self, kind: str, key: str) -> Ref | None:
        """The stored artifact for this key, if present and intact; a corrupt one is a miss (noted)."""
        rec = self.record(kind, key)
        if rec is None:
            return None
        ref = Ref(kind, key, rec["digest"])
        try:
            self.verify_ref(ref)
        except CorruptBlob as e:
            self.misses.append(f"{kind} {key[:12]}: {e}; recomputing")
            return None
        return ref

    def verify_ref(self, ref: Ref) -> None:
        self._verify_blob(ref.digest)
        if self._is_manifest(ref):
            for digest in self.manifest(ref).values():
                self._verify_blob(digest)

    def _is_manifest(self, ref: Ref) -> bool:
        rec = self.record(ref.kind, ref.key)
        return bool(rec and rec.get("layout") == "tree")

    def _verify_blob(self, digest: str) -> None:
        p = self.blob_path(digest)
        try:
            st = p.stat()
        except FileNotFoundError:
            raise CorruptBlob(f"blob {digest[:12]} is missing") from None
        if self._verified.get(digest) == (st.st_size, st.st_mtime_ns):
            return
        if file_digest(p) != digest:
            raise CorruptBlob(f"blob {digest[:12]} does not match its digest")
        self._verified[digest] = (st.st_size, st.st_mtime_ns)

    # ---- writing -------------------------------------------------------------------------
    def _tmp(self, suffix: str = "") -> Path:
        self._ensure_writable()
        fd, name = tempfile.mkstemp(dir=self.root / "tmp", suffix=suffix)
        os.close(fd)
        return Path(name)

    def _publish_blob(self, tmp: Path) -> str:
        """Move a finished temp file into blobs/ under its digest."""
        _fsync(tmp)
        digest = file_digest(tmp)
        dest = self.blob_path(digest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(tmp, 0o444)
        os.replace(tmp, dest)  # same content under the same name: a concurrent writer is harmless
        _fsync_dir(dest.parent)
        st = dest.stat()
        self._verified[digest] = (st.st_size, st.st_mtime_ns)
        return digest

    @contextlib.contextmanager
    def scratch_dir(self):
        """A temporary directory inside the store (same filesystem: its files move in cheaply)."""
        self._ensure_writable()
        with tempfile.TemporaryDirectory(dir=self.root / "tmp") as d:
            yield Path(d)

    def put_bytes(self, data: bytes) -> str:
        tmp = self._tmp()
        with self._cleanup_on_failure(tmp):
            tmp.write_bytes(data)
            return self._publish_blob(tmp)

    @contextlib.contextmanager
    def _cleanup_on_failure(self, tmp: Path):
        """No half-written temp file survives a failure; a full disk is a clear error."""
        try:
            yield
        except BaseException as e:
            tmp.unlink(missing_ok=True)
            if isinstance(e, OSError) and e.errno == errno.ENOSPC:
                raise StoreError(f"store root {self.root}: the disk is full; nothing was stored. Free space, "
                                 "run `pkt store gc`, or move the store with --store DIR / PKT_STORE") from None
            raise

    def _write_record(self, kind: str, key: str, digest: str, params: dict, inputs: dict, seconds: float,
                      layout: str, execution: dict | None = None) -> Ref:
        rec = {"kind": kind, "key": key, "digest": digest, "layout": layout, "params": params, "inputs": inputs,
               "execution": execution or {}, "pkt_version": pkt_version(), "seconds": round(seconds, 3), "host": socket.gethostname(),
               "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        dest = self.record_path(kind, key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._tmp(".json")
        tmp.write_text(json.dumps(rec, indent=1, sort_keys=True))
        _fsync(tmp)
        os.replace(tmp, dest)  # the record is published last: it only ever names finished blobs
        _fsync_dir(dest.parent)
        return Ref(kind, key, digest)

    def put_tensors(self, kind: str, key: str, tensors: dict[str, torch.Tensor], *, params: dict,
                    inputs: dict[str, str], seconds: float = 0.0, metadata: dict[str, str] | None = None,
                    execution: dict | None = None) -> Ref:
        """Store tensors as one safetensors blob whose header names kind, key and params."""
        meta = {"kind": kind, "key": key, "params": canonical_json(params), **(metadata or {})}
        tmp = self._tmp(".safetensors")
        with self._cleanup_on_failure(tmp):
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=meta)
            digest = self._publish_blob(tmp)
        return self._write_record(kind, key, digest, params, inputs, seconds, "safetensors", execution)

    def put_tree(self, kind: str, key: str, directory: str | Path, *, params: dict, inputs: dict[str, str],
                 seconds: float = 0.0, execution: dict | None = None) -> Ref:
        """Store every file of a directory (a peft adapter, an HF model dir) and a manifest of them."""
        directory = Path(directory)
        files = {}
        for p in sorted(directory.rglob("*")):
            if p.is_file():
                tmp = self._tmp()
                with self._cleanup_on_failure(tmp):
                    shutil.copyfile(p, tmp)
                    files[p.relative_to(directory).as_posix()] = self._publish_blob(tmp)
        if not files:
            raise StoreError(f"{directory}: nothing to store, the directory is empty")
        digest = self.put_bytes(canonical_json({"files": files}).encode())
        return self._write_record(kind, key, digest, params, inputs, seconds, "tree", execution)

    # ---- reading -------------------------------------------------------------------------
    def tensors(self, ref: Ref | dict, device: str = "cpu") -> dict[str, torch.Tensor]:
        ref = Ref.of(ref)
        self._verify_blob(ref.digest)
        return load_file(str(self.blob_path(ref.digest)), device=device)

    def read_bytes(self, digest: str) -> bytes:
        """A plain blob's bytes (see put_bytes), verified against its digest."""
        self._verify_blob(digest)
        return self.blob_path(digest).read_bytes()

    def header(self, ref: Ref | dict) -> dict[str, str]:
        from safetensors import safe_open

        with safe_open(str(self.blob_path(Ref.of(ref).digest)), framework="pt") as f:
            return f.metadata() or {}

    def manifest(self, ref: Ref | dict) -> dict[str, str]:
        files = json.loads(self.blob_path(Ref.of(ref).digest).read_text())["files"]
        for rel in files:
            check_relpath(rel)
        return files

    def tree(self, ref: Ref | dict) -> Path:
        """A directory with the artifact's files (hard links to the verified blobs)."""
        ref = Ref.of(ref)
        self.verify_ref(ref)
        dest = self.root / "trees" / ref.digest
        if dest.exists():
            return dest
        tmp = Path(tempfile.mkdtemp(dir=self.root / "tmp"))
        for rel, digest in self.manifest(ref).items():
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(self.blob_path(digest), target)
            except OSError:
                shutil.copyfile(self.blob_path(digest), target)
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(tmp, dest)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not dest.exists():  # not a concurrent materialization: a real failure
                raise
        return dest

    def path(self, ref: Ref | dict) -> Path:
        """Where a user finds the artifact: the tree for directories, the blob for tensors."""
        ref = Ref.of(ref)
        return self.tree(ref) if self._is_manifest(ref) else self.blob_path(ref.digest)

    # ---- concurrency -----------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, kind: str, key: str):
        """Exclusive while one process computes a node; others wait, then find it stored."""
        self._ensure_writable()
        p = self.root / "locks" / kind / f"{key}.lock"
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # ---- inspection and maintenance --------------------------------------------------------
    def records(self) -> list[dict]:
        out = []
        for p in sorted((self.root / "keys").glob("*/*.json")):
            try:
                out.append(json.loads(p.read_text()))
            except (json.JSONDecodeError, UnicodeDecodeError):
                out.append({"kind": p.parent.name, "key": p.stem, "digest": "?", "broken_record": str(p)})
        return out

    def find(self, key_prefix: str) -> dict | None:
        hits = [r for r in self.records() if r["key"].startswith(key_prefix)]
        if len(hits) > 1:
            raise StoreError(f"key prefix {key_prefix!r} matches {len(hits)} artifacts; give more characters")
        return hits[0] if hits else None

    def _blob_users(self) -> tuple[dict[str, list[str]], list[str]]:
        """digest -> the records (and manifest entries) that use it, and unreadable records/manifests."""
        users: dict[str, list[str]] = {}
        problems = []
        for rec in self.records():
            if "broken_record" in rec:
                problems.append(f"{rec['kind']} {rec['key']}: unreadable record {rec['broken_record']}")
                continue
            users.setdefault(rec["digest"], []).append(f"{rec['kind']} {rec['key']}")
            if rec.get("layout") == "tree" and self.blob_path(rec["digest"]).exists():
                try:
                    for rel, d in self.manifest(Ref.of(rec)).items():
                        users.setdefault(d, []).append(f"{rec['kind']} {rec['key']} ({rel})")
                except (ValueError, json.JSONDecodeError) as e:
                    problems.append(f"{rec['kind']} {rec['key']}: bad manifest ({e})")
        return users, problems

    def verify(self) -> list[str]:
        """Re-hash every blob; one line per problem, naming the kind and key that use it."""
        users, problems = self._blob_users()
        for digest, who in sorted(users.items()):
            p = self.blob_path(digest)
            if not p.exists():
                problems.extend(f"{w}: blob {digest[:12]} is missing" for w in who)
            elif file_digest(p) != digest:
                problems.extend(f"{w}: blob {digest[:12]} does not match its digest" for w in who)
        return problems

    def referenced(self) -> set[str]:
        return set(self._blob_users()[0])

    def gc(self, dry_run: bool = False) -> list[Path]:
        """Remove blobs no record references (and leftovers of interrupted writes)."""
        keep = self.referenced()
        doomed = [p for p in (self.root / "blobs" / "sha256").glob("*/*") if p.name not in keep]
        doomed += [p for p in (self.root / "trees").glob("*") if p.name not in keep]
        cutoff = time.time() - 3600  # a temp file this old belongs to no live writer
        doomed += [p for p in (self.root / "tmp").glob("*") if p.stat().st_mtime < cutoff]
        if not dry_run:
            for p in doomed:
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        return doomed


def check_relpath(rel: str) -> None:
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or rel.startswith("\\") or ":" in p.parts[0]:
        raise ValueError(f"manifest path {rel!r} would escape the store; only relative paths inside it are allowed")


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
