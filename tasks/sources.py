"""Where a node's inputs come from: sources (a model, a data file, the named files of a task directory)
as refs named by their content, the `source` task that takes their digests (so the graph shows what
each node read), and the reads a node makes of them, from a snapshot holding exactly the digested bytes.

Inputs are refs: store artifacts {kind, key, digest} or sources {kind: model|file|dir|table,
key: path or name, digest}. Only digests enter a key, so moving a model directory reuses everything.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from pkt.artifacts import model_id
from pkt.artifacts.keys import InputChanged, stamped_file_digest
from pkt.artifacts.model_id import model_digest
from pkt.artifacts.store import Ref, Store
from pkt.core import models
from pkt.core.inputs import check_folder

from .node import opaque


def model_source(path: str, store: Store, names: list[str] | None = None) -> dict:
    """names: files a node reads beyond the forward pass (model_id.GENERATION_FILES for a score)."""
    return {"kind": "model", "key": str(path), "digest": _model_digest(path, store, {}, tuple(names or ()))}


def file_source(path: str) -> dict:
    return {"kind": "file", "key": str(path), "digest": _file_digest(path, {})}


def dir_source(path: str, names: list[str] | None = None) -> dict:
    """A task directory: digest over the named jsonl files (default: all), names and contents, so a
    score depends on the files it reads and not on, say, the seed file beside them."""
    return {"kind": "dir", "key": str(path), "digest": _dir_digest(path, names, {})}


def _model_digest(path: str, store: Store, files: dict, extra: tuple[str, ...] = ()) -> str:
    store.writable()  # a new store root is made whole (atomically) before its memo goes in
    return model_digest(path, memo_dir=store.root / "memo", files=files, extra=extra)


def _file_digest(path: str, files: dict) -> str:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file")
    digest, stamp = stamped_file_digest(path)
    files[str(path)] = (stamp, digest)
    return digest


def _dir_files(path: str, names: list[str] | None) -> list[Path]:
    check_folder(path, "the task directory")  # a FIFO among its files: one sentence, not a wait
    found = sorted(Path(path) / n for n in names) if names else sorted(Path(path).glob("*.jsonl"))
    found = [f for f in found if f.exists()]
    if not found:
        raise FileNotFoundError(f"{path}: no *.jsonl files; a task directory holds train/seeds/val/test.jsonl")
    return found


def _dir_combine(entries: list[tuple[str, str]]) -> str:
    h = hashlib.sha256()
    for name, digest in entries:
        h.update(f"{name}\0{digest}\0".encode())
    return h.hexdigest()


def _dir_digest(path: str, names: list[str] | None, files: dict) -> str:
    return _dir_combine([(f.name, _file_digest(str(f), files)) for f in _dir_files(path, names)])


def read_source(store: Store, ref: dict, names: list[str] | None = None, extra: tuple[str, ...] = ()) -> str:
    """Where a node reads a source input (a model, file or task directory): a private, read-only
    snapshot of it (store.snapshot) holding exactly the bytes of the digest its key was computed
    from; the snapshot's digest is taken of the very bytes the node then parses, so a source
    rewritten during the run is refused, never read torn. A hub model (no local files) is taken as
    named. extra: a model's files beyond the forward pass that this node reads (as its source named)."""
    path, kind = ref["key"], ref["kind"]
    if kind == "model" and not Path(path).exists():
        return path
    if kind == "model":
        known: dict = {}
        _model_digest(path, store, known, extra)  # which files, and their digests as memoized by stamp
        entries = [(Path(f).relative_to(path).as_posix(), Path(f), d) for f, (_, d) in known.items()]
    else:
        entries = [(f.name, f, None) for f in ([Path(path)] if kind == "file" else _dir_files(path, names))]
    snap, got = store.snapshot(entries)
    digest = {"model": model_id.combine, "file": lambda g: g[0][1], "dir": _dir_combine}[kind](got)
    if digest != ref["digest"]:
        raise InputChanged(f"{path} changed after this run took its digest ({ref['digest'][:12]}, now "
                           f"{digest[:12]}), so a node keyed by the old contents would read the new ones; nothing "
                           "was computed from it. Leave the inputs alone while pkt runs, then run again")
    return str(snap / Path(path).name) if kind == "file" else str(snap)


SOURCE_RETRIES, SOURCE_RETRY_DELAY = 2, [5, 30]  # seconds before the 1st and 2nd retry
# a wrong input: retrying cannot help, and the user should hear at once
PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, InputChanged)


def transient(task, task_run, state) -> bool:
    """Retry a source read that failed on I/O that may pass (a network filesystem's EIO or stale handle,
    a hub's timeout), never one whose input is wrong (missing, unreadable, not what the config said)."""
    from pkt.core.errors import UserError

    exc = state.data
    return isinstance(exc, (OSError, TimeoutError, ConnectionError)) and not isinstance(exc, (*PERMANENT, UserError))


@task(name="source", cache_policy=NO_CACHE, persist_result=False, task_run_name="{label}", retries=SOURCE_RETRIES,
      retry_delay_seconds=SOURCE_RETRY_DELAY, retry_condition_fn=transient)
def source(kind: str, path: str, store_root: str, label: str, names: list[str] | None = None) -> dict:
    """An input that is not a node, as a ref named by its content: a model ("model"), a data file
    ("file") or the named files of a task directory ("dir"). A task of its own, so the graph shows
    which model and which data each node read."""
    if kind == "model":
        return opaque(model_source(path, Store(store_root), names))
    if kind == "file":
        return opaque(file_source(path))
    if kind == "dir":
        return opaque(dir_source(path, names))
    raise ValueError(f"unknown source kind {kind!r}")


def model_path(store: Store, ref: dict, extra: tuple[str, ...] = ()) -> str:
    """Where a model input's files are: a snapshot of its own directory (read_source), or the tree of
    a model the store built."""
    return read_source(store, ref, extra=extra) if ref["kind"] == "model" else str(store.tree(Ref.of(ref)))


def prompt_format(chat_template: bool) -> str:
    """A node's chat_template field (True: the model's own chat template) as data.render's format."""
    return "chat" if chat_template else "paper"


def load_model_input(store: Store, ref: dict, dtype: str, device: str, extra: tuple[str, ...] = ()):
    """(model, tokenizer) of a model input; extra: model_id.GENERATION_FILES for a node that generates."""
    src = model_path(store, ref, extra)
    return models.load_model(src, dtype=dtype, device=device), models.load_tokenizer(src)
