"""The ``evomerge moe`` config: mergekit-moe's YAML read strictly, plus evomerge's own keys.

mergekit-moe keys (``mergekit/moe/config.py``, 0.1.5): ``base_model``, ``gate_mode``, ``dtype``,
``experts`` (``source_model``, ``positive_prompts``, ``negative_prompts``), ``experts_per_token``,
``shared_experts`` and ``architecture``. evomerge adds ``seed``, ``non_expert`` (where attention, norms,
embeddings and lm_head come from), ``calibration`` (prompts drawn from a task YAML, per expert
``tasks``), ``activations`` (the dtype router inputs are captured in) and ``max_length``.

Unknown keys are errors (mergekit ignores them). :func:`load_moe_config` checks the file alone;
:func:`check_models` reads the models' ``config.json`` files and tokenizers (never their weights) and
checks that they can form one MoE.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from evomerge.search.config import Zoo
from evomerge.yamlfile import read_yaml_mapping

GATE_MODES = ("random", "uniform_random", "cheap_embed", "hidden", "hidden_last", "hidden_avg", "router_input_mean",
              "router_input_lda", "supervised", "zero")
DATA_FREE_MODES = ("random", "uniform_random", "zero")
MERGEKIT_GATE_MODES = ("random", "uniform_random", "cheap_embed", "hidden_last", "hidden_avg")  # same tensors
# source model_type -> the MoE architectures it can become (mergekit's `architecture` names)
TARGETS = {"llama": ("mixtral",), "mistral": ("mixtral",), "qwen2": ("qwen",), "qwen3": ("qwen3",)}
UNSUPPORTED_TARGETS = {"deepseek": "DeepSeek-MoE needs trust_remote_code, which evomerge never enables"}
NON_EXPERT_SOURCES = ("base", "average")
SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "vocab_size", "head_dim", "hidden_act")


class MoeError(ValueError):
    """An MoE config or set of models that cannot be assembled; the message names the key or model."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Expert(_Strict):
    """One dense model whose MLPs become one expert of every layer."""

    source_model: str
    positive_prompts: list[str] | None = None
    negative_prompts: list[str] | None = None
    tasks: list[str] | None = None  # evomerge: positive prompts from these calibration tasks
    noise_scale: float | None = None  # mergekit keys evomerge refuses (see `check`)
    residual_scale: float | None = None


class MoeCalibration(_Strict):
    """Where experts' ``tasks`` prompts come from: a task YAML's split (never validation or test)."""

    tasks: str
    split: Literal["search", "train"] = "search"
    examples: int = Field(32, ge=1)


class RouterTraining(_Strict):
    """``train:``: a short router-only training run on the experts' prompts mixed (see docs/moe.md)."""

    steps: int = Field(0, ge=0)
    lr: float = Field(1e-2, gt=0)
    batch_size: int = Field(16, ge=1)
    top_k: int | None = Field(None, ge=2)  # experts per token while training; default max(2, experts_per_token)
    soft: bool = False  # route every token to all experts, softmax-weighted, while training
    balance: float = Field(0.01, ge=0)  # load-balancing loss coefficient
    supervised: float = Field(0.0, ge=0)  # routing cross-entropy towards the prompt's expert
    norms: bool = False  # also train the RMSNorm weights


class Evaluation(_Strict):
    """``evaluate:``: score the MoE (and variants) beside base, experts and dense merges on a task YAML."""

    tasks: str
    split: Literal["search", "validation", "test"] = "test"
    gate_modes: list[Literal[GATE_MODES]] = []  # further router inits to build and score (same experts)
    dense: dict[str, str | dict] = {}  # label -> model directory, dense recipe YAML or inline recipe
    inputs: bool = True  # also score the base and each expert
    batch_size: int = Field(32, ge=1)
    bootstrap_iters: int = Field(1000, ge=0)


class MoeSearch(_Strict):
    """``search:``: an Optuna search over MoE options on a task YAML's search split (see docs/moe.md)."""

    tasks: str
    trials: int = Field(20, ge=1)
    gate_modes: list[Literal[GATE_MODES]] = ["zero", "hidden", "router_input_mean", "supervised"]
    experts_per_token: list[int] = Field([1, 2], min_length=1)
    non_expert_weights: bool = True  # search each expert's weight in the non-expert task arithmetic
    train_steps: list[int] = [0]
    sampler: Literal["tpe", "random"] = "tpe"
    rerank: int = Field(3, ge=1)  # finalists re-scored on the validation split (1: the best search score wins)
    batch_size: int = Field(32, ge=1)


