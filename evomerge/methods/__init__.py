"""Merge-method kernels: pure, device-agnostic tensor functions with mergekit 0.1.5 semantics.

Layers, bottom up: ``fields`` (reproducible randomness), ``sparsify`` (which
elements of a task vector survive), ``consensus`` (TIES sign election and
disjoint merge), the methods (``task_arithmetic``, ``linear``, ``slerp``,
``model_stock``, and the data-free subspace methods in ``subspace``, ``regmean``), and ``registry`` (names, parameters, validation, ``merge``).
"""

from .consensus import agreement_mask, disjoint_merge, elect_sign, weighted_sum
from .fields import RandomFields, field_seed, random_field
from .linear import linear, passthrough
from .model_stock import model_stock
from .registry import METHODS, MergeMethod, ParamSpec, get_method
from .fisher import fisher_average, model_fisher_norm, normalized_fisher
from .ram import ram, ram_masks
from .regmean import reduce_off_diagonal, regmean, regmean_diagonal, regmean_full
from .sce import sce, sce_select, sce_weights
from .selective import arcee_fusion, fusion_importance, nearswap, upper_fence
from .slerp import nuslerp, nuslerp_t, slerp
from .spherical_mean import karcher_mean, multislerp
from .wudi import wudi, wudi_loss
from .subspace import (
    iso_c,
    iso_cts,
    iso_cts_dims,
    isotropic,
    mean_task_vector,
    polar_factor,
    subspace_task_vector,
    top_singular,
    tsv_merge,
    tsv_rank,
)
from .sparsify import (
    apply_mask,
    breadcrumbs_mask,
    breadcrumbs_window,
    check_della_window,
    dare_mask,
    della_keep_probability,
    della_probability_table,
    della_mask,
    della_ranks,
    della_window_error,
    magnitude_keep_count,
    magnitude_mask,
    rank_window_mask,
    select_values,
    sort_values,
    sorted_magnitudes,
    flat_ranks,
    sparsify,
    stable_order,
)
from .task_arithmetic import (
    VARIANTS,
    TaskArithmeticVariant,
    combine_task_vectors,
    compute_dtype,
    generalized_task_arithmetic,
    merge_task_vectors,
)

__all__ = [
    # registry
    "METHODS", "MergeMethod", "ParamSpec", "get_method",
    # randomness
    "random_field", "field_seed", "RandomFields",
    # task-arithmetic family
    "VARIANTS", "TaskArithmeticVariant", "compute_dtype", "generalized_task_arithmetic", "merge_task_vectors",
    "combine_task_vectors",
    # sparsifiers and order statistics
    "sparsify", "apply_mask", "magnitude_mask", "magnitude_keep_count", "breadcrumbs_mask", "breadcrumbs_window",
    "dare_mask", "della_mask", "della_ranks", "della_keep_probability", "della_probability_table",
    "della_window_error", "check_della_window", "rank_window_mask", "select_values", "sort_values",
    "sorted_magnitudes", "flat_ranks", "stable_order",
    # consensus
    "elect_sign", "agreement_mask", "disjoint_merge", "weighted_sum",
    # other methods
    "linear", "passthrough", "slerp", "nuslerp", "nuslerp_t", "model_stock",
    "multislerp", "karcher_mean", "sce", "sce_select", "sce_weights", "nearswap", "arcee_fusion",
    "fusion_importance", "upper_fence", "ram", "ram_masks",
    # data-free subspace methods
    "subspace_task_vector", "tsv_merge", "tsv_rank", "iso_c", "iso_cts", "iso_cts_dims", "isotropic",
    "polar_factor", "top_singular", "mean_task_vector", "wudi", "wudi_loss",
    # data-aware methods
    "regmean", "regmean_full", "regmean_diagonal", "reduce_off_diagonal",
    "fisher_average", "normalized_fisher", "model_fisher_norm",
]
