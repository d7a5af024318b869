"""Registry of merge methods: names, parameters, input contracts and the tensor kernel behind each.

mergekit's 20 methods keep its 0.1.5 names, parameters, scopes and defaults
(``merge_methods/registry.py``); evomerge adds value ranges and rejects
unknown parameters (mergekit's config layer ignores them). evomerge's own
methods (``in_mergekit=False``: tsv_m, iso_c, iso_cts, wudi, regmean, fisher)
follow FusionBench 0.2.33's defaults; the data-aware ones name the calibration
statistics their kernel takes (``calibration``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from . import sparsify as sp
from .fields import RandomFields
from .linear import linear, passthrough
from .model_stock import model_stock
from .slerp import nuslerp, nuslerp_t, slerp
from .fisher import fisher_average, normalized_fisher
from .ram import ram
from .regmean import along_task_vector, regmean, weighted_mean, weighted_statistics
from .sce import sce
from .selective import arcee_fusion, nearswap
from .spherical_mean import karcher_mean, multislerp
from .subspace import subspace_task_vector, tsv_rank
from .wudi import wudi
from .task_arithmetic import VARIANTS, TaskArithmeticVariant, compute_dtype, generalized_task_arithmetic


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of a merge method: type, default (None = required), scope and inclusive bounds."""

    name: str
    type: type
    default: Any
    per_model: bool
    minimum: float | None = None
    maximum: float | None = None
    description: str = ""
    integer: bool = False  # a whole number (given as a number; the kernel takes int(value))

    @property
    def required(self) -> bool:
        return self.default is None

    def validate_value(self, value: Any) -> str | None:
        """Error message for a bad value (wrong type, not finite, out of range), or None."""
        if self.type is bool:
            if not isinstance(value, bool):
                return f"{self.name} must be true or false, got {value!r}"
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{self.name} must be a number, got {value!r}"
        if not math.isfinite(value):
            return f"{self.name} must be finite, got {value!r}"
        if self.integer and value != int(value):
            return f"{self.name} must be a whole number, got {value!r}"
        low, high = self.minimum, self.maximum
        if (low is not None and value < low) or (high is not None and value > high):
            if low is not None and high is not None:
                return f"{self.name} must be in [{low:g}, {high:g}], got {value:g}"
            if low is not None:
                return f"{self.name} must be >= {low:g}, got {value:g}"
            return f"{self.name} must be <= {high:g}, got {value:g}"
        return None


Kernel = Callable[..., torch.Tensor]
CrossCheck = Callable[[list[dict], dict], list[str]]


