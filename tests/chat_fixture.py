"""A realistic small model, built here with nothing downloaded: Qwen2's architecture (q/k/v biases,
grouped-query attention, an untied head) at random weights, with a byte-level BPE tokenizer that carries
Qwen2's special tokens and its ChatML chat template, and a task directory of GSM8K-style chat rows
(worked solutions ending in "#### N")."""
from __future__ import annotations

import json
from pathlib import Path

import torch

# Qwen2-Instruct's chat template, as its tokenizer_config.json ships it
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SCRIPTED_ANSWER = "#### 42"


def gsm_row(i: int) -> dict:
    a, b = 12 + i, 30 + 2 * i
    solution = f"She has {a} apples and buys {b} more.\n{a} + {b} = <<{a}+{b}={a + b}>>{a + b}\n#### {a + b}"
    return {"dataset": "gsm8k", "id": f"gsm8k-{i}", "messages": [
        {"role": "user", "content": f"Natalia has {a} apples. She buys {b} more. How many apples does she have?"},
        {"role": "assistant", "content": solution}]}


def build_tokenizer():
    """A byte-level BPE (Qwen2's kind) trained on the task's text, its special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    corpus = [m["content"] for i in range(40) for m in gsm_row(i)["messages"]]
    corpus += ["system user assistant You are a helpful assistant.", SCRIPTED_ANSWER]
    core.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL,
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    # as a Qwen2 base model's tokenizer: eos is <|endoftext|>, so only a stop at the template's <|im_end|>
    # ends a chat turn (generate's own eos stop does not)
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   chat_template=QWEN2_CHAT_TEMPLATE, padding_side="left")


def qwen2_config(tok, layers: int, hidden: int, intermediate: int, heads: int = 4, kv_heads: int = 2):
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=None,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def write_model(out: Path, tok, layers: int, hidden: int, intermediate: int, seed: int = 0,
                script: str | None = None) -> Path:
    """A random-weight Qwen2 (biases, GQA, untied head) and its tokenizer in out. script: instead, weights
    under which greedy decoding after the template's generation prompt writes `script` and then <|im_end|>
    (the blocks add nothing, and the head maps each token to the next), so a test can see where it stops."""
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(qwen2_config(tok, layers, hidden, intermediate)).eval()
    assert model.model.layers[0].self_attn.q_proj.bias is not None  # Qwen2: q/k/v biases
    if script is not None:
        _script(model, tok, script)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def _script(model, tok, text: str) -> None:
    chain = [tok.encode("\n")[-1], *tok.encode(text), tok.convert_tokens_to_ids("<|im_end|>")]
    assert len(set(chain)) == len(chain), f"{text!r}: a repeated token cannot be scripted"
    chain.append(chain[1])  # past the end of turn it would write the answer again: a missed stop shows
    with torch.no_grad():
        for layer in model.model.layers:  # the residual stream carries only the current token's embedding
            layer.self_attn.o_proj.weight.zero_()
            layer.self_attn.o_proj.bias.zero_() if layer.self_attn.o_proj.bias is not None else None
            layer.mlp.down_proj.weight.zero_()
        emb = model.model.embed_tokens.weight
        emb.normal_(0, 1)
        head = model.lm_head.weight
        head.normal_(0, 0.01)
        for prev, nxt in zip(chain, chain[1:]):
            head[nxt] += 20 * emb[prev] / emb[prev].norm()


def write_task(out: Path, n: int = 8) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    rows = [gsm_row(i) for i in range(4 * n)]
    for k, split in enumerate(("train", "seeds", "val", "test")):
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[k * n:(k + 1) * n]))
    return out


def write_pair(root: Path) -> dict[str, Path]:
    """teacher (4 layers, hidden 64), student (2 layers, hidden 32), both random, and a gsm task."""
    tok = build_tokenizer()
    return {"teacher": write_model(root / "teacher", tok, 4, 64, 96, seed=1),
            "student": write_model(root / "student", tok, 2, 32, 48, seed=2),
            "task": write_task(root / "task")}
