"""The merge engine: plan a recipe against model headers, then stream it tensor by tensor.

:func:`plan_merge` resolves, for every output tensor, its input tensors and the parameter values
that apply to it (mergekit 0.1.5's planner semantics: slices, gradients, filters, precedence), and
checks everything that can be checked from headers: model directories, architectures, layer
ranges, shapes, vocabulary sizes, required parameters and cross-parameter constraints. Nothing is
read or written until the whole plan is valid.

:func:`run_merge` executes a plan file-to-file: tensors are read memory-mapped one at a time,
merged by the kernels in :mod:`evomerge.methods` on the chosen device (the task-arithmetic family on
the CPU by the cpu backend's compiled pass, :func:`evomerge.backends.tensor_kernel`), and written into a sharded
checkpoint that appears atomically at the end. :func:`merge_in_memory` runs the same plan over
in-memory state dicts.
"""

from __future__ import annotations

import math
import queue
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch

from evomerge.checkpoint import CheckpointWriter, ModelReader, copy_tokenizer_files, parse_size
from evomerge.lora.source import mergekit_references
from evomerge.methods import MergeMethod, RandomFields
from evomerge.recipe import (Recipe, RecipeError, Slice, SliceSource, MISSING, coerce, load_recipe, mergekit_note,
                             resolve_source)

LAYER_PATTERN = re.compile(r"^(?P<prefix>.*?\.(?:layers|h|blocks)\.)(?P<index>\d+)(?P<suffix>\..+)$")
PRE_LAYER_HINTS = ("embed", "wte", "wpe")
STATISTICS_CACHE_NAME = ".evomerge-statistics"  # run_merge's default cache of calibration statistics
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}


class MergeError(RuntimeError):
    """A merge that failed while running (bad values in the weights, device errors)."""


# ------------------------------------------------------------------------------------------------
# Plan
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorRef:
    """One tensor of one input model."""

    model: str
    name: str


@dataclass
class TensorTask:
    """How one output tensor is made: kernel inputs and the resolved parameter values."""

    name: str
    shape: tuple[int, ...]
    method: str  # a method name, or "copy" for non-float tensors taken from the base
    base: TensorRef | None
    inputs: list[TensorRef]
    model_params: list[dict[str, Any]]
    params: dict[str, Any]
    t: float

    def describe(self) -> str:
        srcs = ", ".join(f"{Path(r.model).name}:{r.name}" for r in self.inputs)
        base = f" base={Path(self.base.model).name}:{self.base.name}" if self.base else ""
        per_model = "; ".join(
            ",".join(f"{k}={_fmt(v)}" for k, v in mp.items()) for mp in self.model_params
        )
        glob = ",".join(f"{k}={_fmt(v)}" for k, v in self.params.items())
        return f"{self.name} {list(self.shape)} <- {self.method}({srcs}){base} [{per_model}] {{{glob}}}"


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


@dataclass
class MergePlan:
    """A validated recipe, resolved tensor by tensor against its input models."""

    recipe: Recipe
    method: MergeMethod
    tasks: list[TensorTask]
    readers: dict[str, Any]  # model path -> reader (ModelReader or StateDictReader)
    config: dict[str, Any] | None  # output config.json
    num_layers: int
    tokenizer_dir: Path | None
    dtype: torch.dtype | None  # working input dtype (recipe.dtype)
    out_dtype: torch.dtype | None
    where: str = "<recipe>"
    calibration_texts: dict[str, list[str]] | None = None  # per input model, for data-aware methods
    statistics: dict[str, dict[str, torch.Tensor]] | None = None  # per input model: tensor name -> statistics

    @property
    def output_bytes(self) -> int:
        total = 0
        for task in self.tasks:
            dt = self.out_dtype_of(task)
            total += _numel(task.shape) * torch.empty((), dtype=dt).element_size()
        return total

    def out_dtype_of(self, task: TensorTask) -> torch.dtype:
        ref = task.base or task.inputs[0]
        native = self.readers[ref.model].dtype(ref.name)
        if not native.is_floating_point:
            return native
        return self.out_dtype or self.dtype or native


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _resolve_model_path(name: str, base_dir: Path | None) -> Path:
    """A model reference as a local directory: as given, else relative to the recipe's folder."""
    p = Path(name).expanduser()
    if p.exists() or base_dir is None or p.is_absolute():
        return p
    alt = base_dir / p
    return alt if alt.exists() else p


