"""A model's identity in the store: sha256 over its files, or repo@commit for a hub model."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from pathlib import Path

from .keys import file_stamp, stamped_file_digest

# The files that decide token ids: every name a transformers tokenizer class saves (the union of
# their `vocab_files_names`, checked by tests/test_model_id.py) and the shared ones (config,
# special tokens, added tokens, chat template). Generation defaults (generation_config.json),
# READMEs, licences and remote code change neither the token ids nor the forward pass: not included.
TOKENIZER_FILES = frozenset({
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "chat_template.jinja", "chat_template.json",
    "tokenizer.model", "spiece.model", "spm.model", "sentencepiece.model", "sentencepiece.bpe.model",
    "vocab.json", "vocab.txt", "merges.txt", "bpe.codes", "vocab-src.json", "vocab-tgt.json",
    "byte_maps.json", "emoji.json", "entity_vocab.json", "normalizer.json", "prophetnet.tokenizer",
    "word_pronunciation.json", "word_shape.json",
})
TOKENIZER_SUFFIXES = (".tiktoken",)
CHAT_TEMPLATE_DIR = "additional_chat_templates"  # named templates, *.jinja
# What generation reads beyond the forward pass and the tokenizer: its defaults (suppress_tokens,
# max_new_tokens, eos ids ...; GenerationConfig.from_pretrained). A node that generates names
# them as extra files of its model input, so its key covers them; a forward pass's key does not.
GENERATION_FILES = ("generation_config.json",)
SHA256 = re.compile(r"[0-9a-f]{64}\Z")


def identity_files(path: Path, extra: tuple[str, ...] = ()) -> list[Path]:
    """The files of a local model directory that change its token ids or its forward pass:
    config.json, the weights, and the tokenizer files, in a fixed order; then those of extra
    (e.g. GENERATION_FILES) that the directory holds."""
    from pkt.core.models import weight_files

    files = [path / "config.json", *weight_files(path)]
    files += sorted(path.glob("*.bin"))  # pickled weights count too when allowed
    files += sorted(p for p in path.iterdir()
                    if p.is_file() and (p.name in TOKENIZER_FILES or p.name.endswith(TOKENIZER_SUFFIXES)))
    files += sorted((path / CHAT_TEMPLATE_DIR).glob("*.jinja"))
    files += [path / name for name in extra if (path / name).is_file()]
    return files


def combine(entries: list[tuple[str, str]]) -> str:
    """A model directory's digest from its identity files' (relative path, sha256), in order."""
    h = hashlib.sha256()
    for rel, digest in entries:
        h.update(rel.encode() + b"\0" + digest.encode() + b"\0")
    return h.hexdigest()


def model_digest(source: str | Path, revision: str | None = None, memo_dir: Path | None = None,
                 files: dict | None = None, extra: tuple[str, ...] = ()) -> str:
    """Local dir: sha256 over the identity files (names and contents), each file's hash memoized
    by its stamp (path, device, inode, size, mtime, ctime: keys.file_stamp) in memo_dir and in this
    process. files, if given, receives path -> (stamp, digest) of each identity file, in order; extra:
    file names a node reads beyond the forward pass (GENERATION_FILES), covered when present. Hub id:
    'repo@<resolved commit>'."""
    from pkt.core.models import check_source

    check_source(source)
    path = Path(source)
    if path.exists():
        from pkt.core.models import check_weights_present

        check_weights_present(path, allow_bin=True)
        entries = []
        for f in identity_files(path, extra):
            digest, stamp = _memo_file_digest(f, memo_dir)
            entries.append((f.relative_to(path).as_posix(), digest))
            if files is not None:
                files[str(f)] = (stamp, digest)
        return combine(entries)
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


# (path, stamp) -> digest of files this process hashed: a read-only store keeps no memo on disk
_SEEN: dict[tuple, str] = {}


def _memo_file_digest(f: Path, memo_dir: Path | None) -> tuple[str, tuple]:
    """(digest, stamp) of one file, from the memo when its stamp is unchanged. The stamp holds the
    ctime and inode, which no user can restore: a same-size rewrite with its mtime put back is
    hashed again."""
    path = str(f.resolve())
    stamp = file_stamp(f)
    if (path, stamp) in _SEEN:
        return _SEEN[path, stamp], stamp
    memo = memo_dir / (hashlib.sha256(path.encode()).hexdigest() + ".json") if memo_dir is not None else None
    try:
        saved = json.loads(memo.read_text())
        if saved.get("path") == path and tuple(saved.get("stamp")) == stamp and SHA256.match(saved["digest"]):
            _SEEN[path, stamp] = saved["digest"]
            return saved["digest"], stamp
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    digest, stamp = stamped_file_digest(f)
    _SEEN[path, stamp] = digest
    if memo is None:
        return digest, stamp
    tmp = memo.with_suffix(f".{os.getpid()}.tmp")
    try:
        memo_dir.mkdir(exist_ok=True)  # inside a store that exists: the memo never makes a store root
        tmp.write_text(json.dumps({"path": path, "stamp": list(stamp), "digest": digest}))
        os.replace(tmp, memo)
    except OSError:  # a read-only store or a full disk: the memo only saves time
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return digest, stamp
