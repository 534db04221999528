"""The miniature model family: a teacher and a student (Llama architecture, the teacher deeper and
wider) pretrained with one tokenizer on corpora that differ in one known way: the teacher's also
states the teacher-only facts (tasks.py). Built, the family measures its quality gates on their own
split (gates.py) and records them in family_stats.json, failing loudly in the build's log.

A recipe's `testbed` picks the version of the tokenizer and tasks (tokenizer.py: v1 gives every name
a token of its own, v2 spells names in syllables both corpora train, v3 is v1 with every name also said,
without its number, in both corpora); a `twin` family's teacher is grown from the trained student
(pkt_core/grow.py) and then pretrained on the teacher's corpus, so the two share one basis. Fields added
after v1 stay out of a v1 recipe's params (recipe_params), so the families docs/study was built from keep
their keys.

The builder's own version (BUILDER_VERSION) is in every family's params too: the recipe says what to
build, not what this code writes for it, and a store must not answer a Family node with bytes that
today's builder would not write. tests/test_family_fingerprint.py holds the builder to its digests.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from ..progress import Progress
from . import gates, tasks
from .tasks import TaskSizes
from .tokenizer import TESTBEDS, build_tokenizer, vocab_size


@dataclass(frozen=True)
class ModelRecipe:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    lr: float
    steps: int
    early_step: int | None = None  # also save the weights at this step (a weaker checkpoint)


@dataclass(frozen=True)
class FamilyRecipe:
    teacher: ModelRecipe
    student: ModelRecipe
    tasks: TaskSizes = field(default_factory=TaskSizes)
    batch: int = 32
    block: int = 48  # packed sequence length: about one worked addition
    fact_repeats: int = 8  # how often a corpus states each fact it knows
    shared_repeats: tuple[int, ...] = ()  # graded exposure of the shared facts (tasks.fact_repeats_of)
    n_gsm: int = 4000  # worked additions in each corpus
    n_sni: int = 200
    thresholds: gates.Thresholds = field(default_factory=gates.Thresholds)
    seed: int = 0
    testbed: int = 1  # tokenizer.py: 1 (one token a name; docs/study's families), 2 (names in shared syllables) or
    # 3 (v1, every name also said without its number in both corpora)
    twin: bool = False  # the teacher grown from the trained student, then pretrained on its corpus
    reach_train: dict | None = None  # the reachability gate's LoRA budget (gates.oracle_score); None: not gated


# fields added after the v1 families, left out of their params at these values (their keys stay)
LATER_FIELDS = {"testbed": 1, "twin": False, "reach_train": None}

# What build_family writes for a recipe changes with this code, not only with the recipe: the version is in
# every family's key (recipe_params' "builder"). Bump it whenever a change makes the builder write other bytes
# for an unchanged recipe (data, weights, files, family_stats), and re-record the test family's digests below
# (fingerprint(); tests/test_family_fingerprint.py fails until both are done).
# 1: the keys without "builder": every family stored before this version, docs/study's included (their keys
#    are recipe_params(..., builder=1)).
# 2: each task directory also holds prompts.jsonl (be582ea, 2026-12-07): a builder-1 family stored before then
#    lacks it under the same key, and the data route (distill.py) then reads other prompts (train.jsonl's
#    only). Nothing else differs: f954d73's code (docs/study's 2026-11-30 run) writes the same weights and data
#    as this one for the test family and the study's seed-0 teacher and student, on one machine.
BUILDER_VERSION = 2
# the test family's fingerprint without its weights and stats (the data, tokenizer and configs): any machine
BUILDER_DATA_DIGEST = "f334afcd3f1d7a5f68f95d7efb67dc3e9ddbe0ac1a4ab9d803e2c474d415c3c6"
# ...and with them, by torch's CPU capability: the trained weights' bytes depend on the instruction set the
# kernels use, not only on the code (the study's seed-0 student: final loss 0.6658 under AVX2, 0.6694 with
# ATEN_CPU_CAPABILITY=default, same code and libraries; docs/study's 2026-11-30 build, same code, another
# machine: 0.6670, its teacher 0.5549 where this machine's is 0.5597, and families 5, 6, 8 passed their gates).
# Execution details stay out of keys (DESIGN.md), so a store built on another CPU holds other bytes.
BUILDER_DIGEST = {"AVX2": "b263ee788fe5ecca033132db90afa893d9ded797ab64e0afe32e3daddd2ccfb8"}


# (teacher, student) layers: 15 and 28 distinct layer plans. An 8/4 pair (70 plans) failed its gates
# (seed 1: the 4-layer student beat the teacher on addition and knew every shared fact)
STUDY_DEPTHS = ((6, 2), (8, 2))


def _study(teacher_layers: int, student_layers: int) -> FamilyRecipe:
    """The v1 study recipe (docs/study's families); recipe() makes v2 and twin recipes from it."""
    return FamilyRecipe(
        teacher=ModelRecipe(layers=teacher_layers, hidden=64, intermediate=160, heads=4, kv_heads=2, lr=5e-3,
                            steps=900, early_step=300),
        student=ModelRecipe(layers=student_layers, hidden=32, intermediate=88, heads=4, kv_heads=4, lr=5e-3,
                            steps=500),
        fact_repeats=12, n_gsm=3000, shared_repeats=(2, 4, 8, 16),
    )


SIZES = {
    "demo": replace(_study(*STUDY_DEPTHS[0]), tasks=TaskSizes(n_train=256, n_gate=32, n_val=32, n_test=96)),
    # the study's families: seed s has the depths STUDY_DEPTHS[s % 2] (two depth ratios, many layer plans)
    "study": _study(*STUDY_DEPTHS[0]),
    # seconds, for tests: a GQA teacher so the kv-head path is exercised end to end. It learns the
    # facts but not addition in that time, so its skill gates are not enforced (thresholds 0)
    "test": FamilyRecipe(
        teacher=ModelRecipe(layers=4, hidden=48, intermediate=96, heads=4, kv_heads=2, lr=1e-2, steps=400,
                            early_step=50),
        student=ModelRecipe(layers=2, hidden=16, intermediate=32, heads=2, kv_heads=2, lr=6e-3, steps=60),
        tasks=TaskSizes(n_train=32, n_gate=16, n_val=16, n_test=16, n_seeds=8, facts_format=16),
        batch=16, n_gsm=200, n_sni=20, fact_repeats=8,
        thresholds=gates.Thresholds(skill_gap=0.0, skill_floor=0.0, facts_floor=0.0),
    ),
}


# Every size stays v1 until v2 passes its gates: at the study's pretraining budget a v2 teacher knew
# 6-12.5% of its gate's teacher-only facts (v1: 94%) and the v2 student 3-12% of the shared ones (floor
# 0.2), measured on family seed 0 (2026-12-07), so a v2 study would include no family. `--testbed 2` asks.
# v2 recipes tried (seed 0, 6/2, v1's 900 teacher steps unless said; "QA/sentence": the teacher's teacher-forced
# exact match on its 32 gate teacher-only facts asked in the question format / in the pretraining sentence;
# 2 shared CPU cores, one thread; none passed, so v2's recipe is unchanged):
#   v2 as is (fact_repeats 12, shared 2-16):         QA 0.06, sentence 0.41, teacher 222 s
#   fact_repeats 36, shared 6-48:                    QA 0.16, sentence 0.91, 252 s: stored, not extractable
#   + 3 phrasings of each fact*, facts_format 128:   QA 0.12, sentence 0.12, 251 s: 3.4 epochs store nothing
#   fact_repeats 36, shared 6-48, facts_format 128,
#     1350 teacher steps:                            QA 0.19, sentence 0.91, 375 s
#   fact_repeats 36, shared 6-48, answers* restating
#     the fact ("The number of the X is 4. The
#     answer is 4."):                                QA 0.56, sentence 1.00, 240 s; built (377 s): 4 of 8 gates
#     failed: generating, the teacher copies a wrong name into its answer (teacher-only 0.09), and addition,
#     at half v1's epochs, fell (teacher 0.125, student 0; student shared facts 0.09)
#   the same, facts_format 256 (more names to learn the copy from): built (368 s), 3 of 8 gates failed
#     (teacher-only: teacher 0.09, student 0.125; student addition 0, shared facts 0.09)
# v1's seed-0 build, same machine, for the time budget: 222 s (teacher 172 s), all 7 gates passed (the
# seconds above vary with the load: 900 steps of a 6/2 teacher took 172-314 s). (* trial code, not kept.)
# So a two-piece name's fact is stored (recalled right after its pieces) but the question format, 5 tokens
# on, reads it only when the answer restates the name, which needs a copy these models do not learn.
DEFAULT_TESTBED: dict[str, int] = {}
# v3 (v1's one-token names, each also in 4 word-reversal phrases of names in both corpora, tasks.name_phrases;
# recipe otherwise v1's, with the reachability gate), built at study size on 2 shared cores, one thread (2026-12-07);
# v1 figures: docs/study's families of the same seeds (their store), gate split, teacher / student exact match:
#   seed 0 (6/2), all 8 gates passed, 379 s (teacher 319 s):
#     teacher-only 1.00 / 0.09 (v1 1.00 / 0.03), shared 0.81 / 0.28 (v1 0.84 / 0.44), addition 0.69 / 0.09
#     (v1 0.50 / 0.22), reachable 0.91 (the oracle LoRA 1.00)
#   seed 1 (8/2), 7 of 8 passed, 171 s: student-off-floor/facts-shared FAILED, 0.125 (v1 0.59); teacher-only 0.91 /
#     0.09 (v1 0.94 / 0.125), shared 0.72 / 0.125 (v1 1.00), addition 0.78 / 0.06 (v1 0.75 / 0.34), reachable 0.91
#   seed 2 (6/2), all 8 passed (v1's seed 2 failed headroom/facts-shared), 204 s: teacher-only 0.69 / 0.06 (v1
#     0.875 / 0.06), shared 0.56 / 0.375 (v1 0.81 / 0.78), addition 0.69 / 0.09 (v1 0.69 / 0.28), reachable 0.94
#   seed 3 (8/2), 7 of 8 passed, 470 s: student-off-floor/gsm FAILED, 0.00 (v1 0.125); teacher-only 0.91 / 0.06
#     (v1 1.00 / 0.06), shared 0.91 / 0.34 (v1 0.97 / 0.44), addition 0.75 (v1 0.69), reachable 0.94
#   so 2 of seeds 0-3 pass (v1: 3); every failure is an untrained student's floor
#   the student's input-embedding rows of the 160 scored teacher-only names moved 0.348 (seed 0) and 0.326 (seed 1)
#     from their init (L2, mean; v1: 0.001, weight decay alone; the shared names' rows 0.38 and 0.36)
# The name phrases cost the student: 8% more tokens (5.12 epochs where v1 has 5.53), and the untrained student's
# shared facts and addition sit nearer their floors. Student alone, 8 seeds (0-7), v1's corpus reshuffled with the
# mentions added, gate-split mean: shared facts 0.45 (no mentions) / 0.36 (reversal x4) / 0.48 ("Here is the X."
# x4, 4.70 epochs) / 0.39 (reversal x4, 540 student steps: v1's 5.53 epochs), addition 0.20 / 0.10 / 0.11 / 0.13;
# floors passed (shared >= 0.2, addition >= 0.05) 8+6 / 7+6 / 7+4 / 7+4 of 8: not the lost epochs alone. One
# family's gate is mostly its data order: reshuffling v1's own seed-0 corpus moved its student's addition from
# 0.22 to 0.03. (Trial code, not kept.)
# the reachability gate's budget: the study's LoRA (rank 16, no dropout) at its highest lr and largest step count
REACH_TRAIN = {"rank": 16, "alpha": 32.0, "dropout": 0.0, "lr": 1e-2, "steps": 128, "batch_size": 32,
               "micro_batch": 32, "max_length": 96}


def recipe(size: str, seed: int | None = None, testbed: int | None = None, twin: bool = False) -> FamilyRecipe:
    """The recipe of a size; another seed builds an independent family of the same size (other
    initial weights, data order, facts and task samples). Study families alternate depth ratios.
    testbed: 1, 2 or 3 (None: the size's default, DEFAULT_TESTBED); twin: the teacher grown from the student."""
    if size not in SIZES:
        raise ValueError(f"unknown family size {size!r}; choose one of {', '.join(SIZES)}")
    base = SIZES[size] if seed is None else replace(
        _study(*STUDY_DEPTHS[seed % len(STUDY_DEPTHS)]) if size == "study" else SIZES[size], seed=seed)
    testbed = DEFAULT_TESTBED.get(size, 1) if testbed is None else testbed
    if testbed not in TESTBEDS:
        raise ValueError(f"unknown testbed {testbed!r}; choose one of {', '.join(map(str, TESTBEDS))}")
    if testbed in (2, 3):  # the testbeds built for issue 24 are gated on the endpoint's reachability too
        base = replace(base, testbed=testbed, reach_train=REACH_TRAIN)
    return twin_of(base) if twin else base


def twin_of(r: FamilyRecipe) -> FamilyRecipe:
    """The recipe with its teacher grown from its student: every width of the student doubled (grow.py
    needs whole multiples), the teacher's depth, lr and steps kept."""
    s, t = r.student, r.teacher
    teacher = replace(t, hidden=2 * s.hidden, intermediate=2 * s.intermediate, heads=2 * s.heads,
                      kv_heads=2 * s.kv_heads)
    return replace(r, teacher=teacher, twin=True)


def recipe_params(size: str, seed: int | None = None, testbed: int | None = None, twin: bool = False,
                  builder: int = BUILDER_VERSION) -> dict:
    """The recipe as the family node's params, with the builder's version: the fields added after v1 are left
    out at their v1 values, and so is builder 1 (builder=1 gives the keys older stores hold)."""
    params = asdict(recipe(size, seed, testbed, twin))
    if params["reach_train"] is None:
        del params["thresholds"]["reach_gap"]
    params = {k: v for k, v in params.items() if k not in LATER_FIELDS or v != LATER_FIELDS[k]}
    return params if builder == 1 else params | {"builder": builder}


def check_builder(params: dict | None) -> None:
    """Refuse a family node's recipe params (recipe_params) keyed for another builder version ("builder"
    absent: 1): this code would store its own bytes under a key that names other ones."""
    got = (params or {}).get("builder", 1)
    if got != BUILDER_VERSION:
        raise ValueError(f"family recipe keyed for builder {got}, but this code is builder {BUILDER_VERSION} "
                         "(pkt_core/mini/family.py BUILDER_VERSION): key the family with family.recipe_params(...)")


def llama_config(r: ModelRecipe, testbed: int = 1):
    from transformers import LlamaConfig

    tok = build_tokenizer(testbed)
    return LlamaConfig(
        vocab_size=vocab_size(testbed), hidden_size=r.hidden, intermediate_size=r.intermediate,
        num_hidden_layers=r.layers, num_attention_heads=r.heads, num_key_value_heads=r.kv_heads,
        max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def pretrain(member: str, family: FamilyRecipe, out_dir: Path, log=print, progress: bool = True,
             grow_from: Path | None = None) -> dict:
    """Pretrain one member on its own corpus; writes out_dir (and out_dir-early when early_step is
    set). Returns stats. grow_from: a trained model dir the member starts from, grown to its shape
    (grow.py) instead of a random init."""
    from transformers import LlamaForCausalLM

    from .. import models
    from ..grow import grow

    r = getattr(family, member)
    tok = build_tokenizer(family.testbed)
    torch.manual_seed(family.seed)
    config = llama_config(r, family.testbed)
    texts = corpus(member, family)
    blocks = packed_blocks(tok, texts, family.block)
    grown = {}
    if grow_from is None:
        model = LlamaForCausalLM(config)
    else:
        model = grow(small := models.load_model(grow_from), config)
        with torch.no_grad():  # the expansion step's check: the grown model computes the student's logits
            grown["grown_max_dlogit"] = (model(blocks[:8]).logits - small(blocks[:8]).logits).abs().max().item()
    t0 = time.time()

    def keep_early(step: int) -> None:
        if r.early_step == step:
            _save(model, tok, Path(str(out_dir) + "-early"))

    loss = pretrain_loop(model, blocks, r.lr, r.steps, family.batch, family.seed, f"pretrain {member}", progress,
                         after_step=keep_early)[-1]
    _save(model, tok, out_dir)
    log(f"{member}: {r.steps} steps, final loss {loss:.3f}, {time.time() - t0:.0f} s")
    return {"name": member, "steps": r.steps, "final_loss": round(loss, 4),
            "epochs": round(r.steps * family.batch / len(blocks), 2), "seconds": round(time.time() - t0, 1),
            "params": sum(p.numel() for p in model.parameters()), **grown}


def pretrain_loop(model, blocks: torch.Tensor, lr: float, steps: int, batch: int, seed: int, label: str,
                  progress: bool = True, weight_decay: float = 0.01, after_step=None) -> list[float]:
    """Pretrain `model` in place on packed blocks [n, block]: AdamW, cosine with 5% warm-up, clip 1.0,
    epochs over the blocks in permutations drawn from `seed`; after_step(step) after each step. Returns
    the train loss of every step. The one loop of the family's members and the fresh students (fresh.py)."""
    from transformers import get_cosine_schedule_with_warmup

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = get_cosine_schedule_with_warmup(opt, max(1, steps // 20), steps)
    g = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    losses = []
    bar = Progress(steps, label, "step", enabled=progress)
    for step in range(1, steps + 1):
        if len(order) < batch:  # epochs over the blocks: every fact seen equally often
            order = torch.cat([order, torch.randperm(len(blocks), generator=g)])
        batch_ids, order = blocks[order[:batch]], order[batch:]
        model.train()
        loss = model(input_ids=batch_ids, labels=batch_ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.update()
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if after_step is not None:
            after_step(step)
    bar.close()
    return losses


def corpus(member: str, family: FamilyRecipe) -> list[str]:
    """A member's pretraining documents under the family's recipe."""
    return tasks.pretraining_texts(member, family.tasks, family.seed, family.fact_repeats, family.n_gsm, family.n_sni,
                                   family.shared_repeats, family.testbed)


def packed_blocks(tok, texts: list[str], block: int) -> torch.Tensor:
    """Documents joined by eos and cut into equal blocks: no padding, every token trains."""
    stream = []
    for ids in tok(texts, add_special_tokens=False)["input_ids"]:
        stream += ids + [tok.eos_token_id]
    n = len(stream) // block
    return torch.tensor(stream[: n * block]).view(n, block)


def _save(model, tok, path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path), safe_serialization=True)
    tok.save_pretrained(str(path))


def build_family(out: str | Path, size: str = "demo", log=print, progress: bool = True, seed: int | None = None,
                 testbed: int | None = None, twin: bool = False) -> dict:
    """Write teacher/, teacher-early/, student/ and tasks/<task>/*.jsonl under out; returns stats
    ({"teacher", "student", "gates"}; gates.py says what each gate is). A twin family pretrains the
    student first and grows the teacher from it."""
    fam = recipe(size, seed, testbed, twin)
    out = Path(out)
    for t in tasks.TASKS:
        tasks.write_task(out / "tasks" / t, t, fam.tasks, seed=fam.seed, testbed=fam.testbed)
    stats = {"student": pretrain("student", fam, out / "student", log, progress)} if fam.twin else {}
    stats["teacher"] = pretrain("teacher", fam, out / "teacher", log, progress, out / "student" if fam.twin else None)
    if not fam.twin:
        stats["student"] = pretrain("student", fam, out / "student", log, progress)
    stats["gates"], scores = gates.measure(out, fam.thresholds, fam.reach_train)
    for member, by_task in scores.items():
        stats[member]["gate_exact_match"] = by_task
    for line in gates.gate_lines(stats):
        log(line)
    return stats


def fingerprint(root: str | Path, weights: bool = True) -> str:
    """sha256 (hex) of a built family's bytes, less what no model or task reads: every file under root, its
    JSON files parsed and written canonically without transformers_version, family_stats.json without the
    build's seconds. weights=False leaves out the weights and family_stats.json (losses and gates follow from
    the weights). The test family's are BUILDER_DIGEST and BUILDER_DATA_DIGEST."""
    root, h = Path(root), hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if not weights and (path.suffix == ".safetensors" or path.name == "family_stats.json"):
            continue
        data = path.read_bytes()
        if path.suffix == ".json":
            doc = json.loads(data)
            if isinstance(doc, dict):
                doc.pop("transformers_version", None)
                for member in ("teacher", "student"):
                    if path.name == "family_stats.json" and isinstance(doc.get(member), dict):
                        doc[member].pop("seconds", None)
            data = json.dumps(doc, sort_keys=True).encode()
        h.update(f"{path.relative_to(root).as_posix()}\0{hashlib.sha256(data).hexdigest()}\n".encode())
    return h.hexdigest()