def _open_readers(recipe: Recipe, where: str, allow_pickle: bool,
                  readers: Mapping[str, Any] | None) -> dict[str, Any]:
    from evomerge.checkpoint import CheckpointError
    from evomerge.lora import AdapterError, is_adapter_dir, open_adapter_source, split_reference

    if readers is not None:
        given = dict(readers)
        for m in recipe.referenced_models():  # base+adapter names the reader given for the adapter
            pair = split_reference(m) if m not in given else None
            if pair is not None and pair[1] in given:
                given[m] = given[pair[1]]
        missing = [m for m in recipe.referenced_models() if m not in given]
        if missing:
            raise RecipeError(f"{where}: no state dict given for model(s) {missing}")
        return given
    base_dir = Path(where).parent if where and not where.startswith("<") else None
    out: dict[str, Any] = {}

    def model(name: str):
        if name not in out:
            path = _resolve_model_path(name, base_dir)
            if not path.exists():
                raise RecipeError(f"{where}: model directory '{name}' not found"
                                  + (f" (also looked in {base_dir})" if base_dir else ""))
            if is_adapter_dir(path):
                raise RecipeError(f"{where}: '{name}' is a LoRA adapter, not a full model")
            try:
                out[name] = ModelReader(path, allow_pickle=allow_pickle)
            except CheckpointError as e:
                raise RecipeError(f"{where}: model '{name}': {e}") from None
        return out[name]

    declared_base = recipe.base_model or next((s.base_model for s in recipe.slices or [] if s.base_model), None)
    for name in recipe.referenced_models():
        try:
            pair = split_reference(name)
            if pair is not None:  # mergekit's base+adapter
                out[name] = open_adapter_source(model(pair[0]), _resolve_model_path(pair[1], base_dir))
            elif is_adapter_dir(_resolve_model_path(name, base_dir)):
                if declared_base is None or declared_base == name:
                    raise RecipeError(f"{where}: model '{name}' is a LoRA adapter: declare the model it was "
                                      f"trained on as base_model, or write it as 'base+{name}'")
                out[name] = open_adapter_source(model(declared_base), _resolve_model_path(name, base_dir))
            else:
                model(name)
        except AdapterError as e:
            raise RecipeError(f"{where}: model '{name}': {e}") from None
    return out


def _layer_of(name: str) -> int | None:
    m = LAYER_PATTERN.match(name)
    return int(m.group("index")) if m else None


def _with_layer(name: str, index: int) -> str:
    m = LAYER_PATTERN.match(name)
    return f"{m.group('prefix')}{index}{m.group('suffix')}"


def _num_layers(reader) -> int:
    n = getattr(reader, "num_layers", None)
    if n:
        return int(n)
    idx = [_layer_of(t) for t in reader.tensor_names()]
    idx = [i for i in idx if i is not None]
    return max(idx) + 1 if idx else 0


def _has(reader, name: str) -> bool:
    return reader.has_tensor(name)


def _normalized_slices(recipe: Recipe, readers: dict[str, Any], where: str) -> list[Slice]:
    """``models:`` as one slice over all layers (mergekit's normalize_config), base appended if needed."""
    if recipe.slices is not None:
        return list(recipe.slices)
    sources = []
    for m in recipe.models:
        sources.append(SliceSource(model=m.model, layer_range=(0, _num_layers(readers[m.model])),
                                   parameters=m.parameters))
    listed = {m.model for m in recipe.models}
    if recipe.base_model and recipe.base_model not in listed:
        sources.append(SliceSource(model=recipe.base_model,
                                   layer_range=(0, _num_layers(readers[recipe.base_model]))))
    lengths = {s.model: s.layer_range[1] for s in sources}
    if len(set(lengths.values())) > 1:
        raise RecipeError(f"{where}: models have different numbers of layers {lengths}; use 'slices:' "
                          f"with layer_range to merge them")
    return [Slice(sources=sources)]


def _check_architectures(readers: dict[str, Any], where: str) -> None:
    seen: dict[tuple, str] = {}
    for name, r in readers.items():
        arch = tuple(getattr(r, "architectures", None) or ())
        if arch:
            seen.setdefault(arch, name)
    if len(seen) > 1:
        desc = "; ".join(f"'{m}' is {list(a)}" for a, m in seen.items())
        raise RecipeError(f"{where}: models have different architectures: {desc}")


