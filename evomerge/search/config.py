"""Run configs for ``evomerge search``: models, search space, tasks, budget, sampler, storage, output.

A run config is YAML (``configs/*.yaml``), validated strictly like recipes (unknown keys are errors
naming the file and key). Paths are relative to the config file. ``zoo:`` uses the built-in offline
demo zoo: base, experts and tasks then come from it (built on first use, cached afterwards)::

    name: demo
    zoo: {size: small, seed: 0}           # or base_model / models / tasks given explicitly
    search_space: ../search_spaces/ties_per_block.yaml
    budget: {trials: 60, timeout: 15m}
    sampler: {name: cmaes, popsize: 8}
    output_dir: ../results/demo
    search_metric: task                   # or proxy: smooth proxies of exact match / accuracy on the
                                          # search split (docs/TASKS.md); validation and test keep the metric
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from evomerge.recipe import pydantic_message
from evomerge.yamlfile import read_yaml_mapping


class ConfigError(ValueError):
    """A run config that cannot be used; the message names the file and key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def parse_duration(text: str | int | float | None) -> float | None:
    """'8h', '90m', '45s', '1h30m', or seconds as a number → seconds (None stays None)."""
    if text is None or isinstance(text, (int, float)):
        return None if text is None else float(text)
    s = str(text).strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", s):
        return float(s)
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([hms])", s)
    if not parts or "".join(f"{a}{b}" for a, b in parts) != s.replace(" ", ""):
        raise ValueError(f"cannot parse duration {text!r}; use e.g. 8h, 90m, 45s or 1h30m")
    return sum(float(v) * {"h": 3600, "m": 60, "s": 1}[u] for v, u in parts)


class Zoo(_Strict):
    size: Literal["tiny", "small"] = "small"
    seed: int = 0
    dir: str | None = None  # default: the user cache
    # a variant of the zoo (evomerge.zoo.ZooVariant): what makes merging its experts hard
    experts: int | None = Field(None, ge=2, le=8)
    base_knows_tasks: bool = True
    overlap: bool = False
    dtype: Literal["float32", "bfloat16"] = "float32"
    # the zoo's LoRA experts (built on first use, evomerge.zoo_adapters) as the models, not its full fine-tunes
    adapters: bool = False

    def variant(self):
        """The zoo variant these keys describe (checked against the size)."""
        from evomerge.zoo import ZooVariant

        v = ZooVariant(experts=self.experts, base_knows_tasks=self.base_knows_tasks, overlap=self.overlap,
                       dtype=self.dtype)
        v.check(self.size)
        return v

    @model_validator(mode="after")
    def _check(self):
        self.variant()
        return self


class Budget(_Strict):
    trials: int | None = Field(None, ge=1)
    timeout: str | float | None = None  # per invocation, e.g. "8h"

    @model_validator(mode="after")
    def _check(self):
        if self.trials is None and self.timeout is None:
            raise ValueError("give trials, timeout or both")
        parse_duration(self.timeout)
        return self


def _only_for(section: str, model: BaseModel, name: str, options: dict[str, tuple[str, ...]]) -> None:
    """Refuse an option set in the config that the chosen ``name`` does not use (it would be silently ignored)."""
    for option, names in options.items():
        if option in model.model_fields_set and name not in names:
            raise ValueError(f"{section} option '{option}' does not apply to {section} '{name}' (only to "
                             f"{' / '.join(names)}); remove it")


class Sampler(_Strict):
    name: Literal["cmaes", "tpe", "gp", "random", "nsga2", "ngopt"] = "cmaes"
    popsize: int | None = Field(None, ge=2)  # CMA-ES population (or NSGA-II population)
    separable: bool = False  # sep-CMA-ES
    sigma0: float | None = Field(None, gt=0)
    lr_adapt: bool = False  # LRA-CMA-ES: learning rates adapted to noisy or multimodal scores
    n_startup_trials: int | None = Field(None, ge=0)  # TPE/GP random start

    @model_validator(mode="after")
    def _applies(self):
        _only_for("sampler", self, self.name, {"popsize": ("cmaes", "nsga2"), "separable": ("cmaes",),
                                               "sigma0": ("cmaes",), "n_startup_trials": ("tpe", "gp"),
                                               "lr_adapt": ("cmaes",)})
        if self.lr_adapt and self.separable:
            raise ValueError("sampler: lr_adapt and separable cannot be combined (Optuna's CMA-ES adapts learning "
                             "rates of the full covariance only); choose one")
        return self


