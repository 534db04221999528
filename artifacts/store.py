"""The content-addressed store.

Layout under the root:
  blobs/sha256/ab/<digest>      immutable bytes, named by their sha256
  keys/<kind>/<key>.json        record: digest, layout, params, inputs, pkt version, seconds, peak RSS, host, created
  trees/<digest>/...            a directory artifact as hard links to its blobs: a cache, checked when used
  locks/<kind>/<key>.lock       held while one process computes that node
  locks/gc.lock                 shared by every write from its first blob to its record; gc takes it alone
  tmp/proc-<host>-<pid>-<x>/    one live process's in-flight writes (its .lock beside it is held while it lives)
A directory artifact's digest is that of its manifest blob {"files": {relpath: digest}}.
Every write goes to a temp file, is fsynced and renamed: a reader sees all or nothing. Reading needs
no write access: lookups, ls, show and verify take no lock and create nothing.
"""
from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import functools
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import stat
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch
from safetensors.torch import load_file, save_file

from pkt.core.errors import UserError

from .keys import artifact_key, canonical_json, file_digest

DEFAULT_ROOT = Path(".pkt") / "store"
LAYOUTS = ("safetensors", "tree", "blob")
SHA256 = re.compile(r"[0-9a-f]{64}\Z")
TMP_MAX_AGE = 3600  # seconds: a temp entry outside any live process's area this old belongs to no writer
log = logging.getLogger("pkt.store")


class StoreError(UserError, RuntimeError):
    pass


class CorruptBlob(StoreError):
    pass