def plan_merge(recipe: Recipe | str | Path | dict, *, allow_pickle: bool = False,
               readers: Mapping[str, Any] | None = None, where: str | None = None, trace=None) -> MergePlan:
    """Resolve ``recipe`` against its models' headers into a :class:`MergePlan` (reads no weights).

    Raises :class:`RecipeError` naming the file, key or tensor on every problem found. ``trace``,
    if given, is called for every parameter value resolved: (output tensor, input slot or None for
    a global parameter, parameter name, the path of the recipe scope the value came from (see
    ``_Planner.scope_path``; None for the default), the tensor name it was evaluated for, gradient
    position t).
    """
    if not isinstance(recipe, Recipe):
        where = where or (str(recipe) if isinstance(recipe, (str, Path)) else "<recipe>")
        recipe = load_recipe(recipe, where=where)
    where = where or "<recipe>"
    method = recipe.method
    readers = _open_readers(recipe, where, allow_pickle, readers)
    _check_architectures(readers, where)
    slices = _normalized_slices(recipe, readers, where)
    problems: list[str] = []

    for si, s in enumerate(slices):
        for j, src in enumerate(s.sources):
            n = _num_layers(readers[src.model])
            if src.layer_range[1] > n:
                problems.append(f"slices[{si}].sources[{j}].layer_range: [{src.layer_range[0]}, "
                                f"{src.layer_range[1]}] is outside model '{src.model}', which has {n} layers")
    if problems:
        raise RecipeError("\n".join(f"{where}: {p}" for p in problems))

    planner = _Planner(recipe, method, readers, where, trace)
    first, last = slices[0], slices[-1]
    template = planner.template_reader(first)
    pre, post = [], []
    for name in template.tensor_names():
        if _layer_of(name) is None:
            (pre if any(h in name for h in PRE_LAYER_HINTS) else post).append(name)
    tasks = [planner.task(name, name, first, t=0.0) for name in pre]
    out_layer = 0
    layer_origins = []  # per output layer: (reader of its template, input layer index)
    for s in slices:
        length = s.sources[0].layer_range[1] - s.sources[0].layer_range[0]
        layer_reader = planner.template_reader(s)
        in_start = planner.template_source(s).layer_range[0] if planner.template_source(s) else 0
        for offset in range(length):
            layer_origins.append((layer_reader, in_start + offset))
            t = offset / (length - 1) if length > 1 else 1.0
            names = [n for n in layer_reader.tensor_names() if _layer_of(n) == in_start + offset]
            for name in names:
                tasks.append(planner.task(_with_layer(name, out_layer), name, s, t=t, offset=offset))
            out_layer += 1
    tasks += [planner.task(name, name, last, t=0.0) for name in post]
    if planner.problems:
        raise RecipeError("\n".join(f"{where}: {p}" for p in planner.report(len(tasks))))

    config = _output_config(template, layer_origins, recipe)
    tok_dir = _tokenizer_dir(recipe, readers, template, where)
    texts = _calibration_texts(recipe, method, tasks, where) if method.calibration else None
    return MergePlan(recipe=recipe, method=method, tasks=tasks, readers=readers, config=config,
                     num_layers=out_layer, tokenizer_dir=tok_dir,
                     dtype=DTYPES.get(recipe.dtype) if recipe.dtype else None,
                     out_dtype=DTYPES.get(recipe.out_dtype) if recipe.out_dtype else None, where=where,
                     calibration_texts=texts)


def _calibration_texts(recipe: Recipe, method: MergeMethod, tasks: list[TensorTask], where: str) -> dict:
    """Each input model's calibration texts, read and checked at plan time (RecipeError on a problem)."""
    from evomerge.calibration import CalibrationError, calibration_texts

    inputs = list(dict.fromkeys(ref.model for task in tasks if task.method != "copy" for ref in task.inputs))
    base_dir = Path(where).parent if where and not where.startswith("<") else None
    try:
        return calibration_texts(recipe.calibration, inputs, base_dir, where)
    except CalibrationError as e:
        raise RecipeError(str(e)) from None


