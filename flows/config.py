"""Every input of a pkt run, validated before any work: the sweep configuration (YAML or TOML)
and the command-line options, with errors that name the field (or flag) and the fix.

Numbers given as strings ("1e-3", YAML's 3e-4, "2") are read as numbers.
"""
from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)

from pkt.core import arch, data, models, preflight
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


Dtype = Literal[DTYPES]  # type: ignore[valid-type]
Device = Annotated[str, AfterValidator(_device)]
Modules = Annotated[tuple[str, ...], BeforeValidator(_modules), AfterValidator(_known_modules), Field(min_length=1)]
SvdMethod = Literal[SVD_METHODS]  # type: ignore[valid-type]


class TrainSpec(BaseModel):
    """TrainParams as a validated model: the fields, defaults and meaning of pkt.core.finetune.TrainParams."""

    model_config = ConfigDict(frozen=True, extra="forbid")
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
    seed: int = TrainParams.seed
    modules: Modules = TrainParams.modules


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
    return out


def _plain(x):
    return list(x) if isinstance(x, tuple) else x


class TaskSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str
    dir: str = Field(description="directory with train.jsonl, seeds.jsonl, val.jsonl, test.jsonl")
    benchmark: str = Field("gsm", description="gsm | mmlu | sni, or any lm-eval task name")

    @field_validator("dir")
    @classmethod
    def _has_files(cls, v: str) -> str:
        if not Path(v).is_dir():
            raise ValueError(f"{v} is not a directory; a task directory holds train/seeds/test(/val).jsonl")
        missing = [f for f in ("train.jsonl", "seeds.jsonl", "test.jsonl") if not (Path(v) / f).exists()]
        if missing:
            raise ValueError(f"{v} lacks {', '.join(missing)}; a task directory holds train/seeds/test(/val).jsonl")
        return v


class SweepConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str | None = Field(None, description="names this sweep's artifacts in the UI (default: a config digest)")
    teacher: str
    students: list[str] = Field(min_length=1)
    tasks: list[TaskSpec] = Field(min_length=1)
    variants: list[str] = Field(["vanilla", "lora", "transfer"], min_length=1)
    seeds: list[int] = Field([0], min_length=1, description="training seeds, e.g. [0, 1, 2]")
    early_teacher: str | None = None
    cross_task_seeds: str | None = Field(None, description="seeds.jsonl of another task, for the cross-task control")
    k: int | None = Field(None, ge=1, description="seed samples drawn from seeds.jsonl; None: all of them (paper: 32)")
    sample_seed: int = 0
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
    select_on: str | None = Field(None, description="val metric that picks each variant's setting; default: the "
                                  "first task's primary metric (answer_nll is steadier at small scale)")
    benchmarks: list[str] = Field(default_factory=lambda: ["answer_nll"], description="extra benchmarks per task")
    judge: str | None = Field(None, description="local judge model for the optional 'winrate' benchmark")
    num_fewshot: int = Field(0, ge=0)
    eval_limit: int | None = Field(None, ge=1)
    dtype: Dtype = "float32"
    device: Device = "cpu"
    report_dir: str = "pkt-report"
    store: str | None = Field(None, description="store root; default PKT_STORE or ./.pkt/store")
    runner: Literal["threads", "processes", "dask"] = Field(
        "threads", description="task runner: threads in this process, a local process pool, or a Dask cluster")
    workers: int = Field(1, ge=1, description="parallel workers (threads, processes, or LocalCluster workers)")
    dask_address: str | None = Field(None, description="scheduler address of an existing Dask cluster (runner dask)")

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

    @model_validator(mode="after")
    def _controls_have_inputs(self):
        if "early-teacher" in self.variants and not self.early_teacher:
            raise ValueError("variant early-teacher needs early_teacher: the path of an earlier teacher checkpoint")
        if "cross-task" in self.variants and not self.cross_task_seeds:
            raise ValueError("variant cross-task needs cross_task_seeds: a seeds.jsonl from another task")
        if "winrate" in self.benchmarks and not self.judge:
            raise ValueError("benchmark winrate needs judge: the path of a local judge model")
        if "lora" not in self.variants and len(self.variants) > 1:
            raise ValueError("add variant lora: every comparison in the report is paired against it")
        return self

    def train_params(self, seed: int, overrides: dict | None = None) -> TrainParams:
        return TrainParams.from_dict({**self.train.model_dump(), **(overrides or {}), "seed": seed})

    def modules(self) -> tuple[str, ...]:
        """Every module type any run of the sweep trains (grid points included)."""
        found = set(self.train.modules).union(*self.train_grid.get("modules", []))
        return tuple(m for m in arch.ALL_MODULE_TYPES if m in found)

    def ranks(self) -> list[int]:
        return sorted({self.train.rank, *self.train_grid.get("rank", [])})


