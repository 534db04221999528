"""One formatting path: sensitivity, training and evaluation see the same tokens for a sample.

A chat sample with a system turn and two user turns goes through the real code of each stage
(the sensitivity and adapter nodes up to the point where they hand samples on, and lm-eval's
requests as the model receives them), for a tokenizer that adds BOS by add_bos_token and one that
adds it in its post-processor (Llama-3 style)."""
import copy
import json

import pytest
import torch

from pkt.artifacts.store import Store
from pkt.core import evaluate, finetune, sensitivity
from pkt.core.mini.tokenizer import build_tokenizer, vocab_size
from pkt.tasks import extract as extract_nodes
from pkt.tasks import sources
from pkt.tasks import train as train_nodes

SAMPLE = {"messages": [{"role": "system", "content": "Be brief."},
                       {"role": "user", "content": "What is 2+2?"},
                       {"role": "assistant", "content": "The answer is 4."},
                       {"role": "user", "content": "What is 12+30?"},
                       {"role": "assistant", "content": "The answer is 42."}]}


def _tokenizer(kind: str):
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    core = copy.deepcopy(build_tokenizer().backend_tokenizer)
    names = dict(pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>", padding_side="left")
    if kind == "post_processor":
        core.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                            special_tokens=[("<s>", 1)])
        return PreTrainedTokenizerFast(tokenizer_object=core, **names)
    return PreTrainedTokenizerFast(tokenizer_object=core, add_bos_token=True, **names)


class _Stop(Exception):
    pass


@pytest.fixture(params=["add_bos_token", "post_processor"])
def setup(request, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _tokenizer(request.param)
    model_dir = tmp_path / "model"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size(), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                                 pad_token_id=0)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    task = tmp_path / "task"
    task.mkdir()
    for split in ("train", "seeds", "val", "test"):
        (task / f"{split}.jsonl").write_text(json.dumps(SAMPLE) + "\n")
    return tmp_path, model_dir, task


def _captured(monkeypatch, module, name, index):
    got = []

    def capture(*args, **kwargs):
        got.append(args[index])
        raise _Stop

    monkeypatch.setattr(module, name, capture)
    return got


def _forward_inputs(model):
    seen = []
    model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(
        (kwargs.get("input_ids") if kwargs.get("input_ids") is not None else args[0]).tolist()), with_kwargs=True)
    return seen


def test_sensitivity_training_and_evaluation_see_the_same_tokens(setup, monkeypatch):
    from pkt.core.models import load_model, load_tokenizer

    tmp_path, model_dir, task = setup
    store = Store(tmp_path / "store")
    model_ref = sources.model_source(str(model_dir), store)  # real refs: a node checks what it reads
    sens = _captured(monkeypatch, sensitivity, "compute_sensitivity", 1)
    with pytest.raises(_Stop):  # the sensitivity node, as a sweep runs it
        extract_nodes.Sensitivity(max_length=512).compute(
            store, {"teacher": model_ref, "seeds": sources.file_source(str(task / "seeds.jsonl"))}, tmp_path)
    train = _captured(monkeypatch, finetune, "finetune", 1)
    with pytest.raises(_Stop):  # the adapter node
        train_nodes.Adapter(train={"rank": 2, "alpha": 2, "max_length": 512, "modules": ["q"]}).compute(
            store, {"student": model_ref, "train": sources.file_source(str(task / "train.jsonl"))}, tmp_path)
    s_ids, t_ids = sens[0][0]["input_ids"][0].tolist(), train[0][0]["input_ids"][0].tolist()
    assert s_ids == t_ids
    assert torch.equal(sens[0][0]["labels"], train[0][0]["labels"])

    tok = load_tokenizer(model_dir)
    n_prompt = int((train[0][0]["labels"][0] == -100).sum())
    assert t_ids[0] == tok.bos_token_id and t_ids.count(tok.bos_token_id) == 1  # BOS as the tokenizer adds it
    prompt = tok.decode(t_ids[:n_prompt])
    for turn in SAMPLE["messages"][:-1]:  # system and earlier turns kept, in order
        assert turn["content"] in prompt
    assert prompt.index("Be brief.") < prompt.index("What is 2+2?") < prompt.index("What is 12+30?")
    assert tok.decode(t_ids[n_prompt:-1]) == "The answer is 42." and t_ids[-1] == tok.eos_token_id

    model = load_model(model_dir)
    seen = _forward_inputs(model)
    evaluate.evaluate(model, tok, "answer_nll", task, split="test", batch_size=1)
    # lm-eval scores the answer given the prompt: the model reads prompt + answer, less the last token
    assert seen[0] == [t_ids[:-2]]
    seen.clear()
    evaluate.evaluate(model, tok, "gsm", task, split="test", batch_size=1)
    assert seen[0] == [t_ids[:n_prompt]]  # generation starts from exactly the training prompt