def prepare_statistics(plan: MergePlan, *, cache_dir: str | Path | None = None, device="auto",
                       statistics: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
                       model_dirs: Mapping[str, str | Path] | None = None,
                       progress: Callable[[str], None] | None = None) -> MergePlan:
    """Give a data-aware plan its calibration statistics (no-op for data-free methods); returns the plan.

    ``statistics`` (per model name: tensor name -> statistics as ``evomerge.calibration`` computes them,
    before the method's ``prepare_statistics``) are used as given; otherwise every input
    model is run on its calibration texts, from ``model_dirs[name]`` or its reader's directory, with
    results cached in ``cache_dir`` (None: not cached).
    """
    from evomerge.calibration import collect_statistics

    if plan.method.calibration is None or plan.statistics is not None:
        return plan
    names = list(plan.calibration_texts)
    prepare = plan.method.prepare_statistics or dict
    if statistics is not None:
        missing = [n for n in names if n not in statistics]
        if missing:
            raise RecipeError(f"{plan.where}: no calibration statistics given for model(s) {missing}")
        plan.statistics = {n: prepare(statistics[n]) for n in names}
        return plan
    dirs, base_dirs = {}, {}
    for name in names:
        reader = plan.readers[name]
        path = (model_dirs or {}).get(name) or getattr(reader, "path", None)
        if path is None:
            raise RecipeError(f"{plan.where}: method '{plan.method.name}' needs calibration statistics of model "
                              f"'{name}': give its directory (model_dirs) or precomputed statistics")
        dirs[name] = Path(path)
        base_path = getattr(reader.base, "path", None) if hasattr(reader, "adapter") else None
        if base_path is not None and name not in (model_dirs or {}):  # a LoRA adapter: calibrate base + adapter
            base_dirs[name] = Path(base_path)
    raw = collect_statistics(plan.recipe.calibration, dirs, plan.calibration_texts, kind=plan.method.calibration,
                             cache_dir=Path(cache_dir) if cache_dir else None, device=resolve_device(device),
                             progress=progress, base_dirs=base_dirs)
    plan.statistics = {n: prepare(stats) for n, stats in raw.items()}
    return plan


