"""The store's maintenance: verify every blob, record, manifest and tree; gc what nothing
references and the temp files of writers that are gone.
"""
from __future__ import annotations

import contextlib
import fcntl
import time
from pathlib import Path

from .blobs import CorruptBlob, Ref, StoreError, _entries, _flock, _lock_is_free, _real_dir, _remove

TMP_MAX_AGE = 3600  # seconds: a temp entry outside any live process's area this old belongs to no writer


class Maintenance:
    """verify and gc over the whole store; root is the façade's (store.Store)."""

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
        problems += self._claim_problems(manifests)
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

    def _claim_problems(self, manifests: dict) -> list[str]:
        """One line per record whose intact blob names another node (records.claim_problem)."""
        problems = []
        for rec in self.records():
            if "broken_record" in rec or not self._blob_ok(rec["digest"]) or (
                    rec["layout"] == "tree" and rec["digest"] not in manifests):
                continue  # reported above
            try:
                problem = self.claim_problem(Ref.of(rec), rec["layout"])
            except CorruptBlob as e:
                problem = str(e)
            if problem:
                problems.append(f"{rec['kind']} {rec['key']}: {problem}; the next run that needs it recomputes it")
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