class MoeConfig(_Strict):
    """A whole ``evomerge moe`` config (see the module docstring)."""

    base_model: str
    experts: list[Expert] = Field(min_length=1)
    gate_mode: Literal[GATE_MODES] = "hidden"  # mergekit's default
    dtype: Literal["float32", "bfloat16", "float16"] | None = None  # default: the base model's
    experts_per_token: int = Field(2, ge=1)
    shared_experts: list[Expert] | None = None  # qwen; source_model may also be a dense recipe .yaml
    architecture: str | None = None  # mixtral | qwen | qwen3; default from the base model's family
    # evomerge's own keys
    zoo: Zoo | None = None  # the built-in demo zoo: relative model and task paths resolve inside it
    seed: int = 0
    non_expert: str = "base"  # base | average | a dense recipe YAML (e.g. TIES over the experts)
    calibration: MoeCalibration | None = None
    activations: Literal["model", "float32"] = "float32"
    max_length: int = Field(128, ge=2)
    train: RouterTraining = RouterTraining()
    evaluate: Evaluation | None = None
    search: MoeSearch | None = None

    @model_validator(mode="after")
    def _consistent(self):
        n = len(self.experts)
        if self.experts_per_token > n:
            raise ValueError(f"experts_per_token: {self.experts_per_token} is more than the {n} experts")
        for where, e in self.all_experts():
            for key in ("noise_scale", "residual_scale"):
                if getattr(e, key) is not None:
                    raise ValueError(f"{where}.{key}: not supported by evomerge (mergekit's noise and scaling of "
                                     f"expert weights); remove it")
            for key in ("positive_prompts", "negative_prompts", "tasks"):
                value = getattr(e, key)
                if value is not None and (not value or any(not str(p).strip() for p in value)):
                    raise ValueError(f"{where}.{key}: empty list or empty prompt")
            if e.tasks and self.calibration is None:
                raise ValueError(f"{where}.tasks: needs a top-level 'calibration: {{tasks: FILE}}' naming the task YAML")
        if self.gate_mode not in DATA_FREE_MODES:
            for i, e in enumerate(self.experts):
                if not (e.positive_prompts or e.tasks):
                    raise ValueError(f"experts[{i}]: gate_mode {self.gate_mode} needs positive_prompts or tasks "
                                     f"for every expert")
            keys = [(tuple(e.positive_prompts or ()), tuple(e.negative_prompts or ()), tuple(e.tasks or ()))
                    for e in self.experts]
            if n > 1 and len(set(keys)) == 1:
                raise ValueError("experts: every expert has the same prompts; the routers could not tell them apart")
        if self.train.steps and not all(e.positive_prompts or e.tasks for e in self.experts):
            raise ValueError("train.steps: router training needs positive_prompts or tasks for every expert")
        if self.train.top_k is not None and self.train.top_k > n:
            raise ValueError(f"train.top_k: {self.train.top_k} is more than the {n} experts")
        if self.evaluate and any(m not in DATA_FREE_MODES for m in self.evaluate.gate_modes):
            if not all(e.positive_prompts or e.tasks for e in self.experts):
                raise ValueError("evaluate.gate_modes: data-driven modes need positive_prompts or tasks for every expert")
        if self.search:
            bad = [k for k in self.search.experts_per_token if not 1 <= k <= n]
            if bad:
                raise ValueError(f"search.experts_per_token: {bad} outside 1..{n} (the number of experts)")
            if any(s < 0 for s in self.search.train_steps):
                raise ValueError("search.train_steps: steps must be >= 0")
            if (any(m not in DATA_FREE_MODES for m in self.search.gate_modes) or any(self.search.train_steps)) \
                    and not all(e.positive_prompts or e.tasks for e in self.experts):
                raise ValueError("search: data-driven gate modes and training need prompts or tasks for every expert")
            if self.non_expert != "base":
                raise ValueError("search: non-expert weights are searched from the base; set non_expert: base")
        if self.non_expert not in NON_EXPERT_SOURCES and not is_recipe(self.non_expert):
            raise ValueError(f"non_expert: {self.non_expert!r}; expected base, average or a dense recipe .yaml")
        if self.shared_experts is not None and len(self.shared_experts) != 1:
            raise ValueError(f"shared_experts: exactly one shared expert is supported, got {len(self.shared_experts)}")
        return self

    def all_experts(self):
        yield from ((f"experts[{i}]", e) for i, e in enumerate(self.experts))
        yield from ((f"shared_experts[{i}]", e) for i, e in enumerate(self.shared_experts or []))