class _Planner:
    """Resolves one output tensor at a time; collects problems instead of stopping at the first."""

    def __init__(self, recipe: Recipe, method: MergeMethod, readers: dict[str, Any], where: str, trace=None):
        self.recipe, self.method, self.readers, self.where = recipe, method, readers, where
        self.trace = trace  # trace(out_name, input slot or None, parameter, scope_path, tensor, t)
        self.problems: dict[str, list[str]] = {}  # message -> tensors it applies to

    def problem(self, message: str, tensor: str) -> None:
        self.problems.setdefault(message, []).append(tensor)

    def report(self, n_tensors: int, shown: int = 3) -> list[str]:
        """One line per distinct problem, with the tensors it concerns (abbreviated)."""
        lines = []
        for message, tensors in self.problems.items():
            tensors = list(dict.fromkeys(tensors))
            if len(tensors) >= n_tensors > 1:
                where = "every tensor"
            elif len(tensors) > shown:
                where = f"tensors {', '.join(tensors[:shown])} and {len(tensors) - shown} more"
            else:
                where = f"tensor{'s' if len(tensors) > 1 else ''} {', '.join(tensors)}"
            lines.append(f"{message} ({where})")
        return lines

    def location(self, s: Slice, model: str) -> str:
        """Where a model's parameters live in the recipe: models[i] or slices[k].sources[j]."""
        if self.recipe.models is not None:
            for i, m in enumerate(self.recipe.models):
                if m.model == model:
                    return f"models[{i}] ('{model}')"
            return f"base_model ('{model}')"
        si = next(i for i, x in enumerate(self.recipe.slices) if x is s)
        for j, src in enumerate(s.sources):
            if src.model == model:
                return f"slices[{si}].sources[{j}] ('{model}')"
        return f"slices[{si}].base_model ('{model}')"

    def scope_path(self, s: Slice, src: SliceSource | None, level: int | None) -> tuple | None:
        """Where a parameter scope lives in the recipe, as attribute names and list indices.

        ``level`` indexes [source, slice, global] parameters (None: no scope had the value).
        """
        if level is None:
            return None
        if level == 2:
            return ("parameters",)
        if self.recipe.models is not None:  # one implicit slice; sources follow models[]
            if level == 1:
                return None  # the implicit slice has no parameters of its own
            index = next(i for i, m in enumerate(self.recipe.models) if m.model == src.model)
            return ("models", index, "parameters")
        si = next(i for i, x in enumerate(self.recipe.slices) if x is s)
        if level == 1:
            return ("slices", si, "parameters")
        return ("slices", si, "sources", next(j for j, x in enumerate(s.sources) if x is src), "parameters")

    def slice_base(self, s: Slice) -> str | None:
        return s.base_model or self.recipe.base_model

    def template_source(self, s: Slice) -> SliceSource | None:
        base = self.slice_base(s)
        for src in s.sources:
            if src.model == base:
                return src
        return s.sources[0] if s.sources else None

    def template_reader(self, s: Slice):
        base = self.slice_base(s)
        if base and base in self.readers and not any(src.model == base for src in s.sources):
            return self.readers[base]
        return self.readers[self.template_source(s).model]

    def _input_name(self, reader, out_template_name: str, src: SliceSource | None, offset: int | None) -> str:
        if offset is None or src is None:
            return out_template_name
        return _with_layer(out_template_name, src.layer_range[0] + offset)

    def task(self, out_name: str, template_name: str, s: Slice, *, t: float, offset: int | None = None) -> TensorTask:
        method, recipe = self.method, self.recipe
        base = self.slice_base(s)
        tmpl_reader = self.template_reader(s)
        shape = tuple(tmpl_reader.shape(template_name))
        native = tmpl_reader.dtype(template_name)

        # inputs: every source of the slice; the base joins as a separate kernel argument unless the
        # method treats it as an ordinary input (linear, passthrough), where it counts only if listed
        models: list[tuple[str, SliceSource | None]] = [(src.model, src) for src in s.sources]
        if base and not method.uses_base_as_input and not any(m == base for m, _ in models):
            models.append((base, None))
        refs: dict[str, TensorRef] = {}
        for model, src in models:
            reader = self.readers[model]
            in_name = (template_name if offset is None else
                       _with_layer(template_name, (src.layer_range[0] if src else 0) + offset))
            in_name = self._available(reader, in_name, model)
            if in_name is None:
                continue
            in_shape = tuple(reader.shape(in_name))
            if in_shape != shape:
                self.problem(self._shape_problem(out_name, model, in_shape, shape), out_name)
                continue
            refs[model] = TensorRef(model, in_name)
        if len(refs) != len(models):
            return TensorTask(out_name, shape, method.name, None, [], [], {}, t)

        base_ref = refs.get(base) if base else None
        if not native.is_floating_point:
            src_ref = base_ref or refs[models[0][0]]
            return TensorTask(out_name, shape, "copy", None, [src_ref], [{}], {}, t)

        if method.uses_base_as_input:
            kernel_models, kernel_base = models, None
        else:
            kernel_models, kernel_base = [(m, src) for m, src in models if m != base], base_ref

        glob_sources = [s.parameters, recipe.parameters]
        params = {}
        for spec in method.params:
            if spec.per_model:
                continue
            level, v = resolve_source(glob_sources, spec.name, out_name, t)
            if self.trace:
                self.trace(out_name, None, spec.name, self.scope_path(s, None, level + 1 if level is not None else None),
                           out_name, t)
            params[spec.name] = coerce(spec, spec.default if v is MISSING else v)
        model_params = []
        missing = False
        for slot, (model, src) in enumerate(kernel_models):
            sources = [src.parameters if src else None, s.parameters, recipe.parameters]
            in_name = refs[model].name
            mp = {}
            for spec in method.params:
                if not spec.per_model:
                    continue
                level, v = resolve_source(sources, spec.name, in_name, t)
                if self.trace:
                    self.trace(out_name, slot, spec.name, self.scope_path(s, src, level), in_name, t)
                if v is MISSING:
                    if spec.default is None:
                        self.problem(f"{self.location(s, model)}: missing required parameter '{spec.name}' "
                                     f"(set it in that model's parameters, or globally)", in_name)
                        missing = True
                        continue
                    v = spec.default
                mp[spec.name] = coerce(spec, v)
            model_params.append(mp)
        if not missing:  # types, ranges and cross-parameter rules (DELLA's window), per tensor
            for msg in method.check_params(model_params, params):
                m = re.match(rf"{method.name}: model (\d+): (.*)", msg)
                if m:
                    msg = f"{self.location(s, kernel_models[int(m.group(1))][0])}: {m.group(2)}"
                self.problem(msg, out_name)
            if method.check_shape is not None and (msg := method.check_shape(shape, len(kernel_models), params)):
                self.problem(f"{method.name}: {msg}", out_name)
        return TensorTask(out_name, shape, method.name, kernel_base,
                          [refs[m] for m, _ in kernel_models], model_params, params, t)

    def _available(self, reader, name: str, model: str) -> str | None:
        if reader.has_tensor(name):
            return name
        tied = getattr(reader, "tied_aliases", {}).get(name)
        if tied is not None:  # tie_word_embeddings: lm_head.weight is stored as the embeddings
            return tied
        self.problem(f"model '{model}' has no tensor '{name}'", name)
        return None

    def _shape_problem(self, name, model, got, expected) -> str:
        if any(h in name for h in ("embed", "lm_head", "wte")):
            return (f"tensor {name}: vocabulary sizes differ: model '{model}' has {got[0]} rows, "
                    f"the base/first model has {expected[0]}; evomerge does not truncate or pad vocabularies")
        return f"tensor {name}: shape {list(got)} in model '{model}' does not match {list(expected)}"


