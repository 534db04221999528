"""The store's objects: immutable blobs named by their sha256 (write, read, digest), the temp
areas writes go through, and the file-system helpers the other rooms share.

  blobs/sha256/ab/<digest>      immutable bytes, named by their sha256
  locks/gc.lock                 shared by every write from its first blob to its record; gc takes it alone
  tmp/proc-<host>-<pid>-<x>/    one live process's in-flight writes (its .lock beside it is held while it lives)
Every write goes to a temp file, is fsynced and renamed: a reader sees all or nothing.
"""
from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import functools
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import stat
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from pkt.core.errors import UserError

from .keys import file_digest

SHA256 = re.compile(r"[0-9a-f]{64}\Z")


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


class StoreError(UserError, RuntimeError):
    pass


class CorruptBlob(StoreError):
    pass


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
            rmtree(area)  # sealed (read-only) snapshot folders too
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


class Blobs:
    """Write, read and check blobs; root, _verified and misses are the façade's (store.Store)."""

    def blob_path(self, digest: str) -> Path:
        return self.root / "blobs" / "sha256" / digest[:2] / digest

    def _ensure_writable(self) -> None:
        if self._writable:
            return
        try:
            self._create_root()
            (self.root / "tmp").mkdir(exist_ok=True)
            probe = tempfile.NamedTemporaryFile(dir=self.root / "tmp", delete=True)
            probe.close()
        except OSError as e:
            raise StoreError(f"store root {self.root} is not writable ({e.strerror}); pass --store DIR or set "
                             "PKT_STORE to a directory you can write") from None
        self._writable = True

    def _create_root(self) -> None:
        """Make a new store root with its folders in one rename: a process killed at any moment
        leaves no store or a store, never a bare folder that gc and verify call "not a pkt store"."""
        if os.path.lexists(self.root):
            return
        self.root.parent.mkdir(parents=True, exist_ok=True)
        new = self.root.parent / f".{self.root.name}.new-{secrets.token_hex(4)}"
        new.mkdir()
        for sub in ("tmp", "keys", "blobs"):
            (new / sub).mkdir()
        try:
            os.rename(new, self.root)
        except OSError:  # another process made it first
            rmtree(new)

    def writable(self) -> bool:
        try:
            self._ensure_writable()
        except StoreError:
            return False
        return True

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

    def _copy_in(self, path: str | Path) -> str:
        """A blob of a file's bytes as they are now, read once into a private temp copy and hashed
        there (call under _lease): what the copy holds is what its digest says, whatever writes
        the file meanwhile."""
        tmp = self._tmp()
        with self._cleanup_on_failure(tmp, needed=os.stat(path).st_size):
            shutil.copyfile(path, tmp)
            return self._publish_blob(tmp)

    def put_bytes(self, data: bytes) -> str:
        """A blob no record names: gc may remove it once this returns. Artifacts use put_blob."""
        digest = hashlib.sha256(data).hexdigest()
        if self._blob_ok(digest):  # nothing to write (a read-only store holding it answers too)
            return digest
        with self._lease():
            return self._write_blob(data)
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
        rmtree(path)
    else:
        path.unlink(missing_ok=True)


def rmtree(path: str | Path) -> None:
    """shutil.rmtree for folders pkt made read-only (trees are 0555): a folder it cannot empty is
    made writable first. Follows no symlink; like ignore_errors, what cannot be removed stays."""
    def make_room(func, p, exc):
        if not isinstance(exc if isinstance(exc, BaseException) else exc[1], PermissionError):
            return  # gone already, or a symlink given: nothing to do, as with ignore_errors
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(p), 0o755)
            func(p)

    shutil.rmtree(path, **({"onexc": make_room} if sys.version_info >= (3, 12) else {"onerror": make_room}))


def seal(path: Path, top: bool = True) -> None:
    """Make every folder under path (and path itself if top) read-only to everyone (0555): a tree's
    files are blobs, shared by every tree that holds the same bytes, never to be written through
    a tree (a person who needs to edit one copies it: `pkt export`). A folder moved to another
    parent must be writable, so trees are built unsealed at the top and sealed once in place."""
    for dirpath, _, _ in os.walk(path, topdown=False):  # never descends a symlinked folder
        if top or dirpath != str(path):
            os.chmod(dirpath, 0o555)


def unseal(path: Path) -> None:
    """Make a sealed folder itself writable again, so that it can be moved or removed."""
    with contextlib.suppress(OSError):
        if stat.S_ISDIR(os.lstat(path).st_mode):
            os.chmod(path, 0o755)


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