def load_moe_config(source: str | Path | dict, *, where: str | None = None) -> MoeConfig:
    """Parse and validate a config from a YAML file or a dict; relative model and task paths resolve
    against the file's folder. Raises :class:`MoeError` naming the file and key."""
    base_dir = None
    if isinstance(source, dict):
        raw, where = dict(source), where or "<moe config>"
    else:
        where = where or str(source)
        raw = read_yaml_mapping(source, where=where, what="moe config", error=MoeError)
        base_dir = Path(source).resolve().parent
    try:
        cfg = MoeConfig.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        loc = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in err["loc"]).lstrip(".")
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
        raise MoeError(f"{where}: {loc}: {msg}" if loc else f"{where}: {msg}") from None
    dirs = [base_dir] if base_dir is not None else []
    if cfg.zoo is not None:
        from evomerge.zoo import build_zoo

        zoo = build_zoo(cfg.zoo.dir, size=cfg.zoo.size, seed=cfg.zoo.seed, progress=True, variant=cfg.zoo.variant())
        dirs.append(zoo.root)
    return resolve_paths(cfg, dirs) if dirs else cfg


def resolve_paths(cfg: MoeConfig, base_dirs: list[Path]) -> MoeConfig:
    """``cfg`` with relative model, task and recipe paths made absolute: the first of ``base_dirs`` (the
    config's folder, then the zoo's) under which the path exists."""
    def fix(p: str) -> str:
        q = Path(p).expanduser()
        if q.is_absolute():
            return p
        return next((str(d / q) for d in base_dirs if (d / q).exists()), p)

    def fix_recipe(r: str | dict) -> str | dict:
        if isinstance(r, str):
            return fix(r)
        r = dict(r)
        if isinstance(r.get("base_model"), str):
            r["base_model"] = fix(r["base_model"])
        r["models"] = [{**m, "model": fix(m["model"])} if isinstance(m, dict) and isinstance(m.get("model"), str)
                       else m for m in r.get("models", [])]
        return r

    update = {"base_model": fix(cfg.base_model),
              "experts": [e.model_copy(update={"source_model": fix(e.source_model)}) for e in cfg.experts]}
    if cfg.shared_experts:
        update["shared_experts"] = [e.model_copy(update={"source_model": fix(e.source_model)})
                                    for e in cfg.shared_experts]
    if cfg.non_expert not in NON_EXPERT_SOURCES:
        update["non_expert"] = fix(cfg.non_expert)
    if cfg.evaluate:
        update["evaluate"] = cfg.evaluate.model_copy(update={"tasks": fix(cfg.evaluate.tasks),
                                                             "dense": {k: fix_recipe(v) for k, v in cfg.evaluate.dense.items()}})
    if cfg.search:
        update["search"] = cfg.search.model_copy(update={"tasks": fix(cfg.search.tasks)})
    if cfg.calibration:
        update["calibration"] = cfg.calibration.model_copy(update={"tasks": fix(cfg.calibration.tasks)})
    return cfg.model_copy(update=update)


def read_model_config(path: str | Path, key: str) -> dict:
    """A model directory's config.json as a dict; MoeError naming ``key`` if absent or unreadable."""
    file = Path(path) / "config.json"
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise MoeError(f"{key}: {path}: not a readable model directory ({type(e).__name__}: {e})") from None


