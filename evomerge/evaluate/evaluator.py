"""The Evaluator: score a live model on one split of a set of tasks, whole or chunk by chunk.

Everything that does not depend on the weights is done once and cached: tokenization (at
construction), length-sorted padded batches per chunk plan and device (first call), lm-eval task
loading and request building (construction), the HFLM wrapper (first call per model object).
A call runs forward passes, cheap bookkeeping and, if enabled, a vectorized bootstrap.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import torch

from .data import SPLITS, TaskError
from .lm_eval_adapter import LmEvalSplit, make_hflm
from .metrics import (
    NATIVE_METRICS,
    PROXY_METRICS,
    Metric,
    bootstrap_values,
    normalize,
    percentile_ci,
    to_score,
    truncate_at_stop,
    weighted_mean,
)
from .scoring import (
    Batch,
    build_loglik_batches,
    build_prompt_batches,
    continuation_logprobs,
    decode_continuation,
    encode_pairs,
    encode_prompts,
    greedy_generate,
    model_max_length,
    pad_token_id,
    stop_token_ids,
)
from .spec import GenerateTask, LmEvalTask, LoglikelihoodTask, MultipleChoiceTask, load_tasks


@dataclass
class TaskResult:
    """One task's outcome: metric value, its aggregate score (higher is better) and a 95% CI."""

    name: str
    kind: str
    metric: str
    value: float
    score: float
    weight: float
    higher_is_better: bool
    n_examples: int
    ci: tuple[float, float] | None = None


@dataclass
class EvalResult:
    """Weighted aggregate of per-task scores, per-task metric values and bootstrap 95% CIs."""

    aggregate: float
    per_task: dict[str, float]
    ci: tuple[float, float] | None
    n_examples: dict[str, int]
    tasks: dict[str, TaskResult] = field(default_factory=dict)
    split: str = "search"
    seconds: float = 0.0

    def to_dict(self) -> dict:
        """A JSON-ready dict of the result."""
        return asdict(self)


class RunningScore(NamedTuple):
    """Running result after a chunk: examples scored so far and the aggregate over them."""

    examples_seen: int
    aggregate: float


@dataclass
class _Task:
    """Per-task state: spec, metric, size and the kind-specific cached encodings."""

    spec: object
    metric: Metric
    n: int
    width: int = 1  # stats columns (vectorized metrics)
    req_start: np.ndarray | None = None  # loglik kinds: first global request of each example
    req_count: np.ndarray | None = None
    prompts: list[list[int]] | None = None  # generate
    lm_eval: LmEvalSplit | None = None


@dataclass
class _Chunk:
    """One chunk of a plan: which examples it scores and their prepared batches."""

    units: dict[int, np.ndarray]  # task index -> example indices scored in this chunk
    loglik: list[Batch]  # over global loglik requests of this chunk
    generate: dict[int, list[Batch]]  # task index -> prompt batches


