"""The store's working tree: a directory artifact's files, materialized as hard links to its
blobs under trees/<digest>/ (a cache, checked against its manifest every time it is used).

A directory artifact's digest is that of its manifest blob {"kind", "key", "files": {relpath: digest}}:
the node it was written for is named in it (as a safetensors header names its node), so a record
pointed at another node's manifest is a miss.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import secrets
import shutil
import stat
import tempfile
from pathlib import Path, PurePosixPath

from .blobs import SHA256, CorruptBlob, Ref, StoreError, _real_dir, rmtree, seal, unseal
from .keys import file_digest

log = logging.getLogger("pkt.store")
# (store root, digest) -> a tree materialized outside a read-only store
_PRIVATE_TREES: dict[tuple[str, str], Path] = {}


def lasting_root() -> Path:
    """Where the folders of a read-only store are built for a person to use: $PKT_TREE_CACHE, else
    $XDG_CACHE_HOME/pkt/trees (~/.cache/pkt/trees)."""
    if os.environ.get("PKT_TREE_CACHE"):
        return Path(os.environ["PKT_TREE_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "pkt" / "trees"



def check_relpath(rel: str) -> None:
    if not isinstance(rel, str) or not rel:
        raise ValueError(f"manifest path {rel!r} is not a file name")
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or rel.startswith("\\") or ":" in p.parts[0]:
        raise ValueError(f"manifest path {rel!r} would escape the store; only relative paths inside it are allowed")
    if p.as_posix() != rel or "." in p.parts or "\0" in rel or "\\" in rel:
        raise ValueError(f"manifest path {rel!r} is not in normal form (a/b.json)")



class Trees:
    """Build and check the folders of directory artifacts; root, _verified and misses are the façade's."""

    def manifest_doc(self, digest: str) -> dict:
        """A manifest blob's JSON object {"kind", "key", "files"}, verified: CorruptBlob if it is none."""
        try:
            doc = json.loads(self.read_bytes(digest))
        except (ValueError, RecursionError):
            raise CorruptBlob(f"manifest {digest[:12]} is not JSON") from None
        if not isinstance(doc, dict):
            raise CorruptBlob(f"manifest {digest[:12]} is not a JSON object")
        return doc

    def manifest(self, ref: Ref | dict) -> dict[str, str]:
        """relpath -> digest of a tree artifact, verified and checked: CorruptBlob if unusable."""
        digest = Ref.of(ref).digest
        files = self.manifest_doc(digest).get("files")
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
        seal(into, top=False)

    def snapshot(self, entries: list[tuple[str, Path, str | None]]) -> tuple[Path, list[tuple[str, str]]]:
        """A private, read-only folder of source files as they are now, and each one's (relative
        path, sha256). entries: (relative path, source file, its digest if known). Every file is
        read once, into a blob (none is read when the blob of its known digest is here already),
        and the folder links those blobs: a node reading the folder reads exactly the bytes the
        digests name, whatever writes the sources meanwhile. It lives in this process's temp area."""
        snap = Path(tempfile.mkdtemp(prefix="source-", dir=self.tmp_dir()))
        got = []
        with self._lease():  # gc keeps the new blobs until they are linked here
            for rel, path, known in entries:
                check_relpath(rel)
                got.append((rel, known if known and self._blob_ok(known) else self._copy_in(path)))
            self._materialize(dict(got), snap)
        seal(snap)
        return snap, got

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
            seal(dest)
        except OSError:
            rmtree(new)
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
        unseal(path)  # a folder moved to another parent must be writable
        with contextlib.suppress(FileNotFoundError):
            os.rename(path, aside)
            rmtree(aside)

    def _private_tree(self, digest: str, files: dict[str, str]) -> Path:
        """A tree outside a read-only store, made once per process and removed at exit."""
        key = (str(self.root.absolute()), digest)
        have = _PRIVATE_TREES.get(key)
        if have is not None and self._tree_problem(have, files) is None:
            return have
        path = Path(tempfile.mkdtemp(prefix=f"pkt-tree-{digest[:12]}-"))
        atexit.register(rmtree, path)
        self._materialize(files, path)
        seal(path)
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
        rmtree(dest)  # a bad copy (rmtree follows no symlink)
        with contextlib.suppress(FileNotFoundError):
            dest.unlink()  # a symlink or file in its place
        try:
            os.rename(new, dest)
            seal(dest)
        except OSError:  # another process built it at the same moment
            rmtree(new)
            if self._tree_problem(dest, files) is not None:
                raise StoreError(f"tree {dest} could not be built outside the read-only store {self.root}") from None
        return dest
