"""Merge recipes: mergekit's YAML format, validated strictly.

A :class:`Recipe` is the one description of a merge everywhere in evomerge: what ``evomerge merge``
reads, what each search trial stores and what a search exports. The YAML is mergekit's
(``models:`` or ``slices:``, ``base_model``, ``merge_method``, ``parameters``, ``dtype``,
``out_dtype``, ``tokenizer_source``), so recipes travel both ways. Unlike mergekit, unknown keys,
unknown methods, misplaced parameters and out-of-range values are errors that name the file and
the key, raised before any weight is read.

Parameter values follow mergekit 0.1.5 (``mergekit/config.py``):
- a scalar;
- a *gradient*: a list of numbers interpolated piecewise-linearly at ``t`` (``t = i/(L-1)`` for
  layer ``i`` of a slice of ``L`` layers, ``t = 0`` for embeddings, final norm and lm_head);
- *conditional* values: ``[{filter: mlp, value: ...}, {value: ...}]``, the first entry whose filter
  is a substring of the tensor name wins (no filter or ``*`` matches everything);
- precedence: per-model (or per-slice-source) > slice > global.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from evomerge.calibration import Calibration
from evomerge.methods import METHODS, MergeMethod, get_method
from evomerge.yamlfile import parse_yaml_mapping, read_yaml_mapping

Scalar = Union[bool, int, float, str]
ScalarOrGradient = Union[Scalar, list[Scalar]]


class RecipeError(ValueError):
    """A recipe that cannot be merged; the message names the file, the key and what was expected."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @field_validator("parameters", mode="before", check_fields=False)
    @classmethod
    def _settings(cls, v):
        return _coerce_parameters(v)


class Conditional(_Strict):
    """One entry of a conditional parameter: ``value`` applies to tensors whose name contains ``filter``."""

    filter: str | None = None
    value: ScalarOrGradient


ParameterSetting = Union[ScalarOrGradient, Conditional, list[Conditional]]


def _is_scalar(v: Any) -> bool:
    return isinstance(v, (bool, int, float, str))


def coerce_setting(value: Any, key: str) -> ParameterSetting:
    """A raw YAML parameter value as a setting: scalar, gradient, or conditional entries.

    Raises ValueError with a short message naming ``key`` when the shape is none of these.
    """
    def conditional(entry: Any, where: str) -> Conditional:
        if isinstance(entry, Conditional):
            return entry
        unknown = sorted(set(entry) - {"filter", "value"})
        if unknown:
            raise ValueError(f"{where}: unknown key '{unknown[0]}' in a conditional entry"
                             + did_you_mean(unknown[0], {"filter", "value"}) + "; expected {filter, value}")
        if "value" not in entry:
            raise ValueError(f"{where}: a conditional entry needs 'value'")
        inner = entry["value"]
        if not (_is_scalar(inner) or (isinstance(inner, list) and inner and all(_is_scalar(x) for x in inner))):
            raise ValueError(f"{where}.value: expected a number or a list of numbers, got {inner!r}")
        if entry.get("filter") is not None and not isinstance(entry["filter"], str):
            raise ValueError(f"{where}.filter: expected a string, got {entry['filter']!r}")
        return Conditional(filter=entry.get("filter"), value=inner)

    if _is_scalar(value) or isinstance(value, Conditional):
        return value
    if isinstance(value, dict):
        return conditional(value, key)
    if isinstance(value, list):
        if value and all(_is_scalar(x) for x in value):
            return list(value)
        if value and all(isinstance(x, (dict, Conditional)) for x in value):
            return [conditional(x, f"{key}[{i}]") for i, x in enumerate(value)]
        if not value:
            raise ValueError(f"{key}: empty list")
        raise ValueError(f"{key}: a list must hold only numbers (a gradient) or only {{filter, value}} entries")
    raise ValueError(f"{key}: expected a number, a list of numbers or {{filter, value}} entries, got {value!r}")


