"""Every option of a pkt run, validated before any work: the sweep configuration (YAML or TOML)
and the command-line options, with errors that name the field (or flag) and the fix. The files and
models they name are checked in flows/input_checks.py, a sweep's size in flows/sweep_size.py.

Numbers given as strings ("1e-3", YAML's 3e-4, "2") are read as numbers.
"""
from __future__ import annotations

import math
import re
import tomllib
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)

from pkt.core import arch, data, evaluate, inputs, laten
from pkt.core.align import LAYER_SELECTORS, REDUCERS
from pkt.core.errors import UserError
from pkt.core.finetune import TrainParams
from pkt.core.lora_init import SPLITS, SVD_METHODS

from .variants import VARIANTS


class ConfigError(UserError, ValueError):
    pass


DTYPES = ("float32", "bfloat16", "float16", "auto", "fp32", "bf16", "fp16")
DEVICE = re.compile(r"cpu|auto|cuda(:\d+)?")


def _device(v: str) -> str:
    if not DEVICE.fullmatch(v):
        raise ValueError(f"{v!r} is not a device pkt knows; use cpu, cuda, cuda:N (one GPU) or auto (all GPUs)")
    if v != "cpu":
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"{v!r} needs a CUDA GPU and torch sees none here; use cpu")
    return v


def _modules(v):
    """A single module type may be given as a string (YAML `modules: gate`, or 'gate,up')."""
    return [m.strip() for m in v.split(",") if m.strip()] if isinstance(v, str) else v


def _known_modules(v: tuple[str, ...]) -> tuple[str, ...]:
    bad = [m for m in v if m not in arch.ALL_MODULE_TYPES]
    if bad:
        raise ValueError(f"unknown module types {bad}; choose from {', '.join(arch.ALL_MODULE_TYPES)}")
    return v


def _seed(v: int) -> int:
    if not 0 <= v < inputs.SEED_LIMIT:
        raise ValueError("a seed must be a whole number from 0 to 2^63 - 1")
    return v


def _distinct(v: list) -> list:
    """Each item once: a duplicate variant, seed or grid value would be computed (or reported) twice
    under one name, and found only after all the work."""
    seen = set()
    for x in v:
        key = repr(x)
        if key in seen:
            raise ValueError(f"{x!r} is given twice; give each value once")
        seen.add(key)
    return v


Seed = Annotated[int, AfterValidator(_seed)]


def _timeout_kinds(v: dict) -> dict:
    """{node kind: seconds}: every key a node kind (flows/graph.py: --timeout)."""
    from pkt.tasks.node import node_kinds

    bad = [k for k in v if k not in node_kinds()]
    if bad:
        raise ValueError(f"{', '.join(bad)} is not a node kind; give {{KIND: SECONDS}}, KIND one of "
                         f"{', '.join(sorted(node_kinds()))}")
    return v
Seeds = Annotated[list[Seed], AfterValidator(_distinct)]
Dtype = Literal[DTYPES]  # type: ignore[valid-type]
Device = Annotated[str, AfterValidator(_device)]
Modules = Annotated[tuple[str, ...], BeforeValidator(_modules), AfterValidator(_known_modules), Field(min_length=1)]
SvdMethod = Literal[SVD_METHODS]  # type: ignore[valid-type]
PromptFormat = Literal[data.PROMPT_FORMATS]  # type: ignore[valid-type]