@dataclass(frozen=True)
class MergeMethod:
    """A merge method: its parameters, input contract and kernel.

    ``min_models``/``max_models`` count every input tensor including the base;
    ``min_others``/``max_others`` count the non-base inputs (nuslerp: exactly two).
    """

    name: str
    pretty_name: str
    reference: str
    params: tuple[ParamSpec, ...]
    requires_base: bool
    uses_base_as_input: bool
    min_models: int
    max_models: int | None
    kernel: Kernel = field(repr=False, compare=False, default=None)
    cross_check: CrossCheck | None = field(repr=False, compare=False, default=None)
    # the same rules over many parameter sets at once: (per-model value arrays, global value arrays
    # aligned with them) -> whether any set breaks them; for planners that check many rows per call
    cross_check_arrays: Callable[[dict, dict], bool] | None = field(repr=False, compare=False, default=None)
    needs_fields: bool = False
    min_others: int = 0
    max_others: int | None = None
    # a problem with one output tensor's shape for these inputs and global values (or None), checked
    # when a merge is planned, before any weight is read
    check_shape: Callable[[tuple[int, ...], int, dict], str | None] | None = field(
        repr=False, compare=False, default=None)
    in_mergekit: bool = True  # whether mergekit 0.1.5 has this method (else exported recipes say so)
    # the calibration statistics the kernel needs ("gram": RegMean's input Gram matrices), computed per
    # input model by evomerge.calibration and given to the kernel as ``statistics``; None: data-free
    calibration: str | None = None
    # turns each model's raw statistics (tensor name -> statistics, as computed and cached) into what
    # the kernel takes, once per merge (Fisher: normalization by the whole model's norm)
    prepare_statistics: Callable[[dict], dict] | None = field(repr=False, compare=False, default=None)

    # ------------------------------------------------------------------ parameters

    def param(self, name: str) -> ParamSpec:
        """The ParamSpec called ``name``; ValueError listing the known ones otherwise."""
        for spec in self.params:
            if spec.name == name:
                return spec
        known = ", ".join(p.name for p in self.params) or "none"
        raise ValueError(f"{self.name} has no parameter {name!r} (known: {known})")

    def has_param(self, name: str) -> bool:
        """Whether the method accepts a parameter called ``name``."""
        return any(p.name == name for p in self.params)

    def resolve(self, model_params: Sequence[Mapping[str, Any]], params: Mapping[str, Any]
                ) -> tuple[list[dict], dict]:
        """Fill defaults: per-model values from the model, else a global value of that name, else the default."""
        resolved_global = {p.name: params.get(p.name, p.default) for p in self.params if not p.per_model}
        resolved_models = []
        for values in model_params:
            resolved_models.append({
                p.name: values.get(p.name, params.get(p.name, p.default)) for p in self.params if p.per_model
            })
        return resolved_models, resolved_global

    def check_params(self, model_params: list[dict], params: dict) -> list[str]:
        """Every problem with these parameters, one message each (empty list = valid).

        Checks unknown names, global parameters set per model, missing required
        values, types and ranges, then the method's cross-parameter rules.
        ``model_params[i]`` belongs to input i of ``merge``'s ``tensors``.
        """
        errors: list[str] = []
        known = {p.name: p for p in self.params}
        for key, value in params.items():
            spec = known.get(key)
            if spec is None:
                errors.append(f"{self.name}: unknown parameter {key!r} (known: {', '.join(known) or 'none'})")
            elif value is not None and (message := spec.validate_value(value)):
                errors.append(f"{self.name}: {message}")
        for index, values in enumerate(model_params):
            for key, value in values.items():
                spec = known.get(key)
                if spec is None:
                    errors.append(f"{self.name}: model {index}: unknown parameter {key!r} "
                                  f"(known: {', '.join(known) or 'none'})")
                elif not spec.per_model:
                    errors.append(f"{self.name}: model {index}: {key!r} is a global parameter, "
                                  f"set it once for the merge, not per model")
                elif value is not None and (message := spec.validate_value(value)):
                    errors.append(f"{self.name}: model {index}: {message}")
        for spec in self.params:
            if not spec.required:
                continue
            if spec.per_model:
                for index, values in enumerate(model_params):
                    if values.get(spec.name, params.get(spec.name)) is None:
                        errors.append(f"{self.name}: model {index}: missing required parameter {spec.name!r}")
            elif params.get(spec.name) is None:
                errors.append(f"{self.name}: missing required parameter {spec.name!r}")
        if not errors and self.cross_check is not None:
            resolved_models, resolved_global = self.resolve(model_params, params)
            errors.extend(f"{self.name}: {m}" for m in self.cross_check(resolved_models, resolved_global))
        return errors

    def check_inputs(self, n_models: int, has_base: bool) -> list[str]:
        """Problems with the number of inputs: ``n_models`` counts every input including the base."""
        errors = []
        if self.requires_base and not has_base:
            errors.append(f"{self.name} requires a base_model")
        if n_models < self.min_models or (self.max_models is not None and n_models > self.max_models):
            if self.max_models == self.min_models:
                expected = f"exactly {self.min_models}"
            elif self.max_models is None:
                expected = f"at least {self.min_models}"
            else:
                expected = f"{self.min_models} to {self.max_models}"
            errors.append(f"{self.name} needs {expected} input models (base included), got {n_models}")
        others = n_models - int(has_base)
        if others < self.min_others or (self.max_others is not None and others > self.max_others):
            expected = (f"exactly {self.min_others}" if self.max_others == self.min_others
                        else f"at least {self.min_others}")
            noun = "model" if expected.endswith(" 1") else "models"
            errors.append(f"{self.name} needs {expected} {noun} besides the base, got {others}")
        return errors

    # ------------------------------------------------------------------ merging

    def merge(
        self,
        *,
        base: torch.Tensor | None,
        tensors: Sequence[torch.Tensor],
        model_params: Sequence[Mapping[str, Any]],
        params: Mapping[str, Any],
        fields: Sequence[torch.Tensor | None] | None = None,
        statistics: Sequence[torch.Tensor | None] | None = None,
    ) -> torch.Tensor:
        """Merge one tensor; result has the base's dtype (else the first input's).

        ``tensors`` are the non-base inputs in recipe order (all inputs for methods
        with ``uses_base_as_input``), ``model_params[i]`` their per-model values,
        ``params`` the global ones; ``fields[i]`` is the random field of input i
        (``random_field``) for DARE/DELLA; ``statistics[i]`` input i's calibration statistics for
        this tensor (methods with ``calibration``; None where the tensor has none). Computes in float32 (float64 for
        float64 inputs) and casts at the end. Raises ValueError on bad input.
        """
        tensors = list(tensors)
        if len(model_params) != len(tensors):
            raise ValueError(f"{self.name}: {len(tensors)} tensors but {len(model_params)} model_params entries")
        n_models = len(tensors) + int(base is not None and not self.uses_base_as_input)
        problems = self.check_inputs(n_models, base is not None and not self.uses_base_as_input)
        problems += self.check_params([dict(m) for m in model_params], dict(params))
        if problems:
            raise ValueError("; ".join(problems))
        reference = base if base is not None else tensors[0]
        for i, tensor in enumerate(tensors):
            if tensor.shape != reference.shape:
                raise ValueError(f"{self.name}: input {i} has shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(reference.shape)}")
        if self.needs_fields:
            drawn = isinstance(fields, RandomFields)  # drawn on access: none is missing
            if fields is None or len(fields) != len(tensors) or (not drawn and any(f is None for f in fields)):
                raise ValueError(f"{self.name}: needs one random field per input model (see random_field)")
        resolved_models, resolved_global = self.resolve(model_params, params)
        out_dtype = reference.dtype
        extra = {}
        if self.calibration is not None:
            if statistics is None or len(statistics) != len(tensors):
                raise ValueError(f"{self.name}: needs calibration statistics for each input model "
                                 f"(None where the tensor has none); see evomerge.calibration")
            extra["statistics"] = list(statistics)
        result = self.kernel(base=base, tensors=tensors, model_params=resolved_models,
                             params=resolved_global, fields=fields, **extra)
        return result.to(out_dtype)