def _output_config(template, layer_origins: list[tuple[Any, int]], recipe: Recipe) -> dict | None:
    """The output config.json: the template's, with the layer count and per-layer attributes rebuilt.

    ``layer_origins`` gives each output layer's (template reader, input layer index): its ``layer_types``
    entry (full or sliding attention) is the one of the layer it was taken from, so a reordered or repeated
    layer keeps its attention kind (a sliding layer of Qwen2 or Mistral stays sliding wherever it lands).
    """
    cfg = getattr(template, "config", None)
    if cfg is None:
        return None
    cfg = dict(cfg)
    num_layers = len(layer_origins)
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if key in cfg:
            cfg[key] = num_layers
    if isinstance(cfg.get("layer_types"), list) and cfg["layer_types"]:
        cfg["layer_types"] = [_layer_type(reader, index, cfg["layer_types"]) for reader, index in layer_origins]
    out_dtype = recipe.out_dtype or recipe.dtype
    if out_dtype:
        cfg["torch_dtype"] = out_dtype
        if "dtype" in cfg:
            cfg["dtype"] = out_dtype
    return cfg


def _layer_type(reader, index: int, fallback: list) -> Any:
    """The ``layer_types`` entry of input layer ``index`` of ``reader``'s model (``fallback``, cycled, if it has none)."""
    types = (getattr(reader, "config", None) or {}).get("layer_types")
    if isinstance(types, list) and index < len(types):
        return types[index]
    return fallback[index % len(fallback)]


def _tokenizer_dir(recipe: Recipe, readers: dict[str, Any], template, where: str) -> Path | None:
    src = recipe.tokenizer_source
    if src in (None, "base"):
        name = recipe.base_model or recipe.referenced_models()[0]
        r = readers.get(name, template)
        return getattr(r, "path", None)
    if src in readers:
        return getattr(readers[src], "path", None)
    path = Path(src)
    if not path.is_dir():
        raise RecipeError(f"{where}: tokenizer_source: model directory '{src}' not found")
    return path


# ------------------------------------------------------------------------------------------------
# Execute
# ------------------------------------------------------------------------------------------------
def resolve_device(device: str | torch.device | None) -> torch.device:
    """'auto' (or None) → CUDA when available, else CPU; otherwise as given (validated).

    A CUDA device comes back with its index ("cuda" → "cuda:0"), as tensors report theirs, so
    that ``tensor.device == resolve_device(...)`` means what it says.
    """
    if device is None or str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def load_input(plan: MergePlan, ref: TensorRef, device: torch.device) -> torch.Tensor:
    """Read one input tensor as the kernels see it: cast to the recipe's ``dtype`` (if any).

    Tensors stay in their (often 16-bit) storage dtype: the kernels up-cast to float32 one model
    at a time, so a merge holds half-size inputs and the values are identical.
    """
    reader = plan.readers[ref.model]
    native = reader.dtype(ref.name)
    dtype = plan.dtype if plan.dtype is not None and native.is_floating_point else None
    return reader.get_tensor(ref.name, device=device, dtype=dtype)


def all_finite(x: torch.Tensor) -> bool:
    """True if ``x`` has no NaN or infinity.

    A NaN or infinity anywhere makes the sum non-finite, so one fast reduction settles the common
    case; only a non-finite sum (bad values, or a finite overflow) pays for the exact check.
    """
    if not x.is_floating_point() or x.numel() == 0:
        return True
    if math.isfinite(x.sum().item()):
        return True
    return bool(torch.isfinite(x).all())


TensorKernel = Callable[..., "torch.Tensor | None"]  # ``backends.cpu_stream.merge_tensor``'s signature


def compute_tensor(plan: MergePlan, task: TensorTask, device: torch.device, seed: int,
                   kernel: TensorKernel | None = None) -> torch.Tensor:
    """Read the inputs of one output tensor and merge them: with ``kernel`` (``backends.tensor_kernel``)
    where it takes the tensor, else with the plan's reference kernel (``MergeMethod.merge``)."""
    if task.method == "copy":
        return plan.readers[task.inputs[0].model].get_tensor(task.inputs[0].name)
    inputs = [load_input(plan, r, device) for r in task.inputs]
    base = load_input(plan, task.base, device) if task.base else None
    for ref, x in zip([task.base, *task.inputs] if base is not None else task.inputs,
                      [base, *inputs] if base is not None else inputs):
        if not all_finite(x):
            raise MergeError(f"model '{ref.model}': tensor {ref.name} contains NaN or infinite values")
    fields = None
    if plan.method.needs_fields:
        fields = RandomFields(task.shape, seed=seed, tensor_name=task.name, count=len(inputs), device=device)
    statistics = None
    if plan.method.calibration is not None:
        if plan.statistics is None:
            raise MergeError(f"method {plan.method.name} needs calibration statistics: call prepare_statistics first")
        statistics = [_statistic(plan, ref, device) for ref in task.inputs]
    out = None
    if kernel is not None and base is not None:
        out = kernel(plan.method, task.name, base, inputs, task.model_params, task.params, seed)
    if out is None:
        out = plan.method.merge(base=base, tensors=inputs, model_params=task.model_params, params=task.params,
                                fields=fields, statistics=statistics)
    out_dtype = plan.out_dtype_of(task)
    out = out.to(out_dtype)
    if not all_finite(out):
        raise MergeError(f"merged tensor {task.name} contains NaN or infinite values "
                         f"(method {plan.method.name}, params {task.params}, {task.model_params})")
    return out