def target_architecture(cfg: MoeConfig, base_config: dict) -> str:
    """The output architecture (``mixtral``, ``qwen`` or ``qwen3``): the config's, else the base family's."""
    family = base_config.get("model_type")
    if cfg.architecture in UNSUPPORTED_TARGETS:
        raise MoeError(f"architecture: {cfg.architecture}: {UNSUPPORTED_TARGETS[cfg.architecture]}")
    if family not in TARGETS:
        raise MoeError(f"base_model: model_type {family!r} is not supported; experts can be "
                       f"{', '.join(sorted(TARGETS))} models")
    arch = cfg.architecture or TARGETS[family][0]
    if arch not in TARGETS[family]:
        raise MoeError(f"architecture: {arch!r} cannot be built from {family} experts; "
                       f"expected one of {', '.join(TARGETS[family])}")
    if arch == "mixtral" and (base_config.get("attention_bias") or base_config.get("mlp_bias")):
        raise MoeError("base_model: attention or MLP biases cannot be represented in Mixtral")
    if arch == "qwen3" and base_config.get("attention_bias"):
        raise MoeError("base_model: attention biases are not supported for Qwen3-MoE output")
    if cfg.shared_experts and arch != "qwen":
        raise MoeError(f"shared_experts: only the qwen architecture has a shared expert (target: {arch})")
    return arch


def check_models(cfg: MoeConfig) -> tuple[str, dict]:
    """Check, before any weight is read, that base, experts and shared expert share one family, one
    shape and one tokenizer vocabulary; returns (target architecture, base config dict)."""
    base = read_model_config(cfg.base_model, "base_model")
    arch = target_architecture(cfg, base)
    vocab = tokenizer_vocab(cfg.base_model, "base_model")
    for where, e in cfg.all_experts():
        if where.startswith("shared") and is_recipe(e.source_model):
            check_dense_recipe(e.source_model, f"{where}.source_model")
            continue
        other = read_model_config(e.source_model, f"{where}.source_model")
        if other.get("model_type") != base.get("model_type"):
            raise MoeError(f"{where}.source_model: {e.source_model} is a {other.get('model_type')} model, "
                           f"the base is {base.get('model_type')}")
        for key in SHAPE_KEYS:
            if other.get(key) != base.get(key):
                raise MoeError(f"{where}.source_model: {key} is {other.get(key)}, the base's is {base.get(key)}")
        if tokenizer_vocab(e.source_model, f"{where}.source_model") not in (None, vocab):
            raise MoeError(f"{where}.source_model: its tokenizer's vocabulary differs from the base model's")
    if cfg.non_expert not in NON_EXPERT_SOURCES:
        check_dense_recipe(cfg.non_expert, "non_expert")
    if cfg.evaluate:
        check_tasks(cfg.evaluate.tasks, "evaluate.tasks")
        for label, source in cfg.evaluate.dense.items():
            if not (isinstance(source, str) and Path(source).is_dir()):
                check_dense_recipe(source, f"evaluate.dense.{label}")
    if cfg.search:
        check_tasks(cfg.search.tasks, "search.tasks")
    return arch, base


def check_tasks(path: str, key: str) -> None:
    """Load a task YAML (examples included) so a broken one fails before any weight is read."""
    from evomerge.evaluate import TaskError, load_tasks

    try:
        load_tasks(path)
    except (TaskError, FileNotFoundError) as e:
        raise MoeError(f"{key}: {e}") from None


def is_recipe(path: str) -> bool:
    """Whether a model source names a dense recipe file (merged first) rather than a model directory."""
    return path.endswith((".yaml", ".yml"))


def check_dense_recipe(path: str | dict, key: str) -> None:
    """Plan a dense recipe (headers only), so a broken one fails before any weight is read."""
    from evomerge.checkpoint import CheckpointError
    from evomerge.engine import MergeError, plan_merge
    from evomerge.recipe import RecipeError

    try:
        plan_merge(path, where=key if isinstance(path, dict) else f"{key} ({path})")
    except (RecipeError, MergeError, CheckpointError) as e:
        raise MoeError(str(e) if str(e).startswith(key) else f"{key}: {e}") from None


def tokenizer_vocab(path: str | Path, key: str) -> dict | None:
    """The vocabulary of a model directory's tokenizer (None when the folder has no tokenizer files)."""
    from transformers import AutoTokenizer

    if not any((Path(path) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return None
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False).get_vocab()
    except Exception as e:  # a broken tokenizer is the user's input: name it
        raise MoeError(f"{key}: {path}: tokenizer cannot be loaded ({type(e).__name__}: {e})") from None
