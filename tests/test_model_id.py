"""A model's identity: everything that changes token ids or the forward pass, nothing else."""
import json
import random
import shutil

import pytest

from pkt.artifacts.model_id import CHAT_TEMPLATE_DIR, TOKENIZER_FILES, model_digest


def permute_vocab(model_dir, seed=0):
    """The same weights, but the tokenizer maps the non-special tokens to other ids."""
    path = model_dir / "tokenizer.json"
    tok = json.loads(path.read_text())
    vocab = tok["model"]["vocab"]
    special = {t["content"] for t in tok["added_tokens"]}
    names = [t for t in vocab if t not in special]
    ids = [vocab[t] for t in names]
    random.Random(seed).shuffle(ids)
    vocab.update(zip(names, ids))
    path.write_text(json.dumps(tok))


@pytest.fixture
def teacher_copy(mini_family, tmp_path):
    return shutil.copytree(mini_family / "teacher", tmp_path / "teacher")


def test_a_permuted_tokenizer_is_another_model(mini_family, teacher_copy, tmp_path):
    """The replay: same weights and config, permuted token ids."""
    from transformers import AutoTokenizer

    base = model_digest(mini_family / "teacher")
    assert model_digest(teacher_copy, memo_dir=tmp_path / "memo") == base  # moving a model changes nothing
    permute_vocab(teacher_copy)
    text = "What is 12 plus 30?"
    assert AutoTokenizer.from_pretrained(teacher_copy)(text)["input_ids"] != \
        AutoTokenizer.from_pretrained(mini_family / "teacher")(text)["input_ids"]
    assert model_digest(teacher_copy, memo_dir=tmp_path / "memo") != base


@pytest.mark.parametrize("change,same", [
    ("generation_config.json", True), ("README.md", True), ("LICENSE", True), ("modeling_custom.py", True),
    ("config.json", False), ("tokenizer_config.json", False), ("special_tokens_map.json", False),
    ("chat_template.jinja", False), (f"{CHAT_TEMPLATE_DIR}/tool_use.jinja", False), ("model.safetensors", False),
])
def test_what_counts_in_a_models_identity(mini_family, teacher_copy, change, same):
    base = model_digest(mini_family / "teacher")
    path = teacher_copy / change
    path.parent.mkdir(exist_ok=True)
    if path.suffix == ".json" and path.exists():
        path.write_text(json.dumps({**json.loads(path.read_text()), "pkt_test_field": 1}))
    elif path.exists():
        with open(path, "ab") as f:
            f.write(b"\0")
    else:
        path.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    assert (model_digest(teacher_copy) == base) is same


def test_the_identity_covers_every_file_a_transformers_tokenizer_saves():
    """An oracle independent of our list: the file names each transformers tokenizer class reads
    and writes (vocab_files_names), and the ones every tokenizer shares."""
    from transformers import tokenization_utils_base as base
    from transformers.models.auto import tokenization_auto as auto

    names = {base.ADDED_TOKENS_FILE, base.SPECIAL_TOKENS_MAP_FILE, base.TOKENIZER_CONFIG_FILE,
             base.FULL_TOKENIZER_FILE, base.CHAT_TEMPLATE_FILE}
    classes = 0
    for class_names in auto.TOKENIZER_MAPPING_NAMES.values():
        for name in class_names if isinstance(class_names, (tuple, list)) else [class_names]:
            try:
                cls = auto.tokenizer_class_from_name(name) if name else None
                names.update(dict(getattr(cls, "vocab_files_names", None) or {}).values())
                classes += cls is not None
            except ImportError:  # a tokenizer needing a package not installed here
                continue
    assert classes > 50
    assert base.CHAT_TEMPLATE_DIR == CHAT_TEMPLATE_DIR
    assert names - TOKENIZER_FILES == set()