def lasting_root() -> Path:
    """Where the folders of a read-only store are built for a person to use: $PKT_TREE_CACHE, else
    $XDG_CACHE_HOME/pkt/trees (~/.cache/pkt/trees)."""
    if os.environ.get("PKT_TREE_CACHE"):
        return Path(os.environ["PKT_TREE_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "pkt" / "trees"


def default_root() -> Path:
    return Path(os.environ.get("PKT_STORE") or DEFAULT_ROOT).expanduser()


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


# digest -> (size, mtime_ns) of blobs this process has hashed, per store root: a flow and its
# tasks open their own Store objects but should hash a (possibly many-GB) blob once, not twice
_VERIFIED: dict[str, dict] = {}
# store root -> (this process's temp area, the fd whose lock says the process lives)
_AREAS: dict[str, tuple[Path, int]] = {}
_AREAS_LOCK = threading.Lock()


def _release_areas() -> None:
    """This process's temp areas go when it exits normally (gc reaps those of a killed one). A forked
    child inherits its parent's entries: it leaves those alone (their lock is the parent's)."""
    with _AREAS_LOCK:
        for root, (area, fd) in list(_AREAS.items()):
            if f"-{os.getpid()}-" not in area.name:
                continue
            shutil.rmtree(area, ignore_errors=True)
            Path(f"{area}.lock").unlink(missing_ok=True)
            os.close(fd)
            del _AREAS[root]


@functools.lru_cache(maxsize=None)
def _release_areas_at_exit(pid: int) -> None:
    """At interpreter exit, and at a multiprocessing child's exit (a forked pool process ends with
    os._exit: its finalizers run, its atexit hooks do not)."""
    import multiprocessing.util

    atexit.register(_release_areas)
    multiprocessing.util.Finalize(None, _release_areas, exitpriority=0)


# (store root, digest) -> a tree materialized outside a read-only store
_PRIVATE_TREES: dict[tuple[str, str], Path] = {}


class Store:
    def __init__(self, root: str | Path | None = None):
        self.root = Path(root).expanduser() if root is not None else default_root()  # a quoted ~ is home
        self._verified = _VERIFIED.setdefault(str(self.root.absolute()), {})
        self.misses: list[str] = []  # human-readable notes of corrupt entries met (and repaired trees)
        self._writable = False  # probed on the first write, not on every one

    # ---- paths -------------------------------------------------------------------------
    def blob_path(self, digest: str) -> Path:
        return self.root / "blobs" / "sha256" / digest[:2] / digest

    def record_path(self, kind: str, key: str) -> Path:
        return self.root / "keys" / kind / f"{key}.json"

    def require_store(self) -> None:
        """For the store tools: a path that is not a store is an error, not an empty store."""
        if not self.root.is_dir():
            raise StoreError(f"{self.root} is not a pkt store: no such directory; give the --store (or PKT_STORE) "
                             "the run used (default ./.pkt/store)")
        # a first run stopped before its first record leaves only tmp/ (and locks/): still a store, so
        # that gc can reclaim what it left
        if not any((self.root / d).is_dir() for d in ("keys", "blobs", "tmp")):
            raise StoreError(f"{self.root} is not a pkt store: it has no keys/, blobs/ or tmp/; give the --store (or "
                             "PKT_STORE) the run used (default ./.pkt/store)")

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
        self._writable = True

    def writable(self) -> bool:
        try:
            self._ensure_writable()
        except StoreError:
            return False
        return True

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

    def _is_manifest(self, ref: Ref) -> bool:
        rec = self.record(ref.kind, ref.key)
        return bool(rec and rec["layout"] == "tree")

    def _verify_blob(self, digest: str, trust_memo: bool = True) -> None:
        p = self.blob_path(digest)
        try:
            st = p.stat()
        except FileNotFoundError:
            raise CorruptBlob(f"blob {digest[:12]} is missing") from None
        except OSError as e:
            raise CorruptBlob(f"blob {digest[:12]} is unreadable ({e.strerror})") from None
        if not stat.S_ISREG(st.st_mode):
            raise CorruptBlob(f"blob {digest[:12]} is not a regular file")
        if trust_memo and self._verified.get(digest) == (st.st_size, st.st_mtime_ns):
            return
        try:
            ok = file_digest(p) == digest
        except OSError as e:
            raise CorruptBlob(f"blob {digest[:12]} is unreadable ({e.strerror})") from None
        if not ok:
            raise CorruptBlob(f"blob {digest[:12]} does not match its digest")
        self._verified[digest] = (st.st_size, st.st_mtime_ns)

    def _blob_ok(self, digest: str) -> bool:
        try:
            self._verify_blob(digest)
        except CorruptBlob:
            return False
        return True

    # ---- writing -------------------------------------------------------------------------
    @contextlib.contextmanager
    def _lease(self):
        """Held (shared) by a write from its first blob to its record, so gc, which takes it
        exclusively, never sees a published blob whose record is still to come."""
        self._ensure_writable()
        with _flock(self.root / "locks" / "gc.lock", fcntl.LOCK_SH):
            yield

    def tmp_dir(self) -> Path:
        """This process's temp area in the store (same filesystem as blobs/, so renames are atomic).
        gc leaves it alone while the process lives, however long its work takes, and removes it
        once the process is gone (its lock file is then free)."""
        root = str(self.root.absolute())
        with _AREAS_LOCK:
            area = _AREAS.get(root)
            if area and area[0].is_dir():
                return area[0]
            if area:  # someone removed our area: start a new one
                os.close(area[1])
            with self._lease():  # gc cannot judge the area between its lock file and its directory
                name = f"proc-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
                fd = os.open(self.root / "tmp" / f"{name}.lock", os.O_CREAT | os.O_RDWR, 0o644)
                fcntl.flock(fd, fcntl.LOCK_EX)
                (self.root / "tmp" / name).mkdir()
            _AREAS[root] = (self.root / "tmp" / name, fd)
            _release_areas_at_exit(os.getpid())  # once per process (a forked child registers its own)
            return self.root / "tmp" / name

    def _tmp(self, suffix: str = "") -> Path:
        fd, name = tempfile.mkstemp(dir=self.tmp_dir(), suffix=suffix)
        os.close(fd)
        return Path(name)

    def _publish_blob(self, tmp: Path) -> str:
        """Move a finished temp file into blobs/ under its digest (call under _lease)."""
        _fsync(tmp)
        digest = file_digest(tmp)
        if self._blob_ok(digest):  # keep the intact copy: trees link to its inode
            tmp.unlink()
            return digest
        dest = self.blob_path(digest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(tmp, 0o444)
        os.replace(tmp, dest)  # replaces a corrupt copy; a concurrent writer of the same bytes is harmless
        _fsync_dir(dest.parent)
        st = dest.stat()
        self._verified[digest] = (st.st_size, st.st_mtime_ns)
        return digest

    def _write_blob(self, data: bytes) -> str:
        tmp = self._tmp()
        with self._cleanup_on_failure(tmp, needed=len(data)):
            tmp.write_bytes(data)
            return self._publish_blob(tmp)

    def put_bytes(self, data: bytes) -> str:
        """A blob no record names: gc may remove it once this returns. Artifacts use put_blob."""
        digest = hashlib.sha256(data).hexdigest()
        if self._blob_ok(digest):  # nothing to write (a read-only store holding it answers too)
            return digest
        with self._lease():
            return self._write_blob(data)

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

    @contextlib.contextmanager
    def _cleanup_on_failure(self, tmp: Path, needed: int | None = None):
        """No half-written temp file survives a failure; a full disk is a clear error."""
        try:
            yield
        except BaseException as e:
            tmp.unlink(missing_ok=True)
            self.raise_if_disk_full(e, needed)
            raise

    def raise_if_disk_full(self, error: BaseException, needed: int | None = None, at_least: bool = False) -> None:
        """Turn a full disk (an OSError, or the SafetensorError safetensors raises instead) into one
        sentence naming the store, the space free and the space needed (at_least: a lower bound, what
        a computation had written when the disk filled)."""
        if not _is_disk_full(error):
            return
        try:
            free = f"{_mb(shutil.disk_usage(self.root).free)} free"
        except OSError:
            free = "no space left"
        need = "" if needed is None else f", {'more than ' if at_least else ''}{_mb(needed)} needed"
        raise StoreError(f"store root {self.root}: the disk is full ({free}{need}); nothing was stored. Free "
                         "space, run `pkt store gc`, or move the store with --store DIR / PKT_STORE") from None

    @contextlib.contextmanager
    def scratch_dir(self):
        """A temporary directory in this process's temp area (same filesystem: its files move in cheaply)."""
        with tempfile.TemporaryDirectory(dir=self.tmp_dir()) as d:
            yield Path(d)

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
            digest = self._write_blob(canonical_json({"files": files}).encode())
            return self._write_record(kind, key, digest, params, inputs, seconds, "tree", execution, description,
                                      measured)

    # ---- reading -------------------------------------------------------------------------
    def tensors(self, ref: Ref | dict, device: str = "cpu") -> dict[str, torch.Tensor]:
        ref = Ref.of(ref)
        self._verify_blob(ref.digest)
        return load_file(str(self.blob_path(ref.digest)), device=device)

    def read_bytes(self, digest: str) -> bytes:
        """A plain blob's bytes, verified against its digest."""
        self._verify_blob(digest)
        return self.blob_path(digest).read_bytes()

    def header(self, ref: Ref | dict) -> dict[str, str]:
        """A safetensors blob's metadata; CorruptBlob if the blob is not one."""
        return safetensors_header(self.blob_path(Ref.of(ref).digest)).get("__metadata__") or {}

    def manifest(self, ref: Ref | dict) -> dict[str, str]:
        """relpath -> digest of a tree artifact, verified and checked: CorruptBlob if unusable."""
        digest = Ref.of(ref).digest
        try:
            doc = json.loads(self.read_bytes(digest))
        except (ValueError, RecursionError):
            raise CorruptBlob(f"manifest {digest[:12]} is not JSON") from None
        files = doc.get("files") if isinstance(doc, dict) else None
        if not isinstance(files, dict) or not files:
            raise CorruptBlob(f'manifest {digest[:12]} has no "files" object')
        for rel, d in files.items():
            if not isinstance(d, str) or not SHA256.match(d):
                raise CorruptBlob(f"manifest {digest[:12]}: {rel!r} does not name a sha256 digest")
            try:
                check_relpath(rel)
            except ValueError as e:
                raise CorruptBlob(f"manifest {digest[:12]}: {e}") from None
        dirs = {str(parent) for rel in files for parent in PurePosixPath(rel).parents}
        if dirs & set(files):
            raise CorruptBlob(f"manifest {digest[:12]} names a file and a folder by one path")
        return files

    def tree(self, ref: Ref | dict) -> Path:
        """A directory with the artifact's files, checked against the manifest on every call (file
        set, and each file the blob's inode or its bytes); a missing or bad one is rebuilt from the
        verified blobs. On a read-only store a bad or missing tree is built outside the store."""
        ref = Ref.of(ref)
        self.verify_ref(ref)
        files = self.manifest(ref)
        dest = self.root / "trees" / ref.digest
        problem = self._tree_problem(dest, files)
        if problem is None:
            return dest
        if problem != "is missing":
            self._note(f"{ref.kind} {ref.key[:12]}: tree {dest} {problem}; rebuilt from its verified blobs")
        if not self.writable():
            return self._private_tree(ref.digest, files)
        with self._lease():
            return self._rebuild_tree(dest, files)

    def _note(self, msg: str) -> None:
        self.misses.append(msg)
        log.warning(msg)

    def _tree_problem(self, dest: Path, files: dict[str, str]) -> str | None:
        """Why dest is not exactly the manifest's files (None if it is)."""
        try:
            st = os.lstat(dest)
        except FileNotFoundError:
            return "is missing"
        if stat.S_ISLNK(st.st_mode):
            return "is a symlink"
        if not stat.S_ISDIR(st.st_mode):
            return "is not a directory"
        found: dict[str, str] = {}
        for dirpath, dirnames, filenames in os.walk(dest):  # never descends a symlinked folder
            for name in dirnames + filenames:
                path = os.path.join(dirpath, name)
                rel = os.path.relpath(path, dest).replace(os.sep, "/")
                if os.path.islink(path):
                    return f"holds a symlink {rel}"
                if name in filenames:
                    found[rel] = path
        if set(found) != set(files):
            odd = sorted(set(found) ^ set(files))[:3]
            return f"does not hold exactly the manifest's files ({', '.join(odd)})"
        for rel, digest in files.items():
            if not self._tree_file_ok(found[rel], digest):
                return f"has {rel} differing from its blob"
        return None

    def _tree_file_ok(self, path: str, digest: str) -> bool:
        try:
            st, blob = os.lstat(path), os.stat(self.blob_path(digest))
        except OSError:
            return False
        if not stat.S_ISREG(st.st_mode) or st.st_size != blob.st_size:
            return False
        if (st.st_dev, st.st_ino) == (blob.st_dev, blob.st_ino):
            return True  # the very bytes just verified
        stamp = ("tree", path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if self._verified.get(stamp) == digest:
            return True
        ok = file_digest(path) == digest  # a copy (no hard links across filesystems)
        if ok:
            self._verified[stamp] = digest
        return ok

    def _materialize(self, files: dict[str, str], into: Path) -> None:
        for rel, digest in files.items():
            target = into / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(self.blob_path(digest), target)
            except OSError:
                shutil.copyfile(self.blob_path(digest), target)
                os.chmod(target, 0o444)

    def _rebuild_tree(self, dest: Path, files: dict[str, str]) -> Path:
        trees = self.root / "trees"
        if not os.path.lexists(trees):
            trees.mkdir(exist_ok=True)
        if not _real_dir(trees):
            raise StoreError(f"{trees} is a symlink or not a directory; pkt keeps its trees there itself: "
                             "remove it and run again")
        new = Path(tempfile.mkdtemp(dir=self.tmp_dir()))
        self._materialize(files, new)
        if self._tree_problem(dest, files) is not None:  # another process may have just built it
            self._discard(dest)
        try:
            os.rename(new, dest)
        except OSError:
            shutil.rmtree(new, ignore_errors=True)
            problem = self._tree_problem(dest, files)
            if problem is not None:  # not a concurrent build of the same tree: a real failure
                raise StoreError(f"tree {dest} could not be built: it {problem}") from None
        return dest

    def _discard(self, path: Path) -> None:
        """Remove whatever is at path without following a symlink; a folder is first moved aside,
        so the name is free at once."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISDIR(st.st_mode):
            path.unlink(missing_ok=True)
            return
        aside = self.tmp_dir() / f"discard-{secrets.token_hex(4)}"
        with contextlib.suppress(FileNotFoundError):
            os.rename(path, aside)
            shutil.rmtree(aside, ignore_errors=True)

    def _private_tree(self, digest: str, files: dict[str, str]) -> Path:
        """A tree outside a read-only store, made once per process and removed at exit."""
        key = (str(self.root.absolute()), digest)
        have = _PRIVATE_TREES.get(key)
        if have is not None and self._tree_problem(have, files) is None:
            return have
        path = Path(tempfile.mkdtemp(prefix=f"pkt-tree-{digest[:12]}-"))
        atexit.register(shutil.rmtree, path, True)
        self._materialize(files, path)
        _PRIVATE_TREES[key] = path
        return path

    def path(self, ref: Ref | dict) -> Path:
        """Where a user finds the artifact: the tree for directories (lasting_tree: it outlives this
        process), the blob for tensors."""
        ref = Ref.of(ref)
        return self.lasting_tree(ref) if self._is_manifest(ref) else self.blob_path(ref.digest)

    def lasting_tree(self, ref: Ref | dict) -> Path:
        """tree(), for a folder handed to a person (a printed path): on a read-only store that lacks
        it, it is built in the user's cache (lasting_root()) instead of a temp folder removed when
        the process exits, and checked against its manifest on every use like any tree."""
        if self.writable():
            return self.tree(ref)
        ref = Ref.of(ref)
        self.verify_ref(ref)
        files = self.manifest(ref)
        dest = self.root / "trees" / ref.digest
        if self._tree_problem(dest, files) is None:
            return dest
        dest = lasting_root() / ref.digest
        if self._tree_problem(dest, files) is None:
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        new = Path(tempfile.mkdtemp(prefix=f".{ref.digest[:12]}-", dir=dest.parent))
        self._materialize(files, new)
        shutil.rmtree(dest, ignore_errors=True)  # a bad copy (rmtree follows no symlink)
        with contextlib.suppress(FileNotFoundError):
            dest.unlink()  # a symlink or file in its place
        try:
            os.rename(new, dest)
        except OSError:  # another process built it at the same moment
            shutil.rmtree(new, ignore_errors=True)
            if self._tree_problem(dest, files) is not None:
                raise StoreError(f"tree {dest} could not be built outside the read-only store {self.root}") from None
        return dest

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

    def _blob_users(self) -> tuple[dict[str, list[str]], dict[str, dict[str, str]], list[str]]:
        """digest -> the records (and manifest entries) that use it; manifest digest -> its files;
        and one line per unusable record or manifest."""
        users: dict[str, list[str]] = {}
        manifests: dict[str, dict[str, str]] = {}
        problems = []
        for rec in self.records():
            if "broken_record" in rec:
                problems.append(f"{rec['kind']} {rec['key']}: record {rec['broken_record']} {rec['problem']}")
                continue
            who = f"{rec['kind']} {rec['key']}"
            users.setdefault(rec["digest"], []).append(who)
            if rec["layout"] != "tree" or not self._blob_ok(rec["digest"]):
                continue  # a missing or corrupt manifest blob is reported with the blobs
            try:
                manifests[rec["digest"]] = self.manifest(Ref.of(rec))
            except CorruptBlob as e:
                problems.append(f"{who}: {e}")
                continue
            for rel, d in manifests[rec["digest"]].items():
                users.setdefault(d, []).append(f"{who} ({rel})")
        return users, manifests, problems

    def verify(self) -> list[str]:
        """Re-hash every blob and check every record, manifest and tree; one line per problem,
        naming the kind and key concerned. Never raises on what it finds."""
        self.require_store()
        users, manifests, problems = self._blob_users()
        for digest, who in sorted(users.items()):
            try:
                self._verify_blob(digest, trust_memo=False)
            except CorruptBlob as e:
                problems.extend(f"{w}: {e}" for w in who)
        owners = {d: who[0] for d, who in users.items()}
        for entry in _entries(self.root / "trees"):
            dest = self.root / "trees" / entry.name
            if entry.is_symlink() or not entry.is_dir(follow_symlinks=False):
                problems.append(f"{dest} is {'a symlink' if entry.is_symlink() else 'not a directory'}: pkt never "
                                "makes one; the next use rebuilds it and gc removes it")
            elif entry.name in manifests:
                problem = self._tree_problem(dest, manifests[entry.name])
                if problem:
                    problems.append(f"{owners[entry.name]}: tree {dest} {problem}; the next use rebuilds it")
        for sub in ("keys", "blobs", "blobs/sha256", "trees", "tmp", "locks"):
            if (self.root / sub).is_symlink():
                problems.append(f"{self.root / sub} is a symlink: pkt never makes one, and gc does not follow it")
        return problems

    def referenced(self) -> set[str]:
        return set(self._blob_users()[0])

    def gc(self, dry_run: bool = False) -> list[Path]:
        """Remove blobs no record references, trees no record names (and any symlink in their
        place), and the temp files of writers that are gone. Safe while runs write: it holds the
        gc lock, which every write holds shared from its first blob to its record. Follows no
        symlink; removes nothing if a record or manifest is unreadable (it cannot tell what they use)."""
        self.require_store()
        with contextlib.ExitStack() as stack:
            if not dry_run:
                self._ensure_writable()
                stack.enter_context(_flock(self.root / "locks" / "gc.lock", fcntl.LOCK_EX))
            users, _, problems = self._blob_users()
            if problems:
                raise StoreError(f"{len(problems)} records or manifests are unusable (first: {problems[0]}), so gc "
                                 "cannot tell which blobs they use and removed nothing; `pkt store verify` lists "
                                 "them: delete those record files (the next run recomputes them), then run gc again")
            doomed = self._unreferenced(set(users)) + self._dead_tmp()
            if not dry_run:
                for p in doomed:
                    _remove(p)
            return doomed

    def _unreferenced(self, keep: set[str]) -> list[Path]:
        doomed = []
        if _real_dir(self.root / "blobs") and _real_dir(self.root / "blobs" / "sha256"):
            for prefix in _entries(self.root / "blobs" / "sha256"):
                if prefix.is_dir(follow_symlinks=False):
                    doomed += [Path(e.path) for e in _entries(Path(prefix.path)) if e.name not in keep]
        if _real_dir(self.root / "trees"):
            doomed += [Path(e.path) for e in _entries(self.root / "trees")
                       if e.name not in keep or e.is_symlink() or not e.is_dir(follow_symlinks=False)]
        return doomed

    def _dead_tmp(self) -> list[Path]:
        """Temp areas whose process is gone (their lock is free), and other temp entries older than
        TMP_MAX_AGE (left by an interrupted write outside any area)."""
        tmp = self.root / "tmp"
        if not _real_dir(tmp):
            return []
        doomed, cutoff = [], time.time() - TMP_MAX_AGE
        entries = {e.name: e for e in _entries(tmp)}
        for name, e in entries.items():
            if name.startswith("proc-") and name.endswith(".lock"):
                if _lock_is_free(Path(e.path)):
                    doomed += [Path(e.path)] + ([tmp / name[:-5]] if name[:-5] in entries else [])
            elif not (name.startswith("proc-") and f"{name}.lock" in entries):
                with contextlib.suppress(FileNotFoundError):
                    if e.stat(follow_symlinks=False).st_mtime < cutoff:
                        doomed.append(Path(e.path))
        return doomed


def check_relpath(rel: str) -> None:
    if not isinstance(rel, str) or not rel:
        raise ValueError(f"manifest path {rel!r} is not a file name")
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or rel.startswith("\\") or ":" in p.parts[0]:
        raise ValueError(f"manifest path {rel!r} would escape the store; only relative paths inside it are allowed")
    if p.as_posix() != rel or "." in p.parts or "\0" in rel or "\\" in rel:
        raise ValueError(f"manifest path {rel!r} is not in normal form (a/b.json)")


def safetensors_header(path: Path) -> dict:
    """The parsed JSON header of a safetensors file; CorruptBlob if it is not one."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            size = os.fstat(f.fileno()).st_size
            if not 0 < n <= min(size - 8, 100_000_000):  # safetensors caps its header at 100 MB
                raise ValueError("bad header length")
            header = json.loads(f.read(n))
    except (OSError, ValueError, RecursionError) as e:
        raise CorruptBlob(f"blob {path.name[:12]} is not a readable safetensors file ({e})") from None
    if not isinstance(header, dict):
        raise CorruptBlob(f"blob {path.name[:12]} is not a readable safetensors file (header is not an object)")
    return header


def sort_safetensors_metadata(path: Path) -> None:
    """Rewrite a safetensors header with its metadata keys sorted, in place: the library writes
    them in hash-map order, which changes between processes, so equal tensors and metadata would
    get different digests. Tensor entries and data are left as written (their order is fixed)."""
    try:
        header = safetensors_header(path)
    except CorruptBlob:
        return  # not safetensors after all: stored as it is
    meta = header.get("__metadata__")
    if not isinstance(meta, dict):
        return
    header = {"__metadata__": dict(sorted(meta.items())), **{k: v for k, v in header.items() if k != "__metadata__"}}
    new = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        if len(new) <= n:  # the same content reordered: it fits, padded with spaces as safetensors pads
            f.write(new + b" " * (n - len(new)))
            return
    raise StoreError(f"{path}: sorted safetensors header is longer than the original ({len(new)} > {n} bytes)")


@contextlib.contextmanager
def _flock(path: Path, mode: int):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, mode)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _is_disk_full(error: BaseException) -> bool:
    if isinstance(error, OSError):
        return error.errno == errno.ENOSPC
    # safetensors raises its own SafetensorError ("I/O error: No space left on device (os error 28)")
    text = str(error) if isinstance(error, Exception) else ""
    return "os error 28" in text or "No space left on device" in text


def _mb(n: int) -> str:
    """A size a person reads: 812 bytes, 25.4 kB, 113.2 MB, 3.0 GB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n} bytes"


def _lock_is_free(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def _real_dir(path: Path) -> bool:
    """A directory and not a symlink to one."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _entries(path: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(path) as it:
            return sorted(it, key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _remove(path: Path) -> None:
    """Remove a file, a symlink (never its target) or a folder tree (rmtree follows no symlink)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


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
