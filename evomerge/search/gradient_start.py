"""A start point fitted by gradient: a space's weights (and other knobs) learned on the search split.

Layer-wise AdaMerging (Yang et al., ICLR 2024, arXiv:2310.02575) learns one coefficient per task vector and
layer by gradient descent on the merged model's loss; it minimizes prediction entropy on unlabeled inputs.
A search has labels on its search split, so ``start: gradient`` minimizes the tasks' own cross-entropy there
(``Evaluator.task_loss``: the negative log of the smooth proxies of ``search_metric: proxy``) over the
space's own dimensions, kept inside their ranges (projected Adam): every ``weight`` and ``lambda`` of a
task-arithmetic space, or RegMean's per-model importance, off-diagonal ratio ``alpha`` and ``lambda``
(differentiable through its closed-form solve). The fitted point is enqueued as one more anchor: it is scored
by the search metric like any trial, and CMA-ES starts from it when it is the best anchor, so the search
starts where the gradient fit ends.

Which dimension gives which tensor its value is read from the engine itself: a probe point with a distinct
value in every dimension is decoded and planned, so the fit follows the recipe's own resolution rules
(parts, layer lists)."""

from __future__ import annotations

import math
import time
from typing import Callable

import torch

from evomerge.engine import load_input, plan_merge, prepare_statistics

STEPS = 100  # Adam steps over the whole search split
LR = 0.05  # Adam step size, in the units of the parameters
# the methods whose merge is differentiable in these searched parameters, and the parameters the fit learns
FITTED = {"task_arithmetic": ("weight", "lambda"), "regmean": ("weight", "alpha", "lambda")}


class GradientStartError(ValueError):
    """A run whose space or tasks a gradient start cannot fit; the message says why."""


def check_space(space) -> None:
    """Refuse a space the fit cannot differentiate: a method other than those of ``FITTED`` (sign election and
    sparsification are not differentiable in the weights), or a normalized task-arithmetic sum."""
    if getattr(space, "method", None) not in FITTED:  # a data-flow space has none
        raise GradientStartError(f"start: gradient fits {' and '.join(FITTED)} spaces (e.g. "
                                 f"search_spaces/task_arithmetic_per_type.yaml); this space's method is {space.method}")
    if space.fixed.get("normalize"):
        raise GradientStartError("start: gradient needs normalize: false (a normalized sum divides by the weights)")


def resolve_start(start: str, space, task_specs, lora_scalings: bool = False) -> str:
    """The start a run uses: ``auto`` is ``gradient`` where the fit applies (a space ``check_space`` accepts,
    evomerge's own task kinds, dense candidates) and ``anchors`` elsewhere; ``gradient`` where it does not
    apply is an error naming why."""
    from evomerge.evaluate import LmEvalTask

    if start not in ("auto", "gradient"):
        return start
    problems = []
    try:
        check_space(space)
    except GradientStartError as e:
        problems.append(str(e))
    lm_eval = [t.name for t in task_specs if isinstance(t, LmEvalTask)]
    if lm_eval:
        problems.append(f"start: gradient needs a differentiable loss; lm-eval tasks {lm_eval} have none")
    if lora_scalings:
        problems.append("start: gradient fits dense candidates; lora_scalings searches adapter scalings")
    if not problems:
        return "gradient"
    if start == "gradient":
        raise GradientStartError("; ".join(problems))
    return "anchors"


def probe_point(distributions) -> dict[str, float]:
    """A point with a distinct value, 6-decimal exact, inside every dimension's range."""
    n = len(distributions)
    point = {}
    for i, (name, d) in enumerate(sorted(distributions.items())):
        point[name] = round(d.low + (i + 1) / (n + 1) * (d.high - d.low), 6)
    if len(set(point.values())) != n:
        raise GradientStartError(f"start: gradient: {n} dimensions are too many to probe at 6 decimals")
    return point


