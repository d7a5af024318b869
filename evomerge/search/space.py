"""Search spaces: which merge parameters are searched, at what granularity, and how a point decodes to a recipe.

A search space is a YAML file (see ``search_spaces/``)::

    method: ties
    granularity: block        # model | block | layer
    block_size: 4             # layers per block (granularity: block)
    attn_mlp: false           # separate values for attention and MLP tensors
    smooth: true              # block values as a smooth gradient across layers (else constant per block)
    search:                   # searched parameters: range (linear, or log: true) and the default point
      weight: {low: 0.0, high: 2.0, default: 1.0}
      density: {low: 0.1, high: 1.0, default: 0.5}
    fixed:                    # parameters held constant
      normalize: true

Every point decodes to a complete :class:`~evomerge.recipe.Recipe` in mergekit's format: per-model
parameters become scalars (``model``), gradients over blocks (``block`` + ``smooth``) or per-layer
lists (``layer``, or ``block`` without ``smooth``); ``attn_mlp`` wraps them in conditional filters
(``mlp`` first, catch-all for attention, norms and embeddings). The default point (the ``default``
of every searched parameter) is the first trial of every search and CMA-ES's starting mean.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from evomerge.calibration import Calibration
from evomerge.methods import METHODS, get_method
from evomerge.recipe import Recipe, pydantic_message, did_you_mean, validate_scalar
from evomerge.yamlfile import read_yaml_mapping

SEARCHABLE = ("weight", "density", "epsilon", "gamma", "lambda", "t", "rank_fraction", "common_space_fraction", "alpha")


class SpaceError(ValueError):
    """A search space that cannot be used; the message names the file and key."""


class Range(BaseModel):
    """A searched parameter: uniform on [low, high] (or log-uniform), starting at ``default``."""

    model_config = ConfigDict(extra="forbid")
    low: float
    high: float
    log: bool = False
    default: float | None = None

    @model_validator(mode="after")
    def _check(self):
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, got {self.low}")
        if self.default is None:
            self.default = math.sqrt(self.low * self.high) if self.log else (self.low + self.high) / 2
        if not self.low <= self.default <= self.high:
            raise ValueError(f"default {self.default} is outside [{self.low}, {self.high}]")
        return self


class SearchSpace(BaseModel):
    """Method, granularity and parameter ranges of a search (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["parameters"] = "parameters"  # or "dataflow" (``dataflow_space.DataflowSpace``), "moe" (``moe.space``)
    method: str
    granularity: Literal["model", "block", "layer"] = "model"
    block_size: int = Field(4, ge=1)
    attn_mlp: bool = False
    # separate values per tensor type: name filters (a tensor takes the first whose text is in its name,
    # as mergekit's conditional filters do), plus the catch-all part "rest" for everything else
    parts: list[str] = Field(default_factory=list)
    smooth: bool = True
    search: dict[str, Range] = Field(min_length=1)
    fixed: dict[str, float | bool] = Field(default_factory=dict)
    description: str = ""
    calibration: Calibration | None = None  # data-aware methods (regmean): copied into every recipe
    _signatures: dict = PrivateAttr(default_factory=dict)  # structure signature per decoding context

    def with_calibration_tasks(self, tasks: Any, models: dict[str, str], task_names: list[str]) -> "SearchSpace":
        """A data-aware space whose ``calibration`` names no tasks takes the run's task file, each fine-tune
        named after tasks calibrating on those (``evomerge.calibration.own_tasks``); else unchanged."""
        from evomerge.calibration import own_tasks

        if self.calibration is None or self.calibration.tasks is not None:
            return self
        if not isinstance(tasks, (str, Path)):
            raise SpaceError("calibration: the run's tasks are given inline; name a task file in calibration.tasks")
        update: dict[str, Any] = {"tasks": str(Path(tasks).resolve())}
        if self.calibration.model_tasks is None and own_tasks(models, task_names):
            update["model_tasks"] = own_tasks(models, task_names)
        return self.model_copy(update={"calibration": self.calibration.model_copy(update=update)})

    def off_center(self) -> list[str]:
        """Searched parameters whose default is not the middle of their range (CMA-ES starts there)."""
        out = []
        for name, r in self.search.items():
            mid = math.sqrt(r.low * r.high) if r.log else (r.low + r.high) / 2
            if abs(r.default - mid) > 1e-9 * max(1.0, abs(mid)):
                out.append(f"{name} (default {r.default:g}, middle {mid:g})")
        return out

    def bind(self, base_model: str, models: dict[str, str], where: str = "search_space") -> "SearchSpace":
        """A parameter space needs nothing from the models before the builder loads them."""
        return self

    def load_candidate(self, text: str, where: str = "trial") -> Recipe:
        """A recorded trial's candidate (its recipe YAML)."""
        from evomerge.recipe import load_recipe

        return load_recipe(text, where=where)

    def make_builder(self, inputs, cfg, out: Path):
        """The resident candidate builder of this space's recipes (``builder.CandidateBuilder``)."""
        from evomerge.engine import STATISTICS_CACHE_NAME
        from evomerge.search.builder import CandidateBuilder

        if cfg.lora_scalings:  # LoRA adapters as scalings of one live PEFT model (docs/adapters.md)
            from evomerge.lora.scaling import ScalingBuilder

            return ScalingBuilder(inputs.base_model, inputs.models, method=self.method, device=cfg.device,
                                  dtype=cfg.dtype, seed=cfg.seed, statistics_cache=out / STATISTICS_CACHE_NAME)
        return CandidateBuilder(inputs.base_model, inputs.models, method=self.method, device=cfg.device,
                                dtype=cfg.dtype, seed=cfg.seed, backend=cfg.backend,
                                statistics_cache=out / STATISTICS_CACHE_NAME)

    # -- geometry ---------------------------------------------------------------------------------
    def n_groups(self, num_layers: int) -> int:
        """Values per (model, parameter, part): 1, ⌈L / block_size⌉ or L."""
        if self.granularity == "model":
            return 1
        if self.granularity == "block":
            return math.ceil(num_layers / self.block_size)
        return num_layers

    def part_names(self) -> tuple[str, ...]:
        """The tensor groups that get their own values: ``all``; ``attn``/``mlp``; or each filter and ``rest``."""
        if self.parts:
            return (*self.parts, "rest")
        return ("attn", "mlp") if self.attn_mlp else ("all",)

    def param_names(self, model_names: list[str], num_layers: int) -> list[str]:
        """Every searched dimension's name, e.g. ``density[math][b2].mlp``, in a stable order."""
        method = get_method(self.method)
        names = []
        for pname in self.search:
            per_model = method.param(pname).per_model
            owners = model_names if per_model else [None]
            for owner in owners:
                for g in range(self.n_groups(num_layers)):
                    for part in self.part_names():
                        names.append(_dim_name(pname, owner, g, part, self.granularity))
        return names

    def distributions(self, model_names: list[str], num_layers: int):
        """Optuna distributions for every searched dimension."""
        from optuna.distributions import FloatDistribution

        dists = {}
        for name in self.param_names(model_names, num_layers):
            r = self.search[_param_of(name)]
            dists[name] = FloatDistribution(r.low, r.high, log=r.log)
        return dists

    def default_point(self, model_names: list[str], num_layers: int) -> dict[str, float]:
        """The default recipe as a point: every dimension at its parameter's ``default``."""
        return {n: self.search[_param_of(n)].default
                for n in self.param_names(model_names, num_layers)}

    def anchor_points(self, model_names: list[str], num_layers: int) -> list[dict[str, float]]:
        """Start points worth scoring before a sampler takes over: the default point first, then, for each
        searched parameter, the default point with every dimension of that parameter at the first and
        third quartile of its range (geometric for log ranges), skipping levels equal to the default.

        A one-factor-at-a-time design (1 + 2·parameters points): it finds which uniform setting of each
        knob suits the problem (e.g. task-arithmetic weights well below 1 for many experts) before CMA-ES
        adapts the fine structure from the best of them."""
        default = self.default_point(model_names, num_layers)
        points = [default]
        for pname, r in self.search.items():
            for q in (0.25, 0.75):
                level = (r.low * (r.high / r.low) ** q) if r.log else r.low + q * (r.high - r.low)
                if abs(level - r.default) <= 1e-9 * max(1.0, abs(level)):
                    continue
                points.append({n: (level if _param_of(n) == pname else v) for n, v in default.items()})
        return points

    # -- decoding ---------------------------------------------------------------------------------
    def to_recipe(self, point: dict[str, float], *, base_model: str, models: dict[str, str], num_layers: int,
                  dtype: str | None = None, name: str | None = None) -> Recipe:
        """The recipe of one point. ``models`` maps short model names to paths (recipe order)."""
        method = get_method(self.method)
        global_params: dict[str, Any] = {}
        per_model: dict[str, dict[str, Any]] = {m: {} for m in models}
        for pname, value in self.fixed.items():
            if method.param(pname).per_model:
                for m in models:
                    per_model[m][pname] = value
            else:
                global_params[pname] = value
        for pname in self.search:
            if method.param(pname).per_model:
                for m in models:
                    per_model[m][pname] = self._setting(point, pname, m, num_layers)
            else:
                global_params[pname] = self._setting(point, pname, None, num_layers)
        data: dict[str, Any] = {
            "models": [{"model": path, "parameters": per_model[m]} for m, path in models.items()],
            "base_model": base_model,
            "merge_method": self.method,
        }
        if self.method == "slerp":  # slerp interpolates base -> one model and takes no per-model values
            data["models"] = [{"model": base_model}] + [{"model": p} for p in models.values()]
        if global_params:
            data["parameters"] = global_params
        if self.calibration is not None:
            data["calibration"] = self.calibration.model_dump(exclude_none=True)
        if dtype:
            data["dtype"] = dtype
        if name:
            data["name"] = name
        recipe = Recipe.model_validate(data)
        # every point decodes to the same structure (only numbers differ): computed once, then stamped
        key = (base_model, tuple(models.items()), num_layers, dtype)
        if key not in self._signatures:
            from evomerge.backends.fast_plan import structure_signature

            self._signatures[key] = structure_signature(recipe)
        return recipe.stamp_structure(self._signatures[key])

    def _setting(self, point: dict[str, float], pname: str, owner: str | None, num_layers: int):
        """One parameter's recipe value for one model: scalar, gradient list or mlp/attn conditional."""
        values = {part: [point[_dim_name(pname, owner, g, part, self.granularity)]
                         for g in range(self.n_groups(num_layers))] for part in self.part_names()}
        settings = {part: self._as_setting(v, num_layers) for part, v in values.items()}
        if self.parts:
            return [{"filter": f, "value": settings[f]} for f in self.parts] + [{"value": settings["rest"]}]
        if not self.attn_mlp:
            return settings["all"]
        return [{"filter": "mlp", "value": settings["mlp"]}, {"value": settings["attn"]}]

    def _as_setting(self, values: list[float], num_layers: int):
        values = [round(float(v), 6) for v in values]
        if len(values) == 1:
            return values[0]
        if self.granularity == "block" and not self.smooth:
            return [values[i // self.block_size] for i in range(num_layers)]
        return values


def _param_of(dim: str) -> str:
    """The parameter a dimension name belongs to: ``density[math][b2].mlp`` -> ``density``."""
    return dim.split("[")[0].split(".")[0]


def _dim_name(pname: str, owner: str | None, group: int, part: str, granularity: str) -> str:
    name = pname + (f"[{owner}]" if owner else "")
    if granularity == "block":
        name += f"[b{group}]"
    elif granularity == "layer":
        name += f"[l{group}]"
    return name + ("" if part == "all" else f".{part}")


def load_space(source: str | Path | dict, *, where: str | None = None) -> SearchSpace:
    """Load and validate a search space (file path or mapping); errors name the file and key."""
    if isinstance(source, dict):
        data, where = source, where or "<search space>"
    else:
        where = where or str(source)
        data = read_yaml_mapping(source, where=where, what="search space", error=SpaceError)
    if not isinstance(data, dict):
        raise SpaceError(f"{where}: a search space must be a mapping")
    if data.get("kind") == "dataflow":  # which layers of which models, in which order: dataflow_space.py
        from evomerge.search.dataflow_space import load_dataflow_space

        return load_dataflow_space(data, where)
    if data.get("kind") == "moe":  # a mixture of experts from the fine-tunes: evomerge/moe/space.py
        from evomerge.moe.space import load_moe_space

        return load_moe_space(data, where)
    try:
        space = SearchSpace.model_validate(data)
    except ValidationError as e:
        raise SpaceError(pydantic_message(e, where)) from None
    problems = []
    if space.method not in METHODS:
        raise SpaceError(f"{where}: method: unknown method '{space.method}'" + did_you_mean(space.method, METHODS))
    method = get_method(space.method)
    names = {p.name for p in method.params}
    for section, keys in (("search", space.search), ("fixed", space.fixed)):
        for key in keys:
            if key not in names:
                problems.append(f"{section}.{key}: method '{space.method}' has no parameter '{key}'"
                                + did_you_mean(key, names))
    for key, r in space.search.items():
        if key in names:
            if key not in SEARCHABLE:
                problems.append(f"search.{key}: only {', '.join(SEARCHABLE)} can be searched; put '{key}' under fixed")
                continue
            for bound in (r.low, r.high):
                msg = validate_scalar(method.param(key), bound)
                if msg:
                    problems.append(f"search.{key}: {msg}")
                    break
    for key, v in space.fixed.items():
        if key in names:
            msg = validate_scalar(method.param(key), v)
            if msg:
                problems.append(f"fixed.{key}: {msg}")
    if space.parts and space.attn_mlp:
        problems.append("parts and attn_mlp both split tensors by type; use parts alone (e.g. [mlp])")
    bad_parts = [p for p in space.parts if not p or p == "rest" or not p.replace("_", "").replace(".", "").isalnum()]
    if bad_parts or len(set(space.parts)) != len(space.parts):
        problems.append(f"parts: each must be a distinct tensor-name filter (letters, digits, _ and .), not 'rest'; "
                        f"got {space.parts}")
    problems += _calibration_problems(space, method, Path(where).parent if not isinstance(source, dict) else None)
    overlap = set(space.search) & set(space.fixed)
    if overlap:
        problems.append(f"{sorted(overlap)} are both searched and fixed")
    if problems:
        raise SpaceError("\n".join(f"{where}: {p}" for p in problems))
    return space


def _calibration_problems(space: SearchSpace, method, base_dir: Path | None) -> list[str]:
    """A data-aware method needs ``calibration`` and a data-free one refuses it; ``tasks`` becomes absolute."""
    if method.calibration is not None and space.calibration is None:
        return [f"calibration: method '{method.name}' needs calibration data; add e.g. "
                f"calibration: {{tasks: tasks.yaml, split: search, examples: 64}}"]
    if method.calibration is None and space.calibration is not None:
        return [f"calibration: method '{method.name}' uses no data; remove the calibration block"]
    if space.calibration is not None and space.calibration.tasks is not None:
        tasks = Path(space.calibration.tasks).expanduser()
        if not tasks.is_absolute():
            tasks = (base_dir or Path.cwd()) / tasks
        space.calibration = space.calibration.model_copy(update={"tasks": str(tasks.resolve())})
    return []
