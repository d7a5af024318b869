"""lm-eval tasks scored on a live, in-memory model.

- Tasks are loaded once per Evaluator (TaskManager instances are shared process-wide) and their
  requests are built once; each call only clears the responses and runs the model again.
- The model is wrapped, not reloaded: `HFLM(pretrained=<model object>, tokenizer=..., batch_size=...)`.
  HFLM is built directly, never through `simple_evaluate`, so lm-eval's SQLite response cache
  (CachingLM, `use_cache`) and its pickled request cache (`cache_requests`) are never involved; the
  only reuse inside HFLM (`logits_cache`) groups requests of one call that share a context.
- Offline: custom tasks read local files (`dataset_path: json` + `dataset_kwargs.data_files`);
  HF_HUB_OFFLINE / HF_DATASETS_OFFLINE are set on `import evomerge`.

Per-call overhead is kept near the forward time: loglikelihood requests are tokenized once (with
HFLM's own `_encode_pair` rule) and fed to HFLM's `_loglikelihood_tokens`; a task's
`doc_to_choice` / `doc_to_target` (jinja templates lm-eval recompiles per call) are memoized per
doc, since `process_results` re-renders them for every doc on every call.

Our splits: with `split_names`, each of search/validation/test is a named split of the task's
dataset (e.g. `data_files: {search: a.jsonl, validation: b.jsonl, test: c.jsonl}`); the three are
checked for identical docs. Otherwise the task's evaluation docs (its test split, else its
validation split) are partitioned by `split` fractions and seed, like a native single file.
`limit` then takes the first `limit` docs of our split. A group name pools the docs of its leaf
tasks (micro-average). Few-shot examples come from wherever the lm-eval task config takes them.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .data import SPLITS, TaskError, check_disjoint, split_indices
from .metrics import LM_EVAL_REDUCERS, Metric

_MANAGERS: dict[tuple[str | None, bool], Any] = {}


def task_manager(include_dir: Path | None, with_defaults: bool):
    """A process-wide lm-eval TaskManager for `include_dir` (indexing the built-ins only if asked)."""
    from lm_eval.tasks import TaskManager

    key = (str(include_dir) if include_dir else None, with_defaults)
    if key not in _MANAGERS:
        _MANAGERS[key] = TaskManager(
            include_path=str(include_dir) if include_dir else None, include_defaults=with_defaults
        )
    return _MANAGERS[key]


def load_leaf_tasks(name: str, include_dir: Path | None) -> list:
    """Fresh lm-eval Task objects for a task or group name (custom directory first, then built-ins)."""
    manager = task_manager(include_dir, with_defaults=False) if include_dir else None
    if manager is None or name not in manager.all_tasks:
        manager = task_manager(include_dir, with_defaults=True)
    if name not in manager.all_tasks:
        where = f" (include_path {include_dir})" if include_dir else ""
        raise TaskError(f"unknown lm-eval task {name!r}{where}")
    try:
        tasks = manager.load([name])["tasks"]
    except (FileNotFoundError, ValueError, KeyError, OSError) as exc:
        raise TaskError(f"lm-eval task {name!r} failed to load: {exc}") from None
    return [tasks[k] for k in sorted(tasks)]


def _doc_key(doc) -> str:
    """A canonical string of an lm-eval doc, for overlap checks."""
    return json.dumps(doc, sort_keys=True, default=str)


def restrict_to_split(task, spec, split: str) -> None:
    """Point `task`'s evaluation docs at our `split` (named dataset split, or a seeded fraction)."""
    ds, label = task.dataset, f"lm-eval task {task.task_name!r}"
    if spec.split_names is not None:
        names = {s: getattr(spec.split_names, s) for s in SPLITS}
        missing = [n for n in names.values() if n not in ds]
        if missing:
            raise TaskError(f"{label}: dataset has no split {missing[0]!r}; it has {sorted(ds)}")
        docs = {s: [(f"{names[s]}[{i}]", _doc_key(d)) for i, d in enumerate(ds[names[s]])] for s in SPLITS}
        check_disjoint(docs, key=lambda e: e[1], where=lambda e: f"{label} doc {e[0]}")
        task.set_config("test_split", names[split])
        return
    base = task.config.test_split or task.config.validation_split
    if base is None or base not in ds:
        raise TaskError(f"{label} has no test or validation split to partition; give `split_names`")
    fr = spec.fractions
    idx = split_indices(len(ds[base]), fr.as_tuple(), fr.seed, what=label)
    rows = ds[base]
    docs = {s: [(f"{base}[{i}]", _doc_key(rows[i])) for i in idx[s]] for s in SPLITS}
    check_disjoint(docs, key=lambda e: e[1], where=lambda e: f"{label} doc {e[0]}")
    ds[base] = rows.select(idx[split])