class Pruner(_Strict):
    name: Literal["none", "median", "percentile", "successive_halving"] = "median"
    chunk_size: int = Field(64, ge=1)  # examples per task between pruning checks
    warmup_steps: int = Field(1, ge=0)
    startup_trials: int = Field(5, ge=0)
    percentile: float = Field(25.0, gt=0, lt=100)

    @model_validator(mode="after")
    def _applies(self):
        if self.name != "none":  # turning pruning off by its name alone keeps the other keys harmless
            _only_for("pruner", self, self.name, {"warmup_steps": ("median", "percentile"),
                                                  "startup_trials": ("median", "percentile"),
                                                  "percentile": ("percentile",)})
        return self


class Finetune(_Strict):
    steps: int = Field(50, ge=1)
    lr: float = Field(1e-4, gt=0)
    batch_size: int = Field(16, ge=1)
    train: list[str] = Field(default_factory=lambda: ["*"])  # name patterns of trainable tensors (fnmatch)
    layers: tuple[int, int] | None = None  # only layers in [start, end)
    data: str | None = None  # tasks YAML to train on (default: the run's): each task's `train` split, else search
    seed: int = 0


class Workers(_Strict):
    """How workers of one study watch each other (docs/distributed.md)."""

    heartbeat_s: float = Field(5.0, gt=0)  # a running trial's heartbeat interval
    grace_s: float = Field(60.0, gt=0)  # a running trial silent this long: its worker is lost, the trial failed
    storage_retry_s: float = Field(120.0, ge=0)  # how long a lost database connection is retried

    @model_validator(mode="after")
    def _check(self):
        if self.grace_s < 2 * self.heartbeat_s:
            raise ValueError(f"workers.grace_s ({self.grace_s}) must be at least twice workers.heartbeat_s "
                             f"({self.heartbeat_s}), or a slow beat marks a live worker lost")
        return self


class DataflowStage(_Strict):
    """A second stage after the run's search (docs/dataflow.md, Sakana's combined merge): a data-flow search
    over the first stage's winner (source ``winner_name``) and the run's models, in ``output_dir/dataflow``."""

    search_space: str | dict[str, Any]
    budget: Budget | None = None  # default: the run's
    sampler: Sampler | None = None  # default: the run's
    winner_name: str = "merged"