def _coerce_parameters(params: Any) -> Any:
    if params is None or not isinstance(params, dict):
        return params
    return {key: coerce_setting(value, str(key)) for key, value in params.items()}


Parameters = dict[str, Any]  # values checked and converted by coerce_setting


class ModelEntry(_Strict):
    """An input model of a ``models:`` recipe, with its per-model parameters."""

    model: str
    parameters: Parameters | None = None


class SliceSource(_Strict):
    """A contiguous run of layers ``[start, end)`` taken from one model."""

    model: str
    layer_range: tuple[int, int]
    parameters: Parameters | None = None


class Slice(_Strict):
    """One output slice: its layers are merged from the sources, layer by layer."""

    sources: list[SliceSource] = Field(min_length=1)
    base_model: str | None = None
    parameters: Parameters | None = None


DTypeName = Literal["float32", "float16", "bfloat16", "float64"]


class Recipe(_Strict):
    """A merge recipe in mergekit's format (exactly one of ``models`` or ``slices``)."""

    merge_method: str
    models: list[ModelEntry] | None = None
    slices: list[Slice] | None = None
    base_model: str | None = None
    parameters: Parameters | None = None
    dtype: DTypeName | None = None
    out_dtype: DTypeName | None = None
    tokenizer_source: str | None = None
    chat_template: str | None = None
    name: str | None = None
    calibration: Calibration | None = None  # data-aware methods only (evomerge.calibration)
    _structure: tuple | None = PrivateAttr(default=None)

    @field_validator("dtype", "out_dtype", mode="before")
    @classmethod
    def _strip_torch_prefix(cls, v):
        return v[len("torch.") :] if isinstance(v, str) and v.startswith("torch.") else v

    # ----- convenience -------------------------------------------------------------------------
    @property
    def method(self) -> MergeMethod:
        return get_method(self.merge_method)

    def stamp_structure(self, signature: str) -> "Recipe":
        """Record the structure signature (``backends.fast_plan.structure_signature``) its producer knows it has.

        The stamp lapses when ``models``, ``slices`` or ``parameters`` is replaced (``model_copy``
        with an update); it is for producers whose outputs share one structure by construction.
        """
        self._structure = (signature, id(self.models), id(self.slices), id(self.parameters))
        return self

    def stamped_structure(self) -> str | None:
        """The signature given to ``stamp_structure``, if still valid."""
        stamp = self.__pydantic_private__["_structure"]  # (pydantic's attribute route costs microseconds)
        if stamp is None or stamp[1:] != (id(self.models), id(self.slices), id(self.parameters)):
            return None
        return stamp[0]

    def referenced_models(self) -> list[str]:
        """Every model path the recipe names, base first, without duplicates, in order."""
        seen: dict[str, None] = {}
        if self.base_model:
            seen[self.base_model] = None
        for m in self.models or []:
            seen[m.model] = None
        for s in self.slices or []:
            if s.base_model:
                seen[s.base_model] = None
            for src in s.sources:
                seen[src.model] = None
        return list(seen)

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain data (None values dropped), in mergekit key order."""
        return self.model_dump(mode="json", exclude_none=True)

    def to_yaml(self) -> str:
        """mergekit-compatible YAML (numeric lists in flow style, like mergekit writes).

        A method mergekit 0.1.5 does not have gets a comment at the top saying so.
        """
        text = yaml.dump(self.to_dict(), Dumper=_RecipeDumper, sort_keys=False).rstrip() + "\n"
        note = mergekit_note(self.merge_method)
        return f"# {note}\n{text}" if note else text

    def with_paths(self, mapping: dict[str, str]) -> "Recipe":
        """A copy with model paths replaced through ``mapping`` (paths not in it unchanged)."""
        data = self.to_dict()

        def sub(p):
            return mapping.get(p, p)

        if data.get("base_model"):
            data["base_model"] = sub(data["base_model"])
        if data.get("tokenizer_source") not in (None, "base", "union"):
            data["tokenizer_source"] = sub(data["tokenizer_source"])
        for m in data.get("models") or []:
            m["model"] = sub(m["model"])
        for s in data.get("slices") or []:
            if s.get("base_model"):
                s["base_model"] = sub(s["base_model"])
            for src in s["sources"]:
                src["model"] = sub(src["model"])
        if (data.get("calibration") or {}).get("model_tasks"):
            data["calibration"]["model_tasks"] = {sub(m): t for m, t in data["calibration"]["model_tasks"].items()}
        return Recipe.model_validate(data)


def mergekit_note(method_name: str) -> str | None:
    """One line telling users that mergekit cannot run a recipe of this method (None for mergekit's own)."""
    method = METHODS.get(method_name)
    if method is None or method.in_mergekit:
        return None
    return (f"merge_method {method.name} ({method.pretty_name}) is an evomerge method: mergekit cannot run this "
            f"recipe; merge it with `evomerge merge`.")


class _RecipeDumper(yaml.SafeDumper):
    def represent_list(self, data):
        flow = all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in data)
        return self.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_RecipeDumper.add_representer(list, _RecipeDumper.represent_list)


