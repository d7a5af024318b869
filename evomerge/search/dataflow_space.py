"""Data-flow search spaces: which layers, of which models, in which order (evolutionary frankenmerges).

Sakana's evolutionary model merge (Akiba et al. 2024, arXiv:2403.13187) searched two spaces: parameter
space (how weights are mixed, ``space.SearchSpace``) and data-flow space (the path a token takes through
the models' layers, with a scale per step). A data-flow space is a YAML file with ``kind: dataflow``::

    kind: dataflow
    sources: [base, rev, map]      # models whose layers may be used ("base": the base model); default: all;
                                   # or a mapping name -> [start, end) to allow only those layers
    layers: {min: 2, max: 6}       # total layers of a candidate
    slice_length: {min: 1, max: 2} # contiguous layers per slice (max default: the longest source)
    slots: 4                       # at most this many slices (default: ceil(layers.max / slice_length.min))
    repeat: true                   # whether a source layer may appear more than once
    scale: {low: 0.5, high: 1.5, default: 1.0}   # optional: a scale per slice (see below)

Encoding (``docs/dataflow.md`` gives the reasons): ``slots`` slices, each four numbers in fixed ranges,
so that CMA-ES, TPE, GP and random search all work on a plain box: ``use`` in [0, 1] (the slice is in
the flow when >= 0.5), ``source`` in [0, n) (the source's index, floored), ``length`` (rounded and
clipped to the allowed lengths) and ``start`` in [0, 1] (the slice's first layer as a fraction of the
positions it can take in its source). Decoding is deterministic and always feasible or refused:
slices are taken in slot order; a slice that would exceed ``layers.max`` is shortened (or skipped when
shorter than ``slice_length.min``), one that reuses a layer with ``repeat: false`` is skipped; while the
flow is shorter than ``layers.min``, unused slots join it, most-wanted (highest ``use``) first. A point
that still cannot reach ``layers.min`` is an ``InfeasibleFlow`` (the trial fails with that reason).

The scale of a slice multiplies its layers' attention and MLP output projections (``o_proj``,
``down_proj``): the slice's contribution to the residual stream, Sakana's per-step scaling. It is
written as mergekit's passthrough ``scale`` with filters, so mergekit runs the exported recipe too.

The default point is the base model's identity flow (all its layers, in order): the first trial.
Anchors are every source's identity flow, so a search starts from the best single model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from evomerge.recipe import Recipe, pydantic_message
from evomerge.search.space import Range, SpaceError

BASE = "base"  # the name of the base model among a data-flow space's sources
SCALED = ("o_proj", "down_proj")  # the tensors a slice's scale multiplies: its output projections
USE_THRESHOLD = 0.5  # a slot is in the flow when its ``use`` is at least this
# config keys that must agree for layers of two models to be stacked in one network
COMPATIBLE_KEYS = ("model_type", "architectures", "hidden_size", "intermediate_size", "num_attention_heads",
                   "num_key_value_heads", "head_dim", "vocab_size", "hidden_act", "rms_norm_eps", "rope_theta",
                   "rope_parameters", "rope_scaling", "attention_bias", "mlp_bias", "tie_word_embeddings",
                   "sliding_window")


class InfeasibleFlow(ValueError):
    """A point of a data-flow space that decodes to no flow within the space's constraints."""


class Bounds(BaseModel):
    """An integer interval [min, max] (max None: no bound of its own)."""

    model_config = ConfigDict(extra="forbid")
    min: int = Field(1, ge=1)
    max: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _check(self):
        if self.max is not None and self.max < self.min:
            raise ValueError(f"min ({self.min}) must not exceed max ({self.max})")
        return self


@dataclass(frozen=True)
class Step:
    """One slice of a flow: layers [start, end) of ``source``, with the scale of its output projections."""

    source: str
    start: int
    end: int
    scale: float = 1.0

    @property
    def length(self) -> int:
        return self.end - self.start


