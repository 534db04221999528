"""A character-level tokenizer for the miniature family, saved as a standard HF tokenizer.

Three testbed versions, each with its own fixed vocabulary (a version's token ids never change):
- 1: every entity name is one token of its own, so a name only the teacher's corpus states is a
  token the student never trained (the endpoint was unreachable by construction, issue 24);
- 2: names are spelled in syllable tokens that every name shares (as a subword vocabulary spells a
  rare name), so each piece of a teacher-only name is trained in the student too and only the
  *association* of the name with its number is the teacher's;
- 3: v1's vocabulary and names (one token each), but both corpora also say every name without its
  number (tasks.name_phrases), so each name's token is trained in the student too and, as in v2, only
  the association is the teacher's.
"""
from __future__ import annotations

import itertools
import random
import string
from pathlib import Path

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHAT_TAGS = ["<|system|>", "<|user|>", "<|assistant|>"]
# frequent phrases of the task prompts as single tokens (what BPE merges would learn), so
# sequences stay short and pretraining fits the CPU budget
PHRASES = ["What is ", "The answer is ", "What color is the ", "Reverse the order of the words: ", "Answer:",
           "What is the number of the ", "The number of the ", " is "]
# the made-up entities of the facts tasks, one token each (as a frequent name is in a BPE vocabulary),
# so a fact is one association to learn: pronounceable, fixed on every machine
ENTITY_SYLLABLES = ["ka", "lo", "mi", "zu", "ra", "te", "no", "vi", "sa", "pu", "de", "fo"]
N_ENTITIES = 640
ENTITIES = sorted(random.Random(1234).sample(
    ["".join((a, b, c)) for a in ENTITY_SYLLABLES for b in ENTITY_SYLLABLES for c in ENTITY_SYLLABLES], N_ENTITIES))
CHARS = sorted(set(string.ascii_letters + string.digits + string.punctuation + " \n"))
# v2's name pieces: consonant-vowel syllables, so a name splits into them one way only, two a name.
# Measured at study size, seed 0 (the study's pretraining budget): with three pieces of twelve the 6-layer
# teacher knew 12% of its gate's teacher-only facts, with two of seventy 6% (v1's one-token names: 94%),
# so v2 families fail the knowledge gates until their pretraining learns multi-piece names (the v2 recipes
# tried since: family.py, above DEFAULT_TESTBED)
V2_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]


TESTBEDS = (1, 2, 3)


def entity_names(testbed: int = 1) -> list[str]:
    """The made-up entities of a testbed version: v1's (and v3's) 640 one-token names; v2's every
    two-syllable name (4,900), spelled in V2_SYLLABLES tokens."""
    if testbed in (1, 3):
        return ENTITIES
    _check(testbed)
    return ["".join(p) for p in itertools.product(V2_SYLLABLES, repeat=2)]


def _word_tokens(testbed: int) -> list[str]:
    """The tokens added on top of the characters: v1's and v3's whole entity names, v2's syllables."""
    _check(testbed)
    return V2_SYLLABLES if testbed == 2 else ENTITIES


def _check(testbed: int) -> None:
    if testbed not in TESTBEDS:
        raise ValueError(f"unknown testbed version {testbed!r}; choose one of {', '.join(map(str, TESTBEDS))}")


def build_tokenizer(testbed: int = 1):
    """PreTrainedTokenizerFast over a fixed character vocabulary (same ids on every machine)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    words = _word_tokens(testbed)
    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHAT_TAGS + PHRASES + CHARS + words)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens(SPECIALS)
    core.add_tokens(CHAT_TAGS + PHRASES + words)
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        padding_side="left",
    )


def save_tokenizer(directory: str | Path, testbed: int = 1) -> Path:
    build_tokenizer(testbed).save_pretrained(str(directory))
    return Path(directory)


def vocab_size(testbed: int = 1) -> int:
    return len(SPECIALS) + len(CHAT_TAGS) + len(PHRASES) + len(CHARS) + len(_word_tokens(testbed))
