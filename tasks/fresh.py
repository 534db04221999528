"""Node kinds of the fresh-student arms (pkt_core/fresh.py): weight selection and subcloning as their
papers run them, a student-shaped model made from the teacher, then pretrained on the miniature
family's student corpus for the student's budget, against the same pretraining from a random init.

Only a miniature family has a student corpus: the nodes regenerate it from the family's recipe
(mini/family.py corpus), which is in their key, so a changed recipe is a new node.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from pkt.core import activations, fresh, models
from pkt.core.mini import family

from .node import Node, log
from .sources import model_path


def family_recipe(corpus: dict, recipe: dict | None) -> family.FamilyRecipe:
    """The FamilyRecipe named by corpus ({size, seed, testbed, twin}), checked against the recipe params the
    key was taken from (family.recipe_params): code whose recipe changed under a stored key is refused."""
    spec = {k: corpus.get(k) for k in ("size", "seed", "testbed")} | {"twin": bool(corpus.get("twin", False))}
    r = family.recipe(**spec)
    if recipe is not None and family.recipe_params(**spec) != recipe:
        raise ValueError(f"family recipe {spec} is not the one this node was keyed by; rebuild the family and rerun")
    return r


def student_blocks(r: family.FamilyRecipe, tok) -> torch.Tensor:
    """The student's pretraining corpus, packed as the family packs it."""
    return family.packed_blocks(tok, family.corpus("student", r), r.block)


@dataclass(frozen=True)
class FreshInit(Node):
    """A model of the student's shape whose every weight is a selection of the teacher's (an HF model dir
    with the student's tokenizer, and fresh_init.json: method, teacher layers, norm scale). Subcloning
    ranks neurons on `calibration` blocks of the student's corpus (the data it is then trained on)."""

    KIND = "fresh_init"
    INPUTS = ("teacher", "student")  # the student: its config and tokenizer only
    method: str = "weight-selection"  # fresh.METHODS
    layers: str | None = None  # align.select_layers strategy; None: the method's (fresh.LAYERS)
    rescale: bool | None = None  # None: the method's (subcloning yes)
    corpus: dict | None = None  # subcloning: the family {size, seed, testbed, twin} whose student corpus calibrates
    recipe: dict | None = None  # family.recipe_params of corpus (in the key)
    calibration: int = 32  # blocks of the corpus the activations are averaged over (subcloning)

    def compute(self, store, inputs, out):
        t_src, s_src = model_path(store, inputs["teacher"]), model_path(store, inputs["student"])
        t_cfg, s_cfg, tok = models.load_config(t_src), models.load_config(s_src), models.load_tokenizer(s_src)
        stats = None
        if self.method == "subcloning":
            if self.corpus is None:
                raise ValueError("subcloning ranks neurons on data: give corpus (a miniature family's)")
            blocks = student_blocks(family_recipe(self.corpus, self.recipe), tok)
            pick = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(0))[: self.calibration]
            teacher = models.load_model(t_src, dtype="float32", device="cpu")
            stats = activations.activation_stats(teacher, [{"input_ids": blocks[i][None]} for i in pick.tolist()])
        model, info = fresh.inherited_model(models.LazyWeights.from_model_dir(t_src), t_cfg, s_cfg, self.method, stats,
                                            self.layers, self.rescale)
        log(f"fresh init ({self.method}): teacher layers {info['layers']}, norm gains x{info['norm_scale']:.3f}")
        model.save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)
        Path(out, "fresh_init.json").write_text(json.dumps(info, sort_keys=True))


@dataclass(frozen=True)
class FreshStudent(Node):
    """A student pretrained on its family's corpus for the student's budget (fresh.pretrain, the family's
    own loop) from an init: a fresh_init node (`init` input) or, with init "random", the seeded random init
    the family's student started from. An HF model dir plus pretrain_log.json (per-step train loss, probe
    loss at fixed steps): scored as a model, as vanilla is."""

    KIND = "fresh_student"
    INPUTS = ("student",)  # config and tokenizer; optional input "init" (a fresh_init)
    init: str = "random"  # "random" or a fresh.METHODS name (then an `init` input)
    corpus: dict | None = None  # the family {size, seed, testbed, twin} whose student corpus and budget it takes
    recipe: dict | None = None  # family.recipe_params of corpus (in the key)
    seed: int | None = None  # the random init's and data order's seed; None: the family's (its student's own)
    loss_at: tuple[int, ...] = ()  # steps whose probe loss is stored; empty: fresh.probe_steps(budget)

    def compute(self, store, inputs, out):
        if self.corpus is None:
            raise ValueError("a fresh student pretrains on a miniature family's student corpus: give corpus")
        r = family_recipe(self.corpus, self.recipe)
        s_src = model_path(store, inputs["student"])
        tok = models.load_tokenizer(s_src)
        seed = r.seed if self.seed is None else self.seed
        if self.init == "random":
            model = fresh.random_model(models.load_config(s_src), seed)
        else:
            model = models.load_model(model_path(store, inputs["init"]), dtype="float32", device="cpu")
        p = fresh.PretrainParams(lr=r.student.lr, steps=r.student.steps, batch=r.batch, seed=seed,
                                 loss_at=tuple(self.loss_at))
        result = fresh.pretrain(model, student_blocks(r, tok), p)
        log(f"fresh student ({self.init}): probe loss by step {result['loss_at']}")
        model.save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)
        Path(out, "pretrain_log.json").write_text(json.dumps({"init": self.init, **result}, sort_keys=True))


def pretrain_log(store, ref: dict) -> dict:
    from pkt.artifacts.store import Ref

    return json.loads((store.tree(Ref.of(ref)) / "pretrain_log.json").read_text())