class RunConfig(_Strict):
    name: str = "evomerge"
    zoo: Zoo | None = None
    base_model: str | None = None
    models: list[str] | dict[str, str] | None = None
    reference_model: str | None = None  # e.g. a multi-task fine-tune, reported beside the winner
    search_space: str | dict[str, Any]
    tasks: str | dict[str, Any] | list[dict[str, Any]] | None = None
    objectives: Literal["aggregate", "per_task"] = "aggregate"
    # what the search split is scored by: each task's own metric, or smooth proxies of exact match and
    # accuracy (Evaluator(proxy=True)); validation re-ranking and the test table always use the metric
    # (mix: the mean of the two)
    search_metric: Literal["task", "proxy", "mix"] = "task"
    # where the sampler starts: "anchors" scores the space's anchor points first (the default point and
    # each parameter at its range's quartiles; SearchSpace.anchor_points) and starts CMA-ES at the best
    # of them; "default" enqueues the default point alone and CMA-ES starts at the middle of the ranges;
    # "gradient" adds to the anchors a point fitted by gradient on the search split (task-arithmetic and
    # RegMean spaces: evomerge.search.gradient_start); "auto": gradient where it applies, else anchors
    start: Literal["auto", "anchors", "default", "gradient"] = "auto"
    budget: Budget = Field(default_factory=lambda: Budget(trials=50))
    sampler: Sampler = Field(default_factory=Sampler)
    pruner: Pruner = Field(default_factory=Pruner)
    storage: str | None = None  # Optuna storage URL; default: a journal file in output_dir
    study_name: str | None = None
    seed: int = 0
    device: str = "auto"
    # which candidate backend merges the task-arithmetic family (evomerge.backends; docs/internals.md)
    backend: Literal["auto", "reference", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    batch_size: int = Field(32, ge=1)
    output_dir: str = "results/run"
    top_k: int = Field(5, ge=1)
    finetune: Finetune | None = None
    export_checkpoint: bool = True
    # LoRA adapters as models, linear/task_arithmetic spaces: candidates as per-module adapter scalings of one
    # live PEFT model, nothing dense built (evomerge.lora.scaling, docs/adapters.md)
    lora_scalings: bool = False
    # LoraHub's L1 regulariser: the search score minus weight_l1 * sum of |searched model weights| (the
    # sampler and the pruner see it; validation re-ranking and the test table do not)
    weight_l1: float = Field(0.0, ge=0)
    workers: Workers = Field(default_factory=Workers)
    dataflow: DataflowStage | None = None  # a data-flow stage after this search (``search.combined``)

    @model_validator(mode="after")
    def _check(self):
        if self.zoo is None:
            missing = [k for k in ("base_model", "models", "tasks") if getattr(self, k) in (None, [], {})]
            if missing:
                raise ValueError(f"without 'zoo:' the config must give {', '.join(missing)}")
        if self.objectives == "per_task" and self.sampler.name not in ("nsga2", "tpe", "random", "gp"):
            raise ValueError(f"objectives: per_task is multi-objective; sampler '{self.sampler.name}' supports one "
                             f"objective; use nsga2 (or tpe/random/gp)")
        if self.weight_l1 and self.objectives == "per_task":
            raise ValueError("weight_l1 penalises the one aggregate search score; it cannot be used with "
                             "objectives: per_task")
        if self.dataflow is not None and not self.export_checkpoint:
            raise ValueError("dataflow: searches over the first stage's exported winner; it needs export_checkpoint: true")
        if self.finetune is not None and not self.export_checkpoint:
            raise ValueError("finetune: trains the winner's exported checkpoint; it needs export_checkpoint: true")
        if self.objectives == "per_task" and "pruner" in self.model_fields_set and self.pruner.name != "none":
            raise ValueError(f"pruner: '{self.pruner.name}' cannot be used with objectives: per_task (Optuna prunes "
                             f"single-objective studies only; every candidate is scored in full): set pruner: "
                             f"{{name: none}} or leave it out")
        return self

    # -- resolution of paths ----------------------------------------------------------------------
    def resolved(self, config_dir: Path) -> "RunConfig":
        """A copy with every relative path made absolute against ``config_dir``."""

        def p(x: str | None) -> str | None:
            if x is None:
                return None
            q = Path(x).expanduser()
            return str(q if q.is_absolute() else (config_dir / q).resolve())

        upd: dict[str, Any] = {"output_dir": p(self.output_dir)}
        if self.base_model:
            upd["base_model"] = p(self.base_model)
        if self.reference_model:
            upd["reference_model"] = p(self.reference_model)
        if isinstance(self.models, list):
            upd["models"] = {Path(m).name: p(m) for m in self.models}
        elif isinstance(self.models, dict):
            upd["models"] = {k: p(v) for k, v in self.models.items()}
        if isinstance(self.search_space, str):
            upd["search_space"] = p(self.search_space)
        if isinstance(self.tasks, str):
            upd["tasks"] = p(self.tasks)
        if self.dataflow and isinstance(self.dataflow.search_space, str):
            upd["dataflow"] = self.dataflow.model_copy(update={"search_space": p(self.dataflow.search_space)})
        if self.zoo and self.zoo.dir:
            upd["zoo"] = self.zoo.model_copy(update={"dir": p(self.zoo.dir)})
        if self.storage:
            upd["storage"] = resolve_storage(self.storage, config_dir)
        if self.finetune and self.finetune.data:
            upd["finetune"] = self.finetune.model_copy(update={"data": p(self.finetune.data)})
        return self.model_copy(update=upd)


def journal_file(url: str | None) -> str | None:
    """The file of a journal storage ("journal:PATH", or a path ending in .journal / .log), else None."""
    if url is None:
        return None
    if url.startswith("journal:"):
        return url[len("journal:"):]
    return url if url.endswith((".journal", ".log")) else None


def resolve_storage(url: str, directory: Path) -> str:
    """``url`` with a relative sqlite database or journal file made absolute against ``directory``."""
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        return "sqlite:///" + str((directory / Path(url[len("sqlite:///"):]).expanduser()).resolve())
    file = journal_file(url)
    if file is not None and not Path(file).expanduser().is_absolute():
        return "journal:" + str((directory / Path(file).expanduser()).resolve())
    return url


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Load, validate and resolve a run config file; ``overrides`` (from the CLI) win over the file.

    Paths in the file are relative to the file; an ``output_dir`` or ``storage`` given on the command
    line is relative to the current directory, as a shell user expects.
    """
    path = Path(path)
    where = str(path)
    data = read_yaml_mapping(path, where=where, what="run config", error=ConfigError)
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key == "output_dir":
            value = str(Path(value).expanduser().resolve())
        elif key == "storage":
            value = resolve_storage(str(value), Path.cwd())
        if key in ("trials", "timeout"):
            data.setdefault("budget", {})
            if isinstance(data["budget"], dict):
                data["budget"] = {**data["budget"], key: value}
        else:
            data[key] = value
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(pydantic_message(e, where)) from None
    return cfg.resolved(path.parent.resolve())