# ------------------------------------------------------------------------------------------------
# Loading and static validation (no weights, no model files touched)
# ------------------------------------------------------------------------------------------------
def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def pydantic_message(err: ValidationError, where: str) -> str:
    """A pydantic validation error as one message per problem, each naming its key path under ``where``."""
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and ("[" in p or p in _UNION_TAGS)))
        key = _loc(loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"{where}: unknown key '{key}'" + did_you_mean(str(loc[-1])))
        elif e["type"] == "value_error":
            lines.append(f"{where}: {key}.{e['msg'].removeprefix('Value error, ')}")
        elif e["type"] == "missing":
            lines.append(f"{where}: missing required key '{key}'")
        else:
            lines.append(f"{where}: {key}: {e['msg']} (got {e.get('input')!r})")
    # union members produce one error each; keep the message short and unique
    return "\n".join(dict.fromkeys(lines))


pydantic_message = pydantic_message  # public name for the other config loaders

_UNION_TAGS = {"bool", "int", "float", "str", "list[union[bool,int,float,str]]", "Conditional",
               "list[Conditional]", "tuple[int, int]"}
_KNOWN_KEYS = {"merge_method", "models", "slices", "base_model", "parameters", "dtype", "out_dtype",
               "tokenizer_source", "chat_template", "name", "model", "layer_range", "sources", "filter",
               "value", "calibration", "tasks", "split", "examples", "max_length", "gram", "model_tasks"}


