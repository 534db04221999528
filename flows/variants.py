"""The variants a sweep compares, as data: where each one's init comes from.

A control differs from `transfer` in exactly one field. Its random draw (which rows, which
layers, which directions, which untrained weights) follows the training seed, so seeds differ
in the draw as well as in training, and rerunning a seed reproduces it.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Variant:
    name: str
    init: str = "extracted"  # "none" (no training), "lora", "pissa" (peft's inits), "extracted" or "added"
    teacher: str = "teacher"  # "teacher", "untrained" (random weights, teacher's config) or "early"
    seeds: str = "task"  # "task": the task's own seeds.jsonl; "cross-task": another task's
    selector: str | None = None  # layer selector; None: the config's
    reducer: str | None = None  # dimension reducer; None: the config's
    transform: str = "none"  # applied to the LoRA init: "spectrum-matched" or "shuffled"
    drawn: bool = False  # a random control: its draw is seeded from the training seed
    chain: str = "adapter"  # the nodes it runs: "adapter" (init -> LoRA fine-tune), "laten" (no fine-tuning),
    # "kd" (logit distillation) or "seq-kd" (fine-tuning on the teacher's completions)
    update: str = "translated"  # chain "laten": the update added, or a control: "zero" or "random"
    route: str = "parametric"  # "parametric" (reads the teacher's weights) or "data" (reads only its outputs)
    model: str = "student"  # the model scored: "student" (with the run's adapter, if any) or "teacher" (as it is)
    data: str = "train"  # what it trains on: the task's "train" split, or "scored": the very split it is scored on
    fresh: str | None = None  # chain "fresh": the new student's init, "weight-selection", "subcloning" or "random"
    what: str = ""

    @property
    def trains(self) -> bool:
        return self.init != "none"

    @property
    def extracted(self) -> bool:
        """Its init is a piece extracted from the teacher (subtracted, as the paper does, or added)."""
        return self.init in ("extracted", "added")


VARIANTS = {v.name: v for v in [
    Variant("vanilla", init="none", what="the student, untrained"),
    # positive controls (shared/methods/positive-controls.md): how much there is to move, and the most
    # training at the sweep's budget can put there
    Variant("teacher", init="none", model="teacher",
            what="the teacher itself, scored on the same items (a model, not an adapter): the knowledge there is"),
    Variant("oracle", init="lora", data="scored",
            what="peft's standard LoRA trained on the scored items themselves (val for selection, test for the "
                 "table) at the same budget: the ceiling of what training puts there"),
    Variant("lora", init="lora", what="peft's standard LoRA init (B = 0): every difference is paired against it"),
    Variant("transfer", what="the paper: sensitivity -> layer selection -> max-sensitivity submatrix -> rank-r SVD"),
    Variant("transfer-add", init="added",
            what="transfer's extracted piece ADDED to the student's weights (scaled by init_scale, not subtracted), "
                 "then peft's B = 0 LoRA trained as lora is: the pieces given a direct route into the function"),
    Variant("kd", init="lora", chain="kd", route="data",
            what="data route: logit distillation, KL(teacher || student) on the task's prompts (no answers), at "
                 "the same rank and optimizer steps"),
    Variant("seq-kd", init="lora", chain="seq-kd", route="data",
            what="data route: the student's LoRA fine-tuned on the teacher's greedy completions of the task's "
                 "prompts (no answers), at the same rank and optimizer steps"),
    Variant("pissa", init="pissa", what="peft's PiSSA init on the student's own weights (no teacher)"),
    Variant("random-submatrix", reducer="random", drawn=True,
            what="the sensitive teacher layers, but random rows/columns instead of the sensitive window"),
    Variant("random-layers", selector="random", drawn=True,
            what="random teacher layers, with the sensitive windows inside them"),
    Variant("cross-task", seeds="cross-task", what="sensitivity from another task's seed samples"),
    Variant("untrained-teacher", teacher="untrained", drawn=True,
            what="a randomly initialized model of the teacher's config through the same extraction"),
    Variant("spectrum-matched", transform="spectrum-matched", drawn=True,
            what="the transfer init's singular values with random orthonormal directions"),
    Variant("shuffled", transform="shuffled", drawn=True,
            what="the transfer init with rows and columns permuted (embed/lm_head along the vocabulary)"),
    Variant("early-teacher", teacher="early", what="an earlier, weaker teacher checkpoint through the same extraction"),
    Variant("laten", init="laten", chain="laten",
            what="LaTen (Tan et al., ACL 2025): logit-lens located teacher rows, translated by a trained MLP, added "
                 "into the student's located rows; no fine-tuning"),
    Variant("laten-zero", init="laten", chain="laten", update="zero",
            what="LaTen's whole path with nothing injected: scores as the untrained student"),
    Variant("laten-random", init="laten", chain="laten", update="random", drawn=True,
            what="LaTen's located rows, Gaussian values with the translated rows' norms"),
    # weight inheritance (shared/methods/baselines.md): a selector, a reducer, or both, in the same chain
    # window selectors: these papers' index choices used to cut transfer's window inside the subtracted LoRA
    # init (not their method, where the selected teacher weights become a fresh student that is then trained)
    Variant("weight-selection", selector="evenly-spaced", reducer="weight-selection",
            what="window selector after Xu et al. 2024, inside transfer's subtracted LoRA init (not the paper's "
                 "student initialisation): evenly spaced layers and indices, the same in every layer; no data"),
    Variant("subcloning", reducer="subcloning",
            what="window selector after Samragh et al. 2023, inside transfer's subtracted LoRA init (not the paper's "
                 "student initialisation): the sensitive layers, neurons/heads ranked by mean activation magnitude "
                 "on the seeds (one residual ranking for all layers)"),
    # the same papers as their authors run them (pkt_core/fresh.py): the selected teacher weights BECOME the
    # student, pretrained on the student's corpus for its budget; only a miniature family has that corpus
    Variant("ws-student", init="none", chain="fresh", fresh="weight-selection",
            what="weight selection (Xu et al. 2024) as a student initialisation: the teacher's first layers and "
                 "evenly spaced indices become a student-shaped model, pretrained on the student's corpus for the "
                 "student's budget, scored as a model"),
    Variant("subclone-student", init="none", chain="fresh", fresh="subcloning",
            what="weight subcloning (Samragh et al. 2023) as a student initialisation: neurons by activation "
                 "magnitude on the student corpus, layers by block influence, norm gains rescaled; then pretrained "
                 "as ws-student"),
    Variant("random-student", init="none", chain="fresh", fresh="random",
            what="the fresh-student control: the same pretraining from the family's random init (it reproduces "
                 "the family's student): the baseline the papers' faster-training claim is measured against"),
    Variant("block-influence", selector="block-influence",
            what="ShortGPT's block influence (1 - cos(h_in, h_out)) picks the layers; the sensitive windows inside"),
]}