class TrainSpec(BaseModel):
    """TrainParams as a validated model: the fields, defaults and meaning of pkt.core.finetune.TrainParams."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)
    rank: int = Field(TrainParams.rank, ge=1)
    alpha: float = Field(TrainParams.alpha, gt=0)
    dropout: float = Field(TrainParams.dropout, ge=0, lt=1)
    lr: float = Field(TrainParams.lr, gt=0)
    epochs: float = Field(TrainParams.epochs, gt=0)
    batch_size: int = Field(TrainParams.batch_size, ge=1)
    micro_batch: int = Field(TrainParams.micro_batch, ge=1)
    warmup_ratio: float = Field(TrainParams.warmup_ratio, ge=0, lt=1)
    weight_decay: float = Field(TrainParams.weight_decay, ge=0)
    max_length: int = Field(TrainParams.max_length, ge=1)
    n_train: int | None = Field(TrainParams.n_train, ge=1)
    seed: Seed = TrainParams.seed
    modules: Modules = TrainParams.modules
    steps: int | None = Field(TrainParams.steps, ge=1, description="optimizer steps; default: epochs x batches")
    checkpoints: tuple[Annotated[int, Field(ge=1)], ...] = Field(
        TrainParams.checkpoints, description="steps at which each run's adapter is also scored on test (a "
        "dose-response from one run), e.g. [8, 32, 128] with steps: 128")

    @model_validator(mode="after")
    def _checkpoints_in_run(self):
        if self.checkpoints and self.steps is None:
            raise ValueError(f"checkpoints {list(self.checkpoints)} need steps: the run's optimizer steps, e.g. "
                             f"steps: {max(self.checkpoints)}")
        late = [c for c in self.checkpoints if self.steps is not None and c > self.steps]
        if late:
            raise ValueError(f"checkpoints {late} lie past the run's {self.steps} steps; raise steps or drop them")
        return self


class GridPoint(TrainSpec):
    """What a training grid may vary: any training parameter, and the init's scale."""

    init_scale: float = Field(1.0, ge=0)


def _train_grid(v: dict) -> dict:
    """{parameter: [values]}, each value validated as that field ("1e-3" -> 0.001)."""
    out = {}
    for name, values in v.items():
        if name not in GridPoint.model_fields:
            raise ValueError(f"unknown grid parameter {name!r}; known: {', '.join(GridPoint.model_fields)}")
        if not values:
            raise ValueError(f"{name}: give a non-empty list of values, e.g. {name}: "
                             f"[{GridPoint.model_fields[name].default}]")
        try:
            out[name] = [_plain(getattr(GridPoint.model_validate({name: x}), name)) for x in values]
        except ValidationError as e:
            raise ValueError("; ".join(f"{name} {err['input']!r}: {MESSAGES.get(err['type'], err['msg'])}"
                                       .format(**err.get("ctx", {})) for err in e.errors())) from None
        try:
            _distinct(out[name])  # compared as read: "1e-3" and 0.001 are one learning rate
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
    return out


def _plain(x):
    return list(x) if isinstance(x, tuple) else x


class TaskSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)
    name: str
    dir: str = Field(description="directory with train.jsonl, seeds.jsonl, val.jsonl, test.jsonl")
    benchmark: str = Field("gsm", description="gsm | mmlu | sni, or any lm-eval task name")
    max_gen_toks: int | None = Field(None, ge=1, description="new tokens a generated answer may take; default: "
                                     "the benchmark's (512 for gsm)")

    @field_validator("dir")
    @classmethod
    def _has_files(cls, v: str) -> str:
        if not Path(v).is_dir():
            raise ValueError(f"{v} is not a directory; a task directory holds train/seeds/test(/val).jsonl")
        missing = [f for f in ("train.jsonl", "seeds.jsonl", "test.jsonl") if not (Path(v) / f).exists()]
        if missing:
            raise ValueError(f"{v} lacks {', '.join(missing)}; a task directory holds train/seeds/test(/val).jsonl")
        return v


