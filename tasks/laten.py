"""LaTen's node kinds (pkt_core/laten.py): a model's attribution on one sample, the translators trained
on the extract samples, and the sparse update they make for one student shape, step, rate and seed."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import save_file

from pkt.artifacts.store import Ref, Store
from pkt.core import arch, data, laten, models

from .node import Node, Tensors, execution, keyed_if_set, log
from .sources import load_model_input, model_path, prompt_format, read_source


@dataclass(frozen=True)
class LatenAttribution(Node):
    """LaTen's logit-lens attribution of one model on one sample (a line of a jsonl file): layer scores
    (attention, FFN), FFN-neuron and attention-channel scores. Depends on neither a student nor the
    rate, so every pair, rate, seed and translator reading this model and sample shares it."""

    KIND = "laten_attribution"
    INPUTS = ("model", "data")
    index: int = 0  # the sample's line in the data file (0-based, blank lines skipped)
    max_length: int = 2048  # the prefix keeps its last max_length tokens
    norm: str = "authors"  # laten.NORMS
    vocab_chunk: int = 16384  # the lens sums the vocabulary in this order: it is part of the bytes
    chat_template: bool = keyed_if_set(False)  # the sample in this model's chat template (else the paper's layout)
    dtype: str = "float32"
    device: str = execution(default="cpu")

    def compute(self, store, inputs, out):
        model, tok = load_model_input(store, inputs["model"], self.dtype, self.device)
        row = data.read_jsonl(read_source(store, inputs["data"]))[self.index]
        # the target is the answer's own last token, not the chat template's end of turn after it
        prompt, _ = data.render(row["messages"], tok, prompt_format(self.chat_template))
        sample = data.Sample(prompt, row["messages"][-1]["content"], row)
        ids, target = laten.target_example(sample, tok)
        ids = ids[:, -self.max_length:]
        scores = laten.attribute(model, ids, target, norm=self.norm, vocab_chunk=self.vocab_chunk)
        return Tensors(scores, {"target": str(target), "tokens": str(ids.shape[1]),
                                "model_config": model.config.to_json_string()})


@dataclass(frozen=True)
class LatenTranslator(Node):
    """LaTen's per-module translators, trained one optimizer step per extract sample (in order); a
    tree with every step's weights (step_NNN.safetensors, NNN = optimizer steps taken) and the loss
    log. Inputs teacher_attr / student_attr: the attributions of the extract samples, in step order."""

    KIND = "laten_translator"
    INPUTS = ("teacher", "student", "data", "teacher_attr", "student_attr")
    extract: tuple[int, ...] = ()  # line indices of the extract samples
    align: tuple[int, ...] = ()  # line indices of the align samples
    hparams: dict | None = None  # laten.LatenParams.as_dict()
    max_length: int = 2048
    chat_template: bool = keyed_if_set(False)  # the samples in the student's chat template (else the paper's layout)
    val: tuple[int, ...] = keyed_if_set(())  # line indices whose answer CE says when it moved (hparams until_moved)
    dtype: str = "float32"
    device: str = execution(default="cpu")

    def compute(self, store, inputs, out):
        hp = laten.LatenParams.from_dict(self.hparams or {})
        t_src = model_path(store, inputs["teacher"])
        student, tok = load_model_input(store, inputs["student"], self.dtype, self.device)
        rows = data.read_jsonl(read_source(store, inputs["data"]))
        path = inputs["data"]["key"]
        fmt = prompt_format(self.chat_template)
        encode = lambda i: data.encode(data.to_samples([rows[i]], tok, fmt)[0], tok, self.max_length,  # noqa: E731
                                       f"{path} line {i + 1}")
        extract = [{"encoded": encode(i), "t_attr": store.tensors(t), "s_attr": store.tensors(s)}
                   for i, t, s in zip(self.extract, inputs["teacher_attr"], inputs["student_attr"], strict=True)]
        save = lambda k, state: save_file(state, f"{out}/step_{k:03d}.safetensors",  # noqa: E731
                                          metadata={"format": "pt", "step": str(k)})
        moved: dict = {}
        steps = laten.train_translator(models.LazyWeights.from_model_dir(t_src), models.load_config(t_src), student,
                                       extract, [encode(i) for i in self.align], hp, on_step=save,
                                       val=[encode(i) for i in self.val], report=moved)
        if moved:
            log(f"laten translator: val answer CE {moved['val_start']:.4f} at step 0; moved by more than "
                f"{moved['threshold']:g} at step {moved['moved_at']}" if moved["moved_at"] else
                f"laten translator: val answer CE never moved by more than {moved['threshold']:g} in "
                f"{moved['steps']} steps (the cap)")
        Path(out, "translator_log.json").write_text(json.dumps({"steps": steps, "modules": list(hp.modules),
                                                                **({"val": moved} if moved else {})}))


def translator_steps(store: Store, ref: dict) -> int:
    return len(json.loads((store.tree(Ref.of(ref)) / "translator_log.json").read_text())["steps"])


@dataclass(frozen=True)
class LatenDelta(Node):
    """The LaTen update for one student shape: the translated teacher rows/columns of one translator
    step, at one rate, located on one seed sample (teacher_attr, student_attr), as sparse tensors
    ('<weight>.idx', '.rows', '.axis') that Scores adds into the student. control 'zero' keeps the
    support with values 0; 'random' draws norm-matched Gaussian rows under draw_seed."""

    KIND = "laten_delta"
    INPUTS = ("teacher", "translator", "teacher_attr", "student_attr")
    step: int = 1  # 0: the translator's last step (one trained until its val loss moved)
    rate: float = 0.1
    control: str = "translated"  # laten.CONTROLS
    draw_seed: int = 0
    student_shape: dict | None = None

    def compute(self, store, inputs, out):
        tr = inputs["translator"]
        hp = laten.LatenParams.from_dict(store.record("laten_translator", tr["key"])["params"]["hparams"] or {})
        modules, n_steps = hp.modules, translator_steps(store, tr)
        step = self.step or n_steps
        if not 1 <= step <= n_steps:
            raise laten.LatenError(f"LaTen step {self.step}: the translator has steps 1..{n_steps}; "
                                   "choose a laten.grid step in that range")
        t_src = model_path(store, inputs["teacher"])
        s_cfg = arch.config_from_shape(self.student_shape)
        state = _load_safetensors(store.tree(Ref.of(tr)) / f"step_{step:03d}.safetensors")
        pairs = laten.locate(store.tensors(inputs["teacher_attr"]), store.tensors(inputs["student_attr"]),
                             laten.counts(s_cfg, self.rate), modules, hp.n_layers)
        vectors = laten.teacher_vectors(models.LazyWeights.from_model_dir(t_src), models.load_config(t_src), pairs)
        delta = laten.make_delta(laten.load_translator(state, modules), pairs, vectors, s_cfg, self.control,
                                 self.draw_seed)
        layers = [(p.module, p.t_layer, p.s_layer) for p in pairs]
        moved = json.loads((store.tree(Ref.of(tr)) / "translator_log.json").read_text()).get("val")
        return Tensors(delta, {"stats": json.dumps(laten.delta_stats(delta)), "pairs": json.dumps(layers),
                               **({"translator": json.dumps({**moved, "step_used": step})} if moved else {})})


def _load_safetensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))