class Evaluator:
    """Scores live models on `split` of `tasks` (specs from `load_tasks`, or a task file path).

    `evaluate(model)` returns an EvalResult; `evaluate_chunks(model, chunk_size)` yields a
    RunningScore after each chunk (each chunk covers the same fraction of every task) and leaves
    the full EvalResult in `last_result`. `bootstrap_iters=0` skips the CIs.

    `proxy=True` scores the step-function metrics by smooth proxies of the same decision, for a
    search objective: a generate task by `target_prob`, the teacher-forced probability of its
    target given the prompt (one forward pass, no decoding); a multiple-choice task by
    `choice_prob`, the softmax over its choices' scores (the ones acc / acc_norm take the argmax
    of) at the gold choice. Log-likelihood and lm-eval tasks keep their metric.
    """

    def __init__(
        self,
        tasks,
        tokenizer,
        split: str = "search",
        batch_size: int = 32,
        device=None,
        *,
        bootstrap_iters: int = 1000,
        seed: int = 0,
        proxy: bool = False,
    ):
        if split not in SPLITS:
            raise TaskError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.specs = load_tasks(tasks) if isinstance(tasks, (str, Path, dict)) else list(tasks)
        self.tokenizer = tokenizer
        self.split = split
        self.batch_size = batch_size
        self.device = torch.device(device) if device is not None else None
        self.bootstrap_iters = bootstrap_iters
        self.seed = seed
        self.proxy = proxy
        self.last_result: EvalResult | None = None
        self._pad_id = pad_token_id(tokenizer)
        self._requests: list[tuple[list[int], list[int]]] = []
        self._request_sources: list[str] = []
        self._tasks = [self._prepare(spec) for spec in self.specs]
        self._n_tok = np.array([len(c) for _, c in self._requests], dtype=np.float64)
        self._plans: dict[tuple, list[_Chunk]] = {}
        self._stops: dict[tuple[str, ...], list[int]] = {}
        self._hflm: tuple[weakref.ref, object] | None = None  # (model, its HFLM wrapper), last model only

    # --- construction -----------------------------------------------------------------------------

    def _prepare(self, spec) -> _Task:
        """Tokenize (native) or load (lm-eval) one task's split."""
        if isinstance(spec, LmEvalTask):
            split = LmEvalSplit(spec, self.split)
            return _Task(spec, split.metric, len(split), split.width, lm_eval=split)
        examples = spec.examples(self.split)
        metric = NATIVE_METRICS[spec.metric]
        if self.proxy and isinstance(spec, (GenerateTask, MultipleChoiceTask)):
            metric = PROXY_METRICS["target_prob" if isinstance(spec, GenerateTask) else "choice_prob"]
        elif isinstance(spec, GenerateTask):
            return _Task(spec, metric, len(examples), prompts=encode_prompts(self.tokenizer, [e.prompt for e in examples]))
        pairs = [(e.prompt, c) for e in examples for c in e.continuations]
        encoded = encode_pairs(self.tokenizer, pairs)
        counts = np.array([len(e.continuations) for e in examples])
        start = len(self._requests) + np.concatenate([[0], np.cumsum(counts)[:-1]])
        sources = [e.source for e in examples for _ in e.continuations]
        for (ctx, cont), src in zip(encoded, sources):
            if not cont:
                raise TaskError(f"task {spec.name!r}: {src}: the continuation encodes to no tokens")
        self._requests.extend(encoded)
        self._request_sources.extend(sources)
        width = 2 if spec.metric == "perplexity" else 1
        return _Task(spec, metric, len(examples), width, start.astype(np.int64), counts)

    @property
    def n_examples(self) -> dict[str, int]:
        """Examples (or lm-eval docs) per task on this split."""
        return {t.spec.name: t.n for t in self._tasks}

    # --- planning ---------------------------------------------------------------------------------

    def _schedule(self, chunk_size: int | None) -> list[dict[int, np.ndarray]]:
        """Example indices per task per chunk; every chunk covers the same fraction of each task."""
        if chunk_size is None:
            return [{i: np.arange(t.n) for i, t in enumerate(self._tasks)}]
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        keys, owners, units = [], [], []
        for i, t in enumerate(self._tasks):
            perm = np.random.default_rng([self.seed, i]).permutation(t.n)
            keys.append((np.arange(t.n) + 0.5) / t.n)
            owners.append(np.full(t.n, i))
            units.append(perm)
        keys, owners, units = np.concatenate(keys), np.concatenate(owners), np.concatenate(units)
        order = np.lexsort((owners, keys))
        chunks = []
        for lo in range(0, len(order), chunk_size):
            sel = order[lo:lo + chunk_size]
            chunks.append({i: np.sort(units[sel][owners[sel] == i]) for i in range(len(self._tasks))})
        return chunks

    def _plan(self, chunk_size: int | None, device, max_length: int | None) -> list[_Chunk]:
        """Padded batches for every chunk, on `device` (cached per chunk size, device and context)."""
        key = (chunk_size, str(device), max_length)
        if key in self._plans:
            return self._plans[key]
        if max_length is not None:
            for (_, cont), src in zip(self._requests, self._request_sources):
                if len(cont) > max_length:
                    raise TaskError(f"{src}: continuation has {len(cont)} tokens, more than the model's context ({max_length})")
        plan = []
        for units in self._schedule(chunk_size):
            req_ids, gen = [], {}
            for i, idx in units.items():
                t = self._tasks[i]
                if t.req_start is not None:
                    req_ids.extend(r for e in idx for r in range(t.req_start[e], t.req_start[e] + t.req_count[e]))
                elif t.prompts is not None and len(idx):
                    max_prompt = max_length - t.spec.max_new_tokens if max_length else None
                    if max_prompt is not None and max_prompt < 1:
                        raise TaskError(f"task {t.spec.name!r}: max_new_tokens leaves no room in the model's context")
                    batches = build_prompt_batches(t.prompts, idx.tolist(), batch_size=self.batch_size,
                                                   pad_id=self._pad_id, max_prompt=max_prompt)
                    gen[i] = [b.to(device) for b in batches]
            loglik = build_loglik_batches(self._requests, req_ids, batch_size=self.batch_size,
                                          pad_id=self._pad_id, max_length=max_length) if req_ids else []
            plan.append(_Chunk(units, [b.to(device) for b in loglik], gen))
        self._plans[key] = plan
        return plan

    # --- running ----------------------------------------------------------------------------------

    def evaluate(self, model) -> EvalResult:
        """Score `model` (in place, as it is now) on every example of the split."""
        for _ in self._run(model, None):
            pass
        return self.last_result

    def evaluate_chunks(self, model, chunk_size: int = 64) -> Iterator[RunningScore]:
        """Yield (examples_seen, running aggregate) after each chunk; `last_result` holds the final result."""
        return self._run(model, chunk_size)

    def _run(self, model, chunk_size: int | None) -> Iterator[RunningScore]:
        self.last_result = None  # set only once every chunk has been scored
        start = time.perf_counter()
        device = self.device or _input_device(model)
        plan = self._plan(chunk_size, device, model_max_length(model))
        stats = [np.full((t.n, t.width), np.nan) if t.metric.reduce else [None] * t.n for t in self._tasks]
        seen = [np.zeros(t.n, dtype=bool) for t in self._tasks]
        n_seen = 0
        for chunk in plan:
            self._run_chunk(model, chunk, stats)
            for i, idx in chunk.units.items():
                seen[i][idx] = True
                n_seen += len(idx)
            yield RunningScore(n_seen, self._running_aggregate(stats, seen))
        self.last_result = self._result(stats, time.perf_counter() - start)

    def _run_chunk(self, model, chunk: _Chunk, stats) -> None:
        """Score one chunk's examples into `stats`."""
        was_training = model.training
        if was_training:
            model.eval()
        try:
            with torch.inference_mode():
                ll = self._loglik(model, chunk.loglik) if chunk.loglik else None
                for i, idx in chunk.units.items():
                    if not len(idx):
                        continue
                    t = self._tasks[i]
                    if t.req_start is not None:
                        stats[i][idx] = self._loglik_stats(t, idx, ll)
                    elif t.prompts is not None:
                        self._generate_stats(model, t, chunk.generate[i], stats[i])
                    else:
                        items = t.lm_eval.run(self._lm(model), idx.tolist())
                        rows = t.lm_eval.stats(items)
                        if t.metric.reduce is None:
                            for e, item in zip(idx, rows):
                                stats[i][e] = item
                        else:
                            stats[i][idx] = rows
        finally:
            if was_training:
                model.train()

    def _loglik(self, model, batches: Sequence[Batch]) -> np.ndarray:
        """Continuation log-likelihood of every request in `batches` (NaN elsewhere)."""
        out = torch.full((len(self._requests),), float("nan"), dtype=torch.float64)
        scores = [continuation_logprobs(model, b) for b in batches]  # stays on the device until here
        out[torch.cat([b.request_ids for b in batches])] = torch.cat(scores).double().cpu()
        return out.numpy()

    def _loglik_stats(self, t: _Task, idx: np.ndarray, ll: np.ndarray) -> np.ndarray:
        """Per-example stats of a multiple-choice, loglikelihood or (proxy) generate task from request log-likelihoods."""
        spec = t.spec
        if isinstance(spec, GenerateTask):  # proxy: teacher-forced probability of the target
            return _target_prob(ll[t.req_start[idx]])[:, None]
        if isinstance(spec, LoglikelihoodTask):
            r = t.req_start[idx]
            if spec.metric == "perplexity":
                return np.stack([ll[r], self._n_tok[r]], axis=1)
            return ll[r][:, None]
        assert isinstance(spec, MultipleChoiceTask)
        examples = spec.examples(self.split)
        rows = np.empty((len(idx), 1))
        for k, e in enumerate(idx):
            s, c = t.req_start[e], t.req_count[e]
            scores = ll[s:s + c]
            if spec.metric == "acc_norm":
                scores = scores / np.array([len(x) for x in examples[e].continuations], dtype=np.float64)
            if t.metric.name == "choice_prob":
                rows[k, 0] = _softmax_at(scores, examples[e].label)
            else:
                rows[k, 0] = float(int(np.argmax(scores)) == examples[e].label)
        return rows

    def _generate_stats(self, model, t: _Task, batches: Sequence[Batch], out: np.ndarray) -> None:
        """Greedy-decode each prompt batch and write exact-match into `out`."""
        spec, tok = t.spec, self.tokenizer
        examples = spec.examples(self.split)
        eos = _eos_ids(tok, model)
        stops = self._stop_ids(tuple(spec.stop))
        stop_tensor = None
        for b in batches:
            if stop_tensor is None or stop_tensor.device != b.input_ids.device:
                stop_tensor = torch.tensor(sorted(eos | set(stops)), dtype=torch.long, device=b.input_ids.device)
            generated = greedy_generate(model, b, spec.max_new_tokens, stop_tensor).cpu().tolist()
            for e, gen in zip(b.request_ids.tolist(), generated):
                text = decode_continuation(tok, t.prompts[e], gen, eos, set(stops))
                text = truncate_at_stop(text, spec.stop)
                hit = normalize(text, spec.normalize) == normalize(examples[e].target, spec.normalize)
                out[e, 0] = float(hit)

    def _stop_ids(self, stops: tuple[str, ...]) -> list[int]:
        """Token ids whose text contains a stop string (cached per stop set)."""
        if stops not in self._stops:
            self._stops[stops] = stop_token_ids(self.tokenizer, stops)
        return self._stops[stops]

    def _lm(self, model):
        """The HFLM wrapper of this model object (rebuilt only when a different object comes in)."""
        if self._hflm is None or self._hflm[0]() is not model:
            self._hflm = (weakref.ref(model), make_hflm(model, self.tokenizer, self.batch_size))
        return self._hflm[1]

    # --- a differentiable loss --------------------------------------------------------------------

    def task_weights(self) -> list[float]:
        """Each task's share of the aggregate (its weight over the sum of weights)."""
        weights = [t.spec.weight for t in self._tasks]
        return [w / sum(weights) for w in weights]

    def task_loss(self, model, index: int, params=None) -> torch.Tensor:
        """The mean negative log of task `index`'s proxy probability over this split, differentiable in `params`
        (tensors standing in for the model's own of those names) or in the model's parameters.

        Per example: a generate task's −log p(target | prompt) (teacher-forced: `target_prob`), a multiple-choice
        task's −log softmax over its choices' scores at the gold (`choice_prob`, length-normalized for
        acc_norm), a loglikelihood task's −log-likelihood per continuation token. The cross-entropy of the
        decisions the search metric scores, as a gradient-based merge needs (AdaMerging, arXiv:2310.02575).
        """
        t = self._tasks[index]
        if t.req_start is None:
            raise TaskError(f"task {t.spec.name!r}: a {t.spec.kind} task has no differentiable loss on the "
                            f"{self.split} split (build the Evaluator with proxy=True for generate tasks; lm-eval "
                            "tasks have none)")
        device = _input_device(model)
        ids = [r for s, c in zip(t.req_start, t.req_count) for r in range(s, s + c)]
        batches = [b.to(device) for b in build_loglik_batches(
            self._requests, ids, batch_size=self.batch_size, pad_id=self._pad_id, max_length=model_max_length(model))]
        rows = torch.cat([b.request_ids for b in batches]).to(device)
        ll = torch.cat([continuation_logprobs(model, b, params) for b in batches])
        ll = torch.zeros(len(self._requests), dtype=ll.dtype, device=device).index_put((rows,), ll)
        spec = t.spec
        if isinstance(spec, GenerateTask):
            return -ll[torch.as_tensor(t.req_start, device=device)].mean()
        if isinstance(spec, LoglikelihoodTask):
            n_tok = torch.as_tensor(self._n_tok, dtype=ll.dtype, device=device)
            return -(ll / n_tok.clamp(min=1))[torch.as_tensor(ids, device=device)].mean()
        examples = spec.examples(self.split)
        terms = []
        for e, (s, c) in enumerate(zip(t.req_start, t.req_count)):
            scores = ll[s:s + c]
            if spec.metric == "acc_norm":
                scores = scores / torch.tensor([float(len(x)) for x in examples[e].continuations], device=device)
            terms.append(-torch.log_softmax(scores, 0)[examples[e].label])
        return torch.stack(terms).mean()

    # --- results ----------------------------------------------------------------------------------

    def _running_aggregate(self, stats, seen) -> float:
        """Weighted mean score over tasks with at least one scored example (weights renormalized)."""
        scores, weights = [], []
        for t, s, m in zip(self._tasks, stats, seen):
            if m.any() and t.spec.weight > 0:
                part = s[m] if isinstance(s, np.ndarray) else [x for x, keep in zip(s, m) if keep]
                scores.append(to_score(t.metric, t.metric.value(part)))
                weights.append(t.spec.weight)
        return weighted_mean(scores, weights) if weights else float("nan")

    def _result(self, stats, seconds: float) -> EvalResult:
        """The EvalResult of fully scored `stats`, with bootstrap CIs if enabled."""
        tasks, boot = {}, []
        for i, (t, s) in enumerate(zip(self._tasks, stats)):
            value = t.metric.value(s)
            ci = None
            if self.bootstrap_iters > 0:
                samples = bootstrap_values(t.metric, s, self.bootstrap_iters, np.random.default_rng([self.seed, i]))
                ci = percentile_ci(samples)
                boot.append(to_score(t.metric, samples))
            tasks[t.spec.name] = TaskResult(
                t.spec.name, t.spec.kind, t.metric.name, value, float(to_score(t.metric, value)),
                t.spec.weight, t.metric.higher_is_better, t.n, ci,
            )
        weights = [t.spec.weight for t in self._tasks]
        aggregate = weighted_mean([r.score for r in tasks.values()], weights)
        ci = None
        if boot:
            w = np.asarray(weights, dtype=np.float64)
            ci = percentile_ci((w[:, None] * np.stack(boot)).sum(0) / w.sum())
        return EvalResult(
            aggregate, {k: r.value for k, r in tasks.items()}, ci, {k: r.n_examples for k, r in tasks.items()},
            tasks, self.split, seconds,
        )


def _target_prob(loglik: np.ndarray) -> np.ndarray:
    """p(target | prompt) per example from its summed token log-probabilities.

    The probability that sampling reproduces the target token for token, i.e. the expected exact
    match of a sampled answer: a smooth surrogate of greedy exact match (which is 1 exactly when
    every target token is the argmax). It ignores where decoding would stop and any normalization.
    """
    return np.exp(loglik)


def _softmax_at(scores: np.ndarray, label: int) -> float:
    """softmax(scores)[label], computed stably."""
    z = scores - scores.max()
    return float(np.exp(z[label]) / np.exp(z).sum())


def _input_device(model) -> torch.device:
    """Where the model's input ids must live (its input embedding's device)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return emb.weight.device if emb is not None else next(model.parameters()).device


def _eos_ids(tokenizer, model) -> set[int]:
    """End-of-sequence ids from the tokenizer and the model's generation config."""
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
    return {int(i) for i in ids if i is not None}