class LatenSpec(BaseModel):
    """LaTen's settings (the laten* variants): the authors' hyperparameters by default
    (pkt_core.laten.LatenParams), the extract/align splits drawn from the task's train.jsonl only."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    n_extract: int = Field(20, ge=1, description="extract samples: one translator step each")
    n_align: int = Field(80, ge=1, description="align samples, drawn from for every step's batch")
    align_per_step: int = Field(15, ge=1)
    split_seed: Seed = 0
    rate: float = Field(0.1, gt=0, le=1, description="transfer rate while training the translator")
    modules: tuple[Literal[tuple(laten.MODULES)], ...] = Field(laten.DEFAULT_MODULES, min_length=1)  # type: ignore
    n_layers: int | None = Field(None, ge=1, description="paired layers; default: the student's depth")
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    mse_weight: float = Field(1000.0, ge=0)
    norm: Literal[laten.NORMS] = "authors"  # type: ignore[valid-type]
    init_std: float = Field(1e-5, gt=0, description="the translator's N(0, init_std) init (the authors')")
    reference_width: tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]] | None = Field(
        None, description="[d_t, d_s] that init_std and lr were set for: given (the authors' [5120, 4096]), both are "
        "carried to this pair's widths (pkt.core.laten.LatenParams.at_width); none: used as given")
    until_moved: float | None = Field(None, gt=0, description="nats: train the translator past the extract samples "
                                      "until its val answer CE moves by more than this from step 0 (e.g. 1e-3); "
                                      "none: the authors' one pass")
    max_steps: int | None = Field(None, ge=1, description="until_moved's cap on translator steps; none: 8 x n_extract")
    n_val: int = Field(16, ge=1, description="until_moved: the train lines outside extract/align whose answer CE "
                       "is watched")
    grid: dict[Literal["step", "rate"], list] = Field(
        default_factory=dict, description="chosen on val like train_grid, e.g. {step: [10, 20], "
        "rate: [0.05, 0.1, 0.2]}; default: the last step at the training rate")

    @field_validator("grid")
    @classmethod
    def _grid_values(cls, v: dict) -> dict:
        for name, values in v.items():
            ok = [isinstance(x, int) and x >= 1 if name == "step" else isinstance(x, (int, float)) and 0 < x <= 1
                  for x in values]
            if not values or not all(ok):
                raise ValueError(f"laten.grid.{name} {values}: give a non-empty list of "
                                 + ("whole numbers >= 1 (optimizer steps)" if name == "step" else "rates in (0, 1]"))
            try:
                _distinct(values)
            except ValueError as e:
                raise ValueError(f"laten.grid.{name}: {e}") from None
        return v

    @model_validator(mode="after")
    def _steps_exist(self):
        budget = laten.LatenParams(until_moved=self.until_moved, max_steps=self.max_steps).step_budget(self.n_extract)
        bad = [s for s in self.grid.get("step", []) if s > budget]
        if bad:
            raise ValueError(f"laten.grid.step {bad}: the translator takes at most {budget} steps (n_extract, or with "
                             "until_moved max_steps)")
        return self

    def hparams(self, seed: int) -> dict:
        return laten.LatenParams(rate=self.rate, modules=tuple(self.modules), n_layers=self.n_layers, lr=self.lr,
                                 weight_decay=self.weight_decay, mse_weight=self.mse_weight,
                                 align_per_step=self.align_per_step, norm=self.norm, seed=seed,
                                 init_std=self.init_std, reference_width=self.reference_width,
                                 until_moved=self.until_moved, max_steps=self.max_steps).as_dict()

    def points(self) -> list[dict]:
        """The grid's settings, {step, rate} each; without a step axis the last step (0: wherever a translator
        trained until_moved stopped)."""
        last = 0 if self.until_moved is not None else self.n_extract
        return [{"step": s, "rate": r} for s in self.grid.get("step", [last])
                for r in self.grid.get("rate", [self.rate])]


def _comparison(v):
    """'transfer - shuffled' (YAML shorthand) -> {subject: transfer, control: shuffled}."""
    if isinstance(v, str):
        subject, sep, control = (x.strip() for x in v.partition(" - "))
        if not sep:
            raise ValueError(f"{v!r}: write a comparison as 'SUBJECT - CONTROL', e.g. 'transfer - shuffled'")
        return {"subject": subject, "control": control}
    return v


class Comparison(BaseModel):
    """subject minus control, paired by seed, each at its own best setting."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    subject: str = "transfer"
    control: str

    def __str__(self) -> str:
        return f"{self.subject} - {self.control}"