class DataflowSpace(BaseModel):
    """A data-flow search space (see the module docstring); ``bind`` it to the run's models before use."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["dataflow"]
    sources: list[str] | dict[str, tuple[int, int] | None] | None = None
    layers: Bounds
    slice_length: Bounds = Field(default_factory=Bounds)
    slots: int | None = Field(None, ge=1)
    repeat: bool = True
    scale: Range | None = None
    description: str = ""
    # set by ``bind``: each source's path and allowed layer range [start, end), and the base model's path
    _paths: dict[str, str] = PrivateAttr(default_factory=dict)
    _ranges: dict[str, tuple[int, int]] = PrivateAttr(default_factory=dict)
    _base: str = PrivateAttr(default="")

    # what the search loop and the reports read of every space
    @property
    def method(self) -> str:
        return "passthrough"

    @property
    def granularity(self) -> str:
        return "dataflow"

    @property
    def attn_mlp(self) -> bool:
        return False

    # -- binding to the models (headers only) -------------------------------------------------------
    def bind(self, base_model: str, models: dict[str, str], where: str = "search_space") -> "DataflowSpace":
        """Check the space against the run's models, reading only their config.json files: every source is
        known, its layer range inside the model, the models' layers stackable in one network (same
        architecture, hidden size, heads, ...), and some flow satisfies the length constraints."""
        from evomerge.checkpoint import CheckpointError, ModelReader

        known = {BASE: base_model, **models}
        if BASE in models:
            raise SpaceError(f"{where}: a model is named '{BASE}', which a data-flow space reserves for the base model")
        wanted = self.sources if self.sources is not None else list(known)
        ranges_given = wanted if isinstance(wanted, dict) else {name: None for name in wanted}
        problems = []
        for name in ranges_given:
            if name not in known:
                problems.append(f"sources: unknown model '{name}'; known: {', '.join(known)}")
        if not ranges_given:
            problems.append("sources: empty")
        if problems:
            raise SpaceError("\n".join(f"{where}: {p}" for p in problems))
        configs = {}
        for name in ranges_given:
            try:
                configs[name] = ModelReader(known[name]).config
            except (CheckpointError, OSError) as e:
                raise SpaceError(f"{where}: sources.{name}: {e}") from None
        problems += compatibility_problems(configs)
        ranges = {}
        for name, given in ranges_given.items():
            n = _layer_count(configs[name])
            start, end = given if given is not None else (0, n)
            if not 0 <= start < end <= n:
                problems.append(f"sources.{name}: layer range [{start}, {end}] is outside model '{name}', "
                                f"which has {n} layers")
            ranges[name] = (start, end)
        if problems:
            raise SpaceError("\n".join(f"{where}: {p}" for p in problems))
        longest = max(e - s for s, e in ranges.values())
        lmin, lmax = self.slice_length.min, min(self.slice_length.max or longest, longest)
        if lmin > longest:
            problems.append(f"slice_length.min ({lmin}) exceeds the longest allowed source range ({longest} layers)")
        slots = self.slots or math.ceil((self.layers.max or longest) / lmin)
        reach = slots * lmax
        if not self.repeat:
            reach = min(reach, sum(e - s for s, e in ranges.values()))
        if self.layers.min > reach:
            problems.append(f"layers.min ({self.layers.min}) cannot be reached: at most {reach} layers with "
                            f"{slots} slots of at most {lmax} layers" + ("" if self.repeat else " and no repeats"))
        if problems:
            raise SpaceError("\n".join(f"{where}: {p}" for p in problems))
        bound = self.model_copy(update={"slots": slots, "slice_length": Bounds(min=lmin, max=lmax),
                                        "sources": {n: ranges[n] for n in ranges}})
        bound._paths = {n: known[n] for n in ranges}
        bound._ranges = ranges
        bound._base = base_model
        return bound

    def source_paths(self) -> dict[str, str]:
        """Each source's model directory (after ``bind``)."""
        self._require_bound()
        return dict(self._paths)

    def _require_bound(self) -> None:
        if not self._ranges:
            raise RuntimeError("bind() the data-flow space to the run's models first")

    # -- geometry -----------------------------------------------------------------------------------
    def param_names(self, model_names=None, num_layers=None) -> list[str]:
        """Every searched dimension, slot by slot: ``use[s0]``, ``source[s0]``, ``length[s0]``, ``start[s0]``
        (and ``scale[s0]`` with a scale range)."""
        self._require_bound()
        per_slot = ["use", "source", "length", "start"] + (["scale"] if self.scale else [])
        return [f"{p}[s{k}]" for k in range(self.slots) for p in per_slot]

    def distributions(self, model_names=None, num_layers=None):
        """Optuna distributions of every dimension (all floats: one box for every sampler)."""
        from optuna.distributions import FloatDistribution

        lmin, lmax = self.slice_length.min, self.slice_length.max
        ranges = {"use": (0.0, 1.0), "source": (0.0, float(len(self._ranges))), "start": (0.0, 1.0),
                  "length": (lmin - 0.5, lmax + 0.5)}
        out = {}
        for name in self.param_names():
            kind = name.split("[")[0]
            if kind == "scale":
                out[name] = FloatDistribution(self.scale.low, self.scale.high, log=self.scale.log)
            else:
                out[name] = FloatDistribution(*ranges[kind])
        return out

    def off_center(self) -> list[str]:
        """Nothing to warn about: CMA-ES starts from the best anchor (an identity flow)."""
        return []

    def with_calibration_tasks(self, tasks, models, task_names) -> "DataflowSpace":
        """Data-flow spaces use no calibration data."""
        return self

    # -- points <-> flows ---------------------------------------------------------------------------
    def point_of(self, steps: list[Step]) -> dict[str, float]:
        """A point that decodes to ``steps`` (at most ``slots`` of them); the other slots unused."""
        self._require_bound()
        names = list(self._ranges)
        point = {}
        for k in range(self.slots):
            step = steps[k] if k < len(steps) else None
            src = step.source if step else names[0]
            lo, hi = self._ranges[src]
            length = step.length if step else self.slice_length.min
            room = (hi - lo) - length
            point[f"use[s{k}]"] = 1.0 if step else 0.0
            point[f"source[s{k}]"] = names.index(src) + 0.5
            point[f"length[s{k}]"] = float(length)
            point[f"start[s{k}]"] = (step.start - lo) / room if step and room > 0 else 0.0
            if self.scale:
                point[f"scale[s{k}]"] = step.scale if step else self.scale.default
        return point

    def identity_steps(self, source: str) -> list[Step] | None:
        """A source's allowed layers in order, cut into the longest allowed slices (None: not a valid flow)."""
        lo, hi = self._ranges[source]
        lmax = self.slice_length.max
        steps = [Step(source, s, min(s + lmax, hi), self.scale.default if self.scale else 1.0)
                 for s in range(lo, hi, lmax)]
        if steps[-1].length < self.slice_length.min:
            return None
        total = hi - lo
        if len(steps) > self.slots or not self.layers.min <= total <= (self.layers.max or total):
            return None
        return steps

    def default_point(self, model_names=None, num_layers=None) -> dict[str, float]:
        """The base's identity flow when the constraints allow it (else the first source's that does, else
        every slot used at the middle of its ranges)."""
        for src in [BASE, *self._ranges]:
            if src in self._ranges and (steps := self.identity_steps(src)):
                return self.point_of(steps)
        point = {n: (d.low + d.high) / 2 for n, d in self.distributions().items()}
        point.update({n: 1.0 for n in point if n.startswith("use[")})
        return point

    def anchor_points(self, model_names=None, num_layers=None) -> list[dict[str, float]]:
        """The default point, then every other source's identity flow that the constraints allow."""
        points = [self.default_point()]
        for src in self._ranges:
            steps = self.identity_steps(src)
            if steps and (p := self.point_of(steps)) not in points:
                points.append(p)
        return points

    def decode(self, point: dict[str, float]) -> list[Step]:
        """The flow of a point (the module docstring's rules); ``InfeasibleFlow`` if none fits."""
        self._require_bound()
        names = list(self._ranges)
        slots = [self._slot(point, k, names) for k in range(self.slots)]
        order = [k for k in range(self.slots) if point[f"use[s{k}]"] >= USE_THRESHOLD]
        spare = sorted((k for k in range(self.slots) if k not in order), key=lambda k: -point[f"use[s{k}]"])
        chosen: dict[int, Step] = {}
        used: set[tuple[str, int]] = set()
        total = 0
        for k in order + spare:
            if k in spare and total >= self.layers.min:
                break
            step = slots[k]
            room = (self.layers.max or total + step.length) - total
            if step.length > room:
                if room < self.slice_length.min:
                    continue
                step = Step(step.source, step.start, step.start + room, step.scale)
            cells = {(step.source, i) for i in range(step.start, step.end)}
            if not self.repeat and cells & used:
                continue
            chosen[k] = step
            used |= cells
            total += step.length
        if total < self.layers.min:
            raise InfeasibleFlow(f"the point decodes to {total} layers, fewer than layers.min ({self.layers.min})"
                                 + ("" if self.repeat else " without repeating a layer"))
        return [chosen[k] for k in sorted(chosen)]

    def _slot(self, point: dict[str, float], k: int, names: list[str]) -> Step:
        """Slot ``k``'s slice as its numbers say, before the flow's constraints are applied."""
        src = names[min(max(int(math.floor(point[f"source[s{k}]"])), 0), len(names) - 1)]
        lo, hi = self._ranges[src]
        length = min(max(int(round(point[f"length[s{k}]"])), self.slice_length.min), self.slice_length.max, hi - lo)
        start = lo + int(round(min(max(point[f"start[s{k}]"], 0.0), 1.0) * ((hi - lo) - length)))
        scale = round(float(point[f"scale[s{k}]"]), 6) if self.scale else 1.0
        return Step(src, start, start + length, scale)

    # -- recipes ------------------------------------------------------------------------------------
    def to_recipe(self, point: dict[str, float], *, base_model: str | None = None, models=None, num_layers=None,
                  dtype: str | None = None, name: str | None = None) -> Recipe:
        """The mergekit ``slices:`` + ``passthrough`` recipe of a point (``flow_recipe``)."""
        return flow_recipe(self.decode(point), self._paths, base_model=self._base, dtype=dtype, name=name)

    def load_candidate(self, text: str, where: str = "trial") -> Recipe:
        """A recorded trial's candidate (its recipe YAML)."""
        from evomerge.recipe import load_recipe

        return load_recipe(text, where=where)

    def make_builder(self, inputs, cfg, out: Path):
        """The candidate builder of data-flow recipes: the sources resident, a candidate their layers."""
        from evomerge.search.dataflow_builder import DataflowBuilder

        return DataflowBuilder(self._base, self._paths, device=cfg.device, dtype=cfg.dtype)