# ---------------------------------------------------------------------------- parameter specs


def _weight(required: bool = True) -> ParamSpec:
    return ParamSpec("weight", float, None if required else 1.0, True,
                     description="Mixing weight of this model.")


def _bool(name: str, default: bool, description: str) -> ParamSpec:
    return ParamSpec(name, bool, default, False, description=description)


DENSITY = ParamSpec("density", float, 1.0, True, 0.0, 1.0, "Fraction of the task vector kept.")
GAMMA = ParamSpec("gamma", float, 0.01, True, 0.0, 1.0, "Fraction of largest-|δ| outliers removed (breadcrumbs).")
EPSILON = ParamSpec("epsilon", float, 0.15, True, 0.0, None,
                    "Half-width of DELLA's keep-probability range around density.")
LAMBDA = ParamSpec("lambda", float, 1.0, False, description="Scale of the merged task vector.")
INT8_MASK = _bool("int8_mask", False, "Accepted for mergekit compatibility; the mask is boolean either way.")


# ---------------------------------------------------------------------------- kernels


def _compute(tensors: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
    dtype = compute_dtype(*tensors)
    return [None if t is None else t.to(dtype) for t in tensors]


def _task_arithmetic_kernel(variant: TaskArithmeticVariant) -> Kernel:
    def kernel(*, base, tensors, model_params, params, fields):
        return generalized_task_arithmetic(
            variant, base, tensors,
            weights=[m["weight"] for m in model_params],
            densities=[m["density"] for m in model_params],
            gammas=[m.get("gamma", GAMMA.default) for m in model_params],
            epsilons=[m.get("epsilon", EPSILON.default) for m in model_params],
            normalize=params["normalize"], rescale=params["rescale"], lambda_=params["lambda"],
            fields=fields,
        )
    return kernel


def _della_cross_check(model_params: list[dict], params: dict) -> list[str]:
    errors = []
    for index, values in enumerate(model_params):
        message = sp.della_window_error(values["density"], values["epsilon"])
        if message:
            errors.append(f"model {index}: {message}")
    return errors


def _della_cross_check_arrays(model: dict, params: dict) -> bool:
    return sp.della_window_broken(model["density"], model["epsilon"])


def _linear_cross_check(model_params: list[dict], params: dict) -> list[str]:
    weights = [m["weight"] for m in model_params]
    if params["normalize"] and weights and sum(weights) == 0:
        return [f"weights {weights} sum to 0, cannot normalize"]
    return []


def _linear_kernel(*, base, tensors, model_params, params, fields):
    return linear(tensors, [m["weight"] for m in model_params], params["normalize"])


def _slerp_kernel(*, base, tensors, model_params, params, fields):
    return slerp(params["t"], base, tensors[0])


def _nuslerp_kernel(*, base, tensors, model_params, params, fields):
    t = nuslerp_t((model_params[0]["weight"], model_params[1]["weight"]))
    base_c, v0, v1 = _compute([base, *tensors])
    options = dict(row_wise=params["nuslerp_row_wise"], flatten=params["nuslerp_flatten"])
    if base_c is None:
        return nuslerp(t, v0, v1, **options)
    return base_c + nuslerp(t, v0 - base_c, v1 - base_c, **options)


def _model_stock_kernel(*, base, tensors, model_params, params, fields):
    base_c, *others = _compute([base, *tensors])
    return model_stock(base_c, others, params["filter_wise"])


def _passthrough_kernel(*, base, tensors, model_params, params, fields):
    return passthrough(tensors[0], model_params[0]["scale"])


def _subspace_kernel(name: str) -> Kernel:
    def kernel(*, base, tensors, model_params, params, fields):
        base_c, *others = _compute([base, *tensors])
        deltas = [(x - base_c) * m["weight"] for x, m in zip(others, model_params)]
        merged = subspace_task_vector(name, deltas, rank_fraction=params.get("rank_fraction", 0.0),
                                      common_space_fraction=params.get("common_space_fraction", 0.8))
        return base_c + params["lambda"] * merged
    return kernel


def _tsv_cross_check(model_params: list[dict], params: dict) -> list[str]:
    fraction, n = params["rank_fraction"], len(model_params)
    if n and fraction * n > 1 + 1e-12:
        return [f"rank_fraction {fraction:g} x {n} models exceeds 1: the task subspaces together cannot "
                f"hold more singular components than a matrix has (use at most {1 / n:.4g}, or 0 for 1/{n})"]
    return []


def _tsv_check_shape(shape: tuple[int, ...], n_models: int, params: dict) -> str | None:
    if len(shape) != 2 or n_models == 0:
        return None
    if tsv_rank(shape, n_models, params["rank_fraction"]) == 0:
        return (f"shape {list(shape)}: rank_fraction {params['rank_fraction']:g} keeps no singular component "
                f"of a {min(shape)}-rank matrix per model ({n_models} models); raise rank_fraction")
    return None


SUBSPACE_LAMBDA = ParamSpec("lambda", float, 1.0, False, description="Scale of the merged task vector (the papers' α).")
SUBSPACE_WEIGHT = ParamSpec("weight", float, 1.0, True, description="Scale of this model's task vector before merging.")


def _wudi_kernel(*, base, tensors, model_params, params, fields):
    base_c, *others = _compute([base, *tensors])
    deltas = [(x - base_c) * m["weight"] for x, m in zip(others, model_params)]
    return base_c + params["lambda"] * wudi(deltas, int(params["iterations"]), params["learning_rate"])


def _subspace_methods() -> list[MergeMethod]:
    common = dict(requires_base=True, uses_base_as_input=False, min_models=2, max_models=None, min_others=1,
                  in_mergekit=False)
    return [
        MergeMethod(
            name="tsv_m", pretty_name="TSV-Merge", reference="https://arxiv.org/abs/2412.00081",
            params=(SUBSPACE_WEIGHT, SUBSPACE_LAMBDA,
                    ParamSpec("rank_fraction", float, 0.0, False, 0.0, 1.0,
                              "Fraction of each task vector's singular components kept; 0 = 1/number of models.")),
            kernel=_subspace_kernel("tsv_m"), cross_check=_tsv_cross_check, check_shape=_tsv_check_shape, **common,
        ),
        MergeMethod(
            name="iso_c", pretty_name="Iso-C", reference="https://arxiv.org/abs/2502.04959",
            params=(SUBSPACE_WEIGHT, SUBSPACE_LAMBDA),
            kernel=_subspace_kernel("iso_c"), **common,
        ),
        MergeMethod(
            name="iso_cts", pretty_name="Iso-CTS", reference="https://arxiv.org/abs/2502.04959",
            params=(SUBSPACE_WEIGHT, SUBSPACE_LAMBDA,
                    ParamSpec("common_space_fraction", float, 0.8, False, 0.0, 1.0,
                              "Fraction of the rank given to the subspace common to all tasks.")),
            kernel=_subspace_kernel("iso_cts"), **common,
        ),
        MergeMethod(
            name="wudi", pretty_name="WUDI", reference="https://arxiv.org/abs/2503.08099",
            params=(SUBSPACE_WEIGHT, SUBSPACE_LAMBDA,
                    ParamSpec("iterations", float, 400, False, 0.0, None, "Adam steps per 2-D tensor.", True),
                    ParamSpec("learning_rate", float, 1e-5, False, 0.0, None, "Adam's learning rate.")),
            kernel=_wudi_kernel, **common,
        ),
    ]


def _regmean_kernel(*, base, tensors, model_params, params, fields, statistics):
    base_c, *weights = _compute([base, *tensors])
    importance = [m["weight"] for m in model_params]
    if sum(importance) <= 0:
        raise ValueError("regmean: the weights must not all be 0")
    present = any(s is not None for s in statistics) and weights[0].dim() == 2
    fitted = any(torch.is_tensor(w) for w in importance)  # a gradient fit (search/gradient_start.py): weighted form
    if not fitted and all(w == 1.0 for w in importance):  # the paper's merge, exactly
        merged = regmean(weights, statistics, params["alpha"])
    elif present:
        merged = regmean(weights, weighted_statistics(statistics, importance), params["alpha"])
    else:
        merged = weighted_mean(weights, importance)
    if not torch.is_tensor(params["lambda"]) and params["lambda"] == 1.0:
        return merged
    if base_c is None:
        raise ValueError("regmean: lambda other than 1 scales the merge's task vector and needs a base_model")
    return along_task_vector(base_c, merged, params["lambda"])


REGMEAN = MergeMethod(
    name="regmean", pretty_name="RegMean", reference="https://arxiv.org/abs/2212.09849",
    params=(ParamSpec("alpha", float, 0.6, False, 0.0, 1.0,
                      "Scale of the Gram matrices' off-diagonal entries (1 = exact least squares, 0 = diagonal); "
                      "default: FusionBench's GPT-2 setting."),
            ParamSpec("weight", float, 1.0, True, 0.0, None,
                      "Importance of this model: scales its Gram matrix (its weight in the mean where there is none)."),
            ParamSpec("lambda", float, 1.0, False, 0.0, None,
                      "Strength: base + lambda·(merge − base); other than 1 needs a base_model.")),
    requires_base=False, uses_base_as_input=False, min_models=2, max_models=None, min_others=2,
    kernel=_regmean_kernel, in_mergekit=False, calibration="gram",
)  # a base_model, if given, is read but not merged: RegMean combines the fine-tunes only


def _multislerp_kernel(*, base, tensors, model_params, params, fields):
    base_c, *others = _compute([base, *tensors])
    return multislerp(others, [m["weight"] for m in model_params], base_c,
                      normalize_weights=params["normalize_weights"], eps=params["eps"])


def _karcher_kernel(*, base, tensors, model_params, params, fields):
    others = _compute(tensors)
    return karcher_mean(others, [1.0 / len(others)] * len(others), max_iter=int(params["max_iter"]), tol=params["tol"])


def _sce_kernel(*, base, tensors, model_params, params, fields):
    base_c, *others = _compute([base, *tensors])
    return sce(base_c, others, params["select_topk"])


def _nearswap_kernel(*, base, tensors, model_params, params, fields):
    base_c, other = _compute([base, tensors[0]])
    return nearswap(params["t"], base_c, other)


def _arcee_fusion_kernel(*, base, tensors, model_params, params, fields):
    base_c, other = _compute([base, tensors[0]])
    return arcee_fusion(base_c, other)


def _ram_kernel(*, base, tensors, model_params, params, fields):
    base_c, *others = _compute([base, *tensors])
    return ram(base_c, others, params["epsilon"], r=params.get("r", 0.0), alpha=params.get("alpha", 0.0))


def _global(name: str, default: float, description: str, minimum: float | None = 0.0,
            maximum: float | None = None, integer: bool = False) -> ParamSpec:
    return ParamSpec(name, float, default, False, minimum, maximum, description, integer)


def _more_mergekit_methods() -> list[MergeMethod]:
    """mergekit 0.1.5's multislerp, karcher, sce, nearswap, arcee_fusion, ram and ramplus_tl."""
    ram_epsilon = _global("epsilon", 1e-5, "|δ| above which a model counts as updating an element.")
    return [
        MergeMethod(
            name="multislerp", pretty_name="Multi-SLERP",
            reference="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
            params=(_weight(), _bool("normalize_weights", True, "Divide the weights by their sum."),
                    _global("eps", 1e-8, "Added to norms for numerical stability.")),
            requires_base=False, uses_base_as_input=False, min_models=1, max_models=None, min_others=1,
            kernel=_multislerp_kernel,
        ),
        MergeMethod(
            name="karcher", pretty_name="Karcher Mean", reference="https://arxiv.org/abs/2603.04972",
            params=(_global("max_iter", 10, "Riemannian gradient steps at most.", integer=True),
                    _global("tol", 1e-5, "Stop when the tangent step is below this; smaller norms are ignored.")),
            requires_base=False, uses_base_as_input=True, min_models=1, max_models=None,
            kernel=_karcher_kernel,
        ),
        MergeMethod(
            name="sce", pretty_name="SCE", reference="https://arxiv.org/abs/2408.07990",
            params=(INT8_MASK, _global("select_topk", 1.0, "Fraction of elements kept, by variance across models.",
                                       maximum=1.0)),
            requires_base=True, uses_base_as_input=False, min_models=1, max_models=None,
            kernel=_sce_kernel,
        ),
        MergeMethod(
            name="nearswap", pretty_name="NearSwap",
            reference="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
            params=(ParamSpec("t", float, None, False, 0.0, None,
                              "Distance |a − b| up to which an element takes the other model's value."),),
            requires_base=True, uses_base_as_input=False, min_models=2, max_models=2, min_others=1, max_others=1,
            kernel=_nearswap_kernel,
        ),
        MergeMethod(
            name="arcee_fusion", pretty_name="Arcee Fusion", reference="https://arcee.ai",
            params=(), requires_base=True, uses_base_as_input=False, min_models=2, max_models=2,
            min_others=1, max_others=1, kernel=_arcee_fusion_kernel,
        ),
        MergeMethod(
            name="ram", pretty_name="Reinforced Agent Merging", reference="https://arxiv.org/abs/2601.13572",
            params=(ram_epsilon,), requires_base=True, uses_base_as_input=False, min_models=1, max_models=None,
            kernel=_ram_kernel,
        ),
        MergeMethod(
            name="ramplus_tl", pretty_name="Reinforced Agent Merging Plus (Tensor-Local)",
            reference="https://arxiv.org/abs/2601.13572",
            params=(_global("r", 0.1, "Boost of unique updates per unit of overlap share."),
                    _global("alpha", 0.2, "Cap on the overlap share (shared / unique active elements)."),
                    ram_epsilon),
            requires_base=True, uses_base_as_input=False, min_models=1, max_models=None,
            kernel=_ram_kernel,
        ),
    ]


def _fisher_kernel(*, base, tensors, model_params, params, fields, statistics):
    others = _compute(tensors)
    if any(s is None for s in statistics):
        raise ValueError("fisher: no Fisher information for this tensor in some input model")
    return fisher_average(others, statistics, [m["weight"] for m in model_params])


def _fisher_cross_check(model_params: list[dict], params: dict) -> list[str]:
    weights = [m["weight"] for m in model_params]
    return [f"weights {weights} sum to 0: nothing to average"] if weights and sum(weights) <= 0 else []


FISHER = MergeMethod(
    name="fisher", pretty_name="Fisher merging", reference="https://arxiv.org/abs/2111.09832",
    params=(ParamSpec("weight", float, 1.0, True, 0.0, None, "Scale of this model's Fisher information."),),
    requires_base=False, uses_base_as_input=False, min_models=2, max_models=None, min_others=2,
    kernel=_fisher_kernel, cross_check=_fisher_cross_check, in_mergekit=False, calibration="fisher",
    prepare_statistics=normalized_fisher,
)  # a base_model, if given, is read but not merged


def _task_arithmetic_method(variant: TaskArithmeticVariant) -> MergeMethod:
    params = [
        INT8_MASK,
        _bool("normalize", variant.default_normalize, "Divide by the (agreeing) weight sum."),
        _bool("rescale", variant.default_rescale, "Rescale each sparsified task vector to its original L1 norm."),
        LAMBDA,
        _weight(),
        DENSITY,
    ]
    if variant.sparsification == "magnitude_outliers":
        params.append(GAMMA)
    if variant.sparsification == "della_magprune":
        params.append(EPSILON)
    return MergeMethod(
        name=variant.name, pretty_name=variant.pretty_name, reference=variant.reference,
        params=tuple(params), requires_base=True, uses_base_as_input=False,
        min_models=1, max_models=None,
        kernel=_task_arithmetic_kernel(variant),
        cross_check=_della_cross_check if variant.sparsification == "della_magprune" else None,
        cross_check_arrays=_della_cross_check_arrays if variant.sparsification == "della_magprune" else None,
        needs_fields=variant.sparsification in ("random", "della_magprune"),
    )


def _build_methods() -> dict[str, MergeMethod]:
    methods = [
        MergeMethod(
            name="linear", pretty_name="Linear", reference="https://arxiv.org/abs/2203.05482",
            params=(_weight(), _bool("normalize", True, "Divide by the weight sum.")),
            requires_base=False, uses_base_as_input=True, min_models=1, max_models=None,
            kernel=_linear_kernel, cross_check=_linear_cross_check,
        ),
        MergeMethod(
            name="slerp", pretty_name="SLERP", reference="https://en.wikipedia.org/wiki/Slerp",
            params=(ParamSpec("t", float, None, False, 0.0, 1.0, "Interpolation factor: 0 = base, 1 = other."),),
            requires_base=True, uses_base_as_input=False, min_models=2, max_models=2,
            kernel=_slerp_kernel, min_others=1, max_others=1,
        ),
        MergeMethod(
            name="nuslerp", pretty_name="NuSLERP", reference="https://github.com/arcee-ai/mergekit",
            params=(
                _weight(),
                _bool("nuslerp_row_wise", False, "Slerp column vectors (mergekit's dim=0) instead of rows."),
                _bool("nuslerp_flatten", True, "Slerp the flattened tensor as one vector."),
            ),
            requires_base=False, uses_base_as_input=False, min_models=2, max_models=3,
            kernel=_nuslerp_kernel, min_others=2, max_others=2,
        ),
        MergeMethod(
            name="model_stock", pretty_name="Model Stock", reference="https://arxiv.org/abs/2403.19522",
            params=(_bool("filter_wise", False, "One interpolation factor per row instead of per tensor."),),
            requires_base=True, uses_base_as_input=False, min_models=3, max_models=None,
            kernel=_model_stock_kernel, min_others=2,
        ),
        MergeMethod(
            name="passthrough", pretty_name="Passthrough", reference="https://github.com/arcee-ai/mergekit",
            params=(ParamSpec("scale", float, 1.0, True, description="Multiply the tensor by this factor."),),
            requires_base=False, uses_base_as_input=True, min_models=1, max_models=1,
            kernel=_passthrough_kernel,
        ),
    ]
    methods += [_task_arithmetic_method(variant) for variant in VARIANTS.values()]
    methods += _more_mergekit_methods()
    methods += _subspace_methods()
    methods += [REGMEAN, FISHER]
    return {method.name: method for method in methods}


METHODS: dict[str, MergeMethod] = _build_methods()


def get_method(name: str) -> MergeMethod:
    """The registered method called ``name``; ValueError listing the known names otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown merge method {name!r}; known: {', '.join(sorted(METHODS))}") from None