class ExtractConfig(BaseModel):
    """The options of `pkt extract` (and of the extract-teacher flow)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
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


def _check_runner(runner: str, workers: int) -> None:
    if runner == "threads" and workers > 1:
        raise ValueError("runner threads takes workers: 1 (threads share torch's random state, so parallel "
                         "branches would not be reproducible); use runner processes or dask for workers > 1")


class DemoConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
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
    if not path.is_file():
        problem = "is a directory" if path.is_dir() else "no such file"
        raise ConfigError(f"{path}: {problem}; give a YAML or TOML sweep config (see README, 'The sweep config')")
    try:
        text = path.read_text(encoding="utf-8-sig")
        raw = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; save the config as UTF-8") from None
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: not valid {path.suffix.lstrip('.').upper() or 'YAML'}: {e}") from None
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
}


def _describe(err: dict, where: str, flags: dict[str, str] | None) -> str:
    loc = [str(x) for x in err["loc"]]
    template = MESSAGES.get(err["type"])
    msg = template.format(**err.get("ctx", {})) if template else err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        known = TrainSpec.model_fields if loc[:1] == ["train"] else {}
        msg = "is not a field pkt knows" + (f"; known: {', '.join(known)}" if known else "")
    given = err.get("input")
    shown = f" {given}" if isinstance(given, (str, int, float)) and err["type"] != "missing" else ""
    if flags is not None and loc and loc[0] in flags:
        sub = loc[1:] if loc[0] == "train" else []  # --train lr; but --task-dir, not --task-dir 0 dir
        return f"{' '.join([flags[loc[0]], *sub])}{shown}: {msg}"
    return f"{where}: field {'.'.join(loc) or '(top level)'}{' =' + shown if shown else ''}: {msg}"


# ---- the inputs behind a config, checked before any work ----------------------------------------
def check_extract_inputs(cfg: ExtractConfig) -> None:
    """The seeds file, and every model's files, config and tokenizer: no weights are loaded."""
    _check_seeds(cfg.seeds, cfg.k, "--k")
    preflight.check_models(cfg.teacher, cfg.students, rank=cfg.rank, rank_name="--rank")


def check_sweep_inputs(cfg: SweepConfig) -> None:
    """Every data file a sweep reads, every model's files, config and tokenizer, and the ranks the
    students allow: no weights are loaded."""
    for task in cfg.tasks:
        for name in ("train.jsonl", "test.jsonl") + (("val.jsonl",) if cfg.train_grid else ()):
            data.read_jsonl(Path(task.dir) / name)
        _check_seeds(str(Path(task.dir) / "seeds.jsonl"), cfg.k, "k")
    variants = [VARIANTS[v] for v in cfg.variants]
    if cfg.cross_task_seeds and any(v.seeds == "cross-task" for v in variants):
        _check_seeds(cfg.cross_task_seeds, cfg.k, "k")
    modules, rank = cfg.modules(), max(cfg.ranks())
    if any(v.extracted for v in variants):
        preflight.check_models(cfg.teacher, cfg.students, modules, rank, "train.rank")
        if any(v.teacher == "early" for v in variants):
            preflight.check_models(cfg.early_teacher, cfg.students, modules)
    else:
        for s in cfg.students:
            preflight.check_model_files(s)
            if any(v.trains for v in variants):
                preflight.check_rank(rank, models.load_config(s), modules, "train.rank")
    if "winrate" in cfg.benchmarks:
        preflight.check_model_files(cfg.judge)


def _check_seeds(path: str, k: int | None, k_name: str) -> None:
    n = len(data.read_jsonl(path))
    if k is not None and k > n:
        raise ConfigError(f"{k_name} {k}: {path} holds only {n} seed samples; lower {k_name} or add samples")