def flow_recipe(steps: list[Step], paths: dict[str, str], *, base_model: str, dtype: str | None = None,
                name: str | None = None) -> Recipe:
    """A flow as mergekit's ``slices:`` with ``merge_method: passthrough``; a scaled step's output
    projections get passthrough's ``scale`` through conditional filters (mergekit runs it as written)."""
    slices = []
    for step in steps:
        source: dict[str, Any] = {"model": paths[step.source], "layer_range": [step.start, step.end]}
        if step.scale != 1.0:
            source["parameters"] = {"scale": [{"filter": f, "value": step.scale} for f in SCALED] + [{"value": 1.0}]}
        slices.append({"sources": [source]})
    data: dict[str, Any] = {"slices": slices, "merge_method": "passthrough", "base_model": base_model}
    if dtype:
        data["dtype"] = dtype
    if name:
        data["name"] = name
    return Recipe.model_validate(data)


def compatibility_problems(configs: dict[str, dict]) -> list[str]:
    """Why the layers of these models (name -> config.json) cannot be stacked in one network, if they can't."""
    first, problems = next(iter(configs)), []
    ref = configs[first]
    for name, cfg in configs.items():
        for key in COMPATIBLE_KEYS:
            a, b = ref.get(key), cfg.get(key)
            if a != b:
                problems.append(f"sources: models '{first}' and '{name}' cannot share a data flow: {key} is "
                                f"{a!r} in '{first}' and {b!r} in '{name}'")
    return problems


def _layer_count(config: dict) -> int:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(config.get(key), int):
            return config[key]
    return 0


def load_dataflow_space(data: dict, where: str) -> DataflowSpace:
    """Validate a ``kind: dataflow`` mapping (errors name the file and key)."""
    try:
        space = DataflowSpace.model_validate(data)
    except ValidationError as e:
        raise SpaceError(pydantic_message(e, where)) from None
    return space
