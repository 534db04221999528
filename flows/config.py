"""The sweep configuration (YAML or TOML), validated with errors that name the field and the fix."""
from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pkt.core.align import LAYER_SELECTORS, REDUCERS
from pkt.core.finetune import TrainParams
from pkt.core.lora_init import SPLITS

from .variants import VARIANTS


class ConfigError(ValueError):
    pass


class TaskSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str
    dir: str = Field(description="directory with train.jsonl, seeds.jsonl, val.jsonl, test.jsonl")
    benchmark: str = Field("gsm", description="gsm | mmlu | sni, or any lm-eval task name")

    @field_validator("dir")
    @classmethod
    def _has_files(cls, v: str) -> str:
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
    variants: list[str] = ["vanilla", "lora", "transfer"]
    seeds: list[int] = [0]
    early_teacher: str | None = None
    cross_task_seeds: str | None = Field(None, description="seeds.jsonl of another task, for the cross-task control")
    k: int | None = Field(None, description="seed samples drawn from seeds.jsonl; None: all of them (paper: 32)")
    sample_seed: int = 0
    selector: Literal[LAYER_SELECTORS] = "sensitivity"  # type: ignore[valid-type]
    reducer: Literal[REDUCERS] = "submatrix"  # type: ignore[valid-type]
    split: Literal[SPLITS] = "paper"  # type: ignore[valid-type]
    init_scale: float = 1.0
    max_length: int = 2048
    train: dict = Field(default_factory=dict, description="TrainParams overrides (rank, alpha, lr, epochs, ...)")
    train_grid: dict[str, list] = Field(default_factory=dict, description="e.g. {lr: [1e-3, 1e-2], init_scale: "
                                        "[0.5, 1, 2]}: each variant at its best setting on val")
    select_on: str | None = Field(None, description="val metric that picks each variant's setting; default: the "
                                  "first task's primary metric (answer_nll is steadier at small scale)")
    benchmarks: list[str] = Field(default_factory=lambda: ["answer_nll"], description="extra benchmarks per task")
    judge: str | None = Field(None, description="local judge model for the optional 'winrate' benchmark")
    num_fewshot: int = 0
    eval_limit: int | None = None
    dtype: str = "float32"
    device: str = "cpu"
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

    @field_validator("train_grid")
    @classmethod
    def _known_grid(cls, v: dict) -> dict:
        known = [*TrainParams.__dataclass_fields__, "init_scale"]
        bad = [k for k in v if k not in known]
        if bad:
            raise ValueError(f"unknown grid parameters {bad}; known: {', '.join(known)}")
        return v

    @model_validator(mode="after")
    def _one_thread_worker(self):
        if self.runner == "threads" and self.workers > 1:
            raise ValueError("runner threads takes workers: 1 (threads share torch's random state, so parallel "
                             "branches would not be reproducible); use runner processes or dask for workers > 1")
        return self

    @field_validator("train")
    @classmethod
    def _known_train(cls, v: dict) -> dict:
        bad = [k for k in v if k not in TrainParams.__dataclass_fields__]
        if bad:
            raise ValueError(f"unknown training parameters {bad}; known: {', '.join(TrainParams.__dataclass_fields__)}")
        return v

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
        return TrainParams.from_dict({**self.train, **(overrides or {}), "seed": seed})


def load_config(path: str | Path) -> SweepConfig:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such file; give a YAML or TOML sweep config (see README, 'The sweep config')")
    try:
        raw = tomllib.loads(path.read_text()) if path.suffix == ".toml" else yaml.safe_load(path.read_text())
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: not valid {path.suffix.lstrip('.').upper() or 'YAML'}: {e}") from None
    return parse_config(raw or {}, str(path))


def parse_config(raw: dict, where: str = "config") -> SweepConfig:
    try:
        return SweepConfig.model_validate(raw)
    except ValidationError as e:
        msgs = [f"{where}: field {'.'.join(map(str, err['loc'])) or '(top level)'}: {err['msg']}" for err in e.errors()]
        raise ConfigError("\n".join(msgs)) from None