def _statistic(plan: MergePlan, ref: TensorRef, device: torch.device) -> torch.Tensor | None:
    """The calibration statistics of one input tensor on ``device`` (None when its model has none for it)."""
    value = plan.statistics[ref.model].get(ref.name)
    return None if value is None else value.to(device)


def iter_merged(plan: MergePlan, *, device="auto", seed: int = 0,
                backend: str = "auto") -> Iterable[tuple[str, torch.Tensor]]:
    """Yield ``(name, merged tensor)`` for every output tensor of the plan, in order (``backend``: as ``run_merge``)."""
    from evomerge.backends import tensor_kernel

    dev = resolve_device(device)
    for task, tensor in merged_tensors(plan, dev, seed, tensor_kernel(backend, dev, plan.method.name)):
        yield task.name, tensor


GIANT_SHARE = 8  # a tensor of more than 1/GIANT_SHARE of a plan's elements is a giant (``giant_tasks``)


def giant_tasks(tasks: Sequence[TensorTask]) -> list[int]:
    """Indices of the tasks whose tensors hold more than 1/``GIANT_SHARE`` of all elements (a small
    model's embedding and output head), largest first."""
    sizes = [math.prod(task.shape) for task in tasks]
    total = sum(sizes)
    return sorted((i for i, size in enumerate(sizes) if size * GIANT_SHARE > total), key=lambda i: -sizes[i])


def merged_tensors(plan: MergePlan, device: torch.device, seed: int,
                   kernel: TensorKernel | None) -> Iterator[tuple[TensorTask, torch.Tensor]]:
    """``(task, compute_tensor(...))`` for every task of the plan, in plan order.

    With a compiled ``kernel`` (single-threaded and releasing the GIL), when torch has two or more
    threads, two threads merge while the caller takes finished tensors: one merges the giants
    (``giant_tasks``) one after another from the start, handing each over when done, so that neither
    thread is left with one alone at the end and no two are in memory at once; the other merges the
    rest in plan order, ahead of the caller by at most the giants' elements plus twice the largest
    other tensor's, and both take the rest once the giants are done. The results do not depend on the
    order.
    """
    tasks = plan.tasks
    if kernel is None or torch.get_num_threads() < 2:
        for task in tasks:
            yield task, compute_tensor(plan, task, device, seed, kernel)
        return
    sizes = [math.prod(task.shape) for task in tasks]
    giants = giant_tasks(tasks)
    is_giant = set(giants)
    rest = iter(i for i in range(len(tasks)) if i not in is_giant)
    ahead = sum(sizes[i] for i in giants) + 2 * max((s for i, s in enumerate(sizes) if i not in is_giant), default=0)
    finished: queue.SimpleQueue = queue.SimpleQueue()  # (index, tensor, error) of each giant as it is done
    stop = threading.Event()

    def merge_giants() -> None:
        for i in giants:
            if stop.is_set():
                return
            try:
                finished.put((i, compute_tensor(plan, tasks[i], device, seed, kernel), None))
            except BaseException as error:  # handed to the caller, who raises it
                finished.put((i, None, error))
                return

    giants_done: dict[int, torch.Tensor] = {}
    with ThreadPoolExecutor(2) as pool:
        pool.submit(merge_giants)
        started: dict[int, Future] = {}

        def start_next() -> bool:
            i = next(rest, None)
            if i is not None:
                started[i] = pool.submit(compute_tensor, plan, tasks[i], device, seed, kernel)
            return i is not None

        try:
            for i, task in enumerate(tasks):
                while sum(sizes[j] for j in started) < ahead and start_next():
                    pass
                if i in is_giant:
                    while i not in giants_done:
                        j, tensor, error = finished.get()
                        if error is not None:
                            raise error
                        giants_done[j] = tensor
                    yield task, giants_done.pop(i)
                    continue
                while i not in started and start_next():
                    pass
                yield task, started.pop(i).result()
        finally:  # after an error, or when the caller stops early, drop the tensors not yet begun
            stop.set()
            for future in started.values():
                future.cancel()