class LmEvalSplit:
    """One lm-eval task (or group) restricted to one of our splits, requests built once.

    `run(lm, units)` scores the docs `units` (indices into this split's docs) and returns their
    per-doc metric items, in order.
    """

    def __init__(self, spec, split: str):
        self.spec = spec
        self.leaves = load_leaf_tasks(spec.task, spec.include_dir)
        self.width = 1  # stats columns of a vectorized metric
        self.units: list[tuple[Any, Any]] = []  # (leaf task, doc)
        self.instances: list[list] = []  # per unit, sorted by idx
        for leaf in self.leaves:
            restrict_to_split(leaf, spec, split)
            if spec.num_fewshot is not None:
                leaf.set_config("num_fewshot", spec.num_fewshot)
            leaf.set_fewshot_seed(seed=spec.fewshot_seed)
            leaf.build_all_requests(limit=spec.limit, rank=0, world_size=1, cache_requests=False)
            for method in ("doc_to_choice", "doc_to_target"):
                _memoize_per_doc(leaf, method)
            by_doc = defaultdict(list)
            for inst in leaf.instances:
                by_doc[inst.doc_id].append(inst)
            for doc_id, doc in leaf.doc_iterator(limit=spec.limit):
                self.units.append((leaf, doc))
                self.instances.append(sorted(by_doc[doc_id], key=lambda x: x.idx))
        if not self.units:
            raise TaskError(f"lm-eval task {spec.task!r}: split {split!r} has no docs")
        self.metric = self._resolve_metric()
        self._encoded: dict[int, tuple] = {}  # id(instance) -> HFLM-encoded loglikelihood request

    def __len__(self) -> int:
        return len(self.units)

    def _resolve_metric(self) -> Metric:
        """Our Metric for the spec's "name,filter", checked against the task's metrics and filters."""
        spec, leaf = self.spec, self.leaves[0]
        aggregations = leaf.aggregation()
        filters = [f.name for f in getattr(leaf, "_filters", [])] or ["none"]
        if spec.metric_name not in aggregations or spec.filter_name not in filters:
            have = ", ".join(f"{m},{f}" for f in filters for m in aggregations)
            raise TaskError(f"lm-eval task {spec.task!r} has no metric {spec.metric!r}; it has: {have}")
        hib = spec.higher_is_better
        if hib is None:
            hib = bool(leaf.higher_is_better().get(spec.metric_name, True))
        agg = aggregations[spec.metric_name]
        reducer = LM_EVAL_REDUCERS.get(getattr(agg, "__name__", ""))
        if reducer is not None:
            self.width = reducer[1]
            return Metric(spec.metric, hib, reducer[0])
        return Metric(spec.metric, hib, None, agg)

    def stats(self, items: list) -> Any:
        """Per-doc items as an (n, k) float array for vectorized metrics, else the raw list."""
        if self.metric.reduce is None:
            return items
        return np.asarray(items, dtype=np.float64).reshape(len(items), self.width)

    def run(self, lm, units: Sequence[int]) -> list:
        """Per-doc metric items of `units`, scoring the live model behind `lm` now."""
        insts = [inst for u in units for inst in self.instances[u]]
        for inst in insts:
            inst.resps = []
            inst.filtered_resps = {}
        by_type = defaultdict(list)
        for inst in insts:
            by_type[inst.request_type].extend([inst] * (inst.repeats or 1))
        for rtype, reqs in by_type.items():
            if rtype == "loglikelihood" and hasattr(lm, "_loglikelihood_tokens") and hasattr(lm, "_encode_pair"):
                resps = lm._loglikelihood_tokens([self._encode(lm, inst) for inst in reqs], disable_tqdm=True)
            else:
                resps = getattr(lm, rtype)(reqs, disable_tqdm=True)
            for resp, inst in zip(resps, reqs, strict=True):
                inst.resps.append(resp)
        per_leaf = defaultdict(list)
        for u in units:
            per_leaf[id(self.units[u][0])].extend(self.instances[u])
        for leaf in self.leaves:
            if per_leaf[id(leaf)]:
                for ensemble in getattr(leaf, "_filters", []):
                    ensemble.apply(per_leaf[id(leaf)])
        name, filt = self.spec.metric_name, self.spec.filter_name
        items = []
        for u in units:
            leaf, doc = self.units[u]
            results = leaf.process_results(doc, [inst.filtered_resps[filt] for inst in self.instances[u]])
            items.append(results[name])
        return items


    def _encode(self, lm, inst) -> tuple:
        """((context, continuation), context ids, continuation ids), as `TemplateLM.loglikelihood` encodes it."""
        hit = self._encoded.get(id(inst))
        if hit is None:
            context, continuation = inst.args
            if context == "":
                cont = lm.tok_encode(continuation, add_special_tokens=False)
                prefix = lm.prefix_token_id
                ctx, cont = ([prefix], cont) if prefix != cont[0] else (cont[:1], cont[1:])
            else:
                ctx, cont = lm._encode_pair(context, continuation)
            hit = self._encoded[id(inst)] = ((context, continuation), ctx, cont)
        return hit


def _memoize_per_doc(task, name: str) -> None:
    """Replace `task.<name>(doc)` by a per-doc memo (the result depends on the doc only)."""
    original = getattr(task, name)
    memo: dict[int, tuple] = {}

    def memoized(doc, *args, **kwargs):
        if args or kwargs:
            return original(doc, *args, **kwargs)
        hit = memo.get(id(doc))
        if hit is None or hit[0] is not doc:
            hit = memo[id(doc)] = (doc, original(doc))
        return hit[1]

    setattr(task, name, memoized)


def make_hflm(model, tokenizer, batch_size: int):
    """lm-eval's HF wrapper around the live model object (no reload, no response cache)."""
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    if getattr(lm.cache_hook, "dbdict", None) is not None:  # pragma: no cover - would be an lm-eval change
        raise RuntimeError("lm-eval attached a response cache to HFLM; refusing to reuse responses across weights")
    return lm