def did_you_mean(word: str, vocabulary=None) -> str:
    """The suffix " (did you mean 'X'?)" for the closest known word (difflib), or an empty string."""
    import difflib

    vocab = vocabulary or _KNOWN_KEYS
    close = difflib.get_close_matches(word, sorted(vocab), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def load_recipe(source: str | Path | dict, *, where: str | None = None) -> Recipe:
    """Parse and statically validate a recipe from a YAML file, YAML text or a dict.

    Raises :class:`RecipeError` naming the file and key on any problem. Checks here need no
    model files; :func:`evomerge.engine.plan_merge` checks the models themselves (headers only).
    """
    if isinstance(source, dict):
        data, where = source, where or "<recipe>"
    else:
        path = Path(source)
        is_file = "\n" not in str(source) and (path.suffix in (".yaml", ".yml", ".json") or path.exists())
        where = where or (str(path) if is_file else "<recipe>")
        if is_file:
            data = read_yaml_mapping(path, where=where, what="recipe", error=RecipeError)
        else:
            data = parse_yaml_mapping(str(source), where=where, what="recipe", error=RecipeError)
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: a recipe must be a mapping, got {type(data).__name__}")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(pydantic_message(e, where)) from None
    problems = validate_recipe(recipe)
    if problems:
        raise RecipeError("\n".join(f"{where}: {p}" for p in problems))
    return recipe


def validate_recipe(recipe: Recipe) -> list[str]:
    """Static checks of a parsed recipe: method, structure, parameter names, scopes and ranges."""
    problems: list[str] = []
    if recipe.merge_method not in METHODS:
        return [f"merge_method: unknown method '{recipe.merge_method}'"
                + did_you_mean(recipe.merge_method, METHODS) + f"; known methods: {', '.join(sorted(METHODS))}"]
    method = recipe.method
    if (recipe.models is None) == (recipe.slices is None):
        problems.append("exactly one of 'models' or 'slices' must be given")
        return problems
    if recipe.models is not None and not recipe.models:
        problems.append("models: the list is empty")
    for i, m in enumerate(recipe.models or []):
        first = next(j for j, other in enumerate(recipe.models) if other.model == m.model)
        if first != i:
            problems.append(f"models[{i}]: '{m.model}' is already models[{first}]; list each model once")
    slices_have_bases = recipe.slices is not None and all(s.base_model for s in recipe.slices)
    if method.requires_base and not recipe.base_model and not slices_have_bases:
        problems.append(f"base_model: method '{method.name}' requires a base model")
    if recipe.tokenizer_source not in (None, "base", "union") and recipe.tokenizer_source not in recipe.referenced_models():
        # a path not among the inputs is allowed (mergekit allows any model); it must simply exist
        pass
    if method.calibration is not None and recipe.calibration is None:
        problems.append(f"calibration: method '{method.name}' needs calibration data; add e.g. "
                        f"calibration: {{tasks: tasks.yaml, split: search, examples: 64}}")
    if method.calibration is None and recipe.calibration is not None:
        problems.append(f"calibration: method '{method.name}' uses no data; remove the calibration block")
    if recipe.tokenizer_source == "union":
        problems.append("tokenizer_source: 'union' (vocabulary merging) is not supported; use 'base' or a model path")

    _check_params(recipe.parameters, method, "parameters", per_model_allowed=True, problems=problems)
    for i, m in enumerate(recipe.models or []):
        _check_params(m.parameters, method, f"models[{i}].parameters", per_model_allowed=True,
                      global_allowed=False, problems=problems)
    for si, s in enumerate(recipe.slices or []):
        _check_params(s.parameters, method, f"slices[{si}].parameters", per_model_allowed=True,
                      problems=problems)
        lengths = set()
        for j, src in enumerate(s.sources):
            start, end = src.layer_range
            if start < 0 or end <= start:
                problems.append(f"slices[{si}].sources[{j}].layer_range: expected [start, end) with "
                                f"0 <= start < end, got [{start}, {end}]")
            lengths.add(end - start)
            _check_params(src.parameters, method, f"slices[{si}].sources[{j}].parameters",
                          per_model_allowed=True, global_allowed=False, problems=problems)
        if len(lengths) > 1:
            problems.append(f"slices[{si}].sources: every source of a slice must span the same number "
                            f"of layers, got {sorted(lengths)}")
    problems.extend(_check_input_counts(recipe, method))
    return problems


def _check_input_counts(recipe: Recipe, method: MergeMethod) -> list[str]:
    """Number of inputs per output tensor against the method's limits (base counted when it is an input)."""
    groups: list[tuple[str, list[str], str | None]] = []
    if recipe.models is not None:
        groups.append(("models", [m.model for m in recipe.models], recipe.base_model))
    for si, s in enumerate(recipe.slices or []):
        groups.append((f"slices[{si}].sources", [src.model for src in s.sources], s.base_model or recipe.base_model))
    problems = []
    for where, models, base in groups:
        inputs = list(dict.fromkeys(models))
        if base and method.requires_base and base not in inputs:
            inputs.append(base)
        n = len(inputs)
        if n < method.min_models or (method.max_models is not None and n > method.max_models):
            expected = (f"exactly {method.min_models}" if method.max_models == method.min_models
                        else f"at least {method.min_models}" + (f" and at most {method.max_models}"
                                                                  if method.max_models else ""))
            problems.append(f"{where}: method '{method.name}' takes {expected} input model(s)"
                            f"{' including the base' if method.requires_base else ''}, got {n}")
    return problems


def _iter_scalars(setting: Any):
    """Yield every scalar inside a parameter setting (gradients and conditionals included)."""
    if isinstance(setting, Conditional):
        yield from _iter_scalars(setting.value)
    elif isinstance(setting, list):
        for s in setting:
            yield from _iter_scalars(s)
    else:
        yield setting


def _check_params(params: Parameters | None, method: MergeMethod, where: str, *, per_model_allowed: bool,
                  problems: list[str], global_allowed: bool = True) -> None:
    """Names known to the method, in a scope where mergekit reads them, every value in range."""
    if not params:
        return
    names = {p.name for p in method.params}
    for key, setting in params.items():
        if key not in names:
            problems.append(f"{where}.{key}: unknown parameter for method '{method.name}'"
                            + did_you_mean(key, names) + f"; it takes: {', '.join(sorted(names)) or 'no parameters'}")
            continue
        spec = method.param(key)
        if not spec.per_model and not global_allowed:
            problems.append(f"{where}.{key}: '{key}' applies to the whole merge, not to one model; set it under "
                            f"the top-level or slice 'parameters'")
            continue
        if isinstance(setting, list) and any(isinstance(s, Conditional) for s in setting) and not all(
                isinstance(s, Conditional) for s in setting):
            problems.append(f"{where}.{key}: mixes conditional entries ({{filter, value}}) with plain values")
            continue
        if isinstance(setting, list) and not setting:
            problems.append(f"{where}.{key}: empty list")
            continue
        for value in _iter_scalars(setting):
            msg = validate_scalar(spec, value)
            if msg:
                problems.append(f"{where}.{key}: {msg}")
                break


def validate_scalar(spec, value) -> str | None:
    """The method's own check of one value (type, finiteness, range): a message, or None."""
    return spec.validate_value(value)


# ------------------------------------------------------------------------------------------------
# Resolution of parameter values for one tensor (mergekit's ConfigReader + evaluate_setting)
# ------------------------------------------------------------------------------------------------
MISSING = object()  # what ``resolve_value`` returns when no scope sets the parameter


def evaluate_setting(setting: Any, tensor_name: str, t: float) -> Any:
    """The value of one setting for ``tensor_name`` at gradient position ``t`` (None: no match).

    Gradients interpolate linearly between neighbouring list entries at ``t·(len−1)``; boolean
    gradients pick the entry at ``int(t·(len−1))``; conditionals take the first matching filter.
    """
    if isinstance(setting, Conditional):
        setting = [setting]
    if isinstance(setting, list):
        if not setting:
            return None
        if isinstance(setting[0], Conditional):
            for cond in setting:
                if cond.filter is None or cond.filter == "*" or cond.filter in tensor_name:
                    return evaluate_setting(cond.value, tensor_name, t)
            return None
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting)
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        if not numeric:
            return setting[i0]
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    return setting


def resolve_value(sources: list[Parameters | None], name: str, tensor_name: str, t: float) -> Any:
    """First non-None value of ``name`` over ``sources`` (highest precedence first), else MISSING."""
    return resolve_source(sources, name, tensor_name, t)[1]


def resolve_source(sources: list[Parameters | None], name: str, tensor_name: str, t: float
                   ) -> tuple[int | None, Any]:
    """``resolve_value`` and the index in ``sources`` of the scope it came from ((None, MISSING) if none)."""
    for index, scope in enumerate(sources):
        if scope and name in scope:
            value = evaluate_setting(scope[name], tensor_name, t)
            if value is not None:
                return index, value
    return None, MISSING


def coerce(spec, value):
    """Cast a resolved value to the parameter's type (mergekit's ParameterSpec.validate)."""
    return bool(value) if spec.type is bool else float(value)