class Layout:
    """Which dimension sets each fitted parameter of each merged tensor, and the tensors themselves.

    A tensor's fitted parameters index a vector of the point's dimensions (``dims`` order) followed by the
    fixed values the recipe resolves for the parameters the space does not search."""

    def __init__(self, recipe_for: Callable[[dict], object], distributions, model_params: dict[str, torch.Tensor],
                 plan_of: Callable = plan_merge, statistics_cache=None):
        self.dims = sorted(distributions)
        searched = {d.split("[")[0].split(".")[0] for d in self.dims}
        probe = probe_point(distributions)
        self._index = {probe[n]: i for i, n in enumerate(self.dims)}
        self.constants: list[float] = []
        plan = prepare_statistics(plan_of(recipe_for(probe)), cache_dir=statistics_cache, device="cpu")
        self.method = plan.method
        fitted = FITTED[self.method.name]
        self.per_model = [p.name for p in self.method.params if p.per_model and p.name in fitted]
        self.per_tensor = [p.name for p in self.method.params if not p.per_model and p.name in fitted]
        self.tasks, self.inputs, self.statistics, self.model_slots, self.slots = [], [], [], [], []
        fitted_tasks = [t for t in plan.tasks if t.method != "copy" and t.name in model_params]
        check_memory(fitted_tasks)
        cpu = torch.device("cpu")
        for task in fitted_tasks:
            self.tasks.append(task)
            self.inputs.append([None if r is None else load_input(plan, r, cpu).float() for r in [task.base, *task.inputs]])
            self.statistics.append(None if plan.statistics is None else
                                   [plan.statistics[r.model].get(r.name) for r in task.inputs])
            self.model_slots.append([{p: self._slot(mp[p], p in searched, task.name) for p in self.per_model}
                                     for mp in task.model_params])
            self.slots.append({p: self._slot(task.params[p], p in searched, task.name) for p in self.per_tensor})

    @property
    def names(self) -> list[str]:
        return [task.name for task in self.tasks]

    def _slot(self, value: float, searched: bool, tensor: str) -> int:
        if not searched:
            self.constants.append(float(value))
            return len(self.dims) + len(self.constants) - 1
        dim = self._index.get(round(value, 6))
        if dim is None:  # an interpolated gradient value (block granularity with smooth: true)
            raise GradientStartError(f"start: gradient: tensor {tensor} takes an interpolated value; use "
                                     "granularity model or layer (or block with smooth: false)")
        return dim

    def merged(self, x: torch.Tensor, dtypes: dict[str, torch.dtype]) -> dict[str, torch.Tensor]:
        """The candidate's tensors at point `x` (dimension values in ``dims`` order), differentiable in x."""
        v = torch.cat([x, torch.tensor(self.constants, dtype=x.dtype)])
        out = {}
        for task, (base, *inputs), stats, model_slots, slots in zip(
                self.tasks, self.inputs, self.statistics, self.model_slots, self.slots):
            model_params = [{**mp, **{p: v[i] for p, i in ms.items()}} for mp, ms in zip(task.model_params, model_slots)]
            params = {**task.params, **{p: v[i] for p, i in slots.items()}}
            out[task.name] = self.merge(base, inputs, model_params, params, stats).to(dtypes[task.name])
        return out

    def merge(self, base, inputs, model_params, params, statistics) -> torch.Tensor:
        """One tensor's merge with tensor-valued parameters: task arithmetic's ``base + λ·Σ_m w_m·(x_m − base)``
        (``methods/task_arithmetic.py`` without sparsification or normalization), else the method's own kernel."""
        if self.method.name == "task_arithmetic":
            weights = torch.stack([mp["weight"] for mp in model_params])
            deltas = torch.stack([x - base for x in inputs])
            return base + params["lambda"] * torch.tensordot(weights, deltas, dims=1)
        return self.method.kernel(base=base, tensors=inputs, model_params=model_params, params=params, fields=None,
                                  statistics=statistics)


def check_memory(tasks) -> None:
    """Refuse, before loading anything, a fit whose float32 copies of every input tensor do not fit in the host's
    available memory (the fit holds the base and every fine-tune; meant for models of up to a few billion
    parameters)."""
    import psutil

    need = sum(4 * math.prod(t.shape) * (len(t.inputs) + (t.base is not None)) for t in tasks)
    available = psutil.virtual_memory().available
    if need > available:
        raise GradientStartError(f"start: gradient holds float32 copies of the base and every fine-tune: about "
                                 f"{need / 2**30:.1f} GiB, but {available / 2**30:.1f} GiB are available; use "
                                 "start: anchors")


def fit_start(*, recipe_for: Callable[[dict], object], distributions, starts: list[dict[str, float]], model,
              evaluator, plan_of: Callable = plan_merge, statistics_cache=None, steps: int | None = None, lr: float = LR,
              progress: Callable[[str], None] = lambda s: None) -> tuple[dict[str, float], dict]:
    """The point of lowest search-split loss found by projected Adam from the start with the lowest loss.

    `plan_of` plans a recipe (the candidate builder's ``plan``, over its open files; default: the engine's);
    `steps` defaults to ``STEPS``.
    Returns the point and a summary (start loss, fitted loss, seconds) for the study's records."""
    t0 = time.perf_counter()
    steps = STEPS if steps is None else steps
    params = dict(model.named_parameters())
    layout = Layout(recipe_for, distributions, params, plan_of, statistics_cache)
    dtypes = {n: params[n].dtype for n in layout.names}
    low = torch.tensor([distributions[d].low for d in layout.dims])
    high = torch.tensor([distributions[d].high for d in layout.dims])
    shares = evaluator.task_weights()

    def loss_at(x: torch.Tensor, backward: bool) -> float:
        total = 0.0
        for i, share in enumerate(shares):
            if share == 0:
                continue
            loss = share * evaluator.task_loss(model, i, layout.merged(x, dtypes))
            if backward:
                loss.backward()
            total += loss.item()
        return total

    with torch.no_grad():
        scored = [(loss_at(torch.tensor([p[d] for d in layout.dims]), False), j) for j, p in enumerate(starts)]
    start_loss, j = min(scored)
    x = torch.tensor([starts[j][d] for d in layout.dims], requires_grad=True)
    best = (start_loss, x.detach().clone())
    opt = torch.optim.Adam([x], lr=lr)
    was_training = model.training
    model.eval()
    try:
        for step in range(steps):
            opt.zero_grad()
            loss = loss_at(x, True)
            if loss < best[0]:
                best = (loss, x.detach().clone())
            opt.step()
            with torch.no_grad():
                x.copy_(torch.maximum(torch.minimum(x, high), low))
            if step % 10 == 0:
                progress(f"gradient start: step {step}/{steps}, search-split loss {loss:.4f}")
        with torch.no_grad():
            final = loss_at(x, False)
        if final < best[0]:
            best = (final, x.detach().clone())
    finally:
        model.train(was_training)
    point = {d: round(float(v), 6) for d, v in zip(layout.dims, best[1])}
    summary = {"start_anchor": j, "start_loss": round(start_loss, 6), "fitted_loss": round(best[0], 6),
               "steps": steps, "seconds": round(time.perf_counter() - t0, 1)}
    return point, summary