def run_merge(recipe: Recipe | str | Path | dict, out_dir: str | Path, *, device="auto", seed: int = 0,
              out_shard_size: str | int = "2GB", overwrite: bool = False, allow_pickle: bool = False,
              progress: Callable[[TensorTask, int], None] | None = None,
              where: str | None = None, statistics_cache: str | Path | None = None,
              card: str | None = None, backend: str = "auto") -> Path:
    """Merge file to file: plan (headers only), then stream every tensor into an atomic checkpoint.

    ``progress(task, nbytes)`` is called after each tensor is written. Data-aware methods first compute
    their calibration statistics, cached in ``statistics_cache`` (default: ``.evomerge-statistics`` next
    to the output directory). ``card``: the README.md to write (a search's card, with how the recipe
    was found); default ``model_card``. ``backend``: "auto" | "reference" | "cpu" | "cuda" (as the
    search's; auto: the task-arithmetic family through the cpu backend's compiled pass on the CPU,
    ``backends.tensor_kernel``; every other method and device through the reference kernels; the
    same bits either way). Returns the output directory.
    """
    from evomerge.backends import tensor_kernel

    plan = recipe if isinstance(recipe, MergePlan) else plan_merge(recipe, allow_pickle=allow_pickle, where=where)
    dev = resolve_device(device)
    kernel = tensor_kernel(backend, dev, plan.method.name)
    max_shard = parse_size(out_shard_size)
    expected = [(task.name, task.shape, plan.out_dtype_of(task)) for task in plan.tasks]
    with CheckpointWriter(out_dir, max_shard_bytes=max_shard, overwrite=overwrite, expected=expected) as writer:
        prepare_statistics(plan, device=dev,
                           cache_dir=statistics_cache or Path(out_dir).resolve().parent / STATISTICS_CACHE_NAME)
        for task, tensor in merged_tensors(plan, dev, seed, kernel):
            writer.add_tensor(task.name, tensor.cpu())
            if progress:
                progress(task, tensor.numel() * tensor.element_size())
            del tensor
        if plan.config is not None:
            writer.write_json("config.json", plan.config)
        if plan.tokenizer_dir is not None:
            copy_tokenizer_files(plan.tokenizer_dir, writer)
        base_dir = Path(plan.where).parent if plan.where and not plan.where.startswith("<") else None
        writer.write_text("mergekit_config.yml", mergekit_references(plan.recipe, base_dir).to_yaml())
        writer.write_text("README.md", card if card is not None else model_card(plan, seed))
        return writer.commit()


def model_card(plan: MergePlan, seed: int) -> str:
    """The Hub model card (README.md) of a plain merge: metadata, sources, recipe (``evomerge.card``)."""
    from evomerge.card import merge_facts, render_card

    return render_card(merge_facts(plan.recipe, num_layers=plan.num_layers, seed=seed))


# ------------------------------------------------------------------------------------------------
# In memory
# ------------------------------------------------------------------------------------------------
@dataclass
class StateDictReader:
    """The reader interface over an in-memory state dict (no config, no files)."""

    state_dict: Mapping[str, torch.Tensor]
    config: dict | None = None
    architectures: list[str] = field(default_factory=list)
    num_layers: int | None = None
    path: Path | None = None

    def tensor_names(self) -> list[str]:
        return list(self.state_dict)

    def has_tensor(self, name: str) -> bool:
        return name in self.state_dict

    def shape(self, name: str):
        return tuple(self.state_dict[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self.state_dict[name].dtype

    def get_tensor(self, name: str, device="cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
        tensor = self.state_dict[name]
        return tensor.to(device=device, dtype=dtype or tensor.dtype)


def merge_in_memory(recipe: Recipe | dict | str, models: Mapping[str, Mapping[str, torch.Tensor]], *,
                    seed: int = 0, device="auto", statistics: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
                    model_dirs: Mapping[str, str | Path] | None = None,
                    statistics_cache: str | Path | None = None, where: str | None = None,
                    backend: str = "auto") -> dict[str, torch.Tensor]:
    """Merge in-memory state dicts: ``models`` maps each model name used in the recipe to its state dict.

    Data-aware methods (RegMean) take precomputed ``statistics``, or compute them from ``model_dirs``
    (each input model's directory), cached in ``statistics_cache`` when given (``prepare_statistics``).
    """
    readers = {name: StateDictReader(sd) for name, sd in models.items()}
    plan = plan_merge(recipe, readers=readers, where=where)
    prepare_statistics(plan, cache_dir=statistics_cache, device=device, statistics=statistics, model_dirs=model_dirs)
    return {name: tensor for name, tensor in iter_merged(plan, device=device, seed=seed, backend=backend)}