class Endpoint(BaseModel):
    """The primary endpoint, declared before any data: the metric, the tasks it is read on and the
    comparisons that decide the study. The report states it first, tests these comparisons with Holm's
    correction among themselves, and every other comparison with Benjamini-Hochberg."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    metric: str = Field(description="a metric the sweep scores on test, e.g. acc, answer_nll, exact_match/strict-match")
    tasks: list[str] | None = Field(None, description="task names it is read on; default: every task")
    comparisons: list[Annotated[Comparison, BeforeValidator(_comparison)]] = Field(
        min_length=1, description="e.g. ['transfer - spectrum-matched', 'transfer - shuffled']")
    alpha: float = Field(0.05, gt=0, lt=1, description="familywise error rate of the primary comparisons")
    at_subject_setting: bool = Field(False, description="the secondary contrast: each control also trained at "
                                     "its subject's chosen setting (matched.csv, with the top singular values' ratio)")


class FamilyCorpus(BaseModel):
    """The miniature family the students belong to (mini/family.py recipe): where the fresh-student arms
    (chain "fresh") take the student's corpus and pretraining budget from."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    size: str = Field("demo", description="the family size (mini/family.py SIZES)")
    seed: int | None = Field(None, description="the family seed; none: the size's own")
    testbed: int | None = Field(None, description="the family's testbed; none: the size's default")
    twin: bool = False


SETTING_FIELDS = ("init_scale",)  # train_grid keys that are not training parameters


class SweepConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)
    name: str | None = Field(None, description="names this sweep's artifacts in the UI (default: a config digest)")
    teacher: str
    students: Annotated[list[str], AfterValidator(_distinct)] = Field(min_length=1)
    tasks: list[TaskSpec] = Field(min_length=1)
    variants: Annotated[list[str], AfterValidator(_distinct)] = Field(["vanilla", "lora", "transfer"], min_length=1)
    seeds: Seeds = Field([0], min_length=1, description="training seeds, e.g. [0, 1, 2]")
    early_teacher: str | None = None
    cross_task_seeds: str | None = Field(None, description="seeds.jsonl of another task, for the cross-task control")
    k: int | None = Field(None, ge=1, description="seed samples drawn from seeds.jsonl; None: all of them (paper: 32)")
    sample_seed: Seed = 0
    selector: Literal[LAYER_SELECTORS] = "sensitivity"  # type: ignore[valid-type]
    reducer: Literal[REDUCERS] = "submatrix"  # type: ignore[valid-type]
    split: Literal[SPLITS] = "paper"  # type: ignore[valid-type]
    svd: SvdMethod = Field("auto", description="LoRA-init SVD: auto (the exact top-r SVD, = gram), full or lowrank (randomized)")
    init_scale: float = Field(1.0, ge=0)
    max_length: int = Field(2048, ge=1)
    train: TrainSpec = Field(default_factory=TrainSpec, description="training parameters (rank, alpha, lr, epochs, ...)")
    train_grid: Annotated[dict[str, list], AfterValidator(_train_grid)] = Field(
        default_factory=dict, description="e.g. {lr: [1e-3, 1e-2], init_scale: [0.5, 1, 2]}: each variant at its "
        "best setting on val")
    variant_grid: dict[str, Annotated[dict[str, list], AfterValidator(_train_grid)]] = Field(
        default_factory=dict, description="per variant, grid axes added to (or replacing) train_grid's, e.g. "
        "{lora: {alpha: [8, 32]}}: every trained variant needs a grid of the same size")
    laten: LatenSpec = Field(default_factory=LatenSpec, description="LaTen's settings and grid (laten* variants)")
    family: FamilyCorpus | None = Field(None, description="the miniature family of the students: the corpus and "
                                        "budget the fresh-student variants (ws-student, ...) pretrain on")
    select_on: str | None = Field(None, description="val metric that picks each variant's setting; default: the "
                                  "first task's primary metric (answer_nll is steadier at small scale)")
    selection_seeds: Seeds = Field(default_factory=list, description="training seeds of the runs that choose "
                                       "each variant's setting on val; never scored on test, disjoint from seeds")
    endpoint: Endpoint | None = Field(None, description="the primary endpoint, declared before the data")
    completion_tokens: int = Field(32, ge=1, description="seq-kd: the most tokens the teacher completes a prompt with")
    benchmarks: Annotated[list[str], AfterValidator(_distinct)] = Field(default_factory=lambda: ["answer_nll"],
                                                                        description="extra benchmarks per task")
    judge: str | None = Field(None, description="local judge model for the optional 'winrate' benchmark")
    num_fewshot: int = Field(0, ge=0)
    eval_limit: int | None = Field(None, ge=1)
    prompt_format: PromptFormat = Field("auto", description="auto: each model's own chat template when its "
                                        "tokenizer has one, else the paper's <|user|>/<|assistant|> layout")
    check: bool | None = Field(None, description="before scoring, stop when the student's answers to a few val "
                               "items look broken (empty, identical, refusals, no answer); default: for a student "
                               "scored in its chat template (the format mistake the check exists for), true: in "
                               "the paper's layout too, false: never")
    dtype: Dtype = "float32"
    device: Device = "cpu"
    report_dir: str = "pkt-report"
    store: str | None = Field(None, description="store root; default PKT_STORE or ./.pkt/store")
    runner: Literal["threads", "processes", "dask"] = Field(
        "threads", description="task runner: threads in this process, a local process pool, or a Dask cluster")
    workers: int = Field(1, ge=1, description="parallel workers (threads, processes, or LocalCluster workers)")
    dask_address: str | None = Field(None, description="scheduler address of an existing Dask cluster (runner dask)")
    timeouts: Annotated[dict[str, Annotated[float, Field(gt=0)]], AfterValidator(_timeout_kinds)] = Field(
        default_factory=dict, description="seconds a node of a kind may run, e.g. {adapter: 600, sensitivity: "
        "1800}: past it the node stops, stores nothing and its task run ends TimedOut (--timeout wins per kind)")

    @field_validator("variants")
    @classmethod
    def _known_variants(cls, v: list[str]) -> list[str]:
        bad = [x for x in v if x not in VARIANTS]
        if bad:
            raise ValueError(f"unknown variants {bad}; choose from {', '.join(VARIANTS)}")
        return v

    @model_validator(mode="after")
    def _one_thread_worker(self):
        _check_runner(self.runner, self.workers)
        return self

    @field_validator("tasks")
    @classmethod
    def _distinct_task_names(cls, v: list[TaskSpec]) -> list[TaskSpec]:
        _distinct([t.name for t in v])
        return v

    @model_validator(mode="after")
    def _controls_have_inputs(self):
        if "early-teacher" in self.variants and not self.early_teacher:
            raise ValueError("variant early-teacher needs early_teacher: the path of an earlier teacher checkpoint")
        if "cross-task" in self.variants and not self.cross_task_seeds:
            raise ValueError("variant cross-task needs cross_task_seeds: a seeds.jsonl from another task")
        fresh = [v for v in self.variants if VARIANTS[v].chain == "fresh"]
        if fresh and self.family is None:
            raise ValueError(f"variants {fresh} pretrain a fresh student on the student's own corpus, which only a "
                             "miniature family carries: give family (its size and seed), or drop them for this pair")
        if "winrate" in self.benchmarks and not self.judge:
            raise ValueError("benchmark winrate needs judge: the path of a local judge model")
        if "lora" not in self.variants and len(self.variants) > 1:
            raise ValueError("add variant lora: every comparison in the report is paired against it")
        return self

    @model_validator(mode="after")
    def _protocol(self):
        """Equal grids, selection apart from test, an endpoint the sweep can measure."""
        sizes = {v: self.grid_size(v) for v in self.variants if VARIANTS[v].trains}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"unequal grids: {', '.join(f'{v} {n}' for v, n in sizes.items())} settings; every "
                             "trained variant needs a grid of the same size (init_scale applies only to inits "
                             "from a teacher): give the others an axis of their own in variant_grid, e.g. "
                             "{lora: {alpha: [8, 32]}, pissa: {alpha: [8, 32]}}")
        unknown = [v for v in self.variant_grid if v not in self.variants]
        if unknown:
            raise ValueError(f"variant_grid names {unknown}, which this sweep does not run; variants: "
                             f"{', '.join(self.variants)}")
        if max(sizes.values(), default=1) > 1:
            if not self.selection_seeds:
                raise ValueError("a grid needs selection_seeds: training seeds whose val scores choose each "
                                 "variant's setting and that are never scored on test, e.g. [100, 101]")
            shared = sorted(set(self.selection_seeds) & set(self.seeds))
            if shared:
                raise ValueError(f"selection_seeds and seeds share {shared}: a setting chosen on a seed would be "
                                 "scored on that seed's test runs; use fresh seeds for one of them")
        if self.endpoint:
            _check_endpoint(self.endpoint, self)
        return self

    def _grid_axes(self, variant: str) -> dict[str, list]:
        axes = {k: x for k, x in self.train_grid.items() if k != "init_scale" or VARIANTS[variant].extracted}
        return axes | self.variant_grid.get(variant, {})

    def grid_size(self, variant: str) -> int:
        """len(grid_points(variant)), without building them (a 1000 x 1000 grid is a million settings)."""
        if VARIANTS[variant].chain == "laten":
            return len(self.laten.grid.get("step", [0])) * len(self.laten.grid.get("rate", [0]))
        return math.prod(len(values) for values in self._grid_axes(variant).values())

    def grid_points(self, variant: str) -> list[dict]:
        """Every training setting of a variant: train_grid's axes that apply to it (init_scale only to
        inits from a teacher), with its variant_grid axes added or replacing them."""
        if VARIANTS[variant].chain == "laten":  # LaTen trains no adapter: its grid is its own (step x rate)
            return self.laten.points()
        axes = self._grid_axes(variant)
        points = [{}]
        for name, values in axes.items():
            points = [{**p, name: x} for p in points for x in values]
        return points

    def train_params(self, seed: int, overrides: dict | None = None) -> TrainParams:
        return TrainParams.from_dict({**self.train.model_dump(), **(overrides or {}), "seed": seed})

    def modules(self) -> tuple[str, ...]:
        """Every module type any run of the sweep trains (grid points included)."""
        found = set(self.train.modules).union(*self.train_grid.get("modules", []))
        return tuple(m for m in arch.ALL_MODULE_TYPES if m in found)

    def ranks(self) -> list[int]:
        return sorted({self.train.rank, *self.train_grid.get("rank", [])})


