"""Merge-method kernels: pure, device-agnostic tensor functions with mergekit 0.1.5 semantics.

Layers, bottom up: ``fields`` (reproducible randomness), ``sparsify`` (which
elements of a task vector survive), ``consensus`` (TIES sign election and
disjoint merge), the methods (``task_arithmetic``, ``linear``, ``slerp``,
``model_stock``), and ``registry`` (names, parameters, validation, ``merge``).
"""

from .consensus import agreement_mask, disjoint_merge, elect_sign, weighted_sum
from .fields import field_seed, random_field
from .linear import linear, passthrough
from .model_stock import model_stock
from .registry import METHODS, MergeMethod, ParamSpec, get_method
from .slerp import nuslerp, nuslerp_t, slerp
from .sparsify import (
    apply_mask,
    breadcrumbs_mask,
    breadcrumbs_window,
    check_della_window,
    dare_mask,
    della_keep_probability,
    della_mask,
    della_ranks,
    della_window_error,
    magnitude_keep_count,
    magnitude_mask,
    rank_window_mask,
    sorted_magnitudes,
    sparsify,
)
from .task_arithmetic import (
    VARIANTS,
    TaskArithmeticVariant,
    combine_task_vectors,
    compute_dtype,
    generalized_task_arithmetic,
)

__all__ = [
    "METHODS", "MergeMethod", "ParamSpec", "get_method", "random_field", "field_seed",
    "VARIANTS", "TaskArithmeticVariant", "combine_task_vectors", "compute_dtype", "generalized_task_arithmetic",
    "apply_mask", "breadcrumbs_mask", "breadcrumbs_window", "check_della_window", "dare_mask",
    "della_keep_probability", "della_mask", "della_ranks", "della_window_error", "magnitude_keep_count",
    "magnitude_mask", "rank_window_mask", "sorted_magnitudes", "sparsify",
    "agreement_mask", "disjoint_merge", "elect_sign", "weighted_sum",
    "linear", "passthrough", "model_stock", "nuslerp", "nuslerp_t", "slerp",
]
