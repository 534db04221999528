"""A character-level tokenizer for the miniature family, saved as a standard HF tokenizer."""
from __future__ import annotations

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


def build_tokenizer():
    """PreTrainedTokenizerFast over a fixed character vocabulary (same ids on every machine)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHAT_TAGS + PHRASES + CHARS + ENTITIES)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens(SPECIALS)
    core.add_tokens(CHAT_TAGS + PHRASES + ENTITIES)
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        padding_side="left",
    )


def save_tokenizer(directory: str | Path) -> Path:
    build_tokenizer().save_pretrained(str(directory))
    return Path(directory)


def vocab_size() -> int:
    return len(SPECIALS) + len(CHAT_TAGS) + len(PHRASES) + len(CHARS) + len(ENTITIES)