def _check_endpoint(e: Endpoint, cfg: SweepConfig) -> None:
    for c in e.comparisons:
        missing = [v for v in (c.subject, c.control) if v not in cfg.variants]
        if missing:
            raise ValueError(f"endpoint comparison '{c}': {missing} not among the variants; add them to variants")
        if c.subject != "transfer" and c.control != "lora":
            raise ValueError(f"endpoint comparison '{c}': the report pairs transfer against every variant and every "
                             "variant against lora; write 'transfer - X' or 'X - lora'")
    names = [t.name for t in cfg.tasks]
    bad = [t for t in e.tasks or [] if t not in names]
    if bad:
        raise ValueError(f"endpoint tasks {bad} are not tasks of this sweep ({', '.join(names)})")
    tasks = [t for t in cfg.tasks if e.tasks is None or t.name in e.tasks]
    scored = {evaluate.primary_metric(b) for t in tasks for b in [t.benchmark, *cfg.benchmarks]}
    if e.metric not in scored:
        raise ValueError(f"endpoint metric {e.metric!r} is not scored on those tasks; they give "
                         f"{', '.join(sorted(scored))}")


class ExtractConfig(BaseModel):
    """The options of `pkt extract` (and of the extract-teacher flow)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)
    teacher: str
    seeds: str
    students: list[str] = Field(min_length=1)
    rank: int = Field(16, ge=1)
    alpha: float = Field(16.0, gt=0)
    k: int | None = Field(None, ge=1)
    selector: Literal[LAYER_SELECTORS] = "sensitivity"  # type: ignore[valid-type]
    reducer: Literal[REDUCERS] = "submatrix"  # type: ignore[valid-type]
    svd: SvdMethod = "auto"
    dtype: Dtype = "float32"
    device: Device = "cpu"
    sensitivity_layout: Literal["single", "per_layer"] = "single"
    store: str | None = None
    max_length: int = Field(2048, ge=1, description="token cutoff of each seed sample")
    prompt_format: PromptFormat = "auto"


def _check_runner(runner: str, workers: int) -> None:
    if runner == "threads" and workers > 1:
        raise ValueError("runner threads takes workers: 1 (threads share torch's random state, so parallel "
                         "branches would not be reproducible); use runner processes or dask for workers > 1")


class DemoConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)
    size: Literal["demo", "test"] = "demo"
    seeds: int = Field(3, ge=1, description="training seeds per variant")
    report_dir: str = "pkt-report"
    store: str | None = None
    runner: Literal["threads", "processes", "dask"] = "threads"
    workers: int = Field(1, ge=1, description="parallel workers (processes or dask)")

    @model_validator(mode="after")
    def _one_thread_worker(self):
        _check_runner(self.runner, self.workers)
        return self


def load_config(path: str | Path) -> SweepConfig:
    path = Path(path)
    try:  # a regular file of bounded size and line length: never a device, a FIFO, a 50 MB line
        text = inputs.read_text(path, "a YAML or TOML sweep config (see README, 'The sweep config')")
    except inputs.InputError as e:
        raise ConfigError(str(e)) from None
    try:
        raw = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as e:
        mark = getattr(e, "problem_mark", None)  # YAML's own message spans lines, with a caret drawing
        why = (f"{e.problem} at line {mark.line + 1}, column {mark.column + 1}" if mark and getattr(e, "problem", None)
               else " ".join(str(e).split()))
        raise ConfigError(f"{path}: not valid {path.suffix.lstrip('.').upper() or 'YAML'}: {why}") from None
    except ValueError as e:  # a number of more than 4300 digits (int() refuses it)
        raise ConfigError(f"{path}: a number too long to read ({str(e).split(':')[0]}); give numbers of at most a "
                          "few digits") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to read; a sweep config is a mapping of fields") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{path}: the config must be a mapping of fields (teacher: ..., students: [...], ...)")
    return parse_config(raw or {}, str(path))


def parse_config(raw: dict, where: str = "config") -> SweepConfig:
    return validate(SweepConfig, raw, where)


def validate(model: type[BaseModel], raw: dict, where: str, flags: dict[str, str] | None = None):
    """model(**raw), or a ConfigError with one line per problem naming the field, or with flags
    (field -> command-line flag) the flag, and what is wrong."""
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise ConfigError("\n".join(_describe(err, where, flags) for err in e.errors())) from None


MESSAGES = {  # pydantic error type -> what to give instead
    "greater_than_equal": "must be at least {ge}", "greater_than": "must be above {gt}",
    "less_than": "must be below {lt}", "less_than_equal": "must be at most {le}",
    "too_short": "give at least {min_length} item", "int_parsing": "must be a whole number",
    "int_from_float": "must be a whole number", "float_parsing": "must be a number",
    "literal_error": "choose one of {expected}", "missing": "is required",
    "finite_number": "must be a finite number",
}


def _describe(err: dict, where: str, flags: dict[str, str] | None) -> str:
    loc = [str(x) if str(x).isprintable() else repr(x) for x in err["loc"]]  # \x1e would split the sentence
    template = MESSAGES.get(err["type"])
    msg = template.format(**err.get("ctx", {})) if template else err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        known = TrainSpec.model_fields if loc[:1] == ["train"] else {}
        msg = "is not a field pkt knows" + (f"; known: {', '.join(known)}" if known else "")
    given = err.get("input")
    if isinstance(given, int) and abs(given).bit_length() > 96:  # str() of a 100,000-digit int raises
        given = f"(a {abs(given).bit_length()}-bit number)"
    if isinstance(given, str) and not given.isprintable():  # a newline or CR in a value would break the sentence
        given = repr(given)
    shown = f" {given}" if isinstance(given, (str, int, float)) and err["type"] != "missing" else ""
    if flags is not None and ".".join(loc[:2]) in flags:  # a field of its own flag (--laten-extract)
        return f"{flags['.'.join(loc[:2])]}{shown}: {msg}"
    if flags is not None and loc and loc[0] in flags:
        sub = loc[1:] if loc[0] == "train" else []  # --train lr; but --task-dir, not --task-dir 0 dir
        return f"{' '.join([flags[loc[0]], *sub])}{shown}: {msg}"
    return f"{where}: field {'.'.join(loc) or '(top level)'}{' =' + shown if shown else ''}: {msg}"
