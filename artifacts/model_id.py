"""A model's identity in the store: sha256 over its files, or repo@commit for a hub model."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .keys import file_digest


def model_digest(source: str | Path, revision: str | None = None, memo_dir: Path | None = None) -> str:
    """Local dir: sha256 over config.json and the weight files, each file's hash memoized by
    (path, size, mtime) in memo_dir. Hub id: 'repo@<resolved commit>'."""
    from pkt.core.models import check_source

    check_source(source)
    path = Path(source)
    if path.exists():
        from pkt.core.models import check_weights_present, weight_files

        check_weights_present(path, allow_bin=True)
        files = [path / "config.json", *weight_files(path)]
        files += sorted(p for p in path.glob("*.bin"))  # pickled weights count too when allowed
        h = hashlib.sha256()
        for f in files:
            h.update(f.name.encode() + b"\0" + _memo_file_digest(f, memo_dir).encode() + b"\0")
        return h.hexdigest()
    return f"{source}@{resolve_hub_commit(str(source), revision)}"


def resolve_hub_commit(repo: str, revision: str | None) -> str:
    from huggingface_hub import HfApi

    try:
        return HfApi().model_info(repo, revision=revision).sha
    except Exception as e:  # offline, private, misspelled
        raise FileNotFoundError(
            f"model {repo!r} is neither a local directory nor a reachable hub repo ({type(e).__name__}); "
            "give a local path, or check the hub id, revision and network/HF_TOKEN"
        ) from None


def _memo_file_digest(f: Path, memo_dir: Path | None) -> str:
    st = f.stat()
    stamp = {"path": str(f.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if memo_dir is None:
        return file_digest(f)
    memo = memo_dir / (hashlib.sha256(stamp["path"].encode()).hexdigest() + ".json")
    try:
        saved = json.loads(memo.read_text())
        if {k: saved.get(k) for k in stamp} == stamp:
            return saved["digest"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        pass
    digest = file_digest(f)
    memo_dir.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({**stamp, "digest": digest}))
    os.replace(tmp, memo)
    return digest
